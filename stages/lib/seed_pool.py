"""Calibration seeds side by side: a stage that repeats its work for every calibration seed hands
each seed to one of several forked worker processes, within the stage's thread budget. Much of
that work is single-threaded Python (PT2E's export, annotation and lowering passes, the x86
lowering before each evaluation, the reference evaluator's ops), and the rest (AdaRound's float64
gemms) scales less than linearly with threads, so two one-thread workers beat one two-thread
process on two cores.

    results = map_seeds(work, seeds)   # [work(seed) for seed in seeds], in seed order
    results = map_seeds(work, seeds, memory_per_seed=3.5e9)   # no more workers than memory holds
    results = map_seeds(work, [(dtype, seed) ...], idle_threads=False)   # any tasks; one thread each

With a budget of B threads (lib/threads.py) there are min(B, len(seeds)) workers, each with
B // workers threads (a worker counts as one more stage running at once); the seeds of a last,
incomplete round (the fifth of five seeds on two workers) take the threads the idle workers
leave, unless the stage says more threads do not help its work (`idle_threads=False`: AdaRound's
draw alone took 18.7 s on two threads against 14.9 s on one). A task may be any value, such as a
(dtype, seed) pair: a stage with several dtypes hands out all its draws at once, so that the
workers stay busy to the end (ten draws on two workers, rather than five and five with one worker
idle in each last round). With one worker (one CPU, RESNET8_PARALLEL_STAGES equal to the CPUs, one seed, or a
thread count the user set, such as OMP_NUM_THREADS) the seeds run one after another in this
process. A stage that names its memory per seed gets no more workers than the memory available
now (the kernel's MemAvailable, or the cgroup's limit less its use when that is lower) holds;
it says so when that makes fewer workers than its threads would.

A seed's result does not depend on which process computed it or with how many threads:
tests/test_stages_frameworks.py compares the seeds built by one-thread workers with a seed built
by one process of two threads (and with one thread, portable kernels), bit for bit, and the
committed dvc.lock was rebuilt with the workers without a changed output.

The workers are forked, so `work` may be a closure over large inputs (nothing is pickled but the
seed and the result). The parent must not have run a framework's thread pool before calling
(forking a running OpenMP pool can hang the child): the stages call this before any tensor work
of their own. A worker's PipelineError is raised again here with its message; a worker that dies
(a crash, out of memory) fails the stage with an error naming the first seed not done.
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
Task = TypeVar("Task")
_work: Callable | None = None  # the forked workers' task: set in the parent just before the fork


def workers(seeds: int) -> int:
    """How many worker processes: none besides this one when the user set a thread count
    (OMP_NUM_THREADS=...: it is kept, so the seeds run one after another with it)."""
    if threads.USER_SET:
        return 1
    return max(1, min(threads.budget(), seeds))


def available_memory() -> float:
    """Bytes this process can still allocate without swapping or an out-of-memory kill: the
    kernel's MemAvailable, or what the cgroup's memory limit leaves when that is less."""
    found = float("inf")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                found = min(found, int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return found


def workers_for_memory(count: int, memory_per_seed: float | None) -> int:
    """`count` workers, fewer if the available memory holds fewer seeds at once (at least one)."""
    if not memory_per_seed or count == 1:
        return count
    available = available_memory()
    fits = max(1, int(available // memory_per_seed))
    if fits < count:
        print(f"seed workers: {fits} rather than {count}: {available / 1e9:.1f} GB of memory available, "
              f"about {memory_per_seed / 1e9:.1f} GB per seed", file=sys.stderr)
    return min(count, fits)


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


def _run(seed: int, stages: int):
    if os.environ.get(threads.ENV) != str(stages):
        _set_threads(stages)
    return _work(seed)


def shares(seeds: int, count: int, idle_threads: bool = True) -> list[int]:
    """Per seed, as how many of RESNET8_PARALLEL_STAGES its worker counts: the budget split among
    the `count` workers, except the seeds of a last, incomplete round (5 seeds on 2 workers: the
    fifth), which run while the other workers are idle and get their threads (`idle_threads`)."""
    stages, last = threads.parallel_stages(), seeds % count if idle_threads else 0
    return [stages * (count if index < seeds - last else last) for index in range(seeds)]


def _described(task) -> str:
    """A task as the error message names it: `calibration seed 3`, `int8 calibration seed 3`."""
    *rest, seed = task if isinstance(task, tuple) else (task,)
    return " ".join([*map(str, rest), f"calibration seed {seed}"])


def map_seeds(work: Callable[[Task], Result], seeds: list[Task], memory_per_seed: float | None = None,
              idle_threads: bool = True) -> list[Result]:
    """[work(seed) for seed in seeds], spread over `workers(len(seeds))` forked processes, or
    fewer when `memory_per_seed` (bytes) times that is more than the memory available. A seed may
    be any task (a (dtype, seed) pair: its last element is the calibration seed); `idle_threads`:
    whether the tasks of a last, incomplete round take the idle workers' threads."""
    global _work
    count = workers_for_memory(workers(len(seeds)), memory_per_seed)
    if count == 1:
        return [work(seed) for seed in seeds]
    _work = work
    try:
        with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_set_threads, initargs=(threads.parallel_stages() * count,)) as pool:
            futures = [pool.submit(_run, seed, stages)
                       for seed, stages in zip(seeds, shares(len(seeds), count, idle_threads))]
            results = []
            for seed, future in zip(seeds, futures):
                try:
                    results.append(future.result())
                except BrokenProcessPool:
                    raise PipelineError(f"a worker process died (killed, out of memory or crashed) before "
                                        f"{_described(seed)} was done; RESNET8_PARALLEL_STAGES=<CPUs> "
                                        "runs the seeds one at a time in the stage's own process") from None
            return results
    finally:
        _work = None
