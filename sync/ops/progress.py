"""A live progress line at the bottom of a terminal, with log lines printed above it.

Only on a terminal: under cron or in a container the logs are the record, and a line
redrawn twice a second would be noise in them.
"""

from __future__ import annotations

from typing import TextIO

from sync.model.run import Progress


def progress_text(progress: Progress) -> str:
    """"exams 120/1,000 · 3,450 attempts · 41 req/s · 2 retries · ~1m20s left"."""
    rate = progress.requests / progress.elapsed if progress.elapsed >= 1 else 0.0  # the first tick: too few to tell
    total: int | None
    if progress.by_attempts:  # an admin run: attempts come from one listing
        done, total = progress.attempts_seen, progress.attempts_total
        parts = [f"attempts {done:,}/{total:,}" if total is not None else f"attempts {done:,}/…"]
    else:
        done, total = progress.exams_done, progress.exams_total
        parts = [f"exams {done:,}/{total:,}" if total is not None else "exams …", f"{progress.attempts_seen:,} attempts"]
    parts += [f"{rate:,.0f} req/s", f"{progress.retries:,} retries"]
    if total and 0 < done < total:
        parts.append(f"~{_clock(progress.elapsed / done * (total - done))} left")
    return " · ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TerminalStatus:
    """A stream for the log renderer that keeps one status line under the log lines.

    structlog prints each line with print(…, flush=True): we clear the status line before
    the line is written and draw it again on the flush."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._status = ""
        self._shown = False

    def show(self, progress: Progress) -> None:
        if progress.done:  # the summary line says the rest
            self.clear()
            return
        self._status = progress_text(progress)
        self._draw()

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
        self._status = ""

    def write(self, text: str) -> int:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._shown = False
        return self._stream.write(text)

    def flush(self) -> None:
        self._draw()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def _draw(self) -> None:
        if self._status and not self._shown:
            self._stream.write(self._status)
            self._shown = True
        elif self._status:
            self._stream.write("\r\x1b[K" + self._status)
        self._stream.flush()
