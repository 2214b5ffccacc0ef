"""The report stage: its summary and tables restate exactly the metrics it reads, and it writes
one well-formed plot file per variant. No framework is needed: it reads JSON and the saved labels."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from stages.lib.cifar10 import CLASSES
from tests.conftest import REPO, run_module


def eval_metrics(variant: str, correct: int, parent: str | None = None, parent_correct: int = 0,
                 size: int = 1000, execution: str = "float") -> dict:
    per_class = {c: round((correct + i) / 10000, 6) for i, c in enumerate(CLASSES)}
    result = {"variant": variant, "accuracy": correct / 10000, "correct": correct, "total": 10000,
              "model_bytes": size, "per_class_accuracy": per_class, "execution": {"label": execution},
              "confusion_matrix": {"labels": list(CLASSES), "rows_actual_cols_predicted": [[0] * 10] * 10}}
    if parent:
        result.update({"parent": parent, "delta_points": round((correct - parent_correct) / 100, 4),
                       "argmax_agreement_with_parent": 0.98, "size_ratio_to_parent": round(size / 4000, 4)})
    return result


def seeded_metrics(variant: str, correct: list[int], parent: str, parent_correct: int, size: int,
                   execution: str) -> dict:
    """A quantized variant's metrics as the evaluate stage writes them: one entry per seed, and
    the distribution (figures made up; the report must restate them, not recompute them)."""
    per_seed = {str(s): {"accuracy": c / 10000, "correct": c, "delta_points": round((c - parent_correct) / 100, 4),
                         "argmax_agreement_with_parent": 0.98 + s / 1000, "argmax_disagreements_with_parent": 200 - 10 * s,
                         "mcnemar_p": 0.5 - s / 10, "model_bytes": size} for s, c in enumerate(correct)}
    mean = sum(correct) / len(correct) / 10000
    return {"variant": variant, "split": "test", "total": 10000, "seeds": list(range(len(correct))),
            "parent": parent, "accuracy": {"mean": mean, "std": 0.0005, "min": min(correct) / 10000, "max": max(correct) / 10000},
            "delta_points": {"mean": round(100 * (mean - parent_correct / 10000), 4), "std": 0.05, "min": -0.5, "max": 0.5,
                             "ci95_low": -0.12, "ci95_high": 0.31},
            "loss_distinguishable_from_zero": False,
            "agreement_with_parent": {"mean": 0.982, "std": 0.001, "min": 0.98, "max": 0.984},
            "mcnemar_p": {"min": 0.1, "max": 0.5}, "execution": {"label": execution}, "model_bytes": size,
            "size_ratio_to_parent": round(size / 4000, 4),
            "per_class_accuracy": {c: round((sum(correct) / len(correct) + i) / 10000, 6) for i, c in enumerate(CLASSES)},
            "per_seed": per_seed}


@pytest.fixture
def reported(tmp_path: Path) -> Path:
    report(tmp_path, "[int8, uint8]")
    return tmp_path


# Made-up predicted labels (data/predictions): the float models agree; each quantized variant's
# labels differ from its parent's on FLIPS[variant] images per seed, MLPerf's on 4 (the flip plots
# count them from the labels, whatever the metrics say).
FLIPS = {"mlperf_int8": [4], "ort_int8": [3, 0, 5], "torch_uint8": [2, 1, 6]}


def predictions(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    float_labels = np.arange(10000) % 10
    for name in ("keras", "onnx", "torch"):
        np.save(directory / f"{name}.npy", float_labels)
    for name, counts in FLIPS.items():
        rows = np.stack([float_labels] * len(counts))
        for row, count in zip(rows, counts):
            row[:count] = (row[:count] + 1) % 10  # image i: class i % 10 -> the next class
        np.save(directory / f"{name}.npy", rows[0] if name == "mlperf_int8" else rows)


def report(tmp_path: Path, dtypes: str):
    """The report stage on made-up metrics and labels of every float variant, MLPerf's reference,
    ort_int8 and torch_uint8, with `quantize.dtypes: <dtypes>` in the project's params.yaml."""
    params = (REPO / "params.yaml").read_text()
    assert "dtypes: [int8, uint8]" in params
    (tmp_path / "params.yaml").write_text(params.replace("dtypes: [int8, uint8]", f"dtypes: {dtypes}"))
    directory = tmp_path / "metrics" / "eval"
    directory.mkdir(parents=True, exist_ok=True)
    variants = [eval_metrics("keras", 8719, size=16000), eval_metrics("onnx", 8719, size=4000),
                eval_metrics("torch", 8719, size=4000),
                eval_metrics("mlperf_int8", 8697, "keras", 8719, 900, "integer"),
                seeded_metrics("ort_int8", [8735, 8725, 8745], "onnx", 8719, 1400, "integer"),
                seeded_metrics("torch_uint8", [8690, 8680, 8700], "torch", 8719, 1300, "mixed (1 of 13 in float)")]
    variants[3]["reference"] = "MLPerf's own"
    variants[3]["mcnemar_p"] = 0.01
    for v in variants:
        (directory / f"{v['variant']}.json").write_text(json.dumps(v))
    errors = tmp_path / "metrics" / "layer_error"
    errors.mkdir(exist_ok=True)
    layers = {  # ONNX Runtime: tensors (a ReLU output belongs to its Conv), PyTorch: modules
        "ort_uint8": [{"layer": "relu0:0", "node": "n/conv0", "sqnr_db": 41.0},
                      {"layer": "add:0", "node": "n/add", "sqnr_db": 20.0},
                      {"layer": "conv1:0", "node": "n/conv1", "sqnr_db": 30.5}],
        "torch_uint8": [{"layer": "n/conv1", "node": "n/conv1", "sqnr_db": 22.0},
                        {"layer": "n/conv0", "node": "n/conv0", "sqnr_db": 35.25}]}
    for name, rows in layers.items():
        (errors / f"{name}.json").write_text(json.dumps({"variant": name, "images": 256, "seed": 0, "split": "test",
                                                         "layers": rows}))
    (tmp_path / "metrics" / "convert_onnx.json").write_text(json.dumps(
        {"opset": 13, "vs_keras": {"max_abs_diff_below": 1e-05, "argmax_agreement": 0.9999, "argmax_disagreements": 1},
         "keras_layers": {"n/conv0": "conv2d", "n/conv1": "conv2d_1"}}))
    predictions(tmp_path / "data" / "predictions")
    return run_module("stages.report", "--eval", "metrics/eval", "--conversions", "metrics/convert_onnx.json",
                      "--summary", "metrics/summary.json",
                      "--accuracy-plot", "plots/accuracy.json", "--per-class-plot", "plots/per_class_delta.json",
                      "--layer-error", "metrics/layer_error", "--layer-error-plots", "plots/layer_error",
                      "--predictions", "data/predictions", "--flips-plots", "plots/flips",
                      "--report", "reports/quantization.md", cwd=tmp_path)


def test_a_dtype_no_longer_in_quantize_dtypes_is_left_out_by_name(tmp_path):
    """An experiment with `quantize.dtypes=[uint8]` drops the int8 stages, but DVC leaves their
    metrics in place: the report must not show an earlier run's int8 figures as this run's."""
    (tmp_path / "metrics/layer_error").mkdir(parents=True)
    (tmp_path / "metrics/layer_error/ort_int8.json").write_text(json.dumps(
        {"variant": "ort_int8", "images": 256, "seed": 0, "split": "test",
         "layers": [{"layer": "conv1:0", "node": "n/conv1", "sqnr_db": 30.5}]}))
    output = report(tmp_path, "[uint8]").stdout
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert list(summary) == ["keras", "onnx", "torch", "mlperf_int8", "torch_uint8"]
    assert {row["variant"] for row in json.loads((tmp_path / "plots/accuracy.json").read_text())} == set(summary)
    assert sorted(p.name for p in (tmp_path / "plots/layer_error").iterdir()) == ["uint8.json"]
    assert sorted(p.name for p in (tmp_path / "plots/flips").iterdir()) == ["mlperf_int8.csv", "torch_uint8.csv"]
    assert "ort_int8" not in (tmp_path / "reports/quantization.md").read_text()
    assert ("report: left out metrics/eval/ort_int8.json, metrics/layer_error/ort_int8.json: not a dtype of "
            "quantize.dtypes ['uint8']") in output, output


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_summary_restates_each_variants_metrics(reported):
    summary = json.loads((reported / "metrics/summary.json").read_text())
    assert list(summary) == ["keras", "onnx", "torch", "mlperf_int8", "ort_int8", "torch_uint8"]
    assert summary["ort_int8"] == {"accuracy": 0.8735, "accuracy_std": 0.0005, "accuracy_min": 0.8725,
                                   "accuracy_max": 0.8745, "seeds": 3, "delta_points": 0.16,
                                   "delta_ci95_low": -0.12, "delta_ci95_high": 0.31,
                                   "loss_distinguishable_from_zero": False, "agreement_with_float": 0.982,
                                   "agreement_min": 0.98, "mcnemar_p_min": 0.1, "model_bytes": 1400,
                                   "size_ratio": 0.35, "execution": "integer"}
    assert summary["torch_uint8"]["delta_points"] == -0.29
    assert summary["torch_uint8"]["execution"] == "mixed (1 of 13 in float)"
    assert summary["mlperf_int8"] == {"accuracy": 0.8697, "correct": 8697, "delta_points": -0.22,
                                      "agreement_with_float": 0.98, "mcnemar_p": 0.01, "model_bytes": 900,
                                      "size_ratio": 0.225, "execution": "integer", "reference": True}
    # a float row's figures come from its conversion check, measured; none are filled in
    assert summary["onnx"] == {"accuracy": 0.8719, "correct": 8719, "delta_points": 0.0, "agreement_with_float": 0.9999,
                               "max_abs_diff_below": 1e-05, "model_bytes": 4000, "size_ratio": 0.25,
                               "execution": "float"}
    assert summary["keras"] == {"accuracy": 0.8719, "correct": 8719, "model_bytes": 16000, "execution": "float"}
    assert "agreement_with_float" not in summary["torch"]  # no conversion file given for it


def test_markdown_tables_match_the_metrics(reported):
    markdown = (reported / "reports/quantization.md").read_text()
    assert "the same 10,000 images of the test set" in markdown
    rows = {r[0]: r for r in table_rows(markdown, "| variant |")}
    assert rows["ort_int8"][1:9] == ["onnx", "integer", "0.8735 +- 0.0005 (3 seeds)", "0.8725", "+0.16",
                                     "[-0.12, +0.31]", "no", "0.9820"]
    assert rows["mlperf_int8 (reference)"][1:9] == ["keras", "integer", "0.8697", "-", "-0.22", "-", "yes", "0.9800"]
    assert rows["onnx"][1:9] == ["keras", "float", "0.8719", "-", "+0.00", "-", "-", "0.9999"]
    assert rows["keras"][1:9] == ["-", "float", "0.8719", "-", "-", "-", "-", "-"]
    assert rows["torch_uint8"][5] == "-0.29"
    seeds = {r[0]: r for r in table_rows(markdown, "| variant | seed 0")}
    assert seeds["ort_int8"] == ["ort_int8", "0.8735 / 0.9800", "0.8725 / 0.9810", "0.8745 / 0.9820", "0.100"]
    assert list(seeds) == ["ort_int8", "torch_uint8"]
    per_class = {r[0]: r for r in table_rows(markdown, "| class |")}
    assert list(per_class) == list(CLASSES)
    # ort_int8 per class: mean (8735 + i) vs parent (8719 + i) -> +0.16 points -> "+0.2"
    assert per_class["cat"][3] == "+0.2" and per_class["cat"][4] == "-0.3"


def test_plot_files_are_well_formed_one_point_per_seed(reported):
    accuracy = json.loads((reported / "plots/accuracy.json").read_text())
    assert [(row["variant"], row["seed"]) for row in accuracy] == [
        ("keras", "-"), ("onnx", "-"), ("torch", "-"), ("mlperf_int8", "-"),
        ("ort_int8", "0"), ("ort_int8", "1"), ("ort_int8", "2"),
        ("torch_uint8", "0"), ("torch_uint8", "1"), ("torch_uint8", "2")]
    assert all(row["float_baseline"] == 0.8719 for row in accuracy)
    assert [row["points_vs_float_baseline"] for row in accuracy] == [
        0.0, 0.0, 0.0, -0.22, 0.16, 0.06, 0.26, -0.29, -0.39, -0.19]
    assert [row["kind"] for row in accuracy][2:5] == ["float", "reference", "quantized"]
    rows = json.loads((reported / "plots/per_class_delta.json").read_text())
    assert [r["variant"] for r in rows] == ["mlperf_int8"] * 10 + ["ort_int8"] * 10 + ["torch_uint8"] * 10
    assert [r["class"] for r in rows[:10]] == list(CLASSES)
    assert rows[13]["delta_points"] == pytest.approx(100 * ((8735 + 3) - (8719 + 3)) / 10000)


def test_layer_error_tables_and_plots_match_the_files(reported):
    """Both backends side by side per dtype, under the Keras layer names, in graph order."""
    markdown = (reported / "reports/quantization.md").read_text()
    assert "On the first 256 test images, calibration seed 0." in markdown
    uint8 = table_rows(markdown[markdown.index("### uint8"):], "| Keras layer |")
    assert uint8 == [["`conv2d`", "41.0", "35.2"], ["`conv2d_1`", "30.5", "22.0"]]
    files = sorted(p.name for p in (reported / "plots/layer_error").iterdir())
    assert files == ["uint8.json"]
    assert json.loads((reported / "plots/layer_error/uint8.json").read_text()) == [
        {"layer": "conv2d", "backend": "ort", "sqnr_db": 41.0}, {"layer": "conv2d", "backend": "torch", "sqnr_db": 35.25},
        {"layer": "conv2d_1", "backend": "ort", "sqnr_db": 30.5}, {"layer": "conv2d_1", "backend": "torch", "sqnr_db": 22.0}]


def test_flip_plots_are_counted_from_the_labels(reported):
    """One CSV per variant with a parent: a row per image and seed whose class differs from the
    parent's, as class names (DVC's confusion template draws it)."""
    assert sorted(p.name for p in (reported / "plots/flips").iterdir()) == [
        "mlperf_int8.csv", "ort_int8.csv", "torch_uint8.csv"]
    mlperf = (reported / "plots/flips/mlperf_int8.csv").read_text().splitlines()
    assert mlperf == ["float_predicted,quantized_predicted", "airplane,automobile", "automobile,bird",
                      "bird,cat", "cat,deer"]
    for name in ("ort_int8", "torch_uint8"):
        lines = (reported / f"plots/flips/{name}.csv").read_text().splitlines()
        assert lines[0] == "seed,float_predicted,quantized_predicted"
        assert [sum(line.startswith(f"{seed},") for line in lines[1:]) for seed in range(3)] == FLIPS[name]
    assert "2,cat,deer" in (reported / "plots/flips/torch_uint8.csv").read_text().splitlines()


def test_labels_that_do_not_match_the_metrics_are_a_clear_error(tmp_path):
    """ort_int8's labels of an earlier run with two seeds, its metrics with three: nothing written."""
    report(tmp_path, "[int8, uint8]")
    for path in [tmp_path / "metrics/summary.json", tmp_path / "plots/accuracy.json", *(tmp_path / "plots").rglob("*.csv")]:
        path.unlink()
    np.save(tmp_path / "data/predictions/ort_int8.npy", np.zeros((2, 10000), dtype=np.int64))
    result = run_module("stages.report", "--eval", "metrics/eval", "--conversions", "metrics/convert_onnx.json",
                        "--summary", "metrics/summary.json", "--accuracy-plot", "plots/accuracy.json",
                        "--per-class-plot", "p.json", "--layer-error", "metrics/layer_error",
                        "--layer-error-plots", "lep", "--predictions", "data/predictions",
                        "--flips-plots", "flips", "--report", "r.md", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "the labels of 'ort_int8' (2, 10000) and of its parent 'onnx' (10000,) do not match its metrics "
        "(3, 10000); re-run its evaluation"), result.stderr
    for name in ("metrics/summary.json", "plots/accuracy.json", "p.json", "lep", "flips", "r.md"):
        assert not (tmp_path / name).exists(), name


def test_a_missing_parent_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    directory = tmp_path / "metrics" / "eval"
    directory.mkdir(parents=True)
    (directory / "ort_int8.json").write_text(json.dumps(eval_metrics("ort_int8", 8700, "onnx", 8719)))
    result = run_module("stages.report", "--eval", "metrics/eval", "--summary", "s.json", "--accuracy-plot", "a.json",
                        "--per-class-plot", "p.json", "--layer-error", "le", "--layer-error-plots", "lep",
                        "--predictions", "data/predictions", "--flips-plots", "flips",
                        "--report", "r.md", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "names parent 'onnx', whose metrics are missing" in result.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("header", [r"\| variant \| parent \|", r"\| variant \| seed "])
def test_readme_tables_are_the_generated_ones(header):
    """The README's results and per-seed tables are copied from the pipeline's report, never typed."""
    readme = (REPO / "README.md").read_text()
    report = (REPO / "reports/quantization.md").read_text()
    generated = re.search(header + r".*?\n(?:\|.*\n)+", report).group(0)
    assert generated in readme
