"""lib/seed_pool.py: per-seed work side by side in forked workers, within the thread budget; the
same results, in seed order, as one after another; failures reported per seed."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from stages.lib import seed_pool, threads
from stages.lib.errors import PipelineError


@pytest.fixture
def two_cpus(monkeypatch):
    """A budget of two threads, whatever this machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv(threads.ENV, "1")
    monkeypatch.setattr(threads, "USER_SET", set())  # no thread count given by whoever runs the tests


def work(seed: int) -> tuple[int, int, str, float]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((200, 200))
    return seed, os.getpid(), os.environ["OMP_NUM_THREADS"], float((a @ a.T).sum())


def test_two_workers_share_the_budget_and_give_the_serial_results_in_seed_order(two_cpus, monkeypatch):
    seeds = [4, 0, 3, 1]
    results = seed_pool.map_seeds(work, seeds)
    assert [r[0] for r in results] == seeds
    assert seed_pool.workers(len(seeds)) == 2
    assert os.getpid() not in {r[1] for r in results} and len({r[1] for r in results}) <= 2  # the workers
    assert {r[2] for r in results} == {"1"}  # each worker one thread of the two
    monkeypatch.setenv(threads.ENV, "2")  # a budget of one: in this process, one after another
    serial = seed_pool.map_seeds(work, seeds)
    assert {r[1] for r in serial} == {os.getpid()}
    assert [r[3] for r in serial] == [r[3] for r in results]


def test_a_closure_over_local_data_reaches_the_workers_unpickled(two_cpus):
    images = np.arange(10.0)
    assert seed_pool.map_seeds(lambda seed: float(images[seed]), [1, 2, 3]) == [1.0, 2.0, 3.0]


def fails_on_three(seed: int) -> int:
    if seed == 3:
        raise PipelineError(f"seed {seed}: bad input")
    return seed


def test_a_workers_pipeline_error_is_raised_with_its_message(two_cpus):
    with pytest.raises(PipelineError, match="seed 3: bad input"):
        seed_pool.map_seeds(fails_on_three, [1, 2, 3, 4])


def dies_on_two(seed: int) -> int:
    if seed == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return seed


def test_a_worker_that_dies_fails_the_stage_naming_a_seed(two_cpus):
    with pytest.raises(PipelineError, match=r"a worker process died .* before calibration seed \d was done"):
        seed_pool.map_seeds(dies_on_two, [1, 2, 3])


def test_the_last_incomplete_round_takes_the_idle_workers_threads(two_cpus):
    assert seed_pool.shares(5, 2) == [2, 2, 2, 2, 1]  # the fifth seed runs alone: the whole budget
    assert seed_pool.shares(4, 2) == [2, 2, 2, 2]
    results = seed_pool.map_seeds(work, [0, 1, 2, 3, 4])
    assert [r[2] for r in results[:4]] == ["1"] * 4 and results[4][2] == "2"
    assert [r[3] for r in results] == [work(seed)[3] for seed in range(5)]  # same numbers with 2 threads


def pair_work(task: tuple[str, int]) -> tuple[str, int, str]:
    dtype, seed = task
    return dtype, seed, os.environ["OMP_NUM_THREADS"]


def test_tasks_may_be_pairs_and_keep_one_thread_each_when_more_do_not_help(two_cpus):
    assert seed_pool.shares(5, 2, idle_threads=False) == [2, 2, 2, 2, 2]  # the fifth alone: still one thread
    tasks = [(dtype, seed) for dtype in ("int8", "uint8") for seed in (0, 1, 2)]
    assert seed_pool.map_seeds(pair_work, tasks, idle_threads=False) == [(*task, "1") for task in tasks]
    assert seed_pool.map_seeds(pair_work, tasks[:3], idle_threads=False)[2] == ("int8", 2, "1")
    assert seed_pool.map_seeds(pair_work, tasks[:3])[2] == ("int8", 2, "2")


def dies_on_uint8_one(task: tuple[str, int]) -> int:
    if task == ("uint8", 1):
        os.kill(os.getpid(), signal.SIGKILL)
    return task[1]


def test_a_worker_that_dies_on_a_pair_names_the_dtype_and_seed(two_cpus):
    with pytest.raises(PipelineError, match=r"died .* before (int8|uint8) calibration seed \d was done"):
        seed_pool.map_seeds(dies_on_uint8_one, [("int8", 0), ("uint8", 1), ("uint8", 2)])


def test_a_thread_count_the_user_set_is_kept_and_the_seeds_run_here(two_cpus, monkeypatch):
    monkeypatch.setattr(threads, "USER_SET", {"OMP_NUM_THREADS"})
    assert {r[1] for r in seed_pool.map_seeds(work, [0, 1, 2])} == {os.getpid()}


def test_no_more_workers_than_the_available_memory_holds(two_cpus, monkeypatch, capsys):
    monkeypatch.setattr(seed_pool, "available_memory", lambda: 5e9)
    assert seed_pool.workers_for_memory(2, 2e9) == 2
    assert seed_pool.workers_for_memory(2, None) == 2  # no estimate: the threads decide
    assert seed_pool.workers_for_memory(2, 3e9) == 1
    assert "1 rather than 2: 5.0 GB of memory available, about 3.0 GB per seed" in capsys.readouterr().err
    assert seed_pool.workers_for_memory(2, 9e9) == 1  # at least one, whatever the estimate
    results = seed_pool.map_seeds(work, [0, 1, 2], memory_per_seed=3e9)
    assert {r[1] for r in results} == {os.getpid()}  # one worker: the seeds run here, one after another
    assert [r[3] for r in results] == [work(seed)[3] for seed in range(3)]


def test_available_memory_is_read_from_this_machine():
    found = seed_pool.available_memory()
    assert 0 < found < float("inf")
