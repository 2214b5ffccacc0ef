"""Fault tolerance: SIGKILL at many moments of fetch, quantize and evaluate (and of `dvc repro`),
corrupted and truncated inputs, the sanity gates on converted and quantized models, and a
read-only or full output directory.

The contract checked everywhere: a stage that dies or fails leaves each of its outputs either as
it was before the run (byte for byte), absent, or complete and correct, never partial; a failure
the user can cause is one `error:` line naming the file; a normal rerun afterwards succeeds.

Every stage runs as its own process on a tiny random ResNet8 (tests/tiny_models.py); pytest never
imports a framework. Exact kill points are injected by tests/faults_helpers.py. Each fault tried is
a row of the table printed at the end of the session and written to <pytest basetemp>/fault_table.txt
(the controller's basetemp when pytest-xdist runs the suite).

The bugs these tests found in stages/ (a half-deleted old directory, stale temporaries breaking
`dvc plots show`, tracebacks for truncated inputs and full disks) are fixed; the tests keep them fixed.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import FAULT_TABLE, REPO, run_module, run_script, session_temp, stage_env

# --------------------------------------------------------------------------- the fault table

FAULTS: list[tuple[str, str, str]] = []
STARTED = time.monotonic()


def record(fault: str, stage: str, outcome: str) -> None:
    FAULTS.append((fault, stage, outcome))


def render_table() -> str:
    header = ("fault", "stage", "outcome")
    rows = [header, *FAULTS]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * 7}")
    lines.append(f"{len(FAULTS)} faults tried; test_faults.py wall time {time.monotonic() - STARTED:.1f} s")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def fault_table(tmp_path_factory):
    """Writes the table when the module is done; tests/conftest.py prints it at the end of the
    session (from the controller, when pytest-xdist runs this module in a worker)."""
    global STARTED
    STARTED = time.monotonic()
    yield
    if FAULTS:
        (session_temp(tmp_path_factory) / FAULT_TABLE).write_text(render_table() + "\n")


# --------------------------------------------------------------------------- tiny projects

KERAS = "models/keras/pretrainedResnet.h5"
ONNX = "models/onnx/resnet8.onnx"
FOLDED = "models/onnx_folded/resnet8.onnx"
DATA = "data/cifar10"
CALIBRATION = "data/calibration"
RANGES = "models/activation_ranges"
PLAIN = "models/plain_int8"  # an adaround output directory holding the folded model as it is (seed_0.onnx)
TINY = {"calibrate": {"samples": 100, "seeds": [0], "validation": 50}, "adaround": {"iterations": 30},
        "evaluate": {"samples": 48}}
DVC = Path(sys.executable).parent / "dvc"


def write_params(project: Path, edits: dict | None = None) -> None:
    """The repository's params.yaml with the tiny settings and `edits` ({group: {key: value}})."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for patch in (TINY, edits or {}):
        for group, values in patch.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    params[group][key].update(value)
                else:
                    params[group][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def quantize_args(dtype: str, model: str, out: str, calibration: str = CALIBRATION) -> list[str]:
    """quantize_ort's and quantize_torch's arguments (`model`: a directory of seed_<seed>.onnx)."""
    return ["--dtype", dtype, "--model", model, "--calibration", calibration, "--ranges", RANGES, "--out", out]


def quantize_outputs(out: str) -> list[str]:
    return [out]


def evaluate_args(variant: str, kind: str, model: str, prefix: str = "", data: str = DATA) -> list[str]:
    return ["--variant", variant, "--kind", kind, "--model", model, "--data", data,
            *evaluate_outputs_args(variant, prefix)]


def evaluate_outputs(variant: str, prefix: str = "") -> list[str]:
    return [f"{prefix}metrics/eval/{variant}.json", f"{prefix}data/predictions/{variant}.npy",
            f"{prefix}plots/confusion/{variant}.csv"]


def evaluate_outputs_args(variant: str, prefix: str = "") -> list[str]:
    metrics, predictions, confusion = evaluate_outputs(variant, prefix)
    return ["--metrics", metrics, "--predictions", predictions, "--confusion", confusion]


def parallel(*jobs: Callable[[], object]) -> list:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


def build_base(project: Path) -> Path:
    """Tiny Keras model and data, its ONNX and folded ONNX, calibration, and one quantized model
    per backend (ort_int8, torch_int8): the previous good outputs the faults must not damage."""
    project.mkdir(parents=True, exist_ok=True)
    write_params(project)
    run_script("tiny_models", KERAS, DATA, cwd=project)
    run_module("stages.convert_onnx", "--keras", KERAS, "--data", DATA, "--out", ONNX,
               "--metrics", "metrics/convert_onnx.json", cwd=project)
    parallel(lambda: run_module("stages.fold_batchnorm", "--onnx", ONNX, "--data", DATA, "--out", FOLDED,
                                "--metrics", "metrics/fold_batchnorm.json", cwd=project),
             lambda: run_module("stages.calibrate", "--data", DATA, "--out", CALIBRATION, cwd=project))
    run_module("stages.activation_ranges", "--model", FOLDED, "--calibration", CALIBRATION, "--out", RANGES,
               cwd=project)
    (project / PLAIN).mkdir(parents=True)
    shutil.copy(project / FOLDED, project / PLAIN / "seed_0.onnx")
    parallel(lambda: run_module("stages.quantize_ort", *quantize_args("int8", PLAIN, "models/ort_int8"), cwd=project),
             lambda: run_module("stages.quantize_torch", *quantize_args("int8", PLAIN, "models/torch_int8"),
                                cwd=project))
    return project


BACKGROUND: dict = {}


@pytest.fixture(scope="module", autouse=True)
def background_work(request, tmp_path_factory):
    """Builds the tiny project, then runs every damaged-input case, in a background thread (one
    process at a time) while the first tests run: wall time, not CPU time, is the budget."""
    items = [i for i in request.session.items if getattr(i, "module", None) is request.module]

    def needed(fixture: str) -> bool:
        return any(fixture in getattr(i, "fixturenames", ()) for i in items)

    pool = ThreadPoolExecutor(max_workers=1)
    if needed("base"):
        base_dir = tmp_path_factory.mktemp("faults_base")
        BACKGROUND["base"] = pool.submit(build_base, base_dir)
        if needed("corrupt_runs"):
            corrupt_dir = tmp_path_factory.mktemp("faults_corrupt") / "project"
            BACKGROUND["corrupt"] = pool.submit(lambda: run_damaged_inputs(BACKGROUND["base"].result(), corrupt_dir))
    yield
    pool.shutdown(wait=True, cancel_futures=True)
    BACKGROUND.clear()


@pytest.fixture(scope="module")
def base(background_work, tmp_path_factory) -> Path:
    if "base" not in BACKGROUND:  # not foreseen at collection: build it now
        return build_base(tmp_path_factory.mktemp("faults_base"))
    return BACKGROUND["base"].result()


def clone(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------- state of outputs

def digest(path: Path):
    """None if absent; a file's sha256; a directory's {relative path: sha256} (hidden files too)."""
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir():
        return tuple(sorted((str(p.relative_to(path)), digest(p)) for p in path.rglob("*") if p.is_file()))
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(project: Path, outputs: list[str]) -> dict:
    return {o: digest(project / o) for o in outputs}


def temporaries(project: Path, outputs: list[str]) -> set[Path]:
    """Temporary siblings (.<name>.*.tmp) that atomic_path makes beside each output."""
    found = set()
    for o in outputs:
        target = project / o
        if target.parent.is_dir():
            found.update(target.parent.glob(f".{target.name}.*.tmp"))
    return found


def label(now, before, final) -> str:
    if now is None:
        return "absent"
    if now == before:
        return "previous"
    if now == final:
        return "new"
    return "PARTIAL/FOREIGN"


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def message_kind(stderr: str) -> str:
    line = last_line(stderr)
    if line.startswith("error:"):
        return "one-line error"
    if "Traceback" in stderr:
        return f"TRACEBACK ({line[:70]})"
    return f"other ({line[:70]})"


def short(path: str) -> str:
    return Path(path).name


# --------------------------------------------------------------------------- SIGKILL machinery

def start(project: Path, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`python ARGV` in its own session (so SIGKILL reaches its whole process group)."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, *argv], cwd=project, env=stage_env(**env), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def sigkill_when(proc: subprocess.Popen, trigger: Callable[[float], bool], timeout: float = 300) -> tuple[bool, float]:
    """Poll every millisecond; SIGKILL the process group once trigger(elapsed) is true.
    Returns (killed by the signal, elapsed seconds); (False, t) when it finished first."""
    t0 = time.monotonic()
    elapsed = 0.0
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        if trigger(elapsed) or elapsed > timeout:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.001)
    returncode = proc.wait()
    assert elapsed <= timeout, f"{proc.args} neither finished nor reached its kill point in {timeout} s"
    return returncode == -signal.SIGKILL, elapsed


def after(seconds: float):
    return lambda project, outputs: (lambda t: t >= seconds)


def new_temporary(min_fraction: float = 0.0, size: int = 0):
    """Trigger: a temporary sibling that was not there before the run appears (and has reached
    `min_fraction` of `size` bytes)."""
    def make(project: Path, outputs: list[str]):
        old = temporaries(project, outputs)

        def fire(_t: float) -> bool:
            for tmp in temporaries(project, outputs) - old:
                try:
                    if not min_fraction or tmp.stat().st_size >= min_fraction * size:
                        return True
                except FileNotFoundError:
                    pass
            return False
        return fire
    return make


def output_replaced(index: int = 0):
    """Trigger: output `index` has just been renamed into place (its inode changed; not its
    mtime, which deleting the files of an old directory changes too)."""
    def make(project: Path, outputs: list[str]):
        path = project / outputs[index]

        def ident():
            try:
                return path.stat().st_ino
            except FileNotFoundError:
                return None
        first = ident()
        return lambda _t: ident() not in (first, None)
    return make


def copy_outputs(source: Path, dest: Path, outputs: list[str]) -> None:
    """Replace each output under `dest` by a real copy of the one under `source` (absent stays absent)."""
    for o in outputs:
        src, dst = source / o, dest / o
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.exists():
            shutil.copyfile(src, dst)


@dataclass
class Kill:
    fault: str
    killed: bool
    elapsed: float
    before: dict
    after: dict
    new_temporaries: list[Path] = field(default_factory=list)
    note: str = ""


def kill_series(project: Path, argv: list[str], outputs: list[str], triggers: list[tuple[str, Callable]],
                stage: str, logs: Path, env: dict | None = None, note: Callable[[Kill], str] | None = None) -> dict:
    """Run the stage once per trigger, each time from the previous good outputs, and SIGKILL it
    there; then rerun it normally. Asserts every output after every kill is its previous state,
    absent, or the rerun's (complete) one, never anything else."""
    env = env or {}
    logs.mkdir(parents=True, exist_ok=True)
    previous = logs / "previous_outputs"
    copy_outputs(project, previous, outputs)
    kills = []
    for i, (fault, make_trigger) in enumerate(triggers):
        copy_outputs(previous, project, outputs)  # every kill starts from the previous good outputs
        before = snapshot(project, outputs)
        old_tmps = temporaries(project, outputs)
        trigger = make_trigger(project, outputs)
        proc = start(project, argv, logs / f"kill{i}.log", **env)
        killed, elapsed = sigkill_when(proc, trigger)
        kill = Kill(fault, killed, elapsed, before, snapshot(project, outputs),
                    sorted(temporaries(project, outputs) - old_tmps))
        if note:
            kill.note = note(kill)
        if not killed:
            assert proc.returncode == 0, (logs / f"kill{i}.log").read_text()[-3000:]
        kills.append(kill)
    rerun = subprocess.run([sys.executable, *argv], cwd=project, env=stage_env(**env), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, f"rerun after SIGKILL failed:\n{rerun.stdout[-2000:]}\n{rerun.stderr[-3000:]}"
    final = snapshot(project, outputs)
    assert all(final[o] is not None for o in outputs)
    same = [o for o in outputs if final[o] == kills[0].before[o]]
    assert not same, f"previous and new {same} are identical: the test could not tell them apart"
    for kill in kills:
        states = {o: label(kill.after[o], kill.before[o], final[o]) for o in outputs}
        what = (f"SIGKILL after {kill.elapsed:.2f} s" if kill.killed
                else f"finished in {kill.elapsed:.2f} s before the kill point")
        outcome = (f"{what}; " + ", ".join(f"{short(o)}={s}" for o, s in states.items())
                   + f"; {len(kill.new_temporaries)} temp left{kill.note}; rerun ok")
        record(kill.fault, stage, outcome)
        for o in outputs:
            assert kill.after[o] in (kill.before[o], None, final[o]), \
                f"{kill.fault}: {o} is neither its previous state, absent, nor complete:\n{outcome}"
    assert any(k.killed for k in kills), "no kill landed while the stage was running"
    return final


# --------------------------------------------------------------------------- 1. SIGKILL: fetch

BIG_MB = int(os.environ.get("FAULTS_BIG_MB", "200"))


def write_big(path: Path, seed: bytes, megabytes: int) -> str:
    """A large stand-in for pretrainedResnet.h5; returns its sha256."""
    block = hashlib.sha256(seed).digest() * (1 << 15)  # 1 MiB
    h = hashlib.sha256()
    with open(path, "wb") as handle:
        for i in range(megabytes):
            chunk = i.to_bytes(8, "little") + block[8:]
            handle.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def test_sigkill_during_fetch_model_keeps_previous_or_nothing_and_rerun_succeeds(tmp_path):
    project, mirror = tmp_path / "project", tmp_path / "mirror"
    project.mkdir(), mirror.mkdir()
    name, out = "pretrainedResnet.h5", KERAS
    argv = ["-m", "stages.fetch_model", "--file", name, "--out", out]
    env = {"RESNET8_MIRROR": str(mirror)}
    size = BIG_MB << 20
    try:
        first = write_big(mirror / name, b"first", BIG_MB)
        write_params(project, {"fetch_model": {"sha256": {name: first}}})
        run_module("stages.fetch_model", "--file", name, "--out", out, cwd=project, **env)
        assert digest(project / out) == first
        # the upstream file changes (new digest pinned): fetch again, and kill it
        second = write_big(mirror / name, b"second", BIG_MB)
        write_params(project, {"fetch_model": {"sha256": {name: second}}})

        def tmp_size(kill: Kill) -> str:
            sizes = [p.stat().st_size for p in kill.new_temporaries]
            return f" ({sizes[0] / size:.0%} of {BIG_MB} MB)" if sizes else ""

        final = kill_series(project, argv, [out], [
            ("SIGKILL at 0.05 s (interpreter start)", after(0.05)),
            ("SIGKILL when the temp file appears", new_temporary()),
            ("SIGKILL mid-copy (temp >= 40 %)", new_temporary(0.4, size)),
            ("SIGKILL while verifying sha256 (temp 100 %)", new_temporary(1.0, size)),
            ("SIGKILL right after the rename", output_replaced(0)),
        ], "fetch_model", tmp_path / "logs", env=env, note=tmp_size)
        assert final[out] == second
    finally:  # hundreds of MB: do not leave them to pytest's retention
        for directory in (mirror, project / "models", tmp_path / "logs"):
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- 1. SIGKILL: quantize

def test_sigkill_during_quantize_ort_at_timed_moments(base, tmp_path):
    project = clone(base, tmp_path / "project")
    write_params(project, {"quantize_ort": {"symmetric_activations": True}})  # so that new != previous
    out = "models/ort_int8"
    argv = ["-m", "stages.quantize_ort", *quantize_args("int8", PLAIN, out)]
    outputs = quantize_outputs(out)
    triggers = [("SIGKILL at 0.3 s", after(0.3)),
                ("SIGKILL when the temp dir appears", new_temporary()),
                ("SIGKILL at 1.0 s", after(1.0))]
    if len(outputs) > 1:
        triggers.append(("SIGKILL when model dir renamed in", output_replaced(0)))
    kill_series(project, argv, outputs, triggers, "quantize_ort int8", tmp_path / "logs")


def test_sigkill_during_quantize_torch_at_timed_moments(base, tmp_path):
    project = clone(base, tmp_path / "project")
    write_params(project, {"quantize_torch": {"per_channel": False}})  # so that new != previous
    out = "models/torch_int8"
    argv = ["-m", "stages.quantize_torch", *quantize_args("int8", PLAIN, out)]
    outputs = quantize_outputs(out)
    triggers = [("SIGKILL at 1.5 s (imports)", after(1.5)),
                ("SIGKILL when the temp dir appears", new_temporary())]
    if len(outputs) > 1:  # the per-layer error is computed after the model is renamed in
        triggers.append(("SIGKILL when model dir renamed in", output_replaced(0)))
    kill_series(project, argv, outputs, triggers, "quantize_torch int8", tmp_path / "logs")


# --------------------------------------------------------------------------- 1. SIGKILL: evaluate

def test_sigkill_during_evaluate_at_timed_moments(base, tmp_path):
    project = clone(base, tmp_path / "project")
    variant = "torch_int8"
    argv = ["-m", "stages.evaluate", *evaluate_args(variant, "torch_quantized", "models/torch_int8/seed_0")]
    outputs = evaluate_outputs(variant)
    write_params(project, {"evaluate": {"samples": 24}})  # the previous good outputs: other params
    run_module(*argv[1:], cwd=project)
    write_params(project)
    kill_series(project, argv, outputs, [
        ("SIGKILL at 0.5 s", after(0.5)),
        ("SIGKILL at 2.0 s", after(2.0)),
        ("SIGKILL when predictions renamed in", output_replaced(1)),
    ], "evaluate torch_int8", tmp_path / "logs")


# --------------------------------------------------------------------------- 1. SIGKILL injected at each step

INJECT_POINTS = {  # which steps of which atomic block (file / dir) to die at
    "evaluate": {"file": ("enter", "partial", "written", "renamed")},
    "quantize_ort": {"dir": ("partial", "removed", "renamed"), "file": ("written",)},
}


@pytest.mark.parametrize("stage", sorted(INJECT_POINTS))
def test_sigkill_injected_at_each_step_of_each_atomic_write(base, tmp_path, stage):
    """The process kills itself (SIGKILL) at exact steps of atomic_path: temp created, temp half
    written, temp complete, old directory removed, renamed. The state left must be exactly what
    atomic_path promises at that step, and a rerun must succeed."""
    project = clone(base, tmp_path / "project")
    if stage == "evaluate":
        variant = "onnx"
        argv = ["stages.evaluate", *evaluate_args(variant, "onnx", ONNX)]
        outputs = evaluate_outputs(variant)
        old_params, new_params = {"evaluate": {"samples": 24}}, {}
    else:
        out = "models/ort_int8"
        argv = ["stages.quantize_ort", *quantize_args("int8", PLAIN, out)]
        outputs = quantize_outputs(out)
        old_params, new_params = {}, {"quantize_ort": {"symmetric_activations": True}}
    inject = ["-m", "tests.faults_helpers", "inject"]

    # a traced normal run makes the previous outputs and lists the atomic blocks in order
    write_params(project, old_params)
    traced = subprocess.run([sys.executable, *inject, "trace", *argv], cwd=project, env=stage_env(),
                            capture_output=True, text=True, timeout=600)
    assert traced.returncode == 0, traced.stderr[-3000:]
    blocks = re.findall(r"faults_helpers: block (\d+) (file|dir) (\S+)", traced.stderr)
    block_output = {}
    for number, kind, target in blocks:
        assert target in outputs, f"{stage} writes {target} atomically, not a declared output"
        block_output[int(number)] = (kind, target)
    assert sorted(t for _, t in block_output.values()) == sorted(outputs), "an output is not written atomically"

    write_params(project, new_params)
    runs = []
    for number, (kind, target) in sorted(block_output.items()):
        for point in INJECT_POINTS[stage][kind]:
            spec = f"{point}:{number}"
            before = snapshot(project, outputs)
            old_tmps = temporaries(project, outputs)
            result = subprocess.run([sys.executable, *inject, spec, *argv], cwd=project, env=stage_env(),
                                    capture_output=True, text=True, timeout=600)
            if point == "removed" and result.returncode == 0:
                record(f"SIGKILL injected at {spec}", stage, "not killed: the commit deletes nothing")
                continue
            assert result.returncode == -signal.SIGKILL, f"{spec}: not killed\n{result.stderr[-3000:]}"
            assert f"SIGKILL at {spec}" in result.stderr
            runs.append((spec, number, point, before, snapshot(project, outputs),
                         sorted(temporaries(project, outputs) - old_tmps)))

    rerun = run_module(*argv, cwd=project, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = snapshot(project, outputs)
    order = [target for _, (_, target) in sorted(block_output.items())]
    for spec, number, point, before, now, tmps in runs:
        allowed = {}  # what atomic_path promises for each output at this step
        for n, (_, target) in block_output.items():
            if n < number or (n == number and point == "renamed"):
                allowed[target] = [final[target]]
            elif n == number and point == "removed":
                allowed[target] = [None, final[target]]  # old deleted, new not yet renamed in (or already)
            else:
                allowed[target] = [before[target]]
        states = ", ".join(f"{short(o)}={label(now[o], before[o], final[o])}" for o in order)
        record(f"SIGKILL injected at {point} of write {number} ({short(block_output[number][1])})",
               stage, f"{states}; {len(tmps)} temp left; rerun ok")
        for o in outputs:
            assert now[o] in allowed[o], (f"{spec}: {o} is {label(now[o], before[o], final[o])}, expected "
                                          f"{' or '.join(label(a, before[o], final[o]) for a in allowed[o])}")
        if point not in ("renamed", "removed"):
            assert len(tmps) == 1, f"{spec}: expected the killed write's temp sibling, found {tmps}"


class PartialOldDirectory(AssertionError):
    """The failure the test below guards against."""


def test_sigkill_while_the_old_output_directory_is_deleted_leaves_old_or_none(base, tmp_path):
    """Found by the timed kills: the window is short but real, for every directory output
    (data/cifar10, data/calibration, models/ort_*, models/torch_*, report's plot directories)."""
    project = clone(base, tmp_path / "project")
    write_params(project, {"quantize_ort": {"symmetric_activations": True}})
    out = "models/ort_int8"
    argv = ["stages.quantize_ort", *quantize_args("int8", PLAIN, out)]
    before = digest(project / out)
    result = subprocess.run([sys.executable, "-m", "tests.faults_helpers", "inject", "removing:1", *argv],
                            cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]  # 0: the commit deletes nothing
    now = digest(project / out)
    left = [name for name, _ in now] if now else []
    rerun = run_module(*argv, cwd=project, check=False)
    final = digest(project / out)
    state = ("previous" if now == before else "absent" if now is None else "new" if now == final
             else f"PARTIAL old dir {left}")
    record("SIGKILL injected while the old output dir is deleted", "quantize_ort",
           f"{out} = {state}; rerun {'ok' if rerun.returncode == 0 else 'FAILED'}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if now not in (before, None, final):
        raise PartialOldDirectory(f"{out} after the kill holds only {left} of the previous {[n for n, _ in before]}")


# --------------------------------------------------------------------------- 1. SIGKILL of dvc repro

DVC_YAML = """\
stages:
  calibrate:
    cmd: python -m stages.calibrate --data data/cifar10 --out data/calibration
    deps: [data/cifar10]
    params: [calibrate]
    outs: [data/calibration]
  quantize_ort:
    cmd: python -m stages.quantize_ort {quantize}
    deps: [models/plain_int8, data/calibration, models/activation_ranges]
    params: [quantize_ort]
    outs: [models/ort_int8]
  evaluate:
    cmd: python -m stages.evaluate {evaluate}
    deps: [models/ort_int8, data/cifar10]
    params: [evaluate]
    outs: [data/predictions/ort_int8.npy, plots/confusion/ort_int8.csv]
    metrics:
      - metrics/eval/ort_int8.json:
          cache: false
"""


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(DVC), *args], cwd=project, env=dvc_env(), capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc_env(**extra: str) -> dict:
    return stage_env(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", **extra)


def kill_dvc_repro(project: Path, pattern: str, delay: float, log: Path, group: bool = True,
                   force: bool = False) -> tuple[bool, str]:
    """`dvc repro [--force]`; SIGKILL it `delay` s after a line matching `pattern` is printed: the
    whole process group (dvc and the running stage), or dvc alone (the stage is left to finish)."""
    import psutil  # dvc's own dependency, no framework

    with open(log, "w") as handle:
        proc = subprocess.Popen([str(DVC), "repro", *(["--force"] if force else [])], cwd=project, env=dvc_env(), stdout=subprocess.PIPE,
                                stderr=handle, text=True, start_new_session=True)
        seen, orphans = [], []
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                time.sleep(delay)
                orphans = psutil.Process(proc.pid).children(recursive=True) if not group else []
                try:
                    if group:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
        proc.stdout.close()
        returncode = proc.wait(timeout=120)
        if orphans:  # what dvc had started keeps running: let it end before the next repro
            psutil.wait_procs(orphans, timeout=120)
    return returncode == -signal.SIGKILL, "".join(seen)


def run_sh(project: Path, *args: str) -> subprocess.CompletedProcess:
    """The README's `./run.sh ARGS` in `project` (run.sh copied in, this test run's virtualenv)."""
    for name in ("run.sh", "requirements.txt"):
        if not (project / name).exists():
            shutil.copy2(REPO / name, project / name)
    return subprocess.run(["bash", str(project / "run.sh"), *args], cwd=project,
                          env=dvc_env(VENV=str(Path(sys.executable).parent.parent)),
                          capture_output=True, text=True, timeout=600)


def dvc_project(base: Path, project: Path) -> list[str]:
    """A DVC project in `project` (calibrate -> quantize_ort -> evaluate on the tiny model), run
    once; returns its outputs."""
    project.mkdir()
    write_params(project)
    for path in (DATA, PLAIN, RANGES):
        src, dst = base / path, project / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    quantize = " ".join(quantize_args("int8", PLAIN, "models/ort_int8"))
    evaluate = " ".join(evaluate_args("ort_int8", "onnx", "models/ort_int8/seed_0/model.onnx"))
    (project / "dvc.yaml").write_text(DVC_YAML.format(quantize=quantize, evaluate=evaluate))
    dvc(project, "init", "--no-scm", "-q")
    first = run_sh(project, "repro")
    assert first.returncode == 0, f"./run.sh repro failed:\n{first.stdout[-3000:]}\n{first.stderr[-3000:]}"
    return [CALIBRATION, *quantize_outputs("models/ort_int8"), *evaluate_outputs("ort_int8")]


def test_sigkill_of_dvc_repro_then_repro_succeeds_and_status_is_clean(base, tmp_path):
    """Each kill is followed by the README's `./run.sh repro`. A kill can land while DVC rewrites
    dvc.lock in place (DVC does not write it atomically); run.sh then restores the copy it kept
    (stages/lib/lockfile_guard.py, tested on its own below)."""
    project = tmp_path / "dvcproject"
    outputs = dvc_project(base, project)
    reference = snapshot(project, outputs)
    assert all(reference.values())

    # New parameters make dvc run stages it has never run with them (no cache to restore from);
    # their expected outputs come from uninterrupted `dvc repro`s in copies, in the background.
    seed = {"calibrate": {"samples": 90}}  # another draw (the copied ranges stay seed 0's)
    symmetric = {**seed, "quantize_ort": {"symmetric_activations": True}}
    samples = {**symmetric, "evaluate": {"samples": 24}}
    scenarios = [  # (fault, params, --force?, printed line to wait for, then seconds, kill the group?)
        ("SIGKILL dvc repro (group) 0.1 s into calibrate", seed, False, r"Running stage 'calibrate'", 0.1, True),
        ("SIGKILL dvc repro (group) mid quantize_ort", symmetric, False, r"Running stage 'quantize_ort'", 0.5, True),
        ("SIGKILL dvc repro (group) 0.1 s into evaluate", samples, False, r"Running stage 'evaluate'", 0.1, True),
        ("SIGKILL dvc repro --force (group) as quantize_ort ends", {}, True,
         r"quantize_ort \w+ seed \d+: .*quantized", 0.0, True),
        ("SIGKILL dvc repro --force alone mid quantize_ort (stage runs on)", {}, True,
         r"Running stage 'quantize_ort'", 0.3, False),
    ]
    copies = []
    for i, (_, edits, *_rest) in enumerate(scenarios[:3]):
        copies.append(shutil.copytree(project, tmp_path / f"reference{i}", symlinks=True))
        write_params(copies[-1], edits)

    def uninterrupted(copy: Path) -> dict:
        dvc(copy, "repro")
        return snapshot(copy, outputs)

    with ThreadPoolExecutor(max_workers=1) as pool:
        expected = [pool.submit(uninterrupted, copy) for copy in copies]
        for i, (fault, edits, force, pattern, delay, group) in enumerate(scenarios):
            write_params(project, edits)
            killed, printed = kill_dvc_repro(project, pattern, delay, tmp_path / f"dvc_kill{i}.log", group, force)
            assert killed, f"{fault}: dvc repro ended before the kill point:\n{printed}"
            rerun = run_sh(project, "repro")
            assert rerun.returncode == 0, \
                f"{fault}: ./run.sh repro after the kill failed:\n{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
            status = dvc(project, "status")
            assert "Data and pipelines are up to date" in status.stdout, f"{fault}: {status.stdout}"
            now = snapshot(project, outputs)
            want = expected[i].result() if i < len(expected) else reference
            wrong = [o for o in outputs if now[o] != want[o]]
            assert not wrong, f"{fault}: after the rerun these differ from an uninterrupted run: {wrong}"
            ran = re.findall(r"Running stage '([^']+)'", rerun.stdout)
            cached = re.findall(r"Stage '([^']+)' is cached", rerun.stdout)
            restored = "dvc.lock was unreadable" in rerun.stderr
            record(fault, "dvc repro", ("dvc.lock cut short, run.sh restored its copy; " if restored else "")
                   + f"then `./run.sh repro` ok: ran {', '.join(ran) or 'nothing'}"
                   + (f"; restored {', '.join(cached)} from cache" if cached else "")
                   + "; status clean; outputs = uninterrupted run's")


@pytest.mark.parametrize("cut", [0, 10], ids=["lock emptied", "lock cut after 10 bytes"])
def test_a_dvc_lock_cut_short_by_a_kill_is_restored_by_run_sh(base, tmp_path, cut):
    """The moment the SIGKILL test above can only hit by chance, made exact: a `dvc repro` with new
    parameters ran, and was killed while DVC rewrote dvc.lock (DVC opens it for writing, which
    empties it, then dumps). DVC then refuses to work; `./run.sh repro` restores the lock it
    copied before that run, and DVC re-runs or restores what changed."""
    project = tmp_path / "dvcproject"
    outputs = dvc_project(base, project)
    write_params(project, {"calibrate": {"samples": 90}, "quantize_ort": {"symmetric_activations": True}})
    done = run_sh(project, "repro")  # copies the lock from before it, then runs the new parameters
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = snapshot(project, outputs)
    lock = project / "dvc.lock"
    lock.write_bytes(lock.read_bytes()[:cut])
    broken = dvc(project, "status", check=False)
    assert broken.returncode != 0 and "dvc.lock" in broken.stderr, broken.stderr[-2000:]

    rerun = run_sh(project, "repro")
    assert rerun.returncode == 0, f"{rerun.stdout[-3000:]}\n{rerun.stderr[-3000:]}"
    said = [line for line in rerun.stderr.splitlines() if "dvc.lock was unreadable" in line]
    assert len(said) == 1 and "restored" in said[0], rerun.stderr[-2000:]
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
    assert snapshot(project, outputs) == uninterrupted
    ran = re.findall(r"Running stage '([^']+)'", rerun.stdout)
    cached = re.findall(r"Stage '([^']+)' is cached", rerun.stdout)
    record(f"dvc.lock cut to {cut} bytes (kill while DVC writes it)", "./run.sh repro",
           f"copy restored; ran {', '.join(ran) or 'nothing'}"
           + (f"; restored {', '.join(cached)} from cache" if cached else "") + "; outputs = uninterrupted run's")


def test_a_dvc_rwlock_cut_short_by_a_kill_is_cleared_by_run_sh(base, tmp_path):
    """DVC rewrites .dvc/tmp/rwlock in place around every stage too; a kill there (seen in the
    SIGKILL test above) leaves it empty, and DVC refuses to run until it is removed."""
    project = tmp_path / "dvcproject"
    outputs = dvc_project(base, project)
    reference = snapshot(project, outputs)
    (project / ".dvc" / "tmp" / "rwlock").write_text("")
    broken = dvc(project, "repro", "--force", check=False)
    assert broken.returncode != 0 and "RWLock" in broken.stderr, broken.stderr[-2000:]
    rerun = run_sh(project, "repro")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sum("rwlock was unreadable" in line for line in rerun.stderr.splitlines()) == 1, rerun.stderr
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
    assert snapshot(project, outputs) == reference
    record(".dvc/tmp/rwlock emptied (kill while DVC writes it)", "./run.sh repro", "removed; repro ok; status clean")


def test_a_cut_dvc_lock_without_a_kept_copy_is_one_error_line(base, tmp_path):
    project = tmp_path / "dvcproject"
    dvc_project(base, project)
    (project / ".dvc" / "tmp" / "dvc.lock.good").unlink(missing_ok=True)  # e.g. dvc repro run by hand only
    lock = project / "dvc.lock"
    lock.write_bytes(b"")
    result = run_sh(project, "repro")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dvc.lock is unreadable"), result.stderr
    assert "git checkout dvc.lock" in lines[0]
    assert lock.read_bytes() == b""  # nothing written
    record("dvc.lock cut, no copy kept", "./run.sh repro", "one error line naming dvc.lock and git checkout")


class StaleTempBreaksDvcPlots(AssertionError):
    """The failure the test below guards against."""


def test_a_temp_left_by_a_killed_evaluate_does_not_break_dvc_plots(base, tmp_path):
    project = tmp_path / "dvcplots"
    project.mkdir()
    write_params(project)
    shutil.copytree(base / DATA, project / DATA)
    (project / ONNX).parent.mkdir(parents=True)
    shutil.copy(base / ONNX, project / ONNX)
    # the confusion plot exactly as the project's dvc.yaml defines it, over the variant it names
    plots = [p for p in yaml.safe_load((REPO / "dvc.yaml").read_text()).get("plots", [])
             if "plots/confusion/" in yaml.safe_dump(p)]
    assert plots, "dvc.yaml defines no plot over plots/confusion"
    variant = Path(next(iter(plots[0]))).stem
    argv = ["stages.evaluate", *evaluate_args(variant, "onnx", ONNX)]
    (project / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"evaluate": {
            "cmd": "python -m " + " ".join(argv),
            "deps": [ONNX, DATA], "params": ["evaluate"],
            "outs": [f"data/predictions/{variant}.npy", f"plots/confusion/{variant}.csv"],
            "metrics": [{f"metrics/eval/{variant}.json": {"cache": False}}]}},
        "plots": plots}, sort_keys=False))
    dvc(project, "init", "--no-scm", "-q")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")  # the project's own ignore rules
    dvc(project, "repro")

    def plot_errors() -> list:
        import json

        shown = dvc(project, "plots", "show", "--json", check=False)
        return json.loads(shown.stdout[shown.stdout.index("{"):]).get("errors") or []

    assert plot_errors() == []
    # evaluate killed with its confusion CSV complete in the temp, not yet renamed
    killed = subprocess.run([sys.executable, "-m", "tests.faults_helpers", "inject", "written:2", *argv],
                            cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stale = sorted(p.name for p in (project / "plots/confusion").glob(".*.tmp"))
    assert stale, "the kill left no temp in plots/confusion"
    dvc(project, "repro")
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
    errors = plot_errors()
    record("SIGKILL mid-write of confusion CSV, then dvc repro", "dvc plots show",
           f"repro ok, status clean; stale {stale[0]} -> "
           + (f"plots show ERROR {errors[0].get('type')}" if errors else "plots show ok"))
    if errors:
        raise StaleTempBreaksDvcPlots(f"stale temp {stale} breaks `dvc plots show`: {errors}")


# --------------------------------------------------------------------------- 2. corrupted and truncated inputs

@dataclass(frozen=True)
class Corrupt:
    id: str
    module: str
    args: tuple
    names: str  # the path the error message must name

    def __str__(self) -> str:
        return self.id


def _q(dtype: str, model: str, case: str, calibration: str = CALIBRATION) -> tuple:
    return tuple(quantize_args(dtype, model, f"out/{case}/model", calibration))


def _e(kind: str, model: str, case: str, data: str = DATA, parent: bool = False) -> tuple:
    args = ["--variant", "x", "--kind", kind, "--model", model, "--data", data,
            "--metrics", f"out/{case}/m.json", "--predictions", f"out/{case}/p.npy", "--confusion", f"out/{case}/c.csv"]
    if parent:
        args += ["--parent", "onnx", "--parent-metrics", "bad/parent.json", "--parent-predictions", "bad/parent_truncated.npy"]
    return tuple(args)


CORRUPT = [
    Corrupt("truncated-h5>convert_onnx", "stages.convert_onnx",
            ("--keras", "bad/pretrainedResnet.h5", "--data", DATA, "--out", "out/c1/resnet8.onnx",
             "--metrics", "out/c1/m.json"), "bad/pretrainedResnet.h5"),
    Corrupt("truncated-onnx>convert_torch", "stages.convert_torch",
            ("--onnx", "bad/truncated.onnx", "--data", DATA, "--out", "out/c3/resnet8.pt2", "--metrics", "out/c3/m.json"),
            "bad/truncated.onnx"),
    Corrupt("truncated-onnx>fold_batchnorm", "stages.fold_batchnorm",
            ("--onnx", "bad/truncated.onnx", "--data", DATA, "--out", "out/c4/f.onnx", "--metrics", "out/c4/m.json"),
            "bad/truncated.onnx"),
    Corrupt("truncated-onnx>quantize_ort", "stages.quantize_ort", _q("int8", "bad/truncated_adaround", "c5"),
            "bad/truncated_adaround/seed_0.onnx"),
    Corrupt("garbage-onnx>evaluate", "stages.evaluate", _e("onnx", "bad/garbage.onnx", "c6"), "bad/garbage.onnx"),
    Corrupt("truncated-onnx>evaluate", "stages.evaluate", _e("onnx", "bad/truncated.onnx", "c7"), "bad/truncated.onnx"),
    Corrupt("truncated-pte>evaluate", "stages.evaluate", _e("executorch", "bad/truncated.pte", "c8"),
            "bad/truncated.pte"),
    Corrupt("truncated-pt2>evaluate", "stages.evaluate", _e("torch", "bad/truncated.pt2", "c18"),
            "bad/truncated.pt2"),
    Corrupt("garbage-tflite>evaluate", "stages.evaluate", _e("tflite", "bad/garbage.tflite", "c19"),
            "bad/garbage.tflite"),
    Corrupt("no-test_images.npy>evaluate", "stages.evaluate", _e("onnx", ONNX, "c9", data="bad/no_test_images"),
            "bad/no_test_images/test_images.npy"),
    Corrupt("no-calibration-dir>quantize_ort", "stages.quantize_ort", _q("int8", PLAIN, "c10", "bad/no_calibration"),
            "bad/no_calibration/seed_0"),
    Corrupt("garbage-parent-metrics>evaluate", "stages.evaluate",
            _e("onnx", ONNX, "c12") + ("--parent", "onnx", "--parent-metrics", "bad/garbage.json",
                                       "--parent-predictions", "bad/parent.npy"), "bad/garbage.json"),
    # truncated or garbage files that once escaped as tracebacks
    Corrupt("truncated-test_images.npy>evaluate", "stages.evaluate",
            _e("onnx", ONNX, "c13", data="bad/truncated_test_images"), "bad/truncated_test_images/test_images.npy"),
    Corrupt("truncated-calibration-images.npy>quantize_ort", "stages.quantize_ort",
            _q("int8", PLAIN, "c14", "bad/truncated_calibration"), "bad/truncated_calibration/seed_0/images.npy"),
    Corrupt("garbage-onnx>quantize_torch", "stages.quantize_torch", _q("uint8", "bad/garbage_adaround", "c15"),
            "bad/garbage_adaround/seed_0.onnx"),
    Corrupt("garbage-onnx>adaround", "stages.adaround",
            ("--dtypes", "int8", "--model", "bad/garbage.onnx", "--calibration", CALIBRATION, "--ranges", RANGES,
             "--out", "out/c16/a", "--metrics", "out/c16/m.json"), "bad/garbage.onnx"),
    Corrupt("truncated-parent-predictions>evaluate", "stages.evaluate", _e("onnx", ONNX, "c17", parent=True),
            "bad/parent_truncated.npy"),
]


def truncate_copy(src: Path, dst: Path, fraction: float = 0.5) -> None:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * fraction)])


def run_damaged_inputs(base: Path, project: Path) -> tuple[Path, dict]:
    """Every damaged-input case run once, one after the other, in one clone of the tiny project."""
    clone(base, project)
    bad = project / "bad"
    bad.mkdir()
    truncate_copy(project / KERAS, bad / "pretrainedResnet.h5")
    truncate_copy(project / ONNX, bad / "truncated.onnx")
    truncate_copy(project / ONNX, bad / "truncated_adaround/seed_0.onnx")
    (bad / "garbage.onnx").write_bytes(hashlib.sha512(b"garbage").digest() * 64)
    shutil.copy(bad / "garbage.onnx", bad / "garbage.tflite")  # LiteRT's interpreter (MLPerf's reference)
    (bad / "garbage_adaround").mkdir()
    shutil.copy(bad / "garbage.onnx", bad / "garbage_adaround/seed_0.onnx")
    truncate_copy(project / "models/torch_int8/seed_0/model.pte", bad / "truncated.pte")
    run_module("stages.convert_torch", "--onnx", ONNX, "--data", DATA, "--out", "bad/float.pt2",
               "--metrics", "bad/convert_torch.json", cwd=project)
    truncate_copy(bad / "float.pt2", bad / "truncated.pt2")
    shutil.copytree(project / DATA, bad / "no_test_images")
    (bad / "no_test_images/test_images.npy").unlink()
    shutil.copytree(project / DATA, bad / "truncated_test_images")
    truncate_copy(project / DATA / "test_images.npy", bad / "truncated_test_images/test_images.npy")
    shutil.copytree(project / CALIBRATION, bad / "truncated_calibration")
    truncate_copy(project / CALIBRATION / "seed_0/images.npy", bad / "truncated_calibration/seed_0/images.npy")
    (bad / "garbage.json").write_text('{"total": 48, "accuracy": ')
    run_module("stages.evaluate", "--variant", "onnx", "--kind", "onnx", "--model", ONNX, "--data", DATA,
               "--metrics", "bad/parent.json", "--predictions", "bad/parent.npy", "--confusion", "bad/parent.csv",
               cwd=project)
    truncate_copy(bad / "parent.npy", bad / "parent_truncated.npy")
    return project, {c.id: run_module(c.module, *c.args, cwd=project, check=False) for c in CORRUPT}


@pytest.fixture(scope="module")
def corrupt_runs(base, tmp_path_factory) -> tuple[Path, dict]:
    if "corrupt" not in BACKGROUND:
        return run_damaged_inputs(base, tmp_path_factory.mktemp("faults_corrupt") / "project")
    return BACKGROUND["corrupt"].result()


def case_outputs(case: Corrupt) -> Path:
    out = next(a for a in case.args if a.startswith("out/"))
    return Path(*Path(out).parts[:2])  # out/<case>


@pytest.mark.parametrize("case", CORRUPT, ids=str)
def test_damaged_input_fails_with_exit_1_and_leaves_no_output(corrupt_runs, case):
    project, results = corrupt_runs
    result = results[case.id]
    out_dir = project / case_outputs(case)
    left = sorted(str(p.relative_to(project)) for p in out_dir.rglob("*")) if out_dir.exists() else []
    damage, stage = case.id.split(">")
    record(damage, stage, f"exit {result.returncode}; {message_kind(result.stderr)}; "
           + (f"LEFT {left}" if left else "no output, no temp"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert left == [], f"{case.id}: left behind {left}"


@pytest.mark.parametrize("case", CORRUPT, ids=str)
def test_damaged_input_is_reported_in_one_error_line_naming_the_file(corrupt_runs, case):
    _, results = corrupt_runs
    result = results[case.id]
    line = last_line(result.stderr)
    assert line.startswith("error:"), f"{case.id}: last stderr line is not an error line:\n{result.stderr[-2000:]}"
    assert case.names in line, f"{case.id}: the message does not name {case.names}: {line}"
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- 3. sanity gates

def test_drift_gate_stops_convert_torch_naming_the_stage_and_the_figure(base, tmp_path):
    project = clone(base, tmp_path / "project")
    write_params(project, {"convert": {"max_abs_diff": 1e-12}})
    out, metrics = "models/torch/resnet8.pt2", "metrics/convert_torch.json"
    result = run_module("stages.convert_torch", "--onnx", ONNX, "--data", DATA, "--out", out, "--metrics", metrics,
                        cwd=project, check=False)
    line = last_line(result.stderr)
    record("outputs drift > convert.max_abs_diff 1e-12", "convert_torch", f"exit {result.returncode}; {line[:110]}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert line.startswith("error: convert_torch:"), line
    assert "convert.max_abs_diff 1e-12" in line
    figure = re.search(r"max \|softmax diff\| ([0-9.eE+-]+)", line)
    assert figure and float(figure.group(1)) > 1e-12, line
    assert not (project / out).exists() and not (project / metrics).exists()
    assert not temporaries(project, [out, metrics])


def test_adaround_images_beyond_a_draw_is_one_error_line_and_no_output(base, tmp_path):
    project = clone(base, tmp_path / "project")
    samples = yaml.safe_load((project / "params.yaml").read_text())["calibrate"]["samples"]
    write_params(project, {"adaround": {"images": samples + 1}})
    out, metrics = "out/a", "out/m.json"
    result = run_module("stages.adaround", "--dtypes", "int8", "--model", FOLDED, "--calibration", CALIBRATION,
                        "--ranges", RANGES, "--out", out, "--metrics", metrics, cwd=project, check=False)
    line = last_line(result.stderr)
    record(f"adaround.images {samples + 1} > calibrate.samples {samples}", "adaround",
           f"exit {result.returncode}; {line[:110]}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert line.startswith(f"error: adaround.images = {samples + 1} is more than the {samples} images"), line
    assert not (project / out).exists() and not (project / metrics).exists()
    assert not temporaries(project, [out, metrics])


def _runs(conv: int, gemm: int, float_layers: list[str]) -> dict:
    """An execution summary (stages.lib.execution) with `conv` of 9 Conv and `gemm` of 1 Gemm integer."""
    return {"layers": {"Conv": f"{conv}/9 integer", "Gemm": f"{gemm}/1 integer", "Add": "3/3 integer"},
            "float_layers": float_layers}


@pytest.mark.parametrize("variant, summary, done, float_named", [
    ("torch_uint8", _runs(0, 0, [f"Conv aten.convolution.default conv{i}" for i in range(9)]
                          + ["Gemm aten.linear.default fc"]), 0, "conv0"),
    ("torch_int8", _runs(9, 0, ["Gemm aten::linear (portable)"]), 9, "aten::linear"),
    ("ort_int8", {"quantized_layers": 9, "float_layers": ["Gemm_0"]}, 9, "Gemm_0"),
    ("ort_uint8", {"quantized_layers": 8, "float_layers": []}, 8, "none"),
])
def test_not_quantized_gate_names_the_variant_and_the_count(variant, summary, done, float_named):
    from stages.lib.errors import PipelineError
    from stages.lib.quant_checks import require_integer_execution, require_quantized

    check = require_integer_execution if variant.startswith("torch") else require_quantized
    with pytest.raises(PipelineError) as info:
        check(variant, summary, 10)
    message = str(info.value)
    record(f"summary: {done} of 10 layers quantized", f"{check.__name__} {variant}", f"PipelineError: {message[:80]}")
    assert message.startswith(f"{variant}: {done} of 10 ")
    assert float_named in message


def test_not_quantized_gate_passes_a_fully_quantized_summary():
    from stages.lib.quant_checks import require_integer_execution, require_quantized

    require_integer_execution("torch_uint8", _runs(9, 1, []), 10)
    require_quantized("ort_int8", {"quantized_layers": 10, "float_layers": []}, 10)


@pytest.mark.parametrize("backend, dtype", [("torch", "uint8"), ("ort", "int8")])
def test_a_quantizer_that_quantizes_nothing_stops_the_stage(base, tmp_path, backend, dtype):
    """The quantizer is sabotaged in a subprocess (torch: a PT2E quantizer that annotates nothing; ORT: only Relu
    quantized): the stage must refuse the float model, name the variant and the count, and
    leave no output (and no previous output damaged)."""
    project = clone(base, tmp_path / "project")
    variant = f"{backend}_{dtype}"
    out = f"models/{variant}_sabotaged"
    outputs = quantize_outputs(out)
    result = subprocess.run([sys.executable, "-m", "tests.faults_helpers", f"{backend}-float",
                             *quantize_args(dtype, PLAIN, out)], cwd=project, env=stage_env(),
                            capture_output=True, text=True, timeout=600)
    line = last_line(result.stderr)
    record(f"quantizer leaves every layer float ({'annotates nothing' if backend == 'torch' else 'Relu only'})",
           f"quantize_{backend} {dtype}", f"exit {result.returncode}; {line[:100]}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert line.startswith(f"error: {variant}: 0 of 10 "), line
    assert all(digest(project / o) is None for o in outputs), "a not-quantized model was let out"
    assert not temporaries(project, outputs)


# --------------------------------------------------------------------------- 4. read-only and full output directory

class Tmpfs:
    """A tmpfs mounted on `path` (root only); pytest.skip when mounting is not possible."""

    def __init__(self, path: Path, size: str) -> None:
        self.path, self.size = path, size

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a size-limited tmpfs")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        return self

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)

    def __exit__(self, *exc) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class ReadOnly:
    """Makes `directory` unwritable: chmod 0o555 for a normal user; as root (chmod does not stop
    root) a tmpfs mounted there and remounted read-only. Skips if neither works."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mount = None

    def __enter__(self) -> "ReadOnly":
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.mount = Tmpfs(self.directory, "64m").__enter__()
        return self

    def lock(self) -> None:
        if self.mount:
            self.mount.remount("ro")
        else:
            for d in [self.directory, *(p for p in self.directory.rglob("*") if p.is_dir())]:
                d.chmod(0o555)
        probe = self.directory / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return
        probe.unlink()
        self.unlock()
        pytest.skip(f"{self.directory} stays writable (chmod ineffective)")

    def unlock(self) -> None:
        if self.mount:
            self.mount.remount("rw")
        else:
            for d in [self.directory, *(p for p in self.directory.rglob("*") if p.is_dir())]:
                d.chmod(0o755)

    def __exit__(self, *exc) -> None:
        self.unlock()
        if self.mount:
            self.mount.__exit__(*exc)


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory` to the last byte; returns the filler file."""
    filler = directory / "filler.bin"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as handle:
        while len(chunk) >= 1:
            try:
                handle.write(chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
    return filler


def fs_fault(project: Path, name: str, stage: str, argv: list[str], outputs: list[str], break_it, repair,
             env: dict | None = None) -> None:
    """Previous outputs are in place; break_it() makes the output directory unwritable; the stage
    must fail with one error line and leave them untouched with no temp files; after repair() a
    rerun succeeds."""
    env = env or {}
    before = snapshot(project, outputs)
    assert all(before.values())
    break_it()
    result = subprocess.run([sys.executable, *argv], cwd=project, env=stage_env(**env), capture_output=True,
                            text=True, timeout=600)
    now, tmps = snapshot(project, outputs), temporaries(project, outputs)
    repair()
    rerun = subprocess.run([sys.executable, *argv], cwd=project, env=stage_env(**env), capture_output=True,
                           text=True, timeout=600)
    final = snapshot(project, outputs)
    states = ", ".join(f"{short(o)}={label(now[o], before[o], final[o])}" for o in outputs)
    record(name, stage, f"exit {result.returncode}; {message_kind(result.stderr)}; {states}; "
           f"{len(tmps)} temp left; rerun {'ok' if rerun.returncode == 0 else 'FAILED'}")
    assert result.returncode != 0, f"{name}: {stage} succeeded on an unwritable directory"
    assert last_line(result.stderr).startswith("error:"), f"{name}: {stage} ended without one error line"
    assert now == before, f"{name}: {stage} changed its previous outputs: {states}"
    assert not tmps, f"{name}: temp files left: {tmps}"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert final != before


OUT_ORT_INT8 = "out/models/ort_int8"


def previous_outputs_under_out(project: Path) -> tuple[list[str], list[str]]:
    """Good evaluate (onnx) and quantize_ort (int8) outputs under out/, then a parameter change so
    both must run again; returns their command lines."""
    eval_argv = ["-m", "stages.evaluate", *evaluate_args("onnx", "onnx", ONNX, prefix="out/")]
    write_params(project, {"evaluate": {"samples": 24}})
    run_module(*eval_argv[1:], cwd=project)
    q_argv = ["-m", "stages.quantize_ort",
              *quantize_args("int8", PLAIN, OUT_ORT_INT8)]
    run_module(*q_argv[1:], cwd=project)
    write_params(project, {"quantize_ort": {"symmetric_activations": True}})
    return eval_argv, q_argv


def test_read_only_output_directory_keeps_previous_outputs(base, tmp_path):
    project = clone(base, tmp_path / "project")
    with ReadOnly(project / "out") as ro:
        eval_argv, q_argv = previous_outputs_under_out(project)
        fs_fault(project, "read-only output directory", "evaluate", eval_argv, evaluate_outputs("onnx", "out/"),
                 ro.lock, ro.unlock)
        fs_fault(project, "read-only output directory", "quantize_ort int8", q_argv,
                 quantize_outputs(OUT_ORT_INT8), ro.lock, ro.unlock)


def test_full_output_file_system_keeps_previous_outputs(base, tmp_path):
    project = clone(base, tmp_path / "project")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with Tmpfs(project / "out", "12m"):
        eval_argv, q_argv = previous_outputs_under_out(project)
        filler = []
        fs_fault(project, "full output file system (ENOSPC)", "evaluate", eval_argv,
                 evaluate_outputs("onnx", "out/"), lambda: filler.append(fill(project / "out")),
                 lambda: filler.pop().unlink())
        fs_fault(project, "full output file system (ENOSPC)", "quantize_ort int8", q_argv,
                 quantize_outputs(OUT_ORT_INT8), lambda: filler.append(fill(project / "out")),
                 lambda: filler.pop().unlink())
        # fetch_model: a 5 MB file already there, a new 5 MB one cannot be copied beside it
        name, target = "pretrainedResnet.h5", "out/pretrainedResnet.h5"
        env = {"RESNET8_MIRROR": str(mirror)}
        first = write_big(mirror / name, b"first", 5)
        write_params(project, {"fetch_model": {"sha256": {name: first}}})
        run_module("stages.fetch_model", "--file", name, "--out", target, cwd=project, **env)
        second = write_big(mirror / name, b"second", 5)
        write_params(project, {"fetch_model": {"sha256": {name: second}}})
        ballast = project / "out/ballast.bin"

        def leave_2_mb() -> None:  # room for the start of the copy, not for all 5 MB of it
            stat = os.statvfs(project / "out")
            ballast.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - (2 << 20)))

        fs_fault(project, "full output file system (ENOSPC)", "fetch_model",
                 ["-m", "stages.fetch_model", "--file", name, "--out", target], [target],
                 leave_2_mb, lambda: ballast.unlink(), env=env)
