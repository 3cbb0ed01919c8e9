"""The simulator's aiohttp application: Testpress v2.1 routes, JWT auth, switchable faults.

The v2.5 admin routes live in `admin.py`; this module registers them and gives them the
same middlewares (accounting, faults, auth) and the same pagination envelope.

Two logins: the admin one (`username`/`password`) reads everything, v2.1 and admin API;
the student one (`student_username`/`student_password`, bound to one data-set user) sees
its own attempts on v2.1 and gets 403 on every admin route. A token's role follows from
its signed `user_id` claim: real Testpress tokens carry no role claim, so neither do ours.

Control routes under /_simulator/ (not part of Testpress) let a separate process switch
faults, change the data and read counters:
    GET  /_simulator/stats                   requests, logins, peak in flight, per route
    POST /_simulator/faults   {"throttle_rate": 0.2, "login_refusal": "max_login_exceeded", ...}
    POST /_simulator/change   {"action": "add_attempts", "exam_id": 3, "count": 5}
                              (more actions in admin.CHANGES)
    POST /_simulator/webhooks {"url": "http://127.0.0.1:8080/testpress/webhook", "limit": 100}
                              sends the data set's signed webhook deliveries (webhooks.py)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson
from aiohttp import web

from sync.simulator.data import Dataset, Faults, SimAttempt, SimExam, exam_start

API = "/api/v2.1"
ADMIN_PREFIX = "/api/v2.5/admin/"
ADMIN_USER_ID = 1  # the admin login's user_id; data-set users are numbered from 1000
T = TypeVar("T")
DATASET_KEY = web.AppKey("dataset", Dataset)
Change = Callable[[Dataset, dict[str, Any]], dict[str, Any]]
CHANGES_KEY = web.AppKey("changes", dict[str, Change])


@dataclass
class SimulatorState:
    """Counters and settings of one running simulator."""

    faults: Faults
    username: str = "admin"
    password: str = "secret"
    student_username: str = "student"
    student_password: str = "student-secret"
    student_user_id: int | None = None  # the data-set user the student login is; None: no student
    per_page: int = 20
    # Admin page sizes are fixed per endpoint on Testpress (the API notes); tests may shrink them.
    admin_per_page: dict[str, int] = field(
        default_factory=lambda: {"exams": 200, "attempts": 200, "users": 20, "batches": 20}
    )
    envelope_counts: bool = True  # False: pages without `count` and `per_page`
    relative_attempts_urls: bool = False  # True: exams name their attempts by path only
    # False: admin exam rows as documented, with no `id` (nor slug, nor url), in the
    # listing and the detail alike; attempts still name their exam by exam_id and exam_url.
    admin_exam_ids: bool = True
    # Exams the admin exam listing leaves out, as one created after the listing was read:
    # their detail and their attempts still answer.
    unlisted_exams: set[int] = field(default_factory=set)
    # What a student token gets on an admin route: 403 as documented, or 401, which
    # official clients treat alike (the API notes, "Access").
    student_admin_status: int = 403
    # Rows of an admin listing ("users", "exams", ...) served with an id that is no number.
    unidentifiable: dict[str, set[int]] = field(default_factory=dict)
    # Rows of an admin listing served with some fields replaced (kind → id → field →
    # value): a bad value in one field ("speed": "fast").
    replaced_fields: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    # Users the admin user listing shows twice (its count includes both): a listing that
    # repeats an item, as one that shifts between pages does.
    repeated_users: set[int] = field(default_factory=set)
    # Users deleted upstream while the admin user listing is walked: once a page after the
    # first is asked for, as when an account is removed during a nightly run.
    users_deleted_mid_walk: set[int] = field(default_factory=set)
    secret: bytes = b"simulator-signing-key"
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    requests: int = 0
    logins: int = 0
    refused_logins: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    faults_served: int = 0
    issued_tokens: list[str] = field(default_factory=list)
    # Tokens of logins before this one (their `jti`) are refused as expired, whatever
    # their `exp` says: the server ended those sessions (a login elsewhere, a server
    # clock ahead of ours). Tests set it to `logins + 1` to end every session so far.
    sessions_valid_from: int = 0
    # `state` values of the v2.1 exam listing that answer 403 (after a valid login).
    forbidden_exam_states: set[str] = field(default_factory=set)
    by_path: dict[str, int] = field(default_factory=dict)  # by last path segment: "exams", "attempts"
    # By route pattern ("/api/v2.5/admin/attempts/{attempt_id}/"): by_path cannot tell
    # v2.1's exams from the admin exams, nor a listing from a detail.
    by_route: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "logins": self.logins,
            "refused_logins": self.refused_logins,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faults_served": self.faults_served,
            "by_path": dict(self.by_path),
            "by_route": dict(self.by_route),
            # the serving process's CPU: the benchmark shows what the simulator took of
            # the machine it shares with the sync
            "cpu_s": time.process_time(),
        }


STATE_KEY = web.AppKey("state", SimulatorState)


# --- JWT (HS256), as Testpress issues them ---------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(
    state: SimulatorState,
    user_id: int = ADMIN_USER_ID,
    username: str | None = None,
    email: str | None = None,
) -> str:
    header = _b64(orjson.dumps({"typ": "JWT", "alg": "HS256"}))
    username = username or state.username
    claims = {
        "username": username,
        "user_id": user_id,
        "email": email or f"{username}@example.com",
        "exp": time.time() + state.faults.token_lifetime,
        "jti": state.logins,
    }
    body = _b64(orjson.dumps(claims))
    signature = hmac.new(state.secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


def token_problem(state: SimulatorState, authorization: str | None) -> str | None:
    """Why the Authorization header is not acceptable, or None when it is."""
    if not authorization:
        return "Authentication credentials were not provided."
    scheme, _, token = authorization.partition(" ")
    if scheme != "JWT" or token.count(".") != 2:
        return "Invalid Authorization header. No credentials provided."
    header, body, signature = token.split(".")
    expected = hmac.new(state.secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(_b64(expected), signature):
        return "Error decoding signature."
    claims = orjson.loads(_unb64(body))
    if claims["exp"] < time.time() or claims["jti"] < state.sessions_valid_from:
        return EXPIRED
    return None


EXPIRED = "Signature has expired."


def token_claims(request: web.Request) -> dict[str, Any]:
    """The claims of the request's token, which the authentication middleware checked."""
    token = request.headers["Authorization"].partition(" ")[2]
    claims: dict[str, Any] = orjson.loads(_unb64(token.split(".")[1]))
    return claims


def student_id(request: web.Request) -> int | None:
    """The user id of a student token; None for the admin's."""
    user_id = token_claims(request)["user_id"]
    return None if user_id == ADMIN_USER_ID else int(user_id)


# --- responses -------------------------------------------------------------------------------


def json_response(payload: Any, status: int = 200) -> web.Response:
    return json_body_response(orjson.dumps(payload), status)


def json_body_response(body: bytes, status: int = 200) -> web.Response:
    """A response whose JSON is already serialized: the same headers as json_response."""
    return web.Response(body=body, status=status, content_type="application/json")


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def paginate(
    request: web.Request,
    items: Sequence[T],
    per_page: int,
    render: Callable[[T], Any],
    *,
    page_last: bool = False,
) -> dict[str, Any] | None:
    """The Testpress envelope for one page, or None for a page past the end.

    Only the page's own items are rendered: the envelope needs the count, not every
    payload, which keeps a listing of thousands cheap to serve. `page_last` moves `page`
    to the end of the links' query (`?exams=3&page=2`), as the admin links are written;
    v2.1's links keep the order they always had."""
    window = _page_window(request, len(items), per_page)
    if window is None:
        return None
    page, pages = window
    results = [render(item) for item in items[(page - 1) * per_page : page * per_page]]
    return _envelope(request, len(items), page, pages, per_page, results, page_last)


def paginate_serialized(
    request: web.Request,
    items: Sequence[T],
    per_page: int,
    serialized: Callable[[Sequence[T]], list[bytes]],
    *,
    page_last: bool = False,
) -> bytes | None:
    """`orjson.dumps(paginate(...))`, byte for byte, from rows already serialized
    (`serialized(page_items)`, each row's JSON): the rows are joined into the envelope,
    never parsed or dumped again. None for a page past the end."""
    window = _page_window(request, len(items), per_page)
    if window is None:
        return None
    page, pages = window
    rows = serialized(items[(page - 1) * per_page : page * per_page])
    empty = orjson.dumps(_envelope(request, len(items), page, pages, per_page, [], page_last))
    # `results` is the envelope's last field: its `[]}` is where the rows go.
    assert empty.endswith(b"[]}")
    return b"".join((empty[:-2], b",".join(rows), b"]}"))


def _page_window(request: web.Request, count: int, per_page: int) -> tuple[int, int] | None:
    """(the page asked for, the number of pages), or None when there is no such page."""
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        return None
    pages = max(1, -(-count // per_page))
    if page < 1 or page > pages:
        return None
    return page, pages


def _envelope(
    request: web.Request,
    count: int,
    page: int,
    pages: int,
    per_page: int,
    results: list[Any],
    page_last: bool,
) -> dict[str, Any]:
    def link(number: int) -> str | None:
        if number < 1 or number > pages:
            return None
        query = dict(request.query)
        if page_last:
            query.pop("page", None)
        query["page"] = str(number)
        return f"{base_url(request)}{request.path}?{urlencode(query)}"

    envelope = {
        "count": count,
        "next": link(page + 1),
        "previous": link(page - 1),
        "per_page": per_page,
        "results": results,
    }
    if not request.app[STATE_KEY].envelope_counts:
        del envelope["count"], envelope["per_page"]
    return envelope


INVALID_PAGE = {"detail": "Invalid page."}


# --- middlewares: accounting, faults, auth ----------------------------------------------------


@web.middleware
async def accounting(request: web.Request, handler: Any) -> web.StreamResponse:
    state: SimulatorState = request.app[STATE_KEY]
    if request.path.startswith("/_simulator/"):
        return await handler(request)
    state.requests += 1
    key = request.path.rsplit("/", 2)[-2] if request.path.endswith("/") else request.path
    state.by_path[key] = state.by_path.get(key, 0) + 1
    resource = request.match_info.route.resource  # None when no route matched
    route = resource.canonical if resource is not None else request.path
    state.by_route[route] = state.by_route.get(route, 0) + 1
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        if not state.faults.latency:
            return await handler(request)
        # The answer leaves `latency` after the request arrived, however long rendering
        # it took. Rendering after the wait instead would queue the requests in flight
        # behind one another on this one thread, and add the simulator's own CPU to the
        # latency every client sees.
        loop = asyncio.get_running_loop()
        answer_at = loop.time() + state.faults.latency
        response = await handler(request)
        if (wait := answer_at - loop.time()) > 0:
            await asyncio.sleep(wait)
        return response
    finally:
        state.in_flight -= 1


_HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"


@web.middleware
async def inject_faults(request: web.Request, handler: Any) -> web.StreamResponse:
    state: SimulatorState = request.app[STATE_KEY]
    plan = state.faults
    if request.path.startswith("/_simulator/"):
        return await handler(request)
    roll = state.rng.random()
    for rate, make in (
        (plan.throttle_rate, _throttled),
        (plan.server_error_rate, _server_error),
        (plan.drop_rate, _dropped),
    ):
        if roll < rate:
            state.faults_served += 1
            return await make(request, state)
        roll -= rate
    response = await handler(request)
    if roll < plan.truncate_rate and isinstance(response, web.Response) and response.status == 200:
        state.faults_served += 1
        return await _truncated(request, response, state)
    return response


async def _throttled(request: web.Request, state: SimulatorState) -> web.StreamResponse:
    wait = state.faults.retry_after
    response = json_response(
        {"detail": f"Request was throttled. Expected available in {wait} seconds."}, 429
    )
    if state.rng.random() < 0.8:  # normally, not always, with the header
        response.headers["Retry-After"] = str(wait)
    return response


async def _server_error(request: web.Request, state: SimulatorState) -> web.StreamResponse:
    status = state.rng.choice((500, 502, 503, 504))
    if status in (502, 504):
        return web.Response(body=_HTML_502, status=status, content_type="text/html")
    return json_response({"detail": "A server error occurred."}, status)


async def _dropped(request: web.Request, state: SimulatorState) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError  # aiohttp ends the handler quietly once the peer is gone


async def _truncated(
    request: web.Request, response: web.Response, state: SimulatorState
) -> web.StreamResponse:
    body = response.body if isinstance(response.body, bytes) else b""
    cut = body[: max(1, len(body) // 2)]
    if state.rng.random() < 0.5:
        # A well-formed HTTP response whose JSON is cut short.
        return web.Response(body=cut, status=200, content_type="application/json")
    # Content-Length promises more than arrives: the peer sees the connection close early.
    stream = web.StreamResponse(status=200, headers={"Content-Length": str(len(body))})
    stream.content_type = "application/json"
    await stream.prepare(request)
    await stream.write(cut)
    assert request.transport is not None
    request.transport.close()
    return stream


@web.middleware
async def authentication(request: web.Request, handler: Any) -> web.StreamResponse:
    state: SimulatorState = request.app[STATE_KEY]
    if request.path.startswith("/_simulator/") or request.path.endswith("/auth-token/"):
        return await handler(request)
    problem = token_problem(state, request.headers.get("Authorization"))
    if problem == EXPIRED:
        return json_response({"detail": problem}, state.faults.expired_token_status)
    if problem:
        return json_response({"detail": problem}, 401)
    if state.faults.session_refusal:
        return json_response(REFUSAL_BODIES[state.faults.session_refusal], 403)
    if request.path.startswith(ADMIN_PREFIX) and student_id(request) is not None:
        return json_response({"detail": "You do not have permission to perform this action."}, state.student_admin_status)
    return await handler(request)


# --- Testpress routes ------------------------------------------------------------------------


async def login(request: web.Request) -> web.Response:
    state: SimulatorState = request.app[STATE_KEY]
    try:
        credentials = await request.json()
    except ValueError:
        return json_response({"detail": "JSON parse error."}, 400)
    if not isinstance(credentials, dict) or not {"username", "password"} <= credentials.keys():
        return json_response({"username": ["This field is required."]}, 400)
    account = _account(request, credentials["username"], credentials["password"])
    if account is None:
        return json_response(
            {"non_field_errors": ["Unable to log in with provided credentials."]}, 400
        )
    if state.faults.login_refusal:
        state.refused_logins += 1
        return json_response(REFUSAL_BODIES[state.faults.login_refusal], 403)
    state.logins += 1
    token = issue_token(state, *account)
    state.issued_tokens.append(token)
    return json_response({"token": token})


def _account(request: web.Request, username: object, password: object) -> tuple[int, str, str] | None:
    """(user_id, username, email) of the login these credentials open, or None."""
    state: SimulatorState = request.app[STATE_KEY]
    if username == state.username and password == state.password:
        return ADMIN_USER_ID, state.username, f"{state.username}@example.com"
    if state.student_user_id is None or username != state.student_username:
        return None
    if password != state.student_password:
        return None
    dataset = request.app[DATASET_KEY]
    email = dataset.profile(dataset.user(state.student_user_id)).email
    return state.student_user_id, state.student_username, email or f"{state.student_username}@example.com"


# Refusals of a right password, worded as the official apps expect them: they read
# `error_code` (and show `detail`) from the 403's body.
REFUSAL_BODIES: dict[str, dict[str, str]] = {
    code: {"error_code": code, "message": message, "detail": message}
    for code, message in (
        (
            "parallel_login_restriction",
            "You are already logged in on another device. Log out of it to log in here.",
        ),
        (
            "max_login_exceeded",
            "Your account has been locked as it has exceeded the maximum number of devices "
            "it can be used on. It will be unlocked after the cool-off time.",
        ),
    )
}


def _visible_exams(request: web.Request, dataset: Dataset) -> list[SimExam]:
    course, wanted = request.query.get("course"), request.query.get("state")
    exams = [exam for exam in dataset.exams if course is None or exam.course == course]
    if wanted is None:
        return exams
    viewer, now = student_id(request), dataset.clock()
    return [exam for exam in exams if _exam_state(exam, viewer, now) == wanted]


def _exam_state(exam: SimExam, viewer: int | None, now: datetime) -> str:
    """The v2.1 `state` an exam is listed under for this login: `history` once the user
    attempted it, `upcoming` before it starts, `available` otherwise (every exam is in
    exactly one). The admin login has attempted none."""
    if viewer is not None and any(attempt.user.id == viewer for attempt in exam.attempts):
        return "history"
    return "upcoming" if exam_start(exam) > now else "available"


def _drift(dataset: Dataset, plan: Faults) -> None:
    """A listing that changes while it is being walked."""
    if plan.listing_inserts > 0:
        plan.listing_inserts -= 1
        dataset.add_exam(attempts=3)
    if plan.listing_deletes > 0 and len(dataset.exams) > 1:
        plan.listing_deletes -= 1
        dataset.delete_exam(dataset.exams[len(dataset.exams) // 2].id)


async def exam_list(request: web.Request) -> web.Response:
    state: SimulatorState = request.app[STATE_KEY]
    dataset = request.app[DATASET_KEY]
    if request.query.get("state") in state.forbidden_exam_states:
        return json_response({"detail": "You do not have permission to perform this action."}, 403)
    if request.query.get("page", "1") != "1":
        _drift(dataset, state.faults)
    base = base_url(request)
    exams = _visible_exams(request, dataset)

    def render(exam: SimExam) -> dict[str, Any]:
        payload = dataset.exam_payload(exam, base)
        if state.relative_attempts_urls:
            payload["attempts_url"] = payload["attempts_url"].removeprefix(base)
        return payload

    page = paginate(request, exams, state.per_page, render)
    return json_response(page) if page else json_response(INVALID_PAGE, 404)


def _exam_or_404(request: web.Request) -> SimExam | web.Response:
    exam = request.app[DATASET_KEY].exam_by_slug(request.match_info["slug"])
    return exam if exam is not None else json_response({"detail": "Not found."}, 404)


def _forbidden(exam: SimExam) -> web.Response:
    # Testpress words a 403 in three shapes; use each.
    shapes: list[dict[str, Any]] = [
        {"detail": "You do not have permission to perform this action."},
        {"detail": {"error_code": "exam_locked", "message": "Locked", "title": "Locked"}},
        {"error_code": "exam_not_purchased", "message": "Buy the course to attempt."},
    ]
    return json_response(shapes[exam.id % 3], 403)


async def exam_detail(request: web.Request) -> web.Response:
    exam = _exam_or_404(request)
    if isinstance(exam, web.Response):
        return exam
    if exam.forbidden:
        return _forbidden(exam)
    dataset = request.app[DATASET_KEY]
    base = base_url(request)
    payload = dataset.exam_payload(exam, base)
    payload["attempts"] = [
        dataset.attempt_payload(exam, attempt, base, nested_user=False)
        for attempt in _own(request, exam.attempts)
    ]
    return json_response(payload)


def _own(request: web.Request, attempts: list[SimAttempt]) -> list[SimAttempt]:
    """What the login may see of an exam's attempts: all for the admin, a student's own
    for a student ("retrieves the attempts of a user for a particular exam")."""
    viewer = student_id(request)
    return attempts if viewer is None else [a for a in attempts if a.user.id == viewer]


async def attempt_list(request: web.Request) -> web.Response:
    state: SimulatorState = request.app[STATE_KEY]
    exam = _exam_or_404(request)
    if isinstance(exam, web.Response):
        return exam
    if exam.forbidden:
        return _forbidden(exam)
    if exam.vanished:
        return json_response({"detail": "Not found."}, 404)
    dataset = request.app[DATASET_KEY]
    per_page = state.per_page
    if exam.broken_page is not None and request.query.get("page") == str(exam.broken_page):
        return json_response({"detail": "A server error occurred."}, 500)
    base = base_url(request)
    page = paginate(
        request,
        _own(request, exam.attempts),
        per_page,
        lambda attempt: dataset.attempt_payload(exam, attempt, base),
    )
    return json_response(page) if page else json_response(INVALID_PAGE, 404)


# --- control routes --------------------------------------------------------------------------


async def control_stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE_KEY].stats())


async def control_faults(request: web.Request) -> web.Response:
    state: SimulatorState = request.app[STATE_KEY]
    try:
        state.faults.update(await request.json())
    except (ValueError, TypeError) as exc:
        return json_response({"detail": str(exc)}, 400)
    return json_response(asdict(state.faults))


async def control_change(request: web.Request) -> web.Response:
    dataset = request.app[DATASET_KEY]
    change = await request.json()
    try:
        return _apply_change(request, dataset, change)
    except KeyError as exc:  # an exam, attempt, user or batch that does not exist
        return json_response({"detail": f"not found: {exc}"}, 404)
    except (ValueError, TypeError) as exc:
        return json_response({"detail": str(exc)}, 400)


def _apply_change(request: web.Request, dataset: Dataset, change: dict[str, Any]) -> web.Response:
    action = change.get("action")
    if action in request.app[CHANGES_KEY]:
        return json_response(request.app[CHANGES_KEY][action](dataset, change))
    if action == "add_attempts":
        added = dataset.add_attempts(dataset.exam(int(change["exam_id"])), int(change["count"]))
        return json_response({"added": [attempt.id for attempt in added]})
    if action == "complete_running":
        return json_response({"completed": dataset.complete_running()})
    if action == "rename_exam":
        dataset.rename_exam(int(change["exam_id"]), str(change["title"]))
    elif action == "delete_exam":
        dataset.delete_exam(int(change["exam_id"]))
    elif action == "add_exam":
        exam = dataset.add_exam(attempts=int(change.get("attempts", 0)))
        return json_response({"id": exam.id, "slug": exam.slug})
    else:
        return json_response({"detail": f"unknown action {action!r}"}, 400)
    return json_response({"ok": True})
