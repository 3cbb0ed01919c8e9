"""One exception root, split by what the caller should do next.

    SyncError                      anything testpress-sync raises on purpose
    ├── ConfigError                a setting is missing or invalid        → exit 2
    ├── AuthError                  the login was refused                  → exit 3
    ├── DatabaseError              unreachable, or schema not usable      → exit 4
    ├── LockHeldError              another run holds this database        → exit 5
    ├── ThrottledError             the API asks us to wait longer than we may → the run stops
    ├── ApiError                   an HTTP exchange that did not give data
    │   ├── RetriableError         429, 5xx, timeout, reset, bad body     → retry
    │   │   └── TokenExpiredError  401: log in again, then retry
    │   └── SkippableError         403 / 404 on a resource                → record, go on
    │       (other ApiError)       a response we cannot use               → record, go on
    └── RecordError                one item failed to normalize           → sync_errors

Exit codes are mapped from these in sync.cli only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class SyncError(Exception):
    """Root of every error testpress-sync raises on purpose."""


class ConfigError(SyncError):
    """A setting is missing or invalid. The message names it."""


CREDENTIALS_HINT = "check TESTPRESS_USERNAME and the password (TESTPRESS_PASSWORD or TESTPRESS_PASSWORD_FILE)"


class AuthError(SyncError):
    """The server refused the login, or what the login may read does not suffice.
    `hint` says what to do: the credentials, unless the message says otherwise (a
    refusal on purpose, a student login where an admin one is needed)."""

    def __init__(self, message: str, *, hint: str = CREDENTIALS_HINT) -> None:
        super().__init__(message)
        self.hint = hint


class DatabaseError(SyncError):
    """The database cannot be reached, or its schema is not one we can write to."""


class LockHeldError(SyncError):
    """Another testpress-sync run holds the lock on this database."""


class ThrottledError(SyncError):
    """The API asked us to wait longer than max_retry_wait: stop instead of hanging."""


class ApiError(SyncError):
    """An HTTP exchange that did not produce usable data."""

    def __init__(self, message: str, *, url: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.code = code  # Testpress's own error_code, when the answer names one


class RetriableError(ApiError):
    """Worth trying again: throttling, server errors, network trouble, a garbled body."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.retry_after = retry_after


class TokenExpiredError(RetriableError):
    """401: the token is missing, invalid or expired; log in again and retry."""


class LoginRefusedError(ApiError):
    """The server refuses this account's session on purpose (an `error_code` such as
    parallel_login_restriction), on a login or on any later request: never retried, as
    another login would make it worse."""


class SkippableError(ApiError):
    """403 / 404: the resource is not ours to read; normal, not a failure of the run."""


class RecordError(SyncError):
    """One item of a page could not be turned into a row."""


def error_text(error: BaseException, limit: int = 500) -> str:
    """One line for a run record: a driver error's own first line, not SQLAlchemy's
    statement and its hundreds of bound parameters."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    text = f"{type(original).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def first_error() -> Iterator[None]:
    """Around an asyncio.TaskGroup: its failure raised as the first error in it, not as an
    ExceptionGroup. Several tasks often hit the same fatal error (a refused login, a lost
    database); the first says it once, and the exit code follows its class (sync.cli)."""
    try:
        yield
    except BaseExceptionGroup as failure:
        raise failure.exceptions[0] from None
