"""The exam webhook as Testpress sends it: signed deliveries of a data set's attempts, in
either era, good and bad, and a sender that POSTs them to a receiver. For the tests, the
demo (`testpress-sync simulate --webhook-url URL`) and the benchmark.

    delivery(dataset, exam, attempt, state, era)   one unsigned delivery (testpress-api.md)
    signed(payload, keys) / tampered(...) / unsigned(...)
    deliveries(dataset, keys, ...)                 a stream: every attempt started, then the
                                                   completed ones completed, with duplicates,
                                                   reorderings and tampered ones mixed in
    send_deliveries(url, deliveries, concurrency)  POST them, N at a time; status and latency

The signature is computed here from the documented formula, independently of the
receiver's own code (sync.source.webhook): a receiver that verifies what the simulator
signs agrees with the documentation, not merely with itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sync.simulator.app import DATASET_KEY, json_response
from sync.simulator.data import Dataset, SimAttempt, SimExam, ist_micro_text, utc_micro_text

Payload = dict[str, Any]

# The keys `simulate --webhook-url` signs with: start the receiver with these to try it.
DEMO_PUBLIC_KEY = "simulator-public-key"
DEMO_PRIVATE_KEY = "simulator-private-key-not-secret"


@dataclass(frozen=True)
class WebhookKeys:
    public: str
    private: str


DEMO_KEYS = WebhookKeys(DEMO_PUBLIC_KEY, DEMO_PRIVATE_KEY)


# --- one delivery --------------------------------------------------------------------------


def delivery(dataset: Dataset, exam: SimExam, attempt: SimAttempt, state: str, *, era: int = 2023) -> Payload:
    """What Testpress posts when `attempt` is started or completed (`state`), unsigned. The
    2019 era knows only completion, and sends every scalar as a string."""
    if state not in ("started", "completed"):
        raise ValueError(f"state {state!r}: started or completed")
    exam_payload = dataset.exam_payload(exam, "")
    scores = dataset.scores(attempt)
    completed = state == "completed"
    correct = scores.correct if completed else 0
    incorrect = scores.incorrect if completed else 0
    unanswered = scores.total - correct - incorrect
    answered = correct + incorrect
    user = attempt.user
    payload: Payload = {
        "username": user.username,
        "user_id": user.id,
        "email": f"{user.username}@example.com",
        "attempt_id": attempt.id,
        "attempt_state": state,
        "attempt_start_time": utc_micro_text(attempt.started),
        "completed_on": ist_micro_text(attempt.started + timedelta(minutes=30)) if completed else None,
        "exam": {
            "id": exam.id,
            "title": exam.title,
            "duration": exam_payload["duration"],
            "start_date": exam_payload["start_date"],
            "end_date": exam_payload["end_date"],
        },
        "correct_answers_count": correct,
        "incorrect_answers_count": incorrect,
        "unanswered_answers_count": unanswered,
        "partial_correct_answers_count": 0 if completed else None,
        "score": f"{correct * 2 - incorrect * 0.5:.2f}",
        "percentage": f"{100 * correct / scores.total:.2f}",
        "speed": dataset.speed(attempt) if completed else 0,
        "accuracy": round(100 * correct / answered) if answered else 0,
        "subject_stats": [],
        "difficulty_level_stats": {},
        "institute_attempt_id": None,
    }
    if era == 2019:
        return _as_2019(payload)
    if era != 2023:
        raise ValueError(f"era {era}: 2019 or 2023")
    return payload


def _as_2019(payload: Payload) -> Payload:
    """The 2019 sample's shape: no state or start time (it was sent on completion), every
    scalar a string, the exam object as it was."""
    if payload["attempt_state"] != "completed":
        raise ValueError("2019 deliveries were sent on completion only")
    dropped = ("attempt_state", "attempt_start_time", "completed_on", "subject_stats", "difficulty_level_stats", "institute_attempt_id")
    return {
        name: value if name == "exam" else ("" if value is None else str(value))
        for name, value in payload.items()
        if name not in dropped
    }


def signature(payload: Payload, keys: WebhookKeys) -> str:
    """The documented HMAC-SHA512 over the values as sent (testpress-api.md)."""
    message = "|".join([
        keys.public, str(payload["attempt_id"]), str(payload["correct_answers_count"]), keys.private,
        str(payload["incorrect_answers_count"]), str(payload["unanswered_answers_count"]),
        str(payload["percentage"]), str(payload["score"]), str(payload["user_id"]),
    ])  # fmt: skip
    return hmac.new(keys.private.encode(), message.encode(), hashlib.sha512).hexdigest()


def signed(payload: Payload, keys: WebhookKeys) -> Payload:
    return {**payload, "key": keys.public, "hash": signature(payload, keys)}


def tampered(signed_payload: Payload) -> Payload:
    """A signed delivery whose score was raised after it was signed."""
    score = signed_payload["score"]
    raised = f"{float(score) + 10:.2f}"
    return {**signed_payload, "score": raised}


def unsigned(payload: Payload) -> Payload:
    return {name: value for name, value in payload.items() if name not in ("key", "hash")}


# --- a stream of deliveries -----------------------------------------------------------------


def deliveries(
    dataset: Dataset,
    keys: WebhookKeys,
    *,
    limit: int | None = None,
    era: int = 2023,
    duplicates: float = 0.0,
    reordered: float = 0.0,
    tampered_share: float = 0.0,
    seed: int = 5,
) -> Iterator[Payload]:
    """Signed deliveries of the data set's attempts: each one started, then (if it is
    completed) completed; `limit` deliveries at most. A share of them is sent twice
    (`duplicates`), has its completion sent before its start (`reordered`), or is
    tampered with after signing (`tampered_share`). 2019 sends completions only."""
    rng = random.Random(seed)
    sent = 0
    for exam, attempt in dataset.attempts_by_id():
        if exam.forbidden or exam.vanished or attempt.state == "Not Started":
            continue
        states = ["completed"] if era == 2019 else ["started"]
        if attempt.state == "Completed" and era != 2019:
            states.append("completed")
        batch = [signed(delivery(dataset, exam, attempt, state, era=era), keys) for state in states]
        if len(batch) == 2 and rng.random() < reordered:
            batch.reverse()
        if rng.random() < duplicates:
            batch.append(batch[-1])
        if rng.random() < tampered_share:
            batch.append(tampered(batch[-1]))
        for item in batch:
            if limit is not None and sent >= limit:
                return
            sent += 1
            yield item


# --- sending -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One delivery's fate: the status it was answered with (0: no answer, the connection
    failed) and how long the answer took."""

    payload: Payload
    status: int
    seconds: float


async def send_deliveries(
    url: str,
    payloads: Iterable[Payload],
    *,
    concurrency: int = 32,
    timeout: float = 10.0,
    on_sent: Callable[[Sent], None] | None = None,
) -> list[Sent]:
    """POST each payload as JSON to `url`, `concurrency` at a time (each sender on a
    keep-alive connection of its own), until all are sent."""
    pending = iter(payloads)
    results: list[Sent] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def sender() -> None:
            for payload in pending:  # one shared iterator: each payload goes once
                body = orjson.dumps(payload)
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                sent = Sent(payload, status, time.perf_counter() - started)
                results.append(sent)
                if on_sent is not None:
                    on_sent(sent)

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return results


def statuses(results: Sequence[Sent]) -> dict[int, int]:
    """How many deliveries got each status."""
    counts: dict[int, int] = {}
    for sent in results:
        counts[sent.status] = counts.get(sent.status, 0) + 1
    return counts


# --- the control route ----------------------------------------------------------------------


async def control_webhooks(request: web.Request) -> web.Response:
    """POST /_simulator/webhooks {"url": ..., "public_key"?, "private_key"?, "limit"?, "era"?,
    "duplicates"?, "reordered"?, "tampered"?, "concurrency"?}: send the data set's
    deliveries to `url` and say how they were answered."""
    options = await request.json()
    try:
        keys = WebhookKeys(options.get("public_key", DEMO_PUBLIC_KEY), options.get("private_key", DEMO_PRIVATE_KEY))
        stream = deliveries(
            request.app[DATASET_KEY], keys,
            limit=options.get("limit"), era=int(options.get("era", 2023)),
            duplicates=float(options.get("duplicates", 0)), reordered=float(options.get("reordered", 0)),
            tampered_share=float(options.get("tampered", 0)),
        )  # fmt: skip
        results = await send_deliveries(str(options["url"]), stream, concurrency=int(options.get("concurrency", 8)))
    except (KeyError, ValueError, TypeError) as exc:
        return json_response({"detail": f"{type(exc).__name__}: {exc}"}, 400)
    return json_response({"sent": len(results), "statuses": {str(code): count for code, count in statuses(results).items()}})
