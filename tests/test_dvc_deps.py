"""dvc.yaml lists, for every stage, each module under stages/ that the stage's code imports,
directly or through other modules: an edit to any of them must re-run the stage."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from stages.lib.imports import closure
from tests.conftest import REPO


def stage_definitions() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_every_stage_depends_on_exactly_the_code_it_imports(name):
    stage = stage_definitions()[name]
    module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
    listed = {dep for dep in stage["deps"] if dep.startswith("stages/")}
    imported = set(closure(REPO, module))
    assert not imported - listed, f"{name}: dvc.yaml misses {sorted(imported - listed)}"
    assert not listed - imported, f"{name}: dvc.yaml lists modules it does not import: {sorted(listed - imported)}"


def test_closure_follows_indirect_and_function_level_imports(tmp_path):
    package = tmp_path / "stages"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text('"""docstring only"""\n')
    (package / "lib" / "__init__.py").write_text('"""docstring only"""\n')
    (package / "stage.py").write_text("from .lib import a\nimport os\n")
    (package / "lib" / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (package / "lib" / "b.py").write_text("from .c import thing\n")
    (package / "lib" / "c.py").write_text("thing = 1\n")
    (package / "lib" / "unused.py").write_text("")
    assert closure(tmp_path, "stages.stage") == ["stages/lib/a.py", "stages/lib/b.py", "stages/lib/c.py",
                                                 "stages/stage.py"]


def test_dvc_parses_its_yaml_with_libyaml_and_reads_what_the_pure_parser_reads():
    """Every dvc command parses dvc.yaml, dvc.lock and params.yaml (a no-op `dvc repro` spent a
    quarter of its time in ruamel.yaml's pure-Python parser); ruamel.yaml.clib (requirements.txt)
    gives DVC's loader libyaml's C parser, which must read the same data."""
    from dvc.utils.serialize import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not installed: DVC parses its YAML in pure Python"
    assert YAML(typ="safe").Parser is CParser
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        text = (REPO / name).read_text()
        assert parse_yaml(text, name) == YAML(typ="safe", pure=True).load(text), name


def test_every_output_kept_out_of_the_cache_is_tracked_by_git():
    """An output with `cache: false` (the metrics, the report and its plots) has no copy in DVC's
    cache, so git must hold it: `dvc plots diff` and `dvc metrics diff` read another revision's or
    experiment's files from its git tree, and `git checkout` / `dvc exp apply` restore it from
    there. One that git ignored would exist in the workspace alone, and comparing plots against
    HEAD or an experiment would fail to load it."""
    from dvc.repo import Repo

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    with Repo(str(REPO)) as repo:
        uncached = sorted({out.def_path for stage in repo.index.stages for out in stage.outs if not out.use_cache})
    assert "plots/accuracy.json" in uncached and "metrics/summary.json" in uncached, uncached
    untracked = [path for path in uncached
                 if path not in tracked and not any(name.startswith(f"{path}/") for name in tracked)]
    assert not untracked, f"cache: false outputs that git does not track: {untracked}"
