"""Stage report: one place to compare every variant.

    python -m stages.report --eval metrics/eval \
        --conversions metrics/convert_onnx.json metrics/convert_torch.json --summary metrics/summary.json \
        --accuracy-plot plots/accuracy.json --per-class-plot plots/per_class_delta.json \
        --layer-error metrics/layer_error --layer-error-plots plots/layer_error \
        --predictions data/predictions --flips-plots plots/flips --report reports/quantization.md

metrics/summary.json has one entry per variant (accuracy, delta in points against its float
parent, argmax agreement with it, size and size ratio, execution kind; for a quantized variant
the mean over calibration seeds, with std, min, max, the bootstrap interval of the delta and the
smallest McNemar p-value), laid out so that `dvc metrics diff` prints one line per variant and
number. The Markdown report holds the comparison table, the per-seed table, the per-class
accuracy deltas and the per-layer error. Everything is read from the metrics files, except the
flip plots (plots/flips/<variant>.csv: the images whose predicted class changed from the parent's,
per calibration seed), which are counted from the predicted labels in data/predictions.

Only the dtypes in `quantize.dtypes` are reported: when an experiment drops a dtype, DVC drops its
stages but leaves their outputs (metrics/eval/ort_int8.json, ...) in place, and those figures
belong to an earlier run. The stage names the files it leaves out, and its plot directories hold
only the reported variants, so no plot shows an earlier run's figures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib import metrics
from .lib import params as params_lib
from .lib.cifar10 import CLASSES
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, load_npy, read_json, write_json

FLOAT_ORDER = ("keras", "onnx", "torch")
QUANTIZED_BACKENDS = ("ort", "torch")  # quantized variants are <backend>_<dtype> (dvc.yaml)


def of_dtypes(files: list[Path], dtypes: list[str]) -> tuple[list[Path], list[Path]]:
    """(the files of the variants this run builds, the files an earlier run left): a quantized
    variant's file (<backend>_<dtype>.json) is this run's only if its dtype is in `dtypes`."""
    earlier = {f"{backend}_{dtype}" for backend in QUANTIZED_BACKENDS for dtype in params_lib.DTYPES
               if dtype not in dtypes}
    return [f for f in files if f.stem not in earlier], [f for f in files if f.stem in earlier]


def load_variants(files: list[Path], directory: Path) -> dict[str, dict]:
    if not files:
        raise PipelineError(f"{directory}: no evaluation metrics found (run the evaluate stages)")
    variants = {f.stem: read_json(f) for f in files}
    order = [v for v in FLOAT_ORDER if v in variants] + sorted(v for v in variants if v not in FLOAT_ORDER)
    return {v: variants[v] for v in order}


def load_conversions(paths: list[Path]) -> dict[str, dict]:
    """{float variant: its conversion check against its parent}, from convert_<variant>.json files
    (each holds one `vs_<parent>` report: argmax agreement and the largest score difference)."""
    found = {}
    for path in paths:
        data = read_json(path)
        checks = [(key[3:], value) for key, value in data.items() if key.startswith("vs_")]
        if len(checks) != 1 or not path.stem.startswith("convert_"):
            raise PipelineError(f"{path}: expected a convert_<variant>.json with one vs_<parent> report")
        parent, check = checks[0]
        found[path.stem.removeprefix("convert_")] = {"parent": parent, **check,
                                                     **({"keras_layers": data["keras_layers"]} if "keras_layers" in data else {})}
    return found


def summarise(variants: dict[str, dict], conversions: dict[str, dict]) -> dict[str, dict]:
    """One entry per variant. Quantized variants: measured against their float parent by the
    evaluate stage, over every calibration seed (`accuracy` and `delta_points` are the means over
    seeds). Float variants: against the model they were converted from, by the conversion check
    (the first float model, Keras, is the reference and has no such figures)."""
    summary = {}
    for name, m in variants.items():
        if "parent" in m and m["parent"] not in variants:
            raise PipelineError(f"variant '{name}' names parent '{m['parent']}', whose metrics are missing")
        conversion = conversions.get(name)
        if "per_seed" in m:
            a, d, g = m["accuracy"], m["delta_points"], m["agreement_with_parent"]
            entry = {"accuracy": a["mean"], "accuracy_std": a["std"], "accuracy_min": a["min"],
                     "accuracy_max": a["max"], "seeds": len(m["seeds"]),
                     "delta_points": round(d["mean"], 4), "delta_ci95_low": d["ci95_low"],
                     "delta_ci95_high": d["ci95_high"],
                     "loss_distinguishable_from_zero": m["loss_distinguishable_from_zero"],
                     "agreement_with_float": g["mean"], "agreement_min": g["min"],
                     "mcnemar_p_min": m["mcnemar_p"]["min"],
                     "model_bytes": m["model_bytes"], "size_ratio": m["size_ratio_to_parent"]}
        else:
            entry = {"accuracy": m["accuracy"], "correct": m["correct"]}
            if "parent" in m:
                entry.update({"delta_points": m["delta_points"],
                              "agreement_with_float": m["argmax_agreement_with_parent"],
                              "mcnemar_p": m["mcnemar_p"],
                              "model_bytes": m["model_bytes"], "size_ratio": m["size_ratio_to_parent"]})
            elif conversion is not None and conversion["parent"] in variants:
                source = variants[conversion["parent"]]
                entry.update({"delta_points": round(100 * (m["accuracy"] - source["accuracy"]), 4),
                              "agreement_with_float": conversion["argmax_agreement"],
                              "max_abs_diff_below": conversion["max_abs_diff_below"],
                              "model_bytes": m["model_bytes"],
                              "size_ratio": round(m["model_bytes"] / source["model_bytes"], 4)})
            else:
                entry["model_bytes"] = m["model_bytes"]
        entry["execution"] = m["execution"]["label"]
        if m.get("reference"):
            entry["reference"] = True
        summary[name] = entry
    return summary


def comparison_table(summary: dict[str, dict], variants: dict[str, dict], conversions: dict[str, dict]) -> str:
    rows = ["| variant | parent | execution | top-1 | min over seeds | delta (points) | 95% interval of delta "
            "| loss distinguishable from 0 | agreement with parent | size (bytes) | size ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    for name, s in summary.items():
        label = f"{name} (reference)" if variants[name].get("reference") else name
        parent = variants[name].get("parent") or conversions.get(name, {}).get("parent", "-")
        if "seeds" in s:
            top1 = f"{s['accuracy']:.4f} +- {s['accuracy_std']:.4f} ({s['seeds']} seeds)"
            interval = f"[{s['delta_ci95_low']:+.2f}, {s['delta_ci95_high']:+.2f}]"
            distinct = "yes" if s["loss_distinguishable_from_zero"] else "no"
            low = f"{s['accuracy_min']:.4f}"
        else:
            top1, interval, low = f"{s['accuracy']:.4f}", "-", "-"
            distinct = "-" if "mcnemar_p" not in s else ("yes" if s["mcnemar_p"] < 0.05 else "no")
        rows.append(f"| {label} | {parent} | {s['execution']} | {top1} | {low} "
                    f"| {cell(s.get('delta_points'), '+.2f')} | {interval} | {distinct} "
                    f"| {cell(s.get('agreement_with_float'), '.4f')} "
                    f"| {s['model_bytes']:,} | {cell(s.get('size_ratio'), '.3f')} |")
    return "\n".join(rows)


def seeds_table(variants: dict[str, dict]) -> str:
    """Each quantized variant's accuracy and agreement with its float parent, per calibration seed."""
    spread = {n: m for n, m in variants.items() if "per_seed" in m}
    if not spread:
        return "(no quantized variants)"
    seeds = next(iter(spread.values()))["seeds"]
    rows = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | McNemar p (min) |",
            "|---|" + "---|" * (len(seeds) + 1)]
    for name, m in spread.items():
        cells = [f"{m['per_seed'][str(s)]['accuracy']:.4f} / {m['per_seed'][str(s)]['argmax_agreement_with_parent']:.4f}"
                 for s in seeds]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {m['mcnemar_p']['min']:.3f} |")
    return "\n".join(rows)


def accuracy_points(variants: dict[str, dict], baseline: float) -> list[dict]:
    """The accuracy plot: one point per variant and calibration seed, against the float baseline."""
    points = []
    for name, m in variants.items():
        kind = "reference" if m.get("reference") else ("quantized" if "parent" in m else "float")
        runs = ([(str(s), r["accuracy"]) for s, r in m["per_seed"].items()] if "per_seed" in m
                else [("-", m["accuracy"])])
        for seed, accuracy in runs:
            points.append({"variant": name, "kind": kind, "seed": seed, "accuracy": accuracy,
                           "float_baseline": baseline, "float_baseline_label": f"float {baseline:.4f}",
                           "points_vs_float_baseline": round(100 * (accuracy - baseline), 4)})
    return points


def per_class_delta(variants: dict[str, dict]) -> list[dict]:
    """Every quantized variant's per-class accuracy change against its float parent, in points."""
    rows = []
    for name, m in variants.items():
        if "parent" in m:
            parent = variants[m["parent"]]["per_class_accuracy"]
            rows += [{"variant": name, "class": c,
                      "delta_points": round(100 * (m["per_class_accuracy"][c] - parent[c]), 4)} for c in CLASSES]
    return rows


def per_class_table(variants: dict[str, dict]) -> str:
    quantized = [n for n, m in variants.items() if "parent" in m]
    if not quantized:
        return "(no quantized variants)"
    rows = ["| class | float | " + " | ".join(quantized) + " |", "|---|---|" + "---|" * len(quantized)]
    for cls in CLASSES:
        float_acc = variants[variants[quantized[0]]["parent"]]["per_class_accuracy"][cls]
        deltas = [100 * (variants[q]["per_class_accuracy"][cls] - variants[variants[q]["parent"]]["per_class_accuracy"][cls])
                  for q in quantized]
        rows.append(f"| {cls} | {float_acc:.3f} | " + " | ".join(f"{d:+.1f}" for d in deltas) + " |")
    return "\n".join(rows)


def flip_sources(predictions: Path, variants: dict[str, dict]) -> dict[str, tuple]:
    """{variant with a parent: (parent's labels, its labels, its calibration seeds or None)}, from
    the predicted labels each evaluation saved in `predictions` (<variant>.npy), checked against the
    images and seeds its metrics name."""
    found = {}
    for name, m in variants.items():
        if "parent" not in m:
            continue
        parent = load_npy(predictions / f"{m['parent']}.npy", f"predictions of '{m['parent']}'")
        child = load_npy(predictions / f"{name}.npy", f"predictions of '{name}'")
        seeds = m["seeds"] if "per_seed" in m else None
        expected = (m["total"],) if seeds is None else (len(seeds), m["total"])
        if parent.shape != (m["total"],) or child.shape != expected:
            raise PipelineError(f"{predictions}: the labels of '{name}' {child.shape} and of its parent "
                                f"'{m['parent']}' {parent.shape} do not match its metrics {expected}; "
                                "re-run its evaluation")
        found[name] = (parent, child, seeds)
    return found


def write_flips(directory: Path, sources: dict[str, tuple]) -> None:
    """One CSV per variant in `directory`, written whole (a variant no longer reported leaves no
    file behind): the images whose predicted class differs from the parent's, one row per image
    and calibration seed."""
    with atomic_path(directory, directory=True) as tmp:
        for name, (parent, child, seeds) in sources.items():
            metrics.write_flips_csv(tmp / f"{name}.csv", parent, child, seeds)


def keras_name(node: str, keras_layers: dict[str, str]) -> str | None:
    """The Keras layer of an ONNX node (a folded Dense keeps its MatMul's name as prefix)."""
    return keras_layers.get(node) or keras_layers.get(node.rsplit("/", 1)[0])


def layer_error_by_dtype(errors: dict[str, dict], keras_layers: dict[str, str]) -> dict[str, list[dict]]:
    """Per dtype, one row per Keras Conv / Dense layer and backend: {layer, backend, sqnr_db}, in
    graph order; both backends meet on the ONNX node each row belongs to."""
    by_dtype: dict[str, list[dict]] = {}
    for variant in sorted(errors):
        backend, dtype = variant.split("_", 1)
        for row in errors[variant]["layers"]:
            name = keras_name(row.get("node", row["layer"]), keras_layers)
            if name is not None:
                by_dtype.setdefault(dtype, []).append({"layer": name, "backend": backend, "sqnr_db": row["sqnr_db"]})
    order = list(dict.fromkeys(keras_layers.values()))
    for rows in by_dtype.values():
        rows.sort(key=lambda r: (order.index(r["layer"]) if r["layer"] in order else len(order), r["backend"]))
    return by_dtype


def layer_error_tables(by_dtype: dict[str, list[dict]], where: str) -> str:
    """One table per dtype: Keras layers in graph order, one SQNR column per backend."""
    tables = []
    for dtype, rows in by_dtype.items():
        backends = sorted({r["backend"] for r in rows})
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        lookup = {(r["layer"], r["backend"]): r["sqnr_db"] for r in rows}
        lines = ["| Keras layer | " + " | ".join(f"{b}_{dtype} SQNR (dB)" for b in backends) + " |",
                 "|---|" + "---|" * len(backends)]
        for layer in layers:
            cells = [f"{lookup[(layer, b)]:.1f}" if (layer, b) in lookup else "-" for b in backends]
            lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
        tables.append(f"### {dtype}\n\n{where}\n\n" + "\n".join(lines))
    return "\n\n".join(tables) if tables else "(no per-layer error files)"


def evaluated_on(variants: dict[str, dict]) -> str:
    splits = {(m.get("split", "test"), m["total"]) for m in variants.values()}
    if len(splits) != 1:
        raise PipelineError(f"the variants were scored on different images ({sorted(splits)}); re-run the evaluations")
    split, total = splits.pop()
    what = "test set" if split == "test" else "validation split (held-out training images; for choosing settings)"
    return f"Every variant is scored on the same {total:,} images of the {what}."


def render(summary: dict[str, dict], variants: dict[str, dict], conversions: dict[str, dict],
           errors: dict[str, dict], layer_errors: dict[str, list[dict]]) -> str:
    return "\n\n".join([
        "# Quantization report",
        "Generated by the `report` stage from `metrics/eval/*.json`; do not edit by hand. "
        + evaluated_on(variants),
        "## Variants\n\n" + comparison_table(summary, variants, conversions),
        "A quantized variant is built once per calibration seed: its top-1 is the mean +- standard deviation "
        "over the seeds, `delta` the mean change in points against its float parent, and the 95% interval "
        "a paired bootstrap of that mean over the evaluation images (`loss distinguishable from 0`: the "
        "interval excludes 0). For the single MLPerf reference model, the exact McNemar test at 5%. "
        "Delta and agreement are measured on the same images against each variant's parent: a "
        "quantized variant's float model (`onnx` for ONNX Runtime, `torch` for PyTorch, `keras` for the "
        "MLPerf reference), a float variant's source in the conversion chain (its conversion check). "
        "Execution is measured from the graph each runtime runs: `integer` when every Conv, Gemm and Add "
        "runs on integer kernels, `float` when none does, else `mixed (k of n in float)`; the layer "
        "counts are in `metrics/eval/<variant>.json`."
        + "".join(f"\n\n{name} (reference): {m['reference']}." for name, m in variants.items() if m.get("reference")),
        "## Every calibration seed\n\nTop-1 / argmax agreement with the float parent, per calibration "
        "seed (`calibrate.seeds`); the last column is the smallest exact McNemar p-value over the seeds "
        "(a seed's change against float is distinguishable from zero at the 5% level when p < 0.05).\n\n"
        + seeds_table(variants),
        "## Per-class accuracy\n\nFloat accuracy per class, and each quantized variant's change in points.\n\n"
        + per_class_table(variants),
        "## Per-layer quantization error\n\nSignal-to-quantization-noise ratio of each quantized layer's "
        "output against the float model's same tensor (higher is better; 6 dB is about one bit). "
        "ONNX Runtime: every tensor with a quantize/dequantize pair (`qdq_loss_debug`). PyTorch: each "
        "Conv / Linear output (after its fused ReLU); for `torch_int8` that is before the output is "
        "re-quantized, for `torch_uint8` after. Layers are named as in the Keras model (matched by "
        "their kernels in `convert_onnx`).\n\n"
        + layer_error_tables(layer_errors, next((f"On the first {e['images']} {e.get('split', 'test')} images, "
                                                 f"calibration seed {e.get('seed', '-')}."
                                                 for e in errors.values()), "")),
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--conversions", type=Path, nargs="*", default=[],
                        help="convert_<variant>.json files: the float variants' conversion checks")
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--accuracy-plot", type=Path, required=True)
    parser.add_argument("--per-class-plot", type=Path, required=True)
    parser.add_argument("--layer-error", type=Path, required=True, help="directory of per-layer SQNR files")
    parser.add_argument("--layer-error-plots", type=Path, required=True, help="directory: one file per dtype")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="directory of the predicted labels the evaluate stages saved (<variant>.npy)")
    parser.add_argument("--flips-plots", type=Path, required=True,
                        help="directory: per variant with a parent, the images whose answer changed")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()

    dtypes = params_lib.load()["quantize"]["dtypes"]
    eval_files, earlier = of_dtypes(sorted(args.eval.glob("*.json")), dtypes)
    error_files, earlier_errors = of_dtypes(sorted(args.layer_error.glob("*.json")) if args.layer_error.is_dir() else [],
                                            dtypes)
    if earlier or earlier_errors:
        print(f"report: left out {', '.join(map(str, earlier + earlier_errors))}: not a dtype of quantize.dtypes "
              f"{dtypes} (an earlier run's outputs, which DVC does not delete)")
    variants = load_variants(eval_files, args.eval)
    conversions = load_conversions(args.conversions)
    summary = summarise(variants, conversions)
    flips = flip_sources(args.predictions, variants)  # read and checked before anything is written
    baseline = next((variants[v]["accuracy"] for v in FLOAT_ORDER if v in variants), None)
    write_json(args.accuracy_plot, accuracy_points(variants, baseline))
    write_json(args.per_class_plot, per_class_delta(variants))
    errors = {f.stem: read_json(f) for f in error_files}
    keras_layers = next((c["keras_layers"] for c in conversions.values() if "keras_layers" in c), {})
    layer_errors = layer_error_by_dtype(errors, keras_layers)
    with atomic_path(args.layer_error_plots, directory=True) as tmp:
        for dtype, rows in layer_errors.items():
            (tmp / f"{dtype}.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_flips(args.flips_plots, flips)
    write_json(args.summary, summary)
    with atomic_path(args.report) as tmp:
        tmp.write_text(render(summary, variants, conversions, errors, layer_errors))
    print(f"report: {len(summary)} variants -> {args.summary}, {args.report}")


if __name__ == "__main__":
    run_main(main)
