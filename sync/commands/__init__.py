"""The commands: each one a composition root that opens what it needs (the database, the
HTTP session, the simulator) from parsed settings and delegates. They return an Outcome or
raise from the error tree (sync.errors); only the CLI turns either into an exit code."""

from __future__ import annotations

import enum

from sync.errors import SyncError


class Outcome(enum.Enum):
    OK = "ok"  # done; `status`: healthy
    INCOMPLETE = "incomplete"  # finished, with errors in sync_errors; `status`: unhealthy


# What a command gives the CLI: an outcome, or the kind of error it found and reported
# itself (`doctor` prints its checks, then names the first failure's kind).
Result = Outcome | type[SyncError]
