"""Stage calibrate: one calibration draw per seed (calibrate.seeds) from the CIFAR-10 training
split, never the test split, stratified by class, and disjoint from the held-out validation
images (calibrate.validation).

    python -m stages.calibrate --data data/cifar10 --out data/calibration

Writes seed_<seed>/images.npy (uint8 NHWC) and seed_<seed>/indices.npy (positions in the
50,000-image training split) for every seed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .lib import cifar10
from .lib import params as params_lib
from .lib.calibration import calibration_indices, seed_dir
from .lib.errors import run_main
from .lib.files import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["calibrate"]

    train = cifar10.load(args.data, "train")
    with atomic_path(args.out, directory=True) as tmp:
        for seed in p["seeds"]:
            indices = calibration_indices(train.labels, p["samples"], seed, p["validation"])
            seed_dir(tmp, seed).mkdir()
            np.save(seed_dir(tmp, seed) / "images.npy", np.asarray(train.images[indices]))
            np.save(seed_dir(tmp, seed) / "indices.npy", indices)
            counts = np.bincount(train.labels[indices], minlength=len(cifar10.CLASSES))
            print(f"calibrate: seed {seed}: {len(indices)} training images, per class {counts.tolist()}")
    print(f"calibrate: {len(p['seeds'])} draws, none of them among the {p['validation']} validation images")


if __name__ == "__main__":
    run_main(main)
