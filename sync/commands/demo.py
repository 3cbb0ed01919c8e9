"""`demo` and `simulate`: the bundled Testpress simulator, synced at once or served."""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync.commands import Outcome
from sync.commands.sync import Outputs, open_database, sync_into
from sync.config import Settings
from sync.model.run import RunOptions, RunSummary
from sync.ops.logs import Redactor
from sync.sink import store

if TYPE_CHECKING:
    from sync.simulator import Dataset

DEMO_DATABASE = "testpress-demo.db"


async def demo(
    settings: Settings,
    redactor: Redactor,
    stop: asyncio.Event,
    outputs: Outputs,
    *,
    database_url: str | None,
    exams: int,
    attempts_per_exam: int,
) -> Outcome:
    from sync.simulator import Dataset, SimulatorServer

    database_url = database_url or f"sqlite:///{DEMO_DATABASE}"
    dataset = Dataset(exams=exams, attempts_per_exam=attempts_per_exam, forbidden_every=9)
    async with SimulatorServer(dataset, username="demo", password="demo-password") as simulator:
        settings = replace(
            settings,
            database_url=database_url,
            api=replace(settings.api, base_url=simulator.base_url, username="demo", password="demo-password"),
        )
        print(f"Simulator serving {exams} exams at {simulator.base_url}", file=sys.stderr)
        summary = await sync_into(settings, redactor, stop, RunOptions(), outputs)
    engine = open_database(settings)
    try:
        async with engine.connect() as connection:
            counts = await store.row_counts(connection)
    finally:
        await engine.dispose()
    print(_demo_report(database_url, summary, counts))
    return Outcome.OK if summary.status == "succeeded" else Outcome.INCOMPLETE


def _demo_report(database_url: str, summary: RunSummary, counts: dict[str, int]) -> str:
    path = database_url.removeprefix("sqlite:///")
    lines = [
        "",
        f"Run {summary.run_id} {summary.status} in {summary.duration_seconds:.1f}s "
        f"({summary.requests} requests, {summary.retries} retries).",
        "Rows per table:",
        *(f"  {name:<18} {count:>7}" for name, count in counts.items()),
        "",
    ]
    if database_url.startswith("sqlite:///"):
        lines += [
            f"Database: {Path(path).resolve()}",
            "Try:",
            f"  sqlite3 {path} \"SELECT title, attempt_count, distinct_users, average_score, "
            "completion_rate FROM exam_summary ORDER BY attempt_count DESC LIMIT 5;\"",
            f"  {_this_command()} status --database-url {database_url}",
        ]
    return "\n".join(lines)


def _this_command() -> str:
    """How the user called us (`.venv/bin/testpress-sync` after `make demo`), to quote back."""
    called = sys.argv[0] if sys.argv and sys.argv[0].endswith("testpress-sync") else "testpress-sync"
    return shlex.quote(called)


async def simulate(options: dict[str, Any], ready: Callable[[str], None]) -> None:
    """Serve the simulator until cancelled."""
    from sync.simulator import Dataset, Faults, SimulatorServer

    dataset = Dataset(
        exams=options["exams"], attempts_per_exam=options["attempts_per_exam"],
        users=options["users"], seed=options["seed"],
    )  # fmt: skip
    server = SimulatorServer(
        dataset,
        faults=Faults(latency=options["latency"], token_lifetime=options["token_lifetime"]),
        username=options["username"],
        password=options["password"],
        per_page=options["per_page"],
        host=options["host"],
        port=options["port"],
        warm=True,  # a long-lived simulator: every admin row rendered once, at start
    )
    async with server:
        ready(server.base_url)
        if options.get("webhook_url"):
            await _send_webhooks(dataset, options["webhook_url"])
        await asyncio.Event().wait()


async def _send_webhooks(dataset: Dataset, url: str) -> None:
    """The data set's deliveries, as Testpress would post them, with a few duplicates,
    reorderings and tampered ones, signed with the simulator's demo keys."""
    from sync.simulator import webhooks

    print(
        f"Sending webhook deliveries to {url}, signed with public key {webhooks.DEMO_PUBLIC_KEY!r} and "
        f"private key {webhooks.DEMO_PRIVATE_KEY!r}",
        file=sys.stderr,
        flush=True,
    )
    stream = webhooks.deliveries(dataset, webhooks.DEMO_KEYS, duplicates=0.05, reordered=0.05, tampered_share=0.02)
    results = await webhooks.send_deliveries(url, stream, concurrency=8)
    print(f"Webhook deliveries sent: {len(results)}, answered {webhooks.statuses(results)}", file=sys.stderr, flush=True)
