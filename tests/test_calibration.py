"""stages/lib/calibration.py and the calibrate stage: a stratified, seeded draw from the
training split only, fed to backends as float32 batches."""
from __future__ import annotations

import sys

import numpy as np
import pytest

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests import synthetic as syn
except ImportError:
    import synthetic as syn
from stages import calibrate
from stages.lib import calibration
from stages.lib.calibration import CalibrationSet, calibration_indices, stratified_indices, validation_indices
from stages.lib.errors import PipelineError


def shuffled_labels(per_class: int = 30, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(10 * per_class) % 10).astype(np.int64)


LABELS = shuffled_labels()  # 300 labels, 30 a class


# --------------------------------------------------------------------------- stratified_indices

@pytest.mark.parametrize("samples", [1, 10, 13, 47, 100, 299, 300])
def test_exact_count_unique_in_range(samples):
    indices = stratified_indices(LABELS, samples, seed=0)
    assert indices.dtype == np.int64 and indices.shape == (samples,)
    assert len(np.unique(indices)) == samples
    assert indices.min() >= 0 and indices.max() < len(LABELS)


@pytest.mark.parametrize("samples", [10, 13, 47, 100, 299])
def test_per_class_counts_differ_by_at_most_one(samples):
    counts = np.bincount(LABELS[stratified_indices(LABELS, samples, seed=5)], minlength=10)
    assert counts.sum() == samples
    assert counts.max() - counts.min() <= 1
    assert counts.min() == samples // 10


def test_all_samples_take_the_whole_split():
    indices = stratified_indices(LABELS, len(LABELS), seed=1)
    np.testing.assert_array_equal(np.sort(indices), np.arange(len(LABELS)))


def test_same_seed_same_draw_other_seed_other_draw():
    first = stratified_indices(LABELS, 47, seed=7)
    np.testing.assert_array_equal(first, stratified_indices(LABELS, 47, seed=7))
    np.testing.assert_array_equal(first, stratified_indices(LABELS.copy(), 47, seed=7))
    other = stratified_indices(LABELS, 47, seed=8)
    assert set(first.tolist()) != set(other.tolist())


def test_extra_samples_go_to_different_classes_for_different_seeds():
    """samples % 10 extra images land on seed-chosen classes, not always the first classes."""
    winners = set()
    for seed in range(20):
        counts = np.bincount(LABELS[stratified_indices(LABELS, 13, seed)], minlength=10)
        winners.add(tuple(np.flatnonzero(counts == 2)))
    assert len(winners) > 1


def test_too_few_images_of_a_class():
    labels = LABELS.copy()
    cats = np.flatnonzero(labels == 3)
    labels[cats[2:]] = 4  # only 2 cats left
    with pytest.raises(PipelineError) as info:
        stratified_indices(labels, 50, seed=0)  # needs 5 a class
    message = str(info.value)
    assert "'cat'" in message and "needs 5" in message and "has 2" in message
    assert "calibrate.samples = 50" in message
    assert len(stratified_indices(labels, 20, seed=0)) == 20  # 2 a class still fits


# --------------------------------------------------------------------------- CalibrationSet

def test_batches_are_float32_and_cover_all_images_in_order():
    images = np.random.default_rng(0).integers(0, 256, (250, 32, 32, 3), dtype=np.uint8)
    batches = list(CalibrationSet(images).batches())
    assert [len(b) for b in batches] == [100, 100, 50]
    assert all(b.dtype == np.float32 and b.shape[1:] == (32, 32, 3) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images.astype(np.float32))
    assert float(np.concatenate(batches).max()) == 255.0  # raw pixels, not normalised


def test_batches_restart_on_every_call():
    images = np.arange(5 * 32 * 32 * 3, dtype=np.uint8).reshape(5, 32, 32, 3)
    calib = CalibrationSet(images, batch_size=2)
    assert [len(b) for b in calib.batches()] == [2, 2, 1]
    assert [len(b) for b in calib.batches()] == [2, 2, 1]


def test_load(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    loaded = CalibrationSet.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.images, images)
    assert loaded.batch_size == calibration.BATCH_SIZE


def test_load_missing(tmp_path):
    with pytest.raises(PipelineError, match="calibrate stage") as info:
        CalibrationSet.load(tmp_path)
    assert str(tmp_path / "images.npy") in str(info.value)


# --------------------------------------------------------------------------- the calibrate stage

def tiny_train(seed: int = 0):
    """60 training images, 6 a class; no test split at all."""
    sizes = {"test": 0, "train": 60}
    return syn.make_dataset(seed=seed, sizes=sizes)


def test_stage_subprocess_writes_train_images_at_indices(tmp_path):
    ds = tiny_train()
    syn.write_params(tmp_path, {"calibrate": {"samples": 23, "seeds": [3, 5], "validation": 10}})
    data = syn.write_prepared(tmp_path / "data" / "cifar10", ds, splits=("train",))
    assert syn.listing(data) == ["train_images.npy", "train_labels.npy"]  # no test files to read

    result = syn.run_stage("calibrate", ["--data", "data/cifar10", "--out", "data/calibration"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "calibration"
    assert syn.listing(out) == ["seed_3", "seed_3/images.npy", "seed_3/indices.npy",
                                "seed_5", "seed_5/images.npy", "seed_5/indices.npy"]
    held_out = validation_indices(ds.labels["train"], 10)
    for seed in (3, 5):
        images, indices = np.load(out / f"seed_{seed}" / "images.npy"), np.load(out / f"seed_{seed}" / "indices.npy")
        assert indices.dtype == np.int64 and indices.shape == (23,)
        np.testing.assert_array_equal(indices, stratified_indices(ds.labels["train"], 23, seed, exclude=held_out))
        assert not set(indices) & set(held_out)
        assert images.dtype == np.uint8 and images.shape == (23, 32, 32, 3)
        np.testing.assert_array_equal(images, ds.images["train"][indices])
        counts = np.bincount(ds.labels["train"][indices], minlength=10)
        assert f"seed {seed}: 23 training images, per class {counts.tolist()}" in result.stdout
    first, second = (np.load(out / f"seed_{s}" / "indices.npy") for s in (3, 5))
    assert not np.array_equal(first, second)


def test_validation_split_is_stratified_fixed_and_apart_from_every_draw():
    labels = np.random.default_rng(4).permutation(np.arange(50_000) % 10)
    held_out = validation_indices(labels, 5000)
    assert np.bincount(labels[held_out], minlength=10).tolist() == [500] * 10
    np.testing.assert_array_equal(held_out, validation_indices(labels, 5000))  # never moves with the seeds
    for seed in range(5):
        draw = calibration_indices(labels, 2000, seed, 5000)
        assert len(draw) == 2000 and not set(draw) & set(held_out)
    assert len(validation_indices(labels, 0)) == 0


def run_main(monkeypatch, project, *args):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["calibrate", *args])
    calibrate.main()


def test_stage_never_reads_the_test_split(tmp_path, monkeypatch):
    """Corrupt test files next to good training files: the stage must not notice them."""
    ds = tiny_train()
    syn.write_params(tmp_path, {"calibrate": {"samples": 10, "seeds": [0], "validation": 10}})
    data = syn.write_prepared(tmp_path / "data", ds, splits=("train",))
    (data / "test_images.npy").write_bytes(b"garbage")
    (data / "test_labels.npy").write_bytes(b"garbage")
    run_main(monkeypatch, tmp_path, "--data", "data", "--out", "calib")
    indices = np.load(tmp_path / "calib" / "seed_0" / "indices.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "calib" / "seed_0" / "images.npy"), ds.images["train"][indices])


def test_stage_is_reproducible_and_follows_the_seed(tmp_path, monkeypatch):
    ds = tiny_train()
    syn.write_prepared(tmp_path / "data", ds, splits=("train",))
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        syn.write_params(tmp_path, {"calibrate": {"samples": 30, "seeds": [seed], "validation": 10}})
        run_main(monkeypatch, tmp_path, "--data", "data", "--out", name)
        runs[name] = np.load(tmp_path / name / f"seed_{seed}" / "indices.npy")
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def test_stage_replaces_previous_output(tmp_path, monkeypatch):
    ds = tiny_train()
    syn.write_params(tmp_path, {"calibrate": {"samples": 10, "seeds": [0], "validation": 10}})
    syn.write_prepared(tmp_path / "data", ds, splits=("train",))
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "stale.npy").write_bytes(b"old")
    run_main(monkeypatch, tmp_path, "--data", "data", "--out", "calib")
    assert syn.listing(tmp_path / "calib") == ["seed_0", "seed_0/images.npy", "seed_0/indices.npy"]


def test_stage_too_many_samples_fails_without_output(tmp_path):
    ds = tiny_train()  # 6 a class, 1 a class held out
    syn.write_params(tmp_path, {"calibrate": {"samples": 60, "seeds": [0], "validation": 10}})
    syn.write_prepared(tmp_path / "data", ds, splits=("train",))
    result = syn.run_stage("calibrate", ["--data", "data", "--out", "calib"], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibrate.samples = 60 needs 6 images"), result.stderr
    assert "outside the validation images has 5" in lines[0]
    assert not (tmp_path / "calib").exists()


def test_stage_without_training_data(tmp_path, monkeypatch):
    syn.write_params(tmp_path, {"calibrate": {"samples": 10, "seeds": [0], "validation": 10}})
    (tmp_path / "data").mkdir()
    with pytest.raises(PipelineError, match="train_images.npy.*fetch_cifar10"):
        run_main(monkeypatch, tmp_path, "--data", "data", "--out", "calib")
    assert not (tmp_path / "calib").exists()
