"""The one place that decides what an HTTP response means: data, retry, skip or fail.

Pure functions of (status, headers, body), so every rule is tested without a network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from sync.errors import ApiError, RetriableError, SkippableError, TokenExpiredError

RETRIABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_THROTTLE_TEXT = re.compile(r"available in (\d+(?:\.\d+)?) seconds?")


def parse_response(status: int, headers: Mapping[str, str], body: bytes, url: str) -> Any:
    """The JSON document of a successful response; otherwise the ApiError that says why.
    `headers` has lower-case names."""
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
    if status == 401:
        raise TokenExpiredError(message, url=url, status=status)
    if status in (403, 404):
        raise SkippableError(message, url=url, status=status)
    if 300 <= status < 400:
        # Not followed: a redirect would carry the token to wherever it points.
        message = f"HTTP {status}: redirected to {headers.get('location', 'an unnamed address')}"
        raise ApiError(
            f"{message}; set api.base_url to the address the API answers at", url=url, status=status
        )
    if status in RETRIABLE_STATUSES or status >= 500:
        retry_after = retry_after_seconds(headers, document) if status == 429 else None
        raise RetriableError(message, url=url, status=status, retry_after=retry_after)
    raise ApiError(message, url=url, status=status)


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
