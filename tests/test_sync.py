"""End to end: simulator → run → database, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import structlog.testing
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import attempts, sync_runs
from sync.errors import DatabaseError
from sync.simulator import SimulatorServer
from sync.simulator.data import exam_start
from tests.helpers import assert_matches_server, error_rows, stored_rows, sync_once


async def test_run_stores_every_exam_and_attempt_as_served(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    summary = await sync_once(simulator, database_url)
    await assert_matches_server(engine, simulator)
    forbidden = sum(exam.forbidden for exam in simulator.dataset.exams)
    assert summary.status == "succeeded" and summary.errors == 0
    assert summary.exams_seen == 12 and summary.attempts_seen == (12 - forbidden) * 45
    assert summary.rows.inserted == summary.exams_seen + summary.attempts_seen
    async with engine.connect() as connection:
        run = (await connection.execute(select(sync_runs))).one()
    assert (run.status, run.rows_inserted, run.errors) == ("succeeded", summary.rows.inserted, 0)
    assert run.requests == simulator.state.requests and run.finished_at >= run.started_at


async def test_second_run_over_unchanged_data_changes_nothing(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    before = await stored_rows(engine)
    second = await sync_once(simulator, database_url)
    assert (second.rows.inserted, second.rows.updated, second.rows.deleted) == (0, 0, 0)
    assert second.rows.unchanged == second.exams_seen + second.attempts_seen
    assert await stored_rows(engine) == before


async def test_upstream_changes_land(simulator: SimulatorServer, engine: AsyncEngine, database_url: str) -> None:
    await sync_once(simulator, database_url)
    dataset = simulator.dataset
    open_exams = [exam for exam in dataset.exams if not exam.forbidden]
    gone_exam, gone_attempt = open_exams[2], open_exams[3].attempts[5]
    dataset.delete_exam(gone_exam.id)
    dataset.delete_attempt(gone_attempt.id)
    running = sum(
        attempt.state == "Running"
        for exam in dataset.exams
        if not exam.forbidden
        for attempt in exam.attempts
    )
    new_attempts = dataset.add_attempts(open_exams[0], 3)
    dataset.complete_running()
    dataset.rename_exam(open_exams[1].id, "Renamed — नया")
    # Exams whose payload changed: the renamed one, and those whose attempts_count moved.
    changed_exams = {open_exams[1].id} | {e.id for e in (open_exams[0], open_exams[3]) if e.extra_fields}

    summary = await sync_once(simulator, database_url)
    await assert_matches_server(engine, simulator)
    exam_rows, attempt_rows = await stored_rows(engine)
    assert summary.rows.inserted == 3
    assert summary.by_table["attempts"].updated == running
    assert summary.by_table["exams"].updated == len(changed_exams)
    assert summary.rows.deleted == 2
    assert exam_rows[gone_exam.id].deleted_at is not None
    assert attempt_rows[gone_attempt.id].deleted_at is not None
    assert all(attempt_rows[a.id].first_seen_at == attempt_rows[a.id].last_seen_at for a in new_attempts)


async def test_a_deleted_exam_that_returns_is_restored(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    exam = simulator.dataset.exams[0]
    simulator.dataset.delete_exam(exam.id)
    await sync_once(simulator, database_url)
    simulator.dataset.restore_exam(exam)
    await sync_once(simulator, database_url)
    exam_rows, _ = await stored_rows(engine)
    assert exam_rows[exam.id].deleted_at is None
    await assert_matches_server(engine, simulator)


async def test_faults_end_with_exactly_the_rows_of_a_clean_run(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    simulator.state.per_page = 7  # more pages, more chances for things to go wrong
    faults = simulator.state.faults
    faults.throttle_rate, faults.server_error_rate = 0.15, 0.15
    faults.drop_rate, faults.truncate_rate = 0.1, 0.1
    faults.token_lifetime = 0.25
    faults.latency = 0.01
    summary = await sync_once(simulator, database_url, max_attempts=20)
    await assert_matches_server(engine, simulator)
    assert summary.status == "succeeded" and summary.errors == 0
    assert summary.retries > 20 and simulator.state.faults_served > 20
    assert simulator.state.logins >= 2


async def test_an_expired_token_answered_with_403_never_marks_an_exam_forbidden(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """Testpress may refuse an expired token with 403: that is a token question first.
    Tokens live 50 ms here, so several expire during the run: only the exams the server
    forbids are marked forbidden, and a forbidden exam costs no login of its own."""
    faults = simulator.state.faults
    faults.expired_token_status, faults.token_lifetime, faults.latency = 403, 0.05, 0.01
    summary = await sync_once(simulator, database_url)
    assert summary.status == "succeeded" and simulator.state.logins >= 2
    await assert_matches_server(engine, simulator)  # attempts_status included: forbidden only where served so
    faults.token_lifetime = 3600  # one token for the whole run: the forbidden exams cost no login
    before = simulator.state.logins
    assert (await sync_once(simulator, database_url)).status == "succeeded"
    assert simulator.state.logins - before == 1 and any(exam.forbidden for exam in simulator.dataset.exams)


async def test_a_listing_that_refuses_its_first_page_costs_that_listing_only(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """One `state` of the exam listing answers 403, a new login notwithstanding: recorded
    in sync_errors with its URL, the other listings and their attempts are stored, the run
    ends partial, and nothing is marked deleted from the incomplete walk."""
    await sync_once(simulator, database_url)
    # Half the exams not started yet: the refused `upcoming` listing hides stored exams.
    starts = sorted(exam_start(exam) for exam in simulator.dataset.exams)
    simulator.dataset.clock = lambda: starts[len(starts) // 2] + timedelta(minutes=1)
    simulator.state.forbidden_exam_states = {"upcoming"}
    summary = await sync_once(simulator, database_url)
    assert (summary.status, summary.errors, summary.rows.deleted) == ("partial", 1, 0)
    errors = [row for row in await error_rows(engine) if row.run_id == summary.run_id]
    assert [(row.entity, row.http_status) for row in errors] == [("page", 403)] and "state=upcoming" in errors[0].key
    simulator.state.forbidden_exam_states = set()
    await assert_matches_server(engine, simulator)  # the first run's rows, none marked deleted


async def test_a_login_refused_on_purpose_stops_the_run_with_the_reason_and_no_retry(
    simulator: SimulatorServer, database_url: str
) -> None:
    from sync.errors import AuthError

    for code, says in (("parallel_login_restriction", "another session"), ("max_login_exceeded", "cool-off")):
        simulator.state.faults.login_refusal = code
        before = simulator.state.requests
        with pytest.raises(AuthError, match=rf"\({code}\): .*{says}"):
            await sync_once(simulator, database_url)
        assert simulator.state.requests - before == 1  # one login, never a loop


async def test_listing_that_shifts_during_the_walk_still_stores_every_live_exam(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    # Small pages so the listing has several; exams appear and vanish between pages.
    simulator.state.per_page = 3
    simulator.state.faults.listing_inserts = 2
    simulator.state.faults.listing_deletes = 2
    summary = await sync_once(simulator, database_url)
    exam_rows, _ = await stored_rows(engine)
    live = {exam.id for exam in simulator.dataset.exams}
    assert live <= {exam_id for exam_id, row in exam_rows.items() if row.deleted_at is None}
    assert summary.status == "succeeded"
    await sync_once(simulator, database_url)  # settled: the removed exams get their marks
    await assert_matches_server(engine, simulator)


async def test_forbidden_and_vanished_exams_do_not_fail_the_run(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    simulator.dataset.exams[3].vanished = True
    with structlog.testing.capture_logs() as logs:
        summary = await sync_once(simulator, database_url)
    assert summary.status == "succeeded" and summary.errors == 0
    await assert_matches_server(engine, simulator)
    # Not failures, but said once, with the exams they concern.
    said = {entry["status"]: entry["parents"] for entry in logs if entry["event"] == "listings_not_readable"}
    assert said == {
        "forbidden": sorted(exam.id for exam in simulator.dataset.exams if exam.forbidden),
        "not_found": [simulator.dataset.exams[3].id],
    }


async def test_malformed_items_go_to_sync_errors_and_the_rest_is_stored(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    bad = exam.attempts[:2]
    for attempt in bad:
        attempt.malformed = True
    summary = await sync_once(simulator, database_url)
    assert summary.status == "partial" and summary.errors == 2
    # Everything else is unchanged; the two are errors, not attempts seen.
    assert summary.rows.unchanged == summary.exams_seen + summary.attempts_seen
    errors = await error_rows(engine)
    assert {(row.entity, row.key) for row in errors} == {("attempt", str(a.id)) for a in bad}
    assert all("score" in row.message and row.payload["score"] == "twelve" for row in errors)
    _, attempt_rows = await stored_rows(engine)
    # The earlier good versions stay, and are not marked deleted for being unparseable now.
    assert all(attempt_rows[a.id].deleted_at is None for a in bad)
    for attempt in bad:
        attempt.malformed = False
    await assert_matches_server(engine, simulator)


async def test_a_page_that_keeps_failing_is_recorded_and_nothing_is_marked_deleted(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    exam.broken_page = 2
    summary = await sync_once(simulator, database_url, max_attempts=2)
    assert summary.status == "partial" and summary.rows.deleted == 0
    (error,) = await error_rows(engine)
    assert (error.entity, error.http_status) == ("page", 500) and error.key.endswith("page=2")
    exam_rows, attempt_rows = await stored_rows(engine)
    assert exam_rows[exam.id].attempts_status == "error"
    assert all(attempt_rows[a.id].deleted_at is None for a in exam.attempts)


async def test_requests_in_flight_stay_within_the_configured_bound(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    simulator.state.faults.latency = 0.01
    summary = await sync_once(simulator, database_url, concurrency=3)
    assert summary.status == "succeeded"
    assert simulator.state.max_in_flight == 3


async def test_sync_runs_row_exists_while_the_run_is_going(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    simulator.state.faults.latency = 0.05
    task = asyncio.create_task(sync_once(simulator, database_url))
    status = None
    for _ in range(100):
        await asyncio.sleep(0.02)
        async with engine.connect() as connection:
            status = (await connection.execute(select(sync_runs.c.status))).scalar()
        if status:
            break
    assert status == "running"
    await task
    async with engine.connect() as connection:
        finished = (await connection.execute(select(sync_runs.c.status, sync_runs.c.finished_at))).one()
    assert finished.status == "succeeded" and finished.finished_at <= datetime.now(UTC)


async def test_pages_without_count_are_followed_one_by_one_and_nothing_is_deleted(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await sync_once(simulator, database_url)
    gone = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    simulator.dataset.delete_exam(gone.id)
    simulator.state.envelope_counts = False
    summary = await sync_once(simulator, database_url)
    assert summary.status == "succeeded" and summary.rows.deleted == 0
    exam_rows, _ = await stored_rows(engine)
    assert exam_rows[gone.id].deleted_at is None  # unverifiable, so not marked
    simulator.state.envelope_counts = True
    await sync_once(simulator, database_url)
    await assert_matches_server(engine, simulator)


async def test_attempts_urls_given_as_paths_are_resolved_against_the_server(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    simulator.state.relative_attempts_urls = True
    summary = await sync_once(simulator, database_url)
    assert summary.status == "succeeded" and summary.errors == 0
    exam_rows, attempt_rows = await stored_rows(engine)
    assert all(row.attempts_url.startswith("/api/") for row in exam_rows.values())  # stored as served
    readable = [exam for exam in simulator.dataset.exams if not (exam.forbidden or exam.vanished)]
    assert {row.id for row in attempt_rows.values()} == {a.id for exam in readable for a in exam.attempts}


async def refuse_inserts(engine: AsyncEngine, table: str, column: str, refused: str) -> None:
    """A constraint of the user's own (or a disk quirk): the database refuses the rows of
    `table` whose `column` (an SQL expression starting with the column) equals `refused`."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT refused CHECK ({column} <> {refused})"))
        else:
            await connection.execute(text(
                f"CREATE TRIGGER refused BEFORE INSERT ON {table} WHEN NEW.{column} = {refused} "
                "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
            ))  # fmt: skip


async def test_rows_the_database_refuses_go_to_sync_errors_and_the_rest_is_stored(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    await refuse_inserts(engine, "attempts", "id % 100", "7")
    summary = await sync_once(simulator, database_url)
    refused = {a.id for e in simulator.dataset.exams if not e.forbidden for a in e.attempts if a.id % 100 == 7}
    assert refused and summary.status == "partial" and summary.errors == len(refused)
    errors = await error_rows(engine)
    assert {int(row.key) for row in errors} == refused
    assert all(row.entity == "attempt" and "refused" in row.message and row.payload["id"] % 100 == 7 for row in errors)
    exam_rows, attempt_rows = await stored_rows(engine)
    served = {a.id for e in simulator.dataset.exams if not e.forbidden for a in e.attempts}
    assert set(attempt_rows) == served - refused
    assert summary.rows.inserted == len(exam_rows) + len(attempt_rows)  # a refused row is not counted


async def test_a_student_renamed_upstream_keeps_their_row_and_their_attempts(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """Usernames change; the Testpress id does not. The row that holds the id takes the
    new name, and the student's attempts are stored as before (before: the id was unique
    to the old row, and every attempt naming the student was refused)."""
    await sync_once(simulator, database_url)
    user = next(a.user for e in simulator.dataset.exams if not e.forbidden for a in e.attempts)
    old_name = user.username
    user.username = f"{old_name}-renamed"
    summary = await sync_once(simulator, database_url)
    assert (summary.status, summary.errors) == ("succeeded", 0)
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT username FROM users WHERE user_id = :id"), {"id": user.id})).all()
        names = {row.username for row in (await connection.execute(text("SELECT username FROM users"))).all()}
    assert [row.username for row in rows] == [user.username] and old_name not in names
    await assert_matches_server(engine, simulator)


async def test_an_attempt_whose_user_is_refused_is_refused_with_it(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    # Row by row, an attempt and its user share a savepoint: neither is stored or counted.
    await refuse_inserts(engine, "users", "username", "'student00007'")
    summary = await sync_once(simulator, database_url)
    readable = [e for e in simulator.dataset.exams if not e.forbidden]
    refused = {a.id for e in readable for a in e.attempts if a.user.username == "student00007"}
    assert refused and summary.status == "partial" and summary.errors == len(refused)
    assert {int(row.key) for row in await error_rows(engine)} == refused
    exam_rows, attempt_rows = await stored_rows(engine)
    assert set(attempt_rows) == {a.id for e in readable for a in e.attempts} - refused
    assert summary.rows.inserted == len(exam_rows) + len(attempt_rows)


async def test_a_table_changed_by_hand_stops_the_run_at_once_and_says_so(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    # Not an outage to wait out (database_retry_seconds is 60 by default), nor a thousand
    # rows each refused the same way: the run stops with the database's own words.
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE attempts RENAME COLUMN review_url TO review_link"))
    started = asyncio.get_running_loop().time()
    with pytest.raises(DatabaseError, match="review_url.*changed by hand") as caught:
        await sync_once(simulator, database_url)
    assert asyncio.get_running_loop().time() - started < 10
    assert "unreachable" not in str(caught.value)
    async with engine.connect() as connection:
        run = (await connection.execute(select(sync_runs.c.status, sync_runs.c.error))).one()
        stored = (await connection.execute(select(func.count()).select_from(attempts))).scalar()
    assert run.status == "failed" and "review_url" in run.error
    assert stored == 0 and await error_rows(engine) == []


async def test_nul_characters_do_not_stop_a_run(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    simulator.dataset.rename_exam(exam.id, "Mock\x00Test")
    summary = await sync_once(simulator, database_url)
    assert summary.status == "succeeded" and summary.errors == 0
    exam_rows, _ = await stored_rows(engine)
    expected = "MockTest" if engine.dialect.name == "postgresql" else "Mock\x00Test"
    assert exam_rows[exam.id].title == expected and exam_rows[exam.id].raw["title"] == expected


async def test_a_throttle_longer_than_we_may_wait_stops_the_run_quickly(
    simulator: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    from sync.errors import ThrottledError

    simulator.state.faults.throttle_rate = 0.2
    simulator.state.faults.retry_after = 3600  # "come back in an hour"
    started = asyncio.get_running_loop().time()
    with pytest.raises(ThrottledError, match="3600s, longer than"):
        await sync_once(simulator, database_url)
    assert asyncio.get_running_loop().time() - started < 10
    async with engine.connect() as connection:
        run = (await connection.execute(select(sync_runs.c.status, sync_runs.c.error))).one()
    assert run.status == "failed" and "throttled" in run.error
