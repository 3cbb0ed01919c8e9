"""Group commit for webhook deliveries: the one task that writes them.

Request handlers hand their delivery to `Committer.submit` and wait on the future it
returns; the committer takes whatever is waiting (up to `batch_size`), commits it in one
transaction (sync.sink.deliveries) and resolves each future. Under load, deliveries that
arrive together share a transaction, so a commit's cost (an fsync, a round trip) is paid
once per batch rather than once per request; alone, a delivery is committed at once.

Faults are classified as the nightly writer's are (sync.sink.faults):
    OUTAGE    the batch is retried with backoff for as long as one of its deliveries is
              still waiting; once every handler has given up (and answered 503, so
              Testpress sends it again), the batch is dropped
    ROW       the database refused something in the batch: each delivery is committed
              alone, and the one it refuses fails (NotStored) without failing the others
    UNUSABLE  every delivery of the batch fails (NotStored) with the reason
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.errors import SyncError, error_text
from sync.model.run import Clock, utc_now
from sync.model.webhook import DeliveryRecord
from sync.ops.logs import Redactor
from sync.sink.deliveries import store_deliveries
from sync.sink.faults import DatabaseFault, classify

log = structlog.get_logger("testpress_sync.committer")

# Called after each commit with the number of deliveries and the seconds it took.
OnCommit = Callable[[int, float], None]


class Overloaded(SyncError):
    """Too many deliveries are waiting for the database: answer 503 at once."""


class NotStored(SyncError):
    """The database refused this delivery (not an outage): it was not stored."""


@dataclass(frozen=True)
class _Pending:
    record: DeliveryRecord
    done: asyncio.Future[None]


class Committer:
    def __init__(
        self,
        engine: AsyncEngine,
        redactor: Redactor,
        *,
        batch_size: int = 256,
        queue_size: int = 8192,
        retry_wait_max: float = 2.0,
        clock: Clock = utc_now,
        on_commit: OnCommit | None = None,
    ) -> None:
        self._engine = engine
        self._redactor = redactor
        self._batch_size = batch_size
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=queue_size)
        self._retry_wait_max = retry_wait_max
        self._clock = clock
        self._on_commit = on_commit
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, record: DeliveryRecord) -> asyncio.Future[None]:
        """Queue `record`; the future is done once it is committed (or has failed).
        Cancelling the future says nobody waits for it any more."""
        if self._closed:
            raise Overloaded("the receiver is shutting down")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(record, done))
        except asyncio.QueueFull:
            raise Overloaded(f"{self._queue.maxsize} deliveries are waiting for the database") from None
        return done

    async def close(self) -> None:
        """Take no more deliveries; `run` commits those already queued, then returns."""
        if not self._closed:
            self._closed = True
            await self._queue.put(None)

    async def run(self) -> None:
        """Commit batch after batch until `close`. Never raises for a database error: each
        delivery's future carries the outcome."""
        finished = False
        while not finished:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            # What arrived while the last transaction ran: one transaction for all of it.
            while len(batch) < self._batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    finished = True
                    break
                batch.append(item)
            await self._commit(batch)

    async def _commit(self, batch: Sequence[_Pending]) -> None:
        wait = 0.05
        while True:
            started = time.perf_counter()
            try:
                async with self._engine.begin() as connection:
                    await store_deliveries(connection, [item.record for item in batch], self._clock())
            except Exception as exc:
                fault = classify(exc)
                if fault is DatabaseFault.OUTAGE:
                    if all(item.done.done() for item in batch):
                        log.warning("deliveries_dropped", deliveries=len(batch), hint="their senders were answered 503 and send them again")
                        return
                    log.warning("database_unreachable_retrying", error=self._reason(exc), deliveries=len(batch), wait=wait)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, self._retry_wait_max)
                    continue
                if fault is DatabaseFault.ROW and len(batch) > 1:
                    for item in batch:  # each alone: only the refused one fails
                        await self._commit([item])
                    return
                self._fail(batch, exc)
                return
            if self._on_commit is not None:
                self._on_commit(len(batch), time.perf_counter() - started)
            for item in batch:
                if not item.done.done():
                    item.done.set_result(None)
            return

    def _fail(self, batch: Sequence[_Pending], exc: Exception) -> None:
        reason = self._reason(exc)
        log.error("deliveries_not_stored", deliveries=len(batch), error=reason, exc_info=classify(exc) is None)
        for item in batch:
            if not item.done.done():
                item.done.set_exception(NotStored(reason))

    def _reason(self, exc: BaseException) -> str:
        return self._redactor.redact(error_text(exc))
