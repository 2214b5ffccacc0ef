"""Stage quantize_torch: static post-training quantization with PyTorch (PT2E, torchao), one dtype
per run, every calibration seed in this stage (side by side in worker processes, lib/seed_pool.py).

    python -m stages.quantize_torch --dtype uint8 --model models/adaround/uint8 \
        --calibration data/calibration --ranges models/activation_ranges --out models/torch_uint8

Starts from the BatchNorm-folded graph with AdaRound's weights (onnx2torch, torch.export); every
activation observer holds the range from the activation_ranges stage (no calibration pass in
torch). `uint8`: X86InductorQuantizer, saved as a torch.export program (model.pt2) that
runners.torch_x86 lowers to oneDNN's integer kernels. `int8`: XNNPACKQuantizer, lowered to an
ExecuTorch program (model.pte) with the XNNPACK delegate. Writes seed_<seed>/ with the model and info.json
(settings, what runs), after checking that every Conv / Dense layer runs on integer kernels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib import execution
from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet, seed_dir, seed_file
from .lib.calibration import seeds as seeds_of
from .lib.errors import run_main
from .lib.files import atomic_path
from .lib.quant_checks import require_integer_execution
from .lib.seed_pool import map_seeds
from .lib.runners import EXECUTORCH_BATCH, ONEDNN_ISA
from .lib.torch_models import export, save_program, used_attributes_only
from .lib.torch_quant import EXPORT_EXAMPLES, QUANTIZER_NAMES, quantize_graph, to_executorch

WEIGHTED_LAYERS = 10  # ResNet8: 9 Conv + 1 Dense
MODEL_FILE = {"uint8": "model.pt2", "int8": "model.pte"}
KIND = {"uint8": "torch_x86", "int8": "executorch"}
RUNS_ON = {"uint8": f"oneDNN int8 kernels through torchao's x86 lowering, pinned to the {ONEDNN_ISA} ISA",
           "int8": f"ExecuTorch runtime, XNNPACK delegate, {EXECUTORCH_BATCH} images per call"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True, help="adaround output directory (seed_<seed>.onnx)")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges directory (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True, help="directory: seed_<seed>/model.pt2 or model.pte per seed")
    args = parser.parse_args()
    all_params = params_lib.load()
    p = all_params["quantize_torch"]
    variant = f"torch_{args.dtype}"

    def build(seed: int) -> str:
        """Quantize, lower and check one seed's model into tmp/seed_<seed>/; returns its summary line."""
        images = CalibrationSet.load(seed_dir(args.calibration, seed)).images
        ranges = ranges_lib.load(seed_file(args.ranges, seed, ".json"))
        converted, fixed, on_grid = quantize_graph(seed_file(args.model, seed, ".onnx"), ranges, args.dtype,
                                                  p["per_channel"], images[:EXPORT_EXAMPLES])
        out = seed_dir(tmp, seed)
        out.mkdir()
        model = out / MODEL_FILE[args.dtype]
        if args.dtype == "uint8":
            save_program(export(used_attributes_only(converted), images[:EXPORT_EXAMPLES]), model,
                         images[EXPORT_EXAMPLES:2 * EXPORT_EXAMPLES])
        else:
            model.write_bytes(to_executorch(converted, images[:EXECUTORCH_BATCH]))
        runs = execution.measure(KIND[args.dtype], model)
        require_integer_execution(variant, runs, WEIGHTED_LAYERS)
        info = {"backend": "pytorch", "dtype": args.dtype, "seed": seed, "quantizer": QUANTIZER_NAMES[args.dtype],
                "activation_dtype": args.dtype, "weight_dtype": "int8", "runs_on": RUNS_ON[args.dtype],
                "settings": p, "activation_ranges_set": fixed, "weights_on_adaround_grid": on_grid}
        (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        return (f"quantize_torch {args.dtype} seed {seed}: {runs['layers']}, {fixed} activation ranges, "
                f"{on_grid} weights on AdaRound's grid")

    with atomic_path(args.out, directory=True) as tmp:
        for line in map_seeds(build, seeds_of(all_params)):  # seeds side by side (lib/seed_pool.py)
            print(line)

if __name__ == "__main__":
    run_main(main)
