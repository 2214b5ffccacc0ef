"""Stage fetch_model: get pretrainedResnet.h5 (from a mirror directory or the pinned URL) and verify it.

    python -m stages.fetch_model --out models/keras/pretrainedResnet.h5

A mirror directory holding pretrainedResnet.h5 is taken from $RESNET8_MIRROR when set.
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
MODEL_NAME = "pretrainedResnet.h5"


def fetch(out: Path, url: str, sha256: str, mirror: str | None) -> str:
    with atomic_path(out) as tmp:
        if mirror:
            origin = str(Path(mirror) / MODEL_NAME)
            if not Path(mirror).is_dir():
                raise PipelineError(f"{MIRROR_ENV}={mirror}: not a directory")
            copy_local(Path(origin), tmp)
        else:
            origin = url
            download(url, tmp)
        check_digest(tmp, sha256, what=origin)
    return origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["fetch_model"]
    origin = fetch(args.out, p["url"], p["sha256"], os.environ.get(MIRROR_ENV) or None)
    print(f"fetch_model: {origin} -> {args.out} (sha256 verified)")


if __name__ == "__main__":
    run_main(main)
