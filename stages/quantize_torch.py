"""Stage quantize_torch: static post-training quantization with PyTorch (FX), one dtype per run.

    python -m stages.quantize_torch --dtype uint8 --model models/adaround_uint8/resnet8.onnx \
        --calibration data/calibration --ranges models/activation_ranges.json --out models/torch_uint8

Starts from the BatchNorm-folded graph with AdaRound's weights (onnx2torch); every activation
observer holds the range from the activation_ranges stage (no calibration pass in torch). `uint8`: quint8 activations, qint8
weights, PyTorch's QNNPACK integer kernels (exact on every x86 CPU). `int8`: qint8 activations and weights, a reference
(simulated quantize/dequantize) model, because no torch CPU kernel takes qint8 activations.
Writes model.pt (TorchScript) and info.json (settings, graph check).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib import cifar10, layer_error
from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet
from .lib.errors import run_main
from .lib.files import atomic_path, write_json
from .lib.quant_checks import require_quantized, torch_summary
from .lib.runners import torch_load
from .lib.torch_models import from_onnx, save_torchscript
from .lib.torch_quant import ENGINE, quantize

WEIGHTED_LAYERS = 10  # ResNet8: 9 Conv + 1 Dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--float-model", type=Path, required=True, help="float graph for the per-layer error")
    parser.add_argument("--data", type=Path, required=True, help="prepared CIFAR-10 (test images for the error)")
    parser.add_argument("--layer-error", type=Path, required=True, help="per-layer SQNR JSON to write")
    args = parser.parse_args()
    p = params_lib.load()["quantize_torch"]
    variant = f"torch_{args.dtype}"

    calibration = CalibrationSet.load(args.calibration)
    import onnx

    model = quantize(from_onnx(args.model), onnx.load(str(args.model)).graph, ranges_lib.load(args.ranges),
                     args.dtype, p["per_channel"], p["reduce_range"], next(calibration.batches()))
    with atomic_path(args.out, directory=True) as tmp:
        save_torchscript(model, tmp / "model.pt", calibration.images[:64])
        summary = torch_summary(torch_load(tmp / "model.pt"))
        require_quantized(variant, summary, WEIGHTED_LAYERS)
        info = {"backend": "pytorch", "dtype": args.dtype,
                "activation_dtype": {"uint8": "quint8", "int8": "qint8"}[args.dtype], "weight_dtype": "qint8",
                "engine": ENGINE, "settings": p, "calibration_images": len(calibration.images),
                "graph_check": summary}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    test = cifar10.load(args.data, "test", limit=layer_error.IMAGES)
    errors = layer_error.torch_layer_errors(from_onnx(args.float_model), model, test.images)
    write_json(args.layer_error, {"variant": variant, "images": len(test.images), "layers": errors})
    print(f"quantize_torch {args.dtype}: {WEIGHTED_LAYERS} layers quantized")


if __name__ == "__main__":
    run_main(main)
