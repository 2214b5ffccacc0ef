"""Benchmark of the pipeline's wall time: prints figures, asserts nothing (not a test).

    ./run.sh python -m benchmark.pipeline [--sweep] [--keep DIR]
    ./run.sh python -m benchmark.pipeline --sweep-only [--sweep-seeds N] [--cache DIR]

In a scratch copy of this checkout (git-tracked files only; the model from $RESNET8_MIRROR, the
npm tarball from npm's cache):
  1. `dvc repro` of the fetch stages (not timed: downloads are excluded from the targets);
  2. `dvc repro -f` of everything else, stage by stage from the time each "Running stage" line
     appears: the full run with the default calibration seeds, and the CPU time it used (with all
     CPUs busy all the time, the wall time could not be less than that divided by the CPUs);
  3. no-op `dvc repro`, median of 5;
  4. `dvc exp run -S calibrate.percentile=99.98`: a one-parameter experiment that re-runs the
     quantize path only (ranges, AdaRound, both quantizers, their evaluations), then
     `-S quantize_ort.per_channel=false`, which re-runs ONNX Runtime's quantizer and what follows it,
     then the first kind again with one calibration draw (`-S calibrate.seeds=[0]` beside it: what
     fewer draws alone give; not a target);
  5. with --sweep: 4 queued experiments run with `dvc queue start -j 1`, then with `-j 2` and
     RESNET8_PARALLEL_STAGES=2 (the thread budget): same results, and the wall time of each.
Targets (issue 12): 2. <= 240 s on 2 cores, 4. <= 60 s, 3. <= 2 s, 5. -j 2 no slower than -j 1.
--sweep-only runs 5 alone; with it, --sweep-seeds N gives the experiments the first N calibration
seeds (a shorter sweep), and --cache DIR starts each sweep from a hard-linked copy of that DVC
cache (e.g. this checkout's .dvc/cache), so that the stages the experiments do not change are
restored from its run cache instead of re-run, and neither sweep can restore what the other
computed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FETCH = ["fetch_model@keras", "fetch_model@mlperf_int8", "fetch_cifar10"]
TARGETS = {"full": 240.0, "experiment": 60.0, "noop": 2.0}
# One-parameter experiments, each applied on top of the one before: the first re-runs the quantize
# path from the activation ranges on (ranges, AdaRound, both quantizers, their evaluations); the
# second only ONNX Runtime's quantizer and what depends on it, the cheapest kind of experiment.
EXPERIMENTS = [(["calibrate.percentile=99.98"], "ranges, AdaRound, both quantizers"),
               (["quantize_ort.per_channel=false"], "ONNX Runtime's quantizer only"),
               (["calibrate.percentile=99.97", "calibrate.seeds=[0]"], "the first kind with one calibration draw")]


def machine() -> str:
    flags = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", flags)
    kinds = sorted(set(re.findall(r"\b(avx512_vnni|avx512f|amx_tile|avx2)\b", flags)))
    return (f"{model.group(1) if model else platform.processor()}, {len(os.sched_getaffinity(0))} CPUs "
            f"usable, {' '.join(kinds)}")


def env(**extra: str) -> dict:
    out = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out["PATH"]
    out.update(extra)
    return out


def run(project: Path, *command: str, **extra: str) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(command, cwd=project, env=env(**extra), capture_output=True, text=True)
    took = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"benchmark: {' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return took, result.stdout + result.stderr


def cpu_of_children() -> float:
    """User + system CPU seconds of every finished child process and their reaped descendants (the
    stages and their seed workers, waited for by dvc and by the stages)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed_repro(project: Path, *args: str) -> tuple[float, dict[str, float], float]:
    """`dvc repro ARGS`: its wall time, each stage's wall time from the moments its "Running stage"
    line appears, and the CPU time it used (dvc and every stage process, fetch stages included)."""
    cpu = cpu_of_children()
    start = time.monotonic()
    proc = subprocess.Popen(["dvc", "repro", *args], cwd=project, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marks, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            marks.append((found.group(1), time.monotonic()))
    if proc.wait() != 0:
        sys.exit("benchmark: dvc repro failed:\n" + "".join(lines[-60:]))
    end = time.monotonic()
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - at for i, (name, at) in enumerate(marks)}
    return end - start, stages, cpu_of_children() - cpu


def scratch_copy(destination: Path, seeds: int | None = None) -> Path:
    project = destination / "project"
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file() and not name.startswith("metrics/"):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    if seeds is not None:
        import yaml

        params = yaml.safe_load((project / "params.yaml").read_text())
        params["calibrate"]["seeds"] = params["calibrate"]["seeds"][:seeds]
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "snapshot"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    return project


def use_cache_copy(project: Path, source: Path, name: str) -> None:
    """Give `project` a hard-linked copy of the DVC cache `source` (its run cache included): each
    sweep starts from the same cache, and what one sweep adds cannot serve the other."""
    copy = project.parent / name
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-al", str(source.resolve()), str(copy)], check=True)
    subprocess.run(["dvc", "cache", "dir", "--local", str(copy)], cwd=project, env=env(), check=True,
                   capture_output=True)


def sweep(project: Path, jobs: int) -> tuple[float, dict]:
    values = ["99.91", "99.93", "99.97", "99.993"]  # values no earlier run has cached
    run(project, "dvc", "exp", "remove", "--all-commits", "-q")
    run(project, "dvc", "exp", "run", "--queue", "-S", "calibrate.percentile=" + ",".join(values))
    extra = {"RESNET8_PARALLEL_STAGES": str(jobs)}
    start = time.monotonic()
    run(project, "dvc", "queue", "start", "-j", str(jobs), **extra)
    while True:
        _, status = run(project, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    took = time.monotonic() - start
    _, shown = run(project, "dvc", "exp", "show", "--json")
    results = {}
    for commit in json.loads(shown):
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                data = revision.get("data", {})
                percentile = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("calibrate", {}).get("percentile")
                summary = data.get("metrics", {}).get("metrics/summary.json", {}).get("data", {})
                if summary:
                    results[str(percentile)] = {v: s.get("accuracy") for v, s in summary.items()}
    return took, results


def print_sweep(project: Path, seeds: int | None, cache: Path | None) -> None:
    if cache is not None:
        use_cache_copy(project, cache, "cache-j1")
    one, first = sweep(project, 1)
    print(f"4-experiment sweep, -j 1: {one:.1f} s", flush=True)
    if cache is not None:
        use_cache_copy(project, cache, "cache-j2")
    two, second = sweep(project, 2)
    same = first == second and len(first) == 4
    print(f"4-experiment sweep ({'all' if seeds is None else seeds} calibration seed(s) each): -j 1 {one:.1f} s, "
          f"-j 2 (RESNET8_PARALLEL_STAGES=2) {two:.1f} s; same accuracies: {'yes' if same else 'NO'}")
    for value in sorted(first):
        print(f"  percentile {value}: -j 1 {first[value]}")
        print(f"  {'':15} -j 2 {second.get(value)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time a 4-experiment queue at -j 1 and -j 2")
    parser.add_argument("--sweep-only", action="store_true", help="time the sweep alone")
    parser.add_argument("--sweep-seeds", type=int, help="with --sweep-only: the experiments use the first N seeds")
    parser.add_argument("--cache", type=Path, help="with --sweep-only: start each sweep from a copy of this DVC cache")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    if (args.sweep_seeds is not None or args.cache is not None) and not args.sweep_only:
        parser.error("--sweep-seeds and --cache go with --sweep-only (the full-run figures use every seed)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="resnet8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    try:
        project = scratch_copy(work, args.sweep_seeds)
        if args.sweep_only:
            print_sweep(project, args.sweep_seeds, args.cache)
        else:
            figures(project, args.sweep)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def figures(project: Path, with_sweep: bool) -> None:
    """Steps 1-4, and 5 with `with_sweep`."""
    fetch, _ = run(project, "dvc", "repro", *FETCH)
    print(f"fetch stages (not counted): {fetch:.1f} s")
    total, stages, cpu = timed_repro(project, "-f")
    counted = total - sum(t for name, t in stages.items() if name in FETCH)
    cpus = len(os.sched_getaffinity(0))
    print(f"full dvc repro -f, {len(stages)} stages: {total:.1f} s; without the fetch "
          f"stages {counted:.1f} s (target <= {TARGETS['full']:.0f} s)")
    print(f"  CPU used, fetch stages included: {cpu:.1f} s; spread over all {cpus} CPUs without a moment "
          f"idle that alone takes {cpu / cpus:.1f} s")
    for name, took in sorted(stages.items(), key=lambda item: -item[1]):
        print(f"  {name:<36} {took:6.1f} s")
    noop = statistics.median(run(project, "dvc", "repro")[0] for _ in range(5))
    print(f"no-op dvc repro, median of 5: {noop:.2f} s (target <= {TARGETS['noop']:.0f} s)")
    for settings, what in EXPERIMENTS:
        experiment, output = run(project, "dvc", "exp", "run", *(f for setting in settings for f in ("-S", setting)))
        ran = sorted(set(re.findall(r"Running stage '([^']+)'", output)))
        shown = " ".join(f"-S {setting}" for setting in settings)
        target = f"target <= {TARGETS['experiment']:.0f} s" if len(settings) == 1 else "not a target"
        print(f"{'one-parameter ' if len(settings) == 1 else ''}experiment {shown} ({what}): {experiment:.1f} s, "
              f"{len(ran)} stages re-run ({target})", flush=True)
    if with_sweep:
        print_sweep(project, None, None)


if __name__ == "__main__":
    main()
