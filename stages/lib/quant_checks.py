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


def require_quantized(variant: str, summary: dict, expected_layers: int) -> None:
    done = summary["quantized_layers"]
    if summary["float_layers"] or done != expected_layers:
        raise PipelineError(f"{variant}: {done} of {expected_layers} Conv/Dense layers quantized, "
                            f"float layers left: {summary['float_layers'] or 'none'}; refusing a model "
                            "that is not fully quantized")


def require_integer_execution(variant: str, runs: dict, expected_layers: int) -> None:
    """`runs`: execution.measure of the saved model. Every Conv and Gemm must run on integer kernels."""
    done = sum(int(runs["layers"][kind].split("/")[0]) for kind in ("Conv", "Gemm"))
    weighted = [name for name in runs["float_layers"] if not name.startswith("Add")]
    if weighted or done != expected_layers:
        raise PipelineError(f"{variant}: {done} of {expected_layers} Conv/Dense layers run on integer kernels, "
                            f"float layers left: {weighted or 'none'}; refusing a model that is not fully quantized")
