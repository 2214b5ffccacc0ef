"""The framework stages on a tiny randomly initialised ResNet8 and random CIFAR-shaped images.

Every stage runs as its own process (as under DVC), so TensorFlow and torch never share one.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, THREAD_SETTINGS, in_parallel, run_module, run_script, stage_env

DTYPES = ("int8", "uint8")
QUANTIZED = [f"{backend}_{dtype}" for backend in ("ort", "torch") for dtype in DTYPES]
PARENT = {"ort": "onnx", "torch": "torch"}
MODEL_FILE = {"ort_int8": "model.onnx", "ort_uint8": "model.onnx", "torch_int8": "model.pte", "torch_uint8": "model.pt2"}
KIND = {"ort": "onnx", "torch": "torch_quantized"}  # how evaluate is told to run each backend's output
RANGES = "models/activation_ranges"
SEEDS = [0, 1]  # two calibration draws: every per-seed path is exercised
FLOAT_MODEL = {"keras": "models/keras/pretrainedResnet.h5", "onnx": "models/onnx/resnet8.onnx",
               "torch": "models/torch/resnet8.pt2"}


def quantize_args(backend: str, dtype: str) -> list[str]:
    return ["--dtype", dtype, "--model", f"models/adaround/{dtype}", "--calibration", "data/calibration",
            "--ranges", RANGES, "--out", f"models/{backend}_{dtype}"]


def layer_error_args(variant: str, folded: str = "models/onnx_folded/resnet8.onnx") -> list[str]:
    dtype = variant.split("_")[1]
    return ["--variant", variant, "--float-model", folded, "--quantized", f"models/{variant}",
            "--adaround", f"models/adaround/{dtype}", "--ranges", RANGES, "--data", "data/cifar10",
            "--out", f"metrics/layer_error/{variant}.json"]


def evaluated_model(variant: str, seed: int | str = "{seed}") -> str:
    """What evaluate's --model names: each seed's ONNX file, or quantize_torch directory."""
    return f"models/{variant}/seed_{seed}/model.onnx" if variant.startswith("ort") else f"models/{variant}/seed_{seed}"


def seed_artifact(variant: str, seed: int) -> str:
    return f"models/{variant}/seed_{seed}/{MODEL_FILE[variant]}"


def evaluate_args(variant: str, kind: str, model: str, parent: str | None = None) -> list[str]:
    args = ["--variant", variant, "--kind", kind, "--model", model, "--data", "data/cifar10",
            "--metrics", f"metrics/eval/{variant}.json", "--predictions", f"data/predictions/{variant}.npy",
            "--confusion", f"plots/confusion/{variant}.csv"]
    if parent:
        args += ["--parent", parent, "--parent-metrics", f"metrics/eval/{parent}.json",
                 "--parent-predictions", f"data/predictions/{parent}.npy"]
    return args


def quantized_evaluate_args(variant: str) -> list[str]:
    backend = variant.split("_")[0]
    return evaluate_args(variant, KIND[backend], evaluated_model(variant), PARENT[backend])


def evaluate(project: Path, variant: str, kind: str, model: str, parent: str | None = None, check: bool = True):
    return run_module("stages.evaluate", *evaluate_args(variant, kind, model, parent), cwd=project, check=check)


def quantize_chain(stage, folded: str = "models/onnx_folded/resnet8.onnx") -> None:
    """AdaRound (one stage for both dtypes), then the four quantizers in parallel; `stage(module,
    *args)` runs one stage in the project."""
    stage("stages.adaround", "--model", folded, "--calibration", "data/calibration", "--ranges", RANGES,
          "--out", "models/adaround", "--metrics", "metrics/adaround.json")
    in_parallel(*(partial(stage, f"stages.quantize_{variant.split('_')[0]}", *quantize_args(*variant.split("_")))
                  for variant in QUANTIZED))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Runs every framework stage once on the tiny model; the tests read what it left."""
    project = tmp_path_factory.mktemp("tiny")
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # AdaRound's cost is per image and per step, and the AVX2 test runs two draws of it emulated: each
    # step cost about 6 s there, each image about 7.5 s (the float64 gemms under QEMU), before the
    # emulator got tests/qemu_host_fma.c (the emulated stage: 289 s before, 120 s with it)
    params["calibrate"]["samples"], params["adaround"]["iterations"], params["adaround"]["images"] = 100, 10, 12
    params["calibrate"]["seeds"], params["calibrate"]["validation"] = SEEDS, 50
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_script("tiny_models", FLOAT_MODEL["keras"], "data/cifar10", cwd=project)
    stage = partial(run_module, cwd=project)
    # in waves: each wave's stages need only what earlier waves wrote
    stage("stages.convert_onnx", "--keras", FLOAT_MODEL["keras"], "--data", "data/cifar10",
          "--out", FLOAT_MODEL["onnx"], "--metrics", "metrics/convert_onnx.json")
    in_parallel(partial(stage, "stages.convert_torch", "--onnx", FLOAT_MODEL["onnx"], "--data", "data/cifar10",
                        "--out", FLOAT_MODEL["torch"], "--metrics", "metrics/convert_torch.json"),
                partial(stage, "stages.fold_batchnorm", "--onnx", FLOAT_MODEL["onnx"], "--data", "data/cifar10",
                        "--out", "models/onnx_folded/resnet8.onnx", "--metrics", "metrics/fold_batchnorm.json"),
                partial(stage, "stages.calibrate", "--data", "data/cifar10", "--out", "data/calibration"),
                partial(evaluate, project, "keras", "keras", FLOAT_MODEL["keras"]),
                partial(evaluate, project, "onnx", "onnx", FLOAT_MODEL["onnx"]))
    in_parallel(partial(stage, "stages.activation_ranges", "--model", "models/onnx_folded/resnet8.onnx",
                        "--calibration", "data/calibration", "--out", RANGES),
                partial(evaluate, project, "torch", "torch", FLOAT_MODEL["torch"]))
    quantize_chain(stage)
    in_parallel(*(partial(stage, "stages.evaluate", *quantized_evaluate_args(variant)) for variant in QUANTIZED),
                *(partial(stage, "stages.layer_error", *layer_error_args(variant)) for variant in QUANTIZED))
    return project


def read(project: Path, name: str) -> dict:
    return json.loads((project / name).read_text())


def project_from(tiny: Path, project: Path, inputs: list[str], seeds: list[int]) -> Path:
    """A new project holding `inputs` copied from the tiny run, and its params.yaml with `seeds`."""
    import yaml

    project.mkdir(parents=True, exist_ok=True)
    for name in inputs:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (tiny / name).is_dir() else shutil.copy)(tiny / name, project / name)
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["calibrate"]["seeds"] = seeds
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_probe(code: str, cwd: Path):
    """`code` run by a fresh Python in `cwd`, in the environment the stages get; its CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=stage_env())


def test_convert_onnx_records_a_checked_dynamic_batch_interface(tiny):
    report = read(tiny, "metrics/convert_onnx.json")
    assert report["checker"] == "passed"
    assert report["opset"] == 13
    assert isinstance(report["input"]["shape"][0], str) and report["input"]["shape"][1:] == [32, 32, 3]
    assert report["output"]["shape"][1:] == [10]
    assert report["vs_keras"]["argmax_agreement"] == 1.0
    assert 0 < report["vs_keras"]["max_abs_diff_below"] <= 1e-4
    assert report["vs_keras"]["images"] == 48


@pytest.mark.parametrize("hash_seed", ["3", "11"])
def test_convert_onnx_writes_the_same_bytes_whatever_the_hash_seed(tiny, hash_seed, tmp_path):
    """With tf2onnx 1.17.0, hash seed 3 leaves Flatten's target shape as a Shape -> Slice -> Concat
    chain (FX quantization cannot trace it); convert_onnx must fold it to the same constant."""
    import onnx

    out = tmp_path / "again.onnx"
    run_module("stages.convert_onnx", "--keras", tiny / FLOAT_MODEL["keras"], "--data", tiny / "data/cifar10",
               "--out", out, "--metrics", tmp_path / "again.json", cwd=tiny, PYTHONHASHSEED=hash_seed)
    graph = onnx.load(str(out)).graph
    constants = {t.name for t in graph.initializer}
    assert all(n.input[1] in constants for n in graph.node if n.op_type == "Reshape")
    assert not {"Shape", "Concat", "Slice", "Gather"} & {n.op_type for n in graph.node}
    assert out.read_bytes() == (tiny / FLOAT_MODEL["onnx"]).read_bytes()


def test_convert_torch_matches_onnx_and_reloads_identically_in_fresh_processes(tiny):
    report = read(tiny, "metrics/convert_torch.json")
    assert report["vs_onnx"]["argmax_agreement"] == 1.0 and report["vs_onnx"]["max_abs_diff_below"] <= 1e-4
    first = json.loads(run_script("inspect_model", "torch", FLOAT_MODEL["torch"], cwd=tiny).stdout)
    second = json.loads(run_script("inspect_model", "torch", FLOAT_MODEL["torch"], cwd=tiny).stdout)
    assert first["scores"] == second["scores"]
    assert first["execution"]["label"] == "float" and first["int8_weights"] == 0
    # no ONNX file, no onnx2torch is needed to load it
    shutil.copy(tiny / FLOAT_MODEL["torch"], tiny / "alone.pt2")
    alone = json.loads(run_script("inspect_model", "torch", "alone.pt2", cwd=tiny).stdout)
    assert alone["scores"] == first["scores"]


def test_onnx2torch_converts_without_torchvision_and_names_an_op_it_left_out(tiny):
    """torch_models.from_onnx loads onnx2torch without its two torchvision converters: the model
    converts with torchvision never imported, and a graph with NonMaxSuppression fails naming it."""
    probe = ("import sys, onnx\n"
             "from onnx import TensorProto, helper\n"
             "from stages.lib.torch_models import from_onnx, _onnx2torch_convert\n"
             "model = from_onnx('models/onnx_folded/resnet8.onnx')\n"
             "print(sum(1 for _ in model.modules()), 'torchvision' in sys.modules)\n"
             "node = helper.make_node('NonMaxSuppression', ['b', 's'], ['o'])\n"
             "graph = helper.make_graph([node], 'g', [helper.make_tensor_value_info('b', TensorProto.FLOAT, [1, 4, 4]),"
             " helper.make_tensor_value_info('s', TensorProto.FLOAT, [1, 1, 4])],"
             " [helper.make_tensor_value_info('o', TensorProto.INT64, None)])\n"
             "_onnx2torch_convert()(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)]))\n")
    result = run_probe(probe, tiny)
    printed = result.stdout.split()
    assert len(printed) == 2, result.stdout + result.stderr  # the model converted
    modules, torchvision = printed
    assert int(modules) > 10 and torchvision == "False", result.stdout
    assert result.returncode != 0 and "Converter is not implemented" in result.stderr
    assert "NonMaxSuppression" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("model", [FLOAT_MODEL["torch"], "models/torch_int8/seed_0/model.pte", "models/torch_uint8/seed_1/model.pt2"])
def test_saved_torch_programs_hold_nothing_from_this_checkout(tiny, model):
    """Same model, same bytes in every clone: no source locations (absolute virtualenv paths), no
    example images."""
    import sys
    import zipfile

    data = (tiny / model).read_bytes()
    if model.endswith(".pt2"):
        with zipfile.ZipFile(tiny / model) as archive:
            names = archive.namelist()
            assert names and all(archive.getinfo(n).file_size == 0 for n in names if "sample_inputs" in n)
            data = b"".join(archive.read(n) for n in names)
    for path in {sys.prefix, str(REPO), str(tiny), "site-packages", "stages/", ".py"}:
        assert path.encode() not in data, path


def test_float_variants_write_metrics_confusion_and_predictions(tiny):
    labels = {}
    for variant in FLOAT_MODEL:
        metrics = read(tiny, f"metrics/eval/{variant}.json")
        assert metrics["total"] == 48 and 0 <= metrics["correct"] <= 48
        assert metrics["accuracy"] == pytest.approx(metrics["correct"] / 48, abs=1e-6)
        assert list(metrics["per_class_accuracy"]) == ["airplane", "automobile", "bird", "cat", "deer",
                                                       "dog", "frog", "horse", "ship", "truck"]
        confusion = np.array(metrics["confusion_matrix"]["rows_actual_cols_predicted"])
        assert confusion.shape == (10, 10) and confusion.sum() == 48 and np.trace(confusion) == metrics["correct"]
        lines = (tiny / f"plots/confusion/{variant}.csv").read_text().splitlines()
        assert lines[0] == "actual,predicted" and len(lines) == 49
        labels[variant] = np.load(tiny / f"data/predictions/{variant}.npy")
        assert labels[variant].dtype == np.int64 and labels[variant].shape == (48,)  # labels, not scores
        assert (labels[variant] == confusion_predictions(tiny, variant)).all()
    assert (labels["keras"] == labels["onnx"]).all() and (labels["onnx"] == labels["torch"]).all()


def confusion_predictions(project: Path, variant: str) -> np.ndarray:
    from stages.lib.cifar10 import CLASSES

    rows = (project / f"plots/confusion/{variant}.csv").read_text().splitlines()[1:]
    return np.array([CLASSES.index(row.split(",")[1]) for row in rows])


def test_folded_graph_has_no_batchnorm_arithmetic_left(tiny):
    report = read(tiny, "metrics/fold_batchnorm.json")
    assert report["ops"]["Conv"] == 9 and report["ops"]["Gemm"] == 1
    assert "Mul" not in report["ops"] and "MatMul" not in report["ops"]


def test_the_fold_loads_onnxruntimes_shape_inference_without_torch(tiny, tmp_path):
    """fold_batchnorm keeps torch out of its process (onnxruntime.tools would import it), folds to
    the same bytes as the stage did, and the stand-in it leaves for the helper it skipped says so
    when called."""
    probe = ("import sys\n"
             "from pathlib import Path\n"
             "from stages.fold_batchnorm import fold\n"
             f"fold(Path('models/onnx/resnet8.onnx'), Path({str(tmp_path / 'folded.onnx')!r}))\n"
             "print('torch' in sys.modules)\n"
             "import onnxruntime.tools\n"
             "onnxruntime.tools.infer_input_info()\n")
    result = run_probe(probe, tiny)
    assert result.stdout.split() == ["False"], result.stdout + result.stderr
    assert (tmp_path / "folded.onnx").read_bytes() == (tiny / "models/onnx_folded/resnet8.onnx").read_bytes()
    assert result.returncode != 0
    assert "pytorch_export_helpers was not loaded" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("variant", QUANTIZED)
def test_quantized_variant_is_really_quantized(tiny, variant):
    """Integer weights, integer kernels in what runs, and outputs that differ from float."""
    backend, dtype = variant.split("_")
    model = tiny / seed_artifact(variant, 0)
    summary = json.loads(run_script("inspect_model", KIND[backend], evaluated_model(variant, 0), cwd=tiny).stdout)
    if backend == "ort":
        assert summary["float_layers"] == []
        assert summary["quantized_layers"] == 10
        assert summary["weight_dtypes"] == [dtype]
        assert summary["quantize_nodes"] >= 1 and summary["dequantize_nodes"] >= 1
    else:
        assert summary["int8_weights"] == 10
        assert summary["execution"]["float_layers"] == [] and summary["execution"]["label"] == "integer"
        assert read(tiny, f"models/{variant}/seed_0/info.json")["weights_on_adaround_grid"] == 10
    parent_file = tiny / FLOAT_MODEL[PARENT[backend]]
    assert model.stat().st_size <= (0.4 if backend == "ort" else 0.6) * parent_file.stat().st_size
    parent = json.loads(run_script("inspect_model", "onnx" if backend == "ort" else "torch",
                                   FLOAT_MODEL[PARENT[backend]], cwd=tiny).stdout)["scores"]
    assert np.abs(np.array(parent) - np.array(summary["scores"])).max() > 1e-6, "quantized outputs equal float outputs"


@pytest.mark.parametrize("variant", QUANTIZED)
def test_quantized_metrics_are_computed_against_the_parent_for_every_seed(tiny, variant):
    from stages.lib import stats

    backend, dtype = variant.split("_")
    metrics, parent = read(tiny, f"metrics/eval/{variant}.json"), read(tiny, f"metrics/eval/{PARENT[backend]}.json")
    assert metrics["parent"] == PARENT[backend] and metrics["seeds"] == SEEDS
    assert metrics["settings"] is not None
    predicted = np.load(tiny / f"data/predictions/{variant}.npy")
    parent_labels = np.load(tiny / f"data/predictions/{PARENT[backend]}.npy")
    labels = np.load(tiny / "data/cifar10/test_labels.npy")
    assert predicted.shape == (len(SEEDS), len(labels))
    for row, seed in zip(predicted, SEEDS):
        one = metrics["per_seed"][str(seed)]
        assert one["accuracy"] == pytest.approx((row == labels).mean(), abs=1e-6)
        assert one["delta_points"] == pytest.approx(100 * (one["accuracy"] - parent["accuracy"]), abs=1e-3)
        assert one["argmax_agreement_with_parent"] == pytest.approx((row == parent_labels).mean(), abs=1e-6)
        assert one["mcnemar_p"] == pytest.approx(stats.mcnemar_p(parent_labels == labels, row == labels), abs=1e-6)
        assert one["model_bytes"] == (tiny / seed_artifact(variant, seed)).stat().st_size
        assert read(tiny, f"models/{variant}/seed_{seed}/info.json")["seed"] == seed
    accuracies = [metrics["per_seed"][str(s)]["accuracy"] for s in SEEDS]
    assert metrics["accuracy"]["mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert metrics["accuracy"]["min"] == min(accuracies)
    low, high = metrics["delta_points"]["ci95_low"], metrics["delta_points"]["ci95_high"]
    assert low <= metrics["delta_points"]["mean"] <= high
    assert metrics["loss_distinguishable_from_zero"] == (high < 0 or low > 0)



def test_a_float_torch_model_fails_the_quantization_proof(tiny):
    from stages.lib.errors import PipelineError
    from stages.lib.quant_checks import require_integer_execution

    summary = json.loads(run_script("inspect_model", "torch", FLOAT_MODEL["torch"], cwd=tiny).stdout)
    assert summary["int8_weights"] == 0
    layers = summary["execution"]["layers"]  # the unfolded graph: BatchNorm as Mul + Add, so more Adds than 3
    assert layers["Conv"] == "0/9 integer" and layers["Gemm"] == "0/1 integer" and layers["Add"].startswith("0/")
    with pytest.raises(PipelineError, match="0 of 10 Conv/Dense layers run on integer kernels"):
        require_integer_execution("torch", summary["execution"], 10)


def test_a_float_onnx_model_fails_the_quantization_proof(tiny):
    summary = json.loads(run_script("inspect_model", "onnx", "models/onnx_folded/resnet8.onnx", cwd=tiny).stdout)
    assert summary["quantized_layers"] == 0 and len(summary["float_layers"]) == 10


def test_convert_onnx_refuses_a_file_that_is_not_a_keras_model(tiny):
    (tiny / "broken.h5").write_bytes(b"not an HDF5 file")
    result = run_module("stages.convert_onnx", "--keras", "broken.h5", "--data", "data/cifar10",
                        "--out", "models/broken.onnx", "--metrics", "metrics/broken.json", cwd=tiny, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: broken.h5: not a loadable Keras model")
    assert not (tiny / "models/broken.onnx").exists() and not (tiny / "metrics/broken.json").exists()
    assert not list((tiny / "models").glob(".broken.onnx.*"))


def test_evaluate_refuses_a_missing_model(tiny):
    result = evaluate(tiny, "ghost", "onnx", "models/ghost.onnx", check=False)
    assert result.returncode == 1
    assert "models/ghost.onnx: model file not found" in result.stderr
    assert not (tiny / "metrics/eval/ghost.json").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaround_weights_land_exactly_on_the_onnxruntime_integer_grid(tiny, dtype):
    report = read(tiny, "metrics/adaround.json")
    assert report["enabled"] and sorted(report["dtypes"]) == sorted(DTYPES)
    seeds = report["dtypes"][dtype]["seeds"]
    assert sorted(seeds) == [str(s) for s in SEEDS]
    for seed in SEEDS:
        one = seeds[str(seed)]
        assert one["weights"] > 0 and 0 < one["rounded_away_from_nearest"] < one["weights"]
        check = json.loads(run_script("check_grid", f"models/adaround/{dtype}/seed_{seed}.onnx",
                                      f"models/ort_{dtype}/seed_{seed}/model.onnx", cwd=tiny).stdout)
        assert check["layers"] == 10
        assert check["max_offgrid_steps"] < 1e-3  # the quantizer stored exactly AdaRound's integers
    # each seed learns from its own draw: the roundings differ
    first, second = (tiny / f"models/adaround/{dtype}/seed_{s}.onnx" for s in SEEDS)
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.parametrize("variant", QUANTIZED)
def test_per_layer_error_covers_every_quantized_layer(tiny, variant):
    report = read(tiny, f"metrics/layer_error/{variant}.json")
    assert report["variant"] == variant and report["images"] == 48 and report["seed"] == SEEDS[0]
    import onnx

    sqnr = [row["sqnr_db"] for row in report["layers"]]
    nodes = {n.name for n in onnx.load(str(tiny / "models/onnx_folded/resnet8.onnx")).graph.node}
    # one row per quantized activation; the x86 quantizer fuses each residual Add into the Conv before
    # it and keeps the Dense output in float, so those layers show in the Add's and the pool's rows
    assert len(sqnr) >= 10 and {row["node"] for row in report["layers"]} <= nodes, report["layers"]
    assert all(5 < value < 120 for value in sqnr), sqnr  # quantized, so finite noise; not garbage


# --------------------------------------------------------------------------- same bytes on any machine

QUANTIZE_ARTIFACTS = [*(f"{RANGES}/seed_{s}.json" for s in SEEDS),
                      *(f"models/adaround/{d}/seed_{s}.onnx" for d in DTYPES for s in SEEDS),
                      *(seed_artifact(v, s) for v in QUANTIZED for s in SEEDS)]
MODEL_ARTIFACTS = ["models/onnx/resnet8.onnx", FLOAT_MODEL["torch"], "models/onnx_folded/resnet8.onnx",
                   *QUANTIZE_ARTIFACTS]
# What can be switched on one machine: thread counts, and the kernels torch, oneDNN and TensorFlow
# pick for the CPU (ONNX Runtime's MLAS has no such switch); and the seed workers (lib/seed_pool.py):
# the fixture builds each seed (and each of AdaRound's (dtype, seed) draws) in a worker of one thread,
# so a one-seed build with a thread count given (no workers: this process, two threads) compares two
# threads with one.
SWITCHES = {
    "one thread, portable kernels": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                      "ATEN_CPU_CAPABILITY": "default", "TF_ENABLE_ONEDNN_OPTS": "0"}, SEEDS),
    "AVX2 kernels, one seed on two threads": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                               "RESNET8_PARALLEL_STAGES": "1", "OMP_NUM_THREADS": "2",
                                               "MKL_NUM_THREADS": "2"}, SEEDS[:1]),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_model_artifact_is_the_same_under_thread_and_isa_switches(tiny, switch, tmp_path):
    env, seeds = SWITCHES[switch]
    # each seed's models are built on their own, from its own draw
    project = project_from(tiny, tmp_path / "project", [FLOAT_MODEL["keras"], "data/cifar10"], seeds)
    stage = partial(run_module, cwd=project, **env)
    folded = "models/onnx_folded/resnet8.onnx"
    stage("stages.convert_onnx", "--keras", FLOAT_MODEL["keras"], "--data", "data/cifar10",
          "--out", FLOAT_MODEL["onnx"], "--metrics", "metrics/convert_onnx.json")
    in_parallel(partial(stage, "stages.convert_torch", "--onnx", FLOAT_MODEL["onnx"], "--data", "data/cifar10",
                        "--out", FLOAT_MODEL["torch"], "--metrics", "metrics/convert_torch.json"),
                partial(stage, "stages.fold_batchnorm", "--onnx", FLOAT_MODEL["onnx"], "--data", "data/cifar10",
                        "--out", folded, "--metrics", "metrics/fold_batchnorm.json"),
                partial(stage, "stages.calibrate", "--data", "data/cifar10", "--out", "data/calibration"))
    stage("stages.activation_ranges", "--model", folded, "--calibration", "data/calibration", "--out", RANGES)
    quantize_chain(stage, folded)
    built = [name for name in MODEL_ARTIFACTS if "seed_" not in name or any(f"seed_{s}" in name for s in seeds)]
    differ = [name for name in built if (project / name).read_bytes() != (tiny / name).read_bytes()]
    assert not differ, f"{switch} changed {differ}"
    for name in ("metrics/fold_batchnorm.json", "metrics/convert_onnx.json", "metrics/convert_torch.json"):
        assert read(project, name) == read(tiny, name), name
    for dtype in DTYPES:
        ours, fixture = (read(p, "metrics/adaround.json")["dtypes"][dtype]["seeds"] for p in (project, tiny))
        assert ours == {str(s): fixture[str(s)] for s in seeds}, dtype


def test_last_bit_noise_in_float_activations_changes_no_range_and_no_rounding(tiny):
    """The activations that ranges and AdaRound are computed from, perturbed by up to 4 float64
    ulps (what another CPU kind's kernels or another thread count can change): every range and
    every rounded weight and bias must come out the same."""
    result = json.loads(run_script("check_noise", "models/onnx_folded/resnet8.onnx", "data/calibration/seed_0", "200",
                                   cwd=tiny).stdout)
    assert result["tensors"] >= 20 and result["int8_layers"] == result["uint8_layers"] == 10
    assert result["ranges_moved_by_noise"] == 0.0 and result["ranges_identical"], result
    assert result["int8_identical"] and result["uint8_identical"], result


def test_convert_onnx_writes_the_exact_batchnorm_constants(tiny):
    result = json.loads(run_script("check_batchnorm", FLOAT_MODEL["keras"], FLOAT_MODEL["onnx"], cwd=tiny).stdout)
    assert result["batchnorms"] == 7 and result["exact"] == 7, result


def test_fold_mismatches_catches_a_weight_one_ulp_off(tiny):
    import onnx
    from onnx import numpy_helper

    from stages.lib.graph_surgery import fold_mismatches

    unfolded, folded = onnx.load(str(tiny / FLOAT_MODEL["onnx"])), onnx.load(str(tiny / "models/onnx_folded/resnet8.onnx"))
    assert fold_mismatches(unfolded, folded) == []
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    tensor = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = np.nextafter(values.flat[0], np.float32(np.inf))
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    assert fold_mismatches(unfolded, folded) == [conv.name]


# --------------------------------------------------------------------------- execution, measured

@pytest.mark.parametrize("variant", QUANTIZED + ["keras", "onnx", "torch"])
def test_execution_label_is_measured_from_the_graph_that_runs(tiny, variant):
    metrics = read(tiny, f"metrics/eval/{variant}.json")
    execution = metrics["execution"]
    expected = {"ort_int8": "integer", "ort_uint8": "integer", "torch_uint8": "integer", "torch_int8": "integer",
                "keras": "float", "onnx": "float", "torch": "float"}[variant]
    assert execution["label"] == expected, execution
    if expected == "integer":
        assert execution["layers"] == {"Conv": "9/9 integer", "Gemm": "1/1 integer", "Add": "3/3 integer"}
        assert execution["float_layers"] == []


def test_a_model_with_one_float_conv_is_reported_as_mixed(tiny):
    result = json.loads(run_script("measure_execution", "onnx-leave-one-float", "models/onnx_folded/resnet8.onnx",
                                   f"{RANGES}/seed_0.json", "partly.onnx", cwd=tiny).stdout)
    assert result["label"] == "mixed (1 of 13 in float)", result
    assert result["layers"]["Conv"] == "8/9 integer" and len(result["float_layers"]) == 1


# --------------------------------------------------------------------------- another CPU kind, emulated

# QEMU's user-mode emulator runs this machine's Python as an AVX2-only CPU (no AVX-512, no VNNI, no
# AMX): numpy, torch and ONNX Runtime detect the CPU with CPUID and pick their AVX2 kernels.
QEMU = shutil.which("qemu-x86_64")
AVX2_CPU = ["-cpu", "Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid"]


def emulator(build: Path) -> tuple[list[str], dict]:
    """The emulator's command up to the program, and what its own process adds to the environment:
    QEMU with tests/qemu_host_fma.c preloaded where the host has AVX and FMA and a C compiler is at
    hand (the emulated program computes the same; on the Intel Xeon measured, its float64 gemms ran
    5.5 times as fast), else QEMU alone. The emulated program does not inherit the preload."""
    import os
    import subprocess

    command, env = [QEMU], {}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    compiler = shutil.which("cc") or shutil.which("gcc")
    library = build / "qemu_host_fma.so"
    if {"avx", "fma"} <= set(flags) and compiler and subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(Path(__file__).with_name("qemu_host_fma.c"))],
            capture_output=True).returncode == 0:
        preload = os.environ.get("LD_PRELOAD")
        env["LD_PRELOAD"] = str(library) + (f":{preload}" if preload else "")
        command += ["-E", f"LD_PRELOAD={preload}"] if preload else ["-U", "LD_PRELOAD"]
    return [*command, *AVX2_CPU], env


ONE_THREAD = {name: "1" for name in THREAD_SETTINGS if name.endswith("_THREADS")}

# what the emulated stages load once, in the process they are forked from (tests/emulated_stages.py);
# not onnxruntime, which starts a thread when imported (1 s under QEMU)
EMULATED_PRELOAD = ["torch", "torchao.quantization.pt2e.quantize_pt2e", "executorch.exir",
                    "executorch.backends.xnnpack.partition.xnnpack_partitioner",
                    "executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "onnx", "onnx2torch"]


def run_on_avx2(stages: list[tuple[str, list, Path]], cwd: Path, emulated: tuple[list[str], dict],
                at_once: int) -> dict:
    """Run stages (module, arguments, project) on the emulated CPU (`emulated`: what `emulator`
    gives), `at_once` at a time in the order given, one thread each (two emulated stages at two
    threads each would be four threads on two cores, which the other test worker shares too; and a
    process that had started threads could not fork them, below), whatever thread counts pytest was
    started with. They are forked from one emulated process that loaded the frameworks once
    (tests/emulated_stages.py). Returns what CPU that process's numpy and torch detected."""
    import subprocess
    import sys

    command, host_env = emulated
    spec = cwd / "emulated_stages.json"
    logs = [project / "emulated_stage.log" for _, _, project in stages]
    spec.write_text(json.dumps({"at_once": at_once, "preload": EMULATED_PRELOAD, "stages": [
        {"module": module, "args": list(map(str, args)), "cwd": str(project), "log": str(log)}
        for (module, args, project), log in zip(stages, logs)]}))
    result = subprocess.run([*command, sys.executable, "-m", "tests.emulated_stages", str(spec)], cwd=cwd,
                            env=stage_env(**ONE_THREAD, **host_env),
                            capture_output=True, text=True, timeout=3600)
    lines = result.stdout.splitlines()
    failed = [f"{json.loads(line)['module']} on the emulated AVX2 CPU failed:\n{log.read_text()}"
              for line, log in zip(lines[1:], logs) if json.loads(line)["returncode"] != 0]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stdout + result.stderr
    return json.loads(lines[0])


def test_the_emulators_host_fma_is_libms_bit_for_bit(tmp_path):
    """tests/qemu_host_fma.c stands in for libm's fma() and fmaf() in QEMU's process: it must give
    libm's results, bit for bit, on ordinary, huge, tiny, subnormal, zero, infinite and NaN operands,
    and the emulated program must not load it."""
    import ctypes
    import ctypes.util
    import os
    import subprocess
    import sys

    command, env = emulator(tmp_path)
    if "LD_PRELOAD" not in env:
        pytest.skip("this host has no AVX and FMA, or no C compiler: the emulator runs without the stand-in")
    shim, libm = ctypes.CDLL(str(tmp_path / "qemu_host_fma.so")), ctypes.CDLL(ctypes.util.find_library("m"))
    rng = np.random.default_rng(0)
    for name, ctype, dtype, bits in (("fma", ctypes.c_double, np.float64, np.uint64),
                                     ("fmaf", ctypes.c_float, np.float32, np.uint32)):
        info, decades = np.finfo(dtype), (30 if dtype is np.float32 else 300)
        special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.tiny, info.tiny / 4, info.max, info.eps, 1.0],
                           dtype=dtype)
        triples = np.concatenate([rng.standard_normal((3000, 3)).astype(dtype),
                                  (rng.standard_normal((1000, 3))
                                   * 10.0 ** rng.integers(-decades, decades, (1000, 3))).astype(dtype),
                                  rng.choice(special, (1000, 3))])
        ours, theirs = getattr(shim, name), getattr(libm, name)
        for function in (ours, theirs):
            function.restype, function.argtypes = ctype, [ctype] * 3
        got = np.array([ours(*map(float, t)) for t in triples], dtype=dtype)
        want = np.array([theirs(*map(float, t)) for t in triples], dtype=dtype)
        assert (got.view(bits) == want.view(bits)).all(), name
    if QEMU is not None:
        seen = subprocess.run([*command, sys.executable, "-c", "import os; print(os.environ.get('LD_PRELOAD', ''))"],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert seen.returncode == 0 and "qemu_host_fma" not in seen.stdout, seen.stdout + seen.stderr


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user; .ci/run does)")
def test_the_quantize_chain_gives_the_same_bytes_and_labels_on_an_avx2_cpu(tiny, tmp_path):
    """Each stage of the chain, from fold_batchnorm to the quantized evaluations, runs on the emulated
    CPU in a project of its own that holds only its inputs, taken from the native run (`tiny`), and
    must write what the native run wrote. Given the same inputs each stage gives the same bytes, so
    the chain run end to end on the emulated CPU would too; and the stages need not wait for each
    other (emulation is slow: they run two at a time, one thread each, the longest first)."""
    import os

    folded, calibration = "models/onnx_folded/resnet8.onnx", "data/calibration"

    def quantizer(variant: str) -> tuple:
        backend, dtype = variant.split("_")
        return (f"stages.quantize_{backend}", quantize_args(backend, dtype),
                [f"models/adaround/{dtype}", calibration, RANGES], [seed_artifact(variant, 0)])

    def evaluation(variant: str) -> tuple:
        parent = PARENT[variant.split("_")[0]]
        return ("stages.evaluate", quantized_evaluate_args(variant),
                [f"models/{variant}/seed_0", "data/cifar10", f"metrics/eval/{parent}.json",
                 f"data/predictions/{parent}.npy"],
                [f"data/predictions/{variant}.npy", f"metrics/eval/{variant}.json"])

    # (stage, its arguments, the native run's files it reads, what it writes), the longest first
    chain = [quantizer("torch_int8"),
             ("stages.adaround", ["--model", folded, "--calibration", calibration, "--ranges", RANGES,
                                  "--out", "models/adaround", "--metrics", "metrics/adaround.json"],
              [folded, calibration, RANGES], [f"models/adaround/{d}/seed_0.onnx" for d in DTYPES]),
             quantizer("torch_uint8"),
             ("stages.activation_ranges", ["--model", folded, "--calibration", calibration, "--out", RANGES],
              [folded, calibration], [f"{RANGES}/seed_0.json"]),
             evaluation("torch_uint8"), evaluation("torch_int8"),
             ("stages.fold_batchnorm", ["--onnx", FLOAT_MODEL["onnx"], "--data", "data/cifar10", "--out", folded,
                                        "--metrics", "metrics/fold_batchnorm.json"],
              [FLOAT_MODEL["onnx"], "data/cifar10"], [folded]),
             evaluation("ort_int8"), quantizer("ort_int8"), quantizer("ort_uint8"), evaluation("ort_uint8")]

    # the first seed only: each seed's models are built on their own, so seed 0's must come out the
    # same as in the two-seed run
    projects = [project_from(tiny, tmp_path / f"stage_{index}", inputs, SEEDS[:1])
                for index, (_, _, inputs, _) in enumerate(chain)]
    at_once = len(os.sched_getaffinity(0))  # each emulated process on one host core
    seen = run_on_avx2([(module, args, project) for (module, args, _, _), project in zip(chain, projects)],
                       tmp_path, emulator(tmp_path), at_once)
    assert seen == {"numpy_avx512f": False, "torch_capability": "AVX2"}, seen  # really another CPU kind
    differ = [name for (module, _, _, outputs), project in zip(chain, projects) for name in outputs
              if module != "stages.evaluate" and (project / name).read_bytes() != (tiny / name).read_bytes()]
    assert not differ, f"on the AVX2 CPU these differ: {differ}"
    for (module, args, _, _), project in zip(chain, projects):
        if module == "stages.evaluate":  # the integer kernels answer the same on both
            variant = args[args.index("--variant") + 1]
            assert (np.load(project / f"data/predictions/{variant}.npy")[0]
                    == np.load(tiny / f"data/predictions/{variant}.npy")[0]).all(), variant
            assert (read(project, f"metrics/eval/{variant}.json")["execution"]
                    == read(tiny, f"metrics/eval/{variant}.json")["execution"]), variant


@pytest.mark.parametrize("dtype", DTYPES)
def test_onnxruntime_models_hold_the_calibrated_ranges_and_a_foreign_range_is_refused(tiny, dtype):
    from stages.lib import ranges as ranges_lib
    from stages.lib.errors import PipelineError
    from stages.quantize_ort import require_calibrated_ranges

    model, ranges = tiny / f"models/ort_{dtype}/seed_1/model.onnx", ranges_lib.load(tiny / RANGES / "seed_1.json")
    assert read(tiny, f"models/ort_{dtype}/seed_1/info.json")["calibrated_quantizers_checked"] >= 10
    other = ranges_lib.load(tiny / RANGES / "seed_0.json")  # another draw's ranges are not this model's
    with pytest.raises(PipelineError, match="do not hold the calibrated range"):
        require_calibrated_ranges(model, other, dtype, symmetric=False)
    assert require_calibrated_ranges(model, ranges, dtype, symmetric=False) >= 10
    name = next(n for n, r in ranges.items() if r.high > 0 and n.endswith("Relu:0"))
    moved = {**ranges, name: ranges_lib.Range(ranges[name].low, ranges[name].high * 1.01)}
    with pytest.raises(PipelineError, match="do not hold the calibrated range"):
        require_calibrated_ranges(model, moved, dtype, symmetric=False)
    # a quantizer without a range of ours kept the one from quantize_static's own (one-image) pass
    missing = {other_name: r for other_name, r in ranges.items() if other_name != name}
    with pytest.raises(PipelineError, match="1 of .* do not hold the calibrated range"):
        require_calibrated_ranges(model, missing, dtype, symmetric=False)


def test_adaround_full_batch_gradient_equals_autograds(project):
    """adaround.batch = 0 learns from the gradient over all images, computed from each layer's Gram
    matrix; it must be the gradient autograd gives for the same loss."""
    errors = json.loads(run_script("check_gram", cwd=project).stdout)
    assert set(errors) == {"conv_stride2_pad_bias", "conv_no_bias", "linear"}
    assert all(error < 1e-12 for error in errors.values()), errors


@pytest.mark.parametrize("isa", ["", "AVX2"])
def test_the_integer_gram_is_exact_with_and_without_int8_kernels_that_saturate(tmp_path, isa):
    """AdaRound's Gram matrices of 8-bit codes (lib/integer_gram.py) on codes whose int8 products
    saturate 16-bit pair sums: exact with this CPU's oneDNN kernels and with its AVX2 ones (pair
    sums in 16 bits, which saturate: had the probe let such a block through, the sum would be off)."""
    env = {"ONEDNN_MAX_CPU_ISA": isa} if isa else {}
    result = json.loads(run_module("tests.check_integer_gram", cwd=tmp_path, **env).stdout)
    assert result["exact"], result


def test_xnnpack_pattern_passes_are_skipped_only_where_no_pattern_can_match(tmp_path):
    """to_executorch skips XNNPACK's upsampling and attention passes on a graph without the op
    every one of their patterns holds (torch_quant.PATTERN_PASS_OPS): checked on the installed
    ExecuTorch, whose patterns may change; a graph with the op still goes through the pass."""
    result = json.loads(run_script("check_pattern_passes", cwd=tmp_path).stdout)
    assert set(result["patterns_with_op"]) == {"ConvertToUpsampleBilinear2d", "ConvertToSDPAPass"}
    for name, (with_op, patterns) in result["patterns_with_op"].items():
        assert patterns > 0 and with_op == patterns, (name, with_op, patterns)
    assert result["calls"] == ["bmm"] and result["restored"], result
