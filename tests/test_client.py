"""The API client against real servers on loopback: the simulator for the API's behaviour
(login, re-login, retries, bounds), a small asyncio server that answers with exact bytes
for what a well-behaved server never does (stale keep-alive connections, cut and
malformed answers, silence), and small aiohttp apps for redirects."""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import pytest
import structlog.testing
from aiohttp import web

from sync.errors import ApiError, AuthError, RetriableError, SkippableError
from sync.ops.logs import Redactor
from sync.simulator import SimulatorServer
from sync.source.access import choose_source
from sync.source.client import TestpressClient, TokenAuth, judge_403, open_session
from sync.source.responses import redirect_target
from tests.conftest import PASSWORD, USERNAME, fast_settings, small_dataset


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The developer's own HTTP(S)_PROXY must not carry these loopback requests."""
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    yield


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


async def test_a_403_to_a_token_past_its_expiry_is_a_token_question_on_a_route_not_yet_answered(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """The token expired before the first attempt listing of the run answered: its 403 is
    still a token question (the token's own `exp` says so), not a forbidden exam."""
    simulator.state.faults.expired_token_status, simulator.state.faults.token_lifetime = 403, 0.2
    await client.get_json(exams_url(simulator), route="exams")
    await asyncio.sleep(0.3)  # the token has expired now
    simulator.state.faults.token_lifetime = 3600
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    page = await client.get_json(f"{simulator.base_url}/api/v2.1/exams/{exam.slug}/attempts/", route="attempts")
    assert page["results"] and simulator.state.logins == 2
    forbidden = next(exam for exam in simulator.dataset.exams if exam.forbidden)
    with pytest.raises(SkippableError):  # the token still reads the listing: a forbidden exam
        await client.get_json(f"{simulator.base_url}/api/v2.1/exams/{forbidden.slug}/attempts/", route="attempts")
    assert simulator.state.logins == 2


async def test_a_403_is_a_token_question_whatever_the_tokens_exp(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """The server ended the session while the token's `exp` is an hour away (a login
    elsewhere, a server clock ahead of ours), before any attempt listing answered: the
    403 costs one login, not an exam. A forbidden exam, to a token that still reads the
    listing, costs no login at all."""
    simulator.state.faults.expired_token_status = 403

    def attempts_url(exam: Any) -> str:
        return f"{simulator.base_url}/api/v2.1/exams/{exam.slug}/attempts/"

    allowed = [exam for exam in simulator.dataset.exams if not exam.forbidden]
    forbidden = [exam for exam in simulator.dataset.exams if exam.forbidden]
    await client.get_json(exams_url(simulator), route="exams")
    simulator.state.sessions_valid_from = simulator.state.logins + 1  # every session so far ends
    pages = await asyncio.gather(*(client.get_json(attempts_url(exam), route="attempts") for exam in allowed[:4]))
    assert all(page["results"] for page in pages) and simulator.state.logins == 2
    for exam in forbidden[:2]:
        with pytest.raises(SkippableError):
            await client.get_json(attempts_url(exam), route="attempts")
    assert simulator.state.logins == 2
    # A forbidden exam vouches for nothing: the session ending again costs one more login.
    simulator.state.sessions_valid_from = simulator.state.logins + 1
    assert (await client.get_json(attempts_url(allowed[5]), route="attempts"))["results"]
    assert simulator.state.logins == 3


@pytest.mark.parametrize(
    ("replaced", "expired", "reads", "worked", "verdict"),
    [
        (True, False, True, True, "token"),  # replaced since it was sent: ask again with the new one
        (False, True, True, True, "token"),  # its own exp has passed
        (False, False, True, True, "item"),  # still reads what it read: a forbidden exam, no login
        (False, False, True, False, "item"),
        (False, False, False, True, "token"),  # refused there too: log in once
        (False, False, False, False, "stop"),  # a new token refused there: the account lost its access
        (False, False, None, True, "token"),  # those pages are gone or failing: one login decides
        (False, False, None, False, "item"),  # nothing to tell by, and a new token: the 403 stands
    ],
)
def test_how_a_403_is_judged(replaced: bool, expired: bool, reads: bool | None, worked: bool, verdict: str) -> None:
    assert judge_403(replaced=replaced, expired=expired, reads=reads, worked=worked) == verdict


async def test_a_server_that_refuses_every_new_token_stops_the_run_after_one_login(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """Not a login loop, and not every exam marked forbidden: once a new token is refused
    where the run's first answer came from, the account has lost its access."""
    simulator.state.faults.expired_token_status = 403
    await client.get_json(exams_url(simulator), route="exams")
    simulator.state.sessions_valid_from = 10**9  # every session, now and to come
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    with pytest.raises(AuthError, match="refuses a new token"):
        await client.get_json(f"{simulator.base_url}/api/v2.1/exams/{exam.slug}/attempts/", route="attempts")
    assert simulator.state.logins == 2


async def test_a_server_that_answers_every_new_token_401_stops_the_run_after_one_login(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """The API notes: on a 401, log in again once, then retry. A new token refused too,
    where the run's pages answered before, is an account that lost its access: the run
    stops (exit 3), after one login, not a login per request or per retry."""
    await client.get_json(exams_url(simulator), route="exams")
    simulator.state.sessions_valid_from = 10**9  # every session, now and to come: 401
    exam = next(exam for exam in simulator.dataset.exams if not exam.forbidden)
    with pytest.raises(AuthError, match="refuses a new token"):
        await client.get_json(f"{simulator.base_url}/api/v2.1/exams/{exam.slug}/attempts/", route="attempts")
    assert simulator.state.logins == 2


@asynccontextmanager
async def student_client(sleep: RecordedSleep, admin_status: int) -> AsyncIterator[tuple[TestpressClient, SimulatorServer]]:
    """A student login's client on a simulator whose admin routes answer it `admin_status`."""
    async with SimulatorServer(small_dataset(), username=USERNAME, password=PASSWORD,
                               student_username="pupil", student_password="pupil-pw") as server:  # fmt: skip
        server.state.student_admin_status = admin_status
        settings = fast_settings(server.base_url, "sqlite://", max_attempts=8)
        api = replace(settings.api, username="pupil", password="pupil-pw", source="auto")
        async with open_session(api, settings.http) as session:
            yield TestpressClient(session, api, settings.http, Redactor(), sleep=sleep), server


async def test_401s_a_login_does_not_cure_cost_one_login_and_a_real_expiry_still_logs_in(sleep: RecordedSleep) -> None:
    """Routes that answer this login 401 rather than 403: one more login, then each such
    401 is checked against a page that answered (one GET) and stands, with no login. A
    session that really ends later is still renewed: the check says the token is dead."""
    async with student_client(sleep, admin_status=401) as (client, server):
        assert (await client.get_json(exams_url(server)))["results"]
        for _ in range(4):
            with pytest.raises(SkippableError) as refused:
                await client.get_json(f"{server.base_url}/api/v2.5/admin/batches/")
            assert refused.value.status == 401
        assert server.state.logins == 2
        server.state.sessions_valid_from = server.state.logins + 1  # every session so far ends
        assert (await client.get_json(exams_url(server)))["results"]
        assert server.state.logins == 3


async def test_a_student_login_answered_401_on_admin_routes_reads_the_student_api(sleep: RecordedSleep) -> None:
    """The source check of a student login, where the server answers 401 rather than the
    documented 403: the student API, after one more login, not a loop of them."""
    async with student_client(sleep, admin_status=401) as (client, server):
        chosen = await choose_source(client, "auto")
        assert (await client.get_json(exams_url(server)))["results"]  # the student API answers
        assert (chosen.source, "HTTP 401" in chosen.reason, chosen.probe) == ("student", True, None)
        assert server.state.logins == 2


@pytest.mark.parametrize("code", ["parallel_login_restriction", "max_login_exceeded"])
async def test_a_session_refused_after_the_login_stops_with_the_reason(
    client: TestpressClient, simulator: SimulatorServer, code: str
) -> None:
    """Official clients look for these codes on every answer: a 403 that carries one is
    the account's session refused, not a forbidden exam, and the run stops (exit 3)."""
    await client.get_json(exams_url(simulator), route="exams")
    simulator.state.faults.session_refusal = code
    with pytest.raises(AuthError, match=f"refused the login .*\\({code}\\)"):
        await client.get_json(exams_url(simulator), route="exams")
    assert simulator.state.logins == 1


@pytest.mark.parametrize("code", ["parallel_login_restriction", "max_login_exceeded"])
async def test_a_login_refused_mid_run_is_asked_once_for_every_request_waiting(
    client: TestpressClient, simulator: SimulatorServer, code: str
) -> None:
    """The token expires mid-run and the new login is refused: the requests that waited
    for that login, and those after them, get its refusal without another login (each
    refused login may extend a max_login_exceeded lockout)."""
    await client.get_json(exams_url(simulator), route="exams")
    simulator.state.sessions_valid_from = simulator.state.logins + 1  # the session ends
    simulator.state.faults.login_refusal = code
    answers = await asyncio.gather(
        *(client.get_json(f"{exams_url(simulator)}?page=1", route="exams") for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(answer, AuthError) and f"({code})" in str(answer) for answer in answers), answers
    with pytest.raises(AuthError, match=f"\\({code}\\)"):  # a request after them
        await client.get_json(exams_url(simulator), route="exams")
    assert (simulator.state.logins, simulator.state.refused_logins) == (1, 1)


async def test_a_url_on_another_server_is_asked_here_and_the_token_stays_home(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """An answer may name another host (a canonical name, behind a proxy): its path and
    query are asked at base_url, said once, and nothing goes elsewhere."""
    elsewhere = "http://127.0.0.2:9"  # loopback still, should the request ever go there
    with structlog.testing.capture_logs() as logs:
        first = await client.get_json(f"{elsewhere}/api/v2.1/exams/?page=1")
        second = await client.get_json(f"{elsewhere}/api/v2.1/exams/")
    assert first["count"] == second["count"] == len(simulator.dataset.exams)
    assert [entry["server"] for entry in logs if entry["event"] == "url_on_another_server"] == [elsewhere]


async def test_one_login_per_token_generation_even_when_the_server_repeats_the_token() -> None:
    """A server without a `jti` may hand out the same string for two logins: the
    generation, not the string, tells a request whether its token was replaced."""
    logins: list[int] = []

    async def login() -> str:
        logins.append(1)
        await asyncio.sleep(0.01)
        return "same.token.string"

    auth = TokenAuth(login, Redactor())
    _, first = await auth.token()
    results = await asyncio.gather(*(auth.refresh(first) for _ in range(8)))
    assert len(logins) == 2 and {generation for _, generation in results} == {first + 1}
    await auth.refresh(first)  # a request still holding the old generation: no login
    assert len(logins) == 2


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


async def test_a_request_queued_for_a_connection_when_a_429_arrives_waits_the_pause_out(
    simulator: SimulatorServer, sleep: RecordedSleep
) -> None:
    """The pause is checked once a connection is the request's: a request that was already
    waiting for one when the 429 came does not go out during the pause."""
    settings = fast_settings(simulator.base_url, "sqlite://", max_attempts=1, concurrency=1)
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor(), sleep=sleep)
        await client.login()
        simulator.state.faults.latency = 0.03
        simulator.state.faults.throttle_rate = 1.0
        simulator.state.faults.retry_after = 5
        throttled = asyncio.create_task(client.get_json(exams_url(simulator)))
        await asyncio.sleep(0.01)  # in flight, holding the one connection
        queued = asyncio.create_task(client.get_json(f"{exams_url(simulator)}?page=1"))
        for request in (throttled, queued):
            with pytest.raises(RetriableError, match="429"):
                await request
    assert len(sleep.waits) == 1 and 4.9 < sleep.waits[0] <= 5.0  # the queued one waited


@pytest.mark.parametrize("fault", ["server_error_rate", "drop_rate", "truncate_rate"])
async def test_server_errors_resets_and_truncated_bodies_are_retried(
    client: TestpressClient, simulator: SimulatorServer, fault: str
) -> None:
    clean = await client.get_json(exams_url(simulator))
    setattr(simulator.state.faults, fault, 0.5)
    before = simulator.state.requests
    pages = await asyncio.gather(*(client.get_json(exams_url(simulator)) for _ in range(10)))
    assert all(page == clean for page in pages)
    # Every fault cost exactly one more request: sent again at once by aiohttp (a GET
    # whose connection the server closed unanswered) or by the retry layer.
    assert simulator.state.faults_served > 0
    assert simulator.state.requests - before == 10 + simulator.state.faults_served
    if fault != "drop_rate":  # a dropped GET is sent again by aiohttp itself, unseen by the retry layer
        assert client.stats.retries == simulator.state.faults_served


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


async def test_requests_wait_for_a_connection_in_the_order_they_asked() -> None:
    """A task that asks again as soon as its request ends (a worker walking the users'
    batches) must not keep the connection from a task that was already waiting: the
    connector's own limit let it, and attempt pages waited behind a user's batches."""

    async def slow_page(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        return web.json_response({"count": 0, "results": []})

    routes = [web.post("/api/v2.1/auth-token/", login_ok), web.get("/{tail:.*}", slow_page)]
    async with web_server(routes) as (api, seen), client_of(api, concurrency=1) as client:
        await client.login()

        async def one_after_another() -> None:
            for number in range(4):
                await client.get_json(f"{api}/busy/{number}")

        busy = asyncio.create_task(one_after_another())
        await asyncio.sleep(0.005)  # the first busy request holds the one connection
        await client.get_json(f"{api}/waiting")
        await busy
    paths = [path for _, path, _ in seen.requests[1:]]
    assert paths.index("/waiting") == 1, paths  # served second, not after the busy task's 4


async def test_a_url_that_cannot_be_requested_is_an_api_error_not_a_crash(
    client: TestpressClient, simulator: SimulatorServer
) -> None:
    """Attempts URLs come from the server's data; a strange one fails its page, not the run."""
    with pytest.raises(ApiError, match="cannot request it.*not an http"):
        await client.get_json("ftp://127.0.0.1/api/v2.1/exams/x/attempts/")
    with pytest.raises(ApiError, match="cannot request it"):
        await client.get_json("http://[127.0.0.1/api/v2.1/exams/")
    assert client.stats.retries == 0


# --- the wire: a server that answers with exact bytes -------------------------------------------

TOKEN = "header.payload.signature"
# What the server does with request n (1 is the login): the bytes to send, and whether
# to close the connection afterwards.
Answer = Callable[[int], Awaitable[tuple[bytes, bool]]]


@dataclass
class RawServer:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


LOGIN_OK = ok(orjson.dumps({"token": TOKEN}), "Content-Type: application/json")
PAGE = orjson.dumps({"count": 0, "next": None, "results": []})


@asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    state = RawServer(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    0,
                )
                state.requests.append(head + await reader.readexactly(length))
                data, close = await answer(len(state.requests))
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield state


@asynccontextmanager
async def client_of(base_url: str, **http: Any) -> AsyncIterator[TestpressClient]:
    settings = fast_settings(base_url, "sqlite://", **{"max_attempts": 1, **http})
    async with open_session(settings.api, settings.http) as session:
        yield TestpressClient(session, settings.api, settings.http, Redactor())


async def test_connections_are_kept_alive_with_our_headers_and_no_cookies() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return (LOGIN_OK if n == 1 else ok(PAGE, "Set-Cookie: sessionid=abc; Path=/")), False

    async with raw_server(answer) as server, client_of(server.url) as client:
        for page in range(1, 21):
            assert await client.get_json(f"{server.url}/api/v2.1/exams/?page={page}") == orjson.loads(PAGE)
    assert server.connections == 1
    login, last = server.requests[0].decode(), server.requests[-1].decode()
    assert login.startswith("POST /api/v2.1/auth-token/ HTTP/1.1\r\n") and "Content-Type: application/json" in login
    assert last.startswith("GET /api/v2.1/exams/?page=20 HTTP/1.1\r\n")
    assert f"Authorization: JWT {TOKEN}\r\n" in last and "Accept: application/json\r\n" in last
    assert "User-Agent: testpress-sync/" in last and "Cookie" not in last


async def test_a_keep_alive_connection_the_server_dropped_is_replaced_silently() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return (LOGIN_OK if n == 1 else ok(PAGE)), True  # closes after each answer without saying so

    async with raw_server(answer) as server, client_of(server.url) as client:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close arrives while the connection is idle
            await client.get_json(f"{server.url}/api/v2.1/exams/")
    assert server.connections == 4 and len(server.requests) == 4 and client.stats.retries == 0


async def test_a_get_the_server_closed_on_unanswered_is_sent_again_at_once() -> None:
    """The race of a keep-alive timeout: the server closes the connection just as the
    next request arrives on it. Nothing was processed, so aiohttp sends a GET again on a
    new connection, before any backoff of ours."""

    async def answer(n: int) -> tuple[bytes, bool]:
        return (b"", True) if n == 2 else (LOGIN_OK if n == 1 else ok(PAGE), False)

    async with raw_server(answer) as server, client_of(server.url) as client:
        await client.get_json(f"{server.url}/api/v2.1/exams/")
    assert server.connections == 2 and len(server.requests) == 3 and client.stats.retries == 0


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut\":", "cut short or garbled: ClientPayloadError: .*received 7 of 100"),
        (b"", "connection failed: ServerDisconnectedError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed HTTP response"),
        (b"SMTP ready\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Encoding: gzip\r\n\r\nnope", "decode"),
        (ok(b'{"results": [1, 2'), "not valid JSON"),
    ],
)
async def test_a_broken_answer_is_a_retriable_failure(data: bytes, says: str) -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return (LOGIN_OK, False) if n == 1 else (data, True)

    async with raw_server(answer) as server, client_of(server.url) as client:
        with pytest.raises(RetriableError, match=says):
            await client.get_json(f"{server.url}/api/v2.1/exams/")


async def test_a_silent_server_times_out_and_the_retry_gets_a_new_connection() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        if n == 2:
            await asyncio.sleep(3)
        return (LOGIN_OK if n == 1 else ok(PAGE)), False

    async with raw_server(answer) as server, client_of(server.url, timeout=0.3, max_attempts=2) as client:
        assert await client.get_json(f"{server.url}/api/v2.1/exams/") == orjson.loads(PAGE)
    assert client.stats.retries == 1 and server.connections == 2  # the silent one was not reused


async def test_a_cancelled_request_leaves_no_half_read_connection_behind() -> None:
    """A run that is stopped cancels the fetches in flight; the next request must not
    read the cancelled one's answer."""
    release = asyncio.Event()

    async def answer(n: int) -> tuple[bytes, bool]:
        if n == 2:
            await release.wait()
            return ok(b'{"late": true}'), False
        return (LOGIN_OK if n == 1 else ok(PAGE)), False

    async with raw_server(answer) as server, client_of(server.url) as client:
        await client.login()
        task = asyncio.create_task(client.get_json(f"{server.url}/api/v2.1/exams/?slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await client.get_json(f"{server.url}/api/v2.1/exams/") == orjson.loads(PAGE)
    assert server.connections == 2


async def test_chunked_gzip_and_close_delimited_answers_are_read_whole() -> None:
    document = b'{"results": [' + b",".join(b'{"id": %d}' % i for i in range(500)) + b"]}"
    packed = gzip.compress(document)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(packed[i : i + 700]), packed[i : i + 700]) for i in range(0, len(packed), 700))
    answers = [
        (LOGIN_OK, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n" + chunked + b"0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + document, True),  # ends where the connection does
    ]

    async def answer(n: int) -> tuple[bytes, bool]:
        return answers[n - 1]

    async with raw_server(answer) as server, client_of(server.url) as client:
        pages = [await client.get_json(f"{server.url}/api/v2.1/exams/") for _ in answers[1:]]
    assert pages == [orjson.loads(document)] * 2
    assert b"Accept-Encoding: gzip" in server.requests[1]


async def test_a_token_that_cannot_be_sent_is_an_api_error_not_a_crash() -> None:
    """The token comes from the server's data; a line break in it must not reach the wire."""
    login = ok(orjson.dumps({"token": "a\r\nX-Evil: 1"}))

    async def answer(n: int) -> tuple[bytes, bool]:
        return (login if n == 1 else ok(PAGE)), False

    async with raw_server(answer) as server, client_of(server.url, max_attempts=3) as client:
        with pytest.raises(ApiError, match="cannot request it") as caught:
            await client.get_json(f"{server.url}/api/v2.1/exams/")
    assert not isinstance(caught.value, RetriableError) and len(server.requests) == 1


async def test_a_refused_connection_is_retried_then_reported() -> None:
    async with raw_server(lambda n: asyncio.sleep(0, (ok(b""), False))) as server:
        url = server.url  # closed when the block ends: nothing listens there any more
    async with client_of(url, max_attempts=2) as client:
        with pytest.raises(ApiError, match="login failed: connection failed: .*Cannot connect to host"):
            await client.login()
    assert client.stats.retries == 1 and client.stats.requests == 2


# --- redirects ---------------------------------------------------------------------------------------


@dataclass
class Seen:
    """The requests a server received: method, path and Authorization header."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def middleware(self) -> Any:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append((request.method, request.path_qs, request.headers.get("Authorization")))
            return await handler(request)

        return record


@asynccontextmanager
async def web_server(
    routes: list[web.RouteDef], host: str = "127.0.0.1", seen: Seen | None = None
) -> AsyncIterator[tuple[str, Seen]]:
    seen = seen or Seen()
    app = web.Application(middlewares=[seen.middleware()])
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def login_ok(request: web.Request) -> web.Response:
    return web.json_response({"token": TOKEN})


def redirect(location: str, status: int = 301) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location.format(n=int(request.query.get("n", 0)) + 1)})

    return handler


async def page(request: web.Request) -> web.Response:
    return web.json_response({"count": 0, "results": []})


@asynccontextmanager
async def elsewhere_and_api() -> AsyncIterator[tuple[str, Seen, str, Seen, str]]:
    """Another host (127.0.0.2), another port of the same host, and the API, whose
    routes redirect within itself and to both."""
    elsewhere = Seen()  # one record for both: anything that went elsewhere
    catch_all = [web.get("/{tail:.*}", page)]
    async with (
        web_server(catch_all, host="127.0.0.2", seen=elsewhere) as (other_host, _),
        web_server(catch_all, seen=elsewhere) as (other_port, _),
    ):
        routes = [
            web.post("/api/v2.1/auth-token/", login_ok),
            web.get("/api/v2.1/exams", redirect("/api/v2.1/exams/")),
            web.get("/api/v2.1/exams/", page),
            web.get("/to-host/", redirect(f"{other_host}/api/v2.1/exams/", 302)),
            web.get("/to-port/", redirect(f"{other_port}/api/v2.1/exams/", 307)),
            web.get("/loop/", redirect("/loop/?n={n}", 302)),
        ]
        async with web_server(routes) as (api, api_seen):
            yield api, api_seen, other_host, elsewhere, other_port


async def test_a_get_follows_a_redirect_within_the_server() -> None:
    async with elsewhere_and_api() as (api, seen, *_), client_of(api) as client:
        assert await client.get_json(f"{api}/api/v2.1/exams") == {"count": 0, "results": []}
    assert seen.requests[1:] == [
        ("GET", "/api/v2.1/exams", f"JWT {TOKEN}"),
        ("GET", "/api/v2.1/exams/", f"JWT {TOKEN}"),
    ]
    assert client.stats.requests == 3


@pytest.mark.parametrize("where", ["to-host", "to-port"])
async def test_a_redirect_elsewhere_is_refused_and_the_token_stays_home(where: str) -> None:
    async with elsewhere_and_api() as (api, _, other_host, elsewhere, other_port), client_of(api, max_attempts=3) as client:
        target = other_host if where == "to-host" else other_port
        with pytest.raises(ApiError, match=f"redirected to {target}/api/v2.1/exams/; set api.base_url") as caught:
            await client.get_json(f"{api}/{where}/")
    assert not isinstance(caught.value, RetriableError) and client.stats.retries == 0
    assert elsewhere.requests == []  # nothing, and so no token, went there


async def test_redirects_are_followed_a_few_hops_at_most() -> None:
    async with elsewhere_and_api() as (api, seen, *_), client_of(api) as client:
        with pytest.raises(ApiError, match="more than 3 redirects"):
            await client.get_json(f"{api}/loop/")
    assert [path for _, path, _ in seen.requests[1:]] == ["/loop/", "/loop/?n=1", "/loop/?n=2", "/loop/?n=3"]


async def test_the_login_follows_no_redirect() -> None:
    routes = [
        web.post("/api/v2.1/auth-token/", redirect("/api/v2.1/auth-token/again/", 307)),
        web.post("/api/v2.1/auth-token/again/", login_ok),
    ]
    async with web_server(routes) as (api, seen), client_of(api, max_attempts=3) as client:
        with pytest.raises(ApiError, match="HTTP 307: redirected to /api/v2.1/auth-token/again/"):
            await client.login()
    assert seen.requests == [("POST", "/api/v2.1/auth-token/", None)]


@pytest.mark.parametrize(
    ("url", "location", "followed"),
    [
        ("http://demo.testpress.in/api/", "https://demo.testpress.in/api/", True),  # the upgrade
        ("http://demo.testpress.in/api/", "https://DEMO.testpress.in:443/api/", True),
        ("http://demo.testpress.in:8080/api/", "https://demo.testpress.in/api/", True),
        ("http://demo.testpress.in/api/", "https://demo.testpress.in:8443/api/", False),  # another port
        ("https://demo.testpress.in/api/", "http://demo.testpress.in/api/", False),  # never down to http
        ("https://demo.testpress.in/api", "/api/", True),
        ("https://demo.testpress.in/api/x", "y/", True),
        ("https://demo.testpress.in/api/", "https://demo.testpress.in:444/api/", False),
        ("https://demo.testpress.in/api/", "https://cdn.testpress.in/api/", False),
        ("https://demo.testpress.in/api/", "https://demo.testpress.in.evil.example/api/", False),
        ("https://demo.testpress.in/api/", "https://user:pw@demo.testpress.in/api/", False),
        ("https://demo.testpress.in/api/", "https://demo.testpress.in:x/api/", False),
        ("https://demo.testpress.in/api/", "ftp://demo.testpress.in/api/", False),
    ],
)
def test_which_redirects_are_followed(url: str, location: str, followed: bool) -> None:
    target = redirect_target(301, {"location": location}, url)
    assert (target is not None) == followed
    assert redirect_target(200, {"location": location}, url) is None
    assert redirect_target(304, {"location": location}, url) is None
