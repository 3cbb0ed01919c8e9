"""`migrate` and `status`: the database's schema and the record of its runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import structlog

from schema import sync_runs, sync_state
from sync.commands import Outcome
from sync.commands.sync import open_database
from sync.config import Settings
from sync.model.plan import SyncState
from sync.ops.report import health, status_table, sync_state_lines
from sync.run import pii_policy
from sync.sink import store
from sync.sink.database import database_url_from, describe, migrate, missing_database_file, schema_state

log = structlog.get_logger("testpress_sync.commands")


async def migrate_database(settings: Settings) -> Outcome:
    engine = open_database(settings)
    try:
        before, after = await migrate(engine)
    finally:
        await engine.dispose()
    if before == after:
        log.info("schema_up_to_date", database=describe(engine.url), revision=after)
    else:
        log.info("schema_migrated", database=describe(engine.url), before=before, after=after)
    return Outcome.OK


async def show_status(
    settings: Settings, *, limit: int, as_json: bool, max_age: timedelta | None
) -> Outcome:
    """The last runs; INCOMPLETE when the last one failed or no success is recent."""
    missing = missing_database_file(database_url_from(settings.database_url))
    runs = []
    attempts_state = SyncState()
    engine = open_database(settings)
    try:
        state = None if missing else await schema_state(engine)  # reads; never writes
        if state is not None and state.current is not None and state.known:
            async with engine.connect() as connection:
                # A schema the next run will migrate is read for what it holds.
                behind = not state.up_to_date
                run_columns = await store.columns_of(connection, sync_runs) if behind else None
                state_columns = await store.columns_of(connection, sync_state) if behind else None
                runs = await store.recent_runs(connection, limit, run_columns)
                attempts_state = await store.read_sync_state(connection, "attempts", state_columns)
    finally:
        await engine.dispose()
    now = datetime.now(UTC)
    verdict = health(runs, now, max_age)
    rules = pii_policy(settings).rules
    if as_json:
        document = {
            "healthy": verdict.healthy, "reason": verdict.reason, "runs": [run.as_dict() for run in runs],
            "sync_state": {"attempts": {
                "watermark": attempts_state.watermark.isoformat() if attempts_state.watermark else None,
                "last_full_at": attempts_state.last_full_at.isoformat() if attempts_state.last_full_at else None,
                "rules_changed": attempts_state.rules_changed(rules),
            }},
        }  # fmt: skip
        print(json.dumps(document, indent=2))
    else:
        if missing:
            print(f"No database at {missing} yet: the first `testpress-sync run` creates it.")
        else:
            print(status_table(runs))
            if runs and any(run.source == "admin" for run in runs):
                print("\n" + "\n".join(sync_state_lines(attempts_state, now, rules)))
        print(f"\n{'OK' if verdict.healthy else 'UNHEALTHY'}: {verdict.reason}")
    return Outcome.OK if verdict.healthy else Outcome.INCOMPLETE
