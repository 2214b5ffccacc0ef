"""The float model evaluated in float64 with ONNX's reference evaluator (numpy), every
intermediate tensor under its ONNX name.

Quantization decisions (activation ranges, AdaRound's rounding) are computed from these values.
In float32, CPU kinds (AVX2, AVX-512, AMX kernels) and thread counts give last-bit differences,
and a range or a rounding decision can flip on them; in float64 the same differences are about
1e-16 relative, nine orders of magnitude below the float32 step that the results are rounded to.

Conv, Relu and AveragePool run as `FAST_OPS`: the same arithmetic in float64, the convs with
numpy's gemm instead of the evaluator's python loops, channels-last (their sums in another order:
last float64 bits; tests/test_ranges.py compares them with the evaluator's own ops).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx.reference.ops._op import OpRunUnaryNum
from onnx.reference.ops.op_average_pool import AveragePool_19
from onnx.reference.ops.op_conv import Conv as ReferenceConv

BATCH_SIZE = 100


class Conv(ReferenceConv):
    """2-D Conv with explicit pads, no dilation, one group, computed channels-last: each image's
    padded NHWC copy, its windows laid out as rows of (kh, kw, c) values (runs of c contiguous
    values, cheap to gather), and one gemm per CHUNK images (small enough for the rows to stay in
    cache). The output is returned as an NCHW view of NHWC memory, which the next Conv takes as
    it is, and element-wise ops keep; anything else goes to the evaluator's own Conv.

    Each output is the same dot product as the evaluator's, summed in another order (kh, kw, c
    rather than c, kh, kw): float64 last bits, far below what the float32 ranges are rounded to
    (tests/test_ranges.py compares the two; tests/test_stages_frameworks.py shows 4-ulp noise
    moves no range)."""

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
        count, channels, height, width = X.shape
        outs, _, kh, kw = W.shape
        ho, wo = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
        nhwc = X.transpose(0, 2, 3, 1)  # a view; contiguous when X came from this Conv or the input Transpose
        weight = np.ascontiguousarray(W.transpose(2, 3, 1, 0).reshape(kh * kw * channels, outs))
        padded = np.zeros((self.CHUNK, height + top + bottom, width + left + right, channels), X.dtype)
        out = np.empty((count, ho, wo, outs), X.dtype)
        for start in range(0, count, self.CHUNK):
            n = min(self.CHUNK, count - start)
            padded[:n, top:top + height, left:left + width] = nhwc[start:start + n]
            windows = sliding_window_view(padded[:n], (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # N Ho Wo C kh kw
            rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * channels)
            np.matmul(rows, weight, out=out[start:start + n].reshape(n * ho * wo, outs))
        if B is not None:
            out += B
        return (out.transpose(0, 3, 1, 2),)


class Relu(OpRunUnaryNum):
    """max(x, 0) without the evaluator's extra copy (its Relu casts the result to x's dtype, which
    it already has): the same values."""

    def _run(self, x):
        return (np.maximum(x, x.dtype.type(0)),)


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


FAST_OPS = [Conv, Relu, AveragePool]


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
