"""The Testpress API client: JWT auth and bounded retries over one aiohttp session.

Sending is layered, each layer doing one job:

    get_json          retry (tenacity) — only RetriableError, with backoff or Retry-After
      _authorized     JWT header; a 401 triggers one shared re-login, then a retry
        _send         a pause the server asked for (429), then one exchange
          _exchange   one request, and for a GET the redirects within the same server;
                      sync.source.responses decides what the answer means
            _fetch    one HTTP request on the session (which bounds connections, and so
                      requests in flight); network errors become RetriableError
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
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
from sync.errors import (
    ApiError,
    AuthError,
    LoginRefusedError,
    RetriableError,
    SkippableError,
    ThrottledError,
    TokenExpiredError,
)
from sync.ops.logs import Redactor
from sync.source.proxies import Proxies
from sync.source.responses import (
    LOGIN_REFUSALS,
    MAX_REDIRECTS,
    error_message,
    on_server,
    parse_response,
    proxy_refusal,
    redirect_target,
)

log = structlog.get_logger("testpress_sync.client")
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class RequestStats:
    """Counters of one client, read by the run summary and the progress line."""

    requests: int = 0
    retries: int = 0
    logins: int = 0


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (Unix time), or None when it has none we can read. Only
    read, never trusted for anything but timing: the server checks the signature."""
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, (int, float)) and not isinstance(expiry, bool) else None


class TokenAuth:
    """The JWT and the lock around logging in: concurrent 401s cause one login.

    Each token has a generation: a request says which one it was sent with, and only a
    failure of the current one leads to a login (a server may hand out the same string
    twice, so the string cannot say it).

    A refused login (AuthError: wrong credentials, or a refusal code such as
    max_login_exceeded) is the run's answer: every request waiting for that login, and
    every later one, gets the same error without another login. Each refused login may
    extend a lockout, and the run stops anyway."""

    def __init__(self, login: Callable[[], Awaitable[str]], redactor: Redactor) -> None:
        self._login = login
        self._redactor = redactor
        self._token: str | None = None
        self.generation = 0  # of the current token; 0: none yet
        self._lock = asyncio.Lock()
        self._refused: AuthError | None = None

    @staticmethod
    def has_expired(token: str) -> bool:
        """The token says so itself: its `exp` has passed."""
        expiry = token_expiry(token)
        return expiry is not None and time.time() >= expiry

    async def token(self) -> tuple[str, int]:
        """The current token and its generation, logging in first if there is none."""
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    await self._replace()
        assert self._token is not None
        return self._token, self.generation

    async def refresh(self, stale: int) -> tuple[str, int]:
        """A new token, unless another request already replaced generation `stale`."""
        async with self._lock:
            if self.generation == stale or self._token is None:
                await self._replace()
            assert self._token is not None
            return self._token, self.generation

    async def _replace(self) -> None:
        if self._refused is not None:  # a new error each time: one raised in many tasks collects their tracebacks
            raise AuthError(str(self._refused), hint=self._refused.hint)
        try:
            token = await self._login()
        except AuthError as refused:
            self._refused = refused
            raise
        self._redactor.add(token)
        self._token = token
        self.generation += 1


def judge_403(*, replaced: bool, expired: bool, reads: bool | None, worked: bool) -> str:
    """Whose a 403 is: "token" (log in again, ask again), "item" (a forbidden exam: the
    403 stands) or "stop" (a new token is refused too: the run cannot go on).
    `replaced`: the token was replaced since the request was sent; `expired`: its own
    `exp` has passed; `reads`: whether it still reads a page that answered in this run
    (None: no verdict, that page is gone or failing); `worked`: it has answered before."""
    if replaced or expired:
        return "token"
    if reads:
        return "item"
    if worked:
        return "token"  # refused there too, or nothing to tell by: one login decides
    return "stop" if reads is False else "item"


def ssl_context(settings: ApiSettings) -> ssl.SSLContext | bool:
    """Certificate checks always on. Without a custom CA bundle: True, aiohttp's default
    verified context (the system's trust). With one: the system's trust plus the bundle."""
    if not settings.ca_bundle:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=settings.ca_bundle)
    return context


USER_AGENT = f"testpress-sync/{__version__}"


def open_session(settings: ApiSettings, http: HttpSettings) -> aiohttp.ClientSession:
    """The HTTP session of one run, to use as `async with open_session(...) as session`.

    At most `http.concurrency` connections, and so requests in flight (a connection
    carries one request at a time), kept alive between requests. No limit per host: a
    run talks to one host, and the total is the bound that matters. DNS answers are
    cached for aiohttp's default 10 s: connections live much longer than that, and a
    burst of reconnections after a failover should look the address up again.
    No cookie jar (the API authenticates by header), no `trust_env` (sync.source.proxies
    says why; the proxy is chosen per request), redirects followed by the client itself.
    Responses are decompressed as aiohttp advertises by default (gzip, deflate): a page
    of 20 attempts shrinks 7x (15 KB to 2 KB), and inflating it takes ~15 µs, about 1%
    of the CPU that storing its attempts takes."""
    connector = aiohttp.TCPConnector(limit=http.concurrency, limit_per_host=0, ssl=ssl_context(settings))
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=http.timeout),
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        trust_env=False,
    )


class TestpressClient:
    """GETs JSON documents from the Testpress API, logged in, retried, bounded."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        session: aiohttp.ClientSession,
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
        # Requests in flight, first come first served. The connector's own limit is not
        # fair: a task that releases a connection and asks again at once takes it ahead of
        # the tasks already waiting (they are only woken), so the users' batches, a request
        # after a request on 16 workers, kept every connection and the attempt pages waited
        # (on W2 at 20 ms: 1 of 16 connections for attempts). asyncio's Semaphore queues
        # its waiters in order. Waiting here is outside aiohttp's `timeout`, which times
        # the request alone.
        self._in_flight = asyncio.Semaphore(http.concurrency)
        # After a 429 with Retry-After, no request is sent before this loop time: the
        # server asked the whole client to slow down, not just the request it refused.
        self._paused_until = 0.0
        # "Full jitter" exponential backoff: many clients retrying at once spread out.
        self._backoff = wait_random_exponential(multiplier=http.backoff_initial, max=http.backoff_max)
        self.stats = RequestStats()
        # The first and the latest URL that answered in this run, and the generations of
        # the tokens that have answered: what a 403 is checked against (_token_refused).
        self._first_good: str | None = None
        self._last_good: str | None = None
        self._working: set[int] = set()
        self._refused_new: set[int] = set()  # generations answered 401 right after their login
        self._foreign_hosts: set[str] = set()  # other servers answers named (said once each)
        redactor.add(api.password)
        self.proxies = Proxies(http.proxy)
        redactor.add_url_password(http.proxy)  # as written, too: it may be encoded otherwise
        for password in self.proxies.passwords:
            redactor.add(password)
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

    async def get_json(self, url: str, route: str | None = None) -> Any:
        """The JSON document at `url` (on base_url's server: on_server). Raises
        SkippableError (403, 404, or a 401 a new login did not cure), AuthError (the login
        or the session refused) or ApiError.

        A 403 is a token question first (_token_refused): it counts as forbidden only once
        the token has shown it still works, or a new token was refused too. `route` names
        the kind of request, for the logs."""
        sent = on_server(url, self._api.base_url)
        if sent != url:
            named = urlsplit(url)
            server = f"{named.scheme}://{named.hostname}" + (f":{named.port}" if named.port else "")
            if server not in self._foreign_hosts:  # said once a server, without what a URL may carry (a login)
                self._foreign_hosts.add(server)
                log.warning("url_on_another_server", server=server, asked_at=self._api.base_url,
                            hint="the server named an address other than base_url; asked at base_url instead")  # fmt: skip
        return await self._retrying(lambda: self._authorized(sent, route))

    def _refusal(self, refused: LoginRefusedError) -> AuthError:
        code = refused.code or ""
        return AuthError(
            f"Testpress at {self._api.base_url} refused the login of {self._api.username!r} "
            f"({code}): {LOGIN_REFUSALS[code]}",
            hint="the credentials are right: the account is refused for the reason given",
        )

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

    async def _authorized(self, url: str, route: str | None = None) -> Any:
        token, generation = await self.auth.token()
        try:
            document = await self._get(url, token)
        except TokenExpiredError as refused:
            # Log in again (once for every request that saw this token fail), then retry at
            # once, as the API notes say. A 401 that a new login does not cure is the route
            # refusing this login (a student on an admin route, answered 401 rather than 403).
            # Once a token has met one, a 401 to it is first checked against a page that
            # answered in this run (one GET), as a 403 is: still read, it is that route's,
            # and no login is spent, so such 401s never become a loop of logins (which
            # Testpress may answer by locking the account: max_login_exceeded).
            if (
                generation in self._refused_new
                and not self.auth.has_expired(token)
                and url not in (self._last_good, self._first_good)  # a page that answered: the token's
                and await self._reads_elsewhere(token, url) is not False
            ):
                raise SkippableError(f"{refused} (this login may not read it)", url=url, status=401) from None
            token, generation = await self.auth.refresh(generation)
            try:
                document = await self._get(url, token)
            except TokenExpiredError as again:
                if self.auth.has_expired(token):
                    raise  # the new token's own exp has passed already (a short lifetime): a login is the cure
                if await self._reads_elsewhere(token, url) is False:
                    raise self._lost_access() from None  # a new token refused where the run read
                self._refused_new.add(generation)
                raise SkippableError(f"{again} (to a token just issued)", url=url, status=401) from None
        except SkippableError as refused:
            if refused.status != 403 or not await self._token_refused(token, generation, url):
                raise  # a 404, or an exam this login may not read: the token still works
            log.info("forbidden_logging_in_again", url=url, route=route)
            token, generation = await self.auth.refresh(generation)
            try:
                document = await self._get(url, token)
            except SkippableError as again:
                if again.status == 403 and await self._token_refused(token, generation, url):  # raises if it never worked
                    # The new token went the way of the old one (it expired, or was replaced
                    # meanwhile): to the retry layer, like a second 401, never a forbidden exam.
                    raise TokenExpiredError(f"HTTP 403 to a token just renewed: {again}", url=url, status=403) from None
                raise
        self._working.add(generation)
        self._last_good = url
        if self._first_good is None:
            self._first_good = url
        return document

    async def _get(self, url: str, token: str) -> Any:
        return await self._send("GET", url, headers={"Authorization": f"JWT {token}"})

    async def _token_refused(self, token: str, generation: int, url: str) -> bool:
        """Whether a 403 is the token's rather than the item's (an exam this login may not
        read). Testpress may answer an expired token, or a session it ended, with 403
        rather than 401 (the API notes), and the token's own `exp` cannot clear it (the
        server's clock may run ahead). So a 403 is the token's when the token has been
        replaced since it was sent, when its `exp` has passed, or when it no longer reads
        a URL that answered in this run (the latest, else the first: one GET, no login).
        When neither gives a verdict (gone, failing), a token that has answered is
        renewed once: a login costs less than exams wrongly marked forbidden.

        A token that has never answered anything and is refused there is no question a
        new login answers: the run stops (AuthError) rather than log in again and again,
        or mark every exam forbidden. Before anything has answered, a 403 stands."""
        replaced, expired = generation != self.auth.generation, self.auth.has_expired(token)
        reads = None if replaced or expired else await self._reads_elsewhere(token, url)
        verdict = judge_403(replaced=replaced, expired=expired, reads=reads, worked=generation in self._working)
        if verdict == "stop":
            raise self._lost_access()
        return verdict == "token"

    def _lost_access(self) -> AuthError:
        return AuthError(
            f"Testpress refuses a new token of {self._api.username!r} on pages that answered earlier in this "
            "run: the account may have lost its access, or another session keeps replacing this one",
            hint="check that the account may still read the institute; give testpress-sync an account of its own",
        )

    async def _reads_elsewhere(self, token: str, url: str) -> bool | None:
        """Whether `token` still reads a URL other than `url` that answered in this run (the
        latest, else the first: one GET, no login); None when there is none, or its answer
        says nothing of the token (gone, failing)."""
        for known in dict.fromkeys((self._last_good, self._first_good)):
            if known is not None and known != url:
                reads = await self._still_reads(known, token)
                if reads is not None:
                    return reads
        return None

    async def _still_reads(self, url: str, token: str) -> bool | None:
        """Whether `token` still reads `url`: False when refused (401, 403), None when the
        answer says nothing of the token (gone, failing)."""
        try:
            await self._get(url, token)
        except TokenExpiredError:
            return False
        except SkippableError as answer:
            return False if answer.status == 403 else None
        except ApiError:  # (a refused session is an AuthError: the run stops, no login spent first)
            return None
        return True

    async def _send(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, json: Any = None
    ) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await self._exchange(method, url, headers=headers, json=json)
        except LoginRefusedError as refused:  # the session itself is refused, at any step: the run stops
            raise self._refusal(refused) from None
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
        body = None
        if json is not None:
            body = orjson.dumps(json)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        status, answer, content, url = await self._follow(method, url, headers, body)
        return parse_response(status, answer, content, url)

    async def status_of(self, url: str) -> tuple[int, str | None]:
        """A GET of `url` without a login, redirects followed as for every GET: its status
        and Location (for the doctor). Raises ApiError when nothing usable answered."""
        status, answer, _, _ = await self._follow("GET", url, None, None)
        return status, answer.get("location")

    async def _follow(
        self, method: str, url: str, headers: Mapping[str, str] | None, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes, str]:
        """One request and, for a GET, the redirects within the server asked (see
        redirect_target), so the token goes nowhere else; the login's POST follows none.
        Returns the last answer and the URL that gave it."""
        status, answer, content = await self._fetch(method, url, headers, body)
        if method != "GET":
            return status, answer, content, url
        for _ in range(MAX_REDIRECTS):
            target = redirect_target(status, answer, url)
            if target is None:
                return status, answer, content, url
            log.debug("redirect_followed", url=url, to=target, status=status)
            url = target
            status, answer, content = await self._fetch(method, url, headers, body)
        target = redirect_target(status, answer, url)
        if target is not None:
            raise ApiError(
                f"HTTP {status}: more than {MAX_REDIRECTS} redirects, the last to {target}; "
                "set api.base_url to the address the API answers at",
                url=url,
                status=status,
            )
        return status, answer, content, url

    async def _fetch(
        self, method: str, url: str, headers: Mapping[str, str] | None, body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request: status, headers and the whole body. Every failure to get them is
        an ApiError: RetriableError for the network's, not for TLS or an unusable URL."""
        if not url.startswith(("https://", "http://")):  # attempts URLs come from the server's data
            raise ApiError(f"cannot request it: not an http(s) URL: {url!r}", url=url)
        try:
            async with self._in_flight:
                # After a 429, no request leaves before the pause ends: checked once the
                # slot is ours, so the requests that were already queued for one wait too.
                pause = self._paused_until - asyncio.get_running_loop().time()
                if pause > 0:
                    await self._sleep(pause)
                self.stats.requests += 1
                async with self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, proxy=self.proxies.for_url(url)
                ) as response:
                    return response.status, response.headers, await response.read()
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise RetriableError(f"timed out after {self._http.timeout:g}s", url=url) from None
        except aiohttp.ClientSSLError as exc:
            # Not retried: an untrusted certificate will not become trusted in a second.
            raise ApiError(
                f"TLS failed with {exc.host}:{exc.port}: {_tls_reason(exc)}; if a proxy re-signs "
                "traffic, set api.ca_bundle (TESTPRESS_CA_BUNDLE) to its CA certificate",
                url=url,
            ) from None
        except aiohttp.ClientHttpProxyError as exc:  # the proxy's own answer to a CONNECT (https:// URLs)
            raise proxy_refusal(exc.status, url) from None
        except aiohttp.ClientResponseError as exc:  # a response aiohttp could not parse
            raise RetriableError(f"the server sent a malformed HTTP response: {_one_line(exc.message)}", url=url) from None
        except aiohttp.ClientPayloadError as exc:
            raise RetriableError(f"the response body was cut short or garbled: {_network_reason(exc)}", url=url) from None
        except aiohttp.InvalidURL as exc:
            raise ApiError(f"cannot request it: not a valid URL: {exc}", url=url) from None
        except aiohttp.ClientError as exc:  # connecting (to the server or the proxy), resets, disconnects
            raise RetriableError(f"connection failed: {_network_reason(exc)}", url=url) from None
        except ValueError as exc:  # a header that cannot be sent (a token from the server's data)
            raise ApiError(f"cannot request it: {exc}", url=url) from None

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
        except ApiError as exc:  # (a refusal code is an AuthError already: never retried)
            if exc.status in (400, 401, 403):
                raise AuthError(
                    f"Testpress at {self._api.base_url} refused the login of "
                    f"{self._api.username!r}: {str(exc).removeprefix(f'HTTP {exc.status}: ')}"
                ) from None
            raise
        token = document.get("token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"the login answer of {url} holds no token: {error_message(document, b'')}",
                            hint="check TESTPRESS_BASE_URL: it should be the institute's Testpress address")
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


def _tls_reason(error: aiohttp.ClientSSLError) -> str:
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return str(error.certificate_error)
    return str(error.os_error)


def _network_reason(error: aiohttp.ClientError) -> str:
    """The exception's name and aiohttp's text, on one line."""
    text = _one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str) -> str:
    # aiohttp's parser errors draw the bad line and a caret over several lines.
    return " ".join(text.split())
