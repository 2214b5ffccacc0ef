"""The float model evaluated in float64 with ONNX's reference evaluator (numpy), every
intermediate tensor under its ONNX name.

Quantization decisions (activation ranges, AdaRound's rounding) are computed from these values.
In float32, CPU kinds (AVX2, AVX-512, AMX kernels) and thread counts give last-bit differences,
and a range or a rounding decision can flip on them; in float64 the same differences are about
1e-16 relative, nine orders of magnitude below the float32 step that the results are rounded to.

Conv and AveragePool run as `FAST_OPS`: the same arithmetic in float64 with numpy's gemm instead
of the evaluator's python loops (the model's convs about 2x faster, the same bits on ResNet8;
tests/test_ranges.py compares them with the evaluator's own ops).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx.reference.ops.op_average_pool import AveragePool_19
from onnx.reference.ops.op_conv import Conv as ReferenceConv

BATCH_SIZE = 100


class Conv(ReferenceConv):
    """2-D Conv with explicit pads, no dilation, one group: windows of the padded input, then one
    tensordot (gemm) per CHUNK images (small enough for the gathered windows to stay in cache: 2x
    faster than whole batches, same numbers); anything else goes to the evaluator's own Conv."""

    CHUNK = 8

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):
        plain = (X.ndim == 4 and (auto_pad in (None, "NOTSET", b"NOTSET")) and (group or 1) == 1
                 and all(d == 1 for d in (dilations or [1, 1])))
        if not plain:
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, pads=pads, strides=strides)
        top, left, bottom, right = pads or [0, 0, 0, 0]
        sh, sw = strides or [1, 1]
        kh, kw = W.shape[2:]
        parts = []
        for start in range(0, len(X), self.CHUNK):
            padded = np.pad(X[start:start + self.CHUNK], ((0, 0), (0, 0), (top, bottom), (left, right)))
            windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # N C Ho Wo kh kw
            parts.append(np.tensordot(windows, W, axes=([1, 4, 5], [1, 2, 3])))  # N Ho Wo O
        out = np.concatenate(parts)
        if B is not None:
            out += B
        return (np.ascontiguousarray(out.transpose(0, 3, 1, 2)),)


class AveragePool(AveragePool_19):
    """AveragePool whose windows tile the input exactly (kernel = strides, no pads): a reshape and
    a mean; anything else goes to the evaluator's own AveragePool."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None, strides=None,
             count_include_pad=None):
        kh, kw = kernel_shape
        tiles = (x.ndim == 4 and list(strides or kernel_shape) == [kh, kw] and not any(pads or [])
                 and all(d == 1 for d in (dilations or [1, 1]))
                 and auto_pad in (None, "NOTSET", b"NOTSET") and x.shape[2] % kh == 0 and x.shape[3] % kw == 0)
        if not tiles:
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                kernel_shape=kernel_shape, pads=pads,
                                strides=strides, count_include_pad=count_include_pad)
        n, c, h, w = x.shape
        return (x.reshape(n, c, h // kh, kh, w // kw, kw).mean(axis=(3, 5)),)


FAST_OPS = [Conv, AveragePool]


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
    evaluator = ReferenceEvaluator(model, new_ops=FAST_OPS)
    input_name = model.graph.input[0].name
    produced = [name for node in model.graph.node for name in node.output]
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype=np.float64)
        values = evaluator.run(None, {input_name: batch}, intermediate=True)
        yield {input_name: batch, **{name: values[name] for name in produced if name in values}}
