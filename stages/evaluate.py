"""Stage evaluate: score one model variant on the evaluation split (evaluate.split: the CIFAR-10
test set, or the held-out validation images while choosing settings).

    python -m stages.evaluate --variant onnx --kind onnx --model models/onnx/resnet8.onnx \
        --data data/cifar10 --metrics metrics/eval/onnx.json \
        --predictions data/predictions/onnx.npy --confusion plots/confusion/onnx.csv \
        [--parent torch --parent-metrics metrics/eval/torch.json \
         --parent-predictions data/predictions/torch.npy]

A quantized variant has one model per calibration seed: `--model 'models/ort_int8/seed_{seed}/model.onnx'`
scores every seed of calibrate.seeds, and the metrics give the distribution over seeds (mean,
std, min, max of accuracy, delta and agreement), a 95% bootstrap interval of the mean delta
against the parent (test images resampled, pairing kept), and each seed's exact McNemar p-value
(lib/stats.py). The predictions file then holds one row of labels per seed.

The metrics record what really runs (stages.lib.execution: integer or float kernels per Conv,
Gemm and Add, read from the graph the runtime executes). A float variant (no --parent) must
reach evaluate.expected_accuracy +- evaluate.tolerance when it is scored on the full test set. A
quantized variant names its float parent: its metrics add the accuracy delta in points against
the parent's measured accuracy, argmax agreement with the parent, and its file size against the
parent's. The predictions file holds the predicted labels (int64), not the float scores: labels
are the same on every CPU kind, scores differ in last bits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .lib import execution, metrics, runners, stats
from .lib import params as params_lib
from .lib.calibration import evaluation_split, seed_path
from .lib.calibration import seeds as seeds_of
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, load_npy, read_json, write_json
from .lib.seed_pool import map_seeds


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


def score(kind: str, model: Path, images, labels, batch_size: int) -> tuple[dict, np.ndarray]:
    """(metrics of one model file, its predicted labels)."""
    predict = runners.load_runner(kind, model)
    scores = runners.predict_all(predict, images, batch_size)
    file = model_file(kind, model)
    result = {**model_info(file), "execution": execution.measure(kind, model), "model_bytes": file.stat().st_size,
              **metrics.classification(scores, labels)}
    return result, scores.argmax(axis=1).astype(np.int64)


def against_parent(result: dict, predicted: np.ndarray, parent: dict, parent_labels: np.ndarray,
                   labels: np.ndarray) -> dict:
    """One model against its float parent on the same images."""
    agreement = metrics.label_agreement(parent_labels, predicted)
    return {"delta_points": round(100.0 * (result["accuracy"] - parent["accuracy"]), 4),
            "argmax_agreement_with_parent": agreement["argmax_agreement"],
            "argmax_disagreements_with_parent": agreement["argmax_disagreements"],
            "mcnemar_p": round(stats.mcnemar_p(parent_labels == labels, predicted == labels), 6)}


def over_seeds(variant: str, kind: str, template: str, seeds: list[int], split, batch_size: int,
               parent: dict, parent_labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Every calibration seed's model of a quantized variant, and the distribution over seeds."""
    def scored(seed: int) -> tuple[dict, np.ndarray]:
        result, labels = score(kind, seed_path(template, seed), split.images, split.labels, batch_size)
        result.update(against_parent(result, labels, parent, parent_labels, split.labels))
        return result, labels

    per_seed, predicted = {}, []
    for seed, (result, labels) in zip(seeds, map_seeds(scored, seeds)):  # side by side (lib/seed_pool.py)
        per_seed[seed] = result
        predicted.append(labels)
    first = per_seed[seeds[0]]
    if len({r["execution"]["label"] for r in per_seed.values()}) != 1:
        raise PipelineError(f"variant '{variant}': the seeds' models run differently "
                            f"({', '.join(sorted({r['execution']['label'] for r in per_seed.values()}))})")
    accuracies = [r["accuracy"] for r in per_seed.values()]
    deltas = [r["delta_points"] for r in per_seed.values()]
    agreements = [r["argmax_agreement_with_parent"] for r in per_seed.values()]
    low, high = stats.bootstrap_delta(parent_labels == split.labels, np.stack(predicted) == split.labels)
    summary = {
        "seeds": seeds,
        "accuracy": stats.distribution(accuracies),
        "delta_points": {**stats.distribution(deltas), "ci95_low": low, "ci95_high": high},
        "loss_distinguishable_from_zero": bool(high < 0 or low > 0),
        "agreement_with_parent": stats.distribution(agreements),
        "mcnemar_p": {"min": min(r["mcnemar_p"] for r in per_seed.values()),
                      "max": max(r["mcnemar_p"] for r in per_seed.values())},
        "execution": first["execution"],
        "model_bytes": first["model_bytes"],
        "settings": first.get("settings"),
        "per_class_accuracy": {c: round(float(np.mean([r["per_class_accuracy"][c] for r in per_seed.values()])), 6)
                               for c in first["per_class_accuracy"]},
        "per_seed": {str(seed): {key: r[key] for key in (
            "accuracy", "correct", "delta_points", "argmax_agreement_with_parent",
            "argmax_disagreements_with_parent", "mcnemar_p", "model_bytes")} for seed, r in per_seed.items()},
    }
    return summary, np.stack(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--kind", required=True, choices=sorted(runners.RUNNERS))
    parser.add_argument("--model", required=True,
                        help="the model; with a {seed} placeholder, one model per calibration seed")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--confusion", type=Path, required=True)
    parser.add_argument("--reference", help="marks an external reference model, with this description")
    parser.add_argument("--parent")
    parser.add_argument("--parent-metrics", type=Path)
    parser.add_argument("--parent-predictions", type=Path)
    args = parser.parse_args()
    all_params = params_lib.load()
    p = all_params["evaluate"]
    split = evaluation_split(args.data, all_params)
    seeds = seeds_of(all_params) if "{seed}" in args.model else None
    described = {"reference": args.reference} if args.reference else {}
    head = {"variant": args.variant, "kind": args.kind, **described, "split": p["split"]}

    if args.parent is not None:
        parent = read_json(args.parent_metrics)
        if parent["total"] != len(split.labels) or parent.get("split", "test") != p["split"]:
            raise PipelineError(f"{args.parent_metrics}: scored {parent['total']} {parent.get('split', 'test')} "
                                f"images, this run {len(split.labels)} {p['split']} images; re-run its evaluation")
        parent_labels = load_npy(args.parent_predictions, f"predictions of '{args.parent}'")
        head.update({"parent": args.parent, "parent_accuracy": parent["accuracy"]})
    elif seeds is not None:
        raise PipelineError(f"--model {args.model}: a model per seed is a quantized variant; name its --parent")

    if seeds is None:
        result, predicted = score(args.kind, Path(args.model), split.images, split.labels, p["batch_size"])
        result = {**head, **result}
        if args.parent is None:
            if p["split"] == "test":
                check_baseline(args.variant, result, p)
        else:
            result.update(against_parent(result, predicted, parent, parent_labels, split.labels))
            result["size_ratio_to_parent"] = round(result["model_bytes"] / parent["model_bytes"], 4)
    else:
        summary, predicted = over_seeds(args.variant, args.kind, args.model, seeds, split, p["batch_size"],
                                        parent, parent_labels)
        result = {**head, "total": len(split.labels), **summary,
                  "size_ratio_to_parent": round(summary["model_bytes"] / parent["model_bytes"], 4)}

    with atomic_path(args.predictions) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, predicted)
    metrics.write_confusion_csv(args.confusion, predicted, split.labels, seeds)
    write_json(args.metrics, result)
    if seeds is None:
        extra = f", delta {result['delta_points']:+.2f} points vs {args.parent}" if args.parent else ""
        print(f"evaluate {args.variant}: top-1 {result['accuracy']:.4f} ({result['correct']}/{result['total']}){extra}")
    else:
        a, d = result["accuracy"], result["delta_points"]
        print(f"evaluate {args.variant}: top-1 over {len(seeds)} seeds {a['mean']:.4f} +- {a['std']:.4f} "
              f"(min {a['min']:.4f}), delta {d['mean']:+.2f} points [{d['ci95_low']:+.2f}, {d['ci95_high']:+.2f}] "
              f"vs {args.parent}")


if __name__ == "__main__":
    run_main(main)
