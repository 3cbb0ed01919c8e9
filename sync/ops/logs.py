"""Logging: structlog configured in one place, secrets redacted before anything is written.

Readable lines on a terminal, JSON lines otherwise (or with --log-format json). The run id
is bound through contextvars, so every line of a run carries it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

REDACTED = "[redacted]"


class Redactor:
    """Knows the secrets of this process (password, tokens) and blanks them out of text."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        # Very short strings would blank out ordinary words; no real secret is that short.
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def add_url_password(self, url: str | None) -> None:
        """The password inside a URL (a proxy's http://user:password@host:port), both as
        written (percent-encoded) and decoded: either form may reach a message."""
        if not url or "@" not in url:
            return
        try:
            password = urlsplit(url).password
        except ValueError:  # a malformed port: the password part is still a secret
            password = url.rpartition("@")[0].partition("://")[2].partition(":")[2] or None
        if password:
            self.add(password)
            self.add(unquote(password))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self.redact_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_value(item) for item in value]
        if isinstance(value, BaseException):
            return self.redact(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: every value of every event, redacted."""
        for key, value in event.items():
            event[key] = self.redact_value(value)
        return event


def configure_logging(
    redactor: Redactor, *, format: str = "auto", level: str = "info", stream: Any = None
) -> None:
    """`stream`: where lines go (stderr by default); anything with write, flush, isatty."""
    stream = stream or sys.stderr
    console = format == "console" or (format == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,  # last before rendering: nothing reaches the stream unredacted
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
