"""Proof that a saved model is quantized: read the graph, not the file name.

A quantizer that silently leaves a layer in float is the failure feared most, so every
quantize stage runs these checks before it lets its model out, and the tests run them again.
"""
from __future__ import annotations

from pathlib import Path

from .errors import PipelineError

ONNX_INT_TYPES = {2: "uint8", 3: "int8"}  # onnx.TensorProto.UINT8, INT8
ONNX_WEIGHTED = ("Conv", "Gemm", "MatMul")
ONNX_QOPERATOR = ("QLinearConv", "QGemm", "QLinearMatMul")  # weight is input 3 of each


def onnx_summary(path: Path) -> dict:
    """Per weighted layer: does it take integer weights (QOperator) or DequantizeLinear'd integer
    weights and activations (QDQ)? Returns counts and the names of float layers left."""
    import onnx

    graph = onnx.load(str(path)).graph
    init_types = {t.name: t.data_type for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized_int(name: str) -> str | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        source = node.input[0]
        if source in init_types:
            return ONNX_INT_TYPES.get(init_types[source])
        upstream = producer.get(source)
        return "activation" if upstream is not None and upstream.op_type == "QuantizeLinear" else None

    quantized, float_layers, weight_dtypes = [], [], set()
    for node in graph.node:
        if node.op_type in ONNX_QOPERATOR:
            weight_dtypes.add(ONNX_INT_TYPES.get(init_types.get(node.input[3]), "?"))
            quantized.append(node.name)
        elif node.op_type in ONNX_WEIGHTED:
            weight, activation = dequantized_int(node.input[1]), dequantized_int(node.input[0])
            if weight in ("int8", "uint8") and activation is not None:
                weight_dtypes.add(weight)
                quantized.append(node.name)
            else:
                float_layers.append(node.name)
    return {"quantized_layers": len(quantized), "float_layers": float_layers,
            "weight_dtypes": sorted(weight_dtypes),
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node)}


TORCH_INTEGER_OPS = ("quantized::conv2d", "quantized::conv2d_relu", "quantized::linear",
                     "quantized::linear_relu")
TORCH_FLOAT_WEIGHTED = ("aten::_convolution", "aten::conv2d", "aten::linear", "aten::addmm", "aten::matmul")


def torch_summary(model) -> dict:
    """For a loaded TorchScript model: integer conv/linear kernels, and float conv/linear calls
    whose weight and input both come out of aten::dequantize (simulated QDQ)."""
    graph = model.inlined_graph
    integer, simulated, float_layers = 0, 0, []
    for node in graph.nodes():
        kind = node.kind()
        if kind in TORCH_INTEGER_OPS:
            integer += 1
        elif kind in TORCH_FLOAT_WEIGHTED:
            inputs = list(node.inputs())
            from_dequant = [i.node().kind() == "aten::dequantize" for i in inputs[:2]]
            if all(from_dequant):
                simulated += 1
            else:
                float_layers.append(f"{kind} {node.sourceRange().splitlines()[0] if node.sourceRange() else ''}".strip())
    kinds = [n.kind() for n in graph.nodes()]
    return {"integer_kernels": integer, "simulated_qdq_layers": simulated, "float_layers": float_layers,
            "quantize_nodes": kinds.count("aten::quantize_per_tensor"),
            "dequantize_nodes": kinds.count("aten::dequantize")}


def require_quantized(variant: str, summary: dict, expected_layers: int) -> None:
    done = summary.get("quantized_layers", summary.get("integer_kernels", 0) + summary.get("simulated_qdq_layers", 0))
    if summary["float_layers"] or done != expected_layers:
        raise PipelineError(f"{variant}: {done} of {expected_layers} Conv/Dense layers quantized, "
                            f"float layers left: {summary['float_layers'] or 'none'}; refusing a model "
                            "that is not fully quantized")
