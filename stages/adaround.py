"""Stage adaround: learn, per weight, whether to round up or down (AdaRound) for one dtype's
weight grid, for every calibration seed, and write the folded ONNX graph with those weights.

    python -m stages.adaround --dtype int8 --model models/onnx_folded/resnet8.onnx \
        --calibration data/calibration --ranges models/activation_ranges \
        --out models/adaround_int8 --metrics metrics/adaround/int8.json

Writes seed_<seed>.onnx per seed, each learned from its own calibration draw and activation
ranges (lib/adaround.adaround_many, one draw per worker process, lib/seed_pool.py). Both
quantizers of that dtype start from these graphs; their per-channel symmetric weight
quantization then lands exactly on the chosen integers. adaround.iterations = 0 turns it off (the
graph is passed on unchanged, so weights round to nearest).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet, seed_dir, seed_file
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, write_json
from .lib.seed_pool import map_seeds


MEMORY_PER_IMAGE = 1.75e6  # bytes one draw's rounding holds per calibration image (3.5 GB for 2,000, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges directory (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True, help="directory: seed_<seed>.onnx per seed")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    all_params = params_lib.load()
    p, seeds = all_params["adaround"], all_params["calibrate"]["seeds"]

    per_seed, count = {}, 0

    def round_seed(seed: int) -> tuple[dict, int]:
        """One draw's rounding, written to tmp/seed_<seed>.onnx; returns ({layer: stats}, images)."""
        images = CalibrationSet.load(seed_dir(args.calibration, seed)).images
        if p["images"] > len(images):
            raise PipelineError(f"adaround.images = {p['images']} is more than the {len(images)} images of "
                                f"calibration seed {seed} (calibrate.samples); use at most that, or 0 for all")
        images = images[:p["images"] or len(images)]  # a draw is in random order: any N are a random subset
        if p["iterations"] == 0:
            shutil.copyfile(args.model, seed_file(tmp, seed, ".onnx"))
            return {}, len(images)
        import torch

        from .lib import adaround
        from .lib.torch_models import from_onnx

        model = from_onnx(args.model)
        ranges = (adaround.input_ranges(args.model, model, ranges_lib.load(seed_file(args.ranges, seed, ".json")))
                  if p["quantized_inputs"] else None)
        [(weights, layers)] = adaround.adaround_many(model, [images], adaround.GRIDS[args.dtype],
                                                     iterations=p["iterations"], batch=p["batch"], seeds=[seed],
                                                     input_ranges_per_seed=[ranges])
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in weights.items():
                modules[name].weight.copy_(weight)
        adaround.weights_into_onnx(args.model, model, seed_file(tmp, seed, ".onnx"))
        return layers, len(images)

    per_draw = (p["images"] or all_params["calibrate"]["samples"]) * MEMORY_PER_IMAGE if p["iterations"] else None
    with atomic_path(args.out, directory=True) as tmp:
        # one draw per worker (lib/seed_pool.py), as many as memory holds; batching the draws in one
        # optimisation saves 5% of the time for 4x the memory (9.2 GB for five draws of 2,000
        # images), same result either way
        for seed, (layers, count) in zip(seeds, map_seeds(round_seed, seeds,
                                                          memory_per_seed=per_draw)):
            per_seed[seed] = layers
    summary = {}
    for seed, layers in per_seed.items():
        summary[str(seed)] = {"weights": sum(layer["weights"] for layer in layers.values()),
                              "rounded_away_from_nearest": sum(layer["rounded_away_from_nearest"]
                                                               for layer in layers.values()),
                              "layers": layers}
    write_json(args.metrics, {"dtype": args.dtype, "enabled": p["iterations"] > 0, "settings": p,
                              "calibration_images": count, "seeds": summary})
    if p["iterations"] == 0:
        print(f"adaround {args.dtype}: off (adaround.iterations = 0), {len(seeds)} seeds")
    for seed, s in summary.items():
        if p["iterations"]:
            print(f"adaround {args.dtype} seed {seed}: {s['rounded_away_from_nearest']} of {s['weights']} "
                  "weights rounded away from nearest")


if __name__ == "__main__":
    run_main(main)
