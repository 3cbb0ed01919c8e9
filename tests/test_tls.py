"""TLS: certificate checks are always on, through a proxy's tunnel too; a custom CA
bundle makes a private CA trusted."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from sync.config import load_settings
from sync.errors import ApiError, ConfigError
from sync.ops.logs import Redactor
from sync.simulator import SimulatorServer
from sync.source.client import TestpressClient, open_session
from tests.conftest import PASSWORD, USERNAME, fast_settings, small_dataset


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The developer's own HTTP(S)_PROXY must not carry these loopback requests."""
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    yield


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture
async def tls_simulator(certificate: tuple[Path, Path]) -> AsyncIterator[SimulatorServer]:
    key, cert = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    dataset = small_dataset(exams=2)
    async with SimulatorServer(dataset, username=USERNAME, password=PASSWORD, ssl_context=context) as server:
        yield server


async def test_an_untrusted_certificate_is_refused_at_once(tls_simulator: SimulatorServer) -> None:
    settings = fast_settings(tls_simulator.base_url, "sqlite://")
    async with open_session(settings.api, settings.http) as session:
        client = TestpressClient(session, settings.api, settings.http, Redactor())
        with pytest.raises(ApiError, match="TLS failed.*ca_bundle"):
            await client.login()
    assert tls_simulator.state.logins == 0 and client.stats.retries == 0


async def test_a_ca_bundle_makes_the_private_ca_trusted(
    tls_simulator: SimulatorServer, certificate: tuple[Path, Path]
) -> None:
    base = fast_settings(tls_simulator.base_url, "sqlite://")
    api = replace(base.api, ca_bundle=str(certificate[1]))
    async with open_session(api, base.http) as session:
        client = TestpressClient(session, api, base.http, Redactor())
        listing = await client.get_json(f"{tls_simulator.base_url}/api/v2.1/exams/")
    assert listing["count"] == 2 and tls_simulator.state.logins == 1


def test_a_missing_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_bundle"):
        load_settings(environ={"TESTPRESS_CA_BUNDLE": str(tmp_path / "nope.pem")})


@asynccontextmanager
async def tunnelling_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """A proxy that only opens CONNECT tunnels, as a proxy does for https:// URLs: it
    sees where a tunnel goes, never what passes through it. Yields its URL and the
    targets of the tunnels it opened."""
    tunnels: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target, _ = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0].decode().split(" ")
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        tunnels.append(target)
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", tunnels


@pytest.mark.parametrize("trusted", [True, False])
async def test_through_a_proxy_tunnel_the_certificate_is_still_checked(
    tls_simulator: SimulatorServer, certificate: tuple[Path, Path], trusted: bool
) -> None:
    base = fast_settings(tls_simulator.base_url, "sqlite://")
    api = replace(base.api, ca_bundle=str(certificate[1]) if trusted else None)
    async with tunnelling_proxy() as (proxy, tunnels):
        http = replace(base.http, proxy=proxy)
        async with open_session(api, http) as session:
            client = TestpressClient(session, api, http, Redactor())
            if trusted:
                listing = await client.get_json(f"{tls_simulator.base_url}/api/v2.1/exams/")
                assert listing["count"] == 2
            else:
                with pytest.raises(ApiError, match="TLS failed.*ca_bundle"):
                    await client.login()
    assert tunnels and set(tunnels) == {f"127.0.0.1:{tls_simulator.port}"}
    assert tls_simulator.state.logins == (1 if trusted else 0) and client.stats.retries == 0
