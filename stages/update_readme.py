"""Not a stage: copy the generated tables from reports/quantization.md into README.md (the
variants table between the `results-table` markers, the per-seed table between the `seeds-table`
markers), so that the README shows what the pipeline produced and nothing typed by hand.

    python -m stages.update_readme
"""
from __future__ import annotations

import re
from pathlib import Path

TABLES = {"results-table": r"\| variant \| parent \|", "seeds-table": r"\| variant \| seed "}


def table(report: str, header: str) -> str:
    found = re.search(header + r".*?\n(?:\|.*\n)+", report)
    if found is None:
        raise SystemExit(f"update_readme: no table starting with {header!r} in reports/quantization.md")
    return found.group(0)


def main() -> None:
    report = Path("reports/quantization.md").read_text()
    readme = Path("README.md")
    text = readme.read_text()
    for marker, header in TABLES.items():
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{table(report, header)}{end}{after}"
    readme.write_text(text)
    print("README.md: results and seeds tables updated from reports/quantization.md")


if __name__ == "__main__":
    main()
