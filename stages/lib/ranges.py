"""Activation ranges: computed once, in float64, from the float model on the calibration images,
rounded once to float32, and handed to every quantizer (ONNX Runtime as tensor quantization
overrides, PyTorch as fixed observers, AdaRound for its fake-quantized layer inputs).

The rule: MinMax takes the smallest and largest value; Percentile takes the (100 - p) and p
percentiles of all values (linear interpolation between order statistics); MSE takes, per
tensor, the shrunk [min, max] range whose 8-bit quantization of the values has the smallest
squared error (mse_range). Both widen the range
to include 0, as every quantizer does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PipelineError
from .files import read_json

Perturbation = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Range:
    low: float
    high: float


def compute(model: str | Path, images: np.ndarray, method: str, percentile: float,
            perturb: Perturbation | None = None) -> dict[str, Range]:
    """{ONNX tensor name: Range} for the graph input and every node output of `model`.
    `perturb` (tests) is applied to every float64 activation before it is used."""
    from .reference import activations

    if method not in ("MinMax", "Percentile", "MSE"):
        raise PipelineError(f"unknown calibration method '{method}' (expected MinMax, Percentile or MSE)")
    seen: dict[str, list] = {}
    tails: dict[str, Tails] = {}
    for batch in activations(model, images):
        for name, value in batch.items():
            value = value if perturb is None else perturb(value)
            if method == "Percentile":  # the candidates for the order statistics wanted
                tails.setdefault(name, Tails(value.size // len(value) * len(images), percentile)).add(value)
            else:
                seen.setdefault(name, []).append(np.array([value.min(), value.max()]) if method == "MinMax"
                                                 else value.ravel(order="K"))
    ranges = {}
    for name in (tails or seen):
        if method == "MinMax":
            values = np.concatenate(seen[name])
            low, high = values.min(), values.max()
        elif method == "Percentile":
            low, high = tails[name].percentiles()
        else:
            low, high = mse_range(np.concatenate(seen[name]))
        ranges[name] = Range(float(np.float32(min(low, 0.0))), float(np.float32(max(high, 0.0))))
    return ranges


class Tails:
    """The values of one tensor, batch after batch, that can be among the order statistics
    np.percentile(all values, [100 - p, p]) interpolates between: the `low` smallest and the
    `high` largest seen so far. `percentiles` then gives exactly what np.percentile over every
    value gives (numpy's own index, weight and interpolation functions, private ones of the pinned
    numpy, on the same order statistics; tests/test_ranges.py compares with np.percentile), without
    keeping every value of every batch (hundreds of MB per tensor).

    Once `low` values are kept, only a new value below the largest of them can change which values
    the `low` smallest are (one equal to it can only replace it by the same number), so a batch
    costs one comparison per value and a partition of the few that pass; likewise for `high`."""

    def __init__(self, count: int, percentile: float):
        self.count = count  # values of the tensor over all batches
        self.previous, self.following, self.gamma, self.low, self.high = self._positions(count, percentile)
        self.smallest = self.largest = np.empty(0)
        self.seen, self.nan = 0, False

    @staticmethod
    def _positions(count: int, percentile: float):
        """numpy's linear-method indexes (previous, following; its -1 made the last index) and
        weights for the [100 - p, p] percentiles of `count` values, and how many smallest and
        largest values hold them."""
        from numpy.lib._function_base_impl import _QuantileMethods, _get_gamma, _get_indexes

        virtual = (count - 1) * np.asanyarray(np.true_divide([100.0 - percentile, percentile], 100))
        previous, following = _get_indexes(virtual, virtual, count)
        gamma = _get_gamma(virtual, previous, _QuantileMethods["linear"])
        previous, following = previous % count, following % count
        low = int(max(previous[0], following[0])) + 1
        high = count - int(min(previous[1], following[1]))
        return previous, following, gamma, low, high

    def add(self, values: np.ndarray) -> None:
        """One batch's values (any shape, any memory order)."""
        values = values.ravel(order="K")
        self.seen += values.size
        self.nan = self.nan or bool(np.isnan(values).any())
        self.smallest = self._merge(self.smallest, values, self.low, smallest=True)
        self.largest = self._merge(self.largest, values, self.high, smallest=False)

    @staticmethod
    def _merge(kept: np.ndarray, values: np.ndarray, wanted: int, smallest: bool) -> np.ndarray:
        """The `wanted` smallest (largest) of `kept` and `values`, the largest (smallest) of them
        last (first); all of them while there are no more than `wanted`. Once `wanted` are kept,
        only the values beyond kept's edge are looked at."""
        if len(kept) == wanted:
            values = values[values < kept[-1]] if smallest else values[values > kept[0]]
            if not len(values):
                return kept
        merged = np.concatenate([kept, values])
        if len(merged) <= wanted:
            return np.sort(merged)
        if smallest:
            return np.partition(merged, wanted - 1)[:wanted]
        return np.partition(merged, len(merged) - wanted)[len(merged) - wanted:]

    def percentiles(self) -> tuple[float, float]:
        from numpy.lib._function_base_impl import _lerp

        if self.seen != self.count:
            raise ValueError(f"percentile tails: the batches held {self.seen} values, not the {self.count} "
                             "they were cut for")
        if self.nan:
            return float("nan"), float("nan")  # as np.percentile gives
        count, low = self.count, self.low
        smallest, largest = np.sort(self.smallest), np.sort(self.largest)

        def value(rank: int) -> np.float64:  # the rank-th smallest of all `count` values
            return smallest[rank] if rank < low else largest[len(largest) - (count - rank)]

        bounds = _lerp(np.array([value(int(i)) for i in self.previous]),
                       np.array([value(int(i)) for i in self.following]), self.gamma)
        return float(bounds[0]), float(bounds[1])


MSE_BINS = 8192
MSE_SHRINK = np.geomspace(0.02, 1.0, 400)  # candidate ranges: [a * min, a * max]


def mse_range(values: np.ndarray, levels: int = 256) -> tuple[float, float]:
    """The range [a * min, a * max] (min <= 0 <= max) whose `levels`-level uniform quantization of
    `values` has the smallest mean squared error, searched over MSE_SHRINK on a fine histogram
    (values clipped by a range count their clipping error too). The largest such a wins ties."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if high - low <= 0:
        return low, high
    counts, edges = np.histogram(values, bins=MSE_BINS, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    best, chosen = np.inf, 1.0
    for shrink in MSE_SHRINK[::-1]:
        lo, hi = shrink * low, shrink * high
        scale = (hi - lo) / (levels - 1)
        zero = np.round(-lo / scale)
        quantized = (np.clip(np.round(centres / scale) + zero, 0, levels - 1) - zero) * scale
        error = float(np.dot(counts, (centres - quantized) ** 2))
        if error < best * (1 - 1e-9):
            best, chosen = error, shrink
    return chosen * low, chosen * high


def save(path: Path, ranges: dict[str, Range], settings: dict) -> None:
    from .files import write_json

    write_json(path, {**settings, "tensors": {name: {"min": r.low, "max": r.high} for name, r in ranges.items()}})


def load(path: str | Path) -> dict[str, Range]:
    data = read_json(path)
    try:
        return {name: Range(float(r["min"]), float(r["max"])) for name, r in data["tensors"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{path}: not an activation ranges file ({exc})") from None


def ort_overrides(ranges: dict[str, Range]) -> dict[str, list[dict]]:
    """ONNX Runtime's TensorQuantOverrides: the quantizer computes scale and zero point from these."""
    return {name: [{"rmin": np.array(r.low, np.float32), "rmax": np.array(r.high, np.float32)}]
            for name, r in ranges.items()}

