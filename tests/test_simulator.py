"""The simulator's payloads are a pure function of its data: drawn once, never stale."""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from sync.model.normalize import attempt_row
from sync.simulator import Dataset, Faults
from sync.simulator.app import STATE_KEY, SimulatorState, accounting

BASE = "http://127.0.0.1:9"


def test_an_attempt_payload_follows_its_state_both_ways() -> None:
    dataset = Dataset(exams=3, attempts_per_exam=20, users=10)
    exam = dataset.exams[0]
    attempt = next(a for a in exam.attempts if a.state == "Completed")
    completed = dataset.attempt_payload(exam, attempt, BASE)
    attempt.state = "Running"
    running = dataset.attempt_payload(exam, attempt, BASE)
    assert running["state"] == "Running" and running["correct_count"] == 0 and running["score"] == 0
    assert running["max_rank"] == "NA" != completed["max_rank"]
    attempt.state = "Completed"
    assert dataset.attempt_payload(exam, attempt, BASE) == completed


def test_payloads_depend_on_the_seed_and_the_attempt_alone() -> None:
    first, second = Dataset(exams=4, attempts_per_exam=10, seed=3), Dataset(exams=4, attempts_per_exam=10, seed=3)
    for exam_a, exam_b in zip(first.exams, second.exams, strict=True):
        for a, b in zip(exam_a.attempts, exam_b.attempts, strict=True):
            assert first.attempt_payload(exam_a, a, BASE) == second.attempt_payload(exam_b, b, BASE)
    other = Dataset(exams=4, attempts_per_exam=10, seed=4)
    assert [other.attempt_payload(e, a, BASE)["time_taken"] for e in other.exams for a in e.attempts] != [
        first.attempt_payload(e, a, BASE)["time_taken"] for e in first.exams for a in e.attempts
    ]


def test_every_served_attempt_normalizes() -> None:
    dataset = Dataset(exams=5, attempts_per_exam=40, users=30)
    for exam in dataset.exams:
        for attempt in exam.attempts:
            row, user = attempt_row(dataset.attempt_payload(exam, attempt, BASE), exam.id)
            assert row["id"] == attempt.id and user["username"] == attempt.user.username
            assert row["date"] is not None and row["date"].utcoffset() is not None


async def test_latency_is_the_time_to_answer_rendering_included() -> None:
    """The benchmark's ideal assumes every request takes the latency. Waiting first and
    rendering after would add the simulator's own CPU to every request, and with many in
    flight on its one thread, queue them behind one another."""
    rendering, latency = 0.1, 0.3

    async def slow_page(request: web.Request) -> web.Response:
        time.sleep(rendering)  # CPU work, holding the loop as rendering a big page does
        return web.json_response({"results": []})

    app = web.Application(middlewares=[accounting])
    app[STATE_KEY] = SimulatorState(faults=Faults(latency=latency))
    app.router.add_get("/api/v2.1/exams/", slow_page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            started = time.perf_counter()
            async with http.get(f"http://127.0.0.1:{port}/api/v2.1/exams/") as response:
                assert response.status == 200
            elapsed = time.perf_counter() - started
    finally:
        await runner.cleanup()
    assert latency <= elapsed < latency + rendering / 2
