"""Stage layer_error: per-layer quantization error (SQNR) of one quantized variant against the
float model, on the first layer_error.IMAGES images of the evaluation split, for the first
calibration seed. A stage of its own, so that no quantize stage ever sees a test image.

    python -m stages.layer_error --variant ort_int8 --float-model models/onnx_folded/resnet8.onnx \
        --quantized models/ort_int8 --adaround models/adaround/int8 --ranges models/activation_ranges \
        --data data/cifar10 --out metrics/layer_error/ort_int8.json

ONNX Runtime: the saved model (seed_<seed>/model.onnx), with its own QDQ debugging tools.
PyTorch: the saved programs are lowered (an ExecuTorch program cannot be run layer by layer), so
the PT2E quantize / dequantize graph is rebuilt from the same AdaRound graph and ranges by the
same library call as quantize_torch (torch_quant.quantize_graph); its counts (activation ranges
set, layers on AdaRound's grid) must equal those in the saved model's info.json. That is a check
of the recipe, not a byte comparison with the saved program.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .lib import layer_error
from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import evaluation_split, seed_dir, seed_file
from .lib.errors import PipelineError, run_main
from .lib.files import read_json, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, help="<backend>_<dtype>: ort_int8, torch_uint8, ...")
    parser.add_argument("--float-model", type=Path, required=True, help="the BatchNorm-folded float ONNX graph")
    parser.add_argument("--quantized", type=Path, required=True, help="the quantize stage's output directory")
    parser.add_argument("--adaround", type=Path, required=True, help="adaround output directory (PyTorch rebuild)")
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges directory (PyTorch rebuild)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    all_params = params_lib.load()
    backend, _, dtype = args.variant.partition("_")
    if backend not in ("ort", "torch") or dtype not in params_lib.DTYPES:
        raise PipelineError(f"--variant {args.variant}: expected ort_<dtype> or torch_<dtype> with a dtype "
                            f"from {', '.join(params_lib.DTYPES)}")
    seed = all_params["calibrate"]["seeds"][0]
    images = evaluation_split(args.data, all_params).images[:layer_error.IMAGES]
    if backend == "ort":
        errors = layer_error.ort_layer_errors(args.float_model, seed_dir(args.quantized, seed) / "model.onnx", images)
    else:
        import onnx

        from .lib.torch_models import exportable, from_onnx
        from .lib.torch_quant import EXPORT_EXAMPLES, quantize_graph

        saved = read_json(seed_dir(args.quantized, seed) / "info.json")
        ranges = ranges_lib.load(seed_file(args.ranges, seed, ".json"))
        converted, fixed, on_grid = quantize_graph(seed_file(args.adaround, seed, ".onnx"), ranges, dtype,
                                                   all_params["quantize_torch"]["per_channel"], images[:EXPORT_EXAMPLES])
        if (fixed, on_grid) != (saved["activation_ranges_set"], saved["weights_on_adaround_grid"]):
            raise PipelineError(f"{args.quantized}: the rebuilt {args.variant} graph differs from the saved model "
                                "(re-run quantize_torch)")
        errors = layer_error.torch_layer_errors(exportable(from_onnx(args.float_model)), converted,
                                                onnx.load(str(args.float_model)).graph, images)
    write_json(args.out, {"variant": args.variant, "seed": seed, "split": all_params["evaluate"]["split"],
                          "images": len(images), "layers": errors})
    print(f"layer_error {args.variant}: {len(errors)} tensors, seed {seed}, {len(images)} "
          f"{all_params['evaluate']['split']} images")


if __name__ == "__main__":
    run_main(main)
