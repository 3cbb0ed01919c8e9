"""The operator's surface through the real entry point: status, doctor, narrowed and dry
runs, the summary and metrics files, the progress line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text

from schema import attempts, exams
from sync.cli import main
from sync.ops.progress import TerminalStatus, progress_text
from sync.run import Progress
from sync.simulator import SimulatorServer
from sync.sink.database import create_engine, database_url_from
from tests.conftest import PASSWORD, USERNAME, SimulatorThread, small_dataset
from tests.helpers import downgrade_to, select_rows, select_value
from tests.test_cli import dump_database, log_lines

# --- status --------------------------------------------------------------------------------


def test_status_before_any_run_is_unhealthy(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 1
    out = capsys.readouterr().out
    if database_url.startswith("sqlite"):  # and it did not create an empty file
        assert "No database at" in out and not Path(database_url.removeprefix("sqlite:///")).exists()
    else:
        assert "No runs recorded yet" in out


@pytest.mark.parametrize("revision", ["0004", "0001"])
def test_status_reads_a_database_the_next_run_will_migrate(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str], revision: str
) -> None:
    """After an upgrade, before the run that migrates: `status` (a monitoring check, say)
    reads what the older schema holds instead of failing on a column it lacks."""
    assert main(["run"]) == 0

    async def downgraded() -> None:
        engine = create_engine(database_url_from(database_url))
        try:
            async with engine.connect() as connection:
                await connection.run_sync(downgrade_to(revision))
                await connection.commit()
        finally:
            await engine.dispose()

    asyncio.run(downgraded())
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [run["status"] for run in document["runs"]] == ["succeeded"]
    assert main(["status"]) == 0
    assert "OK: the last run (1) succeeded" in capsys.readouterr().out


def test_status_after_a_good_run_then_a_failed_one(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run"]) == 0
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert "succeeded" in table and "OK: the last run (1) succeeded" in table
    cli_environment.state.faults.server_error_rate = 1.0  # every request fails: the run cannot even log in
    assert main(["run"]) == 1
    cli_environment.state.faults.server_error_rate = 0.0
    capsys.readouterr()
    assert main(["status", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["healthy"] is False and "failed" in document["reason"]
    assert [run["status"] for run in document["runs"]] == ["failed", "succeeded"]
    assert document["runs"][1]["rows_changed"] > 0


def test_status_max_age_wants_a_recent_success(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 0
    assert main(["status", "--max-age", "1h"]) == 0
    time.sleep(1.1)
    assert main(["status", "--max-age", "1s"]) == 1
    assert "no successful run started within" in capsys.readouterr().out


def test_status_rejects_a_bad_age(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "--max-age", "soon"])
    assert exited.value.code == 2
    assert "is not an age like 26h" in capsys.readouterr().err


# --- doctor --------------------------------------------------------------------------------


def test_doctor_passes_on_a_good_setup_and_an_empty_database(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 5 and "All checks passed." in out
    assert "the next run migrates it" in out or "the first run creates it" in out
    # cli_environment forces the student API: the doctor says so, and what it means.
    assert "ok    source" in out and "student API: [testpress] source is student" in out


def test_doctor_says_an_admin_login_syncs_the_whole_institute(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTPRESS_SOURCE", "auto")
    assert main(["doctor"]) == 0
    assert "admin API: the login may read the admin API" in capsys.readouterr().out


def test_doctor_names_a_wrong_password_with_its_remedy(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTPRESS_PASSWORD", "not-the-password")
    assert main(["doctor"]) == 3
    out = capsys.readouterr().out
    assert "FAIL  login" in out and "check TESTPRESS_USERNAME" in out and "not-the-password" not in out


def test_a_login_refused_on_purpose_is_not_blamed_on_the_password(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """max_login_exceeded: the password is right, and neither doctor nor run says to check it."""
    cli_environment.state.faults.login_refusal = "max_login_exceeded"
    assert main(["doctor"]) == 3
    out = capsys.readouterr().out
    assert "FAIL  login" in out and "cool-off" in out and "check TESTPRESS_USERNAME" not in out
    monkeypatch.setenv("TESTPRESS_LOG_FORMAT", "json")
    assert main(["run"]) == 3
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    refused = next(entry for entry in logged if entry["event"] == "login_refused")
    assert "max_login_exceeded" in refused["error"] and "password" not in refused["hint"]


def test_doctor_names_an_unreachable_server(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TESTPRESS_BASE_URL", "http://127.0.0.1:9")
    assert main(["doctor", "--concurrency", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  server" in out and "skipped: the server is not reachable" in out
    assert "ok    database" in out


def test_doctor_names_what_was_changed_by_hand_in_the_schema(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 0
    rename_column(database_url, "attempts", "review_url", "review_link")
    assert main(["doctor"]) == 4
    out = capsys.readouterr().out
    assert "FAIL  database" in out and "column attempts.review_url is missing (changed by hand?)" in out
    assert "a run stops at the first statement that needs a missing table or column" in out
    assert main(["run"]) == 4  # as the doctor said
    rename_column(database_url, "attempts", "review_link", "review_url")
    assert main(["doctor"]) == 0 and main(["run"]) == 0
    execute(database_url, "DROP VIEW user_results")  # dashboards would break; a run would not
    assert main(["doctor"]) == 4 and "view user_results is missing" in capsys.readouterr().out


def rename_column(database_url: str, table: str, old: str, new: str) -> None:
    execute(database_url, f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")


def execute(database_url: str, statement: str) -> None:
    async def run() -> None:
        engine = create_engine(database_url_from(database_url))
        try:
            async with engine.begin() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_doctor_names_an_unreachable_database(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--database-url", "postgresql://postgres@127.0.0.1:9/none"]) == 4
    assert "FAIL  database" in capsys.readouterr().out


# --- narrowed and dry runs -----------------------------------------------------------------


def test_dry_run_reports_changes_and_writes_nothing(cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 0
    exam = next(exam for exam in cli_environment.dataset.exams if not exam.forbidden)
    cli_environment.dataset.add_attempts(exam, 4)
    cli_environment.dataset.rename_exam(exam.id, "Renamed for the dry run")
    before = dump_database(database_url)
    capsys.readouterr()
    assert main(["run", "--dry-run"]) == 0
    summary = next(line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished")
    assert (summary["rows_inserted"], summary["rows_updated"]) == (4, 1)
    assert dump_database(database_url) == before  # not a row, not even a run record


def test_dry_run_on_an_empty_database_says_what_to_do(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run"]) == 4
    assert "testpress-sync migrate" in capsys.readouterr().err


def test_exam_option_syncs_only_those_exams(cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    wanted = [exam for exam in cli_environment.dataset.exams if not exam.forbidden][:2]
    assert main(["run", *(arg for exam in wanted for arg in ("--exam", exam.slug))]) == 0
    summary = next(line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished")
    assert summary["exams_seen"] == 2 and summary["attempts_seen"] == 90 and summary["rows_deleted"] == 0
    stored = select_rows(database_url, select(attempts.c.exam_id, func.count()).group_by(attempts.c.exam_id))
    assert dict(stored) == {exam.id: 45 for exam in wanted}


def test_unknown_exam_slug_is_recorded_not_fatal(cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--exam", "no-such-exam"]) == 1
    assert "no-such-exam" in capsys.readouterr().err


def test_limit_takes_the_first_exams_and_marks_nothing_deleted(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--limit", "3"]) == 0
    stored = {row[0] for row in select_rows(database_url, select(exams.c.id))}
    assert stored == {exam.id for exam in cli_environment.dataset.exams[:3]}  # the newest three
    assert main(["run"]) == 0
    assert main(["run", "--limit", "3"]) == 0
    summaries = [line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished"]
    assert summaries[2]["exams_seen"] == 3 and summaries[2]["rows_deleted"] == 0
    assert select_value(database_url, select(func.count()).where(exams.c.deleted_at.is_not(None))) == 0
    # The listing under each of the three states: one page of each for each limited run
    # (all its exams are `available`; the other two states answer an empty page), and for
    # the full run; and for some forbidden exams' 403s, a page that answered before read
    # again (the latest one: a listing page or an attempts page), to tell a forbidden exam
    # from a token the server no longer takes.
    forbidden = [exam.forbidden for exam in cli_environment.dataset.exams]
    assert 3 * 3 <= cli_environment.state.by_path["exams"] <= 3 * 3 + 2 * sum(forbidden[:3]) + sum(forbidden)


# --- summary and metrics files -------------------------------------------------------------


def test_summary_and_metrics_files(cli_environment: SimulatorServer, tmp_path: Path) -> None:
    summary_path, metrics_path = tmp_path / "summary.json", tmp_path / "sync.prom"
    assert main(["run", "--summary-json", str(summary_path), "--metrics-file", str(metrics_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "succeeded" and summary["rows"]["inserted"] > 0
    families = {family.name: family for family in text_string_to_metric_families(metrics_path.read_text())}
    value = lambda name, **labels: next(  # noqa: E731
        s.value for s in families[f"testpress_sync_{name}"].samples if all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert value("last_run_status", status="succeeded") == 1 and value("last_run_status", status="failed") == 0
    assert value("last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert value("last_run_rows", table="attempts", outcome="inserted") == summary["by_table"]["attempts"]["inserted"]
    assert value("last_run_requests") == summary["requests"]
    # Every sample says which institute (the API host) and schema it is for.
    assert all(
        (sample.labels["institute"], sample.labels["schema"]) == ("127.0.0.1", "")
        for family in families.values() for sample in family.samples
    )

    cli_environment.state.faults.server_error_rate = 1.0
    assert main(["run", "--metrics-file", str(metrics_path)]) == 1
    families = {family.name: family for family in text_string_to_metric_families(metrics_path.read_text())}
    assert value("last_run_status", status="failed") == 1
    assert value("last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)  # still the first run's


# --- the progress line ---------------------------------------------------------------------


def test_progress_text_counts_and_estimates() -> None:
    text = progress_text(Progress(elapsed=10.0, exams_total=100, exams_done=25, attempts_seen=1234, requests=200, retries=3))
    assert text == "exams 25/100 · 1,234 attempts · 20 req/s · 3 retries · ~30s left"
    assert progress_text(Progress(0.0, None, 0, 0, 0, 0)).startswith("exams …")
    # An admin run reads its attempts from one listing: counted against that listing.
    admin = Progress(elapsed=10.0, exams_total=2000, exams_done=0, attempts_seen=50_000, requests=400, retries=0,
                     by_attempts=True, attempts_total=150_000)  # fmt: skip
    assert progress_text(admin) == "attempts 50,000/150,000 · 40 req/s · 0 retries · ~20s left"


def test_log_lines_print_above_the_progress_line() -> None:
    screen = io.StringIO()
    status = TerminalStatus(screen)
    status.show(Progress(1.0, 10, 1, 5, 2, 0))
    print("a log line", file=status, flush=True)
    status.show(Progress(2.0, 10, 10, 50, 4, 0, done=True))
    print("the summary line", file=status, flush=True)
    assert screen.getvalue() == (
        "exams 1/10 · 5 attempts · 2 req/s · 0 retries · ~9s left"
        "\r\x1b[Ka log line\n"
        "exams 1/10 · 5 attempts · 2 req/s · 0 retries · ~9s left"
        "\r\x1b[K"
        "the summary line\n"
    )


def run_cli_on(terminal: bool, simulator: SimulatorServer, database_url: str) -> str:
    """The real command in a child process, its stderr a pseudo-terminal or a pipe."""
    env = {
        **os.environ, "TESTPRESS_BASE_URL": simulator.base_url, "TESTPRESS_USERNAME": USERNAME,
        "TESTPRESS_PASSWORD": PASSWORD, "TESTPRESS_DATABASE_URL": database_url, "TESTPRESS_CONCURRENCY": "2",
    }  # fmt: skip
    env.pop("TESTPRESS_LOG_FORMAT", None)
    if not terminal:
        done = subprocess.run([sys.executable, "-m", "sync", "run"], env=env, capture_output=True, timeout=60)
        assert done.returncode == 0
        return done.stderr.decode()
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "sync", "run"], env=env, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=60) == 0
    os.close(leader)
    return output.decode(errors="replace")


def test_progress_line_on_a_terminal_only(tmp_path: Path) -> None:
    with SimulatorThread(small_dataset(exams=20)) as simulator:
        simulator.state.faults.latency = 0.03  # long enough for a few progress ticks
        on_terminal = run_cli_on(True, simulator, f"sqlite:///{tmp_path / 'tty.db'}")
        on_pipe = run_cli_on(False, simulator, f"sqlite:///{tmp_path / 'pipe.db'}")
    assert "\r\x1b[Kattempts " in on_terminal and " req/s · " in on_terminal  # an admin login: by attempts
    assert "run_finished" in on_terminal
    assert "\x1b[K" not in on_pipe and " req/s · " not in on_pipe
    assert '"event": "run_finished"' in on_pipe  # not a terminal: JSON lines


def test_course_option_uses_the_api_filter_and_deletes_only_within_it(
    cli_environment: SimulatorServer, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    courses = {exam.course for exam in cli_environment.dataset.exams}
    course = sorted(courses)[0]
    assert main(["run", "--course", course]) == 0
    summary = next(line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished")
    wanted = [exam for exam in cli_environment.dataset.exams if exam.course == course]
    assert summary["exams_seen"] == len(wanted) < len(cli_environment.dataset.exams)
    assert {row[0] for row in select_rows(database_url, select(exams.c.course).distinct())} == {course}
    assert main(["run"]) == 0  # everything; then one exam of another course disappears
    other = next(exam for exam in cli_environment.dataset.exams if exam.course != course)
    cli_environment.dataset.delete_exam(other.id)
    capsys.readouterr()
    assert main(["run", "--course", course]) == 0
    summary = next(line for line in log_lines(capsys.readouterr().err) if line["event"] == "run_finished")
    assert summary["rows_deleted"] == 0  # not this course's listing: not this run's business
    assert select_value(database_url, select(exams.c.deleted_at).where(exams.c.id == other.id)) is None


class FakePushgateway:
    """A Pushgateway's PUT route on 127.0.0.1: it keeps each push's path and body."""

    def __init__(self) -> None:
        pushes = self.pushes = []  # type: list[tuple[str, str]]

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                pushes.append((self.path, body.decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakePushgateway:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_metrics_are_pushed_to_a_pushgateway_grouped_by_institute_and_schema(
    cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakePushgateway() as gateway:
        assert main(["run", "--metrics-push", gateway.url]) == 0
    [(path, body)] = gateway.pushes
    assert path == "/metrics/job/testpress_sync/institute/127.0.0.1/schema@base64/="
    families = {family.name: family for family in text_string_to_metric_families(body)}
    [status] = [s for s in families["testpress_sync_last_run_status"].samples if s.labels["status"] == "succeeded"]
    assert status.value == 1 and status.labels["institute"] == "127.0.0.1"
    assert any(line["event"] == "metrics_pushed" for line in log_lines(capsys.readouterr().err))


def test_a_pushgateway_that_is_down_does_not_fail_the_run(
    cli_environment: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakePushgateway() as gateway:
        url = gateway.url  # closed at once: nothing listens there any more
    assert main(["run", "--metrics-push", url]) == 0
    [warning] = [line for line in log_lines(capsys.readouterr().err) if line["event"] == "metrics_not_pushed"]
    assert warning["level"] == "warning"


def test_doctor_json_gives_each_check_and_the_same_exit_code(
    cli_environment: SimulatorServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True and document["failure"] is None
    assert [check["name"] for check in document["checks"]] == ["configuration", "server", "login", "source", "database"]
    monkeypatch.setenv("TESTPRESS_PASSWORD", "not-the-password")
    assert main(["doctor", "--json"]) == 3
    out = capsys.readouterr().out
    document = json.loads(out)
    login = next(check for check in document["checks"] if check["name"] == "login")
    assert (document["ok"], document["failure"], login["ok"]) == (False, "AuthError", False)
    assert login["remedy"].startswith("check TESTPRESS_USERNAME") and "not-the-password" not in out
