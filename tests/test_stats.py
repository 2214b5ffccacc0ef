"""lib/stats.py: the exact McNemar test and the paired bootstrap of the mean delta over seeds."""
from __future__ import annotations

import numpy as np
import pytest

from stages.lib import stats


def answers(both: int, only_float: int, only_quantized: int, neither: int):
    f = np.array([1] * both + [1] * only_float + [0] * only_quantized + [0] * neither, bool)
    q = np.array([1] * both + [0] * only_float + [1] * only_quantized + [0] * neither, bool)
    return f, q


@pytest.mark.parametrize("b,c,expected", [
    (10, 0, 2 / 1024),            # 2 * P(X <= 0), X ~ Bin(10, 1/2)
    (5, 5, 1.0),
    (0, 0, 1.0),                  # no discordant pair: nothing to test
    (3, 7, 2 * (1 + 10 + 45 + 120) / 1024),
])
def test_mcnemar_exact_values(b, c, expected):
    f, q = answers(50, b, c, 7)
    assert stats.mcnemar_p(f, q) == pytest.approx(expected, rel=1e-12)
    assert stats.mcnemar_p(q, f) == pytest.approx(expected, rel=1e-12)  # two-sided: symmetric


def test_mcnemar_large_counts_stay_finite_and_small():
    f, q = answers(8000, 400, 100, 1500)
    p = stats.mcnemar_p(f, q)
    assert 0 < p < 1e-30


@pytest.mark.parametrize("b,c", [(60, 45), (120, 88), (17, 30)])
def test_mcnemar_matches_scipy_binomial_test(b, c):
    from scipy.stats import binomtest

    f, q = answers(100, b, c, 10)
    assert stats.mcnemar_p(f, q) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_bootstrap_interval_covers_the_observed_mean_and_is_paired():
    rng = np.random.default_rng(1)
    f = rng.random(10_000) < 0.87
    # quantized answers: the float answer with 1.5% of images flipped, per seed
    q = np.stack([f ^ (rng.random(10_000) < 0.015) for _ in range(5)])
    observed = 100 * (q.mean(axis=1) - f.mean()).mean()
    low, high = stats.bootstrap_delta(f, q)
    assert low < observed < high
    # paired: far narrower than an unpaired interval of two 10,000-image accuracies (about +-0.9 points)
    assert high - low < 0.6
    assert (low, high) == stats.bootstrap_delta(f, q)  # seeded: the same interval every run


def test_bootstrap_identical_models_give_a_zero_interval():
    f = np.arange(1000) % 3 == 0
    assert stats.bootstrap_delta(f, np.stack([f, f])) == (0.0, 0.0)


def test_bootstrap_a_clear_loss_excludes_zero():
    f = np.ones(5000, bool)
    q = np.ones((3, 5000), bool)
    q[:, :100] = False  # 2 points lost on every seed
    low, high = stats.bootstrap_delta(f, q)
    assert high < 0 and low < -1.5


def test_bootstrap_shape_mismatch():
    with pytest.raises(ValueError, match="answers per seed"):
        stats.bootstrap_delta(np.ones(10, bool), np.ones((2, 9), bool))


def test_distribution():
    assert stats.distribution([0.87, 0.872, 0.868]) == {"mean": 0.87, "std": 0.002, "min": 0.868, "max": 0.872}
    assert stats.distribution([0.5])["std"] == 0.0
