"""The value objects of one run: what it was asked, what it counts, how it is recorded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

Clock = Callable[[], datetime]
SUCCESSFUL = ("succeeded", "partial")  # a run that finished and stored what it could


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunOptions:
    """What this invocation asks for, beyond the settings."""

    mode: str = "run"  # run, backfill
    resume: bool = False  # backfill --resume
    exam_slugs: tuple[str, ...] = ()  # --exam: only these exams
    limit: int | None = None  # --limit: only the first N exams of the listing
    dry_run: bool = False  # fetch and compare, write nothing
    full: bool = False  # run --full: an admin run walks everything (and may mark deletions)


@dataclass
class RowCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def add(self, other: RowCounts) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass
class RunSummary:
    """What one run did, as the log line, sync_runs and reports show it."""

    run_id: int
    mode: str
    dry_run: bool = False
    status: str = "running"  # succeeded, partial, failed, interrupted
    duration_seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process during the run (all threads)
    batches: int = 0  # transactions committed
    requests: int = 0
    retries: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # items received, by resource
    exams_done: int = 0  # exams whose attempt fetch has ended, one way or another
    exams_skipped: int = 0
    errors: int = 0
    # Of the errors, fields stored null (their rows were stored): they lose no row, so they
    # do not hold back an admin run's watermark.
    field_problems: int = 0
    rows: RowCounts = field(default_factory=RowCounts)
    by_table: dict[str, RowCounts] = field(default_factory=dict)
    listing_complete: bool = False  # every top-level listing read whole was read consistently
    error: str | None = None
    source: str | None = None  # student or admin: the API this run read
    full_walk: bool = True  # an admin nightly run that read only what can have changed: False

    def count_seen(self, resource: str, count: int) -> None:
        self.seen[resource] = self.seen.get(resource, 0) + count

    # sync_runs has a column for the items seen of each of the v2.1 resources.
    @property
    def exams_seen(self) -> int:
        return self.seen.get("exams", 0)

    @property
    def attempts_seen(self) -> int:
        return self.seen.get("attempts", 0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exams_seen": self.exams_seen, "attempts_seen": self.attempts_seen}

    def record(self) -> dict[str, Any]:
        """The counters as sync_runs stores them."""
        return {
            "requests": self.requests,
            "retries": self.retries,
            "exams_seen": self.exams_seen,
            "attempts_seen": self.attempts_seen,
            "exams_skipped": self.exams_skipped,
            "rows_inserted": self.rows.inserted,
            "rows_updated": self.rows.updated,
            "rows_unchanged": self.rows.unchanged,
            "rows_deleted": self.rows.deleted,
            "errors": self.errors,
            "error": self.error,
            "source": self.source,
        }


@dataclass(frozen=True)
class RunRecord:
    """One row of sync_runs, as the reports need it."""

    id: int
    mode: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    requests: int
    retries: int
    exams_seen: int
    attempts_seen: int
    rows_inserted: int
    rows_updated: int
    rows_unchanged: int
    rows_deleted: int
    errors: int
    exams_skipped: int
    error: str | None
    source: str | None = None

    @property
    def duration(self) -> timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    @property
    def rows_changed(self) -> int:
        return self.rows_inserted + self.rows_updated + self.rows_deleted

    def as_dict(self) -> dict[str, Any]:
        duration = self.duration
        return {
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_seconds": None if duration is None else round(duration.total_seconds(), 3),
            "rows_changed": self.rows_changed,
        }


@dataclass(frozen=True)
class Progress:
    """A snapshot for a live progress line."""

    elapsed: float
    exams_total: int | None
    exams_done: int
    attempts_seen: int
    requests: int
    retries: int
    done: bool = False  # the last snapshot: the crawl and the writes have ended
    # An admin run reads attempts from one listing, not per exam: it counts attempts
    # against how many that listing shows (its first slice's count on a nightly run),
    # known once its first page has answered.
    by_attempts: bool = False
    attempts_total: int | None = None
