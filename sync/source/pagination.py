"""The Testpress page envelope, as pure functions: no I/O, no parsing of `next` links.

Page 1 tells `count` and `per_page`, so every other page's URL is known at once and the
pages can be fetched concurrently instead of following `next` one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sync.errors import ApiError


@dataclass(frozen=True)
class Page:
    """One page of a listing, checked for the envelope's shape."""

    url: str
    count: int | None  # None when the server did not say
    per_page: int | None
    next_url: str | None
    results: list[Any]

    @property
    def has_next(self) -> bool:
        return self.next_url is not None


def read_page(document: Any, url: str) -> Page:
    """The envelope of `document`; ApiError if it is not one."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ApiError("the answer is not a page of results (no `results` list)", url=url)
    count = document.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        count = None
    per_page = document.get("per_page")
    if not isinstance(per_page, int) or isinstance(per_page, bool) or per_page < 1:
        per_page = None
    next_url = document.get("next")
    return Page(url, count, per_page, next_url if isinstance(next_url, str) and next_url else None, document["results"])


def page_count(first: Page) -> int | None:
    """How many pages the listing has, from its first page; None if it cannot tell
    (no `count`): then the pages can only be walked by following `next`."""
    if not first.has_next:
        return 1
    per_page = first.per_page or len(first.results)
    if first.count is None or per_page < 1:
        return None
    return max(1, -(-first.count // per_page))


def page_url(first_url: str, number: int) -> str:
    """The URL of page `number`: the first page's URL with `page` set, other params kept."""
    if "?" not in first_url and "#" not in first_url:  # the usual attempts URL: nothing to keep
        return f"{first_url}?page={number}" if number > 1 else first_url
    parts = urlsplit(first_url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "page"]
    if number > 1:
        query.append(("page", str(number)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def later_page_urls(first: Page) -> list[str]:
    """Pages 2… of a listing whose page count is known."""
    pages = page_count(first)
    assert pages is not None, "a listing without a count is walked by following `next`"
    return [page_url(first.url, number) for number in range(2, pages + 1)]
