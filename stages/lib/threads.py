"""Thread budget: every stage sizes its thread pools from the CPUs it may use and from how many
stages run at once, so that parallel stages (`dvc queue start -j N`, `dvc repro` of independent
stages by several workers) share the cores instead of oversubscribing them.

    RESNET8_PARALLEL_STAGES=N   stages that run at the same time (default 1)

Each stage gets max(1, CPUs // N) threads, where CPUs is os.sched_getaffinity (what the process
may run on, which respects taskset and container CPU sets). OpenMP (torch), MKL / OpenBLAS
(numpy), TensorFlow and ONNX Runtime (runners.onnx_session_options) take that number, and
OpenMP's idle threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE): spinning threads of
two processes on the same cores made a run more than 7 times slower. A variable the user has set
already is left alone. Applied in stages/__init__.py, before any framework is imported.
"""
from __future__ import annotations

import os

ENV = "RESNET8_PARALLEL_STAGES"
PER_PROCESS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


class BudgetError(ValueError):
    pass


def parallel_stages() -> int:
    raw = os.environ.get(ENV, "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise BudgetError(f"{ENV}={raw!r} is not allowed; expected a whole number >= 1 "
                          "(how many stages run at the same time)")
    return int(raw)


def budget() -> int:
    """Threads one stage may use."""
    return max(1, len(os.sched_getaffinity(0)) // parallel_stages())


USER_SET: set[str] = set()  # the thread counts the user gave (left alone; lib/seed_pool.py then runs seeds one by one)


def apply() -> int:
    threads = budget()
    USER_SET.update(name for name in PER_PROCESS if name in os.environ)
    for name in PER_PROCESS:
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return threads
