"""Per-layer quantization error: the signal-to-quantization-noise ratio (SQNR, dB) of each
quantized layer's output against the same tensor of the float model, on a fixed batch of test
images, rounded to 0.1 dB. Higher is better; every 6 dB is about one bit. A tensor quantized
without loss (the 8-bit input pixels, scale 1) has no noise and no row.

ONNX Runtime: its own QDQ debugging tools (onnxruntime.quantization.qdq_loss_debug), over every
tensor with a QuantizeLinear / DequantizeLinear pair. Each row names the ONNX node its tensor
belongs to (`node`: the Conv / Gemm / Add, also for the ReLU after it), so that both backends'
rows meet on the same layer. PyTorch: an FX interpreter records each
quantized Conv / Linear module's output (dequantized) and the float graph's output of the same
layer (after its ReLU when the quantized module fused one).
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
    producer = {out: node for node in graph.node for out in node.output}

    def owner(tensor: str) -> str:
        """The layer a tensor belongs to: its producer, or the Conv / Gemm / Add before a ReLU."""
        node = producer.get(tensor)
        if node is not None and node.op_type == "Relu":
            upstream = producer.get(node.input[0])
            node = upstream if upstream is not None and upstream.op_type in ("Conv", "Gemm", "Add") else node
        return node.name if node is not None else tensor

    rows = []
    for name in sorted(matched, key=lambda n: order.index(n) if n in order else len(order)):
        match = matched[name]
        if not match.get("float"):
            continue
        value = sqnr_db(np.concatenate(match["float"]), np.concatenate(match["post_qdq"]))
        if value != float("inf"):  # a lossless tensor (the 8-bit input pixels, scale 1) has no noise
            rows.append({"layer": name, "node": owner(name), "sqnr_db": value})
    return rows


def torch_layer_errors(float_model, quantized_model, images: np.ndarray) -> list[dict]:
    import torch

    from .torch_quant import is_quantized_layer

    def record(model, keep) -> dict:
        outputs = {}

        class Recorder(torch.fx.Interpreter):
            def run_node(self, node):
                result = super().run_node(node)
                if node.op == "call_module" and keep(node.target):
                    outputs[node.target] = result.dequantize() if result.is_quantized else result
                return result

        with torch.inference_mode():
            Recorder(model).run(torch.from_numpy(np.asarray(images, dtype=np.float32)))
        return outputs

    quantized = record(quantized_model, lambda t: is_quantized_layer(quantized_model.get_submodule(t)))
    reference = record(float_model, lambda t: True)
    rows = []
    for target, output in quantized.items():
        float_target = target if target in reference else target.rsplit(".", 1)[0]  # padded conv: Sequential
        expected = reference[float_target]
        if "ReLU" in type(quantized_model.get_submodule(target)).__name__:
            expected = torch.relu(expected)
        rows.append({"layer": float_target, "node": float_target,
                     "sqnr_db": sqnr_db(expected.numpy(), output.numpy())})
    return rows
