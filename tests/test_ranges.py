"""lib/ranges.py's range rules that need no model: the MSE search."""
from __future__ import annotations

import numpy as np

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
