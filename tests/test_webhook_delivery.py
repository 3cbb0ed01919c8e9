"""The webhook's pure half (sync.source.webhook): the signature as documented, both eras,
every refusal, and the rows a delivery becomes. No server, no database."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from sync.model.webhook import WEBHOOK_HASH_PREFIX
from sync.source.webhook import (
    Keys,
    Refused,
    accepted_record,
    check_headers,
    parse_delivery,
    refused_record,
    signature,
)

KEYS = Keys("YDRAXrgV3STf7EH5", "private-K3y-never-shown")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# The documentation's 2023 "completed" sample (abridged), unsigned.
SAMPLE_2023: dict[str, Any] = {
    "username": "student", "accuracy": 0, "email": "karthiktest51@gmail.com",
    "exam": {"id": 27, "title": "File type exam", "duration": None, "start_date": "2023-03-15T12:04:32+05:30", "end_date": None},
    "subject_stats": [], "partial_correct_answers_count": 0, "attempt_id": 130, "attempt_state": "completed",
    "incorrect_answers_count": 0, "difficulty_level_stats": {}, "completed_on": "2023-03-31T16:27:41.151586+05:30",
    "unanswered_answers_count": 1, "attempt_start_time": "2023-03-31T10:55:54.968829Z", "user_id": 2,
    "percentage": "0.00", "score": "0.00", "speed": 0, "institute_attempt_id": None, "correct_answers_count": 0,
}  # fmt: skip
# The documentation's 2019 sample: every scalar a string, no state, no start time.
SAMPLE_2019: dict[str, Any] = {
    "username": "test_user",
    "exam": {"duration": "0:30:00", "start_date": "2019-01-21T12:52:41.075Z", "id": 2, "end_date": "2019-03-21T12:52:41.075Z", "title": "test_exam"},
    "partial_correct_answers_count": "0", "attempt_id": "93", "speed": "960", "percentage": "100",
    "correct_answers_count": "50", "user_id": "3", "score": "50", "unanswered_answers_count": "0",
    "incorrect_answers_count": "0", "email": "test_user@gmail.com", "accuracy": "100",
}  # fmt: skip


def documented_hash(payload: dict[str, Any], public: str, private: str) -> str:
    """The formula of testpress-api.md, written out here rather than taken from the code."""
    message = "|".join([
        public, str(payload["attempt_id"]), str(payload["correct_answers_count"]), private,
        str(payload["incorrect_answers_count"]), str(payload["unanswered_answers_count"]),
        str(payload["percentage"]), str(payload["score"]), str(payload["user_id"]),
    ])  # fmt: skip
    return hmac.new(private.encode(), message.encode(), hashlib.sha512).hexdigest()


def signed(payload: dict[str, Any], keys: Keys = KEYS) -> dict[str, Any]:
    return {**payload, "key": keys.public, "hash": documented_hash(payload, keys.public, keys.private)}


def body(payload: Any) -> bytes:
    return orjson.dumps(payload)


def refusal(payload: Any) -> Refused:
    with pytest.raises(Refused) as refused:
        parse_delivery(payload if isinstance(payload, bytes) else body(payload), KEYS)
    return refused.value


# --- the signature and the two eras ----------------------------------------------------------


@pytest.mark.parametrize("sample", [SAMPLE_2023, SAMPLE_2019], ids=["2023", "2019"])
def test_the_signature_is_the_documented_hmac_sha512(sample: dict[str, Any]) -> None:
    expected = documented_hash(sample, KEYS.public, KEYS.private)
    assert signature(sample, KEYS) == expected and len(expected) == 128


def test_a_typed_2023_delivery_is_parsed() -> None:
    delivery = parse_delivery(body(signed(SAMPLE_2023)), KEYS)
    assert (delivery.attempt_id, delivery.state, delivery.era) == (130, "completed", "2023")
    assert (delivery.user_id, delivery.username) == (2, "student")
    assert delivery.started_at == datetime(2023, 3, 31, 10, 55, 54, 968829, tzinfo=UTC)
    assert (delivery.correct_count, delivery.incorrect_count, delivery.unanswered_count) == (0, 0, 1)
    assert delivery.score == Decimal("0.00") and delivery.percentage == Decimal("0.00")
    assert delivery.exam.id == 27 and delivery.exam.duration_seconds is None
    assert delivery.exam.start_date == datetime(2023, 3, 15, 6, 34, 32, tzinfo=UTC)
    assert "key" not in delivery.payload and "hash" not in delivery.payload


def test_a_2019_delivery_of_strings_is_parsed_as_a_completion() -> None:
    delivery = parse_delivery(body(signed(SAMPLE_2019)), KEYS)
    assert (delivery.attempt_id, delivery.state, delivery.era) == (93, "completed", "2019")
    assert (delivery.user_id, delivery.correct_count, delivery.speed, delivery.accuracy) == (3, 50, 960, 100)
    assert delivery.score == Decimal(50) and delivery.percentage == Decimal(100)
    assert delivery.started_at is None and delivery.exam.duration_seconds == 1800


def test_a_started_delivery_is_a_running_attempt() -> None:
    started = {**SAMPLE_2023, "attempt_state": "started", "unanswered_answers_count": 0, "completed_on": None}
    record = accepted_record(parse_delivery(body(signed(started)), KEYS), NOW)
    assert record.attempt is not None and record.attempt["state"] == "Running"


# --- refusals --------------------------------------------------------------------------------


def test_headers_alone_refuse_a_wrong_type_and_a_long_body() -> None:
    with pytest.raises(Refused) as wrong_type:
        check_headers("text/plain", 10, 1000)
    with pytest.raises(Refused) as too_long:
        check_headers("application/json", 1001, 1000)
    assert (wrong_type.value.status, wrong_type.value.reason) == (415, "unsupported_media_type")
    assert (too_long.value.status, too_long.value.reason) == (413, "body_too_large")
    check_headers("application/json", None, 1000)  # chunked: the reader enforces the limit


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b"{not json", 400, "malformed_json"),
        ([1, 2], 400, "malformed_json"),
        (SAMPLE_2023, 401, "missing_signature"),
        ({**signed(SAMPLE_2023), "hash": 12}, 401, "missing_signature"),
        ({**signed(SAMPLE_2023), "key": "someone-else"}, 401, "wrong_public_key"),
        ({**signed(SAMPLE_2023), "score": "99.00"}, 401, "bad_signature"),
        ({**signed(SAMPLE_2023), "hash": "é" * 128}, 401, "bad_signature"),
        (signed(SAMPLE_2023, Keys(KEYS.public, "another-private-key")), 401, "bad_signature"),
        ({k: v for k, v in signed(SAMPLE_2023).items() if k != "user_id"}, 400, "missing_fields"),
        (signed({k: v for k, v in SAMPLE_2023.items() if k != "exam"}), 400, "missing_fields"),
        (signed({**SAMPLE_2023, "attempt_state": "paused"}), 400, "unknown_state"),
        (signed({**SAMPLE_2023, "score": "twelve"}), 400, "invalid_field"),
        (signed({**SAMPLE_2023, "attempt_id": str(2**70)}), 400, "invalid_field"),
    ],
    ids=[
        "not-json", "array", "unsigned", "hash-not-text", "wrong-key", "tampered", "non-ascii-hash",
        "other-private-key", "missing-signed-field", "missing-exam", "unknown-state", "bad-score", "huge-id",
    ],
)
def test_each_refusal_has_its_status_and_reason(payload: Any, status: int, reason: str) -> None:
    refused = refusal(payload)
    assert (refused.status, refused.reason) == (status, reason)
    assert KEYS.private not in str(refused) and KEYS.private not in repr(refused.payload)


def test_a_refused_record_keeps_what_the_delivery_said_without_its_secrets() -> None:
    tampered = {**signed(SAMPLE_2023), "score": "99.00"}
    record = refused_record(refusal(tampered), NOW)
    event = record.event
    assert record.attempt is None and record.exam is None and not record.accepted
    assert (event["verified"], event["attempt_id"], event["attempt_state"]) == (False, 130, "completed")
    assert event["error"] is not None and event["error"].startswith("bad_signature:")
    assert event["payload"] == {k: v for k, v in tampered.items() if k not in ("key", "hash")}
    assert refused_record(refusal(b"{not json"), NOW).event["payload"] is None


# --- rows ------------------------------------------------------------------------------------


def test_an_accepted_record_maps_the_delivery_onto_the_attempt_and_exam_columns() -> None:
    record = accepted_record(parse_delivery(body(signed(SAMPLE_2023)), KEYS), NOW)
    assert record.accepted and record.exam is not None and record.attempt is not None
    attempt, exam, event = record.attempt, record.exam, record.event
    assert attempt["id"] == 130 and attempt["exam_id"] == 27 and attempt["state"] == "Completed"
    assert (attempt["correct_count"], attempt["incorrect_count"], attempt["unanswered_count"]) == (0, 0, 1)
    assert attempt["date"] == datetime(2023, 3, 31, 10, 55, 54, 968829, tzinfo=UTC)
    assert attempt["raw"] == SAMPLE_2023 and attempt["content_hash"].startswith(WEBHOOK_HASH_PREFIX)
    assert exam["raw"] == SAMPLE_2023["exam"] and exam["title"] == "File type exam"
    assert exam["content_hash"].startswith(WEBHOOK_HASH_PREFIX)
    assert event["verified"] and event["error"] is None and event["received_at"] == NOW


def test_a_duplicate_has_the_same_content_hash_and_another_state_another() -> None:
    first = accepted_record(parse_delivery(body(signed(SAMPLE_2023)), KEYS), NOW).attempt
    again = accepted_record(parse_delivery(body(signed(SAMPLE_2023)), KEYS), NOW).attempt
    started = {**SAMPLE_2023, "attempt_state": "started"}
    other = accepted_record(parse_delivery(body(signed(started)), KEYS), NOW).attempt
    assert first is not None and again is not None and other is not None
    assert first["content_hash"] == again["content_hash"] != other["content_hash"]


def test_what_is_stored_of_a_payload_is_scrubbed_first() -> None:
    def drop_email(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "email": None}

    record = accepted_record(parse_delivery(body(signed(SAMPLE_2023)), KEYS), NOW, drop_email)
    assert record.attempt is not None and record.attempt["raw"]["email"] is None
    assert record.event["payload"] is not None and record.event["payload"]["email"] is None
