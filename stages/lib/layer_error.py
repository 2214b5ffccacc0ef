"""Per-layer quantization error: the signal-to-quantization-noise ratio (SQNR, dB) of each
quantized layer's output against the same tensor of the float model, on a fixed batch of test
images, rounded to 0.1 dB. Higher is better; every 6 dB is about one bit. A tensor quantized
without loss (the 8-bit input pixels, scale 1) has no noise and no row.

ONNX Runtime: its own QDQ debugging tools (onnxruntime.quantization.qdq_loss_debug), over every
tensor with a QuantizeLinear / DequantizeLinear pair. Each row names the ONNX node its tensor
belongs to (`node`: the Conv / Gemm / Add, also for the ReLU after it), so that both backends'
rows meet on the same layer. PyTorch: an FX interpreter runs the PT2E quantized graph (the
quantize / dequantize model before lowering) and records each quantized activation, dequantized;
it is matched to the float graph's value of the same ONNX tensor (torch_quant.observed_tensor).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

IMAGES = 256  # the first test images; a fixed batch


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((reference - test) ** 2))
    signal = float(np.sum(reference ** 2))
    return float("inf") if noise == 0 else round(float(10 * np.log10(max(signal, 1e-30) / noise)), 1)


def layer_of(graph):
    """tensor -> the ONNX node it belongs to: its producer, or the Conv / Gemm / Add before a ReLU."""
    producer = {out: node for node in graph.node for out in node.output}

    def owner(tensor: str) -> str:
        node = producer.get(tensor)
        if node is not None and node.op_type == "Relu":
            upstream = producer.get(node.input[0])
            node = upstream if upstream is not None and upstream.op_type in ("Conv", "Gemm", "Add") else node
        return node.name if node is not None else tensor

    return owner


def ort_layer_errors(float_model: Path, quantized_model: Path, images: np.ndarray) -> list[dict]:
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, create_activation_matching, modify_model_output_intermediate_tensors)

    from .calibration import CalibrationSet, ort_reader

    input_name = onnx.load(str(float_model)).graph.input[0].name
    with tempfile.TemporaryDirectory() as work:
        augmented = {}
        for role, path in (("float", float_model), ("quantized", quantized_model)):
            augmented[role] = str(Path(work) / f"{role}.onnx")
            modify_model_output_intermediate_tensors(str(path), augmented[role])
        activations = {role: collect_activations(path, ort_reader(CalibrationSet(images), input_name))
                       for role, path in augmented.items()}
    matched = create_activation_matching(activations["quantized"], activations["float"])
    graph = onnx.load(str(float_model)).graph
    order = [out for node in graph.node for out in node.output]
    owner = layer_of(graph)
    rows = []
    for name in sorted(matched, key=lambda n: order.index(n) if n in order else len(order)):
        match = matched[name]
        if not match.get("float"):
            continue
        value = sqnr_db(np.concatenate(match["float"]), np.concatenate(match["post_qdq"]))
        if value != float("inf"):  # a lossless tensor (the 8-bit input pixels, scale 1) has no noise
            rows.append({"layer": name, "node": owner(name), "sqnr_db": value})
    return rows


def torch_layer_errors(float_model, quantized_model, onnx_graph, images: np.ndarray) -> list[dict]:
    """`float_model`: the onnx2torch graph of `onnx_graph`; `quantized_model`: its PT2E quantized graph."""
    import torch

    from .torch_quant import observed_tensor

    batch = torch.from_numpy(np.asarray(images, dtype=np.float32))
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    quantized: dict[str, torch.Tensor] = {}

    class QuantizedRecorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.target == quantize:
                _, scale, zero_point = node.args[:3]
                tensor = observed_tensor(node.args[0], onnx_graph)
                quantized[tensor] = (result.double() - zero_point) * scale
            return result

    float_outputs: dict[str, torch.Tensor] = {}
    names = {n.name: n.output[0] for n in onnx_graph.node}

    class FloatRecorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op == "call_module" and node.target in names:
                float_outputs[names[node.target]] = result
            return result

    with torch.no_grad():
        QuantizedRecorder(quantized_model).run(batch)
        FloatRecorder(float_model).run(batch)
    owner = layer_of(onnx_graph)
    order = [out for node in onnx_graph.node for out in node.output]
    rows = []
    for tensor in sorted(quantized, key=lambda t: order.index(t) if t in order else -1):
        if tensor not in float_outputs or float_outputs[tensor].shape != quantized[tensor].shape:
            continue  # the graph input (8-bit pixels, lossless); the Pad before a padded Conv (its input plus zeros)
        value = sqnr_db(float_outputs[tensor].numpy(), quantized[tensor].numpy())
        if value != float("inf"):
            rows.append({"layer": tensor, "node": owner(tensor), "sqnr_db": value})
    return rows
