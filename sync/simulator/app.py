"""The simulator's aiohttp application: Testpress v2.1 routes, JWT auth, switchable faults.

Control routes under /_simulator/ (not part of Testpress) let a separate process switch
faults, change the data and read counters:
    GET  /_simulator/stats                   requests, logins, peak requests in flight
    POST /_simulator/faults   {"throttle_rate": 0.2, ...}
    POST /_simulator/change   {"action": "add_attempts", "exam_id": 3, "count": 5}
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson
from aiohttp import web

from sync.simulator.data import Dataset, Faults, SimExam

API = "/api/v2.1"
T = TypeVar("T")
DATASET_KEY = web.AppKey("dataset", Dataset)


@dataclass
class SimulatorState:
    """Counters and settings of one running simulator."""

    faults: Faults
    username: str = "admin"
    password: str = "secret"
    per_page: int = 20
    envelope_counts: bool = True  # False: pages without `count` and `per_page`
    relative_attempts_urls: bool = False  # True: exams name their attempts by path only
    secret: bytes = b"simulator-signing-key"
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    requests: int = 0
    logins: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    faults_served: int = 0
    issued_tokens: list[str] = field(default_factory=list)
    by_path: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "logins": self.logins,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faults_served": self.faults_served,
            "by_path": dict(self.by_path),
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


def issue_token(state: SimulatorState, user_id: int = 1) -> str:
    header = _b64(orjson.dumps({"typ": "JWT", "alg": "HS256"}))
    claims = {
        "username": state.username,
        "user_id": user_id,
        "email": f"{state.username}@example.com",
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
    if orjson.loads(_unb64(body))["exp"] < time.time():
        return "Signature has expired."
    return None


# --- responses -------------------------------------------------------------------------------


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def paginate(
    request: web.Request, items: Sequence[T], per_page: int, render: Callable[[T], Any]
) -> dict[str, Any] | None:
    """The Testpress envelope for one page, or None for a page past the end.

    Only the page's own items are rendered: the envelope needs the count, not every
    payload, which keeps a listing of thousands cheap to serve."""
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        return None
    pages = max(1, -(-len(items) // per_page))
    if page < 1 or page > pages:
        return None

    def link(number: int) -> str | None:
        if number < 1 or number > pages:
            return None
        query = dict(request.query)
        query["page"] = str(number)
        return f"{base_url(request)}{request.path}?{urlencode(query)}"

    envelope = {
        "count": len(items),
        "next": link(page + 1),
        "previous": link(page - 1),
        "per_page": per_page,
        "results": [render(item) for item in items[(page - 1) * per_page : page * per_page]],
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
    if problem:
        return json_response({"detail": problem}, 401)
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
    if credentials["username"] != state.username or credentials["password"] != state.password:
        return json_response(
            {"non_field_errors": ["Unable to log in with provided credentials."]}, 400
        )
    state.logins += 1
    token = issue_token(state)
    state.issued_tokens.append(token)
    return json_response({"token": token})


def _visible_exams(request: web.Request, dataset: Dataset) -> list[SimExam]:
    course = request.query.get("course")
    return [exam for exam in dataset.exams if course is None or exam.course == course]


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
        dataset.attempt_payload(exam, attempt, base, nested_user=False) for attempt in exam.attempts
    ]
    return json_response(payload)


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
        request, exam.attempts, per_page, lambda attempt: dataset.attempt_payload(exam, attempt, base)
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
    action = change.get("action")
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


def create_app(
    dataset: Dataset,
    *,
    faults: Faults | None = None,
    username: str = "admin",
    password: str = "secret",
    per_page: int = 20,
) -> web.Application:
    app = web.Application(middlewares=[accounting, inject_faults, authentication])
    app[DATASET_KEY] = dataset
    app[STATE_KEY] = SimulatorState(
        faults=faults or Faults(), username=username, password=password, per_page=per_page
    )
    app.router.add_post(f"{API}/auth-token/", login)
    app.router.add_get(f"{API}/exams/", exam_list)
    app.router.add_get(f"{API}/exams/{{slug}}/", exam_detail)
    app.router.add_get(f"{API}/exams/{{slug}}/attempts/", attempt_list)
    app.router.add_get("/_simulator/stats", control_stats)
    app.router.add_post("/_simulator/faults", control_faults)
    app.router.add_post("/_simulator/change", control_change)
    return app



class SimulatorServer:
    """The simulator on a loopback port, for tests, the demo and benchmarks.

        async with SimulatorServer(Dataset(exams=10)) as sim:
            ... sim.base_url, sim.state.faults.throttle_rate = 0.2, sim.dataset ...
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        faults: Faults | None = None,
        username: str = "admin",
        password: str = "secret",
        per_page: int = 20,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.app = create_app(
            dataset, faults=faults, username=username, password=password, per_page=per_page
        )
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def dataset(self) -> Dataset:
        return self.app[DATASET_KEY]

    @property
    def state(self) -> SimulatorState:
        return self.app[STATE_KEY]

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port the OS picked for port 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
