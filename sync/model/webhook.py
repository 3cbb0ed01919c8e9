"""The webhook's contract between its source and its sink: one delivery as the database
stores it. Plain values; the source (sync.source.webhook) fills them from a request, the
sink (sync.sink.deliveries) writes them, and neither imports the other.

    DeliveryEvent    the webhook_events row: every delivery, accepted or refused
    DeliveryExam     the minimal exams row an accepted delivery carries (inserted only if
                     the exam is not stored yet)
    DeliveryAttempt  the attempts columns a delivery fills
    DeliveryRecord   the three together; a refused delivery has the event only
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypedDict

from sync.model.batches import Payload

WEBHOOK_SOURCE = "webhook"  # attempts.source and exams.source of the rows a delivery wrote
# The prefix of every content_hash a delivery writes. Payload digests are hex, so no API
# payload can match one: the next nightly run sees the row as changed and rewrites it
# from the API, filling in what the webhook does not carry.
WEBHOOK_HASH_PREFIX = "webhook:"


class DeliveryEvent(TypedDict):
    received_at: datetime
    attempt_id: int | None
    attempt_state: str | None  # started / completed, as delivered
    verified: bool
    payload: Payload | None  # the body as parsed, `key` and `hash` removed; None if not JSON
    error: str | None  # why it was refused; None when accepted


class DeliveryExam(TypedDict):
    id: int
    title: str | None
    duration_seconds: int | None
    start_date: datetime | None
    end_date: datetime | None
    raw: Payload  # the delivery's `exam` object
    content_hash: str


class DeliveryAttempt(TypedDict):
    id: int
    exam_id: int
    username: str | None
    user_id: int | None
    date: datetime | None
    state: str  # Running / Completed
    correct_count: int | None
    incorrect_count: int | None
    unanswered_count: int | None
    score: Decimal | None
    percentage: Decimal | None
    speed: int | None
    accuracy: int | None
    raw: Payload  # the delivery, `key` and `hash` removed
    content_hash: str


@dataclass(frozen=True)
class DeliveryRecord:
    event: DeliveryEvent
    exam: DeliveryExam | None = None
    attempt: DeliveryAttempt | None = None

    @property
    def accepted(self) -> bool:
        return self.attempt is not None
