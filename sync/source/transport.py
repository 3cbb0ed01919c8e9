"""HTTP/1.1 for the API client: keep-alive connections over asyncio, parsed by httptools.

The sync sends thousands of small GETs to one host, and at zero latency their CPU cost
sets its speed. aiohttp's ClientSession spent ~350 µs of CPU per request on the 2-core
reference machine (URL objects, header multidicts, cookie jar, tracing, stream readers);
this module does the same exchange in ~100 µs (`python -m bench` shows the effect on a
whole run). It does only what the Testpress API needs:

- GET and POST with a small body, one request at a time per connection, reused while the
  server keeps it alive, at most `limit` connections (and so requests) at once;
- bodies by Content-Length, chunked, or until close; gzip and deflate decoded; a body
  larger than `max_body` is refused (a page is tens of kilobytes);
- TLS always verified (the system's trust, plus an optional CA bundle);
- one total `timeout` per exchange, connecting included; no redirects (a 3xx is an
  answer for the caller to explain), no proxies, no cookies.

Failures are TransportError subclasses (or TimeoutError) and never leave a connection in
the pool in an unknown state: a connection whose exchange did not finish is closed.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote, urlsplit

import httptools

# Characters a request target may hold as they are; anything else is percent-encoded.
_TARGET_SAFE = "/?&=%:@!$'()*+,;~-._"


class TransportError(Exception):
    """The exchange did not produce a complete HTTP response."""


class ConnectionFailed(TransportError):
    """Connecting failed, or the connection broke before the response was complete.
    Worth retrying: the next attempt may get a new connection and a whole answer."""


class TLSFailed(TransportError):
    """The server's certificate is not trusted, or TLS could not be negotiated. Not
    worth retrying: a certificate does not become trusted a second later."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: a request written, its response parsed as it arrives."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._size = 0
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: asyncio.Future[Response] | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self.received = False  # any byte of the current response arrived
        self.reusable = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"the server sent a malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if not self._closed.done():
            self._closed.set_result(None)
        if self._response is None or self._response.done():
            return
        if self._headers_done and self._ends_at_close():
            self._finish()  # an HTTP/1.0-style body: it ends where the connection does
            return
        what = "before answering" if not self.received else "in the middle of the response"
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionFailed(f"the server closed the connection {what}{reason}"))

    # --- httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        # Repeated headers are joined, as HTTP allows for the ones that may repeat.
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._fail(ConnectionFailed(f"the response body exceeds {self._max_body:,} bytes"))
            self.close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            # An interim answer (103 Early Hints from a CDN, say): the real one follows.
            self._headers, self._body, self._headers_done = {}, [], False
            return
        self.reusable = self._parser.should_keep_alive()
        self._finish()

    # --- used by the pool ---------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self._transport is not None and (self._response is None or self._response.done())
        self._response = asyncio.get_running_loop().create_future()
        self._headers, self._body, self._headers_done, self._size = {}, [], False, 0
        self.received = self.reusable = False
        self._transport.write(request)
        return self._response

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the connection is closed."""
        return self._closed

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _ends_at_close(self) -> bool:
        return "content-length" not in self._headers and "chunked" not in self._headers.get(
            "transfer-encoding", ""
        )

    def _finish(self) -> None:
        if self._response is None or self._response.done():
            return  # bytes nobody asked for (a server talking out of turn): dropped
        body = b"".join(self._body)
        try:
            body = _decoded(body, self._headers.get("content-encoding", ""))
        except zlib.error as exc:
            self._fail(ConnectionFailed(f"the response body could not be decompressed: {exc}"))
            return
        status = self._parser.get_status_code()
        self._response.set_result(Response(status, self._headers, body))

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)


def _decoded(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        # wbits 47: a gzip or a zlib header, detected; raw deflate as some servers send it.
        try:
            return zlib.decompress(body, 47)
        except zlib.error:
            if encoding != "deflate":
                raise
            return zlib.decompress(body, -15)
    raise zlib.error(f"unsupported Content-Encoding {encoding!r}")


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections, at most `limit` busy at once.

    Use as `async with ConnectionPool(...) as pool: await pool.request(...)`; leaving the
    block closes every connection."""

    def __init__(
        self,
        *,
        limit: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "testpress-sync",
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._max_body = max_body
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._origins: dict[str, _Origin] = {}
        self._common = (
            f"User-Agent: {user_agent}\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
        )
        self._closed = False

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        """One exchange. Raises ConnectionFailed, TLSFailed, TimeoutError, or ValueError
        for a URL or header this client cannot send."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        origin, target = self._route(url)
        request = self._request_bytes(method, origin, target, headers, body)
        async with self._slots:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(origin, request, retry_stale=method == "GET")

    async def close(self) -> None:
        self._closed = True
        connections = [c for idle in self._idle.values() for c in idle] + list(self._busy)
        self._idle.clear()
        for connection in connections:
            connection.close()
        if connections:
            # Let TLS connections say goodbye, but do not wait on a server that does not answer.
            await asyncio.wait([c.closed for c in connections], timeout=1.0)
            for connection in connections:
                if not connection.closed.done():
                    connection.abort()

    # --- inside -----------------------------------------------------------------------

    async def _exchange(self, origin: _Origin, request: bytes, *, retry_stale: bool) -> Response:
        connection = self._idle_connection(origin)
        if connection is None:
            return await self._send_on(await self._connect(origin), origin, request)
        try:
            return await self._send_on(connection, origin, request)
        except ConnectionFailed:
            if not retry_stale or connection.received:
                raise
        # The server had closed this idle connection (its keep-alive ran out) as we sent on
        # it: nothing was processed, so the request goes again, once, on a new connection.
        return await self._send_on(await self._connect(origin), origin, request)

    async def _send_on(self, connection: _Connection, origin: _Origin, request: bytes) -> Response:
        """One exchange on `connection`; afterwards it is idle again, or closed."""
        self._busy.add(connection)
        try:
            response = await connection.send(request)
        except BaseException:  # failed, cancelled or timed out mid-exchange: state unknown
            connection.close()
            raise
        finally:
            self._busy.discard(connection)
        if connection.reusable and not self._closed:
            self._idle.setdefault(origin, []).append(connection)
        else:
            connection.close()
        return response

    def _idle_connection(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.is_open:
                return connection
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._max_body),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        except ssl.SSLError as exc:
            raise TLSFailed(f"TLS failed with {origin.host}:{origin.port}: {exc}") from None
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        # Built on the first https connection: loading the system's CAs costs start-up time
        # that a plain-http run (the simulator) does not need to pay.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _route(self, url: str) -> tuple[_Origin, str]:
        location, _, query = url.partition("#")[0].partition("?")
        scheme, separator, rest = location.partition("://")
        authority, slash, path = rest.partition("/")
        key = f"{scheme}://{authority}"
        origin = self._origins.get(key) if separator else None
        if origin is None:
            origin, _ = _split(location)
            self._origins[key] = origin  # one per host: a run talks to one or two
        target = f"/{path}" if slash else "/"
        if query:
            target = f"{target}?{query}"
        if not target.isascii():
            target = quote(target, safe=_TARGET_SAFE)
        return origin, target

    def _request_bytes(
        self, method: str, origin: _Origin, target: str, headers: Mapping[str, str] | None, body: bytes | None
    ) -> bytes:
        extra = ""
        for name, value in (headers or {}).items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"the request header {name!r} holds a line break")
            extra += f"{name}: {value}\r\n"
        if body is not None:
            extra += f"Content-Length: {len(body)}\r\n"
        head = f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{self._common}{extra}\r\n"
        return head.encode("latin-1") + (body or b"")


def _split(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    return _Origin(parts.scheme, host, port), parts.path or "/"
