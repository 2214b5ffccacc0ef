"""Shared test helpers: run a stage as its own process, as DVC does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Importing `stages` applies its thread budget to the importing process's environment
# (stages/lib/threads.py), and the tests import it here, in pytest's process. A stage started from
# this process would take those counts for the user's and ignore its own budget
# (RESNET8_PARALLEL_STAGES; its seed workers would run one after another), so the stages the tests
# start get the thread settings pytest was started with (`started_environment`).
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                   "TF_NUM_INTEROP_THREADS", "OMP_WAIT_POLICY")
STARTED_WITH = {name: os.environ[name] for name in THREAD_SETTINGS if name in os.environ}
# Every test carries one of four markers, by module (pytest.ini lists them): `-m unit` is the fast set.
SUITE = {"test_stages_frameworks": "frameworks", "test_faults": "faults", "test_pipeline_e2e": "e2e"}
# pytest-xdist (pytest.ini: -n auto --dist loadgroup) keeps each of these modules on one worker, so
# that its module-scoped fixtures (the tiny pipeline, the real repro) are built once. It hands the
# groups out by test count (its loadscope reorder), not in FIRST's order, which orders a run without
# workers (-n 0): the slow modules first.
FIRST = ["frameworks", "e2e", "faults", "unit"]
FAULT_TABLE = "fault_table.txt"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        marker = SUITE.get(item.module.__name__.rsplit(".", 1)[-1], "unit")
        if marker not in item.keywords:
            item.add_marker(getattr(pytest.mark, marker))
        if marker != "unit":
            item.add_marker(pytest.mark.xdist_group(marker))
    items.sort(key=lambda item: FIRST.index(SUITE.get(item.module.__name__.rsplit(".", 1)[-1], "unit")))


def session_temp(tmp_path_factory) -> Path:
    """The session's base temporary directory: the controller's, from a pytest-xdist worker too."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pytest_terminal_summary(terminalreporter, config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    path = config._tmp_path_factory.getbasetemp() / FAULT_TABLE  # written by tests/test_faults.py
    if path.is_file():
        terminalreporter.write_sep("=", "faults tried and outcomes")
        for line in path.read_text().splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"fault table written to {path}")


def started_environment() -> dict:
    """This process's environment, with the thread settings pytest was started with."""
    env = {name: value for name, value in os.environ.items() if name not in THREAD_SETTINGS}
    return {**env, **STARTED_WITH}


def stage_env(**extra: str) -> dict:
    env = started_environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["RESNET8_STRICT_WARNINGS"] = "1"  # deprecations from our code and the frameworks fail the stage
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> args` in `cwd` (a project folder with its own params.yaml)."""
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=stage_env(**env),
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def in_parallel(*tasks):
    """Run independent tasks (each a call that starts a stage process and waits for it) as many at
    once as there are usable CPUs: the tests' stage runs are mostly process start-up and imports,
    which one core each does as fast as two. Each stage keeps its own thread budget (the tests
    compare artifacts built at different thread counts: the budget must not change silently). Returns
    the results in order; the first failure is raised once all have finished."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        futures = [pool.submit(task) for task in tasks]
    return [future.result() for future in futures]


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A helper script under tests/ in its own process (keeps TensorFlow and torch apart)."""
    return run_module(f"tests.{script}", *args, cwd=cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch project folder with a copy of the repository's params.yaml."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path
