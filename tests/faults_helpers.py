"""Fault injection for tests/test_faults.py, run in its own process (never imported by pytest):

    python -m tests.faults_helpers inject SPEC MODULE ARGS...
        Run `python -m MODULE ARGS...` with stages.lib.files.atomic_path wrapped so that the
        process SIGKILLs itself at one exact step of one atomic write:
          SPEC = trace            no kill; log every atomic block (number, target, kind)
          SPEC = enter:N          block N's temporary sibling exists, nothing written yet
          SPEC = partial:N        block N's temporary is complete, then cut to half its size
          SPEC = written:N        block N's temporary is complete, not yet renamed
          SPEC = removing:N       block N is complete and being committed: killed inside the first
                                  deletion done then (the old target directory), right after its
                                  first file is unlinked; not killed if the commit deletes nothing
          SPEC = removed:N        block N is complete and being committed: killed right after the
                                  first deletion done then (today: the old target directory, before
                                  the new one is renamed in); not killed if the commit deletes nothing
          SPEC = renamed:N        block N was just renamed onto its target
        Each block is logged on stderr as `faults_helpers: block N <file|dir> TARGET`, and the
        kill as `faults_helpers: SIGKILL at SPEC`.

    python -m tests.faults_helpers torch-float ARGS...
        stages.quantize_torch with torch_quant.quantizer returning a PT2E quantizer that annotates nothing,
        so the quantizer leaves every layer in float.

    python -m tests.faults_helpers ort-float ARGS...
        stages.quantize_ort with onnxruntime's quantize_static told to quantize only Relu, so
        every Conv and the Dense layer stay float.

Frameworks are imported only inside the subcommands, in this process, never in pytest's.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
from pathlib import Path

POINTS = ("enter", "partial", "written", "removing", "removed", "renamed")


def log(message: str) -> None:
    print(f"faults_helpers: {message}", file=sys.stderr, flush=True)


def die(spec: str) -> None:
    log(f"SIGKILL at {spec}")
    os.kill(os.getpid(), signal.SIGKILL)


def halve(tmp: Path) -> None:
    """Cut the temporary (or the largest file in a temporary directory) to half its size."""
    files = [tmp] if tmp.is_file() else sorted((p for p in tmp.rglob("*") if p.is_file()),
                                               key=lambda p: p.stat().st_size)
    if files:
        victim = files[-1]
        with open(victim, "r+b") as handle:
            handle.truncate(victim.stat().st_size // 2)


def run_stage(module: str, args: list[str]) -> None:
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def inject(spec: str, module: str, args: list[str]) -> None:
    from stages.lib import files

    point, _, number = spec.partition(":")
    if point != "trace" and (point not in POINTS or not number.isdigit()):
        raise SystemExit(f"faults_helpers: bad SPEC {spec!r}; expected trace or one of {POINTS} ':N'")
    wanted = int(number) if number else 0
    original, original_remove = files.atomic_path, files._remove
    state = {"block": 0, "target": None, "committing": False}

    def kill_here(here: str, block: int) -> None:
        if point == here and block == wanted:
            die(spec)

    @contextlib.contextmanager
    def atomic_path(target, directory: bool = False):
        state["block"] += 1
        block = state["block"]
        state["target"] = Path(target)
        log(f"block {block} {'dir' if directory else 'file'} {target}")
        with original(target, directory) as tmp:
            kill_here("enter", block)
            yield tmp
            kill_here("written", block)
            if point == "partial" and block == wanted:
                halve(Path(tmp))
                die(spec)
            state["committing"] = True  # what follows is atomic_path's own commit
        state["committing"] = False
        kill_here("renamed", block)

    def remove(path) -> None:
        committing = state["committing"] and state["block"] == wanted
        if committing and point == "removing" and Path(path).is_dir():
            unlink = os.unlink

            def unlink_then_die(*args, **kwargs):
                unlink(*args, **kwargs)
                die(spec)

            os.unlink = unlink_then_die  # shutil.rmtree looks os.unlink up at each call
            try:
                original_remove(path)
            finally:
                os.unlink = unlink
        else:
            original_remove(path)
        if committing:
            kill_here("removed", state["block"])

    files.atomic_path = atomic_path  # stage modules bind it by name when run_stage imports them
    files._remove = remove
    run_stage(module, args)


def torch_float(args: list[str]) -> None:
    from torchao.quantization.pt2e.quantizer import Quantizer

    from stages.lib import torch_quant

    class Nothing(Quantizer):
        def annotate(self, model):
            return model

        def validate(self, model) -> None:
            pass

    torch_quant.quantizer = lambda *a, **k: Nothing()  # quantize nothing
    run_stage("stages.quantize_torch", args)


def ort_float(args: list[str]) -> None:
    import onnxruntime.quantization as q

    original = q.quantize_static

    def relu_only(*a, **k):
        k["op_types_to_quantize"] = ["Relu"]
        return original(*a, **k)

    q.quantize_static = relu_only  # quantize_ort imports it at call time
    run_stage("stages.quantize_ort", args)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "inject":
        inject(rest[0], rest[1], rest[2:])
    elif command == "torch-float":
        torch_float(rest)
    elif command == "ort-float":
        ort_float(rest)
    else:
        raise SystemExit(f"faults_helpers: unknown command {command!r}")
