"""The simulator's data: exams and attempts generated from a seed, and their changes.

Attempts are kept as small records; their payloads are rendered on demand, so a data set
of a hundred thousand attempts stays cheap. Listings are newest first, like Testpress:
a new exam or attempt shifts every later item down by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
IST = timedelta(hours=5, minutes=30)
COURSES = ("IBPS", "SSC", "JEE", "NEET", "UPSC")
TITLES = ("Mock Test", "Quant Drill", "Reasoning", "English Grammar", "सामान्य ज्ञान", "数学 Quiz")


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

    def update(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if not hasattr(self, name):
                raise ValueError(f"unknown fault {name!r}")
            setattr(self, name, type(getattr(self, name))(value))


@dataclass
class SimUser:
    id: int
    username: str
    first_name: str
    last_name: str


@dataclass
class SimAttempt:
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
class SimExam:
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
    ) -> None:
        self.seed = seed
        self._scores_memo: dict[tuple[int, bool], _Scores] = {}
        self._rng = random.Random(seed)
        self.users = [
            SimUser(1000 + i, f"student{i:05d}", f"First{i}", f"Last{i}") for i in range(users)
        ]
        self.exams: list[SimExam] = []
        self._by_slug: dict[str, SimExam] = {}
        self._next_exam_id = 1
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
        self.exams.insert(0, exam)
        self._by_slug[exam.slug] = exam
        self.add_attempts(exam, attempts)
        return exam

    def add_attempts(self, exam: SimExam, count: int) -> list[SimAttempt]:
        new = []
        for _ in range(count):
            number = len(exam.attempts)
            state = self._rng.choices(
                ("Completed", "Running", "Not Started"), weights=(8, 1, 1)
            )[0]
            attempt = SimAttempt(
                id=exam.id * 100_000 + number + 1,
                user=self._rng.choice(self.users),
                state=state,
                started=exam.created + timedelta(days=1, minutes=number * 7),
            )
            exam.attempts.insert(0, attempt)
            new.append(attempt)
            self._scores(attempt)  # drawn now, so serving the first walk costs no more than later ones
        return new

    def complete_running(self) -> int:
        """Every Running attempt completes; returns how many did."""
        done = 0
        for exam in self.exams:
            for attempt in exam.attempts:
                if attempt.state == "Running":
                    attempt.state = "Completed"
                    done += 1
        return done

    def rename_exam(self, exam_id: int, title: str) -> None:
        self.exam(exam_id).title = title

    def delete_exam(self, exam_id: int) -> None:
        exam = self.exam(exam_id)
        self.exams.remove(exam)
        del self._by_slug[exam.slug]

    def restore_exam(self, exam: SimExam) -> None:
        """An exam deleted earlier comes back, at the top of the listing."""
        self.exams.insert(0, exam)
        self._by_slug[exam.slug] = exam

    def delete_attempt(self, attempt_id: int) -> None:
        exam = self.exam(attempt_id // 100_000)
        exam.attempts = [a for a in exam.attempts if a.id != attempt_id]

    def exam(self, exam_id: int) -> SimExam:
        for exam in self.exams:
            if exam.id == exam_id:
                return exam
        raise KeyError(exam_id)

    def exam_by_slug(self, slug: str) -> SimExam | None:
        return self._by_slug.get(slug)

    # --- payloads --------------------------------------------------------------------

    def exam_payload(self, exam: SimExam, base: str) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + exam.id)
        start = exam.created + timedelta(days=1)
        hours = rng.choice((0, 1, 2, 3, 25))
        duration = str(timedelta(hours=hours, minutes=rng.choice((0, 30, 45))))
        payload: dict[str, Any] = {
            "id": exam.id,
            "url": f"{base}/api/v2.1/exams/{exam.slug}/",
            "title": exam.title,
            "description": rng.choice(("", "<p>Read <b>all</b> questions.</p>", "Plain text")),
            "course": exam.course,
            "start_date": _ist_text(start),
            "end_date": None if exam.id % 5 == 0 else _ist_text(start + timedelta(days=30)),
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
