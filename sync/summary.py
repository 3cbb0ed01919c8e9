"""The summary of one run: what it did, as the log line, sync_runs and reports show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sync.store import RowCounts


@dataclass
class RunSummary:
    run_id: int
    mode: str
    dry_run: bool = False
    status: str = "running"  # succeeded, partial, failed, interrupted
    duration_seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process during the run (all threads)
    batches: int = 0  # transactions committed
    requests: int = 0
    retries: int = 0
    exams_seen: int = 0
    exams_done: int = 0  # exams whose attempt fetch has ended, one way or another
    attempts_seen: int = 0
    exams_skipped: int = 0
    errors: int = 0
    rows: RowCounts = field(default_factory=RowCounts)
    by_table: dict[str, RowCounts] = field(default_factory=dict)
    listing_complete: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        }
