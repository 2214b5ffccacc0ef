"""One error type for every failure a user can cause, and the wrapper that prints it."""
from __future__ import annotations

import sys
from typing import Callable


class PipelineError(Exception):
    """A failure with a one-line message that names its cause (file, parameter, expectation)."""


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit status 1."""
    from .warnings_policy import install

    install()
    try:
        main()
    except PipelineError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # a full or read-only disk, a permission: name the file and the cause
        where = exc.filename or "output"
        print(f"error: {where}: {exc.strerror or exc} (check free space and permissions)", file=sys.stderr)
        sys.exit(1)
