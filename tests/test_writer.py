"""When the writer commits: a full batch at once, a partial one after commit_interval,
on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import attempts, exams
from sync.model.admin_rows import PiiPolicy
from sync.model.batches import Batch, Message
from sync.model.resources import admin_resources
from sync.model.run import RunSummary
from sync.ops.logs import Redactor
from sync.simulator import Dataset, admin
from sync.sink.writer import Writer
from tests.test_normalize import exam_payload


def exam_batch(*ids: int) -> Batch:
    return Batch("exams", [(n, exam_payload(id=n, slug=f"exam-{n}")) for n in ids])


def start_writer(
    engine: AsyncEngine, *, batch_size: int, commit_interval: float
) -> tuple[RunSummary, asyncio.Queue[Message | None], asyncio.Task[None]]:
    """A writer consuming a queue of its own, as a run's writer does: its summary, the
    queue to feed it, and the task that consumes."""
    summary = RunSummary(run_id=0, mode="run")
    writer = Writer(
        engine, summary, Redactor(), batch_size=batch_size, record_progress=False,
        commit_interval=commit_interval,
    )  # fmt: skip
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    return summary, queue, asyncio.create_task(writer.consume(queue))


async def first_commit(summary: RunSummary) -> None:
    async with asyncio.timeout(10):
        while summary.batches == 0:
            await asyncio.sleep(0.02)


async def stored_exams(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(exams))).scalar_one())


async def test_a_batch_that_does_not_fill_is_committed_after_the_interval(engine: AsyncEngine) -> None:
    summary, queue, consuming = start_writer(engine, batch_size=500, commit_interval=0.3)
    await queue.put(exam_batch(1, 2))
    await asyncio.sleep(0.1)
    assert summary.batches == 0  # not yet: the batch may still fill
    await first_commit(summary)
    assert not consuming.done()  # committed while the crawl goes on, not at its end
    assert await stored_exams(engine) == 2
    await queue.put(None)
    await consuming
    assert summary.batches == 1


async def test_pages_that_arrive_within_the_interval_share_one_transaction(engine: AsyncEngine) -> None:
    summary, queue, consuming = start_writer(engine, batch_size=500, commit_interval=60)
    for first in range(1, 10, 3):  # the queue runs dry between pages, as on a slow API
        await queue.put(exam_batch(first, first + 1, first + 2))
        await asyncio.sleep(0.05)
    assert summary.batches == 0 and await stored_exams(engine) == 0
    await queue.put(None)
    await consuming
    assert summary.batches == 1 and summary.exams_seen == 9
    assert await stored_exams(engine) == 9


async def test_a_full_batch_is_committed_at_once(engine: AsyncEngine) -> None:
    summary, queue, consuming = start_writer(engine, batch_size=4, commit_interval=60)
    await queue.put(exam_batch(1, 2, 3, 4, 5))
    await first_commit(summary)
    assert await stored_exams(engine) == 5
    await queue.put(None)
    await consuming
    assert summary.batches == 1  # nothing was left for the end


async def test_cancelling_a_writer_waiting_for_its_batch_to_fill_cancels_it(engine: AsyncEngine) -> None:
    summary, queue, consuming = start_writer(engine, batch_size=500, commit_interval=60)
    await queue.put(exam_batch(1))
    await asyncio.sleep(0.05)
    consuming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consuming
    assert summary.batches == 0


async def test_a_zero_interval_commits_whenever_the_writer_catches_up(engine: AsyncEngine) -> None:
    summary, queue, consuming = start_writer(engine, batch_size=500, commit_interval=0)
    for first in range(1, 10, 3):
        await queue.put(exam_batch(first, first + 1, first + 2))
        async with asyncio.timeout(10):
            while await stored_exams(engine) < first + 2:  # committed before the next page
                await asyncio.sleep(0.02)
    await queue.put(None)
    await consuming
    assert summary.batches == 3


async def test_admin_attempts_take_their_username_from_users_whatever_the_order(engine: AsyncEngine) -> None:
    """Admin attempt rows name the student by user_id only; the username is the one users
    holds (reporting-schema.md). An attempt committed before its user gets it when the user
    is written; a renamed user's attempts follow the new name; a rewrite of the attempt
    without a stored user keeps the name it has."""
    data = Dataset(exams=1, attempts_per_exam=4, users=4, seed=3, forbidden_every=0, vanished_every=0)
    exam = data.exams[0]
    first, second = exam.attempts[0].user, next(a.user for a in exam.attempts if a.user.id != exam.attempts[0].user.id)
    base = "http://127.0.0.1:1"
    summary = RunSummary(run_id=0, mode="run")
    writer = Writer(engine, summary, Redactor(), batch_size=1, record_progress=False, commit_interval=60,
                    resources=admin_resources(PiiPolicy("keep", "")))  # fmt: skip
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    consuming = asyncio.create_task(writer.consume(queue))

    async def committed(*messages: Batch) -> None:  # batch_size 1: each is a commit of its own
        for message in messages:
            batches = summary.batches
            await queue.put(message)
            async with asyncio.timeout(10):
                while summary.batches == batches:
                    await asyncio.sleep(0.01)

    attempts_of = lambda user: [(a.id, admin.attempt_row(data, exam, a, base)) for a in exam.attempts if a.user is user]  # noqa: E731
    user_of = lambda user: Batch("users", [(user.id, admin.user_row(data, user, base))])  # noqa: E731
    await committed(Batch("exams", [(exam.id, admin.exam_row(data, exam, base))]), user_of(second))
    await committed(Batch("attempts", attempts_of(first) + attempts_of(second)))  # first's user: not yet
    assert await usernames(engine) == {first.id: {None}, second.id: {second.username}}
    # Named by a webhook delivery meanwhile: a rewrite that finds no user keeps that name.
    async with engine.begin() as connection:
        await connection.execute(update(attempts).where(attempts.c.user_id == first.id).values(username="from-a-delivery", content_hash="x"))
    await committed(Batch("attempts", attempts_of(first)))
    assert await usernames(engine) == {first.id: {"from-a-delivery"}, second.id: {second.username}}
    await committed(user_of(first))
    assert await usernames(engine) == {first.id: {first.username}, second.id: {second.username}}
    data.update_user(second.id, {"username": "renamed-upstream"})
    await committed(user_of(second))
    assert await usernames(engine) == {first.id: {first.username}, second.id: {"renamed-upstream"}}
    # `second` takes the name of `first`, who is gone upstream and never listed again: the
    # stored `first` gives it up for a placeholder, and its attempts follow.
    taken = first.username
    data.update_user(second.id, {"username": taken})
    await committed(user_of(second))
    assert await usernames(engine) == {first.id: {f"{taken}#{first.id}"}, second.id: {taken}}
    await queue.put(None)
    await consuming


async def usernames(engine: AsyncEngine) -> dict[int, set[str | None]]:
    """user_id → the usernames its attempts hold."""
    async with engine.connect() as connection:
        rows = (await connection.execute(select(attempts.c.user_id, attempts.c.username))).all()
    found: dict[int, set[str | None]] = {}
    for user_id, username in rows:
        found.setdefault(user_id, set()).add(username)
    return found
