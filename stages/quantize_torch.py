"""Stage quantize_torch: static post-training quantization with PyTorch (PT2E, torchao), one dtype per run.

    python -m stages.quantize_torch --dtype uint8 --model models/adaround_uint8/resnet8.onnx \
        --ranges models/activation_ranges.json --out models/torch_uint8 \
        --float-model models/onnx_folded/resnet8.onnx --data data/cifar10 --layer-error metrics/layer_error/torch_uint8.json

Starts from the BatchNorm-folded graph with AdaRound's weights (onnx2torch, torch.export); every
activation observer holds the range from the activation_ranges stage (no calibration pass in
torch). `uint8`: X86InductorQuantizer, saved as a torch.export program (model.pt2) that
runners.torch_x86 lowers to oneDNN's integer kernels. `int8`: XNNPACKQuantizer, lowered to an
ExecuTorch program (model.pte) with the XNNPACK delegate. Writes the model and info.json
(settings, what runs), after checking that every Conv / Dense layer runs on integer kernels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib import cifar10, execution, layer_error
from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.errors import run_main
from .lib.files import atomic_path, write_json
from .lib.quant_checks import require_integer_execution
from .lib.runners import EXECUTORCH_BATCH, ONEDNN_ISA
from .lib.torch_models import export, exportable, from_onnx, save_program, used_attributes_only
from .lib.torch_quant import QUANTIZER_NAMES, quantize, to_executorch, weights_on_grid

WEIGHTED_LAYERS = 10  # ResNet8: 9 Conv + 1 Dense
MODEL_FILE = {"uint8": "model.pt2", "int8": "model.pte"}
KIND = {"uint8": "torch_x86", "int8": "executorch"}
RUNS_ON = {"uint8": f"oneDNN int8 kernels through torchao's x86 lowering, pinned to the {ONEDNN_ISA} ISA",
           "int8": f"ExecuTorch runtime, XNNPACK delegate, {EXECUTORCH_BATCH} images per call"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--float-model", type=Path, required=True, help="float graph for the per-layer error")
    parser.add_argument("--data", type=Path, required=True, help="prepared CIFAR-10 (test images for the error)")
    parser.add_argument("--layer-error", type=Path, required=True, help="per-layer SQNR JSON to write")
    args = parser.parse_args()
    p = params_lib.load()["quantize_torch"]
    variant = f"torch_{args.dtype}"

    ranges = ranges_lib.load(args.ranges)
    test = cifar10.load(args.data, "test", limit=layer_error.IMAGES)
    import onnx

    float_model = exportable(from_onnx(args.model))
    onnx_graph = onnx.load(str(args.model)).graph
    converted, fixed = quantize(float_model, onnx_graph, ranges, args.dtype, p["per_channel"], test.images[:8])
    on_grid = weights_on_grid(converted, float_model, args.dtype)
    with atomic_path(args.out, directory=True) as tmp:
        model = tmp / MODEL_FILE[args.dtype]
        if args.dtype == "uint8":
            save_program(export(used_attributes_only(converted), test.images[:8]), model, test.images[:16])
        else:
            model.write_bytes(to_executorch(converted, test.images))
        runs = execution.measure(KIND[args.dtype], model)
        require_integer_execution(variant, runs, WEIGHTED_LAYERS)
        info = {"backend": "pytorch", "dtype": args.dtype, "quantizer": QUANTIZER_NAMES[args.dtype],
                "activation_dtype": args.dtype, "weight_dtype": "int8", "runs_on": RUNS_ON[args.dtype],
                "settings": p, "activation_ranges_set": fixed, "weights_on_adaround_grid": on_grid}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    float_folded = exportable(from_onnx(args.float_model))
    errors = layer_error.torch_layer_errors(float_folded, converted, onnx.load(str(args.float_model)).graph,
                                            test.images)
    write_json(args.layer_error, {"variant": variant, "images": len(test.images), "layers": errors})
    print(f"quantize_torch {args.dtype}: {runs['layers']}, {fixed} activation ranges, "
          f"{on_grid} weights on AdaRound's grid")


if __name__ == "__main__":
    run_main(main)
