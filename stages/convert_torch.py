"""Stage convert_torch: ONNX -> PyTorch with onnx2torch, saved with torch.export, verified against ONNX.

    python -m stages.convert_torch --onnx models/onnx/resnet8.onnx --data data/cifar10 \
        --out models/torch/resnet8.pt2 --metrics metrics/convert_torch.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .lib import cifar10, runners
from .lib import params as params_lib
from .lib.errors import run_main
from .lib.files import atomic_path, write_json
from .lib.torch_models import export, exportable, from_onnx, save_program
from .lib.verify import conversion_report, recorded

BATCH_SIZE = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["convert"]

    test = cifar10.load(args.data, "test")
    onnx_scores = runners.predict_all(runners.load_runner("onnx", args.onnx), test.images, BATCH_SIZE)
    with atomic_path(args.out) as tmp:
        save_program(export(exportable(from_onnx(args.onnx)), test.images[:8]), tmp, test.images[:64])
        torch_scores = runners.predict_all(runners.load_runner("torch", tmp), test.images, BATCH_SIZE)
        report = conversion_report("convert_torch", onnx_scores, torch_scores, p["max_abs_diff"], p["min_agreement"])
    write_json(args.metrics, {"format": "torch.export", "vs_onnx": recorded(report)})
    print(f"convert_torch: max |diff| {report['max_abs_diff']:.2e}, "
          f"argmax agreement {report['argmax_agreement']:.4f} on {report['images']} test images")


if __name__ == "__main__":
    run_main(main)
