"""Exam webhook deliveries (testpress-api.md, "Exam webhook"): whether a request is one
Testpress signed, what it says, and the rows it becomes. Pure: headers, bytes and keys
in, values out; the receiver (sync.commands.webhook) does the I/O, the sink the writes.

    check_headers(content type, length, limit)   415 / 413 before the body is read
    parse_delivery(body, keys) -> Delivery       400 / 401 as Refused
    accepted_record(delivery, received_at)       the rows of an accepted delivery
    refused_record(refused, received_at)         the webhook_events row of a refused one

Two eras are accepted. The 2019 one sends every scalar as a string ("attempt_id": "93")
and no `attempt_state`: it was sent when an attempt was completed, so it means completed.
The 2023 one is typed and says `started` or `completed`. The signature is computed over
the values as delivered (str() of each JSON value), so both eras verify alike.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from sync.errors import RecordError
from sync.model.batches import Payload
from sync.model.normalize import (
    INT64,
    parse_count,
    parse_decimal,
    parse_duration_seconds,
    parse_int,
    parse_text,
    parse_timestamp,
    parse_username,
    payload_digest,
    require_id,
)
from sync.model.webhook import (
    WEBHOOK_HASH_PREFIX,
    DeliveryAttempt,
    DeliveryEvent,
    DeliveryExam,
    DeliveryRecord,
)

JSON_TYPE = "application/json"
# The fields the signature covers, in the order of the documented message; the private
# key goes between the second and the third.
SIGNED_FIELDS = (
    "attempt_id", "correct_answers_count", "incorrect_answers_count", "unanswered_answers_count",
    "percentage", "score", "user_id",
)  # fmt: skip
SECRET_FIELDS = ("key", "hash")  # never stored: the public key, and the signature
STATES = {"started": "Running", "completed": "Completed"}  # attempt_state → attempts.state


@dataclass(frozen=True)
class Keys:
    """The institute's webhook keys, from Testpress's settings page."""

    public: str
    private: str = field(repr=False)


class Refused(Exception):
    """A request that is not a delivery we may store: its status, a short reason (a metric
    label, one of a few words) and the detail for webhook_events and the answer."""

    def __init__(self, status: int, reason: str, detail: str, payload: Payload | None = None) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.payload = payload  # the body as parsed, if it was a JSON object


@dataclass(frozen=True)
class DeliveredExam:
    id: int
    title: str | None
    duration_seconds: int | None
    start_date: datetime | None
    end_date: datetime | None
    raw: Payload


@dataclass(frozen=True)
class Delivery:
    """One verified delivery, parsed."""

    attempt_id: int
    state: str  # started / completed
    era: str  # 2019 (every scalar a string) / 2023 (typed)
    exam: DeliveredExam
    user_id: int | None
    username: str | None
    started_at: datetime | None
    correct_count: int | None
    incorrect_count: int | None
    unanswered_count: int | None
    score: Decimal | None
    percentage: Decimal | None
    speed: int | None
    accuracy: int | None
    payload: Payload  # as delivered, `key` and `hash` removed


# --- the request ---------------------------------------------------------------------------


def check_headers(content_type: str, content_length: int | None, max_body_bytes: int) -> None:
    """Refuse what the headers alone show to be no delivery; a body that turns out longer
    than its Content-Length said is the reader's to refuse (the server's own limit)."""
    if content_type.lower() != JSON_TYPE:
        raise Refused(415, "unsupported_media_type", f"content type {content_type or 'none'!r}, not {JSON_TYPE}")
    if content_length is not None and content_length > max_body_bytes:
        raise Refused(413, "body_too_large", too_large(max_body_bytes))


def too_large(max_body_bytes: int) -> str:
    return f"the body is larger than {max_body_bytes} bytes (webhook.max_body_bytes)"


def signature(values: Mapping[str, Any], keys: Keys) -> str:
    """HMAC-SHA512, keyed with the private key, of the documented message: the public key,
    the attempt id, the correct count, the private key, then the other signed values,
    each as str() of the value as delivered, joined by "|"."""
    first, second, *rest = (str(values[name]) for name in SIGNED_FIELDS)
    message = "|".join([keys.public, first, second, keys.private, *rest])
    return hmac.new(keys.private.encode(), message.encode(), hashlib.sha512).hexdigest()


def without_secrets(payload: Payload) -> Payload:
    return {name: value for name, value in payload.items() if name not in SECRET_FIELDS}


def parse_delivery(body: bytes, keys: Keys) -> Delivery:
    """The delivery in `body`, once its key and signature check out; raises Refused."""
    payload = _json_object(body)
    stored = without_secrets(payload)
    _verify(payload, stored, keys)
    try:
        return _delivery(payload, stored)
    except RecordError as error:
        raise Refused(400, "invalid_field", str(error), stored) from None


def _json_object(body: bytes) -> Payload:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Refused(400, "malformed_json", f"the body is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise Refused(400, "malformed_json", f"the body is a JSON {type(payload).__name__}, not an object")
    return payload


def _verify(payload: Payload, stored: Payload, keys: Keys) -> None:
    key, given = payload.get("key"), payload.get("hash")
    if not isinstance(key, str) or not isinstance(given, str):
        raise Refused(401, "missing_signature", "the delivery has no `key` and `hash` strings", stored)
    if not hmac.compare_digest(key.encode(), keys.public.encode()):
        raise Refused(401, "wrong_public_key", "`key` is not this institute's public key (webhook.public_key)", stored)
    missing = [name for name in SIGNED_FIELDS if name not in payload]
    if missing:
        raise Refused(400, "missing_fields", f"missing signed fields: {', '.join(missing)}", stored)
    # Bytes on both sides: compare_digest refuses str holding anything but ASCII.
    if not hmac.compare_digest(signature(payload, keys).encode(), given.encode()):
        raise Refused(401, "bad_signature", "`hash` is not the signature of this delivery", stored)


def _delivery(payload: Payload, stored: Payload) -> Delivery:
    exam = payload.get("exam")
    if not isinstance(exam, dict) or exam.get("id") in (None, ""):
        raise Refused(400, "missing_fields", "missing field: exam.id", stored)
    state = payload.get("attempt_state", "completed")  # 2019: sent on completion only
    if state not in STATES:
        raise Refused(400, "unknown_state", f"attempt_state {state!r} is neither started nor completed", stored)
    attempt_id = parse_int(payload["attempt_id"], "attempt_id", limit=INT64)
    if attempt_id is None:
        raise RecordError("attempt_id: missing")
    get = payload.get
    return Delivery(
        attempt_id=attempt_id,
        state=state,
        era="2019" if isinstance(payload["attempt_id"], str) else "2023",
        exam=DeliveredExam(
            id=require_id(exam, "exam"),
            title=parse_text(exam.get("title"), "exam.title"),
            duration_seconds=parse_duration_seconds(exam.get("duration"), "exam.duration"),
            start_date=parse_timestamp(exam.get("start_date"), "exam.start_date"),
            end_date=parse_timestamp(exam.get("end_date"), "exam.end_date"),
            raw=exam,
        ),
        user_id=parse_int(get("user_id"), "user_id", limit=INT64),
        username=parse_username(get("username"), "username"),
        started_at=parse_timestamp(get("attempt_start_time"), "attempt_start_time"),
        correct_count=parse_count(get("correct_answers_count"), "correct_answers_count"),
        incorrect_count=parse_count(get("incorrect_answers_count"), "incorrect_answers_count"),
        unanswered_count=parse_count(get("unanswered_answers_count"), "unanswered_answers_count"),
        score=parse_decimal(get("score"), "score"),
        percentage=parse_decimal(get("percentage"), "percentage"),
        speed=parse_int(get("speed"), "speed"),
        accuracy=parse_int(get("accuracy"), "accuracy"),
        payload=stored,
    )


# --- the rows --------------------------------------------------------------------------------


def _webhook_hash(value: Payload) -> str:
    return WEBHOOK_HASH_PREFIX + payload_digest(orjson.dumps(value))


# What is stored of a payload, given the payload: the receiver applies `[sync] pii` to its
# personal keys (the e-mail) and blanks out any secret of its own.
Scrub = Callable[[Payload], Payload]


def _as_is(payload: Payload) -> Payload:
    return payload


def accepted_record(delivery: Delivery, received_at: datetime, scrub: Scrub = _as_is) -> DeliveryRecord:
    """The webhook_events row, the minimal exam row and the attempt columns of a delivery.
    The attempt's content_hash is a digest of the delivery: a duplicate has the same one."""
    stored = scrub(delivery.payload)
    event: DeliveryEvent = {
        "received_at": received_at,
        "attempt_id": delivery.attempt_id,
        "attempt_state": delivery.state,
        "verified": True,
        "payload": stored,
        "error": None,
    }
    exam = delivery.exam
    exam_row: DeliveryExam = {
        "id": exam.id,
        "title": exam.title,
        "duration_seconds": exam.duration_seconds,
        "start_date": exam.start_date,
        "end_date": exam.end_date,
        "raw": exam.raw,
        "content_hash": _webhook_hash(exam.raw),
    }
    attempt: DeliveryAttempt = {
        "id": delivery.attempt_id,
        "exam_id": exam.id,
        "username": delivery.username,
        "user_id": delivery.user_id,
        "date": delivery.started_at,
        "state": STATES[delivery.state],
        "correct_count": delivery.correct_count,
        "incorrect_count": delivery.incorrect_count,
        "unanswered_count": delivery.unanswered_count,
        "score": delivery.score,
        "percentage": delivery.percentage,
        "speed": delivery.speed,
        "accuracy": delivery.accuracy,
        "raw": stored,
        "content_hash": _webhook_hash(stored),
    }
    return DeliveryRecord(event, exam_row, attempt)


def refused_record(refused: Refused, received_at: datetime, scrub: Scrub = _as_is) -> DeliveryRecord:
    """The webhook_events row of a refused delivery: what it said it was, where it says so."""
    payload = None if refused.payload is None else scrub(refused.payload)
    attempt_id = state = None
    if payload is not None:
        try:
            attempt_id = parse_int(payload.get("attempt_id"), "attempt_id", limit=INT64)
        except RecordError:
            attempt_id = None
        state = payload.get("attempt_state") if isinstance(payload.get("attempt_state"), str) else None
    event: DeliveryEvent = {
        "received_at": received_at,
        "attempt_id": attempt_id,
        "attempt_state": state,
        "verified": False,
        "payload": payload,
        "error": f"{refused.reason}: {refused.detail}",
    }
    return DeliveryRecord(event)
