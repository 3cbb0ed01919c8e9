"""The simulator's v2.5 admin API: exams, attempts, users and batches of the whole institute.

Shapes and formats follow the public docs (the project's API notes, "Admin API (v2.5)"):
    GET /api/v2.5/admin/exams/                 200 a page; ordering, start_date, end_date, status
    GET /api/v2.5/admin/exams/<id>/
    GET /api/v2.5/admin/attempts/              200 a page, flat rows; exams, users, state
                                               (numeric), date_0, date_1, ordering
    GET /api/v2.5/admin/attempts/<id>/         the row plus sections, subjects, difficulty
    GET /api/v2.5/admin/users/                 20 a page; q
    GET /api/v2.5/admin/users/<id>/
    GET /api/v2.5/admin/users/<id>/batches/    20 a page
    GET /api/v2.5/admin/batches/               20 a page; search
    GET /api/v2.5/admin/batches/<id>/

Where the docs leave a behaviour open, it is done the way Django REST Framework and
django-filter do it, since Testpress is built on them:
- Dates given as `YYYY-MM-DD` mean midnight, and datetimes without an offset are read, in
  the server's zone, India time. `date_0` keeps attempts started at or after it, `date_1`
  those started at or before it (so `date_1=2024-03-05` stops at 5 March 00:00 IST).
  The exams' `start_date` keeps those starting at or after it, `end_date` those ending
  at or before it (never those without an end); `status` is judged at `Dataset.clock()`.
- Ordering terms can be comma-separated; unknown ones are ignored. Ties keep id order.
- A filter value of the wrong type answers 400 with the field's errors; a well-formed
  id that matches nothing gives an empty page.
Exams, attempts and users are served in id order unless ordered otherwise, so a walk is
stable; batches newest first, as the docs' example lists them.

The routes sit behind the app's middlewares: faults, accounting and authentication apply
as on v2.1, and a student token gets 403 here (app.authentication).

Each row's JSON and each filtered listing are kept between requests and served again
while the data they came from is unchanged (cache.py, AdminCache): a page of 200 attempts
costs a fraction of a millisecond once its rows were rendered. What is served is byte for
byte what rendering afresh gives, whether the data changed by the change route or by hand.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from aiohttp import web

from sync.simulator.app import (
    CHANGES_KEY,
    DATASET_KEY,
    INVALID_PAGE,
    STATE_KEY,
    Change,
    base_url,
    json_body_response,
    json_response,
    paginate_serialized,
)
from sync.simulator.cache import Fingerprint, Listings, RowCache
from sync.simulator.data import (
    Breakdown,
    Counts,
    Dataset,
    SimAttempt,
    SimBatch,
    SimExam,
    SimUser,
    exam_end,
    exam_start,
    ist_micro_text,
    utc_micro_text,
)

ADMIN = "/api/v2.5/admin"
INDIA = timezone(timedelta(hours=5, minutes=30))
NOT_FOUND = {"detail": "Not found."}
STATE_CODES = {0: "Running", 1: "Completed", 3: "Not Started"}  # the `state` filter's numbers
T = TypeVar("T")


class BadFilter(Exception):
    """A query parameter of the wrong form: 400 with `{name: [message]}`, as DRF answers."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.body = {name: [message]}


# --- wire formats ------------------------------------------------------------------------


def _utc_seconds(moment: datetime) -> str:
    """`2021-04-13T11:45:12Z`, as the admin exams write start_date and end_date."""
    return moment.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def _display_name(user: SimUser) -> str:
    return f"{user.first_name} {user.last_name}".strip()


def exam_row(dataset: Dataset, exam: SimExam, base: str) -> dict[str, Any]:
    """An admin exam row: the documented fields (in the docs' order) plus `id`; no slug."""
    shown = dataset.exam_payload(exam, base)  # the same exam as v2.1 shows: same figures
    settings = dataset.settings(exam)
    end = exam_end(exam)
    marks = shown.get("total_marks") or (
        f"{shown['number_of_questions'] * Decimal(shown['mark_per_question']):.2f}"
    )
    return {
        "id": exam.id,
        "created": utc_micro_text(exam.created),
        "description": shown["description"],
        "duration": shown["duration"],
        "enable_ranks": shown["enable_ranks"],
        "end_date": None if end is None else _utc_seconds(end),
        "mark_per_question": shown["mark_per_question"],
        "modified": utc_micro_text(exam.modified or settings.modified),
        "negative_marks": shown["negative_marks"],
        "number_of_questions": shown["number_of_questions"],
        "pass_percentage": settings.pass_percentage,
        "published": settings.published,
        "start_date": _utc_seconds(exam_start(exam)),
        "title": exam.title,
        "show_score": settings.show_score,
        "show_percentile": settings.show_percentile,
        "show_pass_or_fail": settings.show_pass_or_fail,
        "total_marks": marks,
    }


def exam_fingerprint(dataset: Dataset, exam: SimExam) -> Fingerprint:
    """Everything exam_row reads: the exam's fields (its v2.1 payload is drawn from its id,
    its created and extra_fields) and its settings."""
    return (exam, *vars(exam).values(), dataset.settings(exam))


def attempt_row(
    dataset: Dataset,
    exam: SimExam,
    attempt: SimAttempt,
    base: str,
    moment: Callable[[datetime], str] = utc_micro_text,
) -> dict[str, Any]:
    """A flat admin attempt row. `moment` writes its datetimes: UTC `Z` in the listing,
    India time in the detail, as the docs' two examples do."""
    scores = dataset.scores(attempt)
    user = attempt.user
    profile = dataset.profile(user)
    percentage = round(100 * scores.correct / scores.total)
    started = attempt.state != "Not Started"
    answered = dataset.last_answer_at(attempt)
    return {
        "id": attempt.id,
        "date": moment(attempt.started),
        "exam_id": exam.id,
        "user_id": user.id,
        "email": profile.email,
        "name": _display_name(user) or None,
        "phone": profile.phone,
        "correct_answers_count": scores.correct,
        "incorrect_answers_count": scores.incorrect,
        "unanswered_count": scores.total - scores.correct - scores.incorrect,
        "score": f"{Decimal(scores.score):.2f}",  # v2.1 serves a fresh attempt's as int 0
        "percentage": percentage,
        "time_taken": scores.time_taken if started else "0:00:00",
        # No remaining time before the start, nor for an exam without a time limit.
        "remaining_time": scores.remaining_time if started and attempt.id % 13 else None,
        "result": _result(dataset, exam, attempt, percentage),
        "state": attempt.state,
        "last_started_time": moment(attempt.started + timedelta(minutes=1)) if started else None,
        "last_answer_updated_time": None if answered is None else moment(answered),
        "speed": dataset.speed(attempt),
        "exam_url": f"{base}{ADMIN}/exams/{exam.id}/",
        "user_url": f"{base}{ADMIN}/users/{user.id}/",
    }


def attempt_fingerprint(dataset: Dataset, pair: tuple[SimExam, SimAttempt]) -> Fingerprint:
    """Everything attempt_row reads. The figures drawn from the attempt's id and state
    (scores, speed, the last answer's time) follow from these; so does the settings' pass
    mark. Kept short on purpose: W2 keeps 150,000 of them."""
    exam, attempt = pair
    user = attempt.user
    profile = dataset.profile(user)
    return (
        exam, exam.id, dataset.settings(exam), attempt, attempt.id, attempt.state, attempt.started,
        user, user.id, user.first_name, user.last_name, profile, profile.email, profile.phone,
        dataset.finished_at(attempt),
    )  # fmt: skip


def _result(dataset: Dataset, exam: SimExam, attempt: SimAttempt, percentage: int) -> str:
    if attempt.state != "Completed":
        return "Not taken"
    return "Pass" if percentage >= dataset.settings(exam).pass_percentage else "Fail"


def attempt_detail(dataset: Dataset, exam: SimExam, attempt: SimAttempt, base: str) -> dict[str, Any]:
    """The row in India time, `percentile` after `percentage`, then the breakdowns."""
    detail: dict[str, Any] = {}
    for name, value in attempt_row(dataset, exam, attempt, base, ist_micro_text).items():
        detail[name] = value
        if name == "percentage":
            detail["percentile"] = float(dataset.scores(attempt).percentile)
    breakdown = dataset.breakdown(attempt)
    detail["username"] = attempt.user.username
    detail["sections"] = _sections(attempt, breakdown)
    detail["subject_stats"] = [
        {
            "subject_id": subject.subject_id,
            "subject_name": subject.name,
            "total_count": subject.counts.total,
            "correct_answers_count": subject.counts.correct,
            "unanswered_count": subject.counts.unanswered,
            "incorrect_answers_count": subject.counts.incorrect,
            "parent_subject_id": subject.parent_id,
            "is_leaf": subject.is_leaf,
            "score": subject.counts.score,
            "partial_correct_answers_count": subject.counts.partial,
        }
        for subject in breakdown.subjects
    ]
    detail["difficulty_level_stats"] = {level: _level(counts) for level, counts in breakdown.levels.items()}
    detail["institute_attempt_id"] = None if attempt.id % 4 else 7_000_000 + attempt.id
    return detail


def _sections(attempt: SimAttempt, breakdown: Breakdown) -> list[dict[str, Any]]:
    return [
        {
            "id": attempt.id * 10 + section.order,  # the section attempt's own id
            "order": section.order,
            "section_id": section.section_id,
            "time_taken": str(section.time_taken),
            "correct_answers_count": section.counts.correct,
            "incorrect_answers_count": section.counts.incorrect,
            "unanswered_count": section.counts.unanswered,
            "score": section.counts.score,
        }
        for section in breakdown.sections
    ]


def _level(counts: Counts) -> dict[str, int]:
    return {
        "correct_answers_count": counts.correct,
        "incorrect_answers_count": counts.incorrect,
        "partial_correct_answers_count": counts.partial,
        "unanswered_count": counts.unanswered,
        "total_count": counts.total,
    }


def user_row(dataset: Dataset, user: SimUser, base: str) -> dict[str, Any]:
    profile = dataset.profile(user)
    return {
        "id": user.id,
        "url": f"{base}{ADMIN}/users/{user.id}/",
        "username": user.username,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "display_name": _display_name(user),
        "email": profile.email,
        "photo": profile.photo,
        "birth_date": None if profile.birth_date is None else profile.birth_date.strftime("%d/%m/%Y"),
        "address1": profile.address1,
        "address2": profile.address2,
        "city": profile.city,
        "zip": profile.zip,
        "state": profile.state,
        "state_code": profile.state_code,
        "phone": profile.phone,
        "batches_url": f"{base}{ADMIN}/users/{user.id}/batches/",
        "custom_fields": profile.custom_fields,
    }


def user_fingerprint(dataset: Dataset, user: SimUser) -> Fingerprint:
    """Everything user_row reads: every field of the user and of its profile."""
    profile = dataset.profile(user)
    return (user, *vars(user).values(), profile, *vars(profile).values())


def batch_row(batch: SimBatch, base: str, *, detail: bool = False) -> dict[str, Any]:
    """A listing row (`id`, `name`, `url`, `is_local`); the detail adds the timestamps."""
    row: dict[str, Any] = {"id": batch.id, "name": batch.name, "url": f"{base}{ADMIN}/batches/{batch.id}/"}
    if detail:
        row["created"] = utc_micro_text(batch.created)
        row["modified"] = utc_micro_text(batch.modified)
    row["is_local"] = None
    return row


def membership_row(batch: SimBatch, base: str) -> dict[str, Any]:
    """A row of a user's batches: the fields the docs list for it."""
    return {"id": batch.id, "name": batch.name, "url": f"{base}{ADMIN}/batches/{batch.id}/"}


def batch_fingerprint(batch: SimBatch) -> Fingerprint:
    """Everything a listing's batch_row or a membership_row reads."""
    return (batch, batch.id, batch.name)


# --- rendered rows and listings, kept between requests (cache.py) -------------------------


@dataclass
class AdminCache:
    """The admin routes' rows as JSON, by kind, and their filtered listings, for one data
    set. Details are not kept: a sync reads each attempt's detail once, and v2.1 is not
    served from here at all."""

    dataset: Dataset
    attempts: RowCache[tuple[SimExam, SimAttempt]]
    exams: RowCache[SimExam]
    users: RowCache[SimUser]
    batches: RowCache[SimBatch]
    memberships: RowCache[SimBatch]
    listings: Listings
    users_seen: list[SimUser] = field(default_factory=list)  # see users_token

    @classmethod
    def of(cls, dataset: Dataset) -> AdminCache:
        edits = dataset.edits
        return cls(
            dataset=dataset,
            attempts=RowCache(
                edits,
                lambda pair: pair[1].id,
                lambda pair: attempt_fingerprint(dataset, pair),
                lambda pair, base: attempt_row(dataset, *pair, base),
            ),
            exams=RowCache(
                edits,
                lambda exam: exam.id,
                lambda exam: exam_fingerprint(dataset, exam),
                lambda exam, base: exam_row(dataset, exam, base),
            ),
            users=RowCache(
                edits,
                lambda user: user.id,
                lambda user: user_fingerprint(dataset, user),
                lambda user, base: user_row(dataset, user, base),
            ),
            batches=RowCache(edits, lambda batch: batch.id, batch_fingerprint, batch_row),
            memberships=RowCache(edits, lambda batch: batch.id, batch_fingerprint, membership_row),
            listings=Listings(edits),
        )

    def users_token(self) -> list[SimUser]:
        """The data set's users list as last seen, the same object while it holds the same
        users: a token for `listings` (the attempts index does not cover the users, and no
        method changes them; this sees a list changed by hand too, and adopts the users
        put in it). Compared by identity, in a C loop: microseconds for thousands."""
        users = self.dataset.users
        seen = self.users_seen
        if len(seen) != len(users) or not all(map(operator.is_, seen, users)):
            self.dataset.edits.adopt_all(users)
            self.users_seen = seen = list(users)
        return seen

    def warm(self, base: str) -> None:
        """Renders every row the admin listings serve (attempts, exams, users, batches and
        each user's batches) for `base`, drawing what they show: a first walk then costs
        what a repeat does. For W2's 150,000 attempts, ~3.5 s and ~160 MB (what the first
        walk would have cost and kept anyway); tests' small simulators skip it."""
        dataset = self.dataset
        self.attempts.bodies(dataset.attempts_by_id(), base)
        self.exams.bodies(dataset.exams, base)
        self.users.bodies(dataset.users, base)
        self.batches.bodies(dataset.batches, base)
        for user in dataset.users:
            self.memberships.bodies(dataset.memberships(user), base)


ADMIN_CACHE_KEY = web.AppKey("admin_cache", AdminCache)


def _cache(request: web.Request) -> AdminCache:
    return request.app[ADMIN_CACHE_KEY]


def _listing_query(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The query but its page: what a listing's filters and ordering are read from, and
    the key it is kept under."""
    return tuple((name, value) for name, value in request.query.items() if name != "page")


# --- query parameters ----------------------------------------------------------------------


def _ints(request: web.Request, name: str) -> set[int] | None:
    """The ids a repeatable id filter (`exams=3&exams=4`) asks for; None when absent."""
    values = request.query.getall(name, [])
    if not values:
        return None
    try:
        return {int(value) for value in values}
    except ValueError:
        raise BadFilter(name, "Enter a whole number.") from None


def _moment(request: web.Request, name: str, field: str) -> datetime | None:
    """A date or datetime filter value as an aware datetime, or None when absent."""
    text = request.query.get(name, "")
    if not text:
        return None
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), INDIA)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(field, "Enter a valid date/time.") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=INDIA)


def _ordered(request: web.Request, items: list[T], keys: dict[str, Callable[[T], Any]]) -> list[T]:
    """`items` (in id order) sorted by the `ordering` terms that are known, last term
    first, so earlier terms win and ties stay in id order (each sort is stable)."""
    terms = [term.strip() for term in request.query.get("ordering", "").split(",")]
    known = [term for term in terms if term.removeprefix("-") in keys]
    for term in reversed(known):
        items = sorted(items, key=keys[term.removeprefix("-")], reverse=term.startswith("-"))
    return items


def _page(request: web.Request, items: Sequence[T], kind: str, rows: RowCache[T]) -> web.Response:
    """One page of `items`, each row from `rows` (kept JSON, rendered when missing or stale)."""
    per_page = request.app[STATE_KEY].admin_per_page[kind]
    base = base_url(request)

    def bodies(page: Sequence[T]) -> list[bytes]:
        served = _exam_bodies(request, rows.bodies(page, base)) if kind == "exams" else rows.bodies(page, base)
        state = request.app[STATE_KEY]
        if replaced := state.replaced_fields.get(kind):
            served = [_replaced(body, replaced) for body in served]
        if bad := state.unidentifiable.get(kind):
            served = [_unidentifiable(body, bad) for body in served]
        return served

    body = paginate_serialized(request, items, per_page, bodies, page_last=True)
    return json_body_response(body) if body is not None else json_response(INVALID_PAGE, 404)


def _replaced(body: bytes, replaced: dict[int, dict[str, Any]]) -> bytes:
    row = orjson.loads(body)
    fields = replaced.get(row.get("id"))
    return orjson.dumps({**row, **fields}) if fields else body


def _unidentifiable(body: bytes, bad: set[int]) -> bytes:
    row = orjson.loads(body)
    return orjson.dumps({**row, "id": f"id-{row['id']}"}) if row.get("id") in bad else body


def _exam_bodies(request: web.Request, bodies: list[bytes]) -> list[bytes]:
    """Exam rows as served: without their id when the state says so (as documented)."""
    if request.app[STATE_KEY].admin_exam_ids:
        return bodies
    return [orjson.dumps({k: v for k, v in orjson.loads(body).items() if k != "id"}) for body in bodies]


def _path_id(request: web.Request, name: str) -> int | None:
    try:
        return int(request.match_info[name])
    except ValueError:
        return None


# --- exams -----------------------------------------------------------------------------------


async def exam_list(request: web.Request) -> web.Response:
    dataset = request.app[DATASET_KEY]
    try:
        exams = _listed_exams(request, dataset)
    except BadFilter as bad:
        return json_response(bad.body, 400)
    if unlisted := request.app[STATE_KEY].unlisted_exams:
        exams = [exam for exam in exams if exam.id not in unlisted]
    return _page(request, exams, "exams", _cache(request).exams)


def _listed_exams(request: web.Request, dataset: Dataset) -> Sequence[SimExam]:
    cache = _cache(request)
    cache.exams.prune(len(dataset.exams), lambda: {exam.id for exam in dataset.exams})
    if request.query.get("status"):  # judged at the clock's now: not kept
        return _filtered_exams(request, dataset)
    # The attempts index is rebuilt whenever the exams list changes: it stands for it.
    token = dataset.attempts_by_id()
    key = ("exams", _listing_query(request))
    return cache.listings.get(key, token, lambda: _filtered_exams(request, dataset))


def _filtered_exams(request: web.Request, dataset: Dataset) -> list[SimExam]:
    exams = sorted(dataset.exams, key=lambda exam: exam.id)
    after = _moment(request, "start_date", "start_date")
    before = _moment(request, "end_date", "end_date")
    if after is not None:
        exams = [exam for exam in exams if exam_start(exam) >= after]
    if before is not None:
        exams = [exam for exam in exams if (end := exam_end(exam)) is not None and end <= before]
    status = request.query.get("status")
    if status:
        if status not in ("running", "upcoming", "completed"):
            raise BadFilter("status", f"Select a valid choice. {status} is not one of the available choices.")
        now = dataset.clock()
        exams = [exam for exam in exams if _status(exam, now) == status]
    far = datetime.max.replace(tzinfo=UTC)  # PostgreSQL sorts NULL after every date
    return _ordered(
        request,
        exams,
        {"start_date": exam_start, "end_date": lambda exam: exam_end(exam) or far},
    )


def _status(exam: SimExam, now: datetime) -> str:
    end = exam_end(exam)
    if exam_start(exam) > now:
        return "upcoming"
    return "running" if end is None or end > now else "completed"


async def exam_detail(request: web.Request) -> web.Response:
    dataset = request.app[DATASET_KEY]
    exam_id = _path_id(request, "exam_id")
    try:
        exam = dataset.exam(exam_id if exam_id is not None else -1)
    except KeyError:
        return json_response(NOT_FOUND, 404)
    if exam.id in request.app[DETAIL_FAULTS_KEY].failing_exams:
        return json_response({"detail": "A server error occurred."}, 500)
    return json_body_response(_exam_bodies(request, [_cache(request).exams.body(exam, base_url(request))])[0])


# --- attempts ---------------------------------------------------------------------------------


async def attempt_list(request: web.Request) -> web.Response:
    dataset = request.app[DATASET_KEY]
    try:
        pairs = _listed_attempts(request, dataset)
    except BadFilter as bad:
        return json_response(bad.body, 400)
    return _page(request, pairs, "attempts", _cache(request).attempts)


def _listed_attempts(request: web.Request, dataset: Dataset) -> Sequence[tuple[SimExam, SimAttempt]]:
    index = dataset.attempts_by_id()
    cache = _cache(request)
    cache.attempts.prune(len(index), lambda: {attempt.id for _, attempt in index})
    query = _listing_query(request)
    if not query:  # the full walk: the index is the listing, in id order
        return index
    return cache.listings.get(("attempts", query), index, lambda: _filtered_attempts(request, dataset, index))


def _filtered_attempts(
    request: web.Request, dataset: Dataset, index: list[tuple[SimExam, SimAttempt]]
) -> list[tuple[SimExam, SimAttempt]]:
    pairs = index
    if (exam_ids := _ints(request, "exams")) is not None:
        pairs = _attempts_of(dataset, exam_ids)
    if (user_ids := _ints(request, "users")) is not None:
        pairs = [pair for pair in pairs if pair[1].user.id in user_ids]
    state = request.query.get("state")
    if state:
        try:
            wanted = STATE_CODES.get(int(state))  # the filter is numeric; rows say the name
        except ValueError:
            raise BadFilter("state", "Enter a number.") from None
        pairs = [pair for pair in pairs if pair[1].state == wanted]
    since = _moment(request, "date_0", "date")
    until = _moment(request, "date_1", "date")
    if since is not None:
        pairs = [pair for pair in pairs if pair[1].started >= since]
    if until is not None:
        pairs = [pair for pair in pairs if pair[1].started <= until]

    def count(name: str) -> Callable[[tuple[SimExam, SimAttempt]], int]:
        return lambda pair: attempt_counts(dataset, pair[1])[name]

    keys: dict[str, Callable[[tuple[SimExam, SimAttempt]], Any]] = {
        "date": lambda pair: pair[1].started,
        "correct_answers_count": count("correct_answers_count"),
        "incorrect_answers_count": count("incorrect_answers_count"),
        "unanswered_count": count("unanswered_count"),
    }
    return _ordered(request, list(pairs), keys)


def _attempts_of(dataset: Dataset, exam_ids: set[int]) -> list[tuple[SimExam, SimAttempt]]:
    """The index's pairs of these exams, in its order, without going through all 150,000:
    gathered exam by exam as the index is, then sorted by id as stably, so ties (none are
    expected) fall as they do in the index."""
    pairs = [(exam, attempt) for exam in dataset.exams if exam.id in exam_ids for attempt in exam.attempts]
    pairs.sort(key=lambda pair: pair[1].id)
    return pairs


def attempt_counts(dataset: Dataset, attempt: SimAttempt) -> dict[str, int]:
    scores = dataset.scores(attempt)
    return {
        "correct_answers_count": scores.correct,
        "incorrect_answers_count": scores.incorrect,
        "unanswered_count": scores.total - scores.correct - scores.incorrect,
    }


@dataclass
class DetailFaults:
    """Details that go wrong every time they are asked for, for tests to set: attempts
    `failing` answer 500; `malformed` carry a subject without a name; exams
    `failing_exams` answer 500."""

    failing: set[int] = field(default_factory=set)
    malformed: set[int] = field(default_factory=set)
    failing_exams: set[int] = field(default_factory=set)


DETAIL_FAULTS_KEY = web.AppKey("detail_faults", DetailFaults)


async def attempt_detail_view(request: web.Request) -> web.Response:
    dataset = request.app[DATASET_KEY]
    attempt_id = _path_id(request, "attempt_id")
    try:
        exam, attempt = dataset.find_attempt(attempt_id if attempt_id is not None else -1)
    except KeyError:
        return json_response(NOT_FOUND, 404)
    faults = request.app[DETAIL_FAULTS_KEY]
    if attempt.id in faults.failing:
        return json_response({"detail": "A server error occurred."}, 500)
    detail = attempt_detail(dataset, exam, attempt, base_url(request))
    if attempt.id in faults.malformed:
        detail["subject_stats"].append({"subject_id": 99, "subject_name": None, "total_count": 1})
    return json_response(detail)


# --- users and batches --------------------------------------------------------------------------


async def user_list(request: web.Request) -> web.Response:
    dataset, state = request.app[DATASET_KEY], request.app[STATE_KEY]
    if state.users_deleted_mid_walk and request.query.get("page", "1") != "1":
        doomed, state.users_deleted_mid_walk = state.users_deleted_mid_walk, set()
        dataset.users[:] = [user for user in dataset.users if user.id not in doomed]
    cache = _cache(request)
    token = cache.users_token()
    cache.users.prune(len(token), lambda: {user.id for user in token})
    key = ("users", _listing_query(request))
    users = cache.listings.get(key, token, lambda: _filtered_users(request, dataset))
    if repeated := state.repeated_users:
        users = [*users, *(user for user in users if user.id in repeated)]
    return _page(request, users, "users", cache.users)


def _filtered_users(request: web.Request, dataset: Dataset) -> list[SimUser]:
    users = sorted(dataset.users, key=lambda user: user.id)
    if needle := request.query.get("q", "").strip().lower():
        users = [
            user
            for user in users
            if needle in user.username.lower() or needle in (dataset.profile(user).email or "").lower()
        ]
    return users


def _user_or_none(request: web.Request) -> SimUser | None:
    user_id = _path_id(request, "user_id")
    try:
        return None if user_id is None else request.app[DATASET_KEY].user(user_id)
    except KeyError:
        return None


async def user_detail(request: web.Request) -> web.Response:
    user = _user_or_none(request)
    if user is None:
        return json_response(NOT_FOUND, 404)
    return json_body_response(_cache(request).users.body(user, base_url(request)))


async def user_batches(request: web.Request) -> web.Response:
    user = _user_or_none(request)
    if user is None:
        return json_response(NOT_FOUND, 404)
    memberships = request.app[DATASET_KEY].memberships(user)
    return _page(request, memberships, "batches", _cache(request).memberships)


async def batch_list(request: web.Request) -> web.Response:
    # Newest first, as the docs' example lists them.
    batches = sorted(request.app[DATASET_KEY].batches, key=lambda batch: -batch.id)
    if needle := request.query.get("search", "").strip().lower():
        batches = [batch for batch in batches if needle in batch.name.lower()]
    return _page(request, batches, "batches", _cache(request).batches)


async def batch_detail(request: web.Request) -> web.Response:
    batch_id = _path_id(request, "batch_id")
    try:
        batch = request.app[DATASET_KEY].batch(batch_id if batch_id is not None else -1)
    except KeyError:
        return json_response(NOT_FOUND, 404)
    return json_response(batch_row(batch, base_url(request), detail=True))


# --- changes (POST /_simulator/change) ------------------------------------------------------------


def _required(change: dict[str, Any], name: str) -> Any:
    if name not in change:
        raise ValueError(f"{change.get('action')} needs {name!r}")
    return change[name]


def _create_attempts(dataset: Dataset, change: dict[str, Any]) -> dict[str, Any]:
    """{"exam_id": 3, "user_ids": [1000, 1001], "state": "Running"}: attempts started now."""
    exam = dataset.exam(int(_required(change, "exam_id")))
    users = [dataset.user(int(user_id)) for user_id in _required(change, "user_ids")]
    added = dataset.start_attempts(exam, users, state=str(change.get("state", "Running")))
    return {"added": [attempt.id for attempt in added]}


def _complete_attempts(dataset: Dataset, change: dict[str, Any]) -> dict[str, Any]:
    """{"attempt_ids": [...]}, or every Running attempt without it: Running → Completed."""
    ids = change.get("attempt_ids")
    if ids is None:
        ids = [attempt.id for _, attempt in dataset.attempts_by_id() if attempt.state == "Running"]
    return {"completed": dataset.complete_attempts([int(attempt_id) for attempt_id in ids])}


def _update_user(dataset: Dataset, change: dict[str, Any]) -> dict[str, Any]:
    """{"user_id": 1000, "fields": {"email": null, "city": "Pune", "first_name": "Asha"}}"""
    dataset.update_user(int(_required(change, "user_id")), dict(_required(change, "fields")))
    return {"ok": True}


def _membership(join: bool) -> Change:
    def apply(dataset: Dataset, change: dict[str, Any]) -> dict[str, Any]:
        """{"user_id": 1000, "batch_id": 4}"""
        user_id, batch_id = int(_required(change, "user_id")), int(_required(change, "batch_id"))
        move = dataset.add_membership if join else dataset.remove_membership
        return {"changed": move(user_id, batch_id)}

    return apply


def _delete_attempt(dataset: Dataset, change: dict[str, Any]) -> dict[str, Any]:
    """{"attempt_id": 300012}"""
    attempt_id = int(_required(change, "attempt_id"))
    if not dataset.delete_attempt(attempt_id):
        raise KeyError(attempt_id)
    return {"ok": True}


CHANGES: dict[str, Change] = {
    "create_attempts": _create_attempts,
    "complete_attempts": _complete_attempts,
    "update_user": _update_user,
    "add_membership": _membership(join=True),
    "remove_membership": _membership(join=False),
    "delete_attempt": _delete_attempt,
}


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get(f"{ADMIN}/exams/", exam_list)
    app.router.add_get(f"{ADMIN}/exams/{{exam_id}}/", exam_detail)
    app.router.add_get(f"{ADMIN}/attempts/", attempt_list)
    app.router.add_get(f"{ADMIN}/attempts/{{attempt_id}}/", attempt_detail_view)
    app.router.add_get(f"{ADMIN}/users/", user_list)
    app.router.add_get(f"{ADMIN}/users/{{user_id}}/", user_detail)
    app.router.add_get(f"{ADMIN}/users/{{user_id}}/batches/", user_batches)
    app.router.add_get(f"{ADMIN}/batches/", batch_list)
    app.router.add_get(f"{ADMIN}/batches/{{batch_id}}/", batch_detail)
    app[CHANGES_KEY] = CHANGES
    app[DETAIL_FAULTS_KEY] = DetailFaults()
    app[ADMIN_CACHE_KEY] = AdminCache.of(app[DATASET_KEY])  # the data set is set before the routes
