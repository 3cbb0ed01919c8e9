"""The simulator's data: exams and attempts generated from a seed, and their changes.

Attempts are kept as small records; their payloads are rendered on demand, so a data set
of a hundred thousand attempts stays cheap. Listings are newest first, like Testpress:
a new exam or attempt shifts every later item down by one.

What only the v2.5 admin API shows (users' personal fields, batches and memberships,
attempt breakdowns, exam settings) is drawn lazily, per entity, from random streams of
its own (`_admin_rng`): the stream that draws the v2.1 data (`Dataset._rng`) never sees
them, so v2.1 payloads stay byte for byte those of earlier versions, and a data set of
150,000 attempts costs no more to build than before.

Each data set counts its changes (`Dataset.edits`): each of its methods that changes
anything, and each field set on one of its records, by a method or by hand. The admin
API's caches (cache.py) trust what they rendered while the count stands still.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
IST = timedelta(hours=5, minutes=30)
COURSES = ("IBPS", "SSC", "JEE", "NEET", "UPSC")
TITLES = ("Mock Test", "Quant Drill", "Reasoning", "English Grammar", "सामान्य ज्ञान", "数学 Quiz")
ATTEMPT_STATES = ("Completed", "Running", "Not Started")
LOGIN_REFUSALS = ("parallel_login_restriction", "max_login_exceeded")


@dataclass
class Faults:
    """What goes wrong, as fractions of requests (0.0 to 1.0) and seconds."""

    throttle_rate: float = 0.0  # 429 with Retry-After
    retry_after: int = 0  # the Retry-After header value, seconds
    server_error_rate: float = 0.0  # 500/502/503/504, JSON or an HTML proxy page
    drop_rate: float = 0.0  # the connection closes with no response
    truncate_rate: float = 0.0  # a 200 whose body is cut short
    latency: float = 0.0  # seconds every API request takes to be answered, rendering included
    token_lifetime: float = 3600.0  # seconds a login token stays valid
    listing_inserts: int = 0  # new exams slipped in, one per listing page, during a walk
    listing_deletes: int = 0  # exams removed, one per listing page, during a walk
    # "" (logins succeed) or one of LOGIN_REFUSALS: every login with the right password is
    # then refused with that error_code, as Testpress refuses a second device or a locked
    # account.
    login_refusal: str = ""
    # The same, on every request after a login that succeeded: the session is refused
    # (official clients look for these codes on every answer).
    session_refusal: str = ""
    # 401, as DRF answers by default; 403, as a server answers whose first authentication
    # class sends no WWW-Authenticate header (the API notes, "Access").
    expired_token_status: int = 401

    def update(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if not hasattr(self, name):
                raise ValueError(f"unknown fault {name!r}")
            if name in ("login_refusal", "session_refusal") and value not in ("", *LOGIN_REFUSALS):
                raise ValueError(f"{name} must be one of {LOGIN_REFUSALS} or empty")
            setattr(self, name, type(getattr(self, name))(value))


class EditCount:
    """How many times one data set has changed: each change its methods make (whatever
    they touch, its private memos included), and each field set on one of its records
    (SimExam, SimAttempt, SimUser, SimProfile, SimBatch), whoever sets it: tests set
    `attempt.state` or `profile.email` on the records themselves. The admin API keeps what
    it rendered between requests (cache.py) and trusts it while this count stands still.
    Each data set has its own: an edit to one leaves the others' caches alone.

    A record counts its changes in the data sets that adopted it (`adopt`; one record in
    two data sets counts in both). A data set adopts the records it makes, when it makes
    them, and any other before it serves anything from it: those it finds in its lists
    when it indexes them (exams, their attempts and those attempts' users; its users),
    those a row is rendered from, and a record set on a field of one it adopted
    (`attempt.user = SimUser(...)`). A record no data set adopted counts nowhere."""

    __slots__ = ("value", "_alone")

    def __init__(self) -> None:
        self.value = 0
        self._alone = (self,)  # the `_counts` of a record only this data set adopted: one tuple for all

    def adopt(self, record: object) -> None:
        """From now on, every field set on `record` (if it is a record) counts here too."""
        if not isinstance(record, _Counted):
            return
        counts = record._counts
        if counts is not self._alone and self not in counts:
            object.__setattr__(record, "_counts", (*counts, self) if counts else self._alone)

    def adopt_all(self, records: Iterable[object]) -> None:
        """`adopt` each of them: those not records, or adopted already, cost no call."""
        alone = self._alone
        for record in records:
            if isinstance(record, _Counted) and record._counts is not alone:
                self.adopt(record)


class _Counted:
    """A record whose fields, once it is adopted (EditCount.adopt), count in the edits of
    the data sets that adopted it each time one is set. Fields set while it is made are
    not counted: it is adopted after."""

    __slots__ = ()
    _counts: tuple[EditCount, ...] = ()  # the data sets it counts in: none until adopted

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        for count in self._counts:
            count.value += 1
            count.adopt(value)  # a record set on one: its own fields count too


@dataclass
class SimUser(_Counted):
    id: int
    username: str
    first_name: str
    last_name: str


@dataclass
class SimProfile(_Counted):
    """A user's personal fields: the admin API shows them, v2.1 never does."""

    email: str | None
    phone: str | None
    birth_date: date | None
    photo: str | None
    address1: str
    address2: str
    city: str
    zip: str
    state: str  # a name ("Tamil Nadu") or an ISO 3166-2 code ("IN-TN"), as Testpress stores either
    state_code: str
    custom_fields: dict[str, Any]


USER_FIELDS = ("username", "first_name", "last_name")  # shared with v2.1's nested user
PROFILE_FIELDS = tuple(SimProfile.__dataclass_fields__)


@dataclass
class SimBatch(_Counted):
    id: int
    name: str
    created: datetime
    modified: datetime


@dataclass
class SimAttempt(_Counted):
    id: int
    user: SimUser
    state: str  # Running, Completed, Not Started
    started: datetime
    malformed: bool = False
    # Its timestamps as served, written once: formatting them was a fifth of what serving
    # a page cost, and the benchmark shares the machine with the simulator.
    date_text: str = field(init=False, repr=False)
    last_started_text: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.date_text = _utc_text(self.started, self.id % 3)
        self.last_started_text = _utc_text(self.started + timedelta(minutes=1), self.id % 2)


@dataclass
class SimExam(_Counted):
    id: int
    slug: str
    title: str
    course: str
    created: datetime
    attempts: list[SimAttempt] = field(default_factory=list)  # newest first
    forbidden: bool = False  # attempts answer 403
    vanished: bool = False  # attempts answer 404
    broken_page: int | None = None  # this attempts page always answers 500
    extra_fields: bool = False  # a newer server's fields
    # Attempts ever made, deleted ones included. New attempt ids are numbered from it, so
    # an id is never handed out twice (numbering from len(attempts) did, after a deletion).
    attempts_made: int = 0
    modified: datetime | None = None  # when a change last touched it; else drawn (admin only)


def exam_start(exam: SimExam) -> datetime:
    return exam.created + timedelta(days=1)


def exam_end(exam: SimExam) -> datetime | None:
    return None if exam.id % 5 == 0 else exam_start(exam) + timedelta(days=30)


@dataclass(frozen=True)
class ExamSettings:
    """An exam's admin-only settings, drawn once per exam."""

    published: bool
    pass_percentage: int
    show_score: bool
    show_percentile: bool
    show_pass_or_fail: bool
    modified: datetime  # unless a change set exam.modified


@dataclass(frozen=True)
class Counts:
    """Answers of one attempt, section, subject or difficulty level."""

    correct: int
    incorrect: int
    unanswered: int
    partial: int = 0

    @property
    def total(self) -> int:
        return self.correct + self.incorrect + self.unanswered + self.partial

    @property
    def score(self) -> str:
        # The marking the v2.1 scores use, so the parts add up to the attempt's score.
        return f"{self.correct * 2 - self.incorrect * 0.5:.2f}"


@dataclass(frozen=True)
class SectionFigures:
    order: int
    section_id: int
    counts: Counts
    time_taken: timedelta


@dataclass(frozen=True)
class SubjectFigures:
    subject_id: int | None
    name: str
    parent_id: int | None
    is_leaf: bool
    counts: Counts


@dataclass(frozen=True)
class Breakdown:
    """What an admin attempt detail adds: per section, subject and difficulty level."""

    sections: list[SectionFigures]
    subjects: list[SubjectFigures]
    levels: dict[str, Counts]


class Dataset:
    """Exams (newest first), each with its attempts, generated from `seed`."""

    def __init__(
        self,
        *,
        exams: int = 50,
        attempts_per_exam: int = 30,
        users: int = 200,
        seed: int = 7,
        forbidden_every: int = 0,
        vanished_every: int = 0,
        batches: int = 25,
        open_share: float | None = None,
    ) -> None:
        """`open_share`: the share of seeded attempts left Running or Not Started (half
        each). None keeps the historical 10% + 10%, drawn exactly as before."""
        self.seed = seed
        self._state_weights = _state_weights(open_share)
        self._scores_memo: dict[tuple[int, bool], _Scores] = {}
        self._rng = random.Random(seed)
        self.edits = EditCount()  # every change, by a method or by hand (cache.py trusts it)
        self.users = [
            SimUser(1000 + i, f"student{i:05d}", f"First{i}", f"Last{i}") for i in range(users)
        ]
        self.edits.adopt_all(self.users)
        self.exams: list[SimExam] = []
        self._by_slug: dict[str, SimExam] = {}
        self._next_exam_id = 1
        # Admin-only state. Nothing here draws from self._rng, and all of it is either
        # small (batches) or filled on first use (profiles, memberships, settings).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # tests may pin it
        self._users_by_id = {user.id: user for user in self.users}
        self.batches = _draw_batches(seed, batches)
        self.edits.adopt_all(self.batches)
        self._batches_by_id = {batch.id: batch for batch in self.batches}
        self._profiles: dict[int, SimProfile] = {}
        self._memberships: dict[int, list[int]] = {}
        self._settings: dict[int, ExamSettings] = {}
        self._finished: dict[int, datetime] = {}  # attempts completed by a change: when
        self._index: list[tuple[SimExam, SimAttempt]] = []
        self._index_by_id: dict[int, tuple[SimExam, SimAttempt]] = {}
        # What the index was built from: the exams, their attempts lists and their lengths.
        self._index_key: tuple[list[SimExam], list[list[SimAttempt]], list[int]] = ([], [], [])
        self._index_edits = -1  # self.edits when the lists in _index_key were last found current
        for index in range(exams):
            exam = self.add_exam(attempts=attempts_per_exam)
            exam.forbidden = bool(forbidden_every) and index % forbidden_every == 1
            exam.vanished = bool(vanished_every) and index % vanished_every == 2

    # --- changes ---------------------------------------------------------------------

    def add_exam(self, *, attempts: int = 0, title: str | None = None) -> SimExam:
        exam_id = self._next_exam_id
        self._next_exam_id += 1
        exam = SimExam(
            id=exam_id,
            slug=f"exam-{exam_id:05d}",
            title=title or f"{TITLES[exam_id % len(TITLES)]} {exam_id}",
            course=COURSES[exam_id % len(COURSES)],
            created=EPOCH + timedelta(hours=exam_id, microseconds=(exam_id * 1237) % 1_000_000),
            extra_fields=exam_id % 4 == 0,
        )
        self.edits.adopt(exam)
        self.exams.insert(0, exam)
        self._by_slug[exam.slug] = exam
        self.add_attempts(exam, attempts)  # counts as an edit, even when it adds none
        return exam

    def add_attempts(self, exam: SimExam, count: int) -> list[SimAttempt]:
        """Attempts by seeded users at seeded states: draws from the v2.1 stream."""
        new = []
        for _ in range(count):
            number = exam.attempts_made
            exam.attempts_made += 1
            # One random() per attempt whatever the weights: the v2.1 stream stays in step.
            state = self._rng.choices(ATTEMPT_STATES, weights=self._state_weights)[0]
            attempt = SimAttempt(
                id=exam.id * 100_000 + number + 1,
                user=self._rng.choice(self.users),
                state=state,
                started=exam.created + timedelta(days=1, minutes=number * 7),
            )
            self.edits.adopt(attempt)
            exam.attempts.insert(0, attempt)
            new.append(attempt)
            self._scores(attempt)  # drawn now, so serving the first walk costs no more than later ones
        self.edits.value += 1
        return new

    def start_attempts(
        self, exam: SimExam, users: Iterable[SimUser], *, state: str = "Running"
    ) -> list[SimAttempt]:
        """Attempts the given users start now (by `clock`). Draws from no shared stream,
        so it can be used at any time without shifting later seeded data."""
        if state not in ATTEMPT_STATES:
            raise ValueError(f"state must be one of {ATTEMPT_STATES}")
        now = self.clock()
        new = []
        for user in users:
            number = exam.attempts_made
            exam.attempts_made += 1
            attempt = SimAttempt(id=exam.id * 100_000 + number + 1, user=user, state=state, started=now)
            self.edits.adopt_all((attempt, user))
            exam.attempts.insert(0, attempt)
            if state == "Completed":
                self._finished[attempt.id] = now
            new.append(attempt)
        self.edits.value += 1
        return new

    def complete_running(self) -> int:
        """Every Running attempt completes; returns how many did."""
        done = 0
        for exam in self.exams:
            for attempt in exam.attempts:
                if attempt.state == "Running":
                    attempt.state = "Completed"
                    done += 1
        self.edits.value += 1
        return done

    def complete_attempts(self, attempt_ids: Sequence[int]) -> list[int]:
        """These attempts, those Running, complete now; returns the ids that did."""
        done = []
        for attempt_id in attempt_ids:
            _, attempt = self.find_attempt(attempt_id)
            if attempt.state == "Running":
                attempt.state = "Completed"
                self._finished[attempt.id] = self.clock()
                done.append(attempt.id)
        self.edits.value += 1
        return done

    def rename_exam(self, exam_id: int, title: str) -> None:
        exam = self.exam(exam_id)
        exam.title = title
        exam.modified = self.clock()
        self.edits.value += 1

    def delete_exam(self, exam_id: int) -> None:
        exam = self.exam(exam_id)
        self.exams.remove(exam)
        del self._by_slug[exam.slug]
        self.edits.value += 1

    def restore_exam(self, exam: SimExam) -> None:
        """An exam deleted earlier comes back, at the top of the listing."""
        self.exams.insert(0, exam)
        self._by_slug[exam.slug] = exam
        self.edits.value += 1

    def delete_attempt(self, attempt_id: int) -> bool:
        """Removes the attempt; returns whether there was one."""
        exam = self.exam(attempt_id // 100_000)
        kept = [a for a in exam.attempts if a.id != attempt_id]
        deleted = len(kept) < len(exam.attempts)
        exam.attempts = kept
        self.edits.value += 1
        return deleted

    def update_user(self, user_id: int, changes: dict[str, Any]) -> None:
        """Changes a user's fields: names on both APIs, personal fields on the admin one."""
        unknown = set(changes) - {*USER_FIELDS, *PROFILE_FIELDS}
        if unknown:
            raise ValueError(f"unknown user fields {sorted(unknown)}")
        user = self.user(user_id)
        profile = self.profile(user)
        for name, value in changes.items():
            if name in USER_FIELDS:
                setattr(user, name, str(value))
            elif name == "birth_date":
                profile.birth_date = _parse_birth_date(value)
            else:
                setattr(profile, name, value)
        self.edits.value += 1

    def add_membership(self, user_id: int, batch_id: int) -> bool:
        """The user joins the batch; returns whether they were not in it already."""
        batch_ids = self._membership_ids(self.user(user_id))
        if self.batch(batch_id).id in batch_ids:
            return False
        batch_ids.append(batch_id)
        self.edits.value += 1
        return True

    def remove_membership(self, user_id: int, batch_id: int) -> bool:
        """The user leaves the batch; returns whether they were in it."""
        batch_ids = self._membership_ids(self.user(user_id))
        if self.batch(batch_id).id not in batch_ids:
            return False
        batch_ids.remove(batch_id)
        self.edits.value += 1
        return True

    # --- look-ups --------------------------------------------------------------------

    def exam(self, exam_id: int) -> SimExam:
        for exam in self.exams:
            if exam.id == exam_id:
                return exam
        raise KeyError(exam_id)

    def exam_by_slug(self, slug: str) -> SimExam | None:
        return self._by_slug.get(slug)

    def user(self, user_id: int) -> SimUser:
        return self._users_by_id[user_id]

    def batch(self, batch_id: int) -> SimBatch:
        return self._batches_by_id[batch_id]

    def attempts_by_id(self) -> list[tuple[SimExam, SimAttempt]]:
        """Every attempt of every listed exam, in id order (the admin listing's default).

        Kept between requests and rebuilt when an exam or its attempts list changed:
        sorting 150,000 attempts for every page of 200 would cost more than the page."""
        if not self._index_is_current():
            pairs = [(exam, attempt) for exam in self.exams for attempt in exam.attempts]
            # Whatever was put in the lists by hand counts its edits here from now on.
            self.edits.adopt_all(self.exams)
            self.edits.adopt_all([attempt for _, attempt in pairs])
            self.edits.adopt_all([attempt.user for _, attempt in pairs])
            pairs.sort(key=lambda pair: pair[1].id)
            self._index = pairs
            self._index_by_id = {attempt.id: (exam, attempt) for exam, attempt in pairs}
            # The lists themselves are kept, not their id()s, so none can be reused.
            lists = [exam.attempts for exam in self.exams]
            self._index_key = (list(self.exams), lists, list(map(len, lists)))
            self._index_edits = self.edits.value
        return self._index

    def find_attempt(self, attempt_id: int) -> tuple[SimExam, SimAttempt]:
        self.attempts_by_id()
        return self._index_by_id[attempt_id]

    def _index_is_current(self) -> bool:
        """Whether the exams are those the index was built from, in the same order, each
        with the same attempts list at the same length: however they were changed, by a
        method or by hand. Checked on every admin request, so in C loops, and each exam's
        list is looked up again only after an edit: replacing one is an edit (self.edits:
        the index adopted its exams)."""
        exams, lists, lengths = self._index_key
        if len(exams) != len(self.exams) or not all(map(operator.is_, self.exams, exams)):
            return False
        if self._index_edits != self.edits.value:
            if not all(map(operator.is_, [exam.attempts for exam in exams], lists)):
                return False
            self._index_edits = self.edits.value
        return list(map(len, lists)) == lengths

    # --- admin-only figures, drawn on first use ----------------------------------------

    def profile(self, user: SimUser) -> SimProfile:
        profile = self._profiles.get(user.id)
        if profile is None:
            profile = self._profiles[user.id] = _draw_profile(self.seed, user)
            self.edits.adopt(profile)
        return profile

    def memberships(self, user: SimUser) -> list[SimBatch]:
        """The user's batches, newest first, as Testpress lists them."""
        return sorted((self.batch(i) for i in self._membership_ids(user)), key=lambda b: -b.id)

    def _membership_ids(self, user: SimUser) -> list[int]:
        batch_ids = self._memberships.get(user.id)
        if batch_ids is None:
            rng = _admin_rng(self.seed, "memberships", user.id)
            count = min(len(self.batches), rng.choice((0, 1, 1, 2, 2, 3)))
            batch_ids = self._memberships[user.id] = rng.sample([b.id for b in self.batches], count)
        return batch_ids

    def settings(self, exam: SimExam) -> ExamSettings:
        settings = self._settings.get(exam.id)
        if settings is None:
            settings = self._settings[exam.id] = _draw_settings(self.seed, exam)
        return settings

    def scores(self, attempt: SimAttempt) -> _Scores:
        return self._scores(attempt)

    def finished_at(self, attempt: SimAttempt) -> datetime | None:
        """When a change completed (or started as Completed) this attempt; None if none did."""
        return self._finished.get(attempt.id)

    def time_taken(self, attempt: SimAttempt) -> timedelta:
        """How long the attempt has taken: none for one not started."""
        if attempt.state == "Not Started":
            return timedelta(0)
        return parse_timedelta(self._scores(attempt).time_taken)

    def last_answer_at(self, attempt: SimAttempt) -> datetime | None:
        """When the attempt's last answer was saved; None before any answer."""
        if attempt.state == "Not Started":
            return None
        if attempt.id in self._finished:
            return self._finished[attempt.id]
        # The stream is made only when drawn from: seeding one costs more than the rest.
        share = 1.0 if attempt.state == "Completed" else _admin_rng(self.seed, "answered", attempt.id).choice(
            (None, 0.3, 0.6, 0.9)
        )
        return None if share is None else attempt.started + self.time_taken(attempt) * share

    def speed(self, attempt: SimAttempt) -> int:
        if attempt.state == "Not Started":
            return 0
        return _admin_rng(self.seed, "speed", attempt.id).randint(0, 100)

    def breakdown(self, attempt: SimAttempt) -> Breakdown:
        """Sections, subjects and difficulty levels that add up to the attempt's counts.
        Drawn afresh on every call (a detail is one request per attempt): not memoised."""
        scores = self._scores(attempt)
        counts = Counts(scores.correct, scores.incorrect, scores.total - scores.correct - scores.incorrect)
        return _draw_breakdown(self.seed, attempt, counts, self.time_taken(attempt))

    def _scores(self, attempt: SimAttempt) -> _Scores:
        """The seeded figures of an attempt, drawn once per (attempt, completed or not):
        drawing them is most of what serving a page costs, and a benchmark should measure
        the client, not the simulator."""
        completed = attempt.state == "Completed"
        key = (attempt.id, completed)
        scores = self._scores_memo.get(key)
        if scores is None:
            scores = self._scores_memo[key] = _draw_scores(self.seed, attempt.id, completed)
        return scores

    # --- payloads --------------------------------------------------------------------

    def exam_payload(self, exam: SimExam, base: str) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + exam.id)
        start = exam_start(exam)
        end = exam_end(exam)
        hours = rng.choice((0, 1, 2, 3, 25))
        duration = str(timedelta(hours=hours, minutes=rng.choice((0, 30, 45))))
        payload: dict[str, Any] = {
            "id": exam.id,
            "url": f"{base}/api/v2.1/exams/{exam.slug}/",
            "title": exam.title,
            "description": rng.choice(("", "<p>Read <b>all</b> questions.</p>", "Plain text")),
            "course": exam.course,
            "start_date": _ist_text(start),
            "end_date": None if end is None else _ist_text(end),
            "duration": duration,
            "number_of_questions": rng.randint(10, 100),
            "negative_marks": rng.choice(("0.00", "0.25", "0.33", "1.00")),
            "mark_per_question": rng.choice(("1.00", "2.00", "4.00")),
            "template_type": rng.choice((1, 2)),
            "allow_retake": exam.id % 3 == 0,
            "max_retakes": rng.choice((None, -1, 0, 3)),
            "enable_ranks": exam.id % 2 == 0,
            "rank_publishing_date": None if exam.id % 3 else _ist_text(start + timedelta(days=31)),
            "attempts_url": f"{base}/api/v2.1/exams/{exam.slug}/attempts/",
            "created": _utc_text(exam.created, exam.id % 3),
            "slug": exam.slug,
            "variable_mark_per_question": exam.id % 7 == 0,
            "show_answers": exam.id % 2 == 1,
            "comments_count": rng.randint(0, 12),
            "allow_pdf": exam.id % 4 == 1,
        }
        if exam.extra_fields:
            payload.update(
                attempts_count=len(exam.attempts),
                total_marks=f"{payload['number_of_questions'] * 2}.00",
                pass_percentage=40,
                show_score=True,
            )
        return payload

    def attempt_payload(
        self, exam: SimExam, attempt: SimAttempt, base: str, *, nested_user: bool = True
    ) -> dict[str, Any]:
        scores = self._scores(attempt)
        user = attempt.user
        url = f"{base}/api/v2.1/attempts/{attempt.id}/"
        payload: dict[str, Any] = {
            "id": attempt.id,
            "url": url,
            "date": attempt.date_text,
            "total_questions": scores.total,
            "score": scores.score,
            "rank": scores.rank,
            "max_rank": scores.max_rank,
            "review_url": f"{url}review/",
            "questions_url": f"{url}questions/",
            "correct_count": scores.correct,
            "incorrect_count": scores.incorrect,
            "last_started_time": attempt.last_started_text,
            "remaining_time": scores.remaining_time,
            "time_taken": scores.time_taken,
            "state": attempt.state,
            "percentile": scores.percentile,
            "percentage": scores.percentage,
            "unanswered_count": scores.total - scores.correct - scores.incorrect,
            "user": (
                {
                    "id": user.id,
                    "url": f"{base}/api/v2.2/users/{user.id}/",
                    "username": user.username,
                    "display_name": f"{user.first_name} {user.last_name}",
                    "first_name": user.first_name,
                    "last_name": user.last_name,
                    "photo": f"{base}/static/img/user.png",
                }
                if nested_user
                else user.username
            ),
        }
        if attempt.malformed:
            payload["score"] = "twelve"
        return payload


def _state_weights(open_share: float | None) -> tuple[float, ...]:
    """Weights of ATTEMPT_STATES (Completed, Running, Not Started) for the seeded draw."""
    if open_share is None:
        return (8, 1, 1)  # the historical weights, as integers: the same draws bit for bit
    if not 0.0 <= open_share <= 1.0:
        raise ValueError("open_share must be between 0 and 1")
    return (1.0 - open_share, open_share / 2, open_share / 2)


@dataclass(frozen=True)
class _Scores:
    total: int
    correct: int
    incorrect: int
    score: str | int
    rank: int | str
    max_rank: int | str
    remaining_time: str
    time_taken: str
    percentile: int | float
    percentage: str


def _draw_scores(seed: int, attempt_id: int, completed: bool) -> _Scores:
    rng = random.Random(seed * 7_000_003 + attempt_id)
    total = rng.randint(10, 100)
    correct = rng.randint(0, total) if completed else 0
    incorrect = rng.randint(0, total - correct) if completed else 0
    taken = timedelta(seconds=rng.randint(30, 3 * 3600), microseconds=rng.randint(0, 999_999))
    if attempt_id % 97 == 0:
        taken += timedelta(days=20)
    # Drawn in the order the payload's fields were first written in: the figures stay
    # those of every earlier version of the simulator.
    score: str | int = f"{correct * 2 - incorrect * 0.5:.2f}" if completed else 0
    rank = rng.randint(1, 500) if completed and attempt_id % 4 else "NA"
    max_rank = rng.randint(500, 900) if completed else "NA"
    remaining = str(timedelta(minutes=rng.randint(0, 59), seconds=rng.randint(0, 59)))
    percentile = rng.choice((rng.randint(0, 100), round(rng.uniform(0, 100), 2)))
    return _Scores(
        total=total,
        correct=correct,
        incorrect=incorrect,
        score=score,
        rank=rank,
        max_rank=max_rank,
        remaining_time=remaining,
        time_taken=str(taken),
        percentile=percentile,
        percentage=str(round(100 * correct / total)),
    )


def _utc_text(moment: datetime, style: int) -> str:
    """UTC with Z and 0, 3 or 6 fractional digits, as Testpress writes `created` and `date`."""
    moment = moment.astimezone(UTC)
    base = moment.replace(tzinfo=None).isoformat(timespec="seconds")  # strftime costs 10×
    fraction = ("", f".{moment.microsecond // 1000:03d}", f".{moment.microsecond:06d}")[style]
    return f"{base}{fraction}Z"


def _ist_text(moment: datetime) -> str:
    """Local India time with its +05:30 offset, as Testpress writes `start_date`."""
    return (moment + IST).replace(tzinfo=None).isoformat(timespec="seconds") + "+05:30"


# --- admin-only data: drawn per entity from streams of its own ---------------------------

PLACES = (
    ("Chennai", "Tamil Nadu", "IN-TN"),
    ("Bengaluru", "Karnataka", "IN-KA"),
    ("Mumbai", "Maharashtra", "IN-MH"),
    ("Lucknow", "Uttar Pradesh", "IN-UP"),
    ("Kolkata", "West Bengal", "IN-WB"),
    ("Hyderabad", "Telangana", "IN-TG"),
    ("Kochi", "Kerala", "IN-KL"),
)
BATCH_SHIFTS = ("Morning", "Evening", "Weekend", "Online", "सुबह")
# (id, name, children): a two-level tree as Testpress keeps subjects.
SUBJECT_TREE: tuple[tuple[int, str, tuple[tuple[int, str], ...]], ...] = (
    (11, "Quantitative Aptitude", ((12, "Algebra"), (13, "Geometry"), (14, "Arithmetic"))),
    (21, "Reasoning", ((22, "Puzzles"), (23, "Seating Arrangement"))),
    (31, "English", ()),
    (41, "सामान्य ज्ञान", ()),
)
# Subjects served with a null subject_id, as the docs' own example shows.
UNNUMBERED_SUBJECTS = ("History", "Current affairs")
DIFFICULTY_LEVELS = ("easy", "medium", "hard", "uncategorized")
PHOTOS = "https://media.testpress.example/i"  # uploaded photos live on a media host, not the API's


def _admin_rng(seed: int, kind: str, key: int) -> random.Random:
    """A stream for one admin-only entity. String seeds are hashed with SHA-512 by
    `random`, so the stream is the same in every process, whatever PYTHONHASHSEED says."""
    return random.Random(f"testpress-admin:{seed * 7919 + 1}:{kind}:{key}")


def _draw_profile(seed: int, user: SimUser) -> SimProfile:
    rng = _admin_rng(seed, "profile", user.id)
    city, state_name, state_code = rng.choice(PLACES)
    has_address = rng.random() < 0.8
    birth = date(rng.randint(1985, 2010), rng.randint(1, 12), rng.randint(1, 28))
    domain = rng.choice(("example.com", "mail.example.in"))
    street = f"{rng.randint(1, 300)} {rng.choice(('Gandhi Road', 'MG Road', 'Anna Salai'))}"
    return SimProfile(
        email=None if rng.random() < 0.15 else f"{user.username}@{domain}",
        phone=None if rng.random() < 0.2 else f"9{rng.randrange(10**9):09d}",
        birth_date=None if rng.random() < 0.15 else birth,
        photo=None if rng.random() < 0.5 else f"{PHOTOS}/{rng.getrandbits(128):032x}.png",
        address1=street if has_address else "",
        address2=rng.choice(("", "2nd Cross", "Flat 4B")) if has_address else "",
        city=city if has_address else "",
        zip=str(rng.randint(110001, 855999)) if has_address else "",
        state=rng.choice((state_name, state_code)) if has_address else "",
        state_code=state_code if has_address else "",
        custom_fields=_draw_custom_fields(rng),
    )


def _draw_custom_fields(rng: random.Random) -> dict[str, Any]:
    """Answers to an institute's own sign-up questions: any JSON type, some missing."""
    if rng.random() < 0.2:
        return {}
    answers: dict[str, Any] = {
        "Graduation University": rng.choice(
            ("Delhi University", "Anna University", "मुंबई विश्वविद्यालय", None)
        ),
        "Graduation Year": rng.randint(2005, 2024),
        "Hostel": rng.random() < 0.3,
        "Marks in 12th": round(rng.uniform(40, 100), 1),
        "Optional Subjects": rng.sample(["Physics", "Chemistry", "Biology", "Maths"], 2),
    }
    dropped = rng.sample(sorted(answers), rng.randint(0, 2))
    return {name: value for name, value in answers.items() if name not in dropped}


def _draw_batches(seed: int, count: int) -> list[SimBatch]:
    rng = _admin_rng(seed, "batches", 0)
    names = [
        f"{course} {shift} Batch {year}"
        for course in COURSES
        for shift in BATCH_SHIFTS
        for year in range(2019, 2025)
    ]
    chosen = rng.sample(names, min(count, len(names))) + [
        f"Batch {number}" for number in range(len(names) + 1, count + 1)
    ]
    batches = []
    for number, name in enumerate(chosen, start=1):
        created = EPOCH - timedelta(days=3 * (count - number) + 30, microseconds=rng.randrange(10**6))
        modified = created + timedelta(days=rng.choice((0, 0, 3, 40)), microseconds=rng.randrange(10**6))
        batches.append(SimBatch(id=number, name=name, created=created, modified=modified))
    return batches


def _draw_settings(seed: int, exam: SimExam) -> ExamSettings:
    rng = _admin_rng(seed, "exam", exam.id)
    # An exam that also shows newer fields on v2.1 says the same there and here.
    pass_percentage = 40 if exam.extra_fields else rng.choice((0, 33, 35, 40, 50, 60))
    show_score = True if exam.extra_fields else rng.random() < 0.8
    return ExamSettings(
        published=exam.id % 11 != 0,
        pass_percentage=pass_percentage,
        show_score=show_score,
        show_percentile=rng.random() < 0.7,
        show_pass_or_fail=rng.random() < 0.5,
        modified=exam.created + timedelta(days=rng.randint(0, 20), microseconds=rng.randrange(10**6)),
    )


def _draw_breakdown(seed: int, attempt: SimAttempt, counts: Counts, taken: timedelta) -> Breakdown:
    """Every answer of the attempt dealt to one section, one subject and one level, so each
    grouping adds up to the attempt's own counts."""
    rng = _admin_rng(seed, f"breakdown:{attempt.state}", attempt.id)
    answers = ["c"] * counts.correct + ["i"] * counts.incorrect + ["u"] * counts.unanswered
    rng.shuffle(answers)
    total = len(answers)

    sizes = _split(rng, total, rng.randint(1, 4))
    sections = []
    for order, group in enumerate(_deal(answers, sizes)):
        share = taken * (len(group) / total) if total else timedelta(0)
        sections.append(SectionFigures(order, attempt.id // 100_000 * 10 + order, _count(group), share))

    leaves: list[tuple[int | None, str, int | None]] = [
        (leaf_id, name, parent) for parent, _, children in SUBJECT_TREE for leaf_id, name in children
    ]
    leaves += [(top, name, None) for top, name, children in SUBJECT_TREE if not children]
    leaves += [(None, name, None) for name in UNNUMBERED_SUBJECTS]
    chosen = sorted(rng.sample(range(len(leaves)), rng.randint(2, 5)))
    dealt = dict(zip(chosen, _deal(answers, _split(rng, total, len(chosen))), strict=True))
    subjects = _subject_figures(leaves, dealt)

    picked = sorted(rng.sample(range(len(DIFFICULTY_LEVELS)), rng.randint(1, len(DIFFICULTY_LEVELS))))
    groups = _deal(answers, _split(rng, total, len(picked)))
    levels = {DIFFICULTY_LEVELS[i]: _count(group) for i, group in zip(picked, groups, strict=True)}
    return Breakdown(sections=sections, subjects=subjects, levels=levels)


def _subject_figures(
    leaves: list[tuple[int | None, str, int | None]], dealt: dict[int, list[str]]
) -> list[SubjectFigures]:
    """The chosen leaves in the tree's order, each parent first with its children's sum,
    and the unnumbered subjects last."""

    def leaf(i: int) -> SubjectFigures:
        leaf_id, name, parent = leaves[i]
        return SubjectFigures(leaf_id, name, parent, True, _count(dealt[i]))

    figures = []
    for top, name, children in SUBJECT_TREE:
        if not children:
            figures += [leaf(i) for i in sorted(dealt) if leaves[i][0] == top]
            continue
        mine = [i for i in sorted(dealt) if leaves[i][2] == top]
        if mine:
            answers = [answer for i in mine for answer in dealt[i]]
            figures.append(SubjectFigures(top, name, None, False, _count(answers)))
            figures += [leaf(i) for i in mine]
    return figures + [leaf(i) for i in sorted(dealt) if leaves[i][0] is None]


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """`total` cut into `parts` sizes, none empty while there are enough to go round."""
    if total < parts:
        return [1] * total + [0] * (parts - total)
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [end - start for start, end in zip([0, *cuts], [*cuts, total], strict=True)]


def _deal(answers: list[str], sizes: list[int]) -> list[list[str]]:
    groups, start = [], 0
    for size in sizes:
        groups.append(answers[start : start + size])
        start += size
    return groups


def _count(answers: list[str]) -> Counts:
    return Counts(answers.count("c"), answers.count("i"), answers.count("u"))


_TIMEDELTA = re.compile(r"(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?")


def parse_timedelta(text: str) -> timedelta:
    """Python's timedelta text (`20 days, 3:58:48.076906`) back to a timedelta."""
    match = _TIMEDELTA.fullmatch(text)
    if match is None:
        raise ValueError(f"not a timedelta: {text!r}")
    days, hours, minutes, seconds, fraction = match.groups()
    return timedelta(
        days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=int(seconds),
        microseconds=int((fraction or "0").ljust(6, "0")),
    )  # fmt: skip


def _parse_birth_date(value: object) -> date | None:
    """A birth date as the admin API takes it (DD/MM/YYYY), or ISO, or None."""
    if value is None or value == "":
        return None
    text = str(value)
    if "/" in text:
        return datetime.strptime(text, "%d/%m/%Y").date()
    return date.fromisoformat(text)


def utc_micro_text(moment: datetime) -> str:
    """UTC with Z and 6 fractional digits, as the admin lists write datetimes."""
    return _utc_text(moment, 2)


def ist_micro_text(moment: datetime) -> str:
    """India time with +05:30 and 6 fractional digits, as the admin attempt detail writes them."""
    local = (moment.astimezone(UTC) + IST).replace(tzinfo=None)
    return local.isoformat(timespec="microseconds") + "+05:30"
