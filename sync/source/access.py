"""What a login may read: the admin API (the whole institute) or the student API (its
own attempts only). Decided after login by one cheap request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sync.errors import AuthError, SkippableError
from sync.source.client import TestpressClient

# A listing of 20 short rows: the cheapest admin route that every admin login may read,
# and one an admin run reads anyway: its answer is the batches listing's first page.
ADMIN_PROBE = "/api/v2.5/admin/batches/"


@dataclass(frozen=True)
class SourceChoice:
    source: str  # "admin" | "student"
    reason: str
    # What ADMIN_PROBE answered, and where (None: not asked, or refused): the admin
    # batches listing's first page, which the run's walk of that listing need not ask for.
    probe: tuple[str, Any] | None = None


async def choose_source(client: TestpressClient, wanted: str) -> SourceChoice:
    """Which API to read for `wanted` = auto, admin or student, and why."""
    if wanted == "student":
        return SourceChoice("student", "[testpress] source is student")
    try:
        url = client.url(ADMIN_PROBE)
        page = await client.get_json(url)
    except SkippableError as exc:
        if wanted == "admin":
            raise AuthError(
                f"[testpress] source is admin, but this login may not read the admin API "
                f"(HTTP {exc.status} from {ADMIN_PROBE}): use an institute staff login, or source = auto",
                hint="the login worked: give an institute staff account, or set [testpress] source = auto",
            ) from None
        return SourceChoice("student", f"the login may not read the admin API (HTTP {exc.status} from {ADMIN_PROBE})")
    if wanted == "admin":
        return SourceChoice("admin", "[testpress] source is admin", (url, page))
    return SourceChoice("admin", "the login may read the admin API", (url, page))
