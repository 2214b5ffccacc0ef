"""The float model evaluated in float64 with ONNX's reference evaluator (numpy), every
intermediate tensor under its ONNX name.

Quantization decisions (activation ranges, AdaRound's rounding) are computed from these values.
In float32, CPU kinds (AVX2, AVX-512, AMX kernels) and thread counts give last-bit differences,
and a range or a rounding decision can flip on them; in float64 the same differences are about
1e-16 relative, nine orders of magnitude below the float32 step that the results are rounded to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

BATCH_SIZE = 100


def float64_model(path: str | Path):
    """The ONNX model with every float32 initializer and declared tensor type in float64."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return model


def activations(path: str | Path, images: np.ndarray, batch_size: int = BATCH_SIZE) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of `images` (uint8 or float NHWC): {tensor name: float64 value} for the graph
    input and every node output."""
    from onnx.reference import ReferenceEvaluator

    model = float64_model(path)
    evaluator = ReferenceEvaluator(model)
    input_name = model.graph.input[0].name
    produced = [name for node in model.graph.node for name in node.output]
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype=np.float64)
        values = evaluator.run(None, {input_name: batch}, intermediate=True)
        yield {input_name: batch, **{name: values[name] for name in produced if name in values}}
