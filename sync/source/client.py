"""The Testpress API client: JWT auth and bounded retries over a connection pool.

Sending is layered, each layer doing one job:

    get_json          retry (tenacity) — only RetriableError, with backoff or Retry-After
      _authorized     JWT header; a 401 triggers one shared re-login, then a retry
        _send         a pause the server asked for (429), then one exchange
          _exchange   one HTTP exchange (sync.transport, which bounds requests in flight);
                      network errors become RetriableError; sync.responses decides what
                      the answer means
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from sync import __version__
from sync.config import ApiSettings, HttpSettings
from sync.errors import ApiError, AuthError, RetriableError, ThrottledError, TokenExpiredError
from sync.ops.logs import Redactor
from sync.source.responses import error_message, parse_response
from sync.source.transport import ConnectionFailed, ConnectionPool, TLSFailed

log = structlog.get_logger("testpress_sync.client")
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class RequestStats:
    """Counters of one client, read by the run summary and the progress line."""

    requests: int = 0
    retries: int = 0
    logins: int = 0


class TokenAuth:
    """The JWT and the lock around logging in: concurrent 401s cause one login."""

    def __init__(self, login: Callable[[], Awaitable[str]], redactor: Redactor) -> None:
        self._login = login
        self._redactor = redactor
        self._token: str | None = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    self._token = await self._new_token()
        return self._token

    async def refresh(self, stale: str) -> str:
        """A new token, unless another request already replaced `stale`."""
        async with self._lock:
            if self._token == stale or self._token is None:
                self._token = await self._new_token()
            return self._token

    async def _new_token(self) -> str:
        token = await self._login()
        self._redactor.add(token)
        return token


def ssl_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """Certificate checks always on. Without a custom CA bundle: None, and the pool builds
    the system's default context when it first connects over https. With one: the
    system's trust plus the bundle."""
    if not settings.ca_bundle:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=settings.ca_bundle)
    return context


def open_session(settings: ApiSettings, http: HttpSettings) -> ConnectionPool:
    """The connections of one run: at most `http.concurrency` requests in flight."""
    return ConnectionPool(
        limit=http.concurrency,
        timeout=http.timeout,
        ssl_context=ssl_context(settings),
        user_agent=f"testpress-sync/{__version__}",
    )


class TestpressClient:
    """GETs JSON documents from the Testpress API, logged in, retried, bounded."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        session: ConnectionPool,
        api: ApiSettings,
        http: HttpSettings,
        redactor: Redactor,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._session = session
        self._api = api
        self._http = http
        self._sleep = sleep
        # After a 429 with Retry-After, no request is sent before this loop time: the
        # server asked the whole client to slow down, not just the request it refused.
        self._paused_until = 0.0
        # "Full jitter" exponential backoff: many clients retrying at once spread out.
        self._backoff = wait_random_exponential(multiplier=http.backoff_initial, max=http.backoff_max)
        self.stats = RequestStats()
        redactor.add(api.password)
        self.auth = TokenAuth(self._login_once, redactor)

    @property
    def api_root(self) -> str:
        """Where the login route lives; resources name their own API versions."""
        return f"{self._api.base_url}/api/{self._api.api_version}"

    def url(self, path: str) -> str:
        """The absolute URL of `path` (from the root, e.g. /api/v2.1/exams/) on this server."""
        return f"{self._api.base_url}{path}"

    async def login(self) -> None:
        """Log in now (the first request would otherwise); raises AuthError if refused."""
        await self.auth.token()

    async def get_json(self, url: str) -> Any:
        """The JSON document at `url`. Raises SkippableError (403/404) or ApiError."""
        return await self._retrying(lambda: self._authorized(url))

    # --- layers ----------------------------------------------------------------------

    async def _retrying(self, send: Callable[[], Awaitable[Any]]) -> Any:
        # Most requests succeed at once; only a retriable failure pays for tenacity.
        try:
            return await send()
        except RetriableError as error:
            first_failure = error
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetriableError),
            stop=stop_after_attempt(self._http.max_attempts) | stop_before_delay(self._http.max_retry_wait),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )
        first_try = True
        async for attempt in retrying:
            with attempt:
                if first_try:  # replay the failure above, so tenacity counts and waits for it
                    first_try = False
                    raise first_failure
                return await send()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _authorized(self, url: str) -> Any:
        token = await self.auth.token()
        try:
            return await self._send("GET", url, headers={"Authorization": f"JWT {token}"})
        except TokenExpiredError:
            # Log in again (once for every request that saw this token fail), then retry
            # at once; a second 401 goes to the retry layer like any other failure.
            token = await self.auth.refresh(token)
            return await self._send("GET", url, headers={"Authorization": f"JWT {token}"})

    async def _send(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, json: Any = None
    ) -> Any:
        loop = asyncio.get_running_loop()
        pause = self._paused_until - loop.time()
        if pause > 0:
            await self._sleep(pause)
        try:
            return await self._exchange(method, url, headers=headers, json=json)
        except RetriableError as exc:
            if exc.status == 429 and exc.retry_after:
                if exc.retry_after > self._http.max_retry_wait:
                    raise ThrottledError(
                        f"Testpress throttled this login for {exc.retry_after:g}s, longer than "
                        f"http.max_retry_wait ({self._http.max_retry_wait:g}s): stopping; "
                        "run again later, or with a lower --concurrency"
                    ) from None
                self._paused_until = max(self._paused_until, loop.time() + exc.retry_after)
            raise

    async def _exchange(self, method: str, url: str, *, headers: dict[str, str] | None, json: Any) -> Any:
        self.stats.requests += 1
        body = None
        if json is not None:
            body = orjson.dumps(json)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        try:
            response = await self._session.request(method, url, headers=headers, body=body)
        except TimeoutError:
            raise RetriableError(f"timed out after {self._http.timeout:g}s", url=url) from None
        except TLSFailed as exc:
            # Not retried: an untrusted certificate will not become trusted in a second.
            raise ApiError(
                f"{exc}; if a proxy re-signs traffic, set api.ca_bundle "
                "(TESTPRESS_CA_BUNDLE) to its CA certificate",
                url=url,
            ) from None
        except ConnectionFailed as exc:
            raise RetriableError(f"connection failed: {exc}", url=url) from None
        except ValueError as exc:  # a URL or header that cannot be sent (from the server's data)
            raise ApiError(f"cannot request it: {exc}", url=url) from None
        return parse_response(response.status, response.headers, response.body, url)

    async def _login_once(self) -> str:
        url = f"{self.api_root}/auth-token/"
        credentials = {"username": self._api.username, "password": self._api.password}

        async def post() -> Any:
            try:
                return await self._send("POST", url, json=credentials)
            except TokenExpiredError as exc:  # a 401 to a login is a refusal, not an expiry
                raise ApiError(str(exc), url=url, status=401) from None

        try:
            document = await self._retrying(post)
        except RetriableError as exc:
            # The login had its own retries; a request waiting on it must not retry it again.
            raise ApiError(f"login failed: {exc}", url=url, status=exc.status) from None
        except ApiError as exc:
            if exc.status in (400, 401, 403):
                raise AuthError(
                    f"Testpress at {self._api.base_url} refused the login of "
                    f"{self._api.username!r}: {str(exc).removeprefix(f'HTTP {exc.status}: ')}"
                ) from None
            raise
        token = document.get("token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"the login answer of {url} holds no token: {error_message(document, b'')}")
        self.stats.logins += 1
        log.info("logged_in", username=self._api.username)
        return token

    # --- retry policy ----------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, TokenExpiredError):
            return 0.0  # the token was just renewed; nothing to wait for
        if isinstance(error, RetriableError) and error.retry_after is not None:
            # What the server asked for; the stop condition gives up if it exceeds what
            # is left of max_retry_wait.
            return error.retry_after
        return self._backoff(state)

    async def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        error = state.outcome.exception() if state.outcome else None
        log.debug(
            "retrying",
            url=getattr(error, "url", None),
            error=str(error),
            attempt=state.attempt_number,
            wait=round(state.upcoming_sleep, 3),
        )
