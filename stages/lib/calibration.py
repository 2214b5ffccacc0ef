"""Calibration data: a stratified, seeded draw from the training split, and one small
interface (CalibrationSet.batches) that feeds it to any backend (ORT reader, torch loop)."""
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


def stratified_indices(labels: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """`samples` indices, as even across the classes as the count allows, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    n_classes = len(CLASSES)
    per_class = np.full(n_classes, samples // n_classes)
    per_class[rng.permutation(n_classes)[: samples % n_classes]] += 1
    chosen = []
    for cls, count in enumerate(per_class):
        pool = np.flatnonzero(labels == cls)
        if count > len(pool):
            raise PipelineError(f"calibrate.samples = {samples} needs {count} images of class "
                                f"'{CLASSES[cls]}', the training split has {len(pool)}")
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
