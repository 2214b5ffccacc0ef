"""Stage adaround: learn, per weight, whether to round up or down (AdaRound) on each dtype's weight
grid, for every calibration seed, and write the folded ONNX graph with those weights.

    python -m stages.adaround --model models/onnx_folded/resnet8.onnx \
        --calibration data/calibration --ranges models/activation_ranges \
        --out models/adaround --metrics metrics/adaround.json

Writes <dtype>/seed_<seed>.onnx per dtype of quantize.dtypes (or --dtypes) and seed, each learned
from its own calibration draw and activation ranges (lib/adaround.adaround_many). The draws of all
dtypes are handed out together to the worker processes (lib/seed_pool.py, one thread each), so
both cores stay busy to the end: ten draws on two workers took 77 s, against 50 s for each dtype's
five, where the fifth draw runs alone. Both quantizers of a dtype start from its graphs; their
per-channel symmetric weight quantization then lands exactly on the chosen integers.
adaround.iterations = 0 turns it off (the graph is passed on unchanged, so weights round to
nearest).
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
    parser.add_argument("--dtypes", nargs="+", choices=params_lib.DTYPES,
                        help="weight grids to round for (default: quantize.dtypes)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges directory (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True, help="directory: <dtype>/seed_<seed>.onnx")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    all_params = params_lib.load()
    p, seeds = all_params["adaround"], all_params["calibrate"]["seeds"]
    dtypes = list(dict.fromkeys(args.dtypes or all_params["quantize"]["dtypes"]))
    draws = [(dtype, seed) for dtype in dtypes for seed in seeds]

    def round_seed(draw: tuple[str, int]) -> tuple[dict, int]:
        """One dtype's rounding for one draw, written to tmp/<dtype>/seed_<seed>.onnx; returns
        ({layer: stats}, images)."""
        dtype, seed = draw
        images = CalibrationSet.load(seed_dir(args.calibration, seed)).images
        if p["images"] > len(images):
            raise PipelineError(f"adaround.images = {p['images']} is more than the {len(images)} images of "
                                f"calibration seed {seed} (calibrate.samples); use at most that, or 0 for all")
        images = images[:p["images"] or len(images)]  # a draw is in random order: any N are a random subset
        if p["iterations"] == 0:
            shutil.copyfile(args.model, seed_file(tmp / dtype, seed, ".onnx"))
            return {}, len(images)
        import torch

        from .lib import adaround
        from .lib.torch_models import from_onnx

        model = from_onnx(args.model)
        ranges = (adaround.input_ranges(args.model, model, ranges_lib.load(seed_file(args.ranges, seed, ".json")))
                  if p["quantized_inputs"] else None)
        [(weights, layers)] = adaround.adaround_many(model, [images], adaround.GRIDS[dtype],
                                                     iterations=p["iterations"], batch=p["batch"], seeds=[seed],
                                                     input_ranges_per_seed=[ranges])
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in weights.items():
                modules[name].weight.copy_(weight)
        adaround.weights_into_onnx(args.model, model, seed_file(tmp / dtype, seed, ".onnx"))
        return layers, len(images)

    per_draw = (p["images"] or all_params["calibrate"]["samples"]) * MEMORY_PER_IMAGE if p["iterations"] else None
    with atomic_path(args.out, directory=True) as tmp:
        for dtype in dtypes:
            (tmp / dtype).mkdir()
        # one draw per worker (lib/seed_pool.py), one thread each, as many as memory holds; batching
        # the draws in one optimisation saves 5% of the time for 4x the memory (9.2 GB for five
        # draws of 2,000 images), same result either way
        done = map_seeds(round_seed, draws, memory_per_seed=per_draw, idle_threads=False)
    summary, count = {dtype: {} for dtype in dtypes}, 0
    for (dtype, seed), (layers, count) in zip(draws, done):
        summary[dtype][str(seed)] = {"weights": sum(layer["weights"] for layer in layers.values()),
                                     "rounded_away_from_nearest": sum(layer["rounded_away_from_nearest"]
                                                                      for layer in layers.values()),
                                     "layers": layers}
    write_json(args.metrics, {"enabled": p["iterations"] > 0, "settings": p, "calibration_images": count,
                              "dtypes": {dtype: {"seeds": summary[dtype]} for dtype in dtypes}})
    if p["iterations"] == 0:
        print(f"adaround {', '.join(dtypes)}: off (adaround.iterations = 0), {len(seeds)} seeds")
    for dtype in dtypes:
        for seed, s in summary[dtype].items():
            if p["iterations"]:
                print(f"adaround {dtype} seed {seed}: {s['rounded_away_from_nearest']} of {s['weights']} "
                      "weights rounded away from nearest")


if __name__ == "__main__":
    run_main(main)
