"""Classification metrics and model-to-model comparison, computed from scores and labels.

What is written to a metrics file must be the same on every machine: counts and ratios of
predicted labels are; float scores differ in their last bits between CPU kinds, so a float
difference is recorded only as the power of ten it stays below (power_of_ten_bound).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .cifar10 import CLASSES
from .files import atomic_path


def classification(scores: np.ndarray, labels: np.ndarray) -> dict:
    predicted = scores.argmax(axis=1)
    correct = predicted == labels
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for index, name in enumerate(CLASSES):
        mask = labels == index
        per_class[name] = round(float(correct[mask].mean()), 6) if mask.any() else None
    return {
        "accuracy": round(float(correct.mean()), 6),
        "correct": int(correct.sum()),
        "total": int(len(labels)),
        "per_class_accuracy": per_class,
        "confusion_matrix": {"labels": list(CLASSES), "rows_actual_cols_predicted": confusion.tolist()},
    }


def power_of_ten_bound(value: float) -> float:
    """The smallest power of ten >= value (0 for 0): a canonical form of a float difference."""
    return 0.0 if value <= 0 else float(10.0 ** math.ceil(round(math.log10(value), 9)))


def label_agreement(parent: np.ndarray, child: np.ndarray) -> dict:
    """How often two models predict the same label (1-D label arrays) on the same images."""
    if parent.shape != child.shape:
        raise ValueError(f"prediction shapes differ: {parent.shape} vs {child.shape}")
    return {
        "argmax_agreement": round(float((parent == child).mean()), 6),
        "argmax_disagreements": int((parent != child).sum()),
    }


def comparison(parent: np.ndarray, child: np.ndarray) -> dict:
    """How closely `child` scores follow `parent` scores on the same images."""
    if parent.shape != child.shape:
        raise ValueError(f"score shapes differ: {parent.shape} vs {child.shape}")
    return {
        "max_abs_diff": float(np.abs(parent.astype(np.float64) - child).max()),
        **label_agreement(parent.argmax(1), child.argmax(1)),
    }


def _per_seed(predicted: np.ndarray, seeds: list[int] | None) -> list[tuple[list, np.ndarray]]:
    """[(leading CSV cells, one row of predicted labels)]: one entry, or one per seed."""
    if seeds is None:
        return [([], np.asarray(predicted))]
    return [([seed], row) for seed, row in zip(seeds, np.asarray(predicted))]


def write_confusion_csv(path: str | Path, predicted: np.ndarray, labels: np.ndarray,
                        seeds: list[int] | None = None) -> None:
    """One row per image (actual, predicted class name): the input of DVC's confusion template.
    With `seeds`, `predicted` holds one row of labels per seed, and each CSV row names its seed."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((["seed"] if seeds is not None else []) + ["actual", "predicted"])
        for lead, row in _per_seed(predicted, seeds):
            for actual, label in zip(labels, row):
                writer.writerow(lead + [CLASSES[actual], CLASSES[label]])


def write_flips_csv(path: str | Path, parent: np.ndarray, child: np.ndarray, seeds: list[int] | None = None) -> None:
    """One row per image whose predicted class changed from `parent` to `child` (class names):
    DVC's confusion template draws it as a float-vs-quantized flip matrix. With `seeds`, `child`
    holds one row of labels per seed, and each CSV row names its seed (the plot sums them)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((["seed"] if seeds is not None else []) + ["float_predicted", "quantized_predicted"])
        for lead, row in _per_seed(child, seeds):
            for index in np.flatnonzero(parent != row):
                writer.writerow(lead + [CLASSES[parent[index]], CLASSES[row[index]]])
