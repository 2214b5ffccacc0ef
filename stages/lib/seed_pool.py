"""Calibration seeds side by side: a stage whose per-seed work is single-threaded Python (PT2E's
export, annotation and lowering passes; the x86 lowering before each evaluation) hands each seed
to one of several worker processes, within the stage's thread budget.

    results = map_seeds(work, seeds)   # [work(seed) for seed in seeds], in seed order

With a budget of B threads (lib/threads.py) there are min(B, len(seeds)) workers, each with B //
workers threads (a worker counts as one more stage running at once); with one (a one-CPU machine, RESNET8_PARALLEL_STAGES equal to the CPUs, one
seed) the seeds run one after another in this process, as before. A seed's result does not
depend on which process computed it or with how many threads: the per-seed work is the same
code on the same inputs, and tests/test_stages_frameworks.py compares a one-thread build (one
worker) with a two-thread one (two workers) bit for bit.

The workers are forked, so `work` may be a closure over large inputs (nothing is pickled but the
seed and the result). The parent must not have run a framework's thread pool before calling
(forking a running OpenMP pool can hang the child): the stages call this before any tensor work
of their own. A worker's PipelineError is raised again here with its message; a worker that dies
(a crash, out of memory) fails the stage with an error naming the seed.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, TypeVar

from . import threads
from .errors import PipelineError

Result = TypeVar("Result")
_work: Callable | None = None  # the forked workers' task: set in the parent just before the fork


def workers(seeds: int) -> int:
    return max(1, min(threads.budget(), seeds))


def _set_threads(stages: int) -> None:
    """In a fresh worker: the thread budget of one of `stages` stages running at once (the stage's
    share divided among its workers), for every pool: the variables for pools not loaded yet and
    for threads.budget() (ONNX Runtime's sessions), threadpoolctl for the BLAS and OpenMP pools
    the parent has loaded (numpy's OpenBLAS, torch's), set_num_threads for torch's own count."""
    from threadpoolctl import threadpool_limits

    os.environ[threads.ENV] = str(stages)
    for name in threads.PER_PROCESS:
        os.environ[name] = str(threads.budget())
    threadpool_limits(threads.budget())
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads.budget())


def _run(seed: int):
    return _work(seed)


def map_seeds(work: Callable[[int], Result], seeds: list[int]) -> list[Result]:
    """[work(seed) for seed in seeds], spread over `workers(len(seeds))` forked processes."""
    global _work
    count = workers(len(seeds))
    if count == 1:
        return [work(seed) for seed in seeds]
    _work = work
    try:
        with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_set_threads, initargs=(threads.parallel_stages() * count,)) as pool:
            futures = [pool.submit(_run, seed) for seed in seeds]
            results = []
            for seed, future in zip(seeds, futures):
                try:
                    results.append(future.result())
                except BrokenProcessPool:
                    raise PipelineError(f"a worker process died (killed, out of memory or crashed) before "
                                        f"calibration seed {seed} was done; RESNET8_PARALLEL_STAGES=<CPUs> "
                                        "runs the seeds one at a time in the stage's own process") from None
            return results
    finally:
        _work = None
