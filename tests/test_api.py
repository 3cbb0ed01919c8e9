"""The Python API, as an orchestrator's task would call it: real simulator, real databases."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from sync.api import (
    AuthError,
    ConfigError,
    RunOptions,
    Settings,
    load_settings,
    sync_institute,
    sync_institute_async,
)
from sync.simulator import SimulatorServer
from tests.conftest import PASSWORD, USERNAME, fast_settings
from tests.helpers import assert_matches_server, on_engine


def institute_settings(simulator: SimulatorServer, database_url: str) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "api.base_url": simulator.base_url,
            "api.username": USERNAME,
            "api.source": "student",  # compared below with the simulator's student API
            "database_url": database_url,
        },
    )


def test_sync_institute_stores_everything_and_returns_the_summary(
    simulator_thread: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = institute_settings(simulator_thread, database_url)
    settings = replace(settings, api=replace(settings.api, password=PASSWORD))
    summary = sync_institute(settings)
    assert summary.status == "succeeded" and summary.rows.inserted > 0
    on_engine(database_url, lambda engine: assert_matches_server(engine, simulator_thread))
    again = sync_institute(settings, RunOptions(mode="backfill"))
    assert (again.mode, again.rows.inserted, again.rows.updated) == ("backfill", 0, 0)
    assert PASSWORD not in capsys.readouterr().err


def test_a_refused_login_raises_auth_error(simulator_thread: SimulatorServer, database_url: str) -> None:
    settings = fast_settings(simulator_thread.base_url, database_url)
    with pytest.raises(AuthError, match="refused the login"):
        sync_institute(replace(settings, api=replace(settings.api, password="wrong-password")))


def test_missing_settings_raise_config_error_before_any_request(database_url: str) -> None:
    with pytest.raises(ConfigError, match="TESTPRESS_BASE_URL"):
        sync_institute(load_settings(environ={}, overrides={"database_url": database_url}))


async def test_the_async_form_runs_inside_a_running_loop_and_can_be_stopped(
    simulator: SimulatorServer, database_url: str
) -> None:
    settings = fast_settings(simulator.base_url, database_url)
    stop = asyncio.Event()
    stop.set()  # asked to stop before it starts: it records an interrupted run, stores nothing half
    summary = await sync_institute_async(settings, stop=stop, configure_logs=False)
    assert summary.status == "interrupted"
    summary = await sync_institute_async(settings, configure_logs=False)
    assert summary.status == "succeeded"
