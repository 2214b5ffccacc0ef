"""Paired statistics of a quantized model against its float parent on the same test images.

- mcnemar_p: exact two-sided McNemar test on one seed's discordant pairs (images only one of the
  two models gets right): is the accuracy change distinguishable from zero for this draw?
- bootstrap_delta: a 95% percentile bootstrap interval of the accuracy delta averaged over the
  calibration seeds, resampling test images (the same images for every seed and for the float
  model, so the pairing is kept). It answers the same question for the variant as a whole.
The spread over seeds (std, min, max) is the calibration-draw variation; the bootstrap interval
is the test-sample variation. Both are reported; neither replaces the other.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def mcnemar_p(float_correct: np.ndarray, quantized_correct: np.ndarray) -> float:
    """Exact two-sided McNemar p-value (binomial test of the discordant pairs at 1/2)."""
    float_correct, quantized_correct = np.asarray(float_correct, bool), np.asarray(quantized_correct, bool)
    if float_correct.shape != quantized_correct.shape:
        raise ValueError(f"shapes differ: {float_correct.shape} vs {quantized_correct.shape}")
    b = int((float_correct & ~quantized_correct).sum())
    c = int((~float_correct & quantized_correct).sum())
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(1.0, 2 * tail / 2 ** n))


def bootstrap_delta(float_correct: np.ndarray, quantized_correct: np.ndarray,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% interval, in points, of mean over seeds of (quantized - float) accuracy.
    `float_correct`: (images,); `quantized_correct`: (seeds, images)."""
    float_correct = np.asarray(float_correct, np.int64)
    quantized_correct = np.atleast_2d(np.asarray(quantized_correct, np.int64))
    seeds, images = quantized_correct.shape
    if images != len(float_correct):
        raise ValueError(f"{images} quantized answers per seed, {len(float_correct)} float answers")
    # per-image delta times the seed count: an integer in [-seeds, seeds]; resampling images is a
    # multinomial draw over these few values, exactly (no (resamples x images) index matrix)
    per_image = quantized_correct.sum(axis=0) - seeds * float_correct
    values, counts = np.unique(per_image, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(images, counts / images, size=resamples)
    deltas = 100.0 * (draws @ values) / (images * seeds)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def distribution(values: list[float]) -> dict:
    """mean, std (sample, n - 1; 0 for one value), min and max."""
    array = np.asarray(values, np.float64)
    return {"mean": round(float(array.mean()), 6),
            "std": round(float(array.std(ddof=1)) if len(array) > 1 else 0.0, 6),
            "min": round(float(array.min()), 6), "max": round(float(array.max()), 6)}
