"""What really runs: per layer type (Conv, Gemm, Add), how many run on integer kernels, read from
the graph each runtime executes, never from a name or a setting.

- ONNX Runtime: the graph after the CPU provider's optimizations (QLinearConv, QGemm, QLinearAdd
  are integer; Conv, Gemm, Add between DequantizeLinear / QuantizeLinear run in float);
- PyTorch: the float program's graph (aten.convolution ... float); for torch_uint8 the graph that
  torchao's x86 lowering produces (onednn.qconv_pointwise ... integer, the residual Add fused into
  the integer conv as a post-op); for torch_int8 the ExecuTorch program: the nodes inside each
  XNNPACK delegate with the datatype they take (qint8: integer), and the operators left outside;
- TFLite: the interpreter's ops and the dtype of each op's first input.

The label: `integer` when every Conv, Gemm and Add runs on integer kernels, `float` when none
does, otherwise `mixed (k of n in float)`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

LAYER_TYPES = ("Conv", "Gemm", "Add")
ONNX_OPS = {  # op type in the optimized graph -> (layer type, runs integer?)
    "QLinearConv": ("Conv", True), "ConvInteger": ("Conv", True), "Conv": ("Conv", False),
    "QGemm": ("Gemm", True), "QLinearMatMul": ("Gemm", True), "MatMulInteger": ("Gemm", True),
    "Gemm": ("Gemm", False), "MatMul": ("Gemm", False), "FusedGemm": ("Gemm", False), "FusedMatMul": ("Gemm", False),
    "QLinearAdd": ("Add", True), "Add": ("Add", False),
    "FusedConv": ("Conv", False), "NhwcFusedConv": ("Conv", False),
}
TORCH_OPS = {  # operator in the exported (or x86-lowered) graph -> layer types it computes, runs integer?
    "onednn.qconv_pointwise.default": (("Conv",), True), "onednn.qconv2d_pointwise.default": (("Conv",), True),
    "onednn.qconv2d_pointwise.binary": (("Conv", "Add"), True),  # the Add fused into the conv as a post-op
    "onednn.qlinear_pointwise.default": (("Gemm",), True), "onednn.qlinear_pointwise.binary": (("Gemm", "Add"), True),
    "aten.convolution.default": (("Conv",), False), "aten.conv2d.default": (("Conv",), False),
    "aten.linear.default": (("Gemm",), False), "aten.addmm.default": (("Gemm",), False), "aten.mm.default": (("Gemm",), False),
    "aten.matmul.default": (("Gemm",), False),  # a float Dense that onnx2torch keeps as MatMul + Add
    "aten.add.Tensor": (("Add",), False), "aten.add_.Tensor": (("Add",), False),
}
XNNPACK_NODES = {"XNNConv2d": "Conv", "XNNDepthwiseConv2d": "Conv", "XNNFullyConnected": "Gemm", "XNNAdd": "Add"}
XNNPACK_INTEGER = {"xnn_datatype_qint8", "xnn_datatype_quint8", "xnn_datatype_qcint8", "xnn_datatype_qcint32"}
EXECUTORCH_OPS = {"aten::convolution": "Conv", "aten::linear": "Gemm", "aten::addmm": "Gemm", "aten::mm": "Gemm",
                  "aten::add": "Add"}  # operators left to ExecuTorch's portable (float) kernels
KERAS_LAYERS = {"Conv2D": "Conv", "DepthwiseConv2D": "Conv", "Dense": "Gemm", "Add": "Add"}
TFLITE_OPS = {"CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "FULLY_CONNECTED": "Gemm", "ADD": "Add"}


FLOAT_OPS = {"AveragePool", "GlobalAveragePool", "Softmax", "aten.avg_pool2d.default", "aten._softmax.default",
             "aten.softmax.int", "aten.adaptive_avg_pool2d.default", "aten::_softmax", "aten::avg_pool2d",
             "XNNAvgPooling2d", "XNNGlobalAvgPooling2d", "XNNSoftmax"}  # float compute besides the layers counted, listed as seen


def summarise(layers: list[tuple[str, str, bool]], float_ops: list[str] = ()) -> dict:
    """layers: (layer type, name, runs integer?) for each Conv / Gemm / Add that runs; float_ops:
    the other float compute ops the runtime runs (pooling, softmax), named as it names them."""
    counts = {kind: {"integer": sum(1 for k, _, i in layers if k == kind and i),
                     "total": sum(1 for k, _, _ in layers if k == kind)} for kind in LAYER_TYPES}
    float_layers = [f"{kind} {name}" for kind, name, integer in layers if not integer]
    total = len(layers)
    if not float_layers:
        label = "integer"
    elif len(float_layers) == total:
        label = "float"
    else:
        label = f"mixed ({len(float_layers)} of {total} in float)"
    return {"label": label, "layers": {k: f"{c['integer']}/{c['total']} integer" for k, c in counts.items()},
            "float_layers": float_layers, "other_float_ops": sorted(set(float_ops))}


def onnx_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    import onnx

    from .runners import onnx_session

    with tempfile.TemporaryDirectory() as work:
        optimized = Path(work) / "optimized.onnx"
        onnx_session(path, optimized)
        graph = onnx.load(str(optimized)).graph
    return ([(ONNX_OPS[n.op_type][0], n.name or n.output[0], ONNX_OPS[n.op_type][1])
             for n in graph.node if n.op_type in ONNX_OPS], [n.op_type for n in graph.node if n.op_type in FLOAT_OPS])


def _graph_layers(graph) -> tuple[list[tuple[str, str, bool]], list[str]]:
    found, float_ops = [], []
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "call_function":
            continue
        if target in FLOAT_OPS:
            float_ops.append(target)
        kinds, integer = TORCH_OPS.get(target, ((), False))
        found.extend((kind, f"{target} {node.name}", integer) for kind in kinds)
    return found, float_ops


def torch_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """A float torch.export program, run eagerly: its graph's operators."""
    from .runners import exported_module

    return _graph_layers(exported_module(path).graph)


def torch_x86_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """A PT2E program as runners.torch_x86 runs it: the graph torchao's x86 lowering produces
    (oneDNN's quantized convolution / linear kernels, and whatever it leaves in float)."""
    from .runners import x86_lowered

    _, lower = x86_lowered(Path(path))
    return _graph_layers(lower().graph)


def xnnpack_graph(payload: bytes) -> dict:
    """An XNNPACK delegate's payload (header + flatbuffer) as JSON, decoded with the schema
    ExecuTorch ships and its flatc."""
    import importlib.resources
    import json
    import re

    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
    flatbuffer = payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = importlib.resources.files(xnnpack_graph_serialize.__package__).joinpath("schema.fbs").read_bytes()
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "schema.fbs").write_bytes(schema)
        (Path(work) / "graph.bin").write_bytes(flatbuffer)
        _flatc_decompile(work, str(Path(work) / "schema.fbs"), str(Path(work) / "graph.bin"))
        text = (Path(work) / "graph.json").read_text()
    # flatc writes non-finite floats (a Clamp's open bounds) as bare inf / nan, which JSON lacks
    return json.loads(re.sub(r":\s*(-?)inf\b", r": \1Infinity", re.sub(r":\s*-?nan\b", ": NaN", text)))


def executorch_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """An ExecuTorch program (.pte): inside each XNNPACK delegate, its nodes and the datatype of
    each node's first input (a Conv / FullyConnected / Add on qint8 runs XNNPACK's integer kernels);
    outside them, the operators ExecuTorch runs itself (float portable kernels)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes()).program
    plan = program.execution_plan[0]
    found, float_ops = [], []
    for delegate in plan.delegates:
        if delegate.id != "XnnpackBackend":
            found.append(("Conv", f"delegate {delegate.id}", False))  # unknown backend: not counted as integer
            continue
        graph = xnnpack_graph(program.backend_delegate_data[delegate.processed.index].data)
        dtypes = [value["xvalue_union"].get("tensor_value", value["xvalue_union"]).get("datatype")
                  for value in graph["xvalues"]]
        for index, node in enumerate(graph["xnodes"]):
            kind, fields = node["xnode_union_type"], node["xnode_union"]
            first = fields.get("input1_id", fields.get("input_id"))
            integer = first is not None and dtypes[first] in XNNPACK_INTEGER
            if kind in XNNPACK_NODES:
                found.append((XNNPACK_NODES[kind], f"{kind} #{index} ({dtypes[first]})", integer))
            elif kind in FLOAT_OPS and not integer:
                float_ops.append(kind)
    for operator in plan.operators:
        if operator.name in EXECUTORCH_OPS:
            found.append((EXECUTORCH_OPS[operator.name], f"{operator.name} (portable)", False))
        elif operator.name in FLOAT_OPS:
            float_ops.append(operator.name)
    return found, float_ops


def tflite_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    import numpy as np

    from .runners import tflite_interpreter

    interpreter = tflite_interpreter(path)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    found, float_ops = [], []
    for op in interpreter._get_ops_details():  # the interpreter's own op list (no public API for it)
        kind = TFLITE_OPS.get(op["op_name"])
        integer = bool(np.issubdtype(dtypes[op["inputs"][0]], np.integer)) if len(op["inputs"]) else False
        if kind is not None:
            found.append((kind, f"{op['op_name']} #{op['index']}", integer))
        elif op["op_name"] in ("AVERAGE_POOL_2D", "SOFTMAX") and not integer:
            float_ops.append(op["op_name"])
    return found, float_ops


def keras_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    from .runners import keras_model

    model = keras_model(path)
    return ([(KERAS_LAYERS[type(layer).__name__], layer.name, "int" in str(layer.compute_dtype))
             for layer in model.layers if type(layer).__name__ in KERAS_LAYERS],
            [type(layer).__name__ for layer in model.layers if "Pool" in type(layer).__name__])


MEASURE = {"keras": keras_layers, "onnx": onnx_layers, "torch": torch_layers, "torch_x86": torch_x86_layers,
           "executorch": executorch_layers, "tflite": tflite_layers}


def measure(kind: str, path: Path) -> dict:
    """The execution summary of a saved model of `kind`."""
    if kind == "torch_quantized":
        from .runners import torch_quantized_model

        kind, path = torch_quantized_model(Path(path))
    return summarise(*MEASURE[kind](Path(path)))
