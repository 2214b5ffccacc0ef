"""Stage report: one place to compare every variant.

    python -m stages.report --eval metrics/eval --summary metrics/summary.json \
        --accuracy-plot plots/accuracy.json --per-class-plots plots/per_class \
        --report reports/quantization.md

metrics/summary.json has one entry per variant (accuracy, delta in points against its float
parent, argmax agreement with it, size and size ratio, execution kind), laid out so that
`dvc metrics diff` prints one line per variant and number. The Markdown report holds the
comparison table and the per-class accuracy deltas. Everything is read from the metrics files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib.cifar10 import CLASSES
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, read_json, write_json

FLOAT_ORDER = ("keras", "onnx", "torch")


def load_variants(directory: Path) -> dict[str, dict]:
    files = sorted(directory.glob("*.json"))
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
    evaluate stage. Float variants: against the model they were converted from, by the conversion
    check (the first float model, Keras, is the reference and has no such figures)."""
    summary = {}
    for name, m in variants.items():
        parent = variants.get(m.get("parent", ""), None)
        conversion = conversions.get(name)
        entry = {"accuracy": m["accuracy"], "correct": m["correct"]}
        if "parent" in m:
            entry.update({"delta_points": m["delta_points"], "agreement_with_float": m["argmax_agreement_with_parent"],
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
        if parent is None and "parent" in m:
            raise PipelineError(f"variant '{name}' names parent '{m['parent']}', whose metrics are missing")
        summary[name] = entry
    return summary


def comparison_table(summary: dict[str, dict], variants: dict[str, dict], conversions: dict[str, dict]) -> str:
    rows = ["| variant | parent | execution | top-1 | delta (points) | agreement with parent | size (bytes) | size ratio |",
            "|---|---|---|---|---|---|---|---|"]

    def cell(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    for name, s in summary.items():
        label = f"{name} (reference)" if variants[name].get("reference") else name
        parent = variants[name].get("parent") or conversions.get(name, {}).get("parent", "-")
        rows.append(f"| {label} | {parent} | {s['execution']} | {s['accuracy']:.4f} "
                    f"| {cell(s.get('delta_points'), '+.2f')} | {cell(s.get('agreement_with_float'), '.4f')} "
                    f"| {s['model_bytes']:,} | {cell(s.get('size_ratio'), '.3f')} |")
    return "\n".join(rows)


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


def layer_error_tables(by_dtype: dict[str, list[dict]], images: int | None) -> str:
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
        tables.append(f"### {dtype}\n\nOn the first {images} test images.\n\n" + "\n".join(lines))
    return "\n\n".join(tables) if tables else "(no per-layer error files)"


def render(summary: dict[str, dict], variants: dict[str, dict], conversions: dict[str, dict],
           errors: dict[str, dict], layer_errors: dict[str, list[dict]]) -> str:
    return "\n\n".join([
        "# Quantization report",
        "Generated by the `report` stage from `metrics/eval/*.json`; do not edit by hand.",
        "## Variants\n\n" + comparison_table(summary, variants, conversions),
        "Delta and agreement are measured on the same test images against each variant's parent: a "
        "quantized variant's float model (`onnx` for ONNX Runtime, `torch` for PyTorch, `keras` for the "
        "MLPerf reference), a float variant's source in the conversion chain (its conversion check). "
        "Execution is measured from the graph each runtime runs: `integer` when every Conv, Gemm and Add "
        "runs on integer kernels, `float` when none does, else `mixed (k of n in float)`; the layer "
        "counts are in `metrics/eval/<variant>.json`."
        + "".join(f"\n\n{name} (reference): {m['reference']}." for name, m in variants.items() if m.get("reference")),
        "## Per-class accuracy\n\nFloat accuracy per class, and each quantized variant's change in points.\n\n"
        + per_class_table(variants),
        "## Per-layer quantization error\n\nSignal-to-quantization-noise ratio of each quantized layer's "
        "output against the float model's same tensor (higher is better; 6 dB is about one bit). "
        "ONNX Runtime: every tensor with a quantize/dequantize pair (`qdq_loss_debug`). PyTorch: each "
        "Conv / Linear output (after its fused ReLU); for `torch_int8` that is before the output is "
        "re-quantized, for `torch_uint8` after. Layers are named as in the Keras model (matched by "
        "their kernels in `convert_onnx`).\n\n"
        + layer_error_tables(layer_errors, next((e["images"] for e in errors.values()), None)),
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
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()

    variants = load_variants(args.eval)
    conversions = load_conversions(args.conversions)
    summary = summarise(variants, conversions)
    baseline = next((variants[v]["accuracy"] for v in FLOAT_ORDER if v in variants), None)
    write_json(args.accuracy_plot, [
        {"variant": n, "kind": "reference" if variants[n].get("reference") else
         ("quantized" if "parent" in variants[n] else "float"),
         "accuracy": s["accuracy"], "float_baseline": baseline, "float_baseline_label": f"float {baseline:.4f}",
         "points_vs_float_baseline": round(100 * (s["accuracy"] - baseline), 4)} for n, s in summary.items()])
    write_json(args.per_class_plot, per_class_delta(variants))
    errors = {f.stem: read_json(f) for f in sorted(args.layer_error.glob("*.json"))} if args.layer_error.is_dir() else {}
    keras_layers = next((c["keras_layers"] for c in conversions.values() if "keras_layers" in c), {})
    layer_errors = layer_error_by_dtype(errors, keras_layers)
    with atomic_path(args.layer_error_plots, directory=True) as tmp:
        for dtype, rows in layer_errors.items():
            (tmp / f"{dtype}.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_json(args.summary, summary)
    with atomic_path(args.report) as tmp:
        tmp.write_text(render(summary, variants, conversions, errors, layer_errors))
    print(f"report: {len(summary)} variants -> {args.summary}, {args.report}")


if __name__ == "__main__":
    run_main(main)
