"""Digests and atomic outputs: a stage's output appears whole, or not at all."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def sha256_file(path: str | os.PathLike, algo: str = "sha256") -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; rename it onto `target` only if the block succeeds.

    A failure (or a kill) inside the block leaves the previous `target` untouched, or none,
    and never a partial one; the temporary sibling is removed on failure. Temporaries that a
    killed earlier run left beside `target` are removed first (they match `.dvcignore`, so DVC
    never mistakes them for data either).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        _remove(stale)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp made it private
        if directory and (target.exists() or target.is_symlink()):
            # a directory cannot be renamed over another: move the old one aside in one step,
            # so that a kill from here on leaves the old output or none, never half of one
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old.tmp", dir=target.parent))
            os.replace(target, aside / "old")
            os.replace(tmp, target)
            _remove(aside)  # a symlink is unlinked, never what it points to
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def load_npy(path: str | os.PathLike, what: str, mmap: bool = False) -> np.ndarray:
    """np.load with a one-line error for a missing, truncated or foreign file."""
    from .errors import PipelineError

    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except (ValueError, OSError, EOFError) as exc:
        raise PipelineError(f"{path}: {what} is unreadable or truncated ({exc})") from None


def write_json(path: str | os.PathLike, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    from .errors import PipelineError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
