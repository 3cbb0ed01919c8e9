"""The one place that decides what an HTTP response means: data, retry, skip or fail.

Pure functions of (status, headers, body), so every rule is tested without a network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import orjson

from sync.errors import ApiError, LoginRefusedError, RetriableError, SkippableError, TokenExpiredError

# Logins Testpress refuses on purpose, and what to do about each. Official clients look
# for these codes on every error answer, not only the login's.
LOGIN_REFUSALS = {
    "parallel_login_restriction": "another session of this account is active, and the institute allows "
    "one at a time; log it out, or give testpress-sync an account of its own",
    "max_login_exceeded": "this account logged in too many times and is locked for a cool-off time; "
    "wait before the next run, and do not run it in a loop",
}

RETRIABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3  # an upgrade to https, then an added slash, with one to spare
_THROTTLE_TEXT = re.compile(r"available in (\d+(?:\.\d+)?) seconds?")


def parse_response(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Any:
    """The JSON document of a successful response; otherwise the ApiError that says why.
    `headers` answers to lower-case names (aiohttp's are case-insensitive)."""
    if 200 <= status < 300:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RetriableError(
                f"HTTP {status} with a body that is not valid JSON ({len(body)} bytes)",
                url=url,
                status=status,
            ) from None
    document = _json_or_none(body)
    message = f"HTTP {status}: {error_message(document, body)}"
    code = error_code(document)
    if code in LOGIN_REFUSALS:  # whatever the status: a 401 or a 429 with it is no expiry, no throttle
        raise LoginRefusedError(message, url=url, status=status, code=code)
    if status == 401:
        raise TokenExpiredError(message, url=url, status=status)
    if status in (403, 404):
        raise SkippableError(message, url=url, status=status, code=code)
    if status == 407:  # from the proxy, for an http:// URL: it did not pass the request on
        raise proxy_refusal(status, url)
    if 300 <= status < 400:
        # Not followed (see redirect_target): a redirect elsewhere would carry the token
        # to wherever it points.
        message = f"HTTP {status}: redirected to {headers.get('location', 'an unnamed address')}"
        raise ApiError(
            f"{message}; set api.base_url to the address the API answers at", url=url, status=status
        )
    if status in RETRIABLE_STATUSES or status >= 500:
        retry_after = retry_after_seconds(headers, document) if status == 429 else None
        raise RetriableError(message, url=url, status=status, retry_after=retry_after)
    raise ApiError(message, url=url, status=status, code=code)


def proxy_refusal(status: int, url: str) -> ApiError:
    """The error for a proxy that refused to carry a request (for an https:// URL, to
    open its tunnel): retried when the proxy's trouble may pass, as a server's would."""
    if status == 407:
        return ApiError(
            "HTTP 407: the proxy wants a login; give it in the proxy URL, "
            "http://user:password@host:port (http.proxy, or HTTPS_PROXY / HTTP_PROXY)",
            url=url,
            status=status,
        )
    error = RetriableError if status in RETRIABLE_STATUSES or status >= 500 else ApiError
    return error(f"HTTP {status}: the proxy refused to open a tunnel to the server", url=url, status=status)


def redirect_target(status: int, headers: Mapping[str, str], url: str) -> str | None:
    """Where a GET answered by this redirect goes next, or None when it is not followed
    (then parse_response explains the 3xx). Followed only within the server that was
    asked: the same host name and port, or an upgrade from http to https on port 443.
    A port is a server of its own (another service on the same machine must not get the
    token), and https never turns into http."""
    if status not in REDIRECT_STATUSES:  # first: most answers are not, and cost no header lookup
        return None
    location = headers.get("location")
    if not location:
        return None
    target = urljoin(url, location.strip()).partition("#")[0]
    try:
        source, dest = urlsplit(url), urlsplit(target)
        if dest.username is not None or dest.password is not None:
            return None  # credentials in a Location: not ours to send
        if _same_server(source, dest):
            return target
        upgrade = dest.hostname == source.hostname and (source.scheme, dest.scheme, _port(dest)) == ("http", "https", 443)
    except ValueError:  # a port that is not a number
        return None
    return target if upgrade else None


def on_server(url: str, base_url: str) -> str:
    """`url` if it is on the server `base_url` names (scheme, host, port), else its path
    and query on that server. Servers name URLs in their answers (`attempts_url`, `next`);
    one that names another host (a canonical name, a proxy's) must not get the token, nor
    make the walk fail: the API lives at the configured address."""
    if url.startswith(f"{base_url}/"):  # the usual case, every URL we build ourselves
        return url
    base = urlsplit(base_url)
    try:
        target = urlsplit(url)
        # Relative (resolved by whoever made it), not ours to send at all, or on this server.
        if target.scheme not in ("http", "https") or _same_server(base, target):
            return url
    except ValueError:  # not a URL one can send: the request fails on it, as it would have
        return url
    return urlunsplit((base.scheme, base.netloc, target.path, target.query, ""))


def _same_server(base: SplitResult, other: SplitResult) -> bool:
    """`other` is on the server `base` names: the same scheme, host name and port (the
    scheme's default counted), with no credentials of its own. ValueError: a port that is
    not a number."""
    return (other.username is None and other.password is None
            and (other.scheme, other.hostname, _port(other)) == (base.scheme, base.hostname, _port(base)))  # fmt: skip


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def retry_after_seconds(headers: Mapping[str, str], document: Any) -> float | None:
    """Seconds to wait after a 429: the Retry-After header, else DRF's "in N seconds" text."""
    header = headers.get("retry-after")
    if header is not None:
        try:
            return max(0.0, float(header.strip()))
        except ValueError:
            pass  # an HTTP date: rare from DRF; fall back to the body, then to backoff
    detail = document.get("detail") if isinstance(document, dict) else None
    if isinstance(detail, str):
        match = _THROTTLE_TEXT.search(detail)
        if match:
            return float(match[1])
    return None


def error_code(document: Any) -> str | None:
    """Testpress's `error_code`, at the top of the answer or inside `detail`; DRF's
    ValidationError sends it as a one-element list."""
    if not isinstance(document, dict):
        return None
    detail = document.get("detail")
    for holder in (document, detail if isinstance(detail, dict) else {}):
        code = holder.get("error_code")
        if isinstance(code, list) and len(code) == 1:
            code = code[0]
        if isinstance(code, str) and code:
            return code
    return None


def error_message(document: Any, body: bytes) -> str:
    """A short human text from any of Testpress's error shapes, or a description of the body."""
    if isinstance(document, dict):
        detail = document.get("detail", document)
        if isinstance(detail, str):
            return detail
        if isinstance(detail, dict):
            for key in ("message", "title", "error_code"):
                if isinstance(detail.get(key), str):
                    return detail[key]
            for value in detail.values():  # DRF field errors: {"field": ["text"]}
                if isinstance(value, list) and value and isinstance(value[0], str):
                    return value[0]
    if not body.strip():
        return "empty body"
    if body.lstrip()[:1] == b"<":
        return "an HTML page (a proxy or server error page)"
    return f"a body of {len(body)} bytes that is not JSON"


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
