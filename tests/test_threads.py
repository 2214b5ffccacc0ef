"""lib/threads.py: every stage process sizes its thread pools from the CPUs it may use and from
RESNET8_PARALLEL_STAGES, before any framework is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stages.lib import threads
from tests.conftest import REPO, STARTED_WITH, THREAD_SETTINGS, stage_env

PROBE = ("import json, os, stages; from stages.lib import threads; "
         "print(json.dumps({k: os.environ.get(k) for k in threads.PER_PROCESS + ('OMP_WAIT_POLICY',)}))")


def probe(cpus: set[int] | None = None, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in threads.PER_PROCESS + ("OMP_WAIT_POLICY", threads.ENV)}
    clean.update(env, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", PROBE]
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + command
    return subprocess.run(command, env=clean, capture_output=True, text=True, cwd=REPO)


def test_a_stage_takes_every_cpu_it_may_use_and_sleeps_when_idle():
    result = probe()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    cpus = len(os.sched_getaffinity(0))
    assert all(seen[k] == str(cpus) for k in threads.PER_PROCESS), seen
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE"


def test_parallel_stages_share_the_cpus():
    cpus = len(os.sched_getaffinity(0))
    seen = json.loads(probe(**{threads.ENV: "2"}).stdout)
    assert seen["OMP_NUM_THREADS"] == str(max(1, cpus // 2))
    seen = json.loads(probe(**{threads.ENV: str(4 * cpus)}).stdout)
    assert seen["OMP_NUM_THREADS"] == "1"  # never zero


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs to restrict the process to one")
def test_the_affinity_mask_counts_not_the_machine():
    one = min(os.sched_getaffinity(0))
    seen = json.loads(probe(cpus={one}).stdout)
    assert seen["OMP_NUM_THREADS"] == "1"


def test_the_tests_know_every_setting_importing_stages_makes():
    """tests/conftest.py gives the stages it starts the thread settings pytest was started with: it
    must name every variable that importing `stages` sets."""
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS + (threads.ENV,)}
    result = subprocess.run([sys.executable, "-c", "import json, os; before = dict(os.environ); import stages; "
                             "print(json.dumps([k for k in os.environ if os.environ[k] != before.get(k)]))"],
                            env={**clean, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == set(THREAD_SETTINGS)


def test_a_stage_the_tests_start_takes_its_own_budget_not_the_test_processs(monkeypatch):
    """Importing `stages` in the test process set thread counts in its environment; a stage started
    from it must not take them for the user's."""
    for name in THREAD_SETTINGS:
        monkeypatch.setenv(name, "7")
    env = stage_env(**{threads.ENV: str(4 * len(os.sched_getaffinity(0)))})
    seen = json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                                     cwd=REPO, check=True).stdout)
    assert seen["OMP_NUM_THREADS"] == STARTED_WITH.get("OMP_NUM_THREADS", "1")
    assert seen["OMP_WAIT_POLICY"] == STARTED_WITH.get("OMP_WAIT_POLICY", "PASSIVE")


def test_a_setting_the_user_made_is_kept():
    seen = json.loads(probe(OMP_NUM_THREADS="3", OMP_WAIT_POLICY="ACTIVE").stdout)
    assert seen["OMP_NUM_THREADS"] == "3" and seen["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_setting_is_one_line(value):
    result = probe(**{threads.ENV: value})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {threads.ENV}={value!r} is not allowed; expected a whole number >= 1 "
        "(how many stages run at the same time)"]


def test_onnxruntime_sessions_take_the_budget(monkeypatch):
    monkeypatch.setenv(threads.ENV, "2")
    from stages.lib.runners import onnx_session_options

    options = onnx_session_options()
    assert options.intra_op_num_threads == max(1, len(os.sched_getaffinity(0)) // 2)
    assert options.inter_op_num_threads == 1
