"""Not a stage: the spread of each quantized variant's accuracy over calibration seeds, read from
`dvc exp show --json --all-commits` (the workspace, the commits and their experiments).

    python -m stages.seed_spread

Rows are grouped by calibrate.seed; runs that differ in any other parameter are left out, so
the spread measures the calibration draw alone.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys


def runs(listing: list) -> list[dict]:
    """Flatten dvc exp show --json into {params, summary} dicts."""
    found = []

    def add(entry: dict) -> None:
        data = entry.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data")
        summary = (data.get("metrics") or {}).get("metrics/summary.json", {}).get("data")
        if params and summary:
            found.append({"name": entry.get("name") or data.get("rev"), "params": params, "summary": summary})

    for commit in listing:
        add(commit)
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                add(revision)
    return found


def without_seed(params: dict) -> str:
    reduced = json.loads(json.dumps(params))
    reduced["calibrate"].pop("seed", None)
    return json.dumps(reduced, sort_keys=True)


def main() -> None:
    shown = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True, text=True, check=True)
    found = runs(json.loads(shown.stdout))
    if not found:
        sys.exit("seed_spread: no runs with metrics/summary.json (run dvc repro / dvc exp run first)")
    reference = without_seed(found[0]["params"])
    by_seed = {}
    for run in found:
        if without_seed(run["params"]) == reference:
            by_seed.setdefault(run["params"]["calibrate"]["seed"], run["summary"])
    seeds = sorted(by_seed)
    variants = [v for v, s in by_seed[seeds[0]].items() if v not in ("keras", "onnx", "torch") and not s.get("reference")]
    print(f"calibration seeds: {seeds}")
    print(f"{'variant':<14} " + " ".join(f"seed {s:<4}" for s in seeds) + "   mean    min     max     std")
    for variant in variants:
        values = [by_seed[s][variant]["accuracy"] for s in seeds if variant in by_seed[s]]
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        print(f"{variant:<14} " + " ".join(f"{v:.4f}   " for v in values)
              + f" {statistics.mean(values):.4f}  {min(values):.4f}  {max(values):.4f}  {spread:.4f}")


if __name__ == "__main__":
    main()
