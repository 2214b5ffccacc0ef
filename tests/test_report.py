"""The report stage: its summary and tables restate exactly the metrics it reads, and it writes
one well-formed plot file per variant. No framework is needed: it reads JSON only."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stages.lib.cifar10 import CLASSES
from tests.conftest import REPO, run_module


def eval_metrics(variant: str, correct: int, parent: str | None = None, parent_correct: int = 0,
                 size: int = 1000, execution: str | None = None) -> dict:
    per_class = {c: round((correct + i) / 10000, 6) for i, c in enumerate(CLASSES)}
    result = {"variant": variant, "accuracy": correct / 10000, "correct": correct, "total": 10000,
              "model_bytes": size, "per_class_accuracy": per_class,
              "confusion_matrix": {"labels": list(CLASSES), "rows_actual_cols_predicted": [[0] * 10] * 10}}
    if parent:
        result.update({"parent": parent, "execution": execution, "delta_points": round((correct - parent_correct) / 100, 4),
                       "argmax_agreement_with_parent": 0.98, "size_ratio_to_parent": round(size / 4000, 4)})
    return result


@pytest.fixture
def reported(tmp_path: Path) -> Path:
    directory = tmp_path / "metrics" / "eval"
    directory.mkdir(parents=True)
    variants = [eval_metrics("onnx", 8719, size=4000), eval_metrics("torch", 8719, size=4000),
                eval_metrics("ort_int8", 8735, "onnx", 8719, 1400, "integer-kernels"),
                eval_metrics("torch_uint8", 8690, "torch", 8719, 1300, "integer-kernels")]
    for v in variants:
        (directory / f"{v['variant']}.json").write_text(json.dumps(v))
    errors = tmp_path / "metrics" / "layer_error"
    errors.mkdir()
    for name, sqnr in (("ort_int8", [41.0, 30.5]), ("torch_uint8", [35.25, 22.0])):
        layers = [{"layer": f"conv{i}", "sqnr_db": value} for i, value in enumerate(sqnr)]
        (errors / f"{name}.json").write_text(json.dumps({"variant": name, "images": 256, "layers": layers}))
    run_module("stages.report", "--eval", "metrics/eval", "--summary", "metrics/summary.json",
               "--accuracy-plot", "plots/accuracy.json", "--per-class-plots", "plots/per_class",
               "--layer-error", "metrics/layer_error", "--layer-error-plots", "plots/layer_error",
               "--report", "reports/quantization.md", cwd=tmp_path)
    return tmp_path


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
    assert list(summary) == ["onnx", "torch", "ort_int8", "torch_uint8"]
    assert summary["ort_int8"] == {"accuracy": 0.8735, "correct": 8735, "delta_points": 0.16,
                                   "agreement_with_float": 0.98, "model_bytes": 1400, "size_ratio": 0.35,
                                   "execution": "integer-kernels"}
    assert summary["torch_uint8"]["delta_points"] == -0.29
    assert summary["onnx"]["execution"] == "float" and summary["onnx"]["delta_points"] == 0.0


def test_markdown_tables_match_the_metrics(reported):
    markdown = (reported / "reports/quantization.md").read_text()
    rows = {r[0]: r for r in table_rows(markdown, "| variant |")}
    assert rows["ort_int8"][1:6] == ["onnx", "integer-kernels", "0.8735", "+0.16", "0.9800"]
    assert rows["torch_uint8"][4] == "-0.29"
    per_class = {r[0]: r for r in table_rows(markdown, "| class |")}
    assert list(per_class) == list(CLASSES)
    # ort_int8 per class: (8735 + i) vs parent (8719 + i) -> +0.16 points -> "+0.2"
    assert per_class["cat"][2] == "+0.2" and per_class["cat"][3] == "-0.3"


def test_plot_files_are_well_formed_one_per_variant(reported):
    accuracy = json.loads((reported / "plots/accuracy.json").read_text())
    assert [row["variant"] for row in accuracy] == ["onnx", "torch", "ort_int8", "torch_uint8"]
    assert all(row["float_baseline"] == 0.8719 for row in accuracy)
    assert [row["points_vs_float_baseline"] for row in accuracy] == [0.0, 0.0, 0.16, -0.29]
    files = sorted(p.name for p in (reported / "plots/per_class").iterdir())
    assert files == ["onnx.json", "ort_int8.json", "torch.json", "torch_uint8.json"]
    rows = json.loads((reported / "plots/per_class/ort_int8.json").read_text())
    assert [r["class"] for r in rows] == list(CLASSES)
    assert rows[3]["accuracy"] == pytest.approx((8735 + 3) / 10000)


def test_layer_error_tables_and_plots_match_the_files(reported):
    markdown = (reported / "reports/quantization.md").read_text()
    ort = table_rows(markdown[markdown.index("### ort"):], "| layer |")
    assert ort == [["`conv0`", "41.0"], ["`conv1`", "30.5"]]
    torch = table_rows(markdown[markdown.index("### torch"):], "| layer |")
    assert torch == [["`conv0`", "35.2"], ["`conv1`", "22.0"]]
    files = sorted(p.name for p in (reported / "plots/layer_error").iterdir())
    assert files == ["ort_int8.json", "torch_uint8.json"]
    assert json.loads((reported / "plots/layer_error/torch_uint8.json").read_text())[1] == {"layer": "conv1", "sqnr_db": 22.0}


def test_a_missing_parent_is_a_clear_error(tmp_path):
    directory = tmp_path / "metrics" / "eval"
    directory.mkdir(parents=True)
    (directory / "ort_int8.json").write_text(json.dumps(eval_metrics("ort_int8", 8700, "onnx", 8719)))
    result = run_module("stages.report", "--eval", "metrics/eval", "--summary", "s.json", "--accuracy-plot", "a.json",
                        "--per-class-plots", "p", "--layer-error", "le", "--layer-error-plots", "lep",
                        "--report", "r.md", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "names parent 'onnx', whose metrics are missing" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_readme_results_table_is_the_generated_one():
    """The README's results table is copied from the pipeline's report, never typed."""
    readme = (REPO / "README.md").read_text()
    report = (REPO / "reports/quantization.md").read_text()
    generated = re.search(r"\| variant \|.*?\n(?:\|.*\n)+", report).group(0)
    assert generated in readme
