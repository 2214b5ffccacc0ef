"""Stage evaluate: score one model variant on the CIFAR-10 test set.

    python -m stages.evaluate --variant onnx --kind onnx --model models/onnx/resnet8.onnx \
        --data data/cifar10 --metrics metrics/eval/onnx.json \
        --predictions data/predictions/onnx.npy --confusion plots/confusion/onnx.csv \
        [--parent torch --parent-metrics metrics/eval/torch.json \
         --parent-predictions data/predictions/torch.npy]

The metrics record what really runs (stages.lib.execution: integer or float kernels per Conv,
Gemm and Add, read from the graph the runtime executes). A float variant (no --parent) must reach evaluate.expected_accuracy +- evaluate.tolerance when
it is scored on the full test set. A quantized variant names its float parent: its metrics add
the accuracy delta in points against the parent's measured accuracy, argmax agreement with the
parent, and its file size against the parent's. The predictions file holds the predicted labels
(int64), not the float scores: labels are the same on every CPU kind, scores differ in last bits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .lib import cifar10, execution, metrics, runners
from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, load_npy, read_json, write_json


def model_file(kind: str, model: Path) -> Path:
    """The file that holds the model (a quantize_torch directory holds one of two kinds)."""
    return runners.torch_quantized_model(model)[1] if kind == "torch_quantized" else model


def model_info(model: Path) -> dict:
    """The sidecar info.json a quantize stage writes beside its model (dtype, settings, what runs)."""
    info = model.parent / "info.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def check_baseline(variant: str, result: dict, p: dict) -> None:
    if result["total"] != params_lib.TEST_SIZE:
        return  # the pinned baseline is a full-test-set figure
    low, high = p["expected_accuracy"] - p["tolerance"], p["expected_accuracy"] + p["tolerance"]
    if not low <= result["accuracy"] <= high:
        raise PipelineError(f"float variant '{variant}' scores {result['accuracy']:.4f} "
                            f"({result['correct']}/{result['total']}), expected "
                            f"evaluate.expected_accuracy {p['expected_accuracy']} +- {p['tolerance']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--kind", required=True, choices=sorted(runners.RUNNERS))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    parser.add_argument("--reference", help="marks an external reference model, with this description")
    parser.add_argument("--parent")
    parser.add_argument("--parent-metrics", type=Path)
    parser.add_argument("--parent-predictions", type=Path)
    parser.add_argument("--flips", type=Path, help="with --parent: CSV of the images whose answer changed")
    args = parser.parse_args()
    p = params_lib.load()["evaluate"]

    test = cifar10.load(args.data, "test", limit=p["samples"])
    predict = runners.load_runner(args.kind, args.model)
    scores = runners.predict_all(predict, test.images, p["batch_size"])
    described = {"reference": args.reference} if args.reference else {}
    file = model_file(args.kind, args.model)
    result = {"variant": args.variant, "kind": args.kind, **described, **model_info(file),
              "execution": execution.measure(args.kind, args.model),
              "model_bytes": file.stat().st_size,
              **metrics.classification(scores, test.labels)}

    if args.parent is None:
        check_baseline(args.variant, result, p)
    else:
        parent = read_json(args.parent_metrics)
        if parent["total"] != result["total"]:
            raise PipelineError(f"{args.parent_metrics}: scored {parent['total']} images, "
                                f"this run {result['total']}; re-run its evaluation")
        parent_labels = load_npy(args.parent_predictions, f"predictions of '{args.parent}'")
        agreement = metrics.label_agreement(parent_labels, scores.argmax(axis=1))
        result.update({
            "parent": args.parent,
            "parent_accuracy": parent["accuracy"],
            "delta_points": round(100.0 * (result["accuracy"] - parent["accuracy"]), 4),
            "argmax_agreement_with_parent": agreement["argmax_agreement"],
            "argmax_disagreements_with_parent": agreement["argmax_disagreements"],
            "size_ratio_to_parent": round(result["model_bytes"] / parent["model_bytes"], 4),
        })

    with atomic_path(args.predictions) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, scores.argmax(axis=1).astype(np.int64))
    metrics.write_confusion_csv(args.confusion, scores, test.labels)
    if args.parent is not None and args.flips is not None:
        metrics.write_flips_csv(args.flips, parent_labels, scores.argmax(axis=1))
    write_json(args.metrics, result)
    extra = f", delta {result['delta_points']:+.2f} points vs {args.parent}" if args.parent else ""
    print(f"evaluate {args.variant}: top-1 {result['accuracy']:.4f} ({result['correct']}/{result['total']}){extra}")


if __name__ == "__main__":
    run_main(main)
