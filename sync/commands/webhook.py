"""`webhook`: the real-time receiver. Testpress POSTs a delivery when an attempt starts and
when it completes; each one is verified (sync.source.webhook), committed with the others
that arrived with it (sync.sink.committer), and only then answered 2xx.

    POST /testpress/webhook   deliveries: 200 stored, 400/401/413/415 refused (and recorded
                              in webhook_events), 503 the database is away (Testpress retries)
    GET  /healthz             200 and {"database": "reachable"}, or 503: for a readiness probe
    GET  /metrics             Prometheus: deliveries by outcome and reason, latencies, batches

The receiver does not take the run lock: it writes alongside the nightly run (the rules
that keep the two from undoing each other are in sync.sink.deliveries and sync.sink.store).
On SIGTERM it stops accepting connections, answers the deliveries in flight once they are
committed, and exits 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.commands import Outcome
from sync.commands.sync import open_database
from sync.config import Settings, WebhookSettings
from sync.errors import error_text
from sync.model.batches import Payload
from sync.model.run import Clock, utc_now
from sync.model.webhook import DeliveryRecord
from sync.ops.logs import Redactor
from sync.run import pii_policy
from sync.sink.committer import Committer, NotStored, Overloaded
from sync.sink.database import describe_engine, ensure_schema
from sync.source.webhook import (
    Keys,
    Refused,
    Scrub,
    accepted_record,
    check_headers,
    parse_delivery,
    refused_record,
    too_large,
)

log = structlog.get_logger("testpress_sync.webhook")

DELIVERY_PATH = "/testpress/webhook"
HEALTH_TIMEOUT = 2.0  # seconds /healthz waits for the database
# Seconds a 503 asks Testpress to wait before sending again.
RETRY_AFTER = "5"


@dataclass(frozen=True)
class Metrics:
    """The receiver's Prometheus metrics, in a registry of its own."""

    registry: CollectorRegistry
    accepted: Counter
    refused: Counter
    answer_seconds: Histogram
    commit_seconds: Histogram
    batch_size: Histogram

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry(auto_describe=True)
        prefix = "testpress_sync_webhook"
        return cls(
            registry=registry,
            accepted=Counter(f"{prefix}_deliveries_accepted", "Deliveries stored and answered 200, by era and attempt state.",
                             ["era", "state"], registry=registry),
            refused=Counter(f"{prefix}_deliveries_refused", "Deliveries answered with an error, by status and reason.",
                            ["status", "reason"], registry=registry),
            answer_seconds=Histogram(f"{prefix}_answer_seconds", "From a delivery's arrival to its answer.",
                                     buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=registry),
            commit_seconds=Histogram(f"{prefix}_commit_seconds", "One group commit: the transaction of a batch of deliveries.",
                                     buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5), registry=registry),
            batch_size=Histogram(f"{prefix}_batch_size", "Deliveries committed per transaction.",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry),
        )  # fmt: skip

    def committed(self, deliveries: int, seconds: float) -> None:
        self.batch_size.observe(deliveries)
        self.commit_seconds.observe(seconds)


class Receiver:
    """The application's handlers, around one committer."""

    def __init__(
        self,
        engine: AsyncEngine,
        committer: Committer,
        settings: WebhookSettings,
        metrics: Metrics,
        scrub: Scrub,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._committer = committer
        self._settings = settings
        self._keys = Keys(settings.public_key, settings.private_key)
        self._metrics = metrics
        self._scrub = scrub  # what is stored of a payload: pii policy, secrets redacted
        self._clock = clock

    def app(self) -> web.Application:
        # client_max_size: aiohttp refuses to read a longer body (a chunked one, whose
        # length the headers do not say), which we answer 413 like a long Content-Length.
        app = web.Application(client_max_size=self._settings.max_body_bytes)
        app.router.add_post(DELIVERY_PATH, self.deliver)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def deliver(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        received_at = self._clock()
        try:
            check_headers(request.content_type, request.content_length, self._settings.max_body_bytes)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused(413, "body_too_large", too_large(self._settings.max_body_bytes)) from None
            delivery = parse_delivery(body, self._keys)
        except Refused as refused:
            response = await self._refuse(refused, received_at)
        else:
            response = await self._store(accepted_record(delivery, received_at, self._scrub), delivery.era, delivery.state)
        self._metrics.answer_seconds.observe(time.perf_counter() - arrived)
        return response

    async def _store(self, record: DeliveryRecord, era: str, state: str) -> web.Response:
        assert record.attempt is not None
        attempt_id = record.attempt["id"]
        try:
            await self._committed(record)
        except (Overloaded, TimeoutError) as exc:
            reason = "overloaded" if isinstance(exc, Overloaded) else "database_unavailable"
            log.warning("delivery_not_stored_yet", attempt_id=attempt_id, reason=reason, hint="answered 503: Testpress sends it again")
            return self._answer(503, {"error": reason, "detail": "not stored; send it again later"}, reason, {"Retry-After": RETRY_AFTER})
        except NotStored as exc:
            log.error("delivery_refused_by_database", attempt_id=attempt_id, error=str(exc))
            return self._answer(500, {"error": "not_stored", "detail": "the database refused this delivery"}, "not_stored")
        self._metrics.accepted.labels(era=era, state=state).inc()
        log.debug("delivery_stored", attempt_id=attempt_id, state=state, era=era)
        return web.json_response({"status": "stored", "attempt_id": attempt_id}, dumps=_dumps)

    async def _refuse(self, refused: Refused, received_at: datetime) -> web.Response:
        """Record the refusal in webhook_events (best effort: the answer does not wait for a
        database that is away longer than the commit timeout), then answer it."""
        record = refused_record(refused, received_at, self._scrub)
        log.warning("delivery_refused", status=refused.status, reason=refused.reason, detail=refused.detail,
                    attempt_id=record.event["attempt_id"])  # fmt: skip
        try:
            await self._committed(record)
        except (Overloaded, TimeoutError, NotStored) as exc:
            log.warning("refusal_not_recorded", reason=refused.reason, error=f"{type(exc).__name__}: {exc}")
        return self._answer(refused.status, {"error": refused.reason, "detail": refused.detail}, refused.reason)

    async def _committed(self, record: DeliveryRecord) -> None:
        """Wait, at most the commit timeout, for `record` to be committed."""
        done = self._committer.submit(record)
        try:
            async with asyncio.timeout(self._settings.commit_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            done.cancel()  # nobody waits for it now: the committer may drop it in an outage
            raise

    def _answer(self, status: int, document: dict[str, object], reason: str, headers: dict[str, str] | None = None) -> web.Response:
        self._metrics.refused.labels(status=str(status), reason=reason).inc()
        return web.json_response(document, status=status, headers=headers, dumps=_dumps)

    async def health(self, _request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT), self._engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        except Exception as exc:  # whatever keeps us from the database makes us unready
            # The reason goes to the log (redacted), not to whoever asks.
            log.warning("health_check_failed", error=error_text(exc))
            document = {"status": "unavailable", "database": "unreachable", "waiting": self._committer.waiting}
            return web.json_response(document, status=503, dumps=_dumps)
        return web.json_response({"status": "ok", "database": "reachable", "waiting": self._committer.waiting}, dumps=_dumps)

    async def metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._metrics.registry), headers={"Content-Type": content_type})


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class Listening:
    """A receiver that is up: where it listens, and its committer's task."""

    base_url: str
    committing: asyncio.Task[None]

    @property
    def delivery_url(self) -> str:
        return self.base_url + DELIVERY_PATH


@asynccontextmanager
async def receiving(settings: Settings, redactor: Redactor) -> AsyncIterator[Listening]:
    """The receiver, listening, for as long as the block runs; on leaving it stops
    accepting connections, answers the deliveries in flight once they are committed,
    commits what is queued, and closes the database."""
    settings.require_webhook()
    webhook = settings.webhook
    redactor.add(webhook.private_key)
    engine = open_database(settings)
    try:
        await ensure_schema(engine)  # as `migrate` would: an empty database gets the schema
        metrics = Metrics.create()
        committer = Committer(engine, redactor, on_commit=metrics.committed)
        committing = asyncio.create_task(committer.run(), name="webhook-committer")
        # `[sync] pii` applies to what a delivery stores too (its e-mail, in raw and payload),
        # and a secret of ours in a delivery (sent by mistake) is stored as [redacted].
        policy = pii_policy(settings)

        def scrub(payload: Payload) -> Payload:
            return redactor.redact_value(policy.payload(payload))

        receiver = Receiver(engine, committer, webhook, metrics, scrub)
        # The handlers' own bound (the commit timeout) ends them before aiohttp would
        # cancel them: a delivery in flight at shutdown is answered, not cut off.
        runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=webhook.commit_timeout + 5)  # fmt: skip
        await runner.setup()
        try:
            await web.TCPSite(runner, webhook.host, webhook.port).start()
            host, port = runner.addresses[0][:2]
            listening = Listening(f"http://{host}:{port}", committing)
            log.info("webhook_listening", url=listening.delivery_url, database=describe_engine(engine))
            yield listening
        finally:
            await runner.cleanup()  # stop listening; in-flight handlers finish, commits included
            await committer.close()
            await committing
        log.info("webhook_stopped")
    finally:
        await engine.dispose()


async def serve(settings: Settings, redactor: Redactor, stop: asyncio.Event) -> Outcome:
    """Receive deliveries until `stop` is set (the CLI sets it on SIGTERM or SIGINT)."""
    async with receiving(settings, redactor) as listening:
        await _until_stopped(stop, listening.committing)
    return Outcome.OK


async def _until_stopped(stop: asyncio.Event, committing: asyncio.Task[None]) -> None:
    """Until `stop` is set; a committer that ended on its own (a bug) ends the server too."""
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({stopping, committing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if committing.done():
        committing.result()  # raises what ended it
        raise RuntimeError("the committer stopped")
