"""The institute-wide scenarios of the benchmark (`python -m bench --only w2`): the admin
API (v2.5) walked by `testpress-sync run`, which an admin login chooses by itself.

W2 is 2,000 exams, 150,000 attempts (75 an exam) and 5,000 users; `--w2-scale N` divides
every size by N (`--quick`: 20). Each database kind gets its own simulators, in child
processes as in the other scenarios, and its own fresh databases:

    cpu      0 ms latency: `run --full`, its whole process CPU against a floor measured in
             the same run: a bare aiohttp client fetching the same pages (a child process,
             start-up included) plus the driver's own executemany of the same rows (read
             back from the sync's database into a fresh one); attempts per CPU-second
    wall     20 ms latency: `run --full` against the ideal requests × latency ÷ concurrency,
             and against the floor's bare client fetching the same pages at 20 ms: what
             this machine allows, with the simulator's own CPU on the same two cores
    dlt      dlt's rest_api source on the same admin endpoints and data (with --dlt-python)
    nightly  after a day's changes (1% new attempts, Running; 0.5% of attempts completed,
             taken from those new ones), `run` against the full walk: requests, wall, and
             every attempt's id, state and score checked against the server's listing. On
             the default data set (10% of old attempts Running, 10% Not Started) and on one
             where 1% of old attempts are still open (the simulator's `open_share`)
    memory   peak RSS at W2 (the largest of every W2 run) and at a tenth of W2

Targets (the issue "Institute-wide sync"): wall ≤ 1.3× ideal; process CPU ≤ 1.5× the
floor; peak RSS ≤ 150 MB, growing ≤ 20% from a tenth of W2 to W2; nightly ≤ 5% of the full
walk's requests and ≤ 10% of its wall time, its data exact.

Set BENCH_W2_PROFILE=DIR to run every sync under cProfile (`DIR/<label>.prof`): the
figures are then the profiler's, not the sync's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

# bench.__main__ again, as a module: its helpers measure every scenario alike. (Its import,
# ~20-30 ms of CPU beyond aiohttp's, is also in the floor's child process: it makes the
# floor higher by about 1%, in the sync's favour; said here so nobody takes it for free.)
from bench.__main__ import (
    DEFAULT_CONCURRENCY,
    ChildUsage,
    child_environment,
    child_folder,
    database,
    dlt_run,
    ideal_wall,
    measure_child,
    simulator_process,
    simulator_stats,
    spread,
    sync_environment,
    table,
)

ADMIN = "/api/v2.5/admin"
USERNAME, PASSWORD = "admin", "secret"  # the simulator's admin login
LATENCY = 0.020
NEW_SHARE = 0.01  # a day's new attempts, of all attempts
COMPLETED_SHARE = 0.005  # a day's Running → Completed, of all attempts
REALISTIC_OPEN_SHARE = 0.01  # old attempts still Running or Not Started, in the second data set
# The writer's upsert batch (sync.batch_size's default): the floor inserts in the same chunks.
FLOOR_BATCH = 500
TABLES = ("exams", "users", "batches", "user_batches", "attempts")  # parents first: foreign keys
TARGET_WALL, TARGET_CPU, TARGET_RSS_MB, TARGET_GROWTH = 1.3, 1.5, 150.0, 0.20
TARGET_NIGHTLY_REQUESTS, TARGET_NIGHTLY_WALL = 0.05, 0.10
T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    exams: int
    per_exam: int
    users: int
    open_share: float | None = None  # None: the simulator's default, 10% Running + 10% Not Started

    @property
    def attempts(self) -> int:
        return self.exams * self.per_exam

    def scaled(self, divisor: int) -> Workload:
        return replace(self, exams=max(1, self.exams // divisor), users=max(1, self.users // divisor))

    def open_text(self) -> str:
        if self.open_share is None:
            return "10% Running + 10% Not Started (default)"
        return f"{self.open_share:.1%} open (open_share)"


W2 = Workload(exams=2000, per_exam=75, users=5000)


# --- the simulator, in a child process ---------------------------------------------------


@contextmanager
def admin_simulator(workload: Workload, latency: float) -> Iterator[str]:
    """`python -m bench.admin serve`: bench.__main__.simulator fixes 2,000 users, and
    `sync simulate` has no open_share."""
    command = [
        sys.executable, "-m", "bench.admin", "serve", "--exams", str(workload.exams),
        "--attempts-per-exam", str(workload.per_exam), "--users", str(workload.users), "--latency", str(latency),
    ]  # fmt: skip
    if workload.open_share is not None:
        command += ["--open-share", str(workload.open_share)]
    with simulator_process(command, start_within=120) as base:  # 150,000 attempts: ~7 s to draw and render
        yield base


async def serve(workload: Workload, port: int, latency: float) -> None:
    from sync.simulator import Dataset, Faults, SimulatorServer

    options: dict[str, Any] = {} if workload.open_share is None else {"open_share": workload.open_share}
    dataset = Dataset(exams=workload.exams, attempts_per_exam=workload.per_exam, users=workload.users, **options)
    # warm: every row rendered before the first request, so each walk measured (the first
    # on a fresh simulator too) meets a simulator as cheap as on a repeat.
    server = SimulatorServer(
        dataset, faults=Faults(latency=latency), username=USERNAME, password=PASSWORD, port=port, warm=True
    )
    async with server:
        await asyncio.Event().wait()  # until terminated


def control(base: str, path: str, body: dict[str, Any]) -> Any:
    """POST to a control route (the simulator counts none of them as API requests)."""
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {answer}")
        return answer
    finally:
        connection.close()


def set_latency(base: str, latency: float) -> None:
    control(base, "/_simulator/faults", {"latency": latency})


# --- one sync run, measured ---------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpan:
    """Requests to one route during a run, and when the first and the last arrived (from
    the run's start; the simulator's counters polled every 50 ms)."""

    requests: int
    first: float
    last: float


@dataclass(frozen=True)
class AdminRun:
    database: str
    full: bool
    reason: str
    attempts_seen: int
    requests: int
    routes: dict[str, RouteSpan]
    in_flight: float  # requests in flight at the server, on average while the walk went on
    usage: ChildUsage
    run_wall: float  # the summary's duration_s: no start-up, no exit
    run_cpu: float
    simulator_cpu: float
    inserted: int
    updated: int
    unchanged: int

    @property
    def wall(self) -> float:
        return self.usage.wall

    @property
    def cpu(self) -> float:
        return self.usage.cpu

    @property
    def peak_rss_mb(self) -> float:
        return self.usage.peak_rss_mb


class RouteWatch:
    """Polls the simulator's counters while a run goes on: which listing was being read
    when, and how many requests were in flight, without a line of logging in the sync."""

    def __init__(self, base: str, interval: float = 0.05) -> None:
        self._base = base
        self._interval = interval
        self._samples: list[tuple[float, dict[str, int]]] = []
        self._in_flight: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._started = 0.0

    def __enter__(self) -> RouteWatch:
        self._started = time.perf_counter()
        self._samples.append((0.0, simulator_stats(self._base)["by_route"]))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            stats = simulator_stats(self._base)
            self._samples.append((time.perf_counter() - self._started, stats["by_route"]))
            self._in_flight.append(stats["in_flight"])

    def mean_in_flight(self) -> float:
        """Requests in flight at the server, on average over the samples from the first
        request to the last: the concurrency the walk achieved (the ideal assumes 16)."""
        totals = [sum(routes.values()) for _, routes in self._samples[1:]]
        busy = [flight for flight, total, previous in zip(self._in_flight, totals, [0, *totals], strict=False)
                if total > previous or flight]  # fmt: skip
        return sum(busy) / len(busy) if busy else 0.0

    def spans(self, final: dict[str, int]) -> dict[str, RouteSpan]:
        samples = [*self._samples, (time.perf_counter() - self._started, final)]
        baseline = samples[0][1]
        spans = {}
        for route, count in final.items():
            made = count - baseline.get(route, 0)
            if made <= 0:
                continue
            # A request arrived between two samples: the later one's moment, at most 50 ms late.
            moments = [moment for (_, before), (moment, after) in zip(samples, samples[1:], strict=False)
                       if after.get(route, 0) > before.get(route, 0)]  # fmt: skip
            spans[route] = RouteSpan(made, moments[0] if moments else 0.0, moments[-1] if moments else 0.0)
        return spans


def sync_command(label: str) -> list[str]:
    profile_dir = os.environ.get("BENCH_W2_PROFILE")
    if not profile_dir:
        return [sys.executable, "-m", "sync"]
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "cProfile", "-o", str(Path(profile_dir) / f"{label}.prof"), "-m", "sync"]


def admin_run(base: str, database_url: str, kind: str, *, full: bool, label: str) -> AdminRun:
    """One `testpress-sync run [--full]` in a child process, as an admin login runs it:
    the source is left to choose itself (auto), at the default concurrency."""
    # The source chosen by itself, the default concurrency, and no attempt details (the
    # `details` scenario measures those).
    env = sync_environment(base, database_url, source="auto")
    before = simulator_stats(base)
    with RouteWatch(base) as watch:
        child = measure_child([*sync_command(label), "run", *(["--full"] if full else [])], env)
        after = simulator_stats(base)
    events = {}
    for line in child.stderr.splitlines():
        if line.startswith(b"{"):
            event = json.loads(line)
            events[event.get("event")] = event
    summary, plan = events.get("run_finished"), events.get("admin_plan")
    if summary is None or plan is None or summary["source"] != "admin" or child.returncode not in (0, 1):
        raise RuntimeError(f"the admin sync failed ({child.returncode}):\n{child.stderr.decode()[-3000:]}")
    return AdminRun(
        database=kind,
        full=plan["full"],
        reason=plan["reason"],
        attempts_seen=summary["attempts_seen"],
        requests=after["requests"] - before["requests"],
        routes=watch.spans(after["by_route"]),
        in_flight=watch.mean_in_flight(),
        usage=child,
        run_wall=summary["duration_s"],
        run_cpu=summary["cpu_s"],
        simulator_cpu=after["cpu_s"] - before["cpu_s"],
        inserted=summary["rows_inserted"],
        updated=summary["rows_updated"],
        unchanged=summary["rows_unchanged"],
    )


def median(runs: Sequence[T], key: Callable[[T], float]) -> T:
    """The run in the middle by `key`: every figure of a row comes from one real run."""
    return sorted(runs, key=key)[len(runs) // 2]


# --- the floor: the same pages and the same rows, with nothing in between ---------------------


@dataclass(frozen=True)
class Floor:
    fetch: ChildUsage  # the bare client's process: start-up, requests, JSON decoding
    requests: int
    insert_cpu: float  # the driver's executemany of the sync's rows: its CPU alone, in a child process
    rows: int

    @property
    def cpu(self) -> float:
        return self.fetch.cpu + self.insert_cpu


async def fetch_floor(base: str, concurrency: int) -> dict[str, int]:
    """Every page the sync's full walk reads, with aiohttp and orjson and nothing else: the
    login, every page of the four listings (the batches' first one is the source check),
    each user's batches."""
    import aiohttp
    import orjson

    admin = f"{base}{ADMIN}"
    counts = {"requests": 0, "items": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        login = {"username": USERNAME, "password": PASSWORD}
        async with session.post(f"{base}/api/v2.1/auth-token/", json=login) as response:
            headers = {"Authorization": f"JWT {orjson.loads(await response.read())['token']}"}
        counts["requests"] += 1
        # (url, what, first page?): a first page tells how many more there are.
        pages: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
        # The source check reads the batches listing's first page, which the walk uses.
        for listing in ("exams", "users", "batches", "attempts"):
            pages.put_nowait((f"{admin}/{listing}/", listing, True))

        async def worker() -> None:
            while True:
                url, what, first = await pages.get()
                try:
                    async with session.get(url, headers=headers) as response:
                        page = orjson.loads(await response.read())
                    counts["requests"] += 1
                    counts["items"] += len(page["results"])
                    if first:
                        last = -(-page["count"] // page["per_page"])
                        joiner = "&" if "?" in url else "?"
                        for number in range(2, last + 1):
                            pages.put_nowait((f"{url}{joiner}page={number}", what, False))
                    if what == "users":
                        for user in page["results"]:
                            pages.put_nowait((f"{admin}/users/{user['id']}/batches/", "memberships", True))
                finally:
                    pages.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await pages.join()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return counts


def measure_fetch_floor(base: str) -> tuple[ChildUsage, int]:
    before = simulator_stats(base)["requests"]
    child = measure_child(
        [sys.executable, "-m", "bench.admin", "fetch-floor", base, str(DEFAULT_CONCURRENCY)], dict(os.environ)
    )
    requests = simulator_stats(base)["requests"] - before
    if child.returncode != 0:
        raise RuntimeError(f"the fetch floor failed ({child.returncode}):\n{child.stderr.decode()[-2000:]}")
    return child, requests


def insert_floor(kind: str, synced_url: str) -> tuple[float, int]:
    """CPU of inserting the rows the sync stored, read back as the driver gives them, into
    a fresh database of the same schema, with the driver's executemany in the writer's
    batches: (CPU seconds of the inserts alone, rows). In a child process, as is everything
    that holds W2's rows: a child's ru_maxrss starts from its parent's RSS when it was
    spawned (exec records the old address space's peak), so this process must stay small
    for the peak RSS of the syncs it measures to be theirs."""
    with database(kind) as fresh_url:
        answer = _child_json([sys.executable, "-m", "bench.admin", "insert-floor", kind, synced_url, fresh_url])
    return float(answer["cpu"]), int(answer["rows"])


def _child_json(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, cwd=child_folder(), env=child_environment(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    return dict(json.loads(done.stdout.splitlines()[-1]))


def run_insert_floor(kind: str, synced_url: str, fresh_url: str) -> dict[str, float]:
    asyncio.run(_migrate(fresh_url))
    if kind == "sqlite":
        cpu, rows = _sqlite_insert_floor(_sqlite_path(synced_url), _sqlite_path(fresh_url))
    else:
        cpu, rows = asyncio.run(_postgres_insert_floor(synced_url, fresh_url))
    return {"cpu": cpu, "rows": rows}


async def _migrate(url: str) -> None:
    from sync.sink.database import create_engine, database_url_from, migrate

    engine = create_engine(database_url_from(url))
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _chunks(rows: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _sqlite_insert_floor(synced: str, fresh: str) -> tuple[float, int]:
    source, target = sqlite3.connect(synced), sqlite3.connect(fresh, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):  # the sync's own
            target.execute(f"PRAGMA {pragma}")
        cpu, total = 0.0, 0
        for name in TABLES:
            cursor = source.execute(f"SELECT * FROM {name}")  # our own table names
            columns = [column[0] for column in cursor.description]
            rows = cursor.fetchall()
            sql = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            started = time.process_time()
            for chunk in _chunks(rows, FLOOR_BATCH):
                target.execute("BEGIN")
                target.executemany(sql, chunk)
                target.execute("COMMIT")
            cpu += time.process_time() - started
            total += len(rows)
        return cpu, total
    finally:
        source.close()
        target.close()


async def _postgres_insert_floor(synced: str, fresh: str) -> tuple[float, int]:
    import asyncpg

    source, target = await asyncpg.connect(synced), await asyncpg.connect(fresh)
    try:
        cpu, total = 0.0, 0
        for name in TABLES:
            rows = await source.fetch(f"SELECT * FROM {name}")  # our own table names
            if not rows:
                continue
            columns = list(rows[0].keys())
            marks = ", ".join(f"${number}" for number in range(1, len(columns) + 1))
            sql = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({marks})"
            values = [tuple(row) for row in rows]
            started = time.process_time()
            for chunk in _chunks(values, FLOOR_BATCH):
                async with target.transaction():
                    await target.executemany(sql, chunk)
            cpu += time.process_time() - started
            total += len(rows)
        return cpu, total
    finally:
        await source.close()
        await target.close()


# --- a day of changes, and the check that the database holds them -------------------------------


@dataclass(frozen=True)
class Day:
    created: int
    completed: int
    completed_of_created: int  # those completed that were created the same day


def make_a_day(base: str, workload: Workload, seed: int = 2024) -> Day:
    """1% new attempts (Running, started now) by random users in random exams, then 0.5% of
    all attempts completed, taken from those new ones first, as in a real day: most
    attempts that finish today started today."""
    rng = random.Random(seed)
    new, completing = round(workload.attempts * NEW_SHARE), round(workload.attempts * COMPLETED_SHARE)
    by_exam: dict[int, list[int]] = {}
    for _ in range(new):
        by_exam.setdefault(rng.randint(1, workload.exams), []).append(1000 + rng.randrange(workload.users))
    created: list[int] = []
    for exam_id, user_ids in sorted(by_exam.items()):
        change = {"action": "create_attempts", "exam_id": exam_id, "user_ids": user_ids, "state": "Running"}
        created += control(base, "/_simulator/change", change)["added"]
    chosen = rng.sample(created, min(completing, len(created)))
    done = control(base, "/_simulator/change", {"action": "complete_attempts", "attempt_ids": chosen})["completed"]
    return Day(created=len(created), completed=len(done), completed_of_created=len(set(done) & set(created)))


@dataclass(frozen=True)
class Check:
    server: int
    stored: int
    missing: int  # on the server, not stored (or marked deleted)
    extra: int  # stored, not on the server
    different: int  # state or score differ
    server_digest: str
    stored_digest: str

    @property
    def exact(self) -> bool:
        return self.server_digest == self.stored_digest

    def text(self) -> str:
        if self.exact:
            return f"exact: {self.stored:,} = {self.server:,}, sha256 {self.stored_digest[:12]}"
        return (f"DIFFERS: {self.stored:,} stored, {self.server:,} served; {self.missing} missing, "
                f"{self.extra} extra, {self.different} with another state or score")  # fmt: skip


def _digest(rows: dict[int, tuple[str, str]]) -> str:
    text = "".join(f"{ident}|{state}|{score}\n" for ident, (state, score) in sorted(rows.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _score(value: Any) -> str:
    return "" if value is None else f"{Decimal(str(value)):.2f}"


def check_attempts(base: str, database_url: str) -> Check:
    """Every attempt's id, state and score: the server's admin listing against the rows
    stored and not marked deleted, read at 0 ms latency, in a child process (it holds every
    attempt twice: see insert_floor)."""
    set_latency(base, 0.0)
    return Check(**_child_json([sys.executable, "-m", "bench.admin", "check", base, database_url]))


def compare_attempts(base: str, database_url: str) -> Check:
    served = asyncio.run(_served_attempts(base))
    stored = asyncio.run(_stored_attempts(database_url))
    different = sum(1 for ident, row in stored.items() if ident in served and served[ident] != row)
    return Check(
        server=len(served), stored=len(stored), missing=len(served.keys() - stored.keys()),
        extra=len(stored.keys() - served.keys()), different=different,
        server_digest=_digest(served), stored_digest=_digest(stored),
    )  # fmt: skip


async def _served_attempts(base: str) -> dict[int, tuple[str, str]]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        login = {"username": USERNAME, "password": PASSWORD}
        async with session.post(f"{base}/api/v2.1/auth-token/", json=login) as response:
            headers = {"Authorization": f"JWT {(await response.json())['token']}"}

        async def page(number: int) -> dict[str, Any]:
            async with session.get(f"{base}{ADMIN}/attempts/?page={number}", headers=headers) as response:
                return dict(await response.json())

        first = await page(1)
        last = -(-first["count"] // first["per_page"])
        rows = {row["id"]: (row["state"], _score(row["score"])) for row in first["results"]}
        for start in range(2, last + 1, 16):
            for later in await asyncio.gather(*(page(n) for n in range(start, min(start + 16, last + 1)))):
                rows.update((row["id"], (row["state"], _score(row["score"]))) for row in later["results"])
        return rows


async def _stored_attempts(database_url: str) -> dict[int, tuple[str, str]]:
    from sqlalchemy import select

    from schema import attempts
    from sync.sink.database import create_engine, database_url_from

    engine = create_engine(database_url_from(database_url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                select(attempts.c.id, attempts.c.state, attempts.c.score).where(attempts.c.deleted_at.is_(None))
            )
            return {ident: (state, _score(score)) for ident, state, score in result}
    finally:
        await engine.dispose()


# --- the scenarios ---------------------------------------------------------------------------


@dataclass
class Nightly:
    data: str
    full: AdminRun
    day: Day
    night: AdminRun
    check: Check


@dataclass
class KindFigures:
    """Everything measured over one database kind."""

    kind: str
    cpu_runs: list[AdminRun] = field(default_factory=list)
    floors: list[tuple[ChildUsage, int]] = field(default_factory=list)
    insert_cpu: float = 0.0
    floor_rows: int = 0
    wall_runs: list[AdminRun] = field(default_factory=list)
    # The bare client of the floor at 20 ms: the wall this machine and simulator allow.
    bare_fetch: ChildUsage | None = None
    nightlies: list[Nightly] = field(default_factory=list)
    small: AdminRun | None = None
    dlt: tuple[ChildUsage, int, int] | None = None  # usage, attempts loaded, requests

    def floor(self) -> Floor:
        usage, requests = median(self.floors, lambda floor: floor[0].cpu)
        return Floor(usage, requests, self.insert_cpu, self.floor_rows)

    def every_w2_run(self) -> list[AdminRun]:
        return [*self.cpu_runs, *self.wall_runs, *(n.full for n in self.nightlies)]


def measure_kind(kind: str, workload: Workload, repeat: int, dlt_python: str | None) -> KindFigures:
    figures = KindFigures(kind)
    # The full walks' databases stay until the nightly run has gone over the last one.
    with admin_simulator(workload, 0.0) as base, ExitStack() as databases:
        _cpu_and_floor(figures, base, kind, repeat)
        set_latency(base, LATENCY)
        figures.bare_fetch, _ = measure_fetch_floor(base)
        for number in range(repeat):
            last_url = databases.enter_context(database(kind))
            figures.wall_runs.append(admin_run(base, last_url, kind, full=True, label=f"{kind}-wall-{number}"))
        if dlt_python:  # on the same data as our full walks, before the day's changes
            with database(kind) as url:
                figures.dlt = dlt_run(dlt_python, base, url, "admin")
        figures.nightlies.append(_nightly(base, kind, workload, last_url, figures.wall_runs[-1]))
    realistic = replace(workload, open_share=REALISTIC_OPEN_SHARE)
    with admin_simulator(realistic, LATENCY) as base, database(kind) as url:
        full = admin_run(base, url, kind, full=True, label=f"{kind}-realistic-full")
        figures.nightlies.append(_nightly(base, kind, realistic, url, full))
    with admin_simulator(workload.scaled(10), 0.0) as base, database(kind) as url:
        figures.small = admin_run(base, url, kind, full=True, label=f"{kind}-small")
    return figures


def _cpu_and_floor(figures: KindFigures, base: str, kind: str, repeat: int) -> None:
    """`repeat` full walks at 0 ms, each into a fresh database, each followed by a fetch
    floor; the insert floor once, from the last run's rows."""
    for number in range(repeat):
        with database(kind) as url:
            figures.cpu_runs.append(admin_run(base, url, kind, full=True, label=f"{kind}-cpu-{number}"))
            if number == repeat - 1:
                figures.insert_cpu, figures.floor_rows = insert_floor(kind, url)
        figures.floors.append(measure_fetch_floor(base))


def _nightly(base: str, kind: str, workload: Workload, database_url: str, full: AdminRun) -> Nightly:
    """A day's changes, the nightly run over `database_url` (where `full` left its rows),
    and the check of every attempt against the server."""
    day = make_a_day(base, workload)
    night = admin_run(base, database_url, kind, full=False, label=f"{kind}-nightly-{workload.open_share}")
    if night.full:
        raise RuntimeError(f"the nightly run walked everything: {night.reason}")
    return Nightly(workload.open_text(), full, day, night, check_attempts(base, database_url))


# --- tables --------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def wall_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    rows = []
    for figures in all_figures:
        runs = figures.wall_runs
        run = median(runs, lambda r: r.wall)
        ideal = ideal_wall(run.requests, LATENCY)
        assert figures.bare_fetch is not None
        rows.append([
            figures.kind, f"{run.attempts_seen:,}", f"{run.requests:,}", f"{run.wall:.2f}", f"{ideal:.2f}",
            f"{run.wall / ideal:.2f}", spread([r.wall / ideal_wall(r.requests, LATENCY) for r in runs], ".2f"),
            f"{run.run_wall:.2f}", f"{run.run_wall / ideal:.2f}", f"{run.in_flight:.1f}",
            f"{figures.bare_fetch.wall:.2f}", f"{run.wall / figures.bare_fetch.wall:.2f}", f"{run.cpu:.2f}",
            f"{run.simulator_cpu:.2f}",
            f"{run.peak_rss_mb:.0f}", _mark(run.wall / ideal <= TARGET_WALL),
        ])  # fmt: skip
    return rows


def cpu_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    rows = []
    for figures in all_figures:
        run, floor = median(figures.cpu_runs, lambda r: r.cpu), figures.floor()
        ratio = run.cpu / floor.cpu
        rows.append([
            figures.kind, f"{run.attempts_seen:,}", f"{run.requests:,}", f"{floor.requests:,}", f"{run.wall:.2f}",
            f"{floor.fetch.wall:.2f}", f"{run.cpu:.2f}",
            f"{run.run_cpu:.2f}", f"{floor.fetch.cpu:.2f}", f"{floor.insert_cpu:.2f}", f"{floor.cpu:.2f}",
            f"{ratio:.2f}", spread([r.cpu / floor.cpu for r in figures.cpu_runs], ".2f"),
            f"{run.attempts_seen / run.cpu:,.0f}", f"{run.attempts_seen / floor.cpu:,.0f}",
            f"{run.simulator_cpu:.2f}", _mark(ratio <= TARGET_CPU),
        ])  # fmt: skip
    return rows


def memory_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    rows = []
    for figures in all_figures:
        assert figures.small is not None
        large = median(figures.cpu_runs, lambda r: r.cpu)
        peak = max(run.peak_rss_mb for run in figures.every_w2_run())
        growth = large.peak_rss_mb / figures.small.peak_rss_mb - 1
        rows.append([
            figures.kind, f"{figures.small.attempts_seen:,}: {figures.small.peak_rss_mb:.0f} MB",
            f"{large.attempts_seen:,}: {large.peak_rss_mb:.0f} MB", f"{growth:+.0%}", f"{peak:.0f}",
            _mark(peak <= TARGET_RSS_MB), _mark(growth <= TARGET_GROWTH),
        ])  # fmt: skip
    return rows


def nightly_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    rows = []
    for figures in all_figures:
        for nightly in figures.nightlies:
            full, night, day = nightly.full, nightly.night, nightly.day
            share, wall_share = night.requests / full.requests, night.wall / full.wall
            rows.append([
                figures.kind, nightly.data,
                f"+{day.created:,} Running; {day.completed:,} completed ({day.completed_of_created:,} of them new)",
                f"{full.requests:,}", f"{night.requests:,}", f"{share:.1%}", f"{full.wall:.2f}", f"{night.wall:.2f}",
                f"{night.run_wall:.2f}", f"{wall_share:.1%}", f"{ideal_wall(night.requests, LATENCY):.2f}",
                f"{night.in_flight:.1f}",
                f"{night.cpu:.2f}", f"{night.simulator_cpu:.2f}", f"{night.inserted}/{night.updated}",
                nightly.check.text(),
                f"{_mark(share <= TARGET_NIGHTLY_REQUESTS)}/{_mark(wall_share <= TARGET_NIGHTLY_WALL)}",
            ])  # fmt: skip
    return rows


def route_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    """Requests by route: the median full walk at 20 ms and each nightly run, with when
    each route's first and last request arrived."""
    rows = []
    for figures in all_figures:
        full = median(figures.wall_runs, lambda r: r.wall)
        labelled = [("full walk", full), *((f"nightly, {n.data}", n.night) for n in figures.nightlies)]
        for label, run in labelled:
            for route, span in sorted(run.routes.items(), key=lambda item: item[1].first):
                rows.append([figures.kind, label, route.removeprefix("/api/"), f"{span.requests:,}",
                             f"{span.first:.2f}", f"{span.last:.2f}"])  # fmt: skip
            rows.append([figures.kind, label, "(process wall; run s)", f"{run.requests:,}", "",
                         f"{run.wall:.2f}; {run.run_wall:.2f}"])  # fmt: skip
    return rows


def dlt_rows(all_figures: list[KindFigures]) -> list[list[str]]:
    rows = []
    for figures in all_figures:
        if figures.dlt is None:
            continue
        ours = median(figures.wall_runs, lambda r: r.wall)
        theirs, attempts, requests = figures.dlt
        for tool, wall, cpu, rss, count, sent in (
            ("testpress-sync", ours.wall, ours.cpu, ours.peak_rss_mb, ours.attempts_seen, ours.requests),
            ("dlt rest_api", theirs.wall, theirs.cpu, theirs.peak_rss_mb, attempts, requests),
        ):
            rows.append([
                figures.kind, tool, f"{count:,}", f"{sent:,}", f"{wall:.2f}", f"{wall / ideal_wall(sent, LATENCY):.2f}",
                f"{cpu:.2f}", f"{count / cpu:,.0f}", f"{rss:.0f}",
            ])  # fmt: skip
        rows.append([figures.kind, "dlt ÷ testpress-sync", "", "", f"{theirs.wall / ours.wall:.1f}×", "",
                     f"{theirs.cpu / ours.cpu:.1f}×", "", f"{theirs.peak_rss_mb / ours.peak_rss_mb:.1f}×"])  # fmt: skip
    return rows


def run_w2(kinds: list[str], scale: int, repeat: int, dlt_python: str | None) -> None:
    """Measure each kind and print its tables at once: a kind takes minutes at full size,
    and what one measured survives a failure of the next (a database restarted under it)."""
    workload = W2.scaled(scale) if scale > 1 else W2
    print(f"\nW2{'' if scale == 1 else f' ÷ {scale}'}: {workload.exams:,} exams, {workload.attempts:,} attempts, "
          f"{workload.users:,} users; {repeat} run(s) per figure", flush=True)  # fmt: skip
    for kind in kinds:
        started, load = time.monotonic(), os.getloadavg()[0]
        figures = measure_kind(kind, workload, repeat, dlt_python)
        # The load average tells whether something else ran on the machine meanwhile.
        print(f"\n{kind}: measured in {time.monotonic() - started:.0f} s; load average {load:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after; this process's peak RSS {_own_peak_mb():.0f} MB (a child's "
              "ru_maxrss starts from its parent's RSS at spawn)", flush=True)  # fmt: skip
        print_tables([figures], workload, repeat, dlt_python)


def _own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_tables(all_figures: list[KindFigures], workload: Workload, repeat: int, dlt_python: str | None) -> None:
    small = workload.scaled(10)
    print(table(
        f"W2 full walk (`run --full`) at {LATENCY * 1000:.0f} ms latency, concurrency {DEFAULT_CONCURRENCY} "
        f"(ideal = requests × latency ÷ {DEFAULT_CONCURRENCY}; target ≤ {TARGET_WALL}×; median of {repeat} by wall)",
        ["db", "attempts", "requests", "wall s", "ideal s", "ratio", "ratio range", "run s", "run ÷ ideal",
         "mean in flight", "bare fetch wall s", "wall ÷ bare fetch", "cpu s", "simulator cpu s", "peak MB", "target"],
        wall_rows(all_figures)), flush=True)  # fmt: skip
    print(table(
        f"W2 CPU at 0 ms against the floor (aiohttp fetching the same pages + the driver's executemany of the "
        f"same rows; target ≤ {TARGET_CPU}×; median of {repeat} by process cpu)",
        ["db", "attempts", "requests", "floor requests", "wall s", "floor fetch wall s", "process cpu s", "run cpu s",
         "floor fetch cpu s",
         "floor insert cpu s", "floor cpu s", "cpu ÷ floor", "range", "attempts per cpu-s",
         "floor: attempts per cpu-s", "simulator cpu s", "target"], cpu_rows(all_figures)), flush=True)  # fmt: skip
    print(table(
        f"Peak RSS of the sync process at 0 ms: a tenth of W2 ({small.exams:,} exams, {small.users:,} users) and W2 "
        f"(targets: ≤ {TARGET_RSS_MB:.0f} MB over every W2 run, growth ≤ {TARGET_GROWTH:.0%})",
        ["db", "W2 ÷ 10", "W2", "growth", "max over W2 runs MB", "≤ 150 MB", "growth ≤ 20%"],
        memory_rows(all_figures)), flush=True)  # fmt: skip
    print(table(
        f"Nightly `run` after a day's changes, at {LATENCY * 1000:.0f} ms, against the full walk before it "
        f"(targets: ≤ {TARGET_NIGHTLY_REQUESTS:.0%} of its requests, ≤ {TARGET_NIGHTLY_WALL:.0%} of its wall; "
        "the completed attempts are taken from the day's new ones)",
        ["db", "old attempts open", "day's changes", "full requests", "nightly requests", "share", "full wall s",
         "nightly wall s", "nightly run s", "wall share", "nightly ideal s", "mean in flight", "nightly cpu s",
         "simulator cpu s",
         "ins/upd", "attempts vs server", "targets req/wall"], nightly_rows(all_figures)), flush=True)  # fmt: skip
    print(table(
        "Requests by route (the simulator's counters, polled every 50 ms: seconds from the process start "
        "to each route's first and last request)",
        ["db", "run", "route", "requests", "first s", "last s"], route_rows(all_figures)), flush=True)  # fmt: skip
    if dlt_python is None:
        print("\nW2 beside dlt: skipped: no --dlt-python (`make bench` sets one up)", flush=True)
    else:
        print(table(
            f"W2 at {LATENCY * 1000:.0f} ms beside dlt's rest_api source on the same admin endpoints (exams, "
            "attempts, users, each user's batches, batches; page numbers, last page from count ÷ per_page)",
            ["db", "tool", "attempts", "requests", "wall s", "wall ÷ ideal", "cpu s", "attempts per cpu-s", "peak MB"],
            dlt_rows(all_figures)), flush=True)  # fmt: skip


# --- child processes: `python -m bench.admin serve | fetch-floor` -----------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.admin")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="the simulator over a W2-like data set")
    for name, kind in (("--port", int), ("--exams", int), ("--attempts-per-exam", int), ("--users", int),
                       ("--latency", float), ("--open-share", float)):  # fmt: skip
        serve_parser.add_argument(name, type=kind)
    floor_parser = commands.add_parser("fetch-floor", help="fetch what a full admin walk fetches, and nothing else")
    floor_parser.add_argument("base")
    floor_parser.add_argument("concurrency", type=int)
    insert_parser = commands.add_parser("insert-floor", help="the driver's executemany of a synced database's rows")
    for name in ("kind", "synced_url", "fresh_url"):
        insert_parser.add_argument(name)
    check_parser = commands.add_parser("check", help="every attempt stored against the server's listing")
    check_parser.add_argument("base")
    check_parser.add_argument("database_url")
    args = parser.parse_args(argv)
    if args.command == "serve":
        workload = Workload(args.exams, args.attempts_per_exam, args.users, args.open_share)
        asyncio.run(serve(workload, args.port, args.latency))
    elif args.command == "fetch-floor":
        print(json.dumps(asyncio.run(fetch_floor(args.base, args.concurrency))))
    elif args.command == "insert-floor":
        print(json.dumps(run_insert_floor(args.kind, args.synced_url, args.fresh_url)))
    else:
        print(json.dumps(asdict(compare_attempts(args.base, args.database_url))))


if __name__ == "__main__":
    main()
