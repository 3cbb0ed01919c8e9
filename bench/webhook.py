"""The webhook scenario of the benchmark: `testpress-sync webhook` in a child process on
127.0.0.1 over a fresh database, `concurrency` senders posting signed deliveries (the
simulator's, signed before the clock starts), and what came back: deliveries accepted per
second, answer latency, the receiver's CPU and its mean group-commit size.

The senders run in this process, on the same two cores as the receiver (and PostgreSQL):
the figures are those of the whole exchange on one machine, not of the receiver alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from sync.simulator import Dataset
from sync.simulator.webhooks import DEMO_KEYS, Sent, deliveries, send_deliveries

WARM_UP = 500  # deliveries sent before the clock starts: connections, caches, the first commits


@dataclass(frozen=True)
class WebhookFigures:
    database: str
    deliveries: int
    accepted: int
    wall: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    receiver_cpu: float  # the child's user + system seconds, start-up included
    mean_batch: float  # deliveries per group commit, from the receiver's /metrics

    @property
    def per_second(self) -> float:
        return self.accepted / self.wall


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the receiver did not start (exit {process.poll()})")
        time.sleep(0.05)


def _mean_batch(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines() if line.startswith("testpress_sync_webhook_batch_size_"))
    }
    count = values.get("testpress_sync_webhook_batch_size_count", 0.0)
    return values.get("testpress_sync_webhook_batch_size_sum", 0.0) / count if count else 0.0


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_webhook(database_url: str, kind: str, count: int, concurrency: int) -> WebhookFigures:
    """Start the receiver on `database_url`, warm it up, send `count` deliveries with
    `concurrency` senders, stop it with SIGTERM (it must exit 0), and measure."""
    dataset = Dataset(exams=max(1, (count + WARM_UP) // 40), attempts_per_exam=60, users=2000)
    payloads = list(deliveries(dataset, DEMO_KEYS, limit=count + WARM_UP))
    if len(payloads) < count + WARM_UP:
        raise RuntimeError(f"the data set gives {len(payloads)} deliveries, not {count + WARM_UP}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "TESTPRESS_DATABASE_URL": database_url, "TESTPRESS_LOG_FORMAT": "json",
        "TESTPRESS_WEBHOOK_PUBLIC_KEY": DEMO_KEYS.public, "TESTPRESS_WEBHOOK_PRIVATE_KEY": DEMO_KEYS.private,
    }  # fmt: skip
    # In an empty folder: the receiver reads ./.env, and a developer's in the checkout must
    # not change what is measured.
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen([sys.executable, "-m", "sync", "webhook", "--port", str(port)], cwd=folder, env=env, stderr=err)
        try:
            wait_until_healthy(base, process)
            url = f"{base}/testpress/webhook"
            asyncio.run(send_deliveries(url, payloads[:WARM_UP], concurrency=concurrency))
            started = time.perf_counter()
            sent: list[Sent] = asyncio.run(send_deliveries(url, payloads[WARM_UP:], concurrency=concurrency))
            wall = time.perf_counter() - started
            mean_batch = _mean_batch(base)
        finally:
            process.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"the receiver exited {process.returncode}:\n{err.read().decode()[-2000:]}")
    latencies = [item.seconds * 1000 for item in sent]
    return WebhookFigures(
        database=kind,
        deliveries=len(sent),
        accepted=sum(1 for item in sent if item.status == 200),
        wall=wall,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        max_ms=max(latencies),
        receiver_cpu=usage.ru_utime + usage.ru_stime,
        mean_batch=mean_batch,
    )


def rows(figures: list[WebhookFigures]) -> list[list[str]]:
    return [
        [
            f.database, f"{f.deliveries:,}", f"{f.accepted:,}", f"{f.wall:.2f}", f"{f.per_second:,.0f}",
            f"{f.p50_ms:.1f}", f"{f.p99_ms:.1f}", f"{f.max_ms:.1f}", f"{f.receiver_cpu:.2f}", f"{f.mean_batch:.1f}",
        ]
        for f in figures
    ]  # fmt: skip


HEADER = ["db", "deliveries", "accepted", "wall s", "accepted/s", "p50 ms", "p99 ms", "max ms", "receiver cpu s", "mean batch"]


def as_json(figures: list[WebhookFigures]) -> str:
    return json.dumps([{**f.__dict__, "per_second": f.per_second} for f in figures])
