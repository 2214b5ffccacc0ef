"""Stage adaround: learn, per weight, whether to round up or down (AdaRound) for one dtype's
weight grid, on the calibration images, and write the folded ONNX graph with those weights.

    python -m stages.adaround --dtype int8 --model models/onnx_folded/resnet8.onnx \
        --calibration data/calibration --ranges models/activation_ranges.json \
        --out models/adaround_int8/resnet8.onnx --metrics metrics/adaround/int8.json

Both quantizers of that dtype start from this graph; their per-channel symmetric weight
quantization then lands exactly on the chosen integers. adaround.iterations = 0 turns it off
(the graph is passed on unchanged, so weights round to nearest).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet
from .lib.errors import run_main
from .lib.files import atomic_path, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    all_params = params_lib.load()
    p = all_params["adaround"]

    calibration = CalibrationSet.load(args.calibration)
    with atomic_path(args.out) as tmp:
        if p["iterations"] == 0:
            shutil.copyfile(args.model, tmp)
            layers = {}
        else:
            from .lib import adaround
            from .lib.torch_models import from_onnx

            model = from_onnx(args.model)
            ranges = adaround.input_ranges(args.model, model, ranges_lib.load(args.ranges))
            layers = adaround.adaround(
                model, calibration.images, adaround.GRIDS[args.dtype], iterations=p["iterations"],
                seed=all_params["calibrate"]["seed"], input_ranges=ranges if p["quantized_inputs"] else None)
            adaround.weights_into_onnx(args.model, model, tmp)
    flipped = sum(layer["rounded_away_from_nearest"] for layer in layers.values())
    total = sum(layer["weights"] for layer in layers.values())
    write_json(args.metrics, {"dtype": args.dtype, "enabled": p["iterations"] > 0, "settings": p,
                              "weights": total, "rounded_away_from_nearest": flipped, "layers": layers})
    print(f"adaround {args.dtype}: {flipped} of {total} weights rounded away from nearest"
          if layers else f"adaround {args.dtype}: off (adaround.iterations = 0)")


if __name__ == "__main__":
    run_main(main)
