"""Shared test helpers: run a stage as its own process, as DVC does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every test carries one of four markers, by module (pytest.ini lists them): `-m unit` is the fast set.
SUITE = {"test_stages_frameworks": "frameworks", "test_faults": "faults", "test_pipeline_e2e": "e2e"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        marker = SUITE.get(item.module.__name__.rsplit(".", 1)[-1], "unit")
        if marker not in item.keywords:
            item.add_marker(getattr(pytest.mark, marker))


def stage_env(**extra: str) -> dict:
    env = dict(os.environ)
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


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A helper script under tests/ in its own process (keeps TensorFlow and torch apart)."""
    return run_module(f"tests.{script}", *args, cwd=cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch project folder with a copy of the repository's params.yaml."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path
