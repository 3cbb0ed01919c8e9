"""The webhook receiver end to end: a real aiohttp server on 127.0.0.1 writing to real
SQLite and PostgreSQL, fed by the simulator's signed deliveries (signed there from the
documented formula, not with the receiver's code). Both eras, duplicates and reordering,
every refusal and its webhook_events row, the private key kept out of answers, logs and
tables, outages, a nightly run at the same time, SIGTERM and kill -9."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.webhook import free_port, run_webhook, wait_until_healthy
from schema import attempts, exams, users, webhook_events
from sync.cli import main
from sync.commands.webhook import Listening, receiving
from sync.config import Settings, WebhookSettings
from sync.model.resources import ATTEMPTS, EXAMS
from sync.ops.logs import Redactor, configure_logging
from sync.simulator import Dataset, SimulatorServer
from sync.simulator.data import SimAttempt, SimExam
from sync.simulator.webhooks import (
    DEMO_KEYS,
    Sent,
    WebhookKeys,
    deliveries,
    delivery,
    send_deliveries,
    signed,
    statuses,
    tampered,
    unsigned,
)
from sync.sink import store
from sync.sink.database import create_engine, database_url_from
from sync.sink.faults import DatabaseFault, classify
from tests.conftest import _asyncpg_dsn
from tests.helpers import sync_once

KEYS = WebhookKeys("pub-k3y-of-the-institute", "PRIV-k3y-n3ver-shown")
REPO = Path(__file__).resolve().parent.parent


def webhook_settings(database_url: str, **webhook: Any) -> Settings:
    options: dict[str, Any] = dict(port=0, public_key=KEYS.public, private_key=KEYS.private, commit_timeout=3.0)
    options.update(webhook)
    return Settings(database_url=database_url, webhook=WebhookSettings(**options))


@pytest.fixture
async def receiver(engine: AsyncEngine, database_url: str) -> AsyncIterator[Listening]:
    """The receiver in this process, on the test's database (migrated by `engine`)."""
    async with receiving(webhook_settings(database_url, max_body_bytes=4096), Redactor()) as listening:
        yield listening


def small_dataset() -> Dataset:
    return Dataset(exams=3, attempts_per_exam=6, users=8)


def attempts_of(dataset: Dataset) -> list[tuple[SimExam, SimAttempt]]:
    return [(exam, attempt) for exam, attempt in dataset.attempts_by_id() if attempt.state != "Not Started"]


async def send(url: str, *payloads: dict[str, Any]) -> list[int]:
    """POST each payload in turn (one at a time: the order is the test's)."""
    return [sent.status for sent in await send_deliveries(url, payloads, concurrency=1)]


async def post(url: str, data: Any, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers={"Content-Type": content_type}) as response:
        return response.status, json.loads(await response.read())


async def rows(engine: AsyncEngine, statement: Any) -> list[Any]:
    async with engine.connect() as connection:
        return list((await connection.execute(statement)).all())


async def attempt_rows(engine: AsyncEngine) -> dict[int, Any]:
    return {row.id: row for row in await rows(engine, select(attempts))}


# --- what is stored --------------------------------------------------------------------------


async def test_signed_deliveries_of_both_eras_are_stored_with_their_events(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    pairs = attempts_of(dataset)
    old_exam = pairs[-1][0]  # the last exam's attempts come in the 2019 shape, completions only
    typed = [item for item in deliveries(dataset, KEYS) if item["exam"]["id"] != old_exam.id]
    old = [signed(delivery(dataset, exam, attempt, "completed", era=2019), KEYS) for exam, attempt in pairs if exam is old_exam]
    assert old and all(isinstance(item["attempt_id"], str) for item in old)
    assert set(await send(receiver.delivery_url, *typed, *old)) == {200}

    stored = await attempt_rows(engine)
    assert set(stored) == {attempt.id for _, attempt in pairs}
    for exam, attempt in pairs:
        row = stored[attempt.id]
        completed = attempt.state == "Completed" or exam is old_exam
        assert (row.exam_id, row.user_id, row.username) == (exam.id, attempt.user.id, attempt.user.username)
        assert row.state == ("Completed" if completed else "Running")
        assert row.source == "webhook" and row.content_hash.startswith("webhook:") and row.deleted_at is None
        last = delivery(dataset, exam, attempt, "completed" if completed else "started", era=2019 if exam is old_exam else 2023)
        assert row.raw == last and "hash" not in row.raw and "key" not in row.raw
        assert row.score == Decimal(str(last["score"])) and row.correct_count == int(last["correct_answers_count"])
        assert row.date == (None if exam is old_exam else attempt.started)
    for exam_row in await rows(engine, select(exams)):
        assert exam_row.slug is None and exam_row.source == "webhook" and exam_row.content_hash.startswith("webhook:")
        assert exam_row.title == dataset.exam(exam_row.id).title and exam_row.raw["id"] == exam_row.id
    events = await rows(engine, select(webhook_events).order_by(webhook_events.c.id))
    assert len(events) == len(typed) + len(old)
    assert all(event.verified and event.error is None and event.processed_at is not None for event in events)
    assert [event.attempt_id for event in events] == [int(item["attempt_id"]) for item in [*typed, *old]]


async def test_duplicates_and_a_started_after_its_completed_change_nothing(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    exam, attempt = next((exam, attempt) for exam, attempt in attempts_of(dataset) if attempt.state == "Completed")
    started = signed(delivery(dataset, exam, attempt, "started"), KEYS)
    completed = signed(delivery(dataset, exam, attempt, "completed"), KEYS)
    assert await send(receiver.delivery_url, completed) == [200]
    before = (await attempt_rows(engine))[attempt.id]
    assert before.state == "Completed" and before.correct_count == dataset.scores(attempt).correct
    assert await send(receiver.delivery_url, started, completed, started) == [200, 200, 200]
    assert (await attempt_rows(engine))[attempt.id] == before  # every column, last_seen_at included
    assert len(await rows(engine, select(webhook_events))) == 4  # each delivery is an event all the same


async def test_a_started_attempt_is_completed_by_its_completion(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    exam, attempt = next((exam, attempt) for exam, attempt in attempts_of(dataset) if attempt.state == "Completed")
    assert await send(receiver.delivery_url, signed(delivery(dataset, exam, attempt, "started"), KEYS)) == [200]
    assert (await attempt_rows(engine))[attempt.id].state == "Running"
    assert await send(receiver.delivery_url, signed(delivery(dataset, exam, attempt, "completed"), KEYS)) == [200]
    row = (await attempt_rows(engine))[attempt.id]
    assert row.state == "Completed" and row.score == Decimal(dataset.scores(attempt).score)


async def test_a_delivery_without_a_username_takes_the_one_users_holds_for_its_user_id(
    engine: AsyncEngine, receiver: Listening
) -> None:
    dataset = small_dataset()
    (exam, attempt), (other_exam, stranger) = attempts_of(dataset)[:2]
    assert attempt.user.id != stranger.user.id
    async with engine.begin() as connection:
        await connection.execute(insert(users).values(username=attempt.user.username, user_id=attempt.user.id,
                                                      first_seen_at=func.now(), last_seen_at=func.now()))  # fmt: skip
    nameless = [delivery(dataset, e, a, "started") for e, a in ((exam, attempt), (other_exam, stranger))]
    for payload in nameless:
        del payload["username"]
    assert await send(receiver.delivery_url, *(signed(payload, KEYS) for payload in nameless)) == [200, 200]
    stored = await attempt_rows(engine)
    assert (stored[attempt.id].username, stored[stranger.id].username) == (attempt.user.username, None)


async def test_refusals_answer_their_status_are_recorded_and_change_no_attempt(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    exam, attempt = attempts_of(dataset)[0]
    good = signed(delivery(dataset, exam, attempt, "started"), KEYS)
    assert await send(receiver.delivery_url, good) == [200]
    before = await attempt_rows(engine)
    url = receiver.delivery_url
    too_long = {**good, "padding": "x" * 5000}  # the test receiver takes 4 KiB

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 1000  # no Content-Length: the reader's own limit refuses it

    answers = [
        await post(url, json.dumps(tampered(good))),
        await post(url, json.dumps(unsigned(good))),
        await post(url, json.dumps(signed(delivery(dataset, exam, attempt, "started"), WebhookKeys("another", KEYS.private)))),
        await post(url, json.dumps({**good, "key": "another"})),
        await post(url, b'{"attempt_id": 1,'),
        await post(url, json.dumps({k: v for k, v in good.items() if k != "score"})),
        await post(url, json.dumps(good), content_type="text/plain"),
        await post(url, json.dumps(too_long)),
        await post(url, chunked()),
    ]
    assert [(status, document["error"]) for status, document in answers] == [
        (401, "bad_signature"), (401, "missing_signature"), (401, "wrong_public_key"), (401, "wrong_public_key"),
        (400, "malformed_json"), (400, "missing_fields"), (415, "unsupported_media_type"),
        (413, "body_too_large"), (413, "body_too_large"),
    ]  # fmt: skip
    assert await attempt_rows(engine) == before
    refused = await rows(engine, select(webhook_events).where(webhook_events.c.verified.is_(False)).order_by(webhook_events.c.id))
    assert [event.error.split(":")[0] for event in refused] == [document["error"] for _, document in answers]
    assert all(event.processed_at is None for event in refused)
    assert refused[0].attempt_id == attempt.id and refused[0].payload == unsigned(tampered(good))
    assert all(event.payload is None or not {"key", "hash"} & set(event.payload) for event in refused)


async def test_runs_keep_what_the_webhook_knows_better_and_then_rewrite_it_from_the_api(
    engine: AsyncEngine, database_url: str, simulator: SimulatorServer
) -> None:
    await sync_once(simulator, database_url)
    dataset = simulator.dataset
    exam = next(exam for exam in dataset.exams if not (exam.forbidden or exam.vanished))
    completed = next(attempt for attempt in exam.attempts if attempt.state == "Completed")
    running = next(attempt for attempt in exam.attempts if attempt.state == "Running")
    exam_before = (await rows(engine, select(exams).where(exams.c.id == exam.id)))[0]
    nightly = (await attempt_rows(engine))[completed.id]
    async with receiving(webhook_settings(database_url), Redactor()) as listening:
        assert await send(
            listening.delivery_url,
            signed(delivery(dataset, exam, completed, "started"), KEYS),  # late: the run saw it completed
            signed(delivery(dataset, exam, running, "completed"), KEYS),  # news
        ) == [200, 200]
    assert (await rows(engine, select(exams).where(exams.c.id == exam.id)))[0] == exam_before
    after = await attempt_rows(engine)
    assert after[completed.id] == nightly
    webhook_row = after[running.id]
    assert webhook_row.state == "Completed" and webhook_row.source == "webhook"
    assert webhook_row.url is not None  # what the delivery does not carry keeps its stored value
    await sync_once(simulator, database_url)  # a page that still shows it running: older news
    assert (await attempt_rows(engine))[running.id] == webhook_row
    dataset.complete_attempts([running.id])  # Testpress's API now shows it completed too
    await sync_once(simulator, database_url)
    rewritten = (await attempt_rows(engine))[running.id]
    assert rewritten.source == "student" and not rewritten.content_hash.startswith("webhook:")
    assert rewritten.state == "Completed" and rewritten.raw == dataset.attempt_payload(exam, running, simulator.base_url)


# --- health, metrics, secrets ----------------------------------------------------------------


async def test_health_and_metrics(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    good = list(deliveries(dataset, KEYS, limit=10))
    assert set(await send(receiver.delivery_url, *good, tampered(good[0]))) == {200, 401}
    async with aiohttp.ClientSession() as session:
        async with session.get(receiver.base_url + "/healthz") as response:
            assert response.status == 200
            assert (await response.json())["database"] == "reachable"
        async with session.get(receiver.base_url + "/metrics") as response:
            assert response.status == 200
            metrics = {family.name: family for family in text_string_to_metric_families(await response.text())}
    accepted = metrics["testpress_sync_webhook_deliveries_accepted"].samples
    assert sum(sample.value for sample in accepted if sample.name.endswith("_total")) == 10
    refused = [s for s in metrics["testpress_sync_webhook_deliveries_refused"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in refused] == [({"status": "401", "reason": "bad_signature"}, 1)]
    batches = {s.name: s.value for s in metrics["testpress_sync_webhook_batch_size"].samples}
    assert batches["testpress_sync_webhook_batch_size_sum"] == 11  # every delivery, each in some commit
    assert any(s.name == "testpress_sync_webhook_commit_seconds_count" and s.value >= 1 for s in metrics["testpress_sync_webhook_commit_seconds"].samples)


async def test_the_private_key_is_in_no_answer_log_line_or_table(engine: AsyncEngine, database_url: str) -> None:
    redactor = Redactor()
    lines = io.StringIO()
    configure_logging(redactor, format="json", level="debug", stream=lines)
    dataset = small_dataset()
    good = list(deliveries(dataset, KEYS, limit=4))
    leaked = signed({**unsigned(good[1]), "note": f"key is {KEYS.private}"}, KEYS)  # a sender's mistake, stored
    answers = []
    async with receiving(webhook_settings(database_url), redactor) as listening:
        for payload in [*good, tampered(good[1]), leaked, {**good[2], "key": KEYS.private}]:
            async with aiohttp.ClientSession() as session, session.post(listening.delivery_url, json=payload) as response:
                answers.append((response.status, await response.text()))
    assert [status for status, _ in answers] == [200, 200, 200, 200, 401, 200, 401]
    assert all(KEYS.private not in body for _, body in answers)
    logged = lines.getvalue()
    assert "delivery_refused" in logged and "delivery_stored" in logged and KEYS.private not in logged
    async with engine.connect() as connection:
        for table in ("webhook_events", "attempts", "exams"):
            dumped = repr((await connection.execute(text(f"SELECT * FROM {table}"))).all())
            assert KEYS.private not in dumped, table
    stored_note = (await attempt_rows(engine))[int(leaked["attempt_id"])].raw["note"]
    assert stored_note == "key is [redacted]"


def test_the_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["webhook", "--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "/testpress/webhook" in out and "TESTPRESS_WEBHOOK_PRIVATE_KEY" in out and "--webhook-url" in out


def test_missing_keys_are_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TESTPRESS_WEBHOOK_PUBLIC_KEY", "TESTPRESS_WEBHOOK_PRIVATE_KEY", "TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE", "TESTPRESS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TESTPRESS_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("TESTPRESS_LOG_FORMAT", "json")
    assert main(["webhook", "--port", "0"]) == 2
    assert "TESTPRESS_WEBHOOK_PUBLIC_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("TESTPRESS_WEBHOOK_PUBLIC_KEY", KEYS.public)
    monkeypatch.setenv("TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE", str(tmp_path / "absent"))
    assert main(["webhook", "--port", "0"]) == 2
    assert "private key file" in capsys.readouterr().err
    assert not (tmp_path / "w.db").exists()  # refused before anything was opened


# --- the database away -----------------------------------------------------------------------


async def test_a_database_that_does_not_answer_gets_503_after_a_bounded_wait(engine: AsyncEngine, database_url: str) -> None:
    first, second, third = list(deliveries(small_dataset(), KEYS, limit=3))
    async with receiving(webhook_settings(database_url, commit_timeout=0.5), Redactor()) as listening:
        async with write_lock(database_url):
            (late,) = await send_deliveries(listening.delivery_url, [first], concurrency=1)
            assert late.status == 503 and 0.5 <= late.seconds < 3
        assert await send(listening.delivery_url, second, third) == [200, 200]
    # The 503'd one was committed once the lock went: Testpress's repeat will be a duplicate.
    assert {int(item["attempt_id"]) for item in (first, second, third)} <= set(await attempt_rows(engine))


@asynccontextmanager
async def write_lock(database_url: str) -> AsyncIterator[None]:
    """Another session holding the write lock: SQLite's, or webhook_events' on PostgreSQL."""
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    session = await asyncpg.connect(_asyncpg_dsn(database_url))
    try:
        async with session.transaction():
            await session.execute("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await session.close()


@pytest.mark.postgres
async def test_a_database_away_makes_it_unready_answers_503_and_it_recovers(postgres_engine: AsyncEngine, postgres_url: str) -> None:
    dataset = small_dataset()
    payloads = list(deliveries(dataset, KEYS, limit=6))
    database = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_asyncpg_dsn(postgres_url.rsplit("/", 1)[0] + "/postgres"))

    async def cut_connections() -> None:  # every connection of the receiver's pool, as a restart does
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)

    try:
        async with receiving(webhook_settings(postgres_url, commit_timeout=1.0), Redactor()) as listening:
            assert await send(listening.delivery_url, *payloads[:2]) == [200, 200]
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await cut_connections()
            async with aiohttp.ClientSession() as session, session.get(listening.base_url + "/healthz") as response:
                assert response.status == 503 and (await response.json())["database"] == "unreachable"
            (away,) = await send_deliveries(listening.delivery_url, payloads[2:3], concurrency=1)
            assert away.status == 503 and 1.0 <= away.seconds < 4
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await cut_connections()  # and once more with the database back: the retry reconnects
            assert await send(listening.delivery_url, *payloads[3:]) == [200, 200, 200]
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    stored = {row.attempt_id for row in await rows(postgres_engine, select(webhook_events))}
    assert {int(item["attempt_id"]) for item in [*payloads[:2], *payloads[3:]]} <= stored


@pytest.mark.postgres
async def test_a_deadlock_between_two_writers_is_retried_not_a_refused_row(postgres_engine: AsyncEngine) -> None:
    """Two transactions writing the same rows in opposite orders (a run's batch and a
    group commit could): PostgreSQL aborts one, and that one is retried whole."""
    async with postgres_engine.begin() as connection:
        for name in ("a", "b"):
            await connection.execute(text(f"INSERT INTO users (username, first_seen_at, last_seen_at) VALUES ('{name}', now(), now())"))
    touch = "UPDATE users SET display_name = 'x' WHERE username = '{}'"
    async with postgres_engine.connect() as first, postgres_engine.connect() as second:
        await first.execute(text(touch.format("a")))
        await second.execute(text(touch.format("b")))
        outcomes = await asyncio.gather(
            first.execute(text(touch.format("b"))), second.execute(text(touch.format("a"))), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        await first.rollback()
        await second.rollback()
    assert len(errors) == 1 and classify(errors[0]) is DatabaseFault.OUTAGE, errors


# --- beside the nightly run ------------------------------------------------------------------


def unlisted(dataset: Dataset, count: int) -> list[tuple[SimExam, SimAttempt]]:
    """Attempts Testpress's API does not list (yet): started after the walk read their exam."""
    exam = next(exam for exam in dataset.exams if not (exam.forbidden or exam.vanished))
    user = dataset.users[0]
    return [(exam, SimAttempt(9_000_000 + n, user, "Completed", exam.created + timedelta(days=2))) for n in range(count)]


async def test_a_nightly_run_and_a_stream_of_deliveries_write_side_by_side(
    engine: AsyncEngine, database_url: str, simulator: SimulatorServer
) -> None:
    simulator.state.faults.latency = 0.05  # a walk long enough for the deliveries to land in it
    dataset = simulator.dataset
    fresh = [signed(delivery(dataset, exam, attempt, "completed"), KEYS) for exam, attempt in unlisted(dataset, 20)]
    listed = list(deliveries(dataset, KEYS, limit=300, duplicates=0.2, reordered=0.2))
    async with receiving(webhook_settings(database_url), Redactor()) as listening:
        run = asyncio.create_task(sync_once(simulator, database_url))
        while simulator.state.requests < 2:  # logged in: the run's walk has begun
            await asyncio.sleep(0.005)
        sent = await send_deliveries(listening.delivery_url, fresh, concurrency=8)
        assert not run.done()  # these landed while the walk was going, before its marks
        sent += await send_deliveries(listening.delivery_url, listed, concurrency=8)
        summary = await run
    assert summary.status == "succeeded" and summary.listing_complete
    assert statuses(sent) == {200: len(fresh) + len(listed)}
    stored = await attempt_rows(engine)
    assert all(stored[int(item["attempt_id"])].deleted_at is None for item in fresh)
    assert not [row for row in stored.values() if row.source == "webhook" and row.deleted_at is not None]
    assert len(await rows(engine, select(webhook_events))) == len(sent)
    for exam in dataset.exams:
        if exam.forbidden or exam.vanished:
            continue
        for attempt in exam.attempts:  # whoever wrote last, no completion was taken back
            if attempt.state == "Completed":
                assert stored[attempt.id].state == "Completed"
    # The next run sees the unlisted ones as Testpress does (gone) and marks them deleted.
    await sync_once(simulator, database_url)
    again = await attempt_rows(engine)
    assert all(again[int(item["attempt_id"])].deleted_at is not None for item in fresh)


async def test_deletion_marks_spare_what_a_webhook_wrote_after_the_walk_began(engine: AsyncEngine, receiver: Listening) -> None:
    dataset = small_dataset()
    ((exam, attempt),) = unlisted(dataset, 1)
    assert await send(receiver.delivery_url, signed(delivery(dataset, exam, attempt, "completed"), KEYS)) == [200]
    async with engine.connect() as connection:
        written = (await connection.execute(select(attempts.c.last_seen_at).where(attempts.c.id == attempt.id))).scalar_one()
        earlier, later = written - timedelta(seconds=1), written + timedelta(seconds=1)
        # A walk that began before the delivery was stored: the row is newer than its listing.
        spared = (
            await store.mark_missing_children_deleted(connection, ATTEMPTS, {exam.id: frozenset()}, later, written_before=earlier),
            await store.mark_missing_deleted(connection, EXAMS, frozenset(), later, {}, written_before=earlier),
        )
        assert (await connection.execute(select(func.count()).where(attempts.c.deleted_at.is_not(None)))).scalar() == 0
        # A walk that began after it: what the walk did not see is gone.
        marked = (
            await store.mark_missing_children_deleted(connection, ATTEMPTS, {exam.id: frozenset()}, later, written_before=later),
            await store.mark_missing_deleted(connection, EXAMS, frozenset(), later, {}, written_before=later),
        )
        await connection.rollback()
    assert (spared, marked) == ((0, 0), (1, 1))


# --- signals: SIGTERM and kill -9 ------------------------------------------------------------


@pytest.fixture
def receiver_process(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`testpress-sync webhook` in a process of its own; yields it, its delivery URL and its
    stderr file."""
    port = free_port()
    env = {
        **os.environ, "TESTPRESS_DATABASE_URL": database_url, "TESTPRESS_LOG_FORMAT": "json",
        "TESTPRESS_WEBHOOK_PUBLIC_KEY": KEYS.public, "TESTPRESS_WEBHOOK_PRIVATE_KEY": KEYS.private,
    }  # fmt: skip
    env.pop("TESTPRESS_CONFIG", None)
    stderr_path = tmp_path / "receiver.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sync", "webhook", "--port", str(port)], cwd=tmp_path, env=env, stderr=stderr
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process)
        yield process, base + "/testpress/webhook", stderr_path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def _stream_then_signal(url: str, process: subprocess.Popen[bytes], signum: int, after: int) -> list[Sent]:
    """Send a stream of deliveries, 16 at a time; once `after` have been answered, send the
    process `signum`. The senders go on until they run out or the receiver is gone."""
    dataset = Dataset(exams=20, attempts_per_exam=20, users=50)
    answered = 0

    def count(sent: Sent) -> None:
        nonlocal answered
        answered += 1
        if answered == after:
            os.kill(process.pid, signum)

    return await send_deliveries(url, deliveries(dataset, KEYS, limit=600), concurrency=16, timeout=15, on_sent=count)


async def _assert_stored(engine: AsyncEngine, sent: list[Sent]) -> None:
    """Every delivery answered 2xx has its event, and its attempt is stored at least as far
    as it said (a completion acknowledged is a Completed attempt)."""
    acknowledged = [item for item in sent if 200 <= item.status < 300]
    events = set(await rows(engine, select(webhook_events.c.attempt_id, webhook_events.c.attempt_state)))
    stored = await attempt_rows(engine)
    for item in acknowledged:
        attempt_id, state = int(item.payload["attempt_id"]), item.payload["attempt_state"]
        assert (attempt_id, state) in events and attempt_id in stored, (attempt_id, state)
        assert state == "started" or stored[attempt_id].state == "Completed", attempt_id


async def test_sigterm_answers_what_is_in_flight_and_exits_0(
    engine: AsyncEngine, receiver_process: tuple[subprocess.Popen[bytes], str, Path]
) -> None:
    process, url, stderr_path = receiver_process
    sent = await _stream_then_signal(url, process, signal.SIGTERM, after=100)
    assert await asyncio.to_thread(process.wait, 20) == 0
    codes = statuses(sent)
    # Answered (those in flight at the signal too: more than the 100 before it), or never taken.
    assert codes.get(200, 0) > 100 and set(codes) <= {200, 0}
    await _assert_stored(engine, sent)
    log = stderr_path.read_text()
    assert '"webhook_stopped"' in log and KEYS.private not in log


async def test_kill_9_loses_no_acknowledged_delivery(
    engine: AsyncEngine, receiver_process: tuple[subprocess.Popen[bytes], str, Path]
) -> None:
    process, url, _ = receiver_process
    sent = await _stream_then_signal(url, process, signal.SIGKILL, after=150)
    assert await asyncio.to_thread(process.wait, 20) == -signal.SIGKILL
    assert statuses(sent).get(200, 0) >= 150
    await _assert_stored(engine, sent)


def test_the_simulator_sends_deliveries_through_its_control_route(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        database_url = f"sqlite:///{tmp_path / 'w.db'}"
        async with (
            receiving(webhook_settings(database_url), Redactor()) as listening,
            SimulatorServer(small_dataset()) as simulator,
            aiohttp.ClientSession() as session,
        ):
            options = {"url": listening.delivery_url, "public_key": KEYS.public, "private_key": KEYS.private,
                       "duplicates": 0.5, "tampered": 0.5}  # fmt: skip
            async with session.post(simulator.base_url + "/_simulator/webhooks", json=options) as response:
                assert response.status == 200
                return dict(await response.json())

    answer = asyncio.run(scenario())
    assert set(answer["statuses"]) == {"200", "401"} and answer["sent"] > 20



def test_the_benchmark_scenario_measures_a_receiver_in_a_process_of_its_own(tmp_path: Path) -> None:
    figures = run_webhook(f"sqlite:///{tmp_path / 'bench.db'}", "sqlite", count=300, concurrency=8)
    assert figures.accepted == figures.deliveries == 300
    assert 0 < figures.p50_ms <= figures.p99_ms <= figures.max_ms and figures.per_second > 0
    assert figures.receiver_cpu > 0 and figures.mean_batch >= 1


async def test_simulate_with_a_webhook_url_posts_its_deliveries_signed_with_the_demo_keys(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = webhook_settings(database_url, public_key=DEMO_KEYS.public, private_key=DEMO_KEYS.private)
    async with receiving(demo, Redactor()) as listening:
        command = [sys.executable, "-m", "sync", "simulate", "--port", str(free_port()), "--exams", "2",
                   "--attempts-per-exam", "5", "--webhook-url", listening.delivery_url]  # fmt: skip
        simulator = await asyncio.create_subprocess_exec(*command, cwd=REPO, stderr=asyncio.subprocess.PIPE)
        try:
            assert simulator.stderr is not None
            async with asyncio.timeout(30):
                while b"Webhook deliveries sent" not in (line := await simulator.stderr.readline()):
                    assert line, "the simulator ended before it had sent its deliveries"
        finally:
            simulator.terminate()
            await simulator.wait()
    engine = create_engine(database_url_from(database_url))
    try:
        events = await rows(engine, select(webhook_events.c.verified, webhook_events.c.error))
    finally:
        await engine.dispose()
    assert sum(verified for verified, _ in events) > 10  # signed with the keys the receiver has
    assert {error.split(":")[0] for verified, error in events if not verified} <= {"bad_signature"}  # tampered ones
