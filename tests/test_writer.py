"""When the writer commits: a full batch at once, a partial one after commit_interval,
on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schema import exams
from sync.model.batches import Batch, Message
from sync.model.run import RunSummary
from sync.ops.logs import Redactor
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
