"""Payloads in, rows out: pure functions with no I/O.

Every wire format of testpress-api.md is parsed here, and only here. A value that cannot
be parsed raises RecordError naming the field; the caller records the item in
sync_errors and stores the rest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict, cast

from sync.errors import RecordError
from sync.model.batches import Payload

# Part of every row's content_hash: bump it when a rule here changes, and the next run
# rewrites every row with the new rule instead of skipping rows whose payload is the same.
NORMALIZER_VERSION = b"2"


def payload_digest(raw_json: bytes, rules: bytes = b"") -> str:
    """The digest a stored row is compared by: its payload (as JSON bytes), and the rules
    that normalized it (this module's version, and `rules` of the resource: its
    personal-data policy, say). Equal digests mean the row would be written the same."""
    return hashlib.blake2b(NORMALIZER_VERSION + rules + raw_json, digest_size=16).hexdigest()


def rules_digest(rules: bytes = b"") -> str:
    """A one-way digest of what rows are written by: this module's version and a
    resource's `rules`. Kept in sync_state by a full walk, so a later run can tell that a
    new personal-data policy or salt (or normalizer) would write stored rows otherwise.
    One-way, as the salt's fingerprint in `rules` must not reach the database."""
    return hashlib.blake2b(b"rules:" + NORMALIZER_VERSION + rules, digest_size=16).hexdigest()


class ExamRow(TypedDict):
    id: int
    slug: str
    title: str | None
    description: str | None
    course: str | None
    start_date: datetime | None
    end_date: datetime | None
    rank_publishing_date: datetime | None
    created: datetime | None
    duration_seconds: int | None
    number_of_questions: int | None
    template_type: int | None
    comments_count: int | None
    negative_marks: Decimal | None
    mark_per_question: Decimal | None
    allow_retake: bool | None
    enable_ranks: bool | None
    allow_pdf: bool | None
    variable_mark_per_question: bool | None
    show_answers: bool | None
    max_retakes: int | None
    url: str | None
    attempts_url: str | None
    raw: Payload
    published: bool | None
    pass_percentage: Decimal | None
    total_marks: Decimal | None
    show_score: bool | None
    modified: datetime | None
    source: str


class AttemptRow(TypedDict):
    id: int
    exam_id: int
    username: str
    user_id: int | None
    date: datetime | None
    last_started_time: datetime | None
    total_questions: int | None
    correct_count: int | None
    incorrect_count: int | None
    unanswered_count: int | None
    score: Decimal | None
    percentage: Decimal | None
    percentile: Decimal | None
    time_taken_seconds: Decimal | None
    remaining_time_seconds: Decimal | None
    state: str | None
    rank: int | None
    max_rank: int | None
    url: str | None
    review_url: str | None
    questions_url: str | None
    raw: Payload
    result: str | None
    speed: int | None
    accuracy: int | None
    last_answer_updated_time: datetime | None
    source: str


class UserRow(TypedDict):
    username: str
    user_id: int | None
    display_name: str | None
    first_name: str | None
    last_name: str | None


# --- single values -----------------------------------------------------------------------

# Python's timedelta text: "1:00:00", "2:47:53.076906", "20 days, 3:58:48", "-1 day, 23:59:59".
_TIMEDELTA = re.compile(r"\s*(?:([-+]?\d+) days?, )?(\d+):([0-5]\d):([0-5]\d)(?:\.(\d{1,6}))?\s*\Z")


def parse_timedelta_seconds(value: Any, field: str) -> Decimal | None:
    """Timedelta text (or a plain number of seconds) to exact seconds."""
    if type(value) is str and value:
        match = _TIMEDELTA.match(value)
        if match is None:
            raise RecordError(f"{field}: {value!r} is not a duration like '1:30:00'")
        days, hours, minutes, seconds, fraction = match.groups()
        total = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
        if days:
            total += int(days) * 86400
        if fraction is None:
            return Decimal(total)
        # Decimal of the text, not of a float: 10073.076906 stays exact.
        return Decimal(f"{total}.{fraction}") if total >= 0 else Decimal(total) + Decimal(f"0.{fraction}")
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parse_decimal(value, field)
    raise RecordError(f"{field}: expected duration text like '1:30:00', got {value!r}")


def parse_duration_seconds(value: Any, field: str) -> int | None:
    """Timedelta text to whole seconds (the exam's duration column is an integer)."""
    seconds = parse_timedelta_seconds(value, field)
    if seconds is None:
        return None
    return parse_int(int(seconds.to_integral_value()), field)


def parse_timestamp(value: Any, field: str) -> datetime | None:
    """ISO 8601 with offset or Z (0-6 fractional digits) to aware UTC; naive means UTC."""
    if type(value) is not str:
        if value is None:
            return None
        raise RecordError(f"{field}: expected an ISO timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        if value == "":
            return None
        raise RecordError(f"{field}: {value!r} is not an ISO timestamp") from None
    zone = parsed.tzinfo
    if zone is UTC:  # the common "…Z" case: nothing to convert
        return parsed
    if zone is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_decimal(value: Any, field: str) -> Decimal | None:
    """A decimal string, int or float to an exact Decimal (floats through their repr)."""
    kind = type(value)
    if kind is str:  # the usual wire form: "2.00"
        try:
            number = Decimal(value)
        except InvalidOperation:
            if value == "":
                return None
            raise RecordError(f"{field}: {value!r} is not a number") from None
    elif kind is int:
        return Decimal(value)
    elif kind is float:
        number = Decimal(repr(value))  # 83.64, not the binary fraction nearest to it
    elif value is None:
        return None
    elif isinstance(value, int) and not isinstance(value, bool):
        return Decimal(int(value))
    else:
        raise RecordError(f"{field}: expected a number, got {value!r}")
    if not number.is_finite():
        raise RecordError(f"{field}: {value!r} is not a finite number")
    return number


# The columns' ranges: ids are BIGINT, counts and ranks INTEGER, on both databases.
INT32 = 2**31 - 1
INT64 = 2**63 - 1


def parse_int(value: Any, field: str, *, limit: int = INT32) -> int | None:
    """An integer within ±limit (an int, or its text); a larger one is an impossible
    value that the database column could not hold."""
    if type(value) is not int:
        if value is None:
            return None
        if isinstance(value, bool):
            raise RecordError(f"{field}: expected an integer, got {value!r}")
        if (
            isinstance(value, str)
            and _INTEGER_TEXT.fullmatch(value)
            or isinstance(value, float)
            and value.is_integer()
        ):
            value = int(value)
        elif not isinstance(value, int):
            raise RecordError(f"{field}: expected an integer, got {value!r}")
    if not -limit - 1 <= value <= limit:
        raise RecordError(f"{field}: {value} is out of range")
    return int(value)


_INTEGER_TEXT = re.compile(r"\s*[-+]?\d+\s*")


def parse_count(value: Any, field: str) -> int | None:
    """A count of questions or answers: an integer that cannot be negative."""
    if type(value) is int and 0 <= value <= INT32:  # the usual case, checked first
        return value
    number = parse_int(value, field)
    if number is not None and number < 0:
        raise RecordError(f"{field}: {number} is negative")
    return number


def parse_rank(value: Any, field: str) -> int | None:
    """An int, or "NA" (not ranked yet) which becomes null."""
    if type(value) is int and -INT32 - 1 <= value <= INT32:
        return value
    if isinstance(value, str) and value.strip().upper() in ("NA", "N/A", ""):
        return None
    return parse_int(value, field)


def parse_max_retakes(value: Any) -> int | None:
    """null and negative numbers both mean unlimited, stored as null."""
    number = parse_int(value, "max_retakes")
    return None if number is None or number < 0 else number


def parse_bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise RecordError(f"{field}: expected true or false, got {value!r}")


def parse_text(value: Any, field: str) -> str | None:
    if type(value) is str or value is None:
        return value
    raise RecordError(f"{field}: expected text, got {value!r}")


def parse_username(value: Any, field: str) -> str | None:
    """A username: text, or an integer, which Testpress gives where a username is a
    number (admin accounts' often are their user id)."""
    if type(value) is int:
        return str(value)
    return parse_text(value, field)


def require_id(payload: Any, what: str) -> int:
    """The item's id; an item without a usable one cannot be stored at all."""
    if not isinstance(payload, dict):
        raise RecordError(f"{what}: expected an object, got {type(payload).__name__}")
    ident = payload.get("id")
    if type(ident) is int and -INT64 - 1 <= ident <= INT64:  # the usual case, checked first
        return ident
    ident = parse_int(ident, "id", limit=INT64)
    if ident is None:
        raise RecordError(f"{what}: missing id")
    return ident


# --- records -----------------------------------------------------------------------------


# (column, parser, payload key): a parser takes the value and the key, which names the
# field in its error.
Fields = tuple[tuple[str, Callable[[Any, str], Any], str], ...]


def parse_fields(payload: Payload, fields: Fields, problems: list[str] | None = None) -> dict[str, Any]:
    """`fields` of `payload`, parsed. With `problems`, one field that will not parse does
    not cost the others: it becomes None and its reason is appended (the admin API's rows:
    "one bad field does not cost the row"); without, the first one raises RecordError."""
    get = payload.get
    try:
        return {column: parse(get(key), key) for column, parse, key in fields}
    except RecordError:
        if problems is None:
            raise
    return {column: parse_leniently(problems, parse, get(key), key) for column, parse, key in fields}


def parse_leniently(problems: list[str], parse: Callable[[Any, str], Any], value: Any, field: str) -> Any:
    """parse(value), or None with the problem noted: one bad field does not cost the row."""
    try:
        return parse(value, field)
    except RecordError as problem:
        problems.append(str(problem))
        return None


EXAM_FIELDS: Fields = (
    ("title", parse_text, "title"),
    ("description", parse_text, "description"),
    ("course", parse_text, "course"),
    ("start_date", parse_timestamp, "start_date"),
    ("end_date", parse_timestamp, "end_date"),
    ("rank_publishing_date", parse_timestamp, "rank_publishing_date"),
    ("created", parse_timestamp, "created"),
    ("duration_seconds", parse_duration_seconds, "duration"),
    ("number_of_questions", parse_count, "number_of_questions"),
    ("template_type", parse_int, "template_type"),
    ("comments_count", parse_count, "comments_count"),
    ("negative_marks", parse_decimal, "negative_marks"),
    ("mark_per_question", parse_decimal, "mark_per_question"),
    ("allow_retake", parse_bool, "allow_retake"),
    ("enable_ranks", parse_bool, "enable_ranks"),
    ("allow_pdf", parse_bool, "allow_pdf"),
    ("variable_mark_per_question", parse_bool, "variable_mark_per_question"),
    ("show_answers", parse_bool, "show_answers"),
    ("max_retakes", lambda value, _field: parse_max_retakes(value), "max_retakes"),
    ("url", parse_text, "url"),
    ("attempts_url", parse_text, "attempts_url"),
    # The admin API's (newer servers send them on the student API too).
    ("published", parse_bool, "published"),
    ("pass_percentage", parse_decimal, "pass_percentage"),
    ("total_marks", parse_decimal, "total_marks"),
    ("show_score", parse_bool, "show_score"),
    ("modified", parse_timestamp, "modified"),
)


def exam_fields(payload: Payload, problems: list[str] | None = None) -> dict[str, Any]:
    """The columns an exam payload fills, as either API serves them: everything but the
    id, the slug and where the row came from (`problems`: see parse_fields)."""
    return {**parse_fields(payload, EXAM_FIELDS, problems), "raw": payload}


def exam_row(payload: Payload) -> ExamRow:
    """One exam of the student API's listing to its `exams` row."""
    exam_id = require_id(payload, "exam")
    slug = parse_text(payload.get("slug"), "slug")
    if not slug:
        raise RecordError("exam: missing slug")
    return cast(ExamRow, {"id": exam_id, "slug": slug, **exam_fields(payload), "source": "student"})


def user_of(value: Any) -> UserRow:
    """`user` as a plain username string or as the nested user object."""
    if type(value) is dict:
        username = parse_username(value.get("username"), "user.username")
        if not username:
            raise RecordError("user: nested user without a username")
        get = value.get
        return {
            "username": username,
            "user_id": parse_int(get("id"), "user.id", limit=INT64),
            "display_name": parse_text(get("display_name"), "user.display_name"),
            "first_name": parse_text(get("first_name"), "user.first_name"),
            "last_name": parse_text(get("last_name"), "user.last_name"),
        }
    if isinstance(value, str) and value:  # (a number here could be an id: DRF's default for a relation)
        return {
            "username": value,
            "user_id": None,
            "display_name": None,
            "first_name": None,
            "last_name": None,
        }
    raise RecordError(f"user: expected a username or a user object, got {value!r}")


def _attempt_fields(correct: str, incorrect: str) -> Fields:
    """The columns an attempt payload fills alike in either API: all but its id, exam,
    user, ranks, links, raw and source. `correct` and `incorrect` name the answer counts
    (v2.1 `correct_count`, the admin rows' `correct_answers_count`). v2.2+ attempts carry
    speed and accuracy; result and the last answer's time are the admin API's, read from
    a student payload too should a server send them."""
    return (
        ("date", parse_timestamp, "date"),
        ("last_started_time", parse_timestamp, "last_started_time"),
        ("total_questions", parse_count, "total_questions"),
        ("correct_count", parse_count, correct),
        ("incorrect_count", parse_count, incorrect),
        ("unanswered_count", parse_count, "unanswered_count"),
        ("score", parse_decimal, "score"),
        ("percentage", parse_decimal, "percentage"),
        ("percentile", parse_decimal, "percentile"),
        ("time_taken_seconds", parse_timedelta_seconds, "time_taken"),
        ("remaining_time_seconds", parse_timedelta_seconds, "remaining_time"),
        ("state", parse_text, "state"),
        ("url", parse_text, "url"),
        ("result", parse_text, "result"),
        ("speed", parse_int, "speed"),
        ("accuracy", parse_int, "accuracy"),
        ("last_answer_updated_time", parse_timestamp, "last_answer_updated_time"),
    )


STUDENT_ATTEMPT_FIELDS = _attempt_fields("correct_count", "incorrect_count")
ADMIN_ATTEMPT_FIELDS = _attempt_fields("correct_answers_count", "incorrect_answers_count")


def attempt_row(payload: Payload, exam_id: int) -> tuple[AttemptRow, UserRow]:
    """One attempt of an exam to its `attempts` row and the `users` row of its user."""
    attempt_id = require_id(payload, "attempt")
    user = user_of(payload.get("user"))
    get = payload.get
    row = {
        "id": attempt_id,
        "exam_id": exam_id,
        "username": user["username"],
        "user_id": user["user_id"],
        **parse_fields(payload, STUDENT_ATTEMPT_FIELDS),
        "rank": parse_rank(get("rank"), "rank"),
        "max_rank": parse_rank(get("max_rank"), "max_rank"),
        "review_url": parse_text(get("review_url"), "review_url"),
        "questions_url": parse_text(get("questions_url"), "questions_url"),
        "raw": payload,
        "source": "student",
    }
    return cast(AttemptRow, row), user
