"""Run several stages as children of one process that loaded the frameworks once, for the emulated
CPU (tests/test_stages_frameworks.py), where loading them is slow (on a 2-core AMD EPYC, under
QEMU `import torch` alone took 10.7 s, with ExecuTorch's lowering 24.5 s, against 1.8 s and 4.7 s
natively):

    python -m tests.emulated_stages SPEC.json

SPEC: {"at_once": N, "preload": [module, ...], "stages": [{"module", "args", "cwd", "log"}, ...]}.
The process applies what each stage applies first (`import stages`: the thread budget from the
environment; the warnings policy), imports the `preload` modules, prints what CPU numpy and torch
detected, then forks one child per stage, at most `at_once` at a time, in the order given: the
child changes to the stage's project, writes its output to its log and runs the stage's module as
`python -m` would. It prints one JSON line per stage, {"module", "returncode"}, in the order given,
and exits 1 if any stage failed. A stage imports the rest of what it uses itself, as it would
alone; only the frameworks' start-up is shared."""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback
from pathlib import Path


def run_stage(stage: dict) -> int:
    """In the forked child: the stage's module as __main__; its exit code."""
    os.chdir(stage["cwd"])
    log = os.open(stage["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = [stage["module"], *stage["args"]]
    sys.path[0] = stage["cwd"]  # `python -m` puts the working directory first
    try:
        runpy.run_module(stage["module"], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    threads = len(os.listdir("/proc/self/task"))  # under QEMU its own RCU thread is one of them
    import stages  # noqa: F401  (the thread budget, before any framework loads)
    from stages.lib import warnings_policy

    warnings_policy.install()
    for name in spec["preload"]:
        importlib.import_module(name)
    import numpy
    import torch

    if len(os.listdir("/proc/self/task")) != threads:  # QEMU aborts a forked child of a process
        # that had started threads, when the child starts one (qemu_plugin_vcpu_init_hook)
        sys.exit(f"emulated_stages: loading {spec['preload']} started a thread; "
                 "under QEMU a forked child of this process could not start threads")
    print(json.dumps({"numpy_avx512f": bool(numpy._core._multiarray_umath.__cpu_features__["AVX512F"]),
                      "torch_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    pending, running, codes = list(enumerate(spec["stages"])), {}, {}
    while pending or running:
        while pending and len(running) < spec["at_once"]:
            index, stage = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_stage(stage)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = index
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    for index, stage in enumerate(spec["stages"]):
        print(json.dumps({"module": stage["module"], "returncode": codes[index]}))
    sys.exit(1 if any(codes.values()) else 0)


if __name__ == "__main__":
    main()
