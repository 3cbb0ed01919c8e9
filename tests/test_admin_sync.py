"""The institute-wide sync through the admin API (v2.5), against the simulator on
127.0.0.1, into real SQLite and PostgreSQL: what a full walk stores, what a nightly run
reads and stores, personal data, bad fields, and the choice of source."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import structlog
import structlog.testing
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import attempts, batches, exams, sync_errors, sync_runs, sync_state, user_batches, users
from sync.config import Settings, SyncSettings
from sync.errors import ApiError, ConfigError
from sync.model.plan import MIXED_RULES
from sync.model.webhook import WEBHOOK_HASH_PREFIX
from sync.run import RunOptions
from sync.simulator import Dataset, SimulatorServer
from sync.simulator.admin import DETAIL_FAULTS_KEY
from sync.sink.store import read_sync_state
from tests.conftest import PASSWORD, USERNAME, fast_settings
from tests.helpers import error_rows, one_value, sync_with

ADMIN = "/api/v2.5/admin"


def dataset() -> Dataset:
    # 360 attempts (two admin pages), 30 users and 25 batches (two pages each).
    return Dataset(exams=9, attempts_per_exam=40, users=30, seed=5, forbidden_every=0, vanished_every=0)


@pytest.fixture
async def institute() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(dataset(), username=USERNAME, password=PASSWORD,
                               student_username="pupil", student_password="pupil-pw") as server:  # fmt: skip
        yield server


class NoSuchDay(date):
    """A birth date the server sends as a day that does not exist."""

    def strftime(self, _format: str) -> str:
        return "31/02/2001"


def admin_settings(simulator: SimulatorServer, database_url: str, http: dict[str, Any] | None = None, **sync: Any) -> Settings:
    settings = fast_settings(simulator.base_url, database_url, **(http or {}))
    return replace(
        settings,
        api=replace(settings.api, source="auto"),
        sync=replace(SyncSettings(batch_size=100), **sync),
    )


async def server_rows(simulator: SimulatorServer, path: str) -> dict[int, dict[str, Any]]:
    """Every row of an admin listing, as the server has it now, by id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{simulator.base_url}/api/v2.5/auth-token/",
                             json={"username": USERNAME, "password": PASSWORD}) as response:  # fmt: skip
            token = (await response.json())["token"]
        rows: dict[int, dict[str, Any]] = {}
        url: str | None = f"{simulator.base_url}{ADMIN}/{path}"
        while url:
            async with http.get(url, headers={"Authorization": f"JWT {token}"}) as response:
                page = await response.json()
            rows.update((row["id"], row) for row in page["results"])
            url = page["next"]
        return rows


async def stored(engine: AsyncEngine, table: Any, key: str = "id") -> dict[Any, Any]:
    async with engine.connect() as connection:
        result = await connection.execute(select(table).where(table.c.deleted_at.is_(None)))
        return {row._mapping[key]: row._mapping for row in result}


async def assert_attempts_match(engine: AsyncEngine, simulator: SimulatorServer) -> None:
    served = await server_rows(simulator, "attempts/")
    kept = await stored(engine, attempts)
    assert set(kept) == set(served)
    # The flat rows carry no username: it is the one users holds (renamed upstream too).
    names = {ident: str(row["username"]) for ident, row in (await server_rows(simulator, "users/")).items()}
    for ident, row in served.items():
        mine = kept[ident]
        assert mine["username"] == names[row["user_id"]], ident
        assert (mine["exam_id"], mine["user_id"], mine["state"], mine["result"]) == (
            row["exam_id"], row["user_id"], row["state"], row["result"]
        ), ident
        assert mine["score"] == Decimal(row["score"]) and mine["correct_count"] == row["correct_answers_count"], ident
        assert mine["percentage"] == Decimal(row["percentage"]) and mine["source"] == "admin"


async def test_a_full_admin_sync_stores_the_whole_institute(institute: SimulatorServer, engine: AsyncEngine, database_url: str) -> None:
    summary = await sync_with(admin_settings(institute, database_url))
    assert (summary.status, summary.source, summary.full_walk) == ("succeeded", "admin", True)
    await assert_attempts_match(engine, institute)
    served_exams, kept_exams = await server_rows(institute, "exams/"), await stored(engine, exams)
    assert set(kept_exams) == set(served_exams)
    assert all(row["slug"] is None and row["source"] == "admin" for row in kept_exams.values())
    # Each exam's attempts came with the institute's listing, read whole: the status says so.
    assert {row["attempts_status"] for row in kept_exams.values()} == {"ok"}
    served_users, kept_users = await server_rows(institute, "users/"), await stored(engine, users, "user_id")
    assert set(kept_users) == set(served_users)
    some = next(user for user in served_users.values() if user["birth_date"])
    day, month, year = map(int, some["birth_date"].split("/"))
    assert kept_users[some["id"]]["birth_date"] == date(year, month, day)
    assert kept_users[some["id"]]["email"] == some["email"] and kept_users[some["id"]]["raw"] == some
    # The source check read the batches listing's first page: the walk did not ask again.
    assert institute.state.by_route[f"{ADMIN}/batches/"] == -(-len(institute.dataset.batches) // 20)
    assert set(await stored(engine, batches)) == set(await server_rows(institute, "batches/"))
    memberships = {
        (user_id, batch["id"])
        for user_id in served_users
        for batch in (await server_rows(institute, f"users/{user_id}/batches/")).values()
    }
    async with engine.connect() as connection:
        kept_memberships = set((await connection.execute(select(user_batches.c.user_id, user_batches.c.batch_id))).all())
        state = (await connection.execute(select(sync_state))).one()._mapping
        run = (await connection.execute(select(sync_runs.c.source, sync_runs.c.status))).one()
    assert kept_memberships == memberships
    # The flat rows name students by user_id only: the views count them by it.
    async with engine.connect() as connection:
        students = dict((await connection.execute(text("SELECT exam_id, distinct_users FROM exam_summary"))).all())
        per_day = (await connection.execute(text("SELECT SUM(distinct_users) FROM attempts_per_day"))).scalar_one()
    for exam in institute.dataset.exams:
        assert students[exam.id] == len({a.user.id for a in exam.attempts}), exam.id
    assert per_day == len({(exam.id, a.started.astimezone(UTC).date(), a.user.id)
                           for exam in institute.dataset.exams for a in exam.attempts})  # fmt: skip
    assert state["resource"] == "attempts" and state["watermark"] is not None and state["last_full_at"] == state["watermark"]
    assert tuple(run) == ("admin", "succeeded")


async def test_the_nightly_run_reads_only_what_can_have_changed_and_ends_exact(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = admin_settings(institute, database_url)
    full = await sync_with(settings)
    data = institute.dataset
    exam = data.exams[2]
    user_ids = [user.id for user in data.users[:4]]
    new = data.start_attempts(exam, [data.user(ident) for ident in user_ids], state="Running")
    finished = data.complete_attempts([attempt.id for attempt in new[:2]])
    running_before = [a.id for e in data.exams for a in e.attempts if a.state == "Running" and a.id not in {n.id for n in new}]
    data.complete_attempts(running_before[:3])  # old attempts that were running at the full walk
    data.update_user(user_ids[0], {"first_name": "Renamed", "city": "Madurai", "username": "renamed-upstream"})
    async with engine.begin() as connection:  # as a failed page of an earlier run may leave it
        await connection.execute(exams.update().where(exams.c.id == exam.id).values(attempts_status="error"))
    before = institute.state.requests
    nightly = await sync_with(settings)
    assert (nightly.status, nightly.full_walk) == ("succeeded", False)
    assert {row["attempts_status"] for row in (await stored(engine, exams)).values()} == {"ok"}
    assert institute.state.requests - before == nightly.requests
    assert nightly.requests < full.requests, (nightly.requests, full.requests)
    await assert_attempts_match(engine, institute)
    assert len(finished) == 2
    # Only the changed user's batches were read again.
    assert nightly.by_table["users"].updated == 1 and nightly.by_table["users"].unchanged == len(data.users) - 1
    kept = await stored(engine, users, "user_id")
    assert (kept[user_ids[0]]["first_name"], kept[user_ids[0]]["city"]) == ("Renamed", "Madurai")
    again = await sync_with(settings)
    assert (again.rows.inserted, again.rows.updated, again.rows.deleted) == (0, 0, 0)


async def test_a_course_filter_with_an_admin_login_stops_the_run_instead_of_syncing_everything(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """The admin API has no course filter: ignoring the setting would store (and mark
    deleted) beyond the course the user asked for."""
    with pytest.raises(ConfigError, match="no course filter"):
        await sync_with(admin_settings(institute, database_url, course="IBPS"))
    assert await stored(engine, attempts) == {} and not institute.state.by_route.get(f"{ADMIN}/attempts/")


async def test_exam_rows_without_ids_as_documented_are_read_by_the_id_attempts_name(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """The documented admin exam row has no id; attempts name exams by exam_id. Every exam
    is read from its detail route by that id, every attempt is stored, nothing goes to
    sync_errors, and no exam is marked deleted from a listing whose ids are unknown."""
    institute.state.admin_exam_ids = False
    settings = admin_settings(institute, database_url)
    with structlog.testing.capture_logs() as logs:
        summary = await sync_with(settings)
    assert (summary.status, summary.errors) == ("succeeded", 0)
    routes = institute.state.by_route
    assert routes[f"{ADMIN}/exams/{{exam_id}}/"] == len(institute.dataset.exams)  # each once
    await assert_attempts_match(engine, institute)
    kept = await stored(engine, exams)
    assert set(kept) == {exam.id for exam in institute.dataset.exams}
    for exam in institute.dataset.exams:
        assert kept[exam.id]["title"] == exam.title and "id" not in kept[exam.id]["raw"], exam.id
    warned = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [(entry["event"], entry["resource"]) for entry in warned] == [("listing_without_ids", "exams")]
    again = await sync_with(settings, RunOptions(full=True))
    assert (again.status, again.rows.deleted, again.rows.inserted, again.rows.updated) == ("succeeded", 0, 0, 0)
    assert set(await stored(engine, exams)) == set(kept)
    with pytest.raises(ConfigError, match="--limit samples exams by id"):  # not a silent run of nothing
        await sync_with(settings, RunOptions(limit=3))


async def test_a_nightly_run_over_a_listing_without_ids_reads_only_new_exams_by_id(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """With the documented id-less exam rows, a nightly run does not read again every
    stored exam its window's attempts name (on W2, a thousand requests for a night whose
    whole run makes 280): only those the database does not hold. A full walk reads all."""
    institute.state.admin_exam_ids = False
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    data = institute.dataset
    route = f"{ADMIN}/exams/{{exam_id}}/"
    data.start_attempts(data.exams[2], [data.users[0], data.users[1]], state="Running")
    data.start_attempts(data.exams[5], [data.users[2]], state="Running")
    new_exam = data.add_exam()
    data.start_attempts(new_exam, [data.users[3]], state="Running")
    # An exam row as a webhook delivery leaves it (a few fields): read, to be completed.
    by_webhook = data.exams[7]
    data.start_attempts(by_webhook, [data.users[4]], state="Running")
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE exams SET content_hash = :digest, title = NULL WHERE id = :id"),
            {"digest": f"{WEBHOOK_HASH_PREFIX}0", "id": by_webhook.id},
        )
    before = institute.state.by_route[route]
    nightly = await sync_with(settings)
    assert (nightly.status, nightly.full_walk) == ("succeeded", False)
    assert institute.state.by_route[route] - before == 2  # the new exam and the webhook's
    await assert_attempts_match(engine, institute)
    kept = await stored(engine, exams)
    assert new_exam.id in kept and kept[by_webhook.id]["title"] == by_webhook.title
    before = institute.state.by_route[route]
    assert (await sync_with(settings, RunOptions(full=True))).full_walk
    assert institute.state.by_route[route] - before == len(data.exams)


async def test_an_exam_the_listing_did_not_show_is_read_before_its_attempts(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """An exam created after the exam listing was read (here: left out of it) is read by
    id, so its attempts are stored; one whose detail keeps failing costs its attempts
    only: each goes to sync_errors with its payload, the rest is stored."""
    data = institute.dataset
    late, broken = data.exams[1].id, data.exams[4].id
    institute.state.unlisted_exams = {late, broken}
    institute.app[DETAIL_FAULTS_KEY].failing_exams = {broken}
    summary = await sync_with(admin_settings(institute, database_url, http={"max_attempts": 1}))
    assert summary.status == "partial"
    kept_attempts = await stored(engine, attempts)
    assert {a.id for a in data.exams[1].attempts} <= set(kept_attempts)
    assert late in await stored(engine, exams) and broken not in await stored(engine, exams)
    assert not {a.id for a in data.exams[4].attempts} & set(kept_attempts)
    errors = await error_rows(engine)
    failed = {row.key for row in errors if row.entity == "attempt"}
    assert failed == {str(a.id) for a in data.exams[4].attempts}
    assert all(f"its exam {broken} could not be read" in row.message and row.payload for row in errors if row.entity == "attempt")
    assert [row.key for row in errors if row.entity == "exam"] == [str(broken)]
    assert len(errors) == len(failed) + 1
    # The exam read by id counts as shown: the full walk marks no exam deleted.
    assert summary.rows.deleted == 0


async def test_only_a_full_walk_marks_rows_deleted(institute: SimulatorServer, engine: AsyncEngine, database_url: str) -> None:
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    gone = institute.dataset.exams[0].attempts[0].id
    institute.dataset.delete_attempt(gone)
    with structlog.testing.capture_logs() as logs:
        nightly = await sync_with(settings)
    assert nightly.rows.deleted == 0 and gone in await stored(engine, attempts)
    # Slices by design are no incomplete listing: said at info, not warned about every night.
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == []
    assert {entry["resource"] for entry in logs if entry["event"] == "deletions_not_checked"} == {
        "exams", "users", "batches", "attempts"
    }  # fmt: skip
    full = await sync_with(settings, RunOptions(full=True))
    assert full.rows.deleted == 1 and gone not in await stored(engine, attempts)


async def test_a_user_gone_from_the_listing_takes_their_memberships_along(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    gone = institute.dataset.user(await one_value(engine, select(user_batches.c.user_id).limit(1)))
    institute.dataset.users.remove(gone)
    summary = await sync_with(settings, RunOptions(full=True))
    assert gone.id not in await stored(engine, users, "user_id")
    live = select(func.count()).select_from(user_batches).where(
        user_batches.c.user_id == gone.id, user_batches.c.deleted_at.is_(None))  # fmt: skip
    assert await one_value(engine, live) == 0 and summary.by_table["user_batches"].deleted > 0


async def test_a_run_that_fails_or_samples_does_not_move_the_watermark(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    first = await one_value(engine, select(sync_state.c.watermark))
    institute.state.faults.server_error_rate = 1.0  # every request fails: the run fails
    with pytest.raises(ApiError):
        await sync_with(replace(settings, http=replace(settings.http, max_attempts=1)))
    institute.state.faults.server_error_rate = 0.0
    assert await one_value(engine, select(sync_state.c.watermark)) == first
    # A --limit run is a sample: it records neither a full walk nor a watermark, marks no
    # attempt of the exams it left out deleted, and says of those exams nothing.
    async with engine.begin() as connection:
        await connection.execute(exams.update().values(attempts_status="error"))
    sampled = await sync_with(settings, RunOptions(full=True, limit=2))
    assert (sampled.status, sampled.rows.deleted) == ("succeeded", 0)
    assert await one_value(engine, select(func.count()).select_from(attempts).where(attempts.c.deleted_at.is_not(None))) == 0
    statuses = [row["attempts_status"] for row in (await stored(engine, exams)).values()]
    assert (statuses.count("ok"), statuses.count("error")) == (2, len(statuses) - 2)
    async with engine.connect() as connection:
        assert tuple((await connection.execute(select(sync_state.c.watermark, sync_state.c.last_full_at))).one()) == (first, first)
    # A field stored null costs no row: the run ends partial, and its watermark moves all
    # the same (else, with one such user, no run would ever count as the full walk).
    institute.dataset.profile(institute.dataset.users[0]).birth_date = NoSuchDay(2001, 2, 1)
    partial = await sync_with(settings, RunOptions(full=True))
    assert (partial.status, partial.errors, partial.field_problems) == ("partial", 1, 1)
    async with engine.connect() as connection:
        watermark, last_full = (await connection.execute(select(sync_state.c.watermark, sync_state.c.last_full_at))).one()
    assert watermark > first and last_full == watermark


async def test_a_row_without_a_usable_id_is_recorded_once_and_the_listing_not_walked_again(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """A user served with an id that is no number: one sync_errors row, the listing read
    once (walking it again would not give the row an id), nothing marked deleted from it."""
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    bad = institute.dataset.users[4].id
    institute.state.unidentifiable = {"users": {bad}}
    before = dict(institute.state.by_route)
    summary = await sync_with(settings, RunOptions(full=True))
    listing_pages = -(-len(institute.dataset.users) // 20)
    assert institute.state.by_route[f"{ADMIN}/users/"] - before[f"{ADMIN}/users/"] == listing_pages
    assert (summary.status, summary.errors, summary.rows.deleted) == ("partial", 1, 0)
    assert bad in await stored(engine, users, "user_id")


async def test_a_full_walk_whose_listing_repeats_an_item_records_no_full_walk(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """A listing that kept showing an item twice (or shifting) may have hidden another: the
    walk marks nothing deleted from it, and neither the watermark nor the full walk's time
    moves, so the next run walks everything again."""
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    async with engine.connect() as connection:
        first = tuple((await connection.execute(select(sync_state.c.watermark, sync_state.c.last_full_at))).one())
    institute.state.repeated_users = {institute.dataset.users[0].id}
    hidden = institute.dataset.users[1]  # gone upstream: a walk that can be trusted would mark it
    institute.dataset.users.remove(hidden)
    summary = await sync_with(settings, RunOptions(full=True))
    assert (summary.status, summary.listing_complete, summary.rows.deleted) == ("succeeded", False, 0)
    assert hidden.id in await stored(engine, users, "user_id")
    async with engine.connect() as connection:
        assert tuple((await connection.execute(select(sync_state.c.watermark, sync_state.c.last_full_at))).one()) == first


async def test_a_full_walk_marks_deleted_an_item_that_vanished_while_the_listing_was_read(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """A user deleted upstream between page 1 and page 2 of the users listing: the walk
    does not add up, the listing is walked again, and that walk, which does, no longer
    shows the user. It is marked deleted by this walk, not kept live until the next full
    walk (a week later, by default)."""
    settings = admin_settings(institute, database_url)
    gone = institute.dataset.users[0]  # on page 1
    institute.state.users_deleted_mid_walk = {gone.id}
    with structlog.testing.capture_logs() as logs:
        summary = await sync_with(settings, RunOptions(full=True))
    assert (summary.status, summary.listing_complete) == ("succeeded", True)
    assert any(entry["event"] == "listing_shifted_walking_again" and entry["entity"] == "user" for entry in logs)
    async with engine.connect() as connection:
        rows = dict((await connection.execute(select(users.c.user_id, users.c.deleted_at))).all())
    assert rows[gone.id] is not None  # stored from page 1, then marked deleted
    assert {user_id for user_id, deleted in rows.items() if deleted is None} == {user.id for user in institute.dataset.users}


async def test_attempts_of_a_stored_exam_that_cannot_be_read_again_are_stored_still(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """An exam the database holds, now missing from the listing and failing to answer by
    id: its attempts' rows can still name it, so they are stored, not sent to sync_errors."""
    settings = admin_settings(institute, database_url)
    await sync_with(settings)
    exam = institute.dataset.exams[3]
    institute.state.unlisted_exams = {exam.id}
    institute.app[DETAIL_FAULTS_KEY].failing_exams = {exam.id}
    new = institute.dataset.start_attempts(exam, institute.dataset.users[:2], state="Running")
    summary = await sync_with(admin_settings(institute, database_url, http={"max_attempts": 1}), RunOptions(full=True))
    assert (summary.status, summary.errors) == ("partial", 1)  # the exam's read, recorded
    assert {attempt.id for attempt in new} <= set(await stored(engine, attempts))
    # Live rows name it: it is not marked deleted (a failing read says nothing of that).
    assert exam.id in await stored(engine, exams)


@pytest.mark.parametrize("policy", ["hash", "drop"])
async def test_what_goes_to_sync_errors_follows_the_policy_too(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str, policy: str
) -> None:
    """Attempts that cannot be stored (their exam cannot be read) keep their payload in
    sync_errors: with the e-mail and phone as the policy stores them, never in clear."""
    broken = institute.dataset.exams[2]
    institute.state.unlisted_exams = {broken.id}
    institute.app[DETAIL_FAULTS_KEY].failing_exams = {broken.id}
    settings = admin_settings(institute, database_url, http={"max_attempts": 1}, pii=policy, pii_salt="pepper")
    assert (await sync_with(settings)).status == "partial"
    served = {ident: row for ident, row in (await server_rows(institute, "attempts/")).items()
              if row["exam_id"] == broken.id}  # fmt: skip
    kept = {int(row.key): row.payload for row in await error_rows(engine) if row.entity == "attempt"}
    assert set(kept) == set(served)
    emailed = [ident for ident, row in served.items() if row["email"]]
    assert emailed
    for ident in emailed:
        expected = None if policy == "drop" else hashlib.sha256(f"pepper:{served[ident]['email']}".encode()).hexdigest()
        assert kept[ident]["email"] == expected and kept[ident]["state"] == served[ident]["state"], ident


@pytest.mark.parametrize("policy", ["hash", "drop"])
async def test_personal_data_follows_the_policy_in_columns_and_raw(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str, policy: str
) -> None:
    settings = admin_settings(institute, database_url, pii=policy, pii_salt="pepper")
    assert (await sync_with(settings)).status == "succeeded"
    served = await server_rows(institute, "users/")
    kept = await stored(engine, users, "user_id")
    user = next(user for user in served.values() if user["email"] and user["phone"] and user["city"])
    mine = kept[user["id"]]
    expected = (lambda value: hashlib.sha256(f"pepper:{value}".encode()).hexdigest()) if policy == "hash" else (lambda _: None)
    assert (mine["email"], mine["phone"], mine["city"]) == tuple(expected(user[key]) for key in ("email", "phone", "city"))
    assert mine["birth_date"] is None
    assert mine["raw"]["email"] == expected(user["email"]) and mine["raw"]["username"] == user["username"]
    # The attempts' flat rows carry e-mails and phones too: their raw follows the policy.
    served_attempts = await server_rows(institute, "attempts/")
    kept_attempts = await stored(engine, attempts)
    emailed = [ident for ident, row in served_attempts.items() if row["email"]]
    assert emailed and all(kept_attempts[i]["raw"]["email"] == expected(served_attempts[i]["email"]) for i in emailed)
    # An attempt's `state` is its own (Running, Completed), no address: kept as served.
    assert all(kept_attempts[i]["raw"]["state"] == row["state"] for i, row in served_attempts.items())
    async with engine.connect() as connection:
        everything = str((await connection.execute(text("SELECT * FROM users"))).all())
        everything += str((await connection.execute(text("SELECT raw FROM attempts"))).all())
    assert user["email"] not in everything and user["phone"] not in everything


async def test_a_new_personal_data_policy_makes_the_next_run_write_every_row_again(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """A nightly run reads a window of attempts. After `pii` changes it walks everything,
    so no stored attempt keeps an e-mail the new policy would not store; then nights are
    incremental again."""
    kept = admin_settings(institute, database_url)
    assert (await sync_with(kept)).full_walk
    assert not (await sync_with(kept)).full_walk  # the same rules: a nightly run
    # An attempt and a user deleted upstream, marked deleted by a full walk under `keep`:
    # no listing serves them again, yet the new policy must reach what they hold.
    data, served_users = institute.dataset, await server_rows(institute, "users/")
    served = await server_rows(institute, "attempts/")
    emails = {row["email"] for row in [*served.values(), *served_users.values()] if row["email"]}
    gone_attempt = next(row for row in served.values() if row["email"])
    gone_user = next(user for user in data.users if served_users[user.id]["email"] and served_users[user.id]["phone"])
    assert data.delete_attempt(gone_attempt["id"])
    data.users.remove(gone_user)
    assert (await sync_with(kept, RunOptions(full=True))).rows.deleted == 2
    hashed = admin_settings(institute, database_url, pii="hash", pii_salt="pepper")
    with structlog.testing.capture_logs() as logs:
        changed = await sync_with(hashed)
    assert (changed.status, changed.full_walk) == ("succeeded", True)
    [plan] = [entry for entry in logs if entry["event"] == "admin_plan"]
    assert "other rules" in plan["reason"]
    assert [entry["rows"] for entry in logs if entry["event"] == "personal_data_dropped_from_deleted_rows"] == [2]
    assert emails
    async with engine.connect() as connection:
        everything = str((await connection.execute(text("SELECT raw FROM attempts"))).all())
        everything += str((await connection.execute(text("SELECT * FROM users"))).all())
        deleted_user = (await connection.execute(select(users).where(users.c.user_id == gone_user.id))).one()
    assert not [email for email in emails if email in everything]
    assert deleted_user.deleted_at is not None and (deleted_user.email, deleted_user.phone, deleted_user.raw["phone"]) == (None, None, None)
    assert not (await sync_with(hashed)).full_walk
    # A salt is a rule too.
    salted = replace(hashed, sync=replace(hashed.sync, pii_salt="other"))
    assert (await sync_with(salted)).full_walk
    assert not (await sync_with(salted)).full_walk


async def test_rows_written_under_other_rules_by_a_run_that_did_not_complete_are_written_again(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """The stored rules are those of the last complete full walk; a run under others that
    writes but does not complete (a --limit sample here; a crash, a SIGTERM) leaves rows
    in clear that the next run under the stored rules would not read. So it marks the
    rules mixed, and the next run walks everything. A dry run writes nothing: no mark."""
    hashed = admin_settings(institute, database_url, pii="hash", pii_salt="pepper")
    kept = admin_settings(institute, database_url)
    assert (await sync_with(hashed)).full_walk
    await sync_with(kept, RunOptions(dry_run=True))
    assert not (await sync_with(hashed)).full_walk
    sample = await sync_with(kept, RunOptions(limit=2))
    assert sample.rows.updated > 0
    served = await server_rows(institute, "attempts/")
    emails = {row["email"] for row in served.values() if row["email"]}
    async with engine.connect() as connection:
        written = str((await connection.execute(text("SELECT raw FROM attempts"))).all())
    assert [email for email in emails if email in written]  # the sample stored some in clear
    async with engine.connect() as connection:
        assert (await read_sync_state(connection, "attempts")).rules == MIXED_RULES  # every run walks all until one completes
    # One of those is deleted upstream: the walk below marks it deleted, and cannot write it.
    async with engine.connect() as connection:
        stored_raws = (await connection.execute(select(attempts.c.id, attempts.c.raw))).all()
    in_clear = [ident for ident, raw in stored_raws if raw.get("email") in emails]
    assert in_clear and institute.dataset.delete_attempt(in_clear[0])
    with structlog.testing.capture_logs() as logs:
        assert (await sync_with(hashed)).full_walk
    assert "did not complete" in next(entry["reason"] for entry in logs if entry["event"] == "admin_plan")
    assert [entry["rows"] for entry in logs if entry["event"] == "personal_data_dropped_from_deleted_rows"] == [1]
    async with engine.connect() as connection:
        everything = str((await connection.execute(text("SELECT raw FROM attempts"))).all())
        everything += str((await connection.execute(text("SELECT * FROM users"))).all())
    assert not [email for email in emails if email in everything]
    assert not (await sync_with(hashed)).full_walk


async def test_a_field_that_will_not_parse_costs_the_field_not_the_row(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    user = institute.dataset.users[3]
    institute.dataset.profile(user).birth_date = NoSuchDay(2001, 2, 1)
    summary = await sync_with(admin_settings(institute, database_url))
    assert summary.status == "partial"
    kept = await stored(engine, users, "user_id")
    assert kept[user.id]["birth_date"] is None and kept[user.id]["username"] == user.username
    async with engine.connect() as connection:
        [error] = (await connection.execute(select(sync_errors.c.entity, sync_errors.c.key, sync_errors.c.message))).all()
    assert error.entity == "user" and error.key == str(user.id) and "birth_date" in error.message


async def test_a_bad_field_of_an_exam_or_an_attempt_costs_the_field_not_the_row(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """Only a bad id (or an attempt's exam_id) costs an admin row: any other field that
    will not parse is stored null, its reason goes to sync_errors, and the rest is stored,
    the exam's attempts too."""
    exam = institute.dataset.exams[1]
    attempt = institute.dataset.exams[2].attempts[0]
    institute.state.replaced_fields = {
        "exams": {exam.id: {"pass_percentage": "n/a"}},
        "attempts": {attempt.id: {"speed": "fast", "date": "yesterday", "user_id": "u-1"}},
    }
    summary = await sync_with(admin_settings(institute, database_url))
    assert (summary.status, summary.errors) == ("partial", 4)
    kept_exams, kept_attempts = await stored(engine, exams), await stored(engine, attempts)
    assert kept_exams[exam.id]["pass_percentage"] is None and kept_exams[exam.id]["title"] == exam.title
    assert {a.id for a in exam.attempts} <= set(kept_attempts)
    mine = kept_attempts[attempt.id]
    assert (mine["speed"], mine["date"], mine["user_id"]) == (None, None, None)
    served = (await server_rows(institute, "attempts/"))[attempt.id]
    assert mine["score"] == Decimal(served["score"]) and mine["state"] == served["state"]
    assert mine["raw"]["speed"] == "fast"  # raw keeps what was served
    problems = {(row.entity, row.key, row.message.split(":")[0]) for row in await error_rows(engine)}
    assert problems == {("exam", str(exam.id), "pass_percentage"), ("attempt", str(attempt.id), "speed"),
                        ("attempt", str(attempt.id), "date"), ("attempt", str(attempt.id), "user_id")}  # fmt: skip
    # A bad exam_id still costs the attempt: it could not name its exam.
    institute.state.replaced_fields = {"attempts": {attempt.id: {"exam_id": "three"}}}
    again = await sync_with(admin_settings(institute, database_url), RunOptions(full=True))
    assert again.status == "partial" and attempt.id in {int(row.key) for row in await error_rows(engine) if row.entity == "attempt"}


async def test_a_student_login_reads_its_own_attempts_through_the_student_api(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    settings = admin_settings(institute, database_url)
    student = replace(settings, api=replace(settings.api, username="pupil", password="pupil-pw"))
    summary = await sync_with(student)
    assert (summary.status, summary.source) == ("succeeded", "student")
    own = institute.dataset.users[0]
    kept = await stored(engine, attempts)
    assert kept and {row["username"] for row in kept.values()} == {own.username}
    assert {row["source"] for row in kept.values()} == {"student"}


async def test_moving_from_a_student_login_to_an_admin_one_keeps_what_only_the_student_api_tells(
    institute: SimulatorServer, engine: AsyncEngine, database_url: str
) -> None:
    """Exam slugs, links and settings, and the links of a student's own attempts, come
    from the student API only: the admin run that follows rewrites those rows (their
    source says so) without writing null over them."""
    settings = admin_settings(institute, database_url)
    await sync_with(replace(settings, api=replace(settings.api, username="pupil", password="pupil-pw", source="student")))
    kept_exam = ("slug", "url", "attempts_url", "course", "allow_retake", "template_type")
    kept_attempt = ("total_questions", "review_url", "questions_url")
    exams_before, attempts_before = await stored(engine, exams), await stored(engine, attempts)
    assert exams_before and all(row["slug"] and row["attempts_url"] and row["allow_retake"] is not None for row in exams_before.values())
    assert attempts_before and all(row["review_url"] and row["total_questions"] for row in attempts_before.values())
    summary = await sync_with(settings)
    assert (summary.status, summary.source) == ("succeeded", "admin")
    exams_after, attempts_after = await stored(engine, exams), await stored(engine, attempts)
    for ident, row in exams_before.items():
        assert exams_after[ident]["source"] == "admin" and exams_after[ident]["modified"] is not None, ident
        assert [exams_after[ident][name] for name in kept_exam] == [row[name] for name in kept_exam], ident
    for ident, row in attempts_before.items():
        assert attempts_after[ident]["source"] == "admin", ident
        assert [attempts_after[ident][name] for name in kept_attempt] == [row[name] for name in kept_attempt], ident
    await assert_attempts_match(engine, institute)


async def test_source_admin_with_a_student_login_stops_with_exit_3_reasons(
    institute: SimulatorServer, database_url: str
) -> None:
    from sync.errors import AuthError

    settings = admin_settings(institute, database_url)
    student = replace(settings, api=replace(settings.api, username="pupil", password="pupil-pw", source="admin"))
    with pytest.raises(AuthError, match="may not read the admin API"):
        await sync_with(student)


def test_status_shows_the_source_and_the_watermark(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from sync.cli import main
    from tests.conftest import SimulatorThread

    for name, value in (("TESTPRESS_USERNAME", USERNAME), ("TESTPRESS_PASSWORD", PASSWORD),
                        ("TESTPRESS_DATABASE_URL", database_url), ("TESTPRESS_LOG_FORMAT", "json")):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TESTPRESS_SOURCE", raising=False)
    with SimulatorThread(dataset()) as server:
        monkeypatch.setenv("TESTPRESS_BASE_URL", server.base_url)
        assert main(["run"]) == 0
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["runs"][0]["source"] == "admin"
    assert document["sync_state"]["attempts"]["watermark"] is not None
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert " admin " in table and "Attempts watermark:" in table and "Last full walk:" in table
    assert "other rules" not in table and document["sync_state"]["attempts"]["rules_changed"] is False
    # A new personal-data policy: status says what the next run will do about it.
    monkeypatch.setenv("TESTPRESS_SYNC_PII", "drop")
    assert main(["status"]) == 0
    assert "Rows were written by other rules than these settings'" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sync_state"]["attempts"]["rules_changed"] is True
