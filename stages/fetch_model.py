"""Stage fetch_model: get one of MLPerf Tiny's published model files (from a mirror directory
or the pinned upstream commit) and verify its sha256.

    python -m stages.fetch_model --file pretrainedResnet.h5 --out models/keras/pretrainedResnet.h5

A mirror directory holding the files is taken from $RESNET8_MIRROR when set.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path
from .lib.sources import check_digest, copy_local, download

MIRROR_ENV = "RESNET8_MIRROR"


def fetch(out: Path, name: str, base_url: str, sha256: str, mirror: str | None) -> str:
    with atomic_path(out) as tmp:
        if mirror:
            origin = str(Path(mirror) / name)
            if not Path(mirror).is_dir():
                raise PipelineError(f"{MIRROR_ENV}={mirror}: not a directory")
            copy_local(Path(origin), tmp)
        else:
            origin = f"{base_url.rstrip('/')}/{name}"
            download(origin, tmp)
        check_digest(tmp, sha256, what=origin)
    return origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True, choices=params_lib.MODEL_FILES)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["fetch_model"]
    origin = fetch(args.out, args.file, p["base_url"], p["sha256"][args.file], os.environ.get(MIRROR_ENV) or None)
    print(f"fetch_model: {origin} -> {args.out} (sha256 verified)")


if __name__ == "__main__":
    run_main(main)
