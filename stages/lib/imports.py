"""The modules under stages/ that a stage's code imports, directly or through other modules, read
from the source (every import statement, also those inside functions). dvc.yaml must list each as
a dependency of the stage, so that an edit to any of them re-runs it (tests check this)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "stages"


def _module_file(root: Path, dotted: str) -> Path | None:
    path = root / Path(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imported(root: Path, file: Path) -> set[str]:
    """Dotted names of the project modules that `file` imports."""
    package = ".".join(file.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from .lib import cifar10`
    return {name for name in found if _module_file(root, name) is not None}


def closure(root: Path, module: str) -> list[str]:
    """Paths (relative to `root`, posix) of `module` and every project module it imports, and the
    packages around them (Python runs a package's __init__ before any module in it), leaving out
    the packages' empty __init__ files."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imported(root, _module_file(root, name)))
        todo.extend(".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1))
    files = {_module_file(root, name) for name in seen}
    return sorted(f.relative_to(root).as_posix() for f in files if not _only_docstring(f))


def _only_docstring(file: Path) -> bool:
    body = ast.parse(file.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)
