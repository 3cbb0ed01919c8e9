"""What each HTTP answer means (retry, skip, fail, data), and the page envelope."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sync.errors import ApiError, LoginRefusedError, RetriableError, SkippableError, TokenExpiredError
from sync.source.pagination import later_page_urls, page_count, page_url, read_page
from sync.source.responses import on_server, parse_response

URL = "https://demo.testpress.in/api/v2.1/exams/"


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_response(status, headers or {}, raw, URL)


def test_ok_json_is_returned() -> None:
    assert answer(200, {"count": 0, "results": []}) == {"count": 0, "results": []}


def test_ok_with_broken_json_is_retriable() -> None:
    with pytest.raises(RetriableError, match="not valid JSON"):
        answer(200, b'{"count": 3, "resu')


def test_401_means_log_in_again() -> None:
    with pytest.raises(TokenExpiredError, match="Signature has expired"):
        answer(401, {"detail": "Signature has expired."})


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"detail": "You do not have permission to perform this action."}, "permission"),
        ({"detail": {"error_code": "locked", "message": "Exam locked", "title": "x"}}, "Exam locked"),
        ({"error_code": "not_purchased", "message": "Buy the course"}, "Buy the course"),
    ],
)
def test_403_in_each_shape_is_skippable(body: Any, text: str) -> None:
    with pytest.raises(SkippableError, match=text) as caught:
        answer(403, body)
    assert caught.value.status == 403


@pytest.mark.parametrize("status", [400, 401, 403, 429, 500])
@pytest.mark.parametrize(
    "body",
    [
        {"error_code": "parallel_login_restriction", "message": "Logged in elsewhere"},
        {"detail": {"error_code": "parallel_login_restriction", "message": "Logged in elsewhere"}},
        {"error_code": ["parallel_login_restriction"]},  # DRF's ValidationError
    ],
)
def test_a_session_refused_on_purpose_is_neither_an_expiry_nor_a_throttle(status: int, body: Any) -> None:
    """Whatever the status: not a 401 to log in again for, a 403 of one exam, or a 429 or
    5xx to retry. Another login would make a refused session worse."""
    with pytest.raises(LoginRefusedError) as caught:
        answer(status, body, {"retry-after": "1"})
    assert (caught.value.code, caught.value.status) == ("parallel_login_restriction", status)
    assert not isinstance(caught.value, (RetriableError, SkippableError))


def test_404_is_skippable() -> None:
    with pytest.raises(SkippableError, match="Not found"):
        answer(404, {"detail": "Not found."})


def test_a_redirect_is_not_followed_but_explained() -> None:
    with pytest.raises(ApiError, match="redirected to https://other.example/api/.*base_url") as caught:
        answer(301, b"", {"location": "https://other.example/api/"})
    assert not isinstance(caught.value, RetriableError | SkippableError) and caught.value.status == 301


def test_429_honours_retry_after_header() -> None:
    with pytest.raises(RetriableError) as caught:
        answer(429, {"detail": "Request was throttled. Expected available in 9 seconds."}, {"retry-after": "3"})
    assert caught.value.retry_after == 3.0


def test_429_without_header_reads_the_detail_text() -> None:
    with pytest.raises(RetriableError) as caught:
        answer(429, {"detail": "Request was throttled. Expected available in 17 seconds."})
    assert caught.value.retry_after == 17.0


def test_429_with_nothing_to_go_on_uses_backoff() -> None:
    with pytest.raises(RetriableError) as caught:
        answer(429, b"")
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_with_html_bodies_are_retriable(status: int) -> None:
    with pytest.raises(RetriableError, match="HTML page") as caught:
        answer(status, b"<html><body><h1>502 Bad Gateway</h1></body></html>")
    assert caught.value.status == status and caught.value.retry_after is None


def test_other_client_errors_are_not_retried() -> None:
    with pytest.raises(ApiError) as caught:
        answer(400, {"non_field_errors": ["Unable to log in with provided credentials."]})
    assert not isinstance(caught.value, (RetriableError, SkippableError))
    assert "Unable to log in" in str(caught.value)


# --- pagination ---------------------------------------------------------------------------


def envelope(count: int, results: int, *, per_page: int | None = 20, has_next: bool = True) -> dict[str, Any]:
    document: dict[str, Any] = {
        "count": count,
        "next": f"{URL}?page=2" if has_next else None,
        "previous": None,
        "results": [{"id": n} for n in range(results)],
    }
    if per_page is not None:
        document["per_page"] = per_page
    return document


@pytest.mark.parametrize(
    ("count", "per_page", "pages"), [(0, 20, 1), (20, 20, 1), (21, 20, 2), (45, 20, 3), (401, 200, 3)]
)
def test_page_count_from_count_and_per_page(count: int, per_page: int, pages: int) -> None:
    page = read_page(envelope(count, min(count, per_page), per_page=per_page, has_next=count > per_page), URL)
    assert page_count(page) == pages


def test_a_page_without_count_can_only_be_followed() -> None:
    document = envelope(45, 20)
    del document["count"]
    page = read_page(document, URL)
    assert page.count is None and page_count(page) is None and page.next_url == f"{URL}?page=2"


def test_page_count_without_per_page_uses_the_first_page_size() -> None:
    assert page_count(read_page(envelope(45, 20, per_page=None), URL)) == 3


def test_later_page_urls_keep_other_parameters() -> None:
    first = read_page(envelope(45, 20), f"{URL}?course=IBPS&state=history")
    assert later_page_urls(first) == [
        f"{URL}?course=IBPS&state=history&page=2",
        f"{URL}?course=IBPS&state=history&page=3",
    ]


def test_page_urls_of_a_plain_listing_url() -> None:
    first = read_page(envelope(45, 20), URL)
    assert later_page_urls(first) == [f"{URL}?page=2", f"{URL}?page=3"]
    assert page_url(URL, 1) == URL


def test_page_url_replaces_an_existing_page_parameter() -> None:
    assert page_url(f"{URL}?page=4&course=SSC", 2) == f"{URL}?course=SSC&page=2"


@pytest.mark.parametrize("document", [[], {"detail": "x"}, {"results": "nope"}])
def test_a_document_that_is_not_a_page_is_an_api_error(document: Any) -> None:
    with pytest.raises(ApiError, match="not a page"):
        read_page(document, URL)


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://demo.testpress.in/api/v2.1/exams/x/attempts/", "https://demo.testpress.in/api/v2.1/exams/x/attempts/"),
        ("https://demo.testpress.in:443/api/v2.1/exams/?page=2", "https://demo.testpress.in:443/api/v2.1/exams/?page=2"),
        # Another host, port or scheme, or credentials: the same path and query, here.
        ("https://cdn.example.com/api/v2.1/exams/x/attempts/?page=2", "https://demo.testpress.in/api/v2.1/exams/x/attempts/?page=2"),
        ("https://demo.testpress.in:8443/api/v2.1/exams/", "https://demo.testpress.in/api/v2.1/exams/"),
        ("http://demo.testpress.in/api/v2.1/exams/", "https://demo.testpress.in/api/v2.1/exams/"),
        ("https://user:pw@demo.testpress.in/api/v2.1/exams/", "https://demo.testpress.in/api/v2.1/exams/"),
        ("/api/v2.1/exams/", "/api/v2.1/exams/"),  # relative: resolved by whoever made it
    ],
)
def test_urls_a_server_names_are_asked_at_the_configured_server(url: str, sent: str) -> None:
    assert on_server(url, "https://demo.testpress.in") == sent
