"""The admin API's payloads (v2.5) to rows, and the personal-data policy: pure functions.

The value parsers are sync.model.normalize's; what is here is each admin row's shape:
flat attempts (`*_answers_count`, an integer `percentage`, `exam_id` and `user_id`
instead of nested objects), exams without a slug, users with `DD/MM/YYYY` birth dates
and custom fields, batches and memberships.

A user's field that will not parse (a birth date of 31/02/2001) does not cost the row:
the field is stored null and the problem is returned beside the row, for sync_errors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import cached_property
from typing import Any, TypeVar

import orjson

from sync.errors import RecordError
from sync.model.batches import Payload
from sync.model.normalize import (
    ADMIN_ATTEMPT_FIELDS,
    INT64,
    exam_fields,
    parse_bool,
    parse_count,
    parse_decimal,
    parse_fields,
    parse_int,
    parse_leniently,
    parse_text,
    parse_timedelta_seconds,
    parse_timestamp,
    parse_username,
    require_id,
    rules_digest,
)

Row = dict[str, Any]

# Keys of personal data in an admin user's payload.
PERSONAL_KEYS = frozenset({
    "email", "phone", "birth_date", "city", "state", "state_code", "address1", "address2", "zip",
    "custom_fields",
})  # fmt: skip
# ... and in an admin attempt's, whose `state` is the attempt's (Running, Completed), not
# where its student lives.
ATTEMPT_PERSONAL_KEYS = frozenset({"email", "phone"})


# A mode's revision, part of its fingerprint: bumped when what the mode stores changes, so
# that the rows it wrote are written again (by the next full walk, which a change of rules
# starts by itself). drop 2: an empty value is stored null too.
_MODE_REVISIONS = {"keep": "", "hash": "", "drop": "2"}


@dataclass(frozen=True)
class PiiPolicy:
    """What happens to personal data: kept, replaced by a salted SHA-256 (so the same
    e-mail still joins across tables), or dropped (null)."""

    mode: str = "keep"  # keep, hash, drop
    salt: str = ""

    @property
    def fingerprint(self) -> bytes:
        """Part of every affected row's digest: a new policy or salt rewrites the rows."""
        if self.mode == "keep":
            return b""
        salt = hashlib.sha256(self.salt.encode()).hexdigest()[:16] if self.mode == "hash" else ""
        return f"pii={self.mode}{_MODE_REVISIONS[self.mode]}:{salt}".encode()

    @cached_property
    def rules(self) -> str:
        """What rows are written by under this policy, as sync_state keeps it (one-way)."""
        return rules_digest(self.fingerprint)

    def value(self, value: Any) -> Any:
        if self.mode == "keep":
            return value
        if self.mode == "drop":
            return None  # an empty string too: a dropped field is null, whatever it held
        if value is None or value == "":
            return value
        text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        return hashlib.sha256(f"{self.salt}:{text}".encode()).hexdigest()

    def payload(self, payload: Payload, keys: frozenset[str] = PERSONAL_KEYS) -> Payload:
        """`payload` with its personal `keys` treated; the same object when nothing changes."""
        if self.mode == "keep" or not keys.intersection(payload):
            return payload
        return {key: self.value(item) if key in keys else item for key, item in payload.items()}


# --- ids -----------------------------------------------------------------------------------

_ID_IN_URL = re.compile(r"/(\d+)/?$")


def id_from_row_or_url(payload: Any, what: str) -> int:
    """The item's id; failing that, the last number of its `url` (the documented admin
    exam row shows no id, but every exam_url ends in one)."""
    if isinstance(payload, dict) and payload.get("id") is None and isinstance(payload.get("url"), str):
        match = _ID_IN_URL.search(payload["url"])
        if match:
            return parse_int(match[1], f"{what}.url", limit=INT64) or 0
    return require_id(payload, what)


# --- rows ----------------------------------------------------------------------------------


def shows_no_id(payload: Any) -> bool:
    """Whether an item shows neither an id nor a url to take one from (the documented
    admin exam row): not a malformed item, one to read by the id others name it by."""
    return isinstance(payload, dict) and payload.get("id") is None and not isinstance(payload.get("url"), str)


def shown_id(payload: Payload, what: str) -> int | None:
    """The id a payload shows, its own or its url's; None when it shows neither (an exam
    read from its detail route, as documented: the writer keys it by the id it was read by)."""
    return None if shows_no_id(payload) else id_from_row_or_url(payload, what)


def admin_exam_row(payload: Payload) -> tuple[Row, list[str]]:
    """An exam of /api/v2.5/admin/exams/ to its `exams` row (no slug, no attempts URL),
    and the fields that would not parse (stored null): only a bad id costs the row."""
    problems: list[str] = []
    row = {
        "id": shown_id(payload, "exam"),
        "slug": parse_leniently(problems, parse_text, payload.get("slug"), "slug") or None,
        **exam_fields(payload, problems),
        "source": "admin",
    }
    return row, problems


def admin_attempt_row(payload: Payload, policy: PiiPolicy) -> tuple[Row, list[str]]:
    """A flat row of /api/v2.5/admin/attempts/ to its `attempts` row, and the fields that
    would not parse (stored null): only a bad id or exam_id costs the row. The student is
    named by `user_id` only (the store fills the username from `users`)."""
    get = payload.get
    exam_id = parse_int(get("exam_id"), "exam_id", limit=INT64)
    if exam_id is None:
        raise RecordError("attempt: missing exam_id")
    problems: list[str] = []
    row = {
        "id": require_id(payload, "attempt"),
        "exam_id": exam_id,
        "username": None,
        "user_id": parse_leniently(problems, _big_int, get("user_id"), "user_id"),
        **parse_fields(payload, ADMIN_ATTEMPT_FIELDS, problems),
        "rank": None,
        "max_rank": None,
        "review_url": None,
        "questions_url": None,
        "raw": policy.payload(payload, ATTEMPT_PERSONAL_KEYS),
        "source": "admin",
    }
    return row, problems


def parse_birth_date(value: Any, field: str = "birth_date") -> date | None:
    """`DD/MM/YYYY` (admin lists) or `YYYY-MM-DD` (/me/) to a date."""
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise RecordError(f"{field}: expected a date like 31/12/2001, got {value!r}")
    text = value.strip()
    try:
        if "/" in text:
            day, month, year = (int(part) for part in text.split("/"))
            return date(year, month, day)
        return date.fromisoformat(text)
    except ValueError:
        raise RecordError(f"{field}: {value!r} is not a date like 31/12/2001") from None


def _personal(problems: list[str], policy: PiiPolicy, parse: Callable[[Any, str], Any], value: Any, field: str) -> Any:
    """A personal field, parsed, then as `policy` says. A problem names the value only
    when the policy keeps such values: its message goes to the log and sync_errors."""
    try:
        return policy.value(parse(value, field))
    except RecordError as problem:
        problems.append(str(problem) if policy.mode == "keep" else f"{field}: would not parse (value withheld: pii = {policy.mode})")
        return None


def admin_user_row(payload: Payload, policy: PiiPolicy) -> tuple[Row, list[str]]:
    """A user of /api/v2.5/admin/users/ to its `users` row, and the fields that would not
    parse (stored null). Personal fields follow `policy`, in the columns and in `raw`."""
    get = payload.get
    problems: list[str] = []
    username = parse_username(get("username"), "username")
    if not username:
        raise RecordError("user: missing username")
    # A date column cannot hold a hash: under "hash" (and "drop") the column is null, and
    # the date is not even parsed (raw has the hash).
    birth_date = _personal(problems, policy, parse_birth_date, get("birth_date"), "birth_date") if policy.mode == "keep" else None
    custom_fields = _personal(problems, policy, _json_object, get("custom_fields"), "custom_fields")
    row: Row = {
        "username": username,
        "user_id": require_id(payload, "user"),
        "display_name": parse_leniently(problems, parse_text, get("display_name"), "display_name"),
        "first_name": parse_leniently(problems, parse_text, get("first_name"), "first_name"),
        "last_name": parse_leniently(problems, parse_text, get("last_name"), "last_name"),
        "email": _personal(problems, policy, parse_text, get("email"), "email"),
        "phone": _personal(problems, policy, parse_text, get("phone"), "phone"),
        "city": _personal(problems, policy, parse_text, get("city"), "city"),
        "state": _personal(problems, policy, parse_text, get("state"), "state"),
        "birth_date": birth_date,
        "custom_fields": custom_fields,
        "created": parse_leniently(problems, parse_timestamp, get("created"), "created"),
        "modified": parse_leniently(problems, parse_timestamp, get("modified"), "modified"),
        "raw": policy.payload(payload),
    }
    return row, problems


def _json_object(value: Any, field: str) -> Any:
    """custom_fields: an object (or a list), kept as JSON."""
    if value is not None and not isinstance(value, (dict, list)):
        raise RecordError(f"{field}: expected an object, got {value!r}")
    return value


def batch_row(payload: Payload) -> Row:
    get = payload.get
    return {
        "id": require_id(payload, "batch"),
        "name": parse_text(get("name"), "name"),
        "created": parse_timestamp(get("created"), "created"),
        "modified": parse_timestamp(get("modified"), "modified"),
        "raw": payload,
    }


# --- attempt details -------------------------------------------------------------------------

# The tables an attempt's details fill, keyed so in its details row; replaced together.
DETAIL_TABLES = ("attempt_sections", "attempt_subjects", "attempt_difficulty")


def attempt_details_row(payload: Payload) -> Row:
    """An admin attempt detail (/api/v2.5/admin/attempts/<id>/) to the rows of its
    breakdowns, by table, and its `percentile` (the listing's rows carry none).

    The detail repeats the listing's row in India time; that part is not read here: the
    attempt's row comes from the listing, whose digest says when the details are stale."""
    attempt_id = require_id(payload, "attempt detail")
    get = payload.get
    return {
        "id": attempt_id,
        "percentile": parse_decimal(get("percentile"), "percentile"),
        "attempt_sections": _sections(attempt_id, get("sections")),
        "attempt_subjects": _subjects(attempt_id, get("subject_stats")),
        "attempt_difficulty": _levels(attempt_id, get("difficulty_level_stats")),
    }


def _objects(value: Any, field: str) -> list[dict[str, Any]]:
    """A list of objects (null: none)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RecordError(f"{field}: expected a list of objects, got {value!r}"[:300])
    return value


_T = TypeVar("_T")


def _read(parse: Callable[[Any, str], _T], item: dict[str, Any], key: str, where: str) -> _T:
    """parse(item[key]), an error named `where.key`. The name is made only for an error: a
    detail holds some hundred values, and naming each one up front cost a fifth of the
    time its normalizing takes."""
    try:
        return parse(item.get(key), key)
    except RecordError as error:  # its message starts with the key
        raise RecordError(f"{where}.{error}") from None


def _big_int(value: Any, field: str) -> int | None:
    return parse_int(value, field, limit=INT64)


def _sections(attempt_id: int, value: Any) -> list[Row]:
    rows, seen = [], set()
    for number, item in enumerate(_objects(value, "sections")):
        where = f"sections[{number}]"
        section_id = _read(_big_int, item, "section_id", where)
        if section_id is None:
            raise RecordError(f"{where}.section_id: missing")
        if section_id in seen:  # the key of attempt_sections: one row per section
            raise RecordError(f"{where}.section_id: {section_id} appears twice")
        seen.add(section_id)
        rows.append({
            "attempt_id": attempt_id,
            "section_id": section_id,
            "section_order": _read(parse_int, item, "order", where),
            "time_taken_seconds": _read(parse_timedelta_seconds, item, "time_taken", where),
            **_answer_counts(item, where),
            "score": _read(parse_decimal, item, "score", where),
        })  # fmt: skip
    return rows


def _subjects(attempt_id: int, value: Any) -> list[Row]:
    rows, seen = [], set()
    for number, item in enumerate(_objects(value, "subject_stats")):
        where = f"subject_stats[{number}]"
        name = _read(parse_text, item, "subject_name", where)
        if name is None:
            raise RecordError(f"{where}.subject_name: missing")
        subject_id = _read(_big_int, item, "subject_id", where)
        # Unique per attempt where the id is known; subjects without an id (the API serves
        # some) may share a name, under different parents, and are all kept.
        if subject_id is not None:
            if (name, subject_id) in seen:
                raise RecordError(f"{where}: subject {name!r} ({subject_id}) appears twice")
            seen.add((name, subject_id))
        rows.append({
            "attempt_id": attempt_id,
            "subject_name": name,
            "subject_id": subject_id,
            "parent_subject_id": _read(_big_int, item, "parent_subject_id", where),
            "is_leaf": _read(parse_bool, item, "is_leaf", where),
            "total_count": _read(parse_count, item, "total_count", where),
            **_answer_counts(item, where, partial=True),
            "score": _read(parse_decimal, item, "score", where),
        })  # fmt: skip
    return rows


def _answer_counts(item: Payload, where: str, *, partial: bool = False) -> Row:
    """The answer counts a section, a subject or a level carries (`partial`: and the
    partially correct ones, which sections lack)."""
    counts = {
        "correct_count": _read(parse_count, item, "correct_answers_count", where),
        "incorrect_count": _read(parse_count, item, "incorrect_answers_count", where),
        "unanswered_count": _read(parse_count, item, "unanswered_count", where),
    }
    if partial:
        counts["partial_correct_count"] = _read(parse_count, item, "partial_correct_answers_count", where)
    return counts


def _levels(attempt_id: int, value: Any) -> list[Row]:
    """`{"easy": {counts}, …}`: a row per level, named by its key."""
    if value is None or value == []:  # an empty object serialized as a list by some servers
        return []
    if not isinstance(value, dict):
        raise RecordError(f"difficulty_level_stats: expected an object, got {value!r}"[:300])
    rows = []
    for level, item in value.items():
        where = f"difficulty_level_stats.{level}"
        if not isinstance(item, dict):
            raise RecordError(f"{where}: expected an object, got {item!r}"[:300])
        rows.append({
            "attempt_id": attempt_id,
            "level": level,
            "total_count": _read(parse_count, item, "total_count", where),
            **_answer_counts(item, where, partial=True),
        })  # fmt: skip
    return rows


def membership_row(payload: Payload, user_id: int) -> Row:
    """One batch of /api/v2.5/admin/users/<id>/batches/ to its `user_batches` row."""
    return {
        "user_id": user_id,
        "batch_id": require_id(payload, "batch"),
        "expires": parse_timestamp(payload.get("expires"), "expires"),
    }
