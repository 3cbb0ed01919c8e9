"""The command line through its real entry point: exit codes, messages, secrets."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync.cli import main
from sync.simulator import SimulatorServer
from sync.sink.database import create_engine, database_url_from, migrate, run_lock
from tests.conftest import PASSWORD
from tests.helpers import assert_matches_server, on_engine


def check_database(database_url: str, simulator: SimulatorServer) -> None:
    on_engine(database_url, lambda engine: assert_matches_server(engine, simulator))


def log_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_run_from_environment_stores_everything_and_exits_0(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--log-format", "json"]) == 0
    check_database(database_url, cli_environment)
    lines = log_lines(capsys.readouterr().err)
    summary = next(line for line in lines if line["event"] == "run_finished")
    assert summary["status"] == "succeeded" and summary["rows_inserted"] > 0
    assert all("run_id" in line for line in lines if line["event"] in ("run_started", "logged_in", "run_finished"))


def test_backfill_then_run_again_changes_nothing(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backfill", "--log-format", "json"]) == 0
    data_before = data_rows(database_url)
    assert main(["run", "--log-format", "json"]) == 0
    summaries = [line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished"]
    assert (summaries[1]["rows_inserted"], summaries[1]["rows_updated"], summaries[1]["rows_deleted"]) == (0, 0, 0)
    assert data_rows(database_url) == data_before  # the rows themselves, not only the counts


def data_rows(database_url: str) -> str:
    """The data tables only (a run always adds its own sync_runs row)."""
    return dump_database(database_url, DATA_TABLES)


def test_missing_setting_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("TESTPRESS_BASE_URL", "TESTPRESS_USERNAME", "TESTPRESS_PASSWORD", "TESTPRESS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TESTPRESS_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    assert main(["run", "--log-format", "json"]) == 2
    err = capsys.readouterr().err
    assert "TESTPRESS_BASE_URL is not set" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--database-url", "mysql://x@y/z"], "TESTPRESS_DATABASE_URL"),
        (["run", "--concurrency", "0"], "http.concurrency must be at least 1"),
        (["run", "--config", "/nonexistent/config.toml"], "does not exist"),
    ],
)
def test_invalid_settings_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_password_exits_3_without_leaking_it(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTPRESS_PASSWORD", "wrong-horse-battery")
    assert main(["run", "--log-format", "json"]) == 3
    err = capsys.readouterr().err
    assert "Unable to log in" in err and "wrong-horse-battery" not in err


def test_unreachable_database_exits_4(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--database-url", "postgresql://postgres@127.0.0.1:9/none", "--log-format", "json"]) == 4
    assert "database" in capsys.readouterr().err


def test_a_sqlite_database_in_a_missing_folder_exits_4_and_names_the_folder(
    cli_environment: SimulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "not-mounted"
    assert main(["run", "--database-url", f"sqlite:///{folder}/sync.db", "--log-format", "json"]) == 4
    assert f"the folder {folder} of the SQLite database does not exist" in capsys.readouterr().err
    assert not folder.exists()


def test_foreign_tables_are_refused_with_exit_4(
    cli_environment: SimulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    path = tmp_path / "theirs.db"
    sqlite3.connect(path).execute("CREATE TABLE exams (id INTEGER, name TEXT)").connection.commit()
    assert main(["run", "--database-url", f"sqlite:///{path}", "--log-format", "json"]) == 4
    assert "did not create" in capsys.readouterr().err


def test_migrate_creates_the_schema_then_reports_up_to_date(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--database-url", database_url, "--log-format", "json"]) == 0
    assert main(["migrate", "--database-url", database_url, "--log-format", "json"]) == 0
    events = [line["event"] for line in log_lines(capsys.readouterr().err)]
    assert events == ["schema_migrated", "schema_up_to_date"]


class HeldLock:
    """The database's run lock held by 'another run', on a loop in a thread."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._loop = asyncio.new_event_loop()
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._hold(),))

    async def _hold(self) -> None:
        engine = create_engine(database_url_from(self._url))
        await migrate(engine)
        async with run_lock(engine):
            self._held.set()
            while not self._release.is_set():
                await asyncio.sleep(0.02)
        await engine.dispose()

    def __enter__(self) -> None:
        self._thread.start()
        assert self._held.wait(10)

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(10)
        self._loop.close()


def test_second_run_while_one_holds_the_lock_exits_5(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with HeldLock(database_url):
        assert main(["run", "--log-format", "json"]) == 5
    assert "another testpress-sync run" in capsys.readouterr().err
    assert main(["run", "--log-format", "json"]) == 0  # free again once the holder is gone


def test_secrets_never_reach_logs_or_tables(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_environment.state.faults.token_lifetime = 0.05  # several tokens over the run,
    cli_environment.state.faults.latency = 0.03  # which lasts a few latencies at least
    next(e for e in cli_environment.dataset.exams if not e.forbidden).attempts[0].malformed = True
    assert main(["run", "--log-format", "json", "--log-level", "debug"]) == 1
    output = capsys.readouterr()
    tokens = cli_environment.state.issued_tokens
    assert len(tokens) >= 2
    secrets = [PASSWORD, *tokens, *(token.split(".")[2] for token in tokens)]
    logged = output.out + output.err
    assert "retrying" in logged or "logged_in" in logged
    assert not [secret for secret in secrets if secret in logged]
    assert not [secret for secret in secrets if secret in dump_database(database_url)]


DATA_TABLES = ("exams", "attempts", "users")
ALL_TABLES = (*DATA_TABLES, "sync_runs", "sync_errors", "sync_progress")


def dump_database(database_url: str, tables: tuple[str, ...] = ALL_TABLES) -> str:
    """Every row of `tables`, ordered, as text: for comparing a database before and after."""

    async def dump(engine: AsyncEngine) -> str:
        async with engine.connect() as connection:
            rows = [
                repr(tuple(row))
                for table in tables
                for row in (await connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))).all()
            ]
        return "\n".join(rows)

    return on_engine(database_url, dump)


@pytest.mark.parametrize("command", [[], ["run"], ["backfill"], ["migrate"], ["status"], ["doctor"], ["demo"], ["simulate"]])
def test_every_command_explains_itself(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: testpress-sync" in out and len(out) > 200


def test_demo_syncs_the_bundled_simulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--exams", "6", "--attempts-per-exam", "25", "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    counts = dict(line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) == 2)
    # The demo syncs through the admin API: exams, and the institute's users and batches.
    assert counts["exams"] == "6" and int(counts["users"]) > 0 and int(counts["user_batches"]) > 0
    assert "testpress-demo.db" in out
    assert (tmp_path / "testpress-demo.db").exists()


def test_config_shows_each_settings_source_with_secrets_redacted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TESTPRESS_HTTP_TIMEOUT=7\nTESTPRESS_SYNC_BATCH_SIZE=100\n")
    monkeypatch.setenv("TESTPRESS_PASSWORD", "a-secret-password")
    monkeypatch.setenv("TESTPRESS_SYNC_BATCH_SIZE", "250")  # the environment beats .env
    assert main(["config", "--json", "--database-url", "postgresql://sync:db-secret@db.example/x"]) == 0
    out = capsys.readouterr().out
    rows = {row["setting"]: row for row in json.loads(out)}
    assert rows["http.timeout"]["value"] == 7.0 and rows["http.timeout"]["source"] == f".env {tmp_path / '.env'}"
    assert (rows["sync.batch_size"]["value"], rows["sync.batch_size"]["source"]) == (250, "env TESTPRESS_SYNC_BATCH_SIZE")
    assert rows["database_url"]["source"] == "flag --database-url"
    assert rows["api.password"]["value"] == "[redacted]" and rows["http.concurrency"]["source"] == "default"
    assert "a-secret-password" not in out and "db-secret" not in out


def test_an_unexpected_error_exits_70_with_one_line_and_the_traceback_in_the_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sync.commands import status as status_command

    monkeypatch.setenv("TESTPRESS_PASSWORD", "a-secret-password")

    async def broken_status(*_args: object, **_kwargs: object) -> None:
        raise KeyError("a bug next to a-secret-password")

    monkeypatch.setattr(status_command, "show_status", broken_status)
    code = main(["status", "--log-format", "json", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"])
    err = capsys.readouterr().err
    assert code == 70
    [logged] = [line for line in log_lines(err) if line["event"] == "unexpected_error"]
    assert logged["level"] == "error" and "Traceback" in str(logged["exception"]) and "broken_status" in str(logged["exception"])
    [said] = [line for line in err.splitlines() if line.startswith("testpress-sync: unexpected error")]
    assert "KeyError" in said and "unexpected_error" in said
    assert "a-secret-password" not in err


@pytest.mark.parametrize("command", [["config"], ["config", "--json"]])
def test_a_reader_that_leaves_early_is_no_database_error(command: list[str], tmp_path: Path) -> None:
    """`testpress-sync config | head -1`: standard output's reader has gone before the
    command writes. Exit 141, as a shell's writer does, and nothing on stderr; a broken
    pipe used to be taken for the database's (exit 4, `database_error`)."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    os.close(reader)  # gone before anything is written: every write fails, deterministically
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TESTPRESS_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sync", *command], stdout=writer, stderr=subprocess.PIPE,
            cwd=tmp_path, env=environment, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr.decode()) == (141, "")
