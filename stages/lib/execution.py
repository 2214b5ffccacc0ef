"""What really runs: per layer type (Conv, Gemm, Add), how many run on integer kernels, read from
the graph each runtime executes, never from a name or a setting.

- ONNX Runtime: the graph after the CPU provider's optimizations (QLinearConv, QGemm, QLinearAdd
  are integer; Conv, Gemm, Add between DequantizeLinear / QuantizeLinear run in float);
- PyTorch (TorchScript): the inlined graph's ops (quantized::conv2d ... integer; aten::conv2d ...
  float, also when their weights come out of aten::dequantize);
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
TORCH_OPS = {
    "quantized::conv2d": ("Conv", True), "quantized::conv2d_relu": ("Conv", True),
    "aten::_convolution": ("Conv", False), "aten::conv2d": ("Conv", False),
    "quantized::linear": ("Gemm", True), "quantized::linear_relu": ("Gemm", True),
    "aten::linear": ("Gemm", False), "aten::addmm": ("Gemm", False), "aten::matmul": ("Gemm", False),
    "quantized::add": ("Add", True), "quantized::add_relu": ("Add", True),
    "aten::add": ("Add", False), "aten::add_": ("Add", False),
}
KERAS_LAYERS = {"Conv2D": "Conv", "DepthwiseConv2D": "Conv", "Dense": "Gemm", "Add": "Add"}
TFLITE_OPS = {"CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "FULLY_CONNECTED": "Gemm", "ADD": "Add"}


FLOAT_OPS = {"AveragePool", "GlobalAveragePool", "Softmax", "aten::avg_pool2d", "aten::softmax",
             "aten::adaptive_avg_pool2d"}  # float compute besides the layers counted, listed as seen


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


def torch_layers(path: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    from .runners import torch_load

    found, float_ops = [], []
    for node in torch_load(path).inlined_graph.nodes():
        if node.kind() in FLOAT_OPS:
            float_ops.append(node.kind())
        kind = TORCH_OPS.get(node.kind())
        outputs = list(node.outputs())
        if kind is None or not outputs or outputs[0].type().kind() != "TensorType":
            continue  # aten::add on integers is shape arithmetic, not a layer
        source = node.sourceRange().splitlines()[0] if node.sourceRange() else node.kind()
        found.append((kind[0], f"{node.kind()} {source}".strip(), kind[1]))
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


MEASURE = {"keras": keras_layers, "onnx": onnx_layers, "torch": torch_layers, "tflite": tflite_layers}


def measure(kind: str, path: Path) -> dict:
    """The execution summary of a saved model of `kind`."""
    return summarise(*MEASURE[kind](Path(path)))
