"""Attempt details (sections, subjects, difficulty levels) through the admin API, against
the simulator on 127.0.0.1, into real SQLite and PostgreSQL: what is stored, which
attempts are read (new and changed ones only), failures, and the views built on them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import attempt_difficulty, attempt_sections, attempt_subjects, attempts, sync_errors, sync_state
from sync.cli import build_parser, settings_from
from sync.config import Settings, SyncSettings, load_settings
from sync.model.run import RowCounts
from sync.ops.logs import Redactor
from sync.run import run_sync
from sync.simulator import Dataset, SimulatorServer
from sync.simulator.admin import DETAIL_FAULTS_KEY
from sync.source.client import TestpressClient, open_session
from tests.conftest import PASSWORD, USERNAME, fast_settings
from tests.helpers import error_rows, sync_with

DETAIL_ROUTE = "/api/v2.5/admin/attempts/{attempt_id}/"


@pytest.fixture
async def institute() -> AsyncIterator[SimulatorServer]:
    # 360 attempts: two admin listing pages, a detail each.
    dataset = Dataset(exams=9, attempts_per_exam=40, users=30, seed=5, forbidden_every=0, vanished_every=0)
    async with SimulatorServer(dataset, username=USERNAME, password=PASSWORD) as server:
        yield server


def details_settings(simulator: SimulatorServer, database_url: str, *, details: bool = True) -> Settings:
    settings = fast_settings(simulator.base_url, database_url)
    return replace(settings, api=replace(settings.api, source="auto"), sync=SyncSettings(batch_size=100, attempt_details=details))


def detail_requests(simulator: SimulatorServer) -> int:
    return simulator.state.by_route.get(DETAIL_ROUTE, 0)


def attempt_ids(simulator: SimulatorServer) -> list[int]:
    return [attempt.id for _, attempt in simulator.dataset.attempts_by_id()]


async def served_details(simulator: SimulatorServer, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Each attempt's detail as the server answers it now, over HTTP."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{simulator.base_url}/api/v2.5/auth-token/",
                             json={"username": USERNAME, "password": PASSWORD}) as response:  # fmt: skip
            headers = {"Authorization": f"JWT {(await response.json())['token']}"}
        served = {}
        for ident in ids:
            async with http.get(f"{simulator.base_url}/api/v2.5/admin/attempts/{ident}/", headers=headers) as response:
                assert response.status == 200, ident
                served[ident] = await response.json()
        return served


def seconds(text: str) -> Decimal:
    """`2:47:53.076906` or `1 day, 0:00:03` as exact seconds (written apart from the
    normalizer's parser, to check it)."""
    days = 0
    if "day" in text:
        count, _, text = text.partition(", ")
        days = int(count.split()[0])
    hours, minutes, rest = text.split(":")
    return Decimal(days * 86400 + int(hours) * 3600 + int(minutes) * 60) + Decimal(rest)


Details = dict[str, set[tuple[Any, ...]]]


def expected_details(detail: dict[str, Any]) -> Details:
    """The rows the contract says a detail becomes, table by table."""
    return {
        "sections": {
            (s["section_id"], s["order"], seconds(s["time_taken"]), s["correct_answers_count"],
             s["incorrect_answers_count"], s["unanswered_count"], Decimal(str(s["score"])))
            for s in detail["sections"]
        },
        "subjects": {
            (s["subject_name"], s["subject_id"], s["parent_subject_id"], s["is_leaf"], s["total_count"],
             s["correct_answers_count"], s["incorrect_answers_count"], s["unanswered_count"],
             s["partial_correct_answers_count"], Decimal(str(s["score"])))
            for s in detail["subject_stats"]
        },
        "levels": {
            (level, s["total_count"], s["correct_answers_count"], s["incorrect_answers_count"],
             s["unanswered_count"], s["partial_correct_answers_count"])
            for level, s in detail["difficulty_level_stats"].items()
        },
    }  # fmt: skip


async def stored_details(engine: AsyncEngine) -> dict[int, Details]:
    """Every attempt's stored details, in the shape of expected_details."""
    stored: dict[int, Details] = defaultdict(lambda: {"sections": set(), "subjects": set(), "levels": set()})
    c = attempt_sections.c
    sections = select(c.attempt_id, c.section_id, c.section_order, c.time_taken_seconds, c.correct_count,
                      c.incorrect_count, c.unanswered_count, c.score)  # fmt: skip
    s = attempt_subjects.c
    subjects = select(s.attempt_id, s.subject_name, s.subject_id, s.parent_subject_id, s.is_leaf, s.total_count,
                      s.correct_count, s.incorrect_count, s.unanswered_count, s.partial_correct_count, s.score)  # fmt: skip
    d = attempt_difficulty.c
    levels = select(d.attempt_id, d.level, d.total_count, d.correct_count, d.incorrect_count, d.unanswered_count,
                    d.partial_correct_count)  # fmt: skip
    async with engine.connect() as connection:
        for kind, query in (("sections", sections), ("subjects", subjects), ("levels", levels)):
            for attempt_id, *values in (await connection.execute(query)).all():
                stored[attempt_id][kind].add(tuple(values))
    return dict(stored)


async def attempt_marks(engine: AsyncEngine) -> dict[int, Any]:
    async with engine.connect() as connection:
        query = select(attempts.c.id, attempts.c.content_hash, attempts.c.details_hash, attempts.c.details_fetched_at,
                       attempts.c.percentile)  # fmt: skip
        return {row.id: row for row in (await connection.execute(query)).all()}


async def assert_details_match(engine: AsyncEngine, simulator: SimulatorServer, ids: list[int]) -> None:
    served, kept, marks = await served_details(simulator, ids), await stored_details(engine), await attempt_marks(engine)
    for ident in ids:
        assert kept[ident] == expected_details(served[ident]), ident
        mark = marks[ident]
        assert mark.details_hash == mark.content_hash and mark.details_fetched_at is not None, ident
        assert mark.percentile == Decimal(repr(served[ident]["percentile"])), ident


async def test_every_attempt_gets_its_details_as_the_detail_route_serves_them(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    summary = await sync_with(details_settings(institute, database_url))
    assert (summary.status, summary.source) == ("succeeded", "admin")
    ids = attempt_ids(institute)
    assert detail_requests(institute) == len(ids)
    assert summary.by_table["attempt_details"] == RowCounts(inserted=len(ids))
    # The run's row totals stay those of the data rows; details are counted by attempt.
    assert summary.rows.inserted == sum(
        counts.inserted for table, counts in summary.by_table.items() if table not in ("users", "attempt_details")
    )
    await assert_details_match(engine, institute, ids)
    kept = await stored_details(engine)
    subjects = [row for details in kept.values() for row in details["subjects"]]
    assert any(row[1] is None for row in subjects) and any(row[2] is not None for row in subjects)  # null ids, parents


async def test_a_second_run_over_unchanged_data_fetches_no_detail(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = details_settings(institute, database_url)
    await sync_with(settings)
    before = detail_requests(institute)
    again = await sync_with(settings)
    assert again.status == "succeeded"
    assert detail_requests(institute) == before
    assert "attempt_details" not in again.by_table


async def test_a_changed_attempt_gets_its_details_again_in_place_of_the_old_ones(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = details_settings(institute, database_url)
    await sync_with(settings)
    old = await stored_details(engine)
    running = [attempt.id for _, attempt in institute.dataset.attempts_by_id() if attempt.state == "Running"][:3]
    assert institute.dataset.complete_attempts(running) == running
    before = detail_requests(institute)
    nightly = await sync_with(settings)
    assert (nightly.status, nightly.full_walk) == ("succeeded", False)
    assert detail_requests(institute) - before == len(running)
    assert nightly.by_table["attempt_details"] == RowCounts(updated=len(running))
    await assert_details_match(engine, institute, running)
    kept = await stored_details(engine)
    assert all(kept[ident] != old[ident] for ident in running)  # replaced, no old row left beside the new
    assert {ident: kept[ident] for ident in old if ident not in running} == {
        ident: details for ident, details in old.items() if ident not in running
    }


async def test_a_detail_that_fails_or_will_not_parse_is_recorded_and_read_again_next_run(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    ids = attempt_ids(institute)
    failing, malformed = ids[5], ids[17]
    faults = institute.app[DETAIL_FAULTS_KEY]
    faults.failing.add(failing)
    faults.malformed.add(malformed)
    settings = details_settings(institute, database_url)
    first = await sync_with(settings)
    assert (first.status, first.errors) == ("partial", 2)
    assert first.retries >= settings.http.max_attempts - 1  # the failing one was retried like any request
    async with engine.connect() as connection:
        errors = (await connection.execute(select(sync_errors.c.entity, sync_errors.c.key, sync_errors.c.http_status,
                                                  sync_errors.c.message))).all()  # fmt: skip
        watermark = (await connection.execute(select(sync_state.c.watermark))).scalar_one()
    assert {(e.entity, e.key, e.http_status) for e in errors} == {
        ("attempt_detail", str(failing), 500), ("attempt_detail", str(malformed), None)
    }
    assert any("subject_name" in e.message for e in errors if e.key == str(malformed))
    kept, marks = await stored_details(engine), await attempt_marks(engine)
    for ident in (failing, malformed):  # nothing stored, not marked as fetched
        assert ident not in kept and marks[ident].details_hash is None and marks[ident].details_fetched_at is None
    await assert_details_match(engine, institute, [i for i in ids if i not in (failing, malformed)])
    assert watermark is not None  # the attempts were all stored: details do not hold the next run back

    faults.failing.clear()
    faults.malformed.clear()
    before = detail_requests(institute)
    second = await sync_with(settings)
    assert (second.status, second.errors) == ("succeeded", 0)
    assert detail_requests(institute) - before == 2
    await assert_details_match(engine, institute, [failing, malformed])


@pytest.mark.parametrize("policy", ["hash", "drop"])
async def test_a_detail_recorded_in_sync_errors_keeps_personal_data_as_the_policy_says(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str, policy: str
) -> None:
    """A detail repeats its attempt's row, e-mail and phone included: one that will not
    parse goes to sync_errors as the policy would store it, never in clear."""
    malformed = next(attempt for _, attempt in institute.dataset.attempts_by_id()
                     if institute.dataset.profile(attempt.user).email and institute.dataset.profile(attempt.user).phone)  # fmt: skip
    institute.app[DETAIL_FAULTS_KEY].malformed.add(malformed.id)
    settings = details_settings(institute, database_url)
    settings = replace(settings, sync=replace(settings.sync, pii=policy, pii_salt="pepper"))
    assert (await sync_with(settings)).status == "partial"
    [payload] = [row.payload for row in await error_rows(engine) if row.entity == "attempt_detail"]
    profile = institute.dataset.profile(malformed.user)
    assert payload["id"] == malformed.id and "sections" in payload
    for key in ("email", "phone"):
        assert payload[key] == (None if policy == "drop" else hashlib.sha256(f"pepper:{getattr(profile, key)}".encode()).hexdigest())


async def test_a_run_stopped_among_the_details_keeps_those_fetched_and_the_next_reads_the_rest(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = details_settings(institute, database_url)
    institute.state.faults.latency = 0.005  # details arrive while the stop is being set
    stop = asyncio.Event()

    async def stop_among_the_details() -> None:
        while detail_requests(institute) < 100:
            await asyncio.sleep(0.001)
        stop.set()

    stopper = asyncio.create_task(stop_among_the_details())
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor())
        stopped = await run_sync(engine, client, settings, Redactor(), stop=stop)
    await stopper
    assert stopped.status == "interrupted"
    marks = await attempt_marks(engine)
    fetched = [ident for ident, mark in marks.items() if mark.details_hash is not None]
    assert 0 < len(fetched) < len(marks)  # those answered before the stop (in flight: cancelled)
    await assert_details_match(engine, institute, fetched)  # whole: each with all its rows
    assert set(await stored_details(engine)) == set(fetched)
    before = detail_requests(institute)
    rest = await sync_with(settings)
    assert rest.status == "succeeded" and detail_requests(institute) - before == len(marks) - len(fetched)
    await assert_details_match(engine, institute, attempt_ids(institute))


async def test_with_the_setting_off_no_detail_is_requested(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    summary = await sync_with(details_settings(institute, database_url, details=False))
    assert summary.status == "succeeded" and detail_requests(institute) == 0
    async with engine.connect() as connection:
        for table in (attempt_sections, attempt_subjects, attempt_difficulty):
            assert (await connection.execute(select(func.count()).select_from(table))).scalar_one() == 0
        assert (await connection.execute(select(func.count()).where(attempts.c.details_hash.is_not(None)))).scalar_one() == 0


async def test_details_are_fetched_concurrently_within_the_bound(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = details_settings(institute, database_url, details=False)
    await sync_with(settings)  # the attempts first: the next run's own walk is a few requests
    institute.state.faults.latency = 0.02
    institute.state.max_in_flight = 0
    started = time.monotonic()
    summary = await sync_with(replace(settings, sync=replace(settings.sync, attempt_details=True)))
    took = time.monotonic() - started
    ids = attempt_ids(institute)
    assert summary.status == "succeeded" and detail_requests(institute) == len(ids)
    assert institute.state.max_in_flight == settings.http.concurrency  # reached, never passed
    one_by_one = len(ids) * 0.02
    assert took < one_by_one / 2, (took, one_by_one)  # 8 at a time: ~1 s where one by one takes 7


async def test_subject_views_add_up_the_stored_details(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    assert (await sync_with(details_settings(institute, database_url))).status == "succeeded"
    served = await served_details(institute, attempt_ids(institute))
    by_exam: dict[tuple[Any, ...], list[tuple[float | None, Decimal]]] = defaultdict(list)
    by_student: dict[tuple[Any, ...], list[tuple[int, int, Decimal]]] = defaultdict(list)
    for detail in served.values():
        for subject in detail["subject_stats"]:
            total, correct, score = subject["total_count"], subject["correct_answers_count"], Decimal(str(subject["score"]))
            by_exam[(detail["exam_id"], subject["subject_id"], subject["subject_name"])].append(
                (correct / total if total else None, score)
            )
            by_student[(detail["user_id"], subject["subject_id"], subject["subject_name"])].append((total, correct, score))
    async with engine.connect() as connection:
        performance = (await connection.exec_driver_sql(
            "SELECT exam_id, subject_id, subject_name, attempt_count, average_correct_ratio, average_score FROM subject_performance"
        )).all()  # fmt: skip
        strengths = (await connection.exec_driver_sql(
            "SELECT user_id, subject_id, subject_name, attempt_count, questions, correct, correct_ratio, average_score, username "
            "FROM student_subjects"
        )).all()  # fmt: skip
    assert {row[:3] for row in performance} == set(by_exam)
    for exam_id, subject_id, name, count, ratio, score in performance:
        figures = by_exam[(exam_id, subject_id, name)]
        ratios = [r for r, _ in figures if r is not None]
        assert count == len(figures)
        assert float(ratio) == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)
        assert float(score) == pytest.approx(float(sum(s for _, s in figures) / len(figures)), abs=1e-4)
    assert {row[:3] for row in strengths} == set(by_student)
    usernames = {user.id: user.username for user in institute.dataset.users}
    for user_id, subject_id, name, count, questions, correct, ratio, score, username in strengths:
        figures = by_student[(user_id, subject_id, name)]
        assert (count, questions, correct) == (len(figures), sum(t for t, _, _ in figures), sum(c for _, c, _ in figures))
        assert float(ratio) == pytest.approx(correct / questions, abs=1e-4)
        assert float(score) == pytest.approx(float(sum(s for _, _, s in figures) / len(figures)), abs=1e-4)
        assert username == usernames[user_id]


def test_the_setting_comes_from_the_file_the_environment_or_details(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    absent = tmp_path / "absent.env"
    assert load_settings(environ={}, dotenv_path=absent).sync.attempt_details is False
    for variable in ("TESTPRESS_SYNC_ATTEMPT_DETAILS", "TESTPRESS_ATTEMPT_DETAILS"):
        assert load_settings(environ={variable: "true"}, dotenv_path=absent).sync.attempt_details is True
    config = tmp_path / "c.toml"
    config.write_text("[sync]\nattempt_details = true\n")
    assert load_settings(config_path=str(config), environ={}, dotenv_path=absent).sync.attempt_details is True

    monkeypatch.chdir(tmp_path)  # no .env
    for name in ("TESTPRESS_CONFIG", "TESTPRESS_SYNC_ATTEMPT_DETAILS", "TESTPRESS_ATTEMPT_DETAILS"):
        monkeypatch.delenv(name, raising=False)
    for command in ("run", "backfill"):
        settings, sources = settings_from(build_parser().parse_args([command, "--details"]), lambda *_, **__: None)
        assert settings.sync.attempt_details is True and sources["sync.attempt_details"] == "flag --attempt-details"
        settings, _ = settings_from(build_parser().parse_args([command]), lambda *_, **__: None)
        assert settings.sync.attempt_details is False
    monkeypatch.setenv("TESTPRESS_ATTEMPT_DETAILS", "yes")  # no flag: the environment's value stands
    settings, _ = settings_from(build_parser().parse_args(["run"]), lambda *_, **__: None)
    assert settings.sync.attempt_details is True
