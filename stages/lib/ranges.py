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

    seen: dict[str, list[np.ndarray]] = {}
    for batch in activations(model, images):
        for name, value in batch.items():
            value = value if perturb is None else perturb(value)
            if method == "MinMax":
                value = np.array([value.min(), value.max()])
            seen.setdefault(name, []).append(value.ravel())
    ranges = {}
    for name, parts in seen.items():
        values = np.concatenate(parts)
        if method == "MinMax":
            low, high = values.min(), values.max()
        elif method == "Percentile":
            low, high = np.percentile(values, [100.0 - percentile, percentile])
        elif method == "MSE":
            low, high = mse_range(values)
        else:
            raise PipelineError(f"unknown calibration method '{method}' (expected MinMax, Percentile or MSE)")
        ranges[name] = Range(float(np.float32(min(low, 0.0))), float(np.float32(max(high, 0.0))))
    return ranges


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

