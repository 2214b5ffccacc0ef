"""Calibration data: stratified, seeded draws from the training split, one per calibration seed,
all disjoint from a fixed validation split; and one small interface (CalibrationSet.batches)
that feeds a draw to any backend (ORT reader, torch loop).

The training split (50,000 images) is divided once: `validation` images, stratified by class and
drawn with VALIDATION_SEED, are held out (defaults are chosen on them, see evaluate.split), and
every calibration draw comes from the rest. The test split is never drawn from.
Per-seed files live in `<root>/seed_<seed>/` (seed_dir)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .cifar10 import CLASSES
from .errors import PipelineError
from .files import load_npy
from .runners import batches

BATCH_SIZE = 100
VALIDATION_SEED = 20_261_128  # fixed: the validation split must not move with calibrate.seeds


def seed_dir(root: str | Path, seed: int) -> Path:
    """Where a per-seed output lives under a stage's output directory."""
    return Path(root) / f"seed_{seed}"


def seed_file(root: str | Path, seed: int, suffix: str) -> Path:
    """A per-seed file under a stage's output directory: `<root>/seed_<seed><suffix>`."""
    return Path(root) / f"seed_{seed}{suffix}"


def seed_path(template: str, seed: int) -> Path:
    """A path with a `{seed}` placeholder, filled in."""
    return Path(template.replace("{seed}", str(seed)))


def validation_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """The held-out validation split: `count` training images, stratified, always the same."""
    if count == 0:
        return np.zeros(0, np.int64)
    return stratified_indices(labels, count, VALIDATION_SEED)


def calibration_indices(labels: np.ndarray, samples: int, seed: int, validation: int) -> np.ndarray:
    """One calibration draw: `samples` training images outside the validation split."""
    return stratified_indices(labels, samples, seed, exclude=validation_indices(labels, validation))


def stratified_indices(labels: np.ndarray, samples: int, seed: int,
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """`samples` indices, as even across the classes as the count allows, reproducible from `seed`,
    none of them in `exclude`."""
    rng = np.random.default_rng(seed)
    excluded = np.zeros(len(labels), bool)
    if exclude is not None:
        excluded[exclude] = True
    n_classes = len(CLASSES)
    per_class = np.full(n_classes, samples // n_classes)
    per_class[rng.permutation(n_classes)[: samples % n_classes]] += 1
    chosen = []
    for cls, count in enumerate(per_class):
        pool = np.flatnonzero((labels == cls) & ~excluded)
        if count > len(pool):
            where = "the training split outside the validation images" if exclude is not None else "the training split"
            raise PipelineError(f"calibrate.samples = {samples} needs {count} images of class "
                                f"'{CLASSES[cls]}', {where} has {len(pool)}")
        chosen.append(rng.choice(pool, size=count, replace=False))
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)


@dataclass
class CalibrationSet:
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    batch_size: int = BATCH_SIZE

    @classmethod
    def load(cls, directory: str | Path) -> "CalibrationSet":
        return cls(load_npy(Path(directory) / "images.npy", "calibration images (run the calibrate stage)"))

    def batches(self) -> Iterator[np.ndarray]:
        """float32 NHWC batches, the model's input format."""
        return batches(self.images, self.batch_size)


def ort_reader(calibration: CalibrationSet, input_name: str):
    """An onnxruntime CalibrationDataReader over a CalibrationSet."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = calibration.batches()

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._batches = calibration.batches()

    return Reader()


def evaluation_split(data: str | Path, all_params: dict):
    """The images the evaluation stages score (evaluate.split): the first evaluate.samples of the
    test split, or of the validation split (held-out training images, to choose settings on)."""
    from . import cifar10

    split, samples = all_params["evaluate"]["split"], all_params["evaluate"]["samples"]
    if split == "test":
        return cifar10.load(data, "test", limit=samples)
    count = all_params["calibrate"]["validation"]
    if count == 0:
        raise PipelineError("evaluate.split = validation needs calibrate.validation > 0 (no images are held out)")
    train = cifar10.load(data, "train")
    chosen = validation_indices(train.labels, count)[:samples]
    return cifar10.Split(np.asarray(train.images[chosen]), train.labels[chosen])


def seeds(all_params: dict) -> list[int]:
    return list(all_params["calibrate"]["seeds"])
