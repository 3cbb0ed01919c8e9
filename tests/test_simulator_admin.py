"""The simulator's v2.5 admin API, its two logins and its new faults, against the real
server on 127.0.0.1; and proof that the v2.1 routes still serve exactly what they did."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from sync.simulator import Dataset, SimulatorServer

ADMIN = "/api/v2.5/admin"
UTC_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
UTC_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
IST_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+05:30$")
DECIMAL = re.compile(r"^-?\d+\.\d\d$")
TIMEDELTA = re.compile(r"^(\d+ days?, )?\d+:\d\d:\d\d(\.\d{6})?$")
INDIA = timezone(timedelta(hours=5, minutes=30))
NO_PERMISSION = {"detail": "You do not have permission to perform this action."}
ROW_FIELDS = [
    "id", "date", "exam_id", "user_id", "email", "name", "phone", "correct_answers_count",
    "incorrect_answers_count", "unanswered_count", "score", "percentage", "time_taken",
    "remaining_time", "result", "state", "last_started_time", "last_answer_updated_time",
    "speed", "exam_url", "user_url",
]  # fmt: skip


def small() -> Dataset:
    # 320 attempts (two admin pages), 30 users and 25 batches (two pages each).
    return Dataset(exams=8, attempts_per_exam=40, users=30, seed=13, forbidden_every=5)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(small(), student_username="pupil", student_password="pupil-pw") as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def login(http: aiohttp.ClientSession, sim: SimulatorServer, username: str, password: str,
                version: str = "v2.5") -> tuple[int, Any]:  # fmt: skip
    async with http.post(
        f"{sim.base_url}/api/{version}/auth-token/", json={"username": username, "password": password}
    ) as response:
        return response.status, await response.json()


@pytest.fixture
async def admin(http: aiohttp.ClientSession, sim: SimulatorServer) -> str:
    status, body = await login(http, sim, "admin", "secret")
    assert status == 200
    return str(body["token"])


@pytest.fixture
async def student(http: aiohttp.ClientSession, sim: SimulatorServer) -> str:
    status, body = await login(http, sim, "pupil", "pupil-pw")
    assert status == 200
    return str(body["token"])


async def get(
    http: aiohttp.ClientSession, url: str, token: str, params: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.get(url, headers={"Authorization": f"JWT {token}"}, params=params) as response:
        return response.status, await response.json()


async def walk(http: aiohttp.ClientSession, url: str, token: str, params: dict[str, str] | None = None,
               per_page: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every row of a listing, following `next`; checks the envelope on the way."""
    status, page = await get(http, url, token, params)
    assert status == 200, page
    rows, number = list(page["results"]), 1
    while page["next"] is not None:
        number += 1
        assert page["next"].endswith(f"page={number}") and page["next"].startswith("http://127.0.0.1:")
        status, page = await get(http, page["next"], token)
        assert status == 200
        rows += page["results"]
    assert len(rows) == page["count"]
    if per_page is not None:
        assert page["per_page"] == per_page
    return rows


async def change(http: aiohttp.ClientSession, sim: SimulatorServer, **body: Any) -> tuple[int, Any]:
    async with http.post(f"{sim.base_url}/_simulator/change", json=body) as response:
        return response.status, await response.json()


async def set_faults(http: aiohttp.ClientSession, sim: SimulatorServer, **faults: Any) -> tuple[int, Any]:
    async with http.post(f"{sim.base_url}/_simulator/faults", json=faults) as response:
        return response.status, await response.json()


# --- v2.1 unchanged ---------------------------------------------------------------------------------

# Both digests were computed once from the simulator as committed before the admin API
# existed (commit 712dbc2): its sync/ package was exported with `git archive HEAD sync`
# into /tmp/orig_sync, and these same two functions were run with PYTHONPATH=/tmp/orig_sync.
V21_PAYLOAD_DIGEST = "374dd9dea1b0d1f9df7e103cd07517ef8de6ef63f116889d3e6209be863884ce"
V21_TRANSCRIPT_DIGEST = "182c500e2eaf2848ffad429d31082231c32d35e75b9d420a9ae3f4af6026a988"


def v21_payload_digest() -> str:
    """Every v2.1 exam and attempt payload of a mid-sized data set, rendered directly."""
    dataset = Dataset(exams=40, attempts_per_exam=75, users=300, seed=11)
    digest = hashlib.sha256()
    for exam in dataset.exams:
        digest.update(orjson.dumps(dataset.exam_payload(exam, "http://x")))
        for attempt in exam.attempts:
            digest.update(orjson.dumps(dataset.attempt_payload(exam, attempt, "http://x")))
            digest.update(orjson.dumps(dataset.attempt_payload(exam, attempt, "http://x", nested_user=False)))
    return digest.hexdigest()


async def v21_transcript_digest() -> str:
    """What an admin login reads over HTTP from a small simulator, changes included."""
    dataset = Dataset(exams=7, attempts_per_exam=25, users=15, seed=5, forbidden_every=3, vanished_every=4)
    digest = hashlib.sha256()
    async with (
        SimulatorServer(dataset, username="admin", password="secret", per_page=6) as sim,
        aiohttp.ClientSession() as http,
    ):
        base = sim.base_url
        async with http.post(
            f"{base}/api/v2.1/auth-token/", json={"username": "admin", "password": "secret"}
        ) as r:
            token = (await r.json())["token"]
        headers = {"Authorization": f"JWT {token}"}

        async def get(path: str) -> int:
            async with http.get(f"{base}{path}", headers=headers) as response:
                body = await response.read()
            digest.update(f"{path} {response.status}\n".encode())
            digest.update(body.replace(base.encode(), b"BASE"))
            return response.status

        async def walk(path: str) -> None:
            page = 1
            while await get(f"{path}?page={page}") == 200:
                page += 1

        async def everything() -> None:
            await walk("/api/v2.1/exams/")
            await get("/api/v2.1/exams/?course=SSC")
            for exam in list(dataset.exams):
                await get(f"/api/v2.1/exams/{exam.slug}/")
                await walk(f"/api/v2.1/exams/{exam.slug}/attempts/")

        await everything()
        for change in (
            {"action": "add_attempts", "exam_id": 2, "count": 3},
            {"action": "complete_running"},
            {"action": "rename_exam", "exam_id": 3, "title": "Renamed"},
            {"action": "add_exam", "attempts": 4},
            {"action": "delete_exam", "exam_id": 5},
        ):
            async with http.post(f"{base}/_simulator/change", json=change) as r:
                digest.update(await r.read())
        await everything()
    return digest.hexdigest()


def test_v21_payloads_for_a_fixed_seed_are_those_of_the_original_simulator() -> None:
    assert v21_payload_digest() == V21_PAYLOAD_DIGEST


async def test_v21_pages_and_changes_over_http_are_those_of_the_original_simulator() -> None:
    assert await v21_transcript_digest() == V21_TRANSCRIPT_DIGEST


async def test_reading_the_admin_api_first_does_not_shift_the_v21_data(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    """Admin-only data is drawn from streams of its own: reading it, in any order, leaves
    what later v2.1 changes draw exactly as in a data set nobody read."""
    await walk(http, f"{sim.base_url}{ADMIN}/users/", admin)
    for attempt_id in (100001, 200005, 300010):
        await get(http, f"{sim.base_url}{ADMIN}/attempts/{attempt_id}/", admin)
    await get(http, f"{sim.base_url}{ADMIN}/users/1004/batches/", admin)
    untouched = small()
    for dataset in (sim.dataset, untouched):
        dataset.add_attempts(dataset.exam(2), 6)
        dataset.add_exam(attempts=5)
    assert [
        [sim.dataset.attempt_payload(e, a, "http://x") for a in e.attempts] for e in sim.dataset.exams
    ] == [[untouched.attempt_payload(e, a, "http://x") for a in e.attempts] for e in untouched.exams]


# --- logins and roles -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v2.1", "v2.5"])
async def test_both_logins_work_on_both_token_routes_and_a_wrong_password_is_400(
    http: aiohttp.ClientSession, sim: SimulatorServer, version: str
) -> None:
    for username, password in (("admin", "secret"), ("pupil", "pupil-pw")):
        status, body = await login(http, sim, username, password, version)
        assert status == 200 and body["token"].count(".") == 2
    status, body = await login(http, sim, "pupil", "secret", version)
    assert status == 400 and body == {"non_field_errors": ["Unable to log in with provided credentials."]}


async def test_a_student_token_gets_403_on_every_admin_route(
    http: aiohttp.ClientSession, sim: SimulatorServer, student: str
) -> None:
    paths = ["exams/", "exams/1/", "attempts/", "attempts/100001/", "users/", "users/1000/",
             "users/1000/batches/", "batches/", "batches/1/", "no-such-route/"]  # fmt: skip
    for path in paths:
        assert await get(http, f"{sim.base_url}{ADMIN}/{path}", student) == (403, NO_PERMISSION)


async def test_a_student_sees_only_its_own_attempts_on_v21_and_the_admin_sees_all(
    http: aiohttp.ClientSession, sim: SimulatorServer, student: str, admin: str
) -> None:
    me = sim.state.student_user_id
    assert me == sim.dataset.users[0].id  # bound to the first data-set user by default
    seen_by_student: list[int] = []
    for exam in sim.dataset.exams:
        url = f"{sim.base_url}/api/v2.1/exams/{exam.slug}/attempts/"
        if exam.forbidden:
            assert (await get(http, url, student))[0] == 403
            continue
        mine = await walk(http, url, student)
        assert {row["user"]["id"] for row in mine} <= {me}
        seen_by_student += [row["id"] for row in mine]
        assert len(await walk(http, url, admin)) == len(exam.attempts)  # unchanged for the admin
        _, detail = await get(http, f"{sim.base_url}/api/v2.1/exams/{exam.slug}/", student)
        assert [a["id"] for a in detail["attempts"]] == [row["id"] for row in mine]
    expected = [a.id for e in sim.dataset.exams if not e.forbidden for a in e.attempts if a.user.id == me]
    assert sorted(seen_by_student) == sorted(expected) and expected  # the student has some


@pytest.mark.parametrize("code", ["parallel_login_restriction", "max_login_exceeded"])
async def test_a_login_refusal_answers_403_with_its_error_code(
    http: aiohttp.ClientSession, sim: SimulatorServer, code: str
) -> None:
    assert (await set_faults(http, sim, login_refusal=code))[0] == 200
    for version in ("v2.1", "v2.5"):
        status, body = await login(http, sim, "admin", "secret", version)
        assert status == 403 and body["error_code"] == code
        assert body["message"] == body["detail"] and body["detail"]
    assert (await login(http, sim, "admin", "wrong"))[0] == 400  # a wrong password is still that
    assert sim.state.refused_logins == 2 and sim.state.logins == 0
    await set_faults(http, sim, login_refusal="")
    assert (await login(http, sim, "admin", "secret"))[0] == 200


async def test_an_unknown_login_refusal_is_refused_by_the_control_route(
    http: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    status, body = await set_faults(http, sim, login_refusal="too_many_cats")
    assert status == 400 and "login_refusal" in body["detail"]
    assert sim.state.faults.login_refusal == ""


async def test_an_expired_token_answers_401_or_403_as_the_fault_says(
    http: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    sim.state.faults.token_lifetime = -1  # born expired
    _, body = await login(http, sim, "admin", "secret")
    expired = body["token"]
    for path in ("/api/v2.1/exams/", f"{ADMIN}/attempts/"):
        assert await get(http, f"{sim.base_url}{path}", expired) == (
            401,
            {"detail": "Signature has expired."},
        )
    await set_faults(http, sim, expired_token_status=403)
    for path in ("/api/v2.1/exams/", f"{ADMIN}/attempts/"):
        assert await get(http, f"{sim.base_url}{path}", expired) == (
            403,
            {"detail": "Signature has expired."},
        )
    async with http.get(f"{sim.base_url}{ADMIN}/attempts/") as response:  # no token at all: still 401
        assert response.status == 401


# --- admin attempts -------------------------------------------------------------------------------


async def test_admin_attempt_rows_are_flat_with_the_documented_types(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    rows = await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, per_page=200)
    for row in rows:
        assert list(row) == ROW_FIELDS  # no nested user, no rank, no total_questions
        assert UTC_MICRO.match(row["date"]) and DECIMAL.match(row["score"])
        assert type(row["percentage"]) is int and type(row["speed"]) is int
        assert row["state"] in ("Completed", "Running", "Not Started")
        assert row["result"] in (("Pass", "Fail") if row["state"] == "Completed" else ("Not taken",))
        assert TIMEDELTA.match(row["time_taken"])
        assert row["remaining_time"] is None or TIMEDELTA.match(row["remaining_time"])
        for name in ("last_started_time", "last_answer_updated_time"):
            assert row[name] is None or UTC_MICRO.match(row[name])
        assert row["exam_url"] == f"{sim.base_url}{ADMIN}/exams/{row['exam_id']}/"
        assert row["user_url"] == f"{sim.base_url}{ADMIN}/users/{row['user_id']}/"
    assert any(row["email"] is None for row in rows) and any(row["phone"] is None for row in rows)
    assert any(Decimal(row["score"]) < 0 for row in rows)
    assert any(row["remaining_time"] is None for row in rows if row["state"] != "Not Started")
    assert any(row["last_answer_updated_time"] is None for row in rows if row["state"] == "Running")
    assert {row["result"] for row in rows} == {"Pass", "Fail", "Not taken"}


async def test_admin_rows_describe_the_same_attempts_and_people_as_v21(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    rows = {row["id"]: row for row in await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin)}
    exam = next(e for e in sim.dataset.exams if not e.forbidden)
    for v21 in await walk(http, f"{sim.base_url}/api/v2.1/exams/{exam.slug}/attempts/", admin):
        row = rows[v21["id"]]
        assert (row["exam_id"], row["user_id"], row["state"]) == (exam.id, v21["user"]["id"], v21["state"])
        assert (row["correct_answers_count"], row["incorrect_answers_count"], row["unanswered_count"]) == (
            v21["correct_count"], v21["incorrect_count"], v21["unanswered_count"])  # fmt: skip
        assert (
            Decimal(row["score"]) == Decimal(str(v21["score"]))
            and str(row["percentage"]) == v21["percentage"]
        )
        assert datetime.fromisoformat(row["date"]) - datetime.fromisoformat(v21["date"]) < timedelta(
            seconds=1
        )
        assert row["name"] == v21["user"]["display_name"]
    users = {user["id"] for user in await walk(http, f"{sim.base_url}{ADMIN}/users/", admin)}
    assert {row["user_id"] for row in rows.values()} <= users == {u.id for u in sim.dataset.users}


async def test_the_state_filter_is_numeric_while_rows_name_the_state(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    url = f"{sim.base_url}{ADMIN}/attempts/"
    total = len(await walk(http, url, admin))
    seen = 0
    for number, name in ((0, "Running"), (1, "Completed"), (3, "Not Started")):
        rows = await walk(http, url, admin, {"state": str(number)})
        assert rows and {row["state"] for row in rows} == {name}
        seen += len(rows)
    assert seen == total
    assert await get(http, url, admin, {"state": "Completed"}) == (400, {"state": ["Enter a number."]})
    assert await get(http, url, admin, {"state": "2"}) == (200, {"count": 0, "next": None, "previous": None,
                                                                 "per_page": 200, "results": []})  # fmt: skip


async def test_date_0_and_date_1_keep_attempts_started_within_them(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    url = f"{sim.base_url}{ADMIN}/attempts/"
    starts = {a.id: a.started for e in sim.dataset.exams for a in e.attempts}
    pivot = sorted(starts.values())[len(starts) // 2]
    iso = pivot.astimezone(INDIA).isoformat()  # with its +05:30: "+" must travel as %2B
    after = await walk(http, url, admin, {"date_0": iso})
    before = await walk(http, url, admin, {"date_1": iso})
    assert {r["id"] for r in after} == {i for i, s in starts.items() if s >= pivot}
    assert {r["id"] for r in before} == {i for i, s in starts.items() if s <= pivot}
    # A plain date is midnight in India time, the server's zone.
    day = pivot.astimezone(INDIA).date()
    midnight = datetime(day.year, day.month, day.day, tzinfo=INDIA)
    window = await walk(
        http, url, admin, {"date_0": day.isoformat(), "date_1": (day + timedelta(days=1)).isoformat()}
    )
    assert {r["id"] for r in window} == {
        i for i, s in starts.items() if midnight <= s <= midnight + timedelta(days=1)
    }
    assert window
    naive = pivot.astimezone(INDIA).replace(tzinfo=None).isoformat()
    assert {r["id"] for r in await walk(http, url, admin, {"date_0": naive})} == {r["id"] for r in after}
    assert await get(http, url, admin, {"date_0": "yesterday"}) == (
        400,
        {"date": ["Enter a valid date/time."]},
    )


async def test_attempts_are_in_id_order_unless_ordered_by_date_or_correct_answers(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    url = f"{sim.base_url}{ADMIN}/attempts/"
    ids = [row["id"] for row in await walk(http, url, admin)]
    assert ids == sorted(ids)
    newest = await walk(http, url, admin, {"ordering": "-date"})
    assert [r["date"] for r in newest] == sorted((r["date"] for r in newest), reverse=True)
    oldest = await walk(http, url, admin, {"ordering": "date"})
    assert [r["date"] for r in oldest] == sorted(r["date"] for r in oldest)
    fewest = await walk(http, url, admin, {"ordering": "correct_answers_count"})
    assert [(r["correct_answers_count"], r["id"]) for r in fewest] == sorted(
        (r["correct_answers_count"], r["id"]) for r in fewest)  # fmt: skip
    most = await walk(http, url, admin, {"ordering": "-correct_answers_count"})
    assert [r["correct_answers_count"] for r in most] == sorted(
        (r["correct_answers_count"] for r in most), reverse=True
    )
    assert [row["id"] for row in await walk(http, url, admin, {"ordering": "shoe_size"})] == ids


async def test_exams_and_users_filters_pick_attempts_by_id(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    url = f"{sim.base_url}{ADMIN}/attempts/"
    exam = sim.dataset.exams[2]
    user = exam.attempts[0].user
    rows = await walk(http, url, admin, {"exams": str(exam.id)})
    assert sorted(r["id"] for r in rows) == sorted(a.id for a in exam.attempts)
    rows = await walk(http, url, admin, {"users": str(user.id)})
    assert {r["user_id"] for r in rows} == {user.id} and len(rows) == sum(
        a.user.id == user.id for e in sim.dataset.exams for a in e.attempts)  # fmt: skip
    both = await walk(http, url, admin, {"users": str(user.id), "exams": str(exam.id)})
    assert both and {(r["user_id"], r["exam_id"]) for r in both} == {(user.id, exam.id)}
    assert (await get(http, url, admin, {"exams": "three"}))[0] == 400


async def test_the_attempt_detail_is_in_india_time_with_breakdowns_that_add_up(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    null_subjects = children = 0
    for exam in sim.dataset.exams[:3]:
        for attempt in exam.attempts[:8]:
            url = f"{sim.base_url}{ADMIN}/attempts/{attempt.id}/"
            status, detail = await get(http, url, admin)
            assert status == 200 and (await get(http, url, admin))[1] == detail  # deterministic
            assert IST_MICRO.match(detail["date"])
            for name in ("last_started_time", "last_answer_updated_time"):
                assert detail[name] is None or IST_MICRO.match(detail[name])
            assert list(detail)[: ROW_FIELDS.index("percentage") + 2][-1] == "percentile"
            assert type(detail["percentile"]) is float and detail["username"] == attempt.user.username
            counts = [
                detail[n] for n in ("correct_answers_count", "incorrect_answers_count", "unanswered_count")
            ]
            assert _sums(detail["sections"]) == counts
            assert sum(Decimal(s["score"]) for s in detail["sections"]) == Decimal(detail["score"])
            leaves = [s for s in detail["subject_stats"] if s["is_leaf"]]
            assert (
                _sums(leaves) == counts and _sums(list(detail["difficulty_level_stats"].values())) == counts
            )
            assert set(detail["difficulty_level_stats"]) <= {"easy", "medium", "hard", "uncategorized"}
            null_subjects += sum(s["subject_id"] is None for s in detail["subject_stats"])
            children += sum(s["parent_subject_id"] is not None for s in detail["subject_stats"])
    assert null_subjects and children
    assert await get(http, f"{sim.base_url}{ADMIN}/attempts/99999999/", admin) == (
        404,
        {"detail": "Not found."},
    )


def _sums(parts: list[dict[str, Any]]) -> list[int]:
    return [
        sum(p[n] for p in parts)
        for n in ("correct_answers_count", "incorrect_answers_count", "unanswered_count")
    ]


# --- admin exams, users, batches ------------------------------------------------------------------


async def test_admin_exams_carry_ids_but_no_slug_in_the_documented_formats(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    exams = await walk(http, f"{sim.base_url}{ADMIN}/exams/", admin, per_page=200)
    assert [e["id"] for e in exams] == sorted(e.id for e in sim.dataset.exams)
    for row in exams:
        assert "slug" not in row and "url" not in row
        assert (
            UTC_MICRO.match(row["created"])
            and UTC_MICRO.match(row["modified"])
            and row["modified"] >= row["created"]
        )
        assert UTC_SECONDS.match(row["start_date"]) and (
            row["end_date"] is None or UTC_SECONDS.match(row["end_date"])
        )
        assert type(row["pass_percentage"]) is int and DECIMAL.match(row["total_marks"])
        assert isinstance(row["published"], bool) and isinstance(row["show_pass_or_fail"], bool)
    _, attempts = await get(http, f"{sim.base_url}{ADMIN}/attempts/", admin)
    status, exam = await get(http, attempts["results"][0]["exam_url"], admin)
    assert status == 200 and exam["id"] == attempts["results"][0]["exam_id"]


async def test_documented_exam_rows_carry_no_id_and_unlisted_exams_still_answer(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    """admin_exam_ids=False: the rows of the docs, with no id, in the listing and the
    detail; unlisted_exams: left out of the listing, their detail and attempts answer."""
    with_ids = await walk(http, f"{sim.base_url}{ADMIN}/exams/", admin)
    sim.state.admin_exam_ids = False
    hidden = sim.dataset.exams[3].id
    sim.state.unlisted_exams = {hidden}
    rows = await walk(http, f"{sim.base_url}{ADMIN}/exams/", admin)
    assert len(rows) == len(with_ids) - 1 and all("id" not in row and "url" not in row for row in rows)
    assert rows == [{k: v for k, v in row.items() if k != "id"} for row in with_ids if row["id"] != hidden]
    status, detail = await get(http, f"{sim.base_url}{ADMIN}/exams/{hidden}/", admin)
    assert status == 200 and "id" not in detail and detail["title"] == sim.dataset.exams[3].title
    _, attempts = await get(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"exams": str(hidden)})
    assert attempts["count"] == len(sim.dataset.exams[3].attempts)


async def test_admin_exams_filter_by_dates_and_status_and_order_by_start(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    url = f"{sim.base_url}{ADMIN}/exams/"
    rows = await walk(http, url, admin)
    starts = sorted(row["start_date"] for row in rows)
    latest_first = await walk(http, url, admin, {"ordering": "-start_date"})
    assert [r["start_date"] for r in latest_first] == starts[::-1]
    cut = datetime.fromisoformat(starts[3]).astimezone(INDIA).date()
    later = await walk(http, url, admin, {"start_date": cut.isoformat()})
    assert later and all(
        datetime.fromisoformat(r["start_date"]) >= datetime(cut.year, cut.month, cut.day, tzinfo=INDIA)
        for r in later
    )
    assert all(r["end_date"] for r in await walk(http, url, admin, {"end_date": "2030-01-01"}))
    sim.dataset.clock = lambda: datetime.fromisoformat(starts[4]) + timedelta(minutes=1)  # between two starts
    by_status = {s: await walk(http, url, admin, {"status": s}) for s in ("running", "upcoming", "completed")}
    assert len(by_status["upcoming"]) == 3 and by_status["running"]
    assert sum(len(v) for v in by_status.values()) == len(rows)
    assert (await get(http, url, admin, {"status": "paused"}))[0] == 400


async def test_admin_users_have_dd_mm_yyyy_birth_dates_and_mixed_personal_fields(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    users = await walk(http, f"{sim.base_url}{ADMIN}/users/", admin, per_page=20)
    assert [u["id"] for u in users] == [u.id for u in sim.dataset.users]
    assert [u["username"] for u in users] == [u.username for u in sim.dataset.users]
    for user in users:
        assert user["birth_date"] is None or re.match(r"^\d\d/\d\d/\d{4}$", user["birth_date"])
        assert user["batches_url"] == f"{sim.base_url}{ADMIN}/users/{user['id']}/batches/"
        assert isinstance(user["custom_fields"], dict)
    assert any(u["birth_date"] is None for u in users) and any(u["email"] is None for u in users)
    kinds = {type(v) for u in users for v in u["custom_fields"].values()}
    assert {str, int, bool, float, list, type(None)} <= kinds
    assert any(re.match(r"^IN-[A-Z]{2}$", u["state"]) for u in users) and any(
        " " in u["state"] for u in users
    )
    with_email = next(u for u in users if u["email"])
    found = await walk(http, f"{sim.base_url}{ADMIN}/users/", admin, {"q": with_email["email"].upper()})
    assert [u["id"] for u in found] == [with_email["id"]]
    assert len(await walk(http, f"{sim.base_url}{ADMIN}/users/", admin, {"q": "student0002"})) == 10


async def test_batches_and_a_users_memberships(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    batches = await walk(http, f"{sim.base_url}{ADMIN}/batches/", admin, per_page=20)
    assert len(batches) == 25 and [b["id"] for b in batches] == sorted(
        (b["id"] for b in batches), reverse=True
    )
    assert all(set(b) == {"id", "name", "url", "is_local"} for b in batches)
    names = {b["id"]: b["name"] for b in batches}
    sizes = []
    for user in sim.dataset.users:
        mine = await walk(http, f"{sim.base_url}{ADMIN}/users/{user.id}/batches/", admin, per_page=20)
        assert all(names[b["id"]] == b["name"] for b in mine) and len(mine) <= 3
        sizes.append(len(mine))
    assert 0 in sizes and max(sizes) >= 2
    assert await get(http, f"{sim.base_url}{ADMIN}/users/424242/batches/", admin) == (
        404,
        {"detail": "Not found."},
    )
    word = batches[0]["name"].split()[0]
    found = await walk(http, f"{sim.base_url}{ADMIN}/batches/", admin, {"search": word.lower()})
    assert found and all(word.lower() in b["name"].lower() for b in found)
    status, detail = await get(http, batches[0]["url"], admin)
    assert status == 200 and UTC_MICRO.match(detail["created"]) and UTC_MICRO.match(detail["modified"])


@pytest.mark.parametrize(
    ("listing", "per_page"), [("exams", 200), ("attempts", 200), ("users", 20), ("batches", 20)]
)
async def test_walking_an_admin_listing_yields_each_id_once_and_ends_in_invalid_page(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str, listing: str, per_page: int
) -> None:
    url = f"{sim.base_url}{ADMIN}/{listing}/"
    _, first = await get(http, url, admin)
    assert first["per_page"] == per_page
    if first["count"] <= per_page:  # the 8 exams fit one page: smaller pages, same rules
        sim.state.admin_per_page[listing] = 3
    size = sim.state.admin_per_page[listing]
    ids = [row["id"] for row in await walk(http, url, admin, per_page=size)]
    assert len(ids) == len(set(ids)) > size
    assert await get(http, url, admin, {"page": str(-(-len(ids) // size) + 1)}) == (
        404,
        {"detail": "Invalid page."},
    )
    _, first = await get(http, url, admin, {"page": "1"})
    assert first["previous"] is None and first["next"] == f"{url}?page=2"


async def test_the_next_link_keeps_the_filters_and_ends_in_the_page(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    _, page = await get(http, f"{sim.base_url}{ADMIN}/users/", admin, {"q": "student"})
    assert page["count"] == 30 and page["next"] == f"{sim.base_url}{ADMIN}/users/?q=student&page=2"
    _, second = await get(http, page["next"], admin)
    assert second["previous"] == f"{sim.base_url}{ADMIN}/users/?q=student&page=1" and second["next"] is None


async def test_faults_and_the_route_counter_apply_to_admin_routes(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    sim.state.faults.throttle_rate = 1.0
    sim.state.faults.retry_after = 3
    status, body = await get(http, f"{sim.base_url}{ADMIN}/attempts/", admin)
    assert status == 429 and "throttled" in body["detail"]
    sim.state.faults.throttle_rate = 0.0
    await get(http, f"{sim.base_url}{ADMIN}/attempts/100002/", admin)
    await get(http, f"{sim.base_url}{ADMIN}/attempts/100003/", admin)
    await get(http, f"{sim.base_url}/api/v2.1/exams/", admin)
    routes = sim.state.stats()["by_route"]
    assert routes[f"{ADMIN}/attempts/"] == 1 and routes[f"{ADMIN}/attempts/{{attempt_id}}/"] == 2
    assert routes["/api/v2.1/exams/"] == 1 and routes["/api/v2.5/auth-token/"] == 1


# --- changes -----------------------------------------------------------------------------------------


async def test_created_then_completed_attempts_show_on_both_apis(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str, student: str
) -> None:
    exam = next(e for e in sim.dataset.exams if not e.forbidden)
    me, other = sim.state.student_user_id, sim.dataset.users[5].id
    status, body = await change(http, sim, action="create_attempts", exam_id=exam.id, user_ids=[me, other])
    assert status == 200 and len(body["added"]) == 2
    mine, theirs = body["added"]
    running = {
        r["id"]: r for r in await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"state": "0"})
    }
    assert {mine, theirs} <= set(running) and running[mine]["user_id"] == me
    assert running[mine]["last_answer_updated_time"] is None or running[mine]["state"] == "Running"
    v21_url = f"{sim.base_url}/api/v2.1/exams/{exam.slug}/attempts/"
    assert mine in {r["id"] for r in await walk(http, v21_url, student)}
    assert theirs not in {r["id"] for r in await walk(http, v21_url, student)}

    status, body = await change(http, sim, action="complete_attempts", attempt_ids=[mine, theirs])
    assert status == 200 and body == {"completed": [mine, theirs]}
    _, row = await get(http, f"{sim.base_url}{ADMIN}/attempts/{mine}/", admin)
    assert row["state"] == "Completed" and row["result"] in ("Pass", "Fail") and DECIMAL.match(row["score"])
    assert row["last_answer_updated_time"] is not None
    v21 = {r["id"]: r for r in await walk(http, v21_url, admin)}
    assert v21[mine]["state"] == "Completed" and v21[mine]["correct_count"] == row["correct_answers_count"]
    assert (await change(http, sim, action="complete_attempts", attempt_ids=[mine]))[1] == {"completed": []}


async def test_completing_without_ids_completes_every_running_attempt(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    running = await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"state": "0"})
    status, body = await change(http, sim, action="complete_attempts")
    assert status == 200 and sorted(body["completed"]) == sorted(r["id"] for r in running)
    assert await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"state": "0"}) == []


async def test_a_changed_user_shows_changed_on_both_apis(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    exam = next(e for e in sim.dataset.exams if not e.forbidden)
    user = exam.attempts[0].user
    fields = {"first_name": "Asha", "email": None, "birth_date": "01/02/2003", "city": "Pune"}
    assert await change(http, sim, action="update_user", user_id=user.id, fields=fields) == (
        200,
        {"ok": True},
    )
    _, row = await get(http, f"{sim.base_url}{ADMIN}/users/{user.id}/", admin)
    assert (row["first_name"], row["email"], row["birth_date"], row["city"]) == (
        "Asha",
        None,
        "01/02/2003",
        "Pune",
    )
    assert row["display_name"] == f"Asha {user.last_name}"
    rows = await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"users": str(user.id)})
    assert {(r["name"], r["email"]) for r in rows} == {(f"Asha {user.last_name}", None)}
    v21 = await walk(http, f"{sim.base_url}/api/v2.1/exams/{exam.slug}/attempts/", admin)
    nested = next(r["user"] for r in v21 if r["user"]["id"] == user.id)
    assert nested["first_name"] == "Asha" and nested["display_name"] == f"Asha {user.last_name}"
    status, body = await change(http, sim, action="update_user", user_id=user.id, fields={"shoe_size": 9})
    assert status == 400 and "shoe_size" in body["detail"]
    assert (await change(http, sim, action="update_user", user_id=1, fields={}))[0] == 404


async def test_memberships_can_be_added_and_removed(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    user = sim.dataset.users[3]
    url = f"{sim.base_url}{ADMIN}/users/{user.id}/batches/"
    before = {b["id"] for b in await walk(http, url, admin)}
    batch_id = next(b.id for b in sim.dataset.batches if b.id not in before)
    assert await change(http, sim, action="add_membership", user_id=user.id, batch_id=batch_id) == (
        200,
        {"changed": True},
    )
    assert await change(http, sim, action="add_membership", user_id=user.id, batch_id=batch_id) == (
        200,
        {"changed": False},
    )
    assert {b["id"] for b in await walk(http, url, admin)} == before | {batch_id}
    assert await change(http, sim, action="remove_membership", user_id=user.id, batch_id=batch_id) == (
        200,
        {"changed": True},
    )
    assert {b["id"] for b in await walk(http, url, admin)} == before
    assert (await change(http, sim, action="add_membership", user_id=user.id, batch_id=999))[0] == 404


async def test_a_deleted_attempt_leaves_both_apis_and_its_id_is_not_reused(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    exam = next(e for e in sim.dataset.exams if not e.forbidden)
    victim = exam.attempts[5].id
    assert await change(http, sim, action="delete_attempt", attempt_id=victim) == (200, {"ok": True})
    assert await get(http, f"{sim.base_url}{ADMIN}/attempts/{victim}/", admin) == (
        404,
        {"detail": "Not found."},
    )
    assert victim not in {r["id"] for r in await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin)}
    v21 = await walk(http, f"{sim.base_url}/api/v2.1/exams/{exam.slug}/attempts/", admin)
    assert victim not in {r["id"] for r in v21}
    assert (await change(http, sim, action="delete_attempt", attempt_id=victim))[0] == 404
    _, body = await change(http, sim, action="add_attempts", exam_id=exam.id, count=2)
    ids = [
        r["id"] for r in await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"exams": str(exam.id)})
    ]
    assert len(ids) == len(set(ids)) and not set(body["added"]) & {a.id for a in exam.attempts[2:]}


async def test_an_unknown_change_or_a_missing_field_is_a_400(
    http: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    assert (await change(http, sim, action="teleport"))[0] == 400
    assert (await change(http, sim, action="create_attempts", exam_id=1))[0] == 400
    assert (await change(http, sim, action="create_attempts", exam_id=1, user_ids=[1000], state="Paused"))[
        0
    ] == 400


async def test_new_attempts_start_now_by_the_data_sets_clock(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    now = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    sim.dataset.clock = lambda: now
    _, body = await change(
        http, sim, action="create_attempts", exam_id=1, user_ids=[1001], state="Not Started"
    )
    rows = await walk(http, f"{sim.base_url}{ADMIN}/attempts/", admin, {"date_0": "2025-06-01"})
    assert [(r["id"], r["date"], r["state"]) for r in rows] == [
        (body["added"][0], "2025-06-01T12:00:00.123456Z", "Not Started")
    ]


# --- rows and listings kept between requests (sync/simulator/cache.py) ---------------------------
#
# Every page read after a change must be what a fresh rendering of the changed data gives,
# byte for byte, however the data was changed: by the change route, by a Dataset method, or
# by hand on the records and lists themselves, as tests do.


async def served_rows(
    http: aiohttp.ClientSession, url: str, token: str, params: dict[str, str] | None = None
) -> list[bytes]:
    return [orjson.dumps(row) for row in await walk(http, url, token, params)]


def fresh_attempt_rows(dataset: Dataset, base: str, keep: Any = lambda attempt: True) -> list[bytes]:
    from sync.simulator.admin import attempt_row

    pairs = sorted(((e, a) for e in dataset.exams for a in e.attempts), key=lambda pair: pair[1].id)
    return [orjson.dumps(attempt_row(dataset, e, a, base)) for e, a in pairs if keep(a)]


def fresh_user_rows(dataset: Dataset, base: str) -> list[bytes]:
    from sync.simulator.admin import user_row

    return [orjson.dumps(user_row(dataset, user, base)) for user in sorted(dataset.users, key=lambda u: u.id)]


async def test_kept_rows_and_listings_follow_every_change_by_route_or_by_hand(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    dataset, base = sim.dataset, sim.base_url
    attempts_url, users_url = f"{base}{ADMIN}/attempts/", f"{base}{ADMIN}/users/"

    async def served_attempts(params: dict[str, str] | None = None) -> list[bytes]:
        return await served_rows(http, attempts_url, admin, params)

    def fresh_attempts(keep: Any = lambda attempt: True) -> list[bytes]:
        return fresh_attempt_rows(dataset, base, keep)

    running = [a for _, a in dataset.attempts_by_id() if a.state == "Running"]
    assert len(running) >= 2
    # Read everything twice: the second reads come from what the first kept.
    for _ in range(2):
        assert await served_attempts() == fresh_attempts()
        assert await served_attempts({"state": "0"}) == fresh_attempts(lambda a: a.state == "Running")
        assert await served_rows(http, users_url, admin) == fresh_user_rows(dataset, base)

    # Through the change route: a completed attempt leaves the Running listing and its row
    # shows it completed (state, result, figures, last answer).
    done = running[0]
    status, body = await change(http, sim, action="complete_attempts", attempt_ids=[done.id])
    assert (status, body) == (200, {"completed": [done.id]})
    running_now = await served_attempts({"state": "0"})
    assert len(running_now) == len(running) - 1
    assert running_now == fresh_attempts(lambda a: a.state == "Running")
    assert await served_attempts() == fresh_attempts()
    assert [orjson.loads(row)["state"] for row in fresh_attempts(lambda a: a is done)] == ["Completed"]

    # By hand, on the records themselves: a profile's e-mail, a user's name and an
    # attempt's state show on the next read of both listings.
    user = running[1].user
    dataset.profile(user).email = "changed@example.com"
    user.last_name = "Ray"
    running[1].state = "Completed"
    served = await served_attempts()
    assert served == fresh_attempts()
    mine = [row for row in map(orjson.loads, served) if row["user_id"] == user.id]
    expected = ("changed@example.com", f"{user.first_name} Ray")
    assert mine and {(row["email"], row["name"]) for row in mine} == {expected}
    assert await served_attempts({"state": "0"}) == fresh_attempts(lambda a: a.state == "Running")
    assert await served_rows(http, users_url, admin) == fresh_user_rows(dataset, base)

    # A list changed in place by hand: the attempt is gone from the listing, and from the
    # exam's own listing, read before.
    exam = next(e for e in dataset.exams if len(e.attempts) > 1)
    of_exam = {"exams": str(exam.id)}
    assert await served_attempts(of_exam) == fresh_attempts(lambda a: a in exam.attempts)
    gone = exam.attempts.pop()
    served = await served_attempts()
    assert served == fresh_attempts() and gone.id not in {orjson.loads(row)["id"] for row in served}
    assert await served_attempts(of_exam) == fresh_attempts(lambda a: a in exam.attempts)
    # ... and a list replaced by hand: the old one is left as it was.
    exam.attempts = exam.attempts[:-1]
    assert await served_attempts() == fresh_attempts()
    assert await served_attempts(of_exam) == fresh_attempts(lambda a: a in exam.attempts)


async def test_records_made_by_hand_are_served_as_they_are_edited(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    # Records made outside the data set and put in its lists by hand count their edits in
    # it once it serves them (data.EditCount.adopt): kept rows and listings follow them,
    # rows of theirs rendered or not.
    from sync.simulator.admin import exam_row
    from sync.simulator.data import EPOCH, SimAttempt, SimExam, SimUser

    dataset, base = sim.dataset, sim.base_url
    attempts_url, users_url = f"{base}{ADMIN}/attempts/", f"{base}{ADMIN}/users/"
    running = {"state": "0"}
    for _ in range(2):  # everything kept before the records come
        await walk(http, attempts_url, admin, running)
        await walk(http, users_url, admin)

    # Put in the lists, then edited by hand before any row of theirs was rendered: the
    # listings read their fields all the same. Each is on page 2 of its listing, by id.
    loner = SimUser(5998, "loner", "Lo", "Ner")
    dataset.users.append(loner)
    _, page = await get(http, users_url, admin)
    assert page["count"] == len(dataset.users) > 20 and page["results"][-1]["id"] < loner.id
    loner.id = 1
    _, page = await get(http, users_url, admin)
    assert page["results"][0]["id"] == 1
    exam = dataset.exams[0]  # the newest: its attempt has the highest id
    newcomer = SimUser(999, "newcomer", "New", "Comer")
    attempt = SimAttempt(exam.id * 100_000 + 99_000, newcomer, "Running", exam.created + timedelta(days=3))
    dataset.users.append(newcomer)
    exam.attempts.insert(0, attempt)
    until = {"date_1": "2030-01-01"}
    _, page = await get(http, attempts_url, admin, until)
    assert page["count"] == len(dataset.attempts_by_id()) > 200 and page["results"][-1]["id"] < attempt.id
    attempt.started = datetime(2031, 1, 1, tzinfo=UTC)
    _, page = await get(http, attempts_url, admin, until)
    assert page["count"] == len(dataset.attempts_by_id()) - 1

    for _ in range(2):
        assert await served_rows(http, attempts_url, admin) == fresh_attempt_rows(dataset, base)
        assert await served_rows(http, attempts_url, admin, running) == fresh_attempt_rows(
            dataset, base, lambda a: a.state == "Running"
        )
        assert await served_rows(http, users_url, admin) == fresh_user_rows(dataset, base)
    assert attempt.id in {orjson.loads(row)["id"] for row in await served_rows(http, attempts_url, admin, running)}

    attempt.state = "Completed"
    newcomer.last_name = "Later"
    assert await served_rows(http, attempts_url, admin) == fresh_attempt_rows(dataset, base)
    served = await served_rows(http, attempts_url, admin, running)
    assert served == fresh_attempt_rows(dataset, base, lambda a: a.state == "Running")
    assert attempt.id not in {orjson.loads(row)["id"] for row in served}
    assert await served_rows(http, users_url, admin) == fresh_user_rows(dataset, base)

    # A user set by hand on one of its attempts: that user's own fields count too, even
    # before any row of theirs was rendered (a filtered listing reads them).
    stranger = SimUser(4343, "stranger", "Stran", "Ger")
    attempt.user = stranger
    before = dataset.edits.value
    stranger.id = 4344
    assert dataset.edits.value > before
    assert await served_rows(http, attempts_url, admin, {"users": "4344"}) == fresh_attempt_rows(
        dataset, base, lambda a: a is attempt
    )

    # An exam put in by hand, read through its detail, then renamed by hand.
    url = f"{base}{ADMIN}/exams/900/"
    extra = SimExam(id=900, slug="exam-00900", title="By hand", course="SSC", created=EPOCH)
    dataset.exams.insert(0, extra)
    for title in ("By hand", "Renamed by hand"):
        extra.title = title
        status, body = await get(http, url, admin)
        assert (status, orjson.dumps(body)) == (200, orjson.dumps(exam_row(dataset, extra, base)))
        assert body["title"] == title


def test_each_data_set_counts_its_own_edits() -> None:
    # No count shared by the process: each data set counts the edits of the records it
    # made, from the start, and a record two data sets hold counts in both.
    one, other = small(), small()
    assert one.edits is not other.edits
    exam = other.exams[0]
    user = other.users[0]
    fields = [
        (exam, "title"), (exam.attempts[0], "state"), (user, "first_name"), (other.profile(user), "email"),
        (other.batches[0], "name"),
    ]  # fmt: skip
    for record, name in fields:
        before = one.edits.value, other.edits.value
        setattr(record, name, getattr(record, name))  # even set to what it was
        assert one.edits.value == before[0] and other.edits.value > before[1], record
    before = one.edits.value, other.edits.value
    other.rename_exam(other.exams[1].id, "Renamed")
    assert one.edits.value == before[0] and other.edits.value > before[1]

    shared = other.users[1]
    one.exams[0].attempts[0].user = shared  # an edit of one, which adopts the user
    before = one.edits.value, other.edits.value
    shared.last_name = "Both"
    assert one.edits.value > before[0] and other.edits.value > before[1]


async def test_a_warmed_simulator_renders_its_rows_as_it_starts(http: aiohttp.ClientSession) -> None:
    # `warm=True` (the benchmark's simulator) renders every listing row as the server
    # starts: the first walk renders none, and serves what a fresh rendering gives.
    from sync.simulator.admin import ADMIN_CACHE_KEY

    async with SimulatorServer(small(), warm=True) as sim:
        dataset, base, cache = sim.dataset, sim.base_url, sim.app[ADMIN_CACHE_KEY]
        status, body = await login(http, sim, "admin", "secret")
        assert status == 200
        token = body["token"]
        rows = {base: len(dataset.attempts_by_id())}
        assert cache.attempts.kept() == rows and cache.users.kept() == {base: len(dataset.users)}
        assert await served_rows(http, f"{base}{ADMIN}/attempts/", token) == fresh_attempt_rows(dataset, base)
        assert await served_rows(http, f"{base}{ADMIN}/users/", token) == fresh_user_rows(dataset, base)
        assert cache.attempts.kept() == rows


async def test_rows_are_kept_for_two_hosts_and_for_the_items_still_served(
    http: aiohttp.ClientSession, sim: SimulatorServer, admin: str
) -> None:
    from sync.simulator.admin import ADMIN_CACHE_KEY

    dataset, cache = sim.dataset, sim.app[ADMIN_CACHE_KEY]
    url = f"{sim.base_url}{ADMIN}/attempts/"
    hosts = [f"{name}:{sim.port}" for name in ("127.0.0.1", "localhost", "simulator.test")]
    for host in hosts:
        async with http.get(url, headers={"Authorization": f"JWT {admin}", "Host": host}) as response:
            page = await response.json()
        base = f"http://{host}"
        assert page["results"][0]["exam_url"].startswith(f"{base}{ADMIN}/exams/")
        assert [orjson.dumps(row) for row in page["results"]] == fresh_attempt_rows(dataset, base)[:200]
    assert list(cache.attempts.kept()) == [f"http://{host}" for host in hosts[1:]]

    # Most attempts deleted: their rows go, those still listed stay.
    await walk(http, url, admin)
    for exam in dataset.exams[2:]:
        exam.attempts.clear()
    listed = len(dataset.attempts_by_id())
    assert await served_rows(http, url, admin) == fresh_attempt_rows(dataset, sim.base_url)
    assert cache.attempts.kept()[sim.base_url] == listed
