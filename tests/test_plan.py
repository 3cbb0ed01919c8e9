"""What an admin run reads, decided before it reads anything (sync.model.plan): pure."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sync.model.admin_rows import PiiPolicy
from sync.model.plan import MIXED_RULES, AdminPlan, SyncState, lookback_for, plan_admin_run

NOW = datetime(2026, 12, 4, 1, 30, tzinfo=UTC)
WEEK = timedelta(days=7)


RULES = PiiPolicy().rules  # pii = keep


def plan(
    state: SyncState, *, mode: str = "run", full: bool = False, lookback: timedelta = timedelta(hours=6), rules: str = RULES
) -> AdminPlan:
    return plan_admin_run(mode=mode, force_full=full, state=state, now=NOW, full_every=WEEK, lookback=lookback, rules=rules)


@pytest.mark.parametrize(
    ("state", "mode", "full", "reason"),
    [
        (SyncState(NOW, NOW), "backfill", False, "backfill walks everything"),
        (SyncState(NOW, NOW), "run", True, "run --full"),
        (SyncState(None, None), "run", False, "no full walk on record"),
        (SyncState(NOW - timedelta(days=1), NOW - WEEK), "run", False, "the last full walk is older than full_every (7 days, 0:00:00)"),
    ],
)
def test_a_full_walk_and_why(state: SyncState, mode: str, full: bool, reason: str) -> None:
    chosen = plan(state, mode=mode, full=full)
    assert (chosen.full, chosen.reason, chosen.since) == (True, reason, None)


def test_rows_written_by_another_personal_data_policy_make_the_run_a_full_walk() -> None:
    """A nightly run rewrites only the rows it reads: after a new policy or salt, older
    attempts would keep what the old policy let through (their e-mails, in raw)."""
    recent = SyncState(watermark=NOW - timedelta(days=1), last_full_at=NOW - timedelta(days=3), rules=RULES)
    assert not plan(recent).full
    for policy in (PiiPolicy("hash", "pepper"), PiiPolicy("hash", "salt"), PiiPolicy("drop")):
        chosen = plan(recent, rules=policy.rules)
        assert chosen.full and "other rules" in chosen.reason and chosen.since is None, policy
    # A run under other rules wrote rows and did not complete: whatever the rules now.
    mixed = plan(replace(recent, rules=MIXED_RULES))
    assert mixed.full and "did not complete" in mixed.reason
    # A database from before the rules were recorded: the next full walk records them.
    assert not plan(replace(recent, rules=None), rules=PiiPolicy("drop").rules).full


def test_the_recorded_rules_tell_policies_and_salts_apart() -> None:
    digests = {PiiPolicy().rules, PiiPolicy("hash", "pepper").rules, PiiPolicy("hash", "salt").rules, PiiPolicy("drop").rules}
    assert len(digests) == 4
    assert PiiPolicy("hash", "pepper").rules == PiiPolicy("hash", "pepper").rules


def test_a_nightly_run_reads_attempts_since_the_last_run_less_the_lookback() -> None:
    chosen = plan(SyncState(watermark=NOW - timedelta(days=1), last_full_at=NOW - timedelta(days=3)))
    assert not chosen.full and chosen.since == NOW - timedelta(days=1, hours=6)
    # date_0 is a date in India's time: a day earlier than `since`, to be safe.
    assert chosen.attempt_window() == {"date_0": "2026-12-01"}


def test_open_attempts_are_read_again_up_to_a_day_into_the_window_and_no_further() -> None:
    chosen = plan(SyncState(watermark=NOW - timedelta(days=1), last_full_at=NOW - timedelta(days=3)))
    window = chosen.attempt_window()["date_0"]
    slices = chosen.open_before_window()
    assert slices == ({"state": "0", "date_1": "2026-12-02"}, {"state": "3", "date_1": "2026-12-02"})
    # The two overlap by a day, whatever date_1 includes: no attempt falls between them.
    assert all(piece["date_1"] > window for piece in slices)


def test_the_lookback_is_the_setting_or_the_longest_exam_plus_an_hour_at_least_six_hours() -> None:
    assert lookback_for(timedelta(hours=2), timedelta(hours=9)) == timedelta(hours=2)
    assert lookback_for(None, timedelta(hours=9)) == timedelta(hours=10)
    assert lookback_for(None, timedelta(hours=1)) == timedelta(hours=6)
    assert lookback_for(None, None) == timedelta(hours=6)
