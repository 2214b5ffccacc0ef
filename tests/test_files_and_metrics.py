"""stages/lib/files.py (atomic outputs, digests, JSON) and stages/lib/metrics.py on small
hand-made examples whose answers are worked out by hand."""
from __future__ import annotations

import csv
import hashlib
import os

import numpy as np
import pytest

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests import synthetic as syn
except ImportError:
    import synthetic as syn
from stages.lib import files, metrics
from stages.lib.cifar10 import CLASSES
from stages.lib.errors import PipelineError


class Boom(Exception):
    pass


# --------------------------------------------------------------------------- atomic_path, file mode

def test_atomic_file_success_renames_the_temporary_sibling(tmp_path):
    target = tmp_path / "out.txt"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
        assert not target.exists()  # nothing appears before the block succeeds
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert not tmp.exists()
    assert syn.listing(tmp_path) == ["out.txt"]


def test_atomic_file_replaces_an_existing_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with files.atomic_path(str(target)) as tmp:
        assert target.read_text() == "old"  # untouched while the block runs
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert syn.listing(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_file_failure_keeps_the_old_target_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(error):
        with files.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise error()
    assert target.read_text() == "old"
    assert syn.listing(tmp_path) == ["out.txt"]


def test_atomic_file_failure_without_old_target_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    with pytest.raises(Boom):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert not target.exists()
    assert syn.listing(tmp_path) == ["a", "a/b"]  # the parents are created, nothing else


def test_atomic_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "metrics.json"
    with files.atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- atomic_path, directory mode

def test_atomic_directory_success_replaces_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.npy").write_bytes(b"stale")
    with files.atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path
        assert (target / "stale.npy").exists()  # still there while the block runs
        (tmp / "new.npy").write_bytes(b"new")
    assert syn.listing(tmp_path) == ["out", "out/new.npy"]
    assert (target / "new.npy").read_bytes() == b"new"


def test_atomic_directory_creates_a_new_directory(tmp_path):
    target = tmp_path / "data" / "calibration"
    with files.atomic_path(target, directory=True) as tmp:
        (tmp / "images.npy").write_bytes(b"x")
    assert syn.listing(tmp_path) == ["data", "data/calibration", "data/calibration/images.npy"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_directory_failure_keeps_the_old_directory(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.npy").write_bytes(b"old")
    with pytest.raises(error):
        with files.atomic_path(target, directory=True) as tmp:
            (tmp / "half.npy").write_bytes(b"half")
            raise error()
    assert syn.listing(tmp_path) == ["out", "out/old.npy"]
    assert (target / "old.npy").read_bytes() == b"old"


def test_atomic_directory_replaces_an_old_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file where a directory will be")
    with files.atomic_path(target, directory=True) as tmp:
        (tmp / "x").write_text("x")
    assert target.is_dir() and (target / "x").read_text() == "x"


def test_atomic_directory_replaces_a_symlink_without_touching_its_referent(tmp_path):
    referent = tmp_path / "cache"
    referent.mkdir()
    (referent / "keep.npy").write_bytes(b"cached")
    target = tmp_path / "out"
    target.symlink_to(referent, target_is_directory=True)
    with files.atomic_path(target, directory=True) as tmp:
        (tmp / "new.npy").write_bytes(b"new")
    assert not target.is_symlink() and (target / "new.npy").read_bytes() == b"new"
    assert (referent / "keep.npy").read_bytes() == b"cached"


# --------------------------------------------------------------------------- digests and JSON

def test_sha256_file_and_md5(tmp_path):
    data = os.urandom(3 << 20)  # more than one read block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert files.sha256_file(path, "md5") == hashlib.md5(data).hexdigest()
    assert files.sha256_file(path) != files.sha256_file(path, "md5")


def test_sha256_array_is_content_and_layout_independent():
    array = np.arange(24, dtype=np.int64).reshape(4, 6)
    view = array.T  # not C-contiguous
    assert files.sha256_array(view) == hashlib.sha256(np.ascontiguousarray(view).tobytes()).hexdigest()
    assert files.sha256_array(view) == files.sha256_array(view.copy())
    assert files.sha256_array(array) != files.sha256_array(view)
    assert files.sha256_array(array) != files.sha256_array(array.astype(np.int32))


def test_write_json_read_json_roundtrip(tmp_path):
    data = {"accuracy": 0.8719, "per_class": {"cat": None}, "list": [1, 2]}
    path = tmp_path / "metrics" / "eval.json"
    files.write_json(path, data)
    assert files.read_json(path) == data
    assert path.read_text().endswith("}\n")
    assert syn.listing(tmp_path) == ["metrics", "metrics/eval.json"]


def test_read_json_errors(tmp_path):
    with pytest.raises(PipelineError, match="file not found"):
        files.read_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PipelineError, match="not valid JSON") as info:
        files.read_json(bad)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- metrics.classification

def one_hot_scores(predicted, n_classes=10, low=0.01):
    scores = np.full((len(predicted), n_classes), low, dtype=np.float32)
    scores[np.arange(len(predicted)), predicted] = 0.9
    return scores


LABELS = np.array([0, 0, 1, 1, 2, 9, 9, 9], dtype=np.int64)
PREDICTED = np.array([0, 1, 1, 1, 0, 9, 9, 3], dtype=np.int64)  # 5 of 8 right


def test_classification_counts():
    result = metrics.classification(one_hot_scores(PREDICTED), LABELS)
    assert result["accuracy"] == 0.625
    assert result["correct"] == 5 and result["total"] == 8
    per_class = result["per_class_accuracy"]
    assert list(per_class) == list(CLASSES)
    assert per_class["airplane"] == 0.5
    assert per_class["automobile"] == 1.0
    assert per_class["bird"] == 0.0
    assert per_class["truck"] == round(2 / 3, 6) == 0.666667
    for absent in ("cat", "deer", "dog", "frog", "horse", "ship"):
        assert per_class[absent] is None, absent


def test_classification_confusion_matrix_rows_are_actual():
    result = metrics.classification(one_hot_scores(PREDICTED), LABELS)
    matrix = np.array(result["confusion_matrix"]["rows_actual_cols_predicted"])
    assert result["confusion_matrix"]["labels"] == list(CLASSES)
    assert matrix.shape == (10, 10) and matrix.sum() == 8
    expected = np.zeros((10, 10), dtype=np.int64)
    for (actual, predicted), count in {(0, 0): 1, (0, 1): 1, (1, 1): 2, (2, 0): 1, (9, 9): 2, (9, 3): 1}.items():
        expected[actual, predicted] = count
    np.testing.assert_array_equal(matrix, expected)
    assert np.trace(matrix) == result["correct"]


def test_classification_accuracy_is_rounded_to_6_places():
    labels = np.array([0, 1, 2], dtype=np.int64)
    result = metrics.classification(one_hot_scores(np.array([0, 1, 0])), labels)
    assert result["accuracy"] == 0.666667 and result["correct"] == 2


def test_classification_result_is_json_serialisable(tmp_path):
    result = metrics.classification(one_hot_scores(PREDICTED), LABELS)
    files.write_json(tmp_path / "m.json", result)
    assert files.read_json(tmp_path / "m.json") == result


# --------------------------------------------------------------------------- metrics.comparison

def test_comparison_hand_example():
    parent = np.array([[0.7, 0.2, 0.1],
                       [0.1, 0.8, 0.1],
                       [0.3, 0.3, 0.4],
                       [0.5, 0.4, 0.1]], dtype=np.float32)
    child = np.array([[0.6, 0.3, 0.1],
                      [0.1, 0.8, 0.1],
                      [0.3, 0.3, 0.4],
                      [0.2, 0.7, 0.1]], dtype=np.float32)  # last row: argmax 0 -> 1, |diff| 0.3
    result = metrics.comparison(parent, child)
    assert result["max_abs_diff"] == pytest.approx(0.3, abs=1e-6)
    assert result["argmax_agreement"] == 0.75
    assert result["argmax_disagreements"] == 1
    assert isinstance(result["max_abs_diff"], float) and isinstance(result["argmax_disagreements"], int)


def test_comparison_identical_scores():
    scores = np.random.default_rng(0).random((5, 10)).astype(np.float32)
    assert metrics.comparison(scores, scores.copy()) == {
        "max_abs_diff": 0.0, "argmax_agreement": 1.0, "argmax_disagreements": 0}


@pytest.mark.parametrize("value, bound", [(0.0, 0.0), (3.6e-6, 1e-5), (1e-5, 1e-5), (1.0000001e-5, 1e-4),
                                          (0.3, 1.0), (2.0, 10.0)])
def test_power_of_ten_bound(value, bound):
    assert metrics.power_of_ten_bound(value) == pytest.approx(bound, rel=1e-12)


def test_power_of_ten_bound_ignores_last_bit_noise():
    """The canonical form must not move when a figure moves by float32 last-bit noise."""
    for value in (3.576e-6, 4.1e-7, 0.0123):
        noisy = np.float32(value) * (1 + np.array([-4, -1, 1, 4]) * np.finfo(np.float32).eps)
        assert {metrics.power_of_ten_bound(float(v)) for v in noisy} == {metrics.power_of_ten_bound(value)}


def test_label_agreement():
    assert metrics.label_agreement(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0])) == {
        "argmax_agreement": 0.75, "argmax_disagreements": 1}


def test_comparison_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.comparison(np.zeros((4, 10)), np.zeros((5, 10)))


# --------------------------------------------------------------------------- write_confusion_csv

def test_write_confusion_csv(tmp_path):
    path = tmp_path / "plots" / "confusion.csv"
    metrics.write_confusion_csv(path, np.asarray(PREDICTED), LABELS)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["actual", "predicted"]
    assert len(rows) == 1 + len(LABELS)
    assert rows[1:] == [[CLASSES[a], CLASSES[p]] for a, p in zip(LABELS, PREDICTED)]
    assert rows[2] == ["airplane", "automobile"] and rows[-1] == ["truck", "cat"]
    assert syn.listing(tmp_path) == ["plots", "plots/confusion.csv"]
