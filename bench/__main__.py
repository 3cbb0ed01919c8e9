"""The performance benchmark: `python -m bench` (or `make bench`).

Every scenario runs the real `testpress-sync run` in a child process against the bundled
simulator in another child process (so the simulator's CPU is not counted), on loopback,
and reads the child's own CPU time and peak RSS from wait4(). Figures are compared within
one run only: these machines are noisy. The wall, latency and cpu scenarios run
`--repeat` times (3 by default), each into a fresh database, and show the median run and
the range.

    wall     20 ms latency: wall time against the ideal requests × latency ÷ concurrency,
             for the whole process and for the run alone (without start-up and exit)
    latency  the same workload at 20, 50 and 100 ms: where latency, not CPU, sets the wall time
    dlt      the same, beside dlt's rest_api source doing the same job (--dlt-python)
    cpu      zero latency: attempts stored per CPU-second of the sync process
    memory   peak RSS at 10,000 and at 100,000 attempts
    upsert   rows/s: first insert, re-upsert of unchanged rows, plain executemany floor
    webhook  `testpress-sync webhook` in a child process, 32 concurrent senders: deliveries
             accepted per second, p50 / p99 answer latency (bench/webhook.py)
    w2       the institute-wide (admin API) sync at 150,000 attempts: wall, CPU against a
             floor, memory, the nightly run, dlt beside it (bench/admin.py)
    details  `run --details`: 50,000 attempts' details at 20 ms latency against the ideal,
             then a second run over unchanged data, which reads none (bench/details.py)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sync.config import HttpSettings

REPO = Path(__file__).resolve().parent.parent


@cache
def child_folder() -> Path:
    """Where every child process of the bench runs: an empty folder of its own, removed at
    exit. testpress-sync reads ./.env from its working directory, as a user's does, and a
    developer's .env in the checkout must not change what is measured."""
    folder = Path(tempfile.mkdtemp(prefix="testpress-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def compile_checkout(repo: Path | None = None) -> None:
    """Byte-compile the checkout the children import, as pip does when it installs the
    package from a wheel. Under PYTHONDONTWRITEBYTECODE=1 (as on CI machines and in many
    containers) Python never caches what it compiles, so an editable install would compile
    our modules at every start-up: ~45 ms of each measured process that no installed copy
    spends (the nightly run: 0.90 -> 0.85 s). Done here, not in the Makefile, so that
    `python -m bench` alone measures the same thing."""
    import compileall

    for package in ("sync", "schema", "bench", "alembic"):
        compileall.compile_dir((repo or REPO) / package, quiet=1)


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (the bench's own by default) with the checkout on the import path: the
    children run elsewhere (child_folder), and `python -m bench...` needs it."""
    variables = dict(os.environ if env is None else env)
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), variables.get("PYTHONPATH")]))
    return variables
PG_ADMIN_URL = os.environ.get("TESTPRESS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class Measurement:
    database: str
    attempts: int
    requests: int
    wall: float
    run_wall: float  # the run itself (the summary's duration_s): no start-up, no exit
    cpu: float  # the whole child process, start-up included
    run_cpu: float  # the run itself (the summary's cpu_s): parse, normalize, upsert
    peak_rss_mb: float
    simulator_cpu: float  # what serving the run cost the simulator, on the same machine
    inserted: int
    updated: int
    status: str


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def simulator(exams: int, attempts_per_exam: int, latency: float) -> Iterator[str]:
    command = [
        sys.executable, "-m", "sync", "simulate", "--exams", str(exams),
        "--attempts-per-exam", str(attempts_per_exam), "--latency", str(latency), "--users", "2000",
    ]  # fmt: skip
    with simulator_process(command) as base:
        yield base


@contextmanager
def simulator_process(command: list[str], *, start_within: float = 60) -> Iterator[str]:
    """A simulator started by `command` (given a free port here), until it answers."""
    port = free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=child_folder(), env=child_environment(), stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_within
        while True:
            try:
                simulator_stats(base)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def simulator_stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/_simulator/stats", timeout=5) as response:
        return json.loads(response.read())


@contextmanager
def database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    import asyncpg

    name = f"tps_bench_{uuid.uuid4().hex[:10]}"
    admin_dsn = PG_ADMIN_URL

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(admin_dsn)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class ChildUsage:
    wall: float
    cpu: float  # user + system seconds of the child, start-up included
    peak_rss_mb: float
    returncode: int
    stdout: bytes
    stderr: bytes


def measure_child(command: list[str], env: dict[str, str]) -> ChildUsage:
    """Run `command` to its end; its own CPU time and peak RSS come from wait4(). Output
    goes to files, so neither pipe can fill up and stall the child."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=child_folder(), env=child_environment(env), stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildUsage(
            wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode, out.read(), err.read()
        )


def sync_environment(base: str, database_url: str, source: str = "auto") -> dict[str, str]:
    """The environment of a measured `testpress-sync` child: the simulator's login, JSON
    logs, `source`, and the defaults for what the ideal assumes (the concurrency) and for
    what a scenario does not measure (attempt details)."""
    env = {
        **os.environ,
        "TESTPRESS_BASE_URL": base,
        "TESTPRESS_USERNAME": "admin",
        "TESTPRESS_PASSWORD": "secret",
        "TESTPRESS_DATABASE_URL": database_url,
        "TESTPRESS_LOG_FORMAT": "json",
        "TESTPRESS_SOURCE": source,
    }
    for name in ("TESTPRESS_CONCURRENCY", "TESTPRESS_HTTP_CONCURRENCY", "TESTPRESS_ATTEMPT_DETAILS", "TESTPRESS_SYNC_ATTEMPT_DETAILS"):
        env.pop(name, None)
    return env


def sync_run(base: str, database_url: str, kind: str) -> Measurement:
    """One `testpress-sync run` in a child process, measured, at the default concurrency."""
    env = sync_environment(base, database_url, source="student")  # the v2.1 scenarios of issue #4
    before = simulator_stats(base)
    child = measure_child([sys.executable, "-m", "sync", "run"], env)
    after = simulator_stats(base)
    summary = next(
        (json.loads(line) for line in child.stderr.splitlines() if b'"run_finished"' in line), None
    )
    if summary is None or child.returncode not in (0, 1):
        raise RuntimeError(f"the sync failed ({child.returncode}):\n{child.stderr.decode()[-2000:]}")
    return Measurement(
        database=kind,
        attempts=summary["attempts_seen"],
        requests=after["requests"] - before["requests"],
        wall=child.wall,
        run_wall=summary["duration_s"],
        cpu=child.cpu,
        run_cpu=summary["cpu_s"],
        peak_rss_mb=child.peak_rss_mb,
        simulator_cpu=after["cpu_s"] - before["cpu_s"],
        inserted=summary["rows_inserted"],
        updated=summary["rows_updated"],
        status=summary["status"],
    )


def _absolute(path: str) -> str:
    """The path from here: the children run in a folder of their own. Not resolved: a
    venv's python is a symlink, and only the link's path makes it the venv's."""
    return str(Path(path).absolute())


def dlt_run(dlt_python: str, base: str, database_url: str, *job: str) -> tuple[ChildUsage, int, int]:
    """dlt's rest_api source doing the same job (bench/dlt_job.py; `job` "admin" for its
    admin configuration), measured alike: (usage, attempts loaded, requests)."""
    if database_url.startswith("postgresql://"):  # the driver dlt[postgres] installs
        database_url = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    with tempfile.TemporaryDirectory() as pipelines:
        before = simulator_stats(base)["requests"]
        child = measure_child(
            [dlt_python, "-m", "bench.dlt_job", base, database_url, pipelines, *job],
            {**os.environ, "RUNTIME__LOG_LEVEL": "WARNING"},
        )
        requests = simulator_stats(base)["requests"] - before
    if child.returncode != 0:
        raise RuntimeError(f"the dlt {' '.join(job)} job failed ({child.returncode}):\n{child.stderr.decode()[-2000:]}")
    loaded = json.loads(child.stdout.splitlines()[-1])
    return child, loaded["attempts"], requests


# --- scenarios ---------------------------------------------------------------------------


DEFAULT_CONCURRENCY = HttpSettings().concurrency


def ideal_wall(requests: int, latency: float) -> float:
    """The issue's ideal: requests × per-request latency ÷ requests in flight."""
    return requests * latency / DEFAULT_CONCURRENCY


def median_run(runs: list[Measurement], key: Callable[[Measurement], float]) -> Measurement:
    """The run in the middle by `key`: every figure of a table row comes from one real run."""
    return sorted(runs, key=key)[len(runs) // 2]


def first_runs(base: str, kind: str, repeat: int, *, then_second: bool = False) -> tuple[list[Measurement], Measurement | None]:
    """`repeat` first runs, each into a fresh database; with then_second, also a second run
    over what the last of them stored (as a nightly run over unchanged data)."""
    runs, second = [], None
    for number in range(repeat):
        with database(kind) as url:
            runs.append(sync_run(base, url, kind))
            if then_second and number == repeat - 1:
                second = sync_run(base, url, kind)
    return runs, second


def spread(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}" if len(values) > 1 else ""


def scenario_wall(kinds: list[str], exams: int, per_exam: int, latency: float, repeat: int) -> list[list[str]]:
    """`repeat` first runs, each into a fresh database, against one simulator; the row shows
    the median run by wall time and the range of the ratio. A second run follows the last."""
    rows = []
    for kind in kinds:
        with simulator(exams, per_exam, latency) as base:
            runs, second = first_runs(base, kind, repeat, then_second=True)
        assert second is not None
        first = median_run(runs, lambda run: run.wall)
        ideal = ideal_wall(first.requests, latency)
        rows.append([
            kind, f"{first.attempts:,}", f"{first.requests:,}", f"{first.wall:.2f}", f"{ideal:.2f}",
            f"{first.wall / ideal:.2f}", spread([run.wall / ideal for run in runs], ".2f"),
            f"{first.run_wall:.2f}", f"{first.run_wall / ideal:.2f}",
            f"{first.attempts / first.wall:,.0f}", f"{first.cpu:.2f}", f"{first.simulator_cpu:.2f}",
            f"{first.peak_rss_mb:.0f}", f"{first.requests / max(first.attempts, 1):.3f}",
            f"{second.wall:.2f}", f"{second.cpu:.2f}", f"{second.inserted}/{second.updated}",
        ])  # fmt: skip
    return rows


def scenario_latency(
    kinds: list[str], exams: int, per_exam: int, latencies: list[float], repeat: int
) -> list[list[str]]:
    """Where the API's latency, not our CPU, sets the wall time: the median of `repeat`
    runs at each latency, each into a fresh database."""
    rows = []
    for kind in kinds:
        for latency in latencies:
            with simulator(exams, per_exam, latency) as base:
                runs, _ = first_runs(base, kind, repeat)
            run = median_run(runs, lambda run: run.wall)
            ideal = ideal_wall(run.requests, latency)
            rows.append([
                kind, f"{latency * 1000:.0f}", f"{run.wall:.2f}", f"{ideal:.2f}", f"{run.wall / ideal:.2f}",
                spread([r.wall / ideal for r in runs], ".2f"), f"{run.cpu:.2f}", f"{run.cpu / run.wall:.0%}",
            ])  # fmt: skip
    return rows


def scenario_dlt(dlt_python: str, kinds: list[str], exams: int, per_exam: int, latency: float) -> list[list[str]]:
    """Side by side in one run: the same simulator, the same kind of database."""
    rows = []
    for kind in kinds:
        with simulator(exams, per_exam, latency) as base:
            with database(kind) as url:
                ours = sync_run(base, url, kind)
            with database(kind) as url:
                theirs, attempts, requests = dlt_run(dlt_python, base, url)
        for tool, wall, cpu, rss, count, sent in (
            ("testpress-sync", ours.wall, ours.cpu, ours.peak_rss_mb, ours.attempts, ours.requests),
            ("dlt rest_api", theirs.wall, theirs.cpu, theirs.peak_rss_mb, attempts, requests),
        ):
            ideal = ideal_wall(sent, latency)
            rows.append([
                kind, tool, f"{count:,}", f"{sent:,}", f"{wall:.2f}", f"{wall / ideal:.2f}", f"{cpu:.2f}",
                f"{count / cpu:,.0f}", f"{rss:.0f}",
            ])  # fmt: skip
        rows.append([kind, "dlt ÷ testpress-sync", "", "", f"{theirs.wall / ours.wall:.1f}×", "", f"{theirs.cpu / ours.cpu:.1f}×", "", f"{theirs.peak_rss_mb / ours.peak_rss_mb:.1f}×"])
    return rows


def scenario_cpu(kinds: list[str], exams: int, per_exam: int, repeat: int) -> list[list[str]]:
    """`repeat` runs at zero latency, each into a fresh database; the median run by process
    CPU, and the range of attempts per process CPU-second."""
    rows = []
    for kind in kinds:
        with simulator(exams, per_exam, 0.0) as base:
            runs, _ = first_runs(base, kind, repeat)
        run = median_run(runs, lambda run: run.cpu)
        rows.append([
            kind, f"{run.attempts:,}", f"{run.wall:.2f}", f"{run.cpu:.2f}",
            f"{run.attempts / run.cpu:,.0f}", spread([r.attempts / r.cpu for r in runs], ",.0f"),
            f"{run.run_cpu:.2f}", f"{run.attempts / run.run_cpu:,.0f}", f"{run.peak_rss_mb:.0f}",
        ])  # fmt: skip
    return rows


def scenario_memory(kinds: list[str], sizes: list[tuple[int, int]]) -> list[list[str]]:
    rows = []
    for kind in kinds:
        peaks = []
        for exams, per_exam in sizes:
            with simulator(exams, per_exam, 0.0) as base, database(kind) as url:
                run = sync_run(base, url, kind)
            peaks.append(run)
        growth = peaks[-1].peak_rss_mb / peaks[0].peak_rss_mb - 1
        large = peaks[-1]
        rows.append([
            kind, *(f"{run.attempts:,}: {run.peak_rss_mb:.0f} MB" for run in peaks), f"{growth:+.0%}",
            f"{large.attempts / large.cpu:,.0f}", f"{large.attempts / large.run_cpu:,.0f}",
        ])  # fmt: skip
    return rows


def scenario_upsert(kinds: list[str], count: int) -> list[list[str]]:
    from bench.upserts import measure_upserts

    rows = []
    for kind in kinds:
        with database(kind) as url:
            first, again, floor = asyncio.run(measure_upserts(url, count))
        rows.append([kind, f"{count:,}", f"{first:,.0f}", f"{again:,.0f}", f"{floor:,.0f}", f"{first / floor:.2f}"])
    return rows


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"\n{title}", line(header), rule, *(line(row) for row in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("wall", "latency", "cpu", "memory", "upsert", "dlt", "webhook", "w2", "details"), action="append")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument("--w2-scale", type=int, metavar="N", help="W2's sizes divided by N (default 1, 20 with --quick)")
    parser.add_argument(
        "--repeat", type=int, metavar="N",
        help="runs per figure in the wall, latency and cpu scenarios; the table shows the median run "
             "and the range (default 3, 1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--dlt-python", metavar="PATH", type=_absolute,
        help="a Python with dlt[sqlalchemy,postgres] installed: runs dlt's rest_api source beside us",
    )  # fmt: skip
    args = parser.parse_args()
    kinds = args.databases.split(",")
    only = set(args.only or ("wall", "latency", "cpu", "memory", "upsert", "dlt", "webhook", "w2", "details"))
    scale = 10 if args.quick else 1
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    print(f"testpress-sync benchmark — {time.strftime('%Y-%m-%d %H:%M')} — {os.cpu_count()} cores", flush=True)
    compile_checkout()
    if "wall" in only:
        rows = scenario_wall(kinds, 1000 // scale, 30, 0.020, repeat)
        print(table(
            f"Wall time at 20 ms latency, default concurrency {DEFAULT_CONCURRENCY} "
            f"(ideal = requests × latency ÷ {DEFAULT_CONCURRENCY}; median of {repeat} run(s) by wall)",
            ["db", "attempts", "requests", "wall s", "ideal s", "ratio", "ratio range", "run s", "run ÷ ideal",
             "attempts/s", "cpu s", "simulator cpu s", "peak MB", "req/attempt",
             "2nd run wall s", "2nd run cpu s", "2nd run ins/upd"], rows), flush=True)  # fmt: skip
    if "latency" in only:
        rows = scenario_latency(kinds, 1000 // scale, 30, [0.020, 0.050, 0.100], repeat)
        print(table(
            f"Wall time against API latency (same workload, concurrency {DEFAULT_CONCURRENCY}; "
            f"median of {repeat} run(s) by wall)",
            ["db", "latency ms", "wall s", "ideal s", "ratio", "ratio range", "cpu s", "cpu ÷ wall"], rows), flush=True)  # fmt: skip
    if "cpu" in only:
        rows = scenario_cpu(kinds, 1000 // scale, 30, repeat)
        print(table(
            "CPU at zero latency (process: start-up included; run: the sync itself; "
            f"median of {repeat} run(s) by process cpu)",
            ["db", "attempts", "wall s", "process cpu s", "attempts per cpu-s", "range",
             "run cpu s", "attempts per run cpu-s", "peak MB"], rows), flush=True)  # fmt: skip
    if "memory" in only:
        sizes = [(200 // scale, 50), (2000 // scale, 50)]
        rows = scenario_memory(kinds, sizes)
        print(table(
            "Peak RSS of the sync process (and, at the large size, attempts per CPU-second)",
            ["db", "small", "large", "growth", "large: per process cpu-s", "large: per run cpu-s"], rows), flush=True)  # fmt: skip
    if "dlt" in only:
        if not args.dlt_python:
            print("\ndlt side by side: skipped: no --dlt-python (`make bench` sets one up)", flush=True)
        else:
            rows = scenario_dlt(args.dlt_python, kinds, 1000 // scale, 30, 0.020)
            print(table(
                "Side by side at 20 ms latency: dlt's rest_api source on the same simulator and database kind",
                ["db", "tool", "attempts", "requests", "wall s", "wall ÷ ideal", "cpu s", "attempts per cpu-s", "peak MB"],
                rows), flush=True)  # fmt: skip
    if "upsert" in only:
        rows = scenario_upsert(kinds, 20000 // scale)
        print(table("Upserts, rows/s (attempts table, batches of 500)",
                    ["db", "rows", "first insert", "unchanged re-upsert", "plain executemany", "insert ÷ floor"], rows), flush=True)  # fmt: skip
    if "webhook" in only:
        from bench import webhook

        count = 10_000 // scale
        figures = []
        for kind in kinds:
            with database(kind) as url:
                figures.append(webhook.run_webhook(url, kind, count, concurrency=32))
        print(table(f"Webhook receiver: {count:,} signed deliveries from 32 concurrent senders on this machine "
                    "(targets: 1,000/s, p99 50 ms)", webhook.HEADER, webhook.rows(figures)), flush=True)  # fmt: skip
    if "w2" in only:
        from bench import admin

        admin.run_w2(kinds, args.w2_scale or (20 if args.quick else 1), repeat, args.dlt_python)
    if "details" in only:
        from bench import details

        harness = details.Harness(simulator, database, measure_child, simulator_stats, sync_environment)
        count = 50_000 // scale
        rows = details.scenario(harness, kinds, count, 0.020)
        print(table(details.title(count, 0.020), details.HEADER, rows), flush=True)


if __name__ == "__main__":
    main()
