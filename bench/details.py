"""The attempt-details scenario of the benchmark (`--only details`): `testpress-sync run
--details` with the admin login, in a child process, against the simulator (another child)
at 20 ms latency. A first run into a fresh database reads every attempt's detail; a second
run over the same, unchanged data must read none.

The target (the attempt-details issue): the details of 50,000 new attempts arrive within
1.3× of the ideal, detail requests × latency ÷ concurrency. The details round is timed by
the run's own log line `attempt_details_finished` (from the query that picks the attempts
to the last commit); the whole run is shown beside it, against the ideal of all its
requests.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sync.config import HttpSettings

DETAIL_ROUTE = "/api/v2.5/admin/attempts/{attempt_id}/"
CONCURRENCY = HttpSettings().concurrency
TARGET = 1.3


@dataclass(frozen=True)
class Harness:
    """What the benchmark's main module lends a scenario: its simulator and database
    contexts, its measured child process and the simulator's counters."""

    simulator: Callable[[int, int, float], AbstractContextManager[str]]  # (exams, attempts each, latency) → base URL
    database: Callable[[str], AbstractContextManager[str]]  # kind → URL of a fresh database
    measure: Callable[[list[str], dict[str, str]], Any]  # command, environment → its ChildUsage
    stats: Callable[[str], dict[str, Any]]  # base URL → /_simulator/stats
    environment: Callable[[str, str, str], dict[str, str]]  # (base URL, database URL, source) → a sync's


@dataclass(frozen=True)
class DetailsRun:
    status: str
    attempts: int  # in the database after the run: listed and stored
    requests: int  # every request the run sent, retries included
    detail_requests: int
    wall: float  # the child process, start-up included
    run_wall: float  # the run itself (summary duration_s)
    details_wall: float  # the details round (0 when no detail was read)
    cpu: float  # the child process
    simulator_cpu: float


def _run(harness: Harness, base: str, database_url: str) -> DetailsRun:
    env = harness.environment(base, database_url, "admin")  # the default concurrency: the ideal's
    before = harness.stats(base)
    child = harness.measure([sys.executable, "-m", "sync", "run", "--details"], env)
    after = harness.stats(base)
    events = {}
    for line in child.stderr.splitlines():
        if line.startswith(b"{") and (b'"run_finished"' in line or b'"attempt_details_finished"' in line):
            document = json.loads(line)
            events[document["event"]] = document
    summary = events.get("run_finished")
    if summary is None or child.returncode != 0:
        raise RuntimeError(f"the sync failed ({child.returncode}):\n{child.stderr.decode()[-2000:]}")
    details = events.get("attempt_details_finished", {})
    return DetailsRun(
        status=summary["status"],
        attempts=summary["attempts_seen"],
        requests=after["requests"] - before["requests"],
        detail_requests=after["by_route"].get(DETAIL_ROUTE, 0) - before["by_route"].get(DETAIL_ROUTE, 0),
        wall=child.wall,
        run_wall=summary["duration_s"],
        details_wall=details.get("seconds", 0.0),
        cpu=child.cpu,
        simulator_cpu=after["cpu_s"] - before["cpu_s"],
    )


def scenario(harness: Harness, kinds: list[str], attempts: int, latency: float) -> list[list[str]]:
    """Per database: a first run (every detail), then a second over unchanged data."""
    per_exam = 100
    rows = []
    for kind in kinds:
        with harness.simulator(max(1, attempts // per_exam), per_exam, latency) as base, harness.database(kind) as url:
            first = _run(harness, base, url)
            second = _run(harness, base, url)
        details_ideal = first.detail_requests * latency / CONCURRENCY
        run_ideal = first.requests * latency / CONCURRENCY
        ratio = first.details_wall / details_ideal if details_ideal else float("nan")
        rows.append([
            kind, f"{first.attempts:,}", f"{first.detail_requests:,}", f"{first.details_wall:.2f}", f"{details_ideal:.2f}",
            f"{ratio:.2f}", "yes" if ratio <= TARGET else "NO", f"{first.requests:,}", f"{first.run_wall:.2f}",
            f"{run_ideal:.2f}", f"{first.run_wall / run_ideal:.2f}", f"{first.cpu:.2f}", f"{first.simulator_cpu:.2f}",
            f"{second.detail_requests:,}", f"{second.requests:,}", f"{second.wall:.2f}",
        ])  # fmt: skip
    return rows


def title(attempts: int, latency: float) -> str:
    return (
        f"Attempt details: {attempts:,} new attempts at {latency * 1000:.0f} ms latency, concurrency {CONCURRENCY} "
        f"(ideal = requests × latency ÷ {CONCURRENCY}; target: details within {TARGET}× of it; "
        "then a second run over unchanged data)"
    )


HEADER = [
    "db", "attempts", "detail requests", "details s", "details ideal s", "ratio", f"≤ {TARGET}×", "run requests",
    "run s", "run ideal s", "run ratio", "cpu s", "simulator cpu s", "2nd run detail requests", "2nd run requests",
    "2nd run wall s",
]  # fmt: skip
