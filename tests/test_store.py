"""Upserts, deletion marks and exact round trips, on real SQLite and real PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schema import attempts, exams, users
from sync.model.normalize import UserRow, attempt_row, exam_row
from sync.model.resources import ATTEMPTS, EXAMS
from sync.sink import store
from sync.sink.writer import write_payloads
from tests.helpers import upsert_attempts, upsert_exams
from tests.test_normalize import attempt_payload, exam_payload

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=1)


async def rows_written(connection: AsyncConnection) -> Any:
    """A fingerprint that changes whenever any row is physically rewritten."""
    if connection.dialect.name == "postgresql":
        result = await connection.execute(text("SELECT id, xmin::text FROM exams UNION ALL SELECT id, xmin::text FROM attempts ORDER BY 1"))
        return result.all()
    return (await connection.execute(text("SELECT total_changes()"))).scalar()


async def test_first_upsert_inserts_and_second_changes_nothing(engine: AsyncEngine) -> None:
    rows = [exam_row(exam_payload(id=n, slug=f"e{n}")) for n in range(1, 6)]
    async with engine.begin() as connection:
        first = await upsert_exams(connection, rows, NOW)
    async with engine.begin() as connection:
        before = await rows_written(connection)
        second = await upsert_exams(connection, rows, LATER)
        after = await rows_written(connection)
    assert (first.inserted, first.updated, first.unchanged) == (5, 0, 0)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 5)
    assert before == after  # not one row rewritten
    async with engine.connect() as connection:
        seen = (await connection.execute(select(exams.c.first_seen_at, exams.c.last_seen_at))).all()
    assert set(seen) == {(NOW, NOW)}


async def test_a_changed_field_updates_only_that_row(engine: AsyncEngine) -> None:
    rows = [exam_row(exam_payload(id=n, slug=f"e{n}")) for n in range(1, 4)]
    async with engine.begin() as connection:
        await upsert_exams(connection, rows, NOW)
    rows[1] = exam_row(exam_payload(id=2, slug="e2", title="Renamed"))
    async with engine.begin() as connection:
        counts = await upsert_exams(connection, rows, LATER)
    assert (counts.inserted, counts.updated, counts.unchanged) == (0, 1, 2)
    async with engine.connect() as connection:
        stored = (await connection.execute(select(exams.c.id, exams.c.title, exams.c.first_seen_at, exams.c.last_seen_at).order_by(exams.c.id))).all()
    assert stored[1] == (2, "Renamed", NOW, LATER)
    assert stored[0].last_seen_at == NOW


async def test_values_round_trip_exactly(engine: AsyncEngine) -> None:
    exam = exam_row(exam_payload(negative_marks="0.33", mark_per_question="1.25"))
    attempt, user = attempt_row(attempt_payload(score="-1.75", percentile=83.64, time_taken="20 days, 3:58:48.000001"), 42)
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam], NOW)
        await store.upsert_users(connection, [user], NOW)
        await upsert_attempts(connection, [attempt], NOW)
    async with engine.connect() as connection:
        stored_exam = (await connection.execute(select(exams))).one()._mapping
        stored = (await connection.execute(select(attempts))).one()._mapping
    assert stored_exam["negative_marks"] == Decimal("0.33") and stored_exam["mark_per_question"] == Decimal("1.25")
    assert stored_exam["start_date"] == datetime(2013, 8, 2, 11, 55, 22, tzinfo=UTC)
    assert stored_exam["created"].tzinfo is not None
    assert stored_exam["raw"] == exam["raw"]
    assert str(stored["score"]) == "-1.75" and stored["percentile"] == Decimal("83.64")
    assert stored["time_taken_seconds"] == Decimal("1742328.000001")
    assert stored["date"] == datetime(2014, 1, 20, 6, 42, 11, 72986, tzinfo=UTC)
    assert stored["raw"] == attempt["raw"] and stored["max_rank"] is None


async def test_users_keep_names_when_seen_again_as_a_bare_username(engine: AsyncEngine) -> None:
    _, nested = attempt_row(attempt_payload(), 42)
    _, bare = attempt_row(attempt_payload(user="asha"), 42)
    async with engine.begin() as connection:
        first = await store.upsert_users(connection, [nested], NOW)
        again = await store.upsert_users(connection, [bare], LATER)
    async with engine.connect() as connection:
        row = (await connection.execute(select(users))).one()._mapping
    assert (first.inserted, again.unchanged) == (1, 1)
    assert (row["username"], row["user_id"], row["display_name"]) == ("asha", 77, "Asha K")


async def test_one_batch_merges_the_sightings_of_a_user(engine: AsyncEngine) -> None:
    _, bare = attempt_row(attempt_payload(user="asha"), 42)
    _, named = attempt_row(attempt_payload(), 42)
    _, renamed = attempt_row(attempt_payload(user={**attempt_payload()["user"], "last_name": "Kumar", "id": None}), 42)
    async with engine.begin() as connection:
        counts = await store.upsert_users(connection, [bare, named, bare, renamed, bare], NOW)
    async with engine.connect() as connection:
        row = (await connection.execute(select(users))).one()._mapping
    assert counts.inserted == 1
    # Later sightings win field by field; a field a sighting lacks keeps the known value.
    assert (row["user_id"], row["first_name"], row["last_name"]) == (77, "Asha", "Kumar")


async def test_a_student_renamed_upstream_renames_the_attempts_stored_before(engine: AsyncEngine) -> None:
    """The student API names users by username; a new name with a known id is a rename,
    and every attempt of that id takes it (an admin run's rows, named from users, too)."""
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam_row(exam_payload())], NOW)
        await upsert_attempts(connection, [attempt_row(attempt_payload(id=1, user="asha"), 42)[0]], NOW)
        await connection.execute(text("INSERT INTO attempts (id, exam_id, username, user_id, raw, content_hash, first_seen_at, last_seen_at) "
                                      "SELECT 2, exam_id, NULL, 7, raw, 'h', first_seen_at, last_seen_at FROM attempts WHERE id = 1"))  # fmt: skip
        await connection.execute(update(attempts).where(attempts.c.id == 1).values(user_id=7))
        await store.upsert_users(connection, [_user("asha", 7)], NOW)
        await store.upsert_users(connection, [_user("asha-k", 7)], LATER)
        names = dict((await connection.execute(select(attempts.c.id, attempts.c.username))).all())
        kept = (await connection.execute(select(users.c.username).where(users.c.user_id == 7))).scalars().all()
    assert (names, kept) == ({1: "asha-k", 2: "asha-k"}, ["asha-k"])


def _user(username: str, user_id: int) -> UserRow:
    return UserRow(username=username, user_id=user_id, display_name=None, first_name=None, last_name=None)


async def test_missing_attempts_are_marked_deleted_and_restored(engine: AsyncEngine) -> None:
    rows = [attempt_row(attempt_payload(id=n), 42)[0] for n in (1, 2, 3)]
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam_row(exam_payload())], NOW)
        await upsert_attempts(connection, rows, NOW)
        deleted = await store.mark_missing_children_deleted(connection, ATTEMPTS, {42: frozenset({1, 3})}, NOW)
    assert deleted == 1
    async with engine.begin() as connection:
        restored = await upsert_attempts(connection, rows, LATER)
        again = await store.mark_missing_children_deleted(connection, ATTEMPTS, {42: frozenset({1, 2, 3})}, LATER)
    async with engine.connect() as connection:
        marks = (await connection.execute(select(attempts.c.id, attempts.c.deleted_at).order_by(attempts.c.id))).all()
    assert (restored.updated, restored.unchanged, again) == (1, 2, 0)
    assert marks == [(1, None), (2, None), (3, None)]


async def test_exam_deletion_is_limited_to_the_course_walked(engine: AsyncEngine) -> None:
    rows = [exam_row(exam_payload(id=n, slug=f"e{n}", course=course)) for n, course in ((1, "SSC"), (2, "SSC"), (3, "IBPS"))]
    async with engine.begin() as connection:
        await upsert_exams(connection, rows, NOW)
        deleted = await store.mark_missing_deleted(connection, EXAMS, frozenset({1}), NOW, {"course": "SSC"})
    async with engine.connect() as connection:
        marks = dict((await connection.execute(select(exams.c.id, exams.c.deleted_at))).all())
    assert deleted == 1 and marks == {1: None, 2: NOW, 3: None}


async def test_duplicates_in_one_batch_are_stored_once(engine: AsyncEngine) -> None:
    row = exam_row(exam_payload())
    async with engine.begin() as connection:
        counts = await upsert_exams(connection, [row, row, row], NOW)
        stored = (await connection.execute(select(exams.c.id))).scalars().all()
    assert counts.inserted == 1 and stored == [42]


async def test_a_slug_taken_over_by_another_exam_does_not_block_the_sync(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam_row(exam_payload(id=1, slug="mock"))], NOW)
        await store.mark_missing_deleted(connection, EXAMS, frozenset(), NOW, {})
    # Exam 1 is gone; a new exam 2 now has its slug. Then two live exams swap slugs.
    async with engine.begin() as connection:
        counts = await upsert_exams(connection, [exam_row(exam_payload(id=2, slug="mock"))], LATER)
        await upsert_exams(connection, [exam_row(exam_payload(id=3, slug="other"))], LATER)
    async with engine.begin() as connection:
        swapped = [exam_row(exam_payload(id=2, slug="other")), exam_row(exam_payload(id=3, slug="mock"))]
        swap = await upsert_exams(connection, swapped, LATER)
    async with engine.connect() as connection:
        slugs = dict((await connection.execute(select(exams.c.id, exams.c.slug))).all())
    assert counts.inserted == 1 and swap.updated == 2
    assert slugs == {1: "mock#1", 2: "other", 3: "mock"}


class CountingNormalizer:
    """The attempts' normalizer, remembering which attempt ids it was asked to normalize."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, payload: dict[str, Any], exam_id: int | None) -> tuple[Any, Any]:
        self.asked.append(payload["id"])
        return ATTEMPTS.normalize(payload, exam_id)


async def write_attempts(connection: AsyncConnection, payloads: dict[int, Any], normalizer: CountingNormalizer, now: datetime) -> Any:
    """Attempts of exam 42 as fetched, through the writer's one write path."""
    items = {ident: (42, payload) for ident, payload in payloads.items()}
    return await write_payloads(connection, replace(ATTEMPTS, normalize=normalizer), items, now)


async def test_only_new_and_changed_attempts_are_normalized(engine: AsyncEngine) -> None:
    payloads = {n: attempt_payload(id=n) for n in (1, 2, 3)}
    first, second, third = CountingNormalizer(), CountingNormalizer(), CountingNormalizer()
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam_row(exam_payload())], NOW)
        stored = await write_attempts(connection, payloads, first, NOW)
    async with engine.begin() as connection:
        again = await write_attempts(connection, payloads, second, LATER)
    payloads[2] = attempt_payload(id=2, score="7.50")
    async with engine.begin() as connection:
        changed = await write_attempts(connection, payloads, third, LATER)
    assert (first.asked, second.asked, third.asked) == ([1, 2, 3], [], [2])
    assert (stored.counts.inserted, again.counts.unchanged, changed.counts.updated, changed.counts.unchanged) == (3, 3, 1, 2)
    assert [user["username"] for user in stored.users] == ["asha"] * 3 and again.users == []
    async with engine.connect() as connection:
        scores = dict((await connection.execute(select(attempts.c.id, attempts.c.score))).all())
    assert scores == {1: Decimal("2.00"), 2: Decimal("7.50"), 3: Decimal("2.00")}


async def test_an_attempt_that_will_not_normalize_is_returned_not_written(engine: AsyncEngine) -> None:
    payloads = {1: attempt_payload(id=1), 2: attempt_payload(id=2, score="twelve"), 3: attempt_payload(id=3)}
    async with engine.begin() as connection:
        await upsert_exams(connection, [exam_row(exam_payload())], NOW)
        outcome = await write_attempts(connection, payloads, CountingNormalizer(), NOW)
        stored = (await connection.execute(select(attempts.c.id).order_by(attempts.c.id))).scalars().all()
    [failure] = outcome.malformed
    assert (failure.key, failure.payload["score"]) == ("2", "twelve") and "score" in failure.message
    assert outcome.counts.inserted == 2 and stored == [1, 3]


async def test_the_open_attempts_are_read_through_their_partial_index(engine: AsyncEngine) -> None:
    """An admin nightly run reads the attempts still open; without the index that read
    scanned every attempt each night."""
    query = store.open_attempts_query(datetime(2024, 1, 1, tzinfo=UTC))
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":  # with the run's bound parameters: SQLite then
            compiled = query.compile(connection.sync_engine)  # uses a partial index only if its WHERE is literal
            parameters = tuple(compiled.construct_params()[name] for name in compiled.positiontup or ())
            found = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", parameters)
            plan = " ".join(str(row[-1]) for row in found)
        else:  # on an empty table the planner would rightly scan it: asked whether the index serves
            compiled = query.compile(connection.sync_engine, compile_kwargs={"literal_binds": True})
            await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = " ".join(str(row[0]) for row in await connection.exec_driver_sql(f"EXPLAIN {compiled}"))
    assert "ix_attempts_open" in plan, plan
