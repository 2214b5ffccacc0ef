"""Not a stage: copy the generated results table from reports/quantization.md into README.md
(between the `results-table` markers), so that the README shows what the pipeline produced.

    python -m stages.update_readme
"""
from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def main() -> None:
    report = Path("reports/quantization.md").read_text()
    table = re.search(r"\| variant \|.*?\n(?:\|.*\n)+", report).group(0)
    readme = Path("README.md")
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{table}{END}{after}")
    print("README.md: results table updated from reports/quantization.md")


if __name__ == "__main__":
    main()
