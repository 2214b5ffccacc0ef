"""Stage activation_ranges: for every calibration seed, the range of every activation of the float
(BatchNorm-folded) model on that seed's calibration images, computed once in float64 and rounded
once to float32; both quantizers and AdaRound take their activation ranges from these files.

    python -m stages.activation_ranges --model models/onnx_folded/resnet8.onnx \
        --calibration data/calibration --out models/activation_ranges

Writes seed_<seed>.json per seed. calibrate.method: MinMax or Percentile (calibrate.percentile:
the [100 - p, p] percentiles).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .lib import params as params_lib
from .lib import ranges
from .lib.calibration import CalibrationSet, seed_dir, seed_file
from .lib.errors import run_main
from .lib.files import atomic_path
from .lib.seed_pool import map_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["calibrate"]

    def compute(seed: int) -> tuple[int, int]:
        images = CalibrationSet.load(seed_dir(args.calibration, seed)).images
        found = ranges.compute(args.model, images, p["method"], p["percentile"])
        ranges.save(seed_file(tmp, seed, ".json"), found,
                    {"seed": seed, "method": p["method"], "percentile": p["percentile"], "images": len(images)})
        return len(found), len(images)

    with atomic_path(args.out, directory=True) as tmp:
        tensors, images = map_seeds(compute, p["seeds"])[-1]  # seeds side by side (lib/seed_pool.py)
    print(f"activation_ranges: {tensors} tensors x {len(p['seeds'])} seeds, {p['method']} "
          f"on {images} calibration images each (float64)")

if __name__ == "__main__":
    run_main(main)
