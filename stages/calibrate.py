"""Stage calibrate: draw the calibration set from the CIFAR-10 training split (never the test
split), stratified by class and reproducible from calibrate.seed.

    python -m stages.calibrate --data data/cifar10 --out data/calibration

Writes images.npy (uint8 NHWC) and indices.npy (positions in the 50,000-image training split).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .lib import cifar10
from .lib import params as params_lib
from .lib.calibration import stratified_indices
from .lib.errors import run_main
from .lib.files import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["calibrate"]

    train = cifar10.load(args.data, "train")
    indices = stratified_indices(train.labels, p["samples"], p["seed"])
    with atomic_path(args.out, directory=True) as tmp:
        np.save(tmp / "images.npy", np.asarray(train.images[indices]))
        np.save(tmp / "indices.npy", indices)
    counts = np.bincount(train.labels[indices], minlength=len(cifar10.CLASSES))
    print(f"calibrate: {len(indices)} training images, seed {p['seed']}, per class {counts.tolist()}")


if __name__ == "__main__":
    run_main(main)
