"""Stage activation_ranges: the range of every activation of the float (BatchNorm-folded) model on
the calibration images, computed once in float64 and rounded once to float32; both quantizers and
AdaRound take their activation ranges from this file.

    python -m stages.activation_ranges --model models/onnx_folded/resnet8.onnx \
        --calibration data/calibration --out models/activation_ranges.json

calibrate.method: MinMax or Percentile (calibrate.percentile: the [100 - p, p] percentiles).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .lib import params as params_lib
from .lib import ranges
from .lib.calibration import CalibrationSet
from .lib.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["calibrate"]

    images = CalibrationSet.load(args.calibration).images
    found = ranges.compute(args.model, images, p["method"], p["percentile"])
    ranges.save(args.out, found, {"method": p["method"], "percentile": p["percentile"], "images": len(images)})
    print(f"activation_ranges: {len(found)} tensors, {p['method']} on {len(images)} calibration images (float64)")


if __name__ == "__main__":
    run_main(main)
