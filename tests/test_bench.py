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


def test_the_quick_w2_scenario_prints_its_tables_and_the_nightly_data_is_exact() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "w2", "--databases", "sqlite"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    tables = _tables(done.stdout)
    number = lambda cell: float(cell.replace(",", ""))  # noqa: E731
    (wall,) = tables["W2 full walk"]
    assert wall["attempts"] == "7,500" and number(wall["requests"]) > 0 and number(wall["wall s"]) > 0
    (cpu,) = tables["W2 CPU at 0 ms"]
    assert cpu["requests"] == cpu["floor requests"]  # the floor fetched exactly the pages the sync did
    assert number(cpu["floor cpu s"]) > 0 and number(cpu["attempts per cpu-s"]) > 0
    (memory,) = tables["Peak RSS"]
    assert memory["W2 ÷ 10"].startswith("750: ") and memory["W2"].startswith("7,500: ")
    default, realistic = tables["Nightly"]
    for nightly in (default, realistic):
        assert nightly["attempts vs server"].startswith("exact: 7,575 = 7,575"), nightly  # as the server has them
        assert number(nightly["nightly requests"]) < number(nightly["full requests"])
    routes = {row["route"] for row in tables["Requests by route"]}
    assert "v2.5/admin/users/{user_id}/batches/" in routes
    assert "W2 beside dlt: skipped" in done.stdout  # not asked for


def _tables(stdout: str) -> dict[str, list[dict[str, str]]]:
    """Each printed table's sqlite rows, by the start of its title, as {column: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    title, header = "", []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line and not line.startswith("|"):
            title = line
        elif cells[0] == "db":
            header = cells
        elif cells[0] == "sqlite":
            prefix = next(name for name in ("W2 full walk", "W2 CPU at 0 ms", "Peak RSS", "Nightly", "Requests by route")
                          if title.startswith(name))  # fmt: skip
            tables.setdefault(prefix, []).append(dict(zip(header, cells, strict=True)))
    return tables


def test_the_quick_details_scenario_reads_every_detail_once_and_none_the_second_time() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "details", "--databases", "sqlite"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in done.stdout.splitlines() if line.startswith("|")]
    header, row = lines[0], lines[-1]
    figures = dict(zip(header, row, strict=True))
    assert figures["db"] == "sqlite" and figures["attempts"] == figures["detail requests"] == "5,000"
    assert float(figures["details s"]) > 0 and float(figures["ratio"]) > 0
    assert figures["2nd run detail requests"] == "0"
