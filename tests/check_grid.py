"""Compare an AdaRound'ed float graph with the QDQ model ONNX Runtime made of it:

    python -m tests.check_grid ADAROUND.onnx QUANTIZED.onnx

Prints the largest |dequantized weight - AdaRound weight| in quantization steps, over all
weights but each channel's largest-magnitude one (which sets the scale).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def initializers(path: str) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


if __name__ == "__main__":
    float_graph, quantized_graph = onnx.load(sys.argv[1]).graph, onnx.load(sys.argv[2]).graph
    floats, ints = initializers(sys.argv[1]), initializers(sys.argv[2])
    weight_of = {n.name: n.input[1] for n in float_graph.node if n.op_type in ("Conv", "Gemm")}
    producer = {o: n for n in quantized_graph.node for o in n.output}
    worst, layers = 0.0, 0
    for node in quantized_graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producer[node.input[1]]
        q, scale, zero = (ints[name] for name in dq.input[:3])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [-1 if i == axis else 1 for i in range(q.ndim)]
        dequantized = (q.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape)
        original = floats[weight_of[node.name]].astype(np.float64)
        steps = np.abs(dequantized - original) / scale.reshape(shape)
        reduce_axes = tuple(i for i in range(q.ndim) if i != axis)
        is_max = np.abs(original) >= np.abs(original).max(axis=reduce_axes, keepdims=True)
        worst = max(worst, float(steps[~is_max].max()))
        layers += 1
    print(json.dumps({"layers": layers, "max_offgrid_steps": worst}))
