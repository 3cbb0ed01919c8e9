"""The benchmark still runs and prints its tables (figures are its own business, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_quick_benchmark_prints_cpu_and_upsert_tables() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--repeat", "2", "--only", "cpu", "--only", "upsert",
         "--databases", "sqlite"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("|") and line.strip("| ").startswith("sqlite")
    ]
    cpu, upsert = rows  # one row per table
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    assert cpu[1] == "3,000" and number(cpu[3]) > 0 and number(cpu[4]) > 0  # process cpu s, attempts per cpu-s
    low, high = (number(end) for end in cpu[5].split("–"))  # the range over both runs holds the median
    assert low <= number(cpu[4]) <= high
    assert upsert[1] == "2,000" and all(number(cell) > 0 for cell in upsert[2:5])
    assert "dlt side by side" not in done.stdout  # not asked for
