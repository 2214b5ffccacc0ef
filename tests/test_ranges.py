"""lib/ranges.py's range rules that need no model (the MSE search), and lib/reference.py's fast ops."""
from __future__ import annotations

import numpy as np
import pytest

from stages.lib import ranges


def quantization_mse(values: np.ndarray, low: float, high: float) -> float:
    scale = (high - low) / 255
    zero = np.round(-low / scale)
    q = (np.clip(np.round(values / scale) + zero, 0, 255) - zero) * scale
    return float(np.mean((values - q) ** 2))


def test_mse_keeps_the_full_range_of_evenly_spread_values():
    values = np.random.default_rng(0).uniform(0, 10, 200_000)
    low, high = ranges.mse_range(values)
    assert low == 0.0 and high > 0.97 * values.max()


def test_mse_clips_a_long_tail_and_the_clipped_range_has_less_error():
    rng = np.random.default_rng(1)
    values = np.abs(rng.standard_t(3, 400_000))  # a ReLU output with rare large values
    low, high = ranges.mse_range(values)
    assert low == 0.0 and high < 0.9 * values.max()
    assert quantization_mse(values, low, high) < quantization_mse(values, 0.0, float(values.max()))


def test_mse_of_signed_values_keeps_zero_inside():
    values = np.random.default_rng(2).normal(-1.0, 2.0, 100_000)
    low, high = ranges.mse_range(values)
    assert low < 0 < high


def test_mse_of_a_constant_tensor():
    assert ranges.mse_range(np.zeros(10)) == (0.0, 0.0)


def _conv_pool_graph(pads, strides, kernel, group=1):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 6 // group, *kernel))
    bias = rng.standard_normal(4)
    second = rng.standard_normal((4, 4, 3, 3))  # takes the first conv's output (an NCHW view of NHWC memory)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=pads, strides=strides, kernel_shape=kernel,
                              group=group),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("AveragePool", ["y2"], ["z"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["y2"], ["v"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                              [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in ("y", "r", "z", "v")],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
                               numpy_helper.from_array(second, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("pads, strides, kernel, group", [
    ([1, 1, 1, 1], [1, 1], [3, 3], 1), ([0, 0, 1, 1], [2, 2], [3, 3], 1), ([0, 0, 0, 0], [2, 2], [1, 1], 1),
    ([1, 1, 1, 1], [1, 1], [3, 3], 2)])
def test_fast_conv_and_pool_give_the_reference_evaluators_numbers(pads, strides, kernel, group):
    """reference.FAST_OPS against ONNX's own reference ops: ResNet8's three conv shapes (sums in
    another order: within last float64 bits), a Relu and a conv on the first conv's output, and a
    grouped conv and a padded pool (handed to the evaluator's own ops)."""
    from onnx.reference import ReferenceEvaluator

    from stages.lib import reference

    model = _conv_pool_graph(pads, strides, kernel, group)
    x = np.random.default_rng(2).standard_normal((20, 6, 16, 16))
    fast = ReferenceEvaluator(model, new_ops=reference.FAST_OPS).run(None, {"x": x})
    slow = ReferenceEvaluator(model).run(None, {"x": x})
    for a, b in zip(fast, slow):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    assert not np.array_equal(fast[0], np.zeros_like(fast[0]))


@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0, 90.0, 50.0, 100.0, 99.999999])
@pytest.mark.parametrize("batches", [1, 3, 7])
def test_percentile_from_batch_tails_is_numpys_percentile_of_every_value(percentile, batches):
    rng = np.random.default_rng(int(percentile * 1000) + batches)
    relu = np.maximum(rng.standard_t(3, (batches * 4, 8, 9, 5)), 0)  # ties (zeros) and a long tail
    relu[rng.integers(0, len(relu))] *= 50
    falling = np.arange(relu.size, 0, -1.0).reshape(relu.shape) ** 1.5  # each batch holds new smallest values
    rising = falling[::-1].copy()  # and new largest
    for values in (relu, np.round(rng.normal(0, 3, relu.shape), 1), falling, rising):  # and many ties on both sides
        tails = ranges.Tails(values.size, percentile)
        for batch in np.split(values, batches):
            tails.add(batch.transpose(0, 2, 3, 1))  # any memory order
        assert tails.percentiles() == tuple(np.percentile(values, [100 - percentile, percentile]))
        if percentile >= 99:
            assert len(tails.smallest) + len(tails.largest) < values.size  # only the tails kept


@pytest.mark.parametrize("where", [5, 500, 995])
def test_percentile_of_values_with_nan_is_nan_as_numpy_gives(where):
    values = np.arange(1000.0)
    values[where] = np.nan  # in the first batch, or in one after the kept tails are full
    tails = ranges.Tails(values.size, 99.0)
    for batch in np.split(values, 4):
        tails.add(batch)
    assert all(np.isnan(tails.percentiles()))
    assert all(np.isnan(np.percentile(values, [1.0, 99.0])))


def test_percentile_tails_cut_for_another_count_are_refused():
    values = np.arange(1000.0)
    tails = ranges.Tails(2000, 99.0)  # cut for 2,000 values
    for batch in np.split(values, 4):
        tails.add(batch)
    with pytest.raises(ValueError, match="held 1000 values, not the 2000"):
        tails.percentiles()
