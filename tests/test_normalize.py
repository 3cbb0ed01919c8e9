"""Every wire format of testpress-api.md, turned into rows by the pure normalizers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from sync.errors import RecordError
from sync.model.admin_rows import PiiPolicy, admin_user_row
from sync.model.normalize import (
    attempt_row,
    exam_row,
    parse_decimal,
    parse_duration_seconds,
    parse_rank,
    parse_timedelta_seconds,
    parse_timestamp,
    user_of,
)


def exam_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": 42,
        "url": "https://demo.testpress.in/api/v2.1/exams/mock-1/",
        "title": "Mock Test — गणित ✓",
        "description": "<p>HTML</p>",
        "course": "IBPS",
        "start_date": "2013-08-02T17:25:22+05:30",
        "end_date": None,
        "duration": "1 day, 1:00:00",
        "number_of_questions": 100,
        "negative_marks": "0.25",
        "mark_per_question": "1.00",
        "template_type": 1,
        "allow_retake": True,
        "max_retakes": -1,
        "enable_ranks": True,
        "rank_publishing_date": None,
        "attempts_url": "https://demo.testpress.in/api/v2.1/exams/mock-1/attempts/",
        "created": "2013-08-02T11:55:22.123Z",
        "slug": "mock-1",
        "variable_mark_per_question": False,
        "show_answers": True,
        "comments_count": 3,
        "allow_pdf": False,
    }
    payload.update(changes)
    return payload


def attempt_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": 9001,
        "url": "https://demo.testpress.in/api/v2.1/attempts/9001/",
        "date": "2014-01-20T06:42:11.072986Z",
        "total_questions": 10,
        "score": "2.00",
        "rank": 3,
        "max_rank": "NA",
        "review_url": "https://demo.testpress.in/api/v2.1/attempts/9001/review/",
        "questions_url": "https://demo.testpress.in/api/v2.1/attempts/9001/questions/",
        "correct_count": 1,
        "incorrect_count": 0,
        "last_started_time": "2014-01-20T06:42:11Z",
        "remaining_time": "0:29:52",
        "time_taken": "2:47:53.076906",
        "state": "Completed",
        "percentile": 83.64,
        "percentage": "10",
        "unanswered_count": 9,
        "user": {
            "id": 77, "url": "https://demo.testpress.in/api/v2.2/users/77/", "username": "asha",
            "display_name": "Asha K", "first_name": "Asha", "last_name": "K", "photo": None,
        },
    }  # fmt: skip
    payload.update(changes)
    return payload


# --- timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2013-08-02T17:25:22+05:30", datetime(2013, 8, 2, 11, 55, 22, tzinfo=UTC)),
        ("2013-08-02T11:55:22Z", datetime(2013, 8, 2, 11, 55, 22, tzinfo=UTC)),
        ("2013-08-02T11:55:22.123Z", datetime(2013, 8, 2, 11, 55, 22, 123000, tzinfo=UTC)),
        ("2013-08-02T11:55:22.072986Z", datetime(2013, 8, 2, 11, 55, 22, 72986, tzinfo=UTC)),
        ("2013-08-02T00:10:00-04:00", datetime(2013, 8, 2, 4, 10, 0, tzinfo=UTC)),
        ("2013-08-02T11:55:22", datetime(2013, 8, 2, 11, 55, 22, tzinfo=UTC)),
    ],
)
def test_timestamps_become_aware_utc(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text, "created")
    assert parsed == expected
    assert parsed is not None and parsed.utcoffset() is not None and parsed.tzinfo == UTC


def test_missing_timestamps_are_null() -> None:
    assert parse_timestamp(None, "end_date") is None
    assert parse_timestamp("", "end_date") is None


@pytest.mark.parametrize("bad", ["yesterday", "2013-13-40T00:00:00Z", 1375444522])
def test_unparseable_timestamp_names_the_field(bad: Any) -> None:
    with pytest.raises(RecordError, match="start_date"):
        parse_timestamp(bad, "start_date")


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:29:52", Decimal("1792")),
        ("2:47:53.076906", Decimal("10073.076906")),
        ("20 days, 3:58:48", Decimal(20 * 86400 + 3 * 3600 + 58 * 60 + 48)),
        ("1 day, 1:00:00", Decimal(90000)),
        ("0:00:00", Decimal(0)),
        ("-1 day, 23:59:59", Decimal(-1)),
        ("0:00:00.5", Decimal("0.5")),
        ("-1 day, 23:59:59.5", Decimal("-0.5")),
        ("2 days, 0:00:00.000001", Decimal("172800.000001")),
    ],
)
def test_timedelta_text_becomes_exact_seconds(text: str, seconds: Decimal) -> None:
    assert parse_timedelta_seconds(text, "time_taken") == seconds


def test_exam_duration_is_whole_seconds() -> None:
    assert parse_duration_seconds("1 day, 1:00:00", "duration") == 90000
    assert parse_duration_seconds("0:45:00", "duration") == 2700
    assert parse_duration_seconds(None, "duration") is None


@pytest.mark.parametrize("bad", ["90 minutes", "1:2", "1:99:00", "1:00:00.1234567", "3 weeks, 1:00:00", "a:bc:de", [1]])
def test_unparseable_duration_is_a_record_error(bad: Any) -> None:
    with pytest.raises(RecordError, match="time_taken"):
        parse_timedelta_seconds(bad, "time_taken")


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.25", Decimal("0.25")),
        ("2.00", Decimal("2.00")),
        (0, Decimal(0)),
        (80, Decimal(80)),
        (83.64, Decimal("83.64")),
        ("10", Decimal(10)),
        ("-1.50", Decimal("-1.50")),
    ],
)
def test_decimals_are_exact(value: Any, expected: Decimal) -> None:
    parsed = parse_decimal(value, "score")
    assert parsed == expected
    assert str(parsed) == str(expected)  # no binary-float digits creep in


@pytest.mark.parametrize("bad", ["twelve", "NaN", "Infinity", True, {"v": 1}])
def test_non_numbers_are_record_errors(bad: Any) -> None:
    with pytest.raises(RecordError, match="score"):
        parse_decimal(bad, "score")


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("NA", None), ("na", None), (None, None), ("7", 7)])
def test_rank_na_becomes_null(value: Any, expected: int | None) -> None:
    assert parse_rank(value, "rank") == expected


@pytest.mark.parametrize(("value", "expected"), [(None, None), (-1, None), (-5, None), (0, 0), (3, 3)])
def test_max_retakes_unlimited_is_null(value: Any, expected: int | None) -> None:
    assert exam_row(exam_payload(max_retakes=value))["max_retakes"] == expected


# --- users --------------------------------------------------------------------------------


def test_user_as_plain_username() -> None:
    user = user_of("asha")
    assert user == {
        "username": "asha", "user_id": None, "display_name": None,
        "first_name": None, "last_name": None,
    }  # fmt: skip


def test_user_as_nested_object() -> None:
    user = user_of(attempt_payload()["user"])
    assert (user["username"], user["user_id"], user["display_name"]) == ("asha", 77, "Asha K")
    assert (user["first_name"], user["last_name"]) == ("Asha", "K")


def test_a_nested_users_numeric_username_is_its_text() -> None:
    """Testpress usernames can be numbers (admin accounts' often are), served as JSON
    numbers: the attempt is stored, named by the text."""
    user = user_of({**attempt_payload()["user"], "username": 1008})
    assert (user["username"], user["user_id"]) == ("1008", 77)


@pytest.mark.parametrize("bad", [None, "", 12, {"id": 3}, {"id": 3, "username": True}])
def test_user_without_username_is_a_record_error(bad: Any) -> None:
    with pytest.raises(RecordError, match="user"):
        user_of(bad)


# --- whole records ------------------------------------------------------------------------


def test_exam_row_converts_every_field() -> None:
    row = exam_row(exam_payload())
    assert row["id"] == 42 and row["slug"] == "mock-1"
    assert row["title"] == "Mock Test — गणित ✓"
    assert row["start_date"] == datetime(2013, 8, 2, 11, 55, 22, tzinfo=UTC)
    assert row["created"] == datetime(2013, 8, 2, 11, 55, 22, 123000, tzinfo=UTC)
    assert row["end_date"] is None and row["rank_publishing_date"] is None
    assert row["duration_seconds"] == 90000
    assert row["negative_marks"] == Decimal("0.25") and row["mark_per_question"] == Decimal("1.00")
    assert row["allow_retake"] is True and row["variable_mark_per_question"] is False
    assert row["max_retakes"] is None
    assert row["attempts_url"].endswith("/exams/mock-1/attempts/")


def test_unknown_exam_fields_are_kept_in_raw() -> None:
    payload = exam_payload(attempts_count=12, total_marks="200.00", pass_percentage=40)
    row = exam_row(payload)
    assert row["raw"]["total_marks"] == "200.00" and row["raw"]["attempts_count"] == 12
    assert row["raw"] == payload


def test_attempt_row_converts_every_field() -> None:
    row, user = attempt_row(attempt_payload(), exam_id=42)
    assert (row["id"], row["exam_id"], row["username"], row["user_id"]) == (9001, 42, "asha", 77)
    assert row["date"] == datetime(2014, 1, 20, 6, 42, 11, 72986, tzinfo=UTC)
    assert row["score"] == Decimal("2.00")
    assert row["percentile"] == Decimal("83.64") and row["percentage"] == Decimal(10)
    assert row["time_taken_seconds"] == Decimal("10073.076906")
    assert row["remaining_time_seconds"] == Decimal(1792)
    assert row["rank"] == 3 and row["max_rank"] is None
    assert row["state"] == "Completed"
    assert user["display_name"] == "Asha K"


def test_fresh_attempt_with_integer_score_and_string_user() -> None:
    row, user = attempt_row(
        attempt_payload(score=0, user="ravi", state="Running", rank="NA"), exam_id=1
    )
    assert row["score"] == Decimal(0) and row["username"] == "ravi" and row["user_id"] is None
    assert row["rank"] is None and user["first_name"] is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": None}, "missing id"),
        ({"id": "abc"}, "id"),
        ({"score": "twelve"}, "score"),
        ({"correct_count": -3}, "correct_count"),
        ({"total_questions": 2**40}, "total_questions: .* out of range"),
        ({"rank": "99999999999"}, "rank: .* out of range"),
        ({"id": 2**70}, "id: .* out of range"),
        ({"date": "not a date"}, "date"),
        ({"user": None}, "user"),
    ],
)
def test_malformed_attempt_names_the_problem(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordError, match=field):
        attempt_row(attempt_payload(**changes), exam_id=1)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(exam_payload(slug=""), "slug"), (exam_payload(allow_pdf="yes"), "allow_pdf"), ([1, 2], "object")],
)
def test_malformed_exam_names_the_problem(payload: Any, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        exam_row(payload)


# --- admin users and the personal-data policy (pure) -------------------------------------------

ADMIN_USER = {
    "id": 1007, "username": "student7", "first_name": "Asha", "last_name": "K", "display_name": "Asha K",
    "email": "asha@example.com", "phone": "+919800000007", "birth_date": "31/02/2001", "city": ["not", "text"],
    "state": "IN-TN", "custom_fields": "not-an-object", "created": None, "modified": None,
}  # fmt: skip


def test_drop_leaves_null_whatever_the_field_held_and_hash_leaves_emptiness_alone() -> None:
    blank = {**ADMIN_USER, "email": "", "phone": None, "birth_date": None, "city": "", "custom_fields": None}
    dropped, _ = admin_user_row(blank, PiiPolicy("drop"))
    assert (dropped["email"], dropped["city"], dropped["raw"]["email"], dropped["raw"]["city"]) == (None, None, None, None)
    hashed, _ = admin_user_row(blank, PiiPolicy("hash", "salt"))
    assert (hashed["email"], hashed["raw"]["email"]) == ("", "")  # nothing to hide, nothing to join on


def test_a_bad_personal_field_costs_the_field_and_shows_its_value_only_when_kept() -> None:
    row, problems = admin_user_row(ADMIN_USER, PiiPolicy("keep"))
    assert (row["birth_date"], row["city"], row["custom_fields"], row["email"]) == (None, None, None, "asha@example.com")
    assert len(problems) == 3 and any("31/02/2001" in problem for problem in problems)
    for mode in ("hash", "drop"):
        row, problems = admin_user_row(ADMIN_USER, PiiPolicy(mode, "salt"))
        # The birth date is not parsed at all (its column is null under both), and what is
        # said of the others names no value: it goes to the log and to sync_errors.
        assert sorted(problem.split(":")[0] for problem in problems) == ["city", "custom_fields"], mode
        assert not any("not-an-object" in p or "'text'" in p or "31/02" in p for p in problems), problems
        assert row["birth_date"] is None and (row["email"] is None) == (mode == "drop")
