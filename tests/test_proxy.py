"""Forward proxies: a real one on 127.0.0.1 (written here, an aiohttp app that forwards
absolute-form requests and counts them) carries a whole sync, chosen by `[http] proxy`
or by HTTP_PROXY; NO_PROXY goes around it; its password never reaches a log."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sync.cli import main
from sync.commands.doctor import run_checks
from sync.errors import ApiError, ConfigError, RetriableError
from sync.ops.logs import REDACTED, Redactor
from sync.simulator import SimulatorServer
from sync.sink.database import create_engine, database_url_from
from sync.source.client import TestpressClient, open_session
from tests.conftest import PASSWORD, USERNAME, fast_settings
from tests.helpers import assert_matches_server, sync_with

# Headers that belong to one connection, not to the request a proxy passes on.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host",
})  # fmt: skip


@dataclass
class ForwardProxy:
    url: str  # http://127.0.0.1:port, without credentials
    login: tuple[str, str] | None  # the user and password it demands, if any
    forwarded: list[str] = field(default_factory=list)  # the absolute URL of each request passed on
    refused: int = 0  # requests without the right Proxy-Authorization

    def url_with_login(self, user: str, password: str) -> str:
        return self.url.replace("http://", f"http://{user}:{password}@")


@asynccontextmanager
async def forward_proxy(login: tuple[str, str] | None = None) -> AsyncIterator[ForwardProxy]:
    """A plain-HTTP forward proxy: absolute-form requests only (anything else was not sent
    to it as to a proxy), Basic proxy authentication when `login` is given."""
    proxy = ForwardProxy(url="", login=login)
    expected = "Basic " + base64.b64encode(":".join(login).encode()).decode() if login else None

    async def forward(request: web.Request) -> web.StreamResponse:
        if not request.raw_path.startswith("http://"):
            return web.Response(status=400, text="a proxy takes absolute URLs")
        if expected is not None and request.headers.get("Proxy-Authorization") != expected:
            proxy.refused += 1
            return web.Response(status=407, headers={"Proxy-Authenticate": 'Basic realm="test"'})
        proxy.forwarded.append(request.raw_path)
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with upstream.request(
            request.method, request.raw_path, headers=headers, data=body or None, allow_redirects=False
        ) as answer:
            content = await answer.read()
            kept = {name: value for name, value in answer.headers.items() if name.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, headers=kept, body=content)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as upstream:
        try:
            yield proxy
        finally:
            await runner.cleanup()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sync.db'}"


async def test_the_proxy_setting_carries_every_request_of_a_sync(
    simulator: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The setting wins over the environment: this proxy does not exist, and NO_PROXY
    # would send 127.0.0.1 around any proxy the environment names.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with forward_proxy(login=("sync", "pr0xy@s3cret")) as proxy:
        # The password percent-encoded in the URL, as it must be for an @.
        settings = fast_settings(simulator.base_url, sqlite_url(tmp_path), proxy=proxy.url_with_login("sync", "pr0xy%40s3cret"))
        summary = await sync_with(settings)
    assert summary.status == "succeeded" and proxy.refused == 0
    assert len(proxy.forwarded) == simulator.state.requests == summary.requests > 30
    assert all(url.startswith(f"{simulator.base_url}/api/") for url in proxy.forwarded)
    engine = create_engine(database_url_from(settings.database_url))
    try:
        await assert_matches_server(engine, simulator)
    finally:
        await engine.dispose()


async def test_http_proxy_from_the_environment_carries_every_request_of_a_sync(
    simulator: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with forward_proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost,.internal")  # not 127.0.0.1
        summary = await sync_with(fast_settings(simulator.base_url, sqlite_url(tmp_path)))
    assert summary.status == "succeeded"
    assert len(proxy.forwarded) == simulator.state.requests == summary.requests > 30


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
async def test_no_proxy_goes_around_the_proxy(simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> None:
    async with forward_proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        settings = fast_settings(simulator.base_url, "sqlite://")
        async with open_session(settings.api, settings.http) as session:
            client = TestpressClient(session, settings.api, settings.http, Redactor())
            listing = await client.get_json(f"{simulator.base_url}/api/v2.1/exams/")
    assert listing["count"] == len(simulator.dataset.exams)
    assert proxy.forwarded == [] and simulator.state.requests == 2


async def test_https_proxy_is_not_used_for_http_urls(simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async with forward_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)  # for https:// URLs only; the simulator is http://
        settings = fast_settings(simulator.base_url, "sqlite://")
        async with open_session(settings.api, settings.http) as session:
            await TestpressClient(session, settings.api, settings.http, Redactor()).login()
    assert proxy.forwarded == [] and simulator.state.logins == 1


async def test_a_proxy_that_refuses_the_login_is_an_error_not_retried(simulator: SimulatorServer) -> None:
    async with forward_proxy(login=("sync", "right-password")) as proxy:
        settings = fast_settings(simulator.base_url, "sqlite://", proxy=proxy.url_with_login("sync", "wrong-password"))
        async with open_session(settings.api, settings.http) as session:
            client = TestpressClient(session, settings.api, settings.http, Redactor())
            with pytest.raises(ApiError, match="HTTP 407: the proxy wants a login; give it in the proxy URL") as caught:
                await client.login()
    assert not isinstance(caught.value, RetriableError)
    assert proxy.refused == 1 and simulator.state.requests == 0


async def test_the_proxy_password_is_a_secret_to_the_redactor() -> None:
    redactor = Redactor()
    settings = fast_settings("http://127.0.0.1:9", "sqlite://", proxy="http://sync:pr0xy%40s3cret@127.0.0.1:3128")
    async with open_session(settings.api, settings.http) as session:
        TestpressClient(session, settings.api, settings.http, redactor)
    line = "via http://sync:pr0xy%40s3cret@127.0.0.1:3128, decoded pr0xy@s3cret"
    assert redactor.redact(line) == f"via http://sync:{REDACTED}@127.0.0.1:3128, decoded {REDACTED}"


@pytest.mark.parametrize("value", ["ftp://proxy.internal:21", "http://:3128", "http://proxy.internal:port"])
async def test_a_proxy_url_that_cannot_be_used_is_a_configuration_error(value: str) -> None:
    settings = fast_settings("http://127.0.0.1:9", "sqlite://", proxy=value.replace("://", "://sync:hunter22@"))
    async with open_session(settings.api, settings.http) as session:
        with pytest.raises(ConfigError, match="http.proxy .* is not a proxy URL") as caught:
            TestpressClient(session, settings.api, settings.http, Redactor())
    assert "hunter22" not in str(caught.value)


def test_a_run_through_a_dead_proxy_names_it_but_not_its_password(
    simulator_thread: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("TESTPRESS_CONFIG", "TESTPRESS_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    environment = {
        "TESTPRESS_BASE_URL": simulator_thread.base_url,
        "TESTPRESS_USERNAME": USERNAME,
        "TESTPRESS_PASSWORD": PASSWORD,
        "TESTPRESS_DATABASE_URL": sqlite_url(tmp_path),
        "TESTPRESS_LOG_FORMAT": "json",
        "TESTPRESS_LOG_LEVEL": "debug",
        "TESTPRESS_HTTP_MAX_ATTEMPTS": "2",
        "TESTPRESS_HTTP_BACKOFF_INITIAL": "0.01",
        "TESTPRESS_HTTP_PROXY": "http://sync:pr0xy%40s3cret@127.0.0.1:9",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["run"]) != 0
    assert main(["doctor"]) == 1
    said = capsys.readouterr()
    output = said.out + said.err
    assert "127.0.0.1:9" in output and "FAIL  server" in output
    assert "through proxy http://127.0.0.1:9 (http.proxy)" in output
    assert "s3cret" not in output
    assert simulator_thread.state.requests == 0


async def test_the_doctor_says_which_proxy_it_went_through(
    simulator_thread: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with forward_proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        settings = fast_settings(simulator_thread.base_url, sqlite_url(tmp_path))
        checks = await run_checks(settings, Redactor())
    server = next(check for check in checks if check.name == "server")
    assert server.ok and f"through proxy {proxy.url} (HTTP_PROXY)" in server.detail
    assert len(proxy.forwarded) == 3  # the server check, the login, the listing
