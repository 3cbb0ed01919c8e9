"""`testpress-sync doctor`: each thing a run needs, checked in order, with a remedy."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sync.commands import Outcome, Result
from sync.config import Settings
from sync.errors import ApiError, AuthError, ConfigError, DatabaseError, SyncError
from sync.model.resources import EXAMS
from sync.ops.logs import Redactor
from sync.sink.database import (
    VERSION_TABLE,
    clash_remedy,
    create_engine,
    database_url_from,
    describe_engine,
    missing_database_file,
    missing_schema_parts,
    schema_state,
)
from sync.source.access import choose_source
from sync.source.client import TestpressClient, open_session
from sync.source.proxies import Proxies


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    # The kind of error a failure is (the CLI maps it to the exit code `doctor` ends
    # with when this is the first failure).
    failure: type[SyncError] = ApiError


async def run_checks(settings: Settings, redactor: Redactor) -> list[Check]:
    """Configuration, then the server, the login and the database. A check that cannot
    run because an earlier one failed is reported as skipped, not failed twice."""
    checks = [_check_configuration(settings)]
    if checks[0].ok:
        async with open_session(settings.api, settings.http) as session:
            client = TestpressClient(session, settings.api, settings.http, redactor)
            reachable = await _guarded("server", _check_server(client, settings))
            checks.append(reachable)
            if reachable.ok:
                login = await _guarded("login", _check_login(client))
                checks.append(login)
                if login.ok:
                    checks.append(await _guarded("source", _check_source(client, settings.api.source)))
            else:
                checks.append(Check("login", False, "skipped: the server is not reachable", failure=ApiError))
    checks.append(await _guarded("database", _check_database(settings)))
    return checks


async def _guarded(name: str, check: Awaitable[Check]) -> Check:
    try:
        return await check
    except SyncError as exc:  # anything unforeseen still becomes a failed check, not a traceback
        return Check(name, False, str(exc), failure=ApiError)


def _check_configuration(settings: Settings) -> Check:
    try:
        settings.require_api()
        database_url_from(settings.database_url)
        Proxies(settings.http.proxy)  # a proxy URL that cannot be used, said here
    except ConfigError as exc:
        return Check(
            "configuration", False, str(exc),
            "set it in the environment, the config file (--config) or a flag; see config.example.toml",
            failure=ConfigError,
        )  # fmt: skip
    return Check("configuration", True, f"{settings.api.base_url} as {settings.api.username!r}")


async def _check_server(client: TestpressClient, settings: Settings) -> Check:
    url = f"{settings.api.base_url}{EXAMS.listing_path()}"
    route = client.proxies.describe(url)
    try:
        status, location = await client.status_of(url)
    except ApiError as exc:
        return Check(
            "server", False, f"{url} ({route}): {exc}",
            "check TESTPRESS_BASE_URL, DNS, proxies (http.proxy, HTTPS_PROXY, NO_PROXY) and "
            "firewalls; with a TLS-inspecting proxy set api.ca_bundle",
            failure=ApiError,
        )  # fmt: skip
    if status in (200, 401, 403):  # it answers like the API: it wants a login
        return Check("server", True, f"{url} answers ({route}; HTTP {status} without a login)")
    if location is not None:  # a redirect the client does not follow: to another server
        return Check(
            "server", False, f"{url} redirects to {location} (HTTP {status})",
            "set TESTPRESS_BASE_URL to the address the API answers at",
            failure=ApiError,
        )  # fmt: skip
    return Check(
        "server", False, f"{url} answered HTTP {status}, not like the Testpress API",
        "check TESTPRESS_BASE_URL: it is the institute's root, e.g. https://demo.testpress.in",
        failure=ApiError,
    )  # fmt: skip


async def _check_login(client: TestpressClient) -> Check:
    try:
        await client.login()
        listing = await client.get_json(client.url(EXAMS.listing_path()))
    except AuthError as exc:
        return Check("login", False, str(exc), exc.hint, failure=AuthError)
    except ApiError as exc:
        return Check("login", False, str(exc), "try again later; if it persists, ask Testpress", failure=ApiError)
    # No count of exams here: the v2.1 listing without a `state` shows an undocumented
    # subset, and an admin login reads the institute's exams elsewhere (the source check).
    shape = "a page of exams" if isinstance(listing, dict) and "results" in listing else "an answer"
    return Check("login", True, f"logged in; the token reads the exam listing ({shape})")


async def _check_source(client: TestpressClient, wanted: str) -> Check:
    """Which API a run would read with this login, and why."""
    try:
        chosen = await choose_source(client, wanted)
    except AuthError as exc:
        return Check("source", False, str(exc), "use an institute staff login, or [testpress] source = auto",
                     failure=AuthError)  # fmt: skip
    if chosen.source == "student":
        return Check("source", True, f"student API: {chosen.reason}; this login sees its own attempts only "
                     "(an institute staff login syncs every student)")  # fmt: skip
    return Check("source", True, f"admin API: {chosen.reason}; the whole institute is synced")


async def _check_database(settings: Settings) -> Check:
    try:
        url = database_url_from(settings.database_url)
        engine = create_engine(url, schema=settings.database_schema)
    except ConfigError as exc:
        return Check("database", False, str(exc), failure=ConfigError)
    try:
        missing = missing_database_file(url)
        if missing is not None:
            return Check("database", True, f"no SQLite file at {missing} yet: the first run creates it")
        state = await schema_state(engine)
        changed = await missing_schema_parts(engine) if state.up_to_date else []
    except DatabaseError as exc:
        return Check(
            "database", False, str(exc),
            "check TESTPRESS_DATABASE_URL, that the server runs and accepts this user",
            failure=DatabaseError,
        )  # fmt: skip
    finally:
        await engine.dispose()
    where = describe_engine(engine)
    # An older testpress-sync kept the revision in alembic_version; a run moves it.
    moved = f" (recorded in alembic_version; the next run moves it to {VERSION_TABLE})" if state.legacy else ""
    if changed:
        return Check(
            "database", False,
            f"{where}: schema at revision {state.current}, but {', '.join(changed)} "
            f"{'is' if len(changed) == 1 else 'are'} missing (changed by hand?)",
            "restore them as testpress-sync made them (docs/schema.md), or sync into a new "
            "database: a run stops at the first statement that needs a missing table or "
            "column, and dashboards need the views",
            failure=DatabaseError,
        )  # fmt: skip
    if state.up_to_date:
        return Check("database", True, f"{where}: schema at revision {state.current}{moved}")
    if not state.known:
        return Check("database", False, f"{where}: schema at unknown revision {state.current}",
                     "upgrade testpress-sync: a newer version migrated this database", failure=DatabaseError)
    if state.clash:
        return Check(
            "database", False,
            f"{where}: has {', '.join(state.present)} without a {VERSION_TABLE} record "
            "(tables testpress-sync did not create, with its tables' names)",
            clash_remedy(url.get_backend_name()),
            failure=DatabaseError,
        )  # fmt: skip
    return Check(
        "database", True,
        f"{where}: schema {'empty' if state.empty else f'at {state.current}'}{moved}, head is {state.head}; "
        "the next run migrates it (or run `testpress-sync migrate`)",
    )  # fmt: skip


Printer = Callable[[str], None]


def print_checks(checks: list[Check], out: Printer) -> Result:
    """Print each check; return the kind of the first failure (Outcome.OK if none)."""
    for check in checks:
        out(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<14} {check.detail}")
        if not check.ok and check.remedy:
            out(f"      {'':<14} → {check.remedy}")
    failures = [check for check in checks if not check.ok]
    out("All checks passed." if not failures else f"{len(failures)} check(s) failed.")
    return failures[0].failure if failures else Outcome.OK


def checks_document(checks: list[Check]) -> dict[str, Any]:
    """The checks for machines: each one's name, verdict, detail and remedy, and the
    kind of error the first failure is (what the exit code says)."""
    failures = [check for check in checks if not check.ok]
    return {
        "ok": not failures,
        "failure": failures[0].failure.__name__ if failures else None,
        "checks": [
            {"name": check.name, "ok": check.ok, "detail": check.detail, "remedy": check.remedy or None}
            for check in checks
        ],
    }


async def doctor(settings: Settings, redactor: Redactor, *, as_json: bool = False) -> Result:
    checks = await run_checks(settings, redactor)
    # Redacted like the log: a detail may quote an error that quotes a proxy's URL.
    if as_json:
        print(redactor.redact(json.dumps(checks_document(checks), indent=2)))
        failures = [check for check in checks if not check.ok]
        return failures[0].failure if failures else Outcome.OK
    return print_checks(checks, lambda line: print(redactor.redact(line)))
