"""The simulator as a server: the application (the v2.1 routes of app.py, the v2.5 admin
routes of admin.py, the control routes) and a runner on a loopback port."""

from __future__ import annotations

import ssl

from aiohttp import web

from sync.simulator.admin import ADMIN_CACHE_KEY, add_admin_routes
from sync.simulator.app import (
    API,
    DATASET_KEY,
    STATE_KEY,
    SimulatorState,
    accounting,
    attempt_list,
    authentication,
    control_change,
    control_faults,
    control_stats,
    exam_detail,
    exam_list,
    inject_faults,
    login,
)
from sync.simulator.data import Dataset, Faults
from sync.simulator.webhooks import control_webhooks


def create_app(
    dataset: Dataset,
    *,
    faults: Faults | None = None,
    username: str = "admin",
    password: str = "secret",
    per_page: int = 20,
    student_username: str = "student",
    student_password: str = "student-secret",
    student_user_id: int | None = None,
) -> web.Application:
    """`student_user_id` defaults to the data set's first user (none without users)."""
    if student_user_id is None and dataset.users:
        student_user_id = dataset.users[0].id
    if student_user_id is not None:
        dataset.user(student_user_id)  # a KeyError now, not a 500 at the first student login
    app = web.Application(middlewares=[accounting, inject_faults, authentication])
    app[DATASET_KEY] = dataset
    app[STATE_KEY] = SimulatorState(
        faults=faults or Faults(),
        username=username,
        password=password,
        student_username=student_username,
        student_password=student_password,
        student_user_id=student_user_id,
        per_page=per_page,
    )
    app.router.add_post(f"{API}/auth-token/", login)
    app.router.add_post("/api/v2.5/auth-token/", login)
    app.router.add_get(f"{API}/exams/", exam_list)
    app.router.add_get(f"{API}/exams/{{slug}}/", exam_detail)
    app.router.add_get(f"{API}/exams/{{slug}}/attempts/", attempt_list)
    app.router.add_get("/_simulator/stats", control_stats)
    app.router.add_post("/_simulator/faults", control_faults)
    app.router.add_post("/_simulator/change", control_change)
    app.router.add_post("/_simulator/webhooks", control_webhooks)
    add_admin_routes(app)
    return app



class SimulatorServer:
    """The simulator on a loopback port, for tests, the demo and benchmarks.

        async with SimulatorServer(Dataset(exams=10)) as sim:
            ... sim.base_url, sim.state.faults.throttle_rate = 0.2, sim.dataset ...

    `warm`: render every admin listing row for `base_url` as the server starts, before it
    answers anything, so that a first walk costs what a repeat does (AdminCache.warm;
    seconds for 150,000 attempts). For a benchmark or a long-lived simulator; tests'
    small simulators do without. Requests asked with another Host are served as well,
    their rows rendered on first use.
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
        student_username: str = "student",
        student_password: str = "student-secret",
        student_user_id: int | None = None,
        warm: bool = False,
    ) -> None:
        self.app = create_app(
            dataset,
            faults=faults,
            username=username,
            password=password,
            per_page=per_page,
            student_username=student_username,
            student_password=student_password,
            student_user_id=student_user_id,
        )
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.warm = warm
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
        if self.warm:
            # Now the port is known. Nothing is answered meanwhile: connections wait.
            self.app[ADMIN_CACHE_KEY].warm(self.base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
