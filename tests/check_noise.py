"""Recompute the quantization decisions with last-bit noise injected into every float64 activation
they are computed from, and print whether they came out identical:

    python -m tests.check_noise FOLDED.onnx CALIBRATION_DIR ITERATIONS

Ranges: stages.lib.ranges.compute with and without noise. AdaRound: both dtypes' rounded weights
with and without noise (the noisy run also uses the noisy ranges), with params.yaml's
adaround.batch. Noise: each value times
(1 + k * eps), k uniform in [-4, 4], eps = float64's machine epsilon.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from stages.lib import adaround, params, ranges
from stages.lib.calibration import CalibrationSet
from stages.lib.torch_models import from_onnx


def noise(seed: int):
    rng = np.random.default_rng(seed)
    eps = np.finfo(np.float64).eps
    return lambda values: values * (1 + 4 * eps * rng.uniform(-1, 1, values.shape))


def rounded(model_path: Path, images: np.ndarray, found: dict, dtype: str, iterations: int, perturb) -> dict:
    model = from_onnx(model_path)
    batch = params.load()["adaround"]["batch"]  # the project's setting: mini-batches or the full batch
    adaround.adaround(model, images, adaround.GRIDS[dtype], iterations=iterations, batch=batch, seed=0,
                      input_ranges=adaround.input_ranges(model_path, model, found),
                      perturb=perturb)
    return {name: (module.weight.detach().numpy().astype(np.float32), module.bias.detach().numpy().astype(np.float32))
            for name, module in model.named_modules() if hasattr(module, "weight") and module.weight is not None}


if __name__ == "__main__":
    model_path, images = Path(sys.argv[1]), CalibrationSet.load(sys.argv[2]).images
    iterations = int(sys.argv[3])
    clean = ranges.compute(model_path, images, "Percentile", 99.99)
    noisy = ranges.compute(model_path, images, "Percentile", 99.99, perturb=noise(1))
    result = {"tensors": len(clean), "ranges_identical": clean == noisy,
              "ranges_moved_by_noise": float(max(abs(np.float64(clean[n].high) - noisy[n].high) for n in clean))}
    for dtype in ("int8", "uint8"):
        a = rounded(model_path, images, clean, dtype, iterations, None)
        b = rounded(model_path, images, noisy, dtype, iterations, noise(2))
        result[f"{dtype}_layers"] = len(a)
        result[f"{dtype}_identical"] = all(np.array_equal(a[n][0], b[n][0]) and np.array_equal(a[n][1], b[n][1])
                                           for n in a)
    print(json.dumps(result))
