"""The API client against the simulator on loopback: login, re-login, retries, bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sync.errors import ApiError, AuthError, RetriableError, SkippableError
from sync.ops.logs import Redactor
from sync.simulator import SimulatorServer
from sync.source.client import TestpressClient, open_session
from tests.conftest import fast_settings


class RecordedSleep:
    """Stands in for asyncio.sleep: remembers each wait, waits for nothing."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleep() -> RecordedSleep:
    return RecordedSleep()


@pytest.fixture
async def client(simulator: SimulatorServer, sleep: RecordedSleep) -> AsyncIterator[TestpressClient]:
    settings = fast_settings(simulator.base_url, "sqlite://", concurrency=4, max_attempts=8)
    async with open_session(settings.api, settings.http) as session:
        yield TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)


def exams_url(simulator: SimulatorServer) -> str:
    return f"{simulator.base_url}/api/v2.1/exams/"


async def test_logs_in_once_and_reads_pages(client: TestpressClient, simulator: SimulatorServer) -> None:
    first = await client.get_json(exams_url(simulator))
    second = await client.get_json(f"{exams_url(simulator)}?page=1")
    assert first["count"] == second["count"] == len(simulator.dataset.exams)
    assert simulator.state.logins == 1
    assert client.stats.requests == 3 and client.stats.logins == 1


async def test_wrong_password_is_an_auth_error_without_the_password(simulator: SimulatorServer) -> None:
    settings = fast_settings(simulator.base_url, "sqlite://")
    wrong = settings.api.__class__(base_url=simulator.base_url, username="teacher", password="not-it-at-all")
    async with open_session(wrong, settings.http) as session:
        client = TestpressClient(session, wrong, settings.http, Redactor())
        with pytest.raises(AuthError, match="Unable to log in") as caught:
            await client.get_json(exams_url(simulator))
    assert "not-it-at-all" not in str(caught.value)
    assert simulator.state.logins == 0
    assert simulator.state.requests == 1  # a refused login is not retried


async def test_expired_token_causes_one_login_for_all_requests_in_flight(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    simulator.state.faults.token_lifetime = 0.3
    await client.get_json(exams_url(simulator))
    await asyncio.sleep(0.4)  # the token has expired now
    simulator.state.faults.token_lifetime = 3600
    pages = await asyncio.gather(*(client.get_json(exams_url(simulator)) for _ in range(12)))
    assert all(page["results"] for page in pages)
    assert simulator.state.logins == 2


async def test_throttling_waits_what_retry_after_says(
    client: TestpressClient, simulator: SimulatorServer, sleep: RecordedSleep
) -> None:
    simulator.state.faults.throttle_rate = 0.5
    simulator.state.faults.retry_after = 7
    urls = [f"{simulator.base_url}/api/v2.1/exams/{exam.slug}/attempts/" for exam in simulator.dataset.exams if not exam.forbidden]
    pages = await asyncio.gather(*(client.get_json(url) for url in urls))
    assert [page["count"] for page in pages] == [45] * len(urls)
    assert client.stats.retries > 0
    # Every wait is the server's 7 seconds (or what is left of it, for the requests that
    # were paused because another one was throttled), never an exponential backoff.
    assert max(sleep.waits) == 7.0 and all(6.0 < wait <= 7.0 for wait in sleep.waits)


async def test_retry_after_is_honoured_beyond_backoff_max(simulator: SimulatorServer, sleep: RecordedSleep) -> None:
    settings = fast_settings(simulator.base_url, "sqlite://", backoff_max=0.5, max_attempts=4)
    simulator.state.faults.throttle_rate = 1.0
    simulator.state.faults.retry_after = 2
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)
        with pytest.raises(ApiError, match="login failed: HTTP 429"):
            await client.get_json(exams_url(simulator))
    # Every try of the login was throttled and waited the server's 2 seconds; the request
    # waiting on the login did not retry it all over again.
    assert simulator.state.requests == 4
    assert sleep.waits and all(1.9 < wait <= 2.0 for wait in sleep.waits)


async def test_a_throttled_request_pauses_the_next_ones_too(
    simulator: SimulatorServer, sleep: RecordedSleep
) -> None:
    settings = fast_settings(simulator.base_url, "sqlite://", max_attempts=1)
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)
        await client.login()
        simulator.state.faults.throttle_rate = 1.0
        simulator.state.faults.retry_after = 5
        with pytest.raises(RetriableError, match="429"):
            await client.get_json(exams_url(simulator))
        simulator.state.faults.throttle_rate = 0.0
        page = await client.get_json(f"{exams_url(simulator)}?page=1")
    assert page["count"] == len(simulator.dataset.exams)
    assert len(sleep.waits) == 1 and 4.9 < sleep.waits[0] <= 5.0


@pytest.mark.parametrize("fault", ["server_error_rate", "drop_rate", "truncate_rate"])
async def test_server_errors_resets_and_truncated_bodies_are_retried(
    client: TestpressClient, simulator: SimulatorServer, fault: str
) -> None:
    clean = await client.get_json(exams_url(simulator))
    setattr(simulator.state.faults, fault, 0.5)
    pages = await asyncio.gather(*(client.get_json(exams_url(simulator)) for _ in range(10)))
    assert all(page == clean for page in pages)
    assert client.stats.retries > 0 and simulator.state.faults_served > 0


async def test_attempts_per_request_are_bounded(simulator: SimulatorServer, sleep: RecordedSleep) -> None:
    settings = fast_settings(simulator.base_url, "sqlite://", max_attempts=3)
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)
        await client.login()
        simulator.state.faults.server_error_rate = 1.0
        before = simulator.state.requests
        with pytest.raises(RetriableError):
            await client.get_json(exams_url(simulator))
    assert simulator.state.requests - before == 3


async def test_timeouts_are_retried_then_reported(simulator: SimulatorServer, sleep: RecordedSleep) -> None:
    settings = fast_settings(simulator.base_url, "sqlite://", timeout=0.2, max_attempts=2)
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)
        await client.login()
        simulator.state.faults.latency = 1.0
        with pytest.raises(RetriableError, match="timed out"):
            await client.get_json(exams_url(simulator))
    assert client.stats.retries == 1


async def test_forbidden_is_skippable_not_retried(client: TestpressClient, simulator: SimulatorServer) -> None:
    forbidden = next(exam for exam in simulator.dataset.exams if exam.forbidden)
    with pytest.raises(SkippableError) as caught:
        await client.get_json(f"{simulator.base_url}/api/v2.1/exams/{forbidden.slug}/attempts/")
    assert caught.value.status == 403 and client.stats.retries == 0


async def test_requests_in_flight_never_exceed_the_limit(client: TestpressClient, simulator: SimulatorServer) -> None:
    simulator.state.faults.latency = 0.03
    await asyncio.gather(*(client.get_json(exams_url(simulator)) for _ in range(24)))
    assert simulator.state.max_in_flight == 4  # the limit, reached and never passed


async def test_a_url_that_cannot_be_requested_is_an_api_error_not_a_crash(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """Attempts URLs come from the server's data; a strange one fails its page, not the run."""
    with pytest.raises(ApiError, match="cannot request it.*not an http"):
        await client.get_json("ftp://127.0.0.1/api/v2.1/exams/x/attempts/")
    assert client.stats.retries == 0
