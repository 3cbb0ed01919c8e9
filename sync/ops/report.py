"""What a run tells the people who operate it: the status table, the health verdict, the
summary file and Prometheus metrics. Pure functions over run records; no I/O here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sync.config import parse_duration
from sync.model.plan import SyncState
from sync.model.run import SUCCESSFUL, RunRecord


def parse_age(text: str) -> timedelta:
    """"26h", "90m", "2d", "45s" or plain seconds, for --max-age."""
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an age like 26h, 90m, 2d or 3600") from None


@dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str


def health(runs: Sequence[RunRecord], now: datetime, max_age: timedelta | None) -> Health:
    """Unhealthy when the last finished run failed or was interrupted, or when no run
    finished successfully within `max_age`. `runs` are newest first."""
    finished = [run for run in runs if run.status != "running"]
    if not finished:
        return Health(False, "no run has finished yet")
    last = finished[0]
    if last.status not in SUCCESSFUL:
        return Health(False, f"the last run ({last.id}) {last.status}: {last.error or 'no error text'}")
    if max_age is not None:
        success = next((run for run in finished if run.status in SUCCESSFUL), None)
        if success is None or success.started_at < now - max_age:
            return Health(False, f"no successful run started within the last {_human(max_age)}")
    return Health(True, f"the last run ({last.id}) {last.status}")


def status_table(runs: Sequence[RunRecord]) -> str:
    header = ("run", "started (UTC)", "duration", "mode", "source", "status", "changed", "unchanged", "errors")
    rows = [
        (
            str(run.id),
            run.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            "running" if run.duration is None else _human(run.duration),
            run.mode,
            run.source or "-",
            run.status,
            f"{run.rows_changed:,}",
            f"{run.rows_unchanged:,}",
            f"{run.errors:,}",
        )
        for run in runs
    ]
    if not rows:
        return "No runs recorded yet: `testpress-sync run` starts the first."
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)]
    return "\n".join(lines)


def sync_state_lines(state: SyncState, now: datetime, rules: str) -> list[str]:
    """Where the next admin run starts from, for `status`; `rules`: what a run with the
    current settings writes rows by (PiiPolicy.rules)."""
    if state.watermark is None:
        return ["Incremental state: none yet; the next admin run walks everything."]
    full = "never" if state.last_full_at is None else f"{_utc_text(state.last_full_at)} ({_human(now - state.last_full_at)} ago)"
    lines = [
        f"Attempts watermark: {_utc_text(state.watermark)} (the next nightly run reads attempts started since, less the lookback)",
        f"Last full walk: {full}",
    ]
    if state.rules_changed(rules):
        lines.append("Rows were written by other rules than these settings' ([sync] pii or pii_salt, as given to "
                     "status; or an upgrade): the next run walks everything and writes every row again.")  # fmt: skip
    return lines


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _human(span: timedelta) -> str:
    seconds = span.total_seconds()
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# --- Prometheus metrics ----------------------------------------------------------------------


@dataclass(frozen=True)
class MetricFamily:
    """One gauge and its samples (labels → value), before any rendering."""

    name: str
    help: str
    samples: tuple[tuple[dict[str, str], float], ...]


def metric_families(
    summary: dict[str, Any],
    finished_at: datetime,
    last_success_at: datetime | None,
    labels: Mapping[str, str] | None = None,
) -> list[MetricFamily]:
    """The end-of-run summary as gauges (each describes the latest run). `labels` go on
    every sample: which institute and schema the run was for, so several institutes can
    share one textfile directory or Pushgateway."""
    common = dict(labels or {})
    statuses = ("succeeded", "partial", "failed", "interrupted")
    by_table = summary.get("by_table", {})

    def family(name: str, help_text: str, samples: Sequence[tuple[dict[str, str], float]]) -> MetricFamily:
        return MetricFamily(f"testpress_sync_{name}", help_text, tuple(({**common, **own}, value) for own, value in samples))

    return [
        family("last_run_timestamp_seconds", "When the last run finished (Unix time).",
               [({}, finished_at.timestamp())]),
        family("last_success_timestamp_seconds", "When the last successful (succeeded or partial) run finished (Unix time); 0 if none.",
               [({}, last_success_at.timestamp() if last_success_at else 0)]),
        family("last_run_duration_seconds", "Wall time of the last run.", [({}, summary["duration_seconds"])]),
        family("last_run_status", "1 for the status the last run ended with.",
               [({"status": status}, float(summary["status"] == status)) for status in statuses]),
        family("last_run_rows", "Rows of the last run by table and outcome.",
               [({"table": table, "outcome": outcome}, counts[outcome])
                for table, counts in sorted(by_table.items())
                for outcome in ("inserted", "updated", "unchanged", "deleted")]),
        family("last_run_errors", "Items and pages of the last run that went to sync_errors.", [({}, summary["errors"])]),
        family("last_run_requests", "HTTP requests of the last run, retries included.", [({}, summary["requests"])]),
        family("last_run_retries", "HTTP retries of the last run.", [({}, summary["retries"])]),
        family("last_run_exams_seen", "Exams the last run fetched.", [({}, summary["exams_seen"])]),
        family("last_run_attempts_seen", "Attempts the last run fetched.", [({}, summary["attempts_seen"])]),
    ]  # fmt: skip


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(families: Sequence[MetricFamily]) -> str:
    """Prometheus text format, for node_exporter's textfile collector. Written here rather
    than by prometheus_client: its import would add ~50 ms to every run that writes the
    file, for ten gauges; the tests parse the result with prometheus_client's parser."""
    lines: list[str] = []
    for family in families:
        lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} gauge"]
        for labels, value in family.samples:
            rendered = ",".join(f'{key}="{_label_value(label)}"' for key, label in labels.items())
            number = f"{int(value)}" if float(value).is_integer() else repr(float(value))
            lines.append(f"{family.name}{{{rendered}}} {number}" if rendered else f"{family.name} {number}")
    return "\n".join(lines) + "\n"


def push_metrics(url: str, families: Sequence[MetricFamily], grouping_key: Mapping[str, str], timeout: float = 10.0) -> None:
    """PUT the gauges to a Prometheus Pushgateway (blocking: run it in a thread), replacing
    what this job and `grouping_key` pushed before. prometheus_client is imported only here."""
    from prometheus_client import CollectorRegistry, push_to_gateway
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class Families(Collector):
        def collect(self) -> Any:
            for family in families:
                names = sorted({key for labels, _ in family.samples for key in labels})
                gauge = GaugeMetricFamily(family.name, family.help, labels=names)
                for labels, value in family.samples:
                    gauge.add_metric([labels.get(name, "") for name in names], value)
                yield gauge

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    push_to_gateway(url, job="testpress_sync", registry=registry, grouping_key=dict(grouping_key), timeout=timeout)
