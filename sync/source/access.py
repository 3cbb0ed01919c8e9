"""What a login may read: the admin API (the whole institute) or the student API (its
own attempts only). Decided after login by one cheap request."""

from __future__ import annotations

from sync.errors import AuthError, SkippableError
from sync.source.client import TestpressClient

# A listing of 20 short rows: the cheapest admin route that every admin login may read.
ADMIN_PROBE = "/api/v2.5/admin/batches/"


async def choose_source(client: TestpressClient, wanted: str) -> tuple[str, str]:
    """("admin" | "student", why) for `wanted` = auto, admin or student."""
    if wanted == "student":
        return "student", "[testpress] source is student"
    try:
        await client.get_json(client.url(ADMIN_PROBE))
    except SkippableError as exc:
        if wanted == "admin":
            raise AuthError(
                f"[testpress] source is admin, but this login may not read the admin API "
                f"(HTTP {exc.status} from {ADMIN_PROBE}): use an institute staff login, or source = auto",
                hint="the login worked: give an institute staff account, or set [testpress] source = auto",
            ) from None
        return "student", f"the login may not read the admin API (HTTP {exc.status} from {ADMIN_PROBE})"
    if wanted == "admin":
        return "admin", "[testpress] source is admin"
    return "admin", "the login may read the admin API"
