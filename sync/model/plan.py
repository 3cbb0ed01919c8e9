"""What an admin run reads, decided before it reads anything: pure, so every rule is
tested without a server.

The admin API has no modified-since filter. A nightly run therefore reads:
  - the exam, user and batch listings (whole, but as slices: nothing is marked deleted);
  - the attempts started since the last completed run's start, less a lookback that
    covers the longest exam: every attempt that was running then is read again, finished;
  - every attempt stored as Running or Not Started before that window, through the
    listing's `state` filter, and per exam for those no longer in it;
  - the batches of new and changed users.
A full walk reads everything and is the only kind that marks rows deleted: on backfill,
on `run --full`, with no full walk on record, when the last one is older than
`full_every`, or when it wrote rows by other rules (a new personal-data policy or salt:
a nightly run would rewrite only the rows it reads, and leave older attempts as they were).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

# The admin attempt listing's numeric `state` filter (its rows say the state in words).
STATE_FILTER = {"Running": "0", "Completed": "1", "Not Started": "3"}
# An exam's duration is not all an attempt may take (resumed attempts, late starts).
LOOKBACK_MARGIN = timedelta(hours=1)
MINIMUM_LOOKBACK = timedelta(hours=6)


# sync_state.rules while rows may be written by rules no complete full walk has rewritten
# every row by (a run under another `pii` or salt that has not completed): never a
# digest, so every run is a full walk until one completes.
MIXED_RULES = "mixed"


@dataclass(frozen=True)
class SyncState:
    """What the last completed runs left in sync_state for the attempts."""

    watermark: datetime | None = None  # the start of the last completed run
    last_full_at: datetime | None = None  # the start of the last completed full walk
    rules: str | None = None  # what that walk wrote rows by (normalize.rules_digest); None: not recorded

    def rules_changed(self, rules: str) -> bool:
        """Whether stored rows may have been written by rules other than `rules` (None, not
        recorded, says nothing: a database from before revision 0005)."""
        return self.rules is not None and self.rules != rules


@dataclass(frozen=True)
class AdminPlan:
    full: bool
    reason: str  # why this run walks everything, or reads only what can have changed
    since: datetime | None = None  # incremental: attempts started from this moment on

    def attempt_window(self) -> dict[str, str]:
        """The listing filter for attempts started since `since`: `date_0` takes a date
        (read in the institute's time, India's), so a day earlier is asked to be safe."""
        assert self.since is not None
        return {"date_0": (self.since - timedelta(days=1)).date().isoformat()}

    def open_before_window(self) -> tuple[dict[str, str], ...]:
        """The `state` listings of attempts still Running or Not Started that started
        before the window (those in it are read there, open or not). `date_1` ends a day
        after the window's `date_0`: the two overlap by a day, so no attempt falls between
        them whether `date_1` means the start or the end of its day."""
        until = date.fromisoformat(self.attempt_window()["date_0"]) + timedelta(days=1)
        return tuple({"state": STATE_FILTER[state], "date_1": until.isoformat()} for state in ("Running", "Not Started"))


def lookback_for(setting: timedelta | None, longest_exam: timedelta | None) -> timedelta:
    """The configured lookback, or the longest stored exam plus a margin, at least 6 hours."""
    if setting is not None:
        return setting
    return max(MINIMUM_LOOKBACK, (longest_exam or timedelta(0)) + LOOKBACK_MARGIN)


def plan_admin_run(
    *, mode: str, force_full: bool, state: SyncState, now: datetime, full_every: timedelta, lookback: timedelta, rules: str
) -> AdminPlan:
    """`rules`: what this run writes rows by (normalize.rules_digest)."""
    if mode == "backfill":
        return AdminPlan(True, "backfill walks everything")
    if force_full:
        return AdminPlan(True, "run --full")
    if state.watermark is None or state.last_full_at is None:
        return AdminPlan(True, "no full walk on record")
    if now - state.last_full_at >= full_every:
        return AdminPlan(True, f"the last full walk is older than full_every ({full_every})")
    if state.rules == MIXED_RULES:
        return AdminPlan(True, "a run under other rules ([sync] pii or pii_salt) wrote rows and did not complete: "
                               "every row is written again")  # fmt: skip
    if state.rules_changed(rules):
        return AdminPlan(True, "the rows were written by other rules (a new [sync] pii or pii_salt, or an upgrade "
                               "that rewrites rows): every row is written again")  # fmt: skip
    return AdminPlan(False, f"incremental: attempts started since the last run less {lookback}",
                     since=state.watermark - lookback)  # fmt: skip
