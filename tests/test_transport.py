"""The HTTP/1.1 transport against real sockets on 127.0.0.1.

The simulator (an aiohttp server) covers the API's behaviour in test_client.py; here a
small asyncio server answers with exact bytes, for the wire formats and misbehaviours
that a well-behaved server never produces: close-delimited and chunked bodies, gzip,
stale keep-alive connections, cut and malformed responses, silence.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from sync.source.transport import ConnectionFailed, ConnectionPool

# What the server does with one request: returns the bytes to send, and whether to close.
Answer = Callable[[int], Awaitable[tuple[bytes, bool]]]


@dataclass
class RawServer:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


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
    port = server.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}"
    async with server:
        yield state


def pool(**changes: float) -> ConnectionPool:
    return ConnectionPool(
        limit=int(changes.get("limit", 4)),
        timeout=changes.get("timeout", 5.0),
        max_body=int(changes.get("max_body", 1024 * 1024)),
    )


async def test_connections_are_kept_alive_and_reused() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return ok(b'{"n": %d}' % n), False

    async with raw_server(answer) as server, pool() as client:
        bodies = [(await client.request("GET", f"{server.url}/api/?page={n}")).body for n in range(1, 21)]
    assert bodies == [b'{"n": %d}' % n for n in range(1, 21)]
    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("GET /api/?page=1 HTTP/1.1\r\n") and f"Host: {server.url[7:]}\r\n" in first


async def test_a_connection_the_server_says_it_will_close_is_not_reused() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return ok(b"{}", "Connection: close"), False  # says close, but leaves the socket open

    async with raw_server(answer) as server, pool() as client:
        for _ in range(2):
            assert (await client.request("GET", f"{server.url}/x")).status == 200
    assert server.connections == 2


async def test_post_sends_its_body_and_headers() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return ok(b"{}"), False

    async with raw_server(answer) as server, pool() as client:
        await client.request("POST", f"{server.url}/login/", headers={"Content-Type": "application/json"}, body=b'{"a":1}')
    request = server.requests[0]
    assert request.startswith(b"POST /login/ HTTP/1.1\r\n")
    assert b"Content-Type: application/json\r\n" in request and b"Content-Length: 7\r\n" in request
    assert request.endswith(b'\r\n\r\n{"a":1}')


async def test_chunked_gzip_close_delimited_and_interim_answers_are_read_whole() -> None:
    document = b'{"results": [' + b",".join(b'{"id": %d}' % i for i in range(500)) + b"]}"
    packed = gzip.compress(document)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(packed[i : i + 700]), packed[i : i + 700]) for i in range(0, len(packed), 700))
    answers = [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n" + chunked + b"0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + document, True),  # ends where the connection does
        (b"HTTP/1.1 103 Early Hints\r\nLink: </x.css>\r\n\r\n" + ok(document), False),  # interim answer first
    ]

    async def answer(n: int) -> tuple[bytes, bool]:
        return answers[n - 1]

    async with raw_server(answer) as server, pool() as client:
        bodies = [(await client.request("GET", f"{server.url}/x")).body for _ in answers]
    assert bodies == [document] * 3
    assert server.connections == 2  # the close-delimited answer used its connection up


async def test_a_keep_alive_connection_the_server_dropped_is_replaced_silently() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return ok(b"{}"), True  # closes after each answer without saying so

    async with raw_server(answer) as server, pool() as client:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close arrives while the connection is idle
            assert (await client.request("GET", f"{server.url}/x")).status == 200
    assert server.connections == 3 and len(server.requests) == 3


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("POST", False)])
async def test_a_request_the_server_closed_on_unanswered_is_replayed_only_if_a_get(
    method: str, replayed: bool
) -> None:
    """The race of a keep-alive timeout: the server closes the connection just as the
    next request arrives on it. Nothing was processed, so a GET is sent again on a new
    connection; a POST is not (it is not ours to repeat)."""

    async def answer(n: int) -> tuple[bytes, bool]:
        return (b"", True) if n == 2 else (ok(b"{}"), False)

    async with raw_server(answer) as server, pool() as client:
        await client.request(method, f"{server.url}/first", body=b"" if method == "POST" else None)
        if replayed:
            assert (await client.request(method, f"{server.url}/second")).status == 200
        else:
            with pytest.raises(ConnectionFailed, match="before answering"):
                await client.request(method, f"{server.url}/second", body=b"")
    assert server.connections == (2 if replayed else 1)
    assert len(server.requests) == (3 if replayed else 2)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut\":", "in the middle of the response"),
        (b"", "before answering"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed HTTP response"),
        (b"SMTP ready\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Encoding: gzip\r\n\r\nnope", "decompressed"),
    ],
)
async def test_a_broken_answer_is_a_connection_failure(data: bytes, says: str) -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return data, True

    async with raw_server(answer) as server, pool() as client:
        with pytest.raises(ConnectionFailed, match=says):
            await client.request("POST", f"{server.url}/x", body=b"")  # POST: not replayed


async def test_a_body_beyond_the_limit_is_refused_and_the_pool_recovers() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        return ok(b"x" * (5000 if n == 1 else 10)), False

    async with raw_server(answer) as server, pool(max_body=4096) as client:
        with pytest.raises(ConnectionFailed, match="exceeds 4,096 bytes"):
            await client.request("GET", f"{server.url}/huge")
        assert (await client.request("GET", f"{server.url}/small")).body == b"x" * 10


async def test_a_silent_server_times_out_and_the_pool_recovers() -> None:
    async def answer(n: int) -> tuple[bytes, bool]:
        if n == 1:
            await asyncio.sleep(3)
        return ok(b"{}"), False

    async with raw_server(answer) as server, pool(timeout=0.3) as client:
        with pytest.raises(TimeoutError):
            await client.request("GET", f"{server.url}/slow")
        assert (await client.request("GET", f"{server.url}/fast")).status == 200
    assert server.connections == 2  # the timed-out connection was not reused


async def test_a_cancelled_request_closes_its_connection() -> None:
    release = asyncio.Event()

    async def answer(n: int) -> tuple[bytes, bool]:
        if n == 1:
            await release.wait()
        return ok(b"{}"), False

    async with raw_server(answer) as server, pool() as client:
        task = asyncio.create_task(client.request("GET", f"{server.url}/x"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert (await client.request("GET", f"{server.url}/y")).status == 200
    assert server.connections == 2


async def test_requests_beyond_the_limit_wait_for_a_connection() -> None:
    busy = 0
    peak = 0

    async def answer(n: int) -> tuple[bytes, bool]:
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        await asyncio.sleep(0.02)
        busy -= 1
        return ok(b"{}"), False

    async with raw_server(answer) as server, pool(limit=3) as client:
        await asyncio.gather(*(client.request("GET", f"{server.url}/{n}") for n in range(30)))
    assert peak == 3 and server.connections == 3


async def test_a_refused_connection_and_an_unsendable_header_are_errors() -> None:
    async with raw_server(lambda n: asyncio.sleep(0, (ok(b""), False))) as server:
        url = server.url
    async with pool() as client:
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            await client.request("GET", f"{url}/x")
        with pytest.raises(ValueError, match="line break"):
            await client.request("GET", f"{url}/x", headers={"Authorization": "JWT a\r\nX-Evil: 1"})
        with pytest.raises(ValueError, match="http"):
            await client.request("GET", "ftp://127.0.0.1/x")
