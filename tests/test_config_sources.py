"""Configuration, part two: one variable per setting, the .env layer, the password's
precedence, and which layer set what (the report behind `testpress-sync config`).

Every test passes `environ=` and files under tmp_path: the real environment and the
checkout's .env are never read.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from sync.config import (
    ALIASES,
    ENVIRONMENT,
    PASSWORD_FILE,
    PRIVATE_KEY_FILE,
    REDACTED,
    SPECS,
    Settings,
    SettingSpec,
    _convert,
    _is_secret,
    flag_name,
    format_settings_report,
    load_settings,
    load_settings_with_sources,
    settings_report,
)
from sync.errors import ConfigError

# The published names. Pinned here on purpose: the code derives them, and a rename of a
# field would silently rename a variable that people have in their crontabs.
CANONICAL = {
    "api.base_url": "TESTPRESS_BASE_URL",
    "api.username": "TESTPRESS_USERNAME",
    "api.password": "TESTPRESS_PASSWORD",
    "api.api_version": "TESTPRESS_API_VERSION",
    "api.ca_bundle": "TESTPRESS_CA_BUNDLE",
    "api.source": "TESTPRESS_SOURCE",
    "http.concurrency": "TESTPRESS_HTTP_CONCURRENCY",
    "http.timeout": "TESTPRESS_HTTP_TIMEOUT",
    "http.max_attempts": "TESTPRESS_HTTP_MAX_ATTEMPTS",
    "http.max_retry_wait": "TESTPRESS_HTTP_MAX_RETRY_WAIT",
    "http.backoff_initial": "TESTPRESS_HTTP_BACKOFF_INITIAL",
    "http.backoff_max": "TESTPRESS_HTTP_BACKOFF_MAX",
    "http.proxy": "TESTPRESS_HTTP_PROXY",
    "sync.batch_size": "TESTPRESS_SYNC_BATCH_SIZE",
    "sync.commit_interval": "TESTPRESS_SYNC_COMMIT_INTERVAL",
    "sync.queue_pages": "TESTPRESS_SYNC_QUEUE_PAGES",
    "sync.queue_items": "TESTPRESS_SYNC_QUEUE_ITEMS",
    "sync.database_retry_seconds": "TESTPRESS_SYNC_DATABASE_RETRY_SECONDS",
    "sync.course": "TESTPRESS_SYNC_COURSE",
    "sync.full_every": "TESTPRESS_SYNC_FULL_EVERY",
    "sync.lookback": "TESTPRESS_SYNC_LOOKBACK",
    "sync.pii": "TESTPRESS_SYNC_PII",
    "sync.pii_salt": "TESTPRESS_SYNC_PII_SALT",
    "sync.attempt_details": "TESTPRESS_SYNC_ATTEMPT_DETAILS",
    "log.format": "TESTPRESS_LOG_FORMAT",
    "log.level": "TESTPRESS_LOG_LEVEL",
    "webhook.host": "TESTPRESS_WEBHOOK_HOST",
    "webhook.port": "TESTPRESS_WEBHOOK_PORT",
    "webhook.public_key": "TESTPRESS_WEBHOOK_PUBLIC_KEY",
    "webhook.private_key": "TESTPRESS_WEBHOOK_PRIVATE_KEY",
    "webhook.max_body_bytes": "TESTPRESS_WEBHOOK_MAX_BODY_BYTES",
    "webhook.commit_timeout": "TESTPRESS_WEBHOOK_COMMIT_TIMEOUT",
    "database_url": "TESTPRESS_DATABASE_URL",
    "database_schema": "TESTPRESS_DATABASE_SCHEMA",
}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings reads ./.env by default: a developer's own must not leak in."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def value_of(settings: Settings, key: str) -> Any:
    group, _, name = key.rpartition(".")
    return getattr(getattr(settings, group) if group else settings, name)


def sample(spec: SettingSpec, tmp_path: Path) -> tuple[str, Any]:
    """A valid non-default value for a setting: (as text, as loaded)."""
    special: dict[str, tuple[str, Any]] = {
        "api.base_url": ("https://sample.testpress.in", "https://sample.testpress.in"),
        "log.format": ("json", "json"),
        "log.level": ("debug", "debug"),
        "api.source": ("student", "student"),
        "sync.pii": ("drop", "drop"),
        "sync.full_every": ("36h", "36h"),
        "sync.lookback": ("12h", "12h"),
    }
    if spec.key in special:
        return special[spec.key]
    if spec.key == "api.ca_bundle":
        bundle = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
        return str(bundle), str(bundle)
    by_kind: dict[type, tuple[str, Any]] = {int: ("7", 7), float: ("2.5", 2.5), bool: ("yes", True), str: ("sample-text", "sample-text")}
    return by_kind[spec.kind]


# --- the table ----------------------------------------------------------------------------


def test_every_dataclass_field_has_exactly_the_published_variable() -> None:
    defaults, leaves = Settings(), set()
    for group in fields(Settings):
        value = getattr(defaults, group.name)
        leaves |= {f"{group.name}.{item.name}" for item in fields(value)} if is_dataclass(value) else {group.name}
    assert set(SPECS) == leaves == set(CANONICAL)
    assert {key: spec.env for key, spec in SPECS.items()} == CANONICAL
    assert PASSWORD_FILE.env == "TESTPRESS_PASSWORD_FILE"
    assert PRIVATE_KEY_FILE.env == "TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE"
    assert ALIASES == {
        "TESTPRESS_CONCURRENCY": "http.concurrency",
        "TESTPRESS_BATCH_SIZE": "sync.batch_size",
        "TESTPRESS_ATTEMPT_DETAILS": "sync.attempt_details",
    }
    variables = [name for spec in [*SPECS.values(), PASSWORD_FILE, PRIVATE_KEY_FILE] for name in (spec.env, *spec.aliases)]
    assert len(variables) == len(set(variables)) == len(ENVIRONMENT)
    assert "TESTPRESS_CONFIG" not in variables


@pytest.mark.parametrize("layer", ["file", "dotenv", "env", "flag"])
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=lambda spec: spec.env)
def test_every_setting_can_be_set_in_every_layer(tmp_path: Path, spec: SettingSpec, layer: str) -> None:
    text, expected = sample(spec, tmp_path)
    kwargs: dict[str, Any] = {"environ": {}, "dotenv_path": tmp_path / "absent.env"}
    if layer == "file":  # a JSON scalar is a TOML scalar for str, int and float
        config = write(tmp_path / "c.toml", f"[{spec.section}]\n{spec.name} = {json.dumps(expected)}\n")
        kwargs["config_path"] = str(config)
        source = f"file {config}"
    elif layer == "dotenv":
        kwargs["dotenv_path"] = write(tmp_path / ".env", f"{spec.env}={text}\n")
        source = f".env {kwargs['dotenv_path']}"
    elif layer == "env":
        kwargs["environ"] = {spec.env: text}
        source = f"env {spec.env}"
    else:
        kwargs["overrides"] = {spec.key: text}  # as text, like the environment: converted alike
        source = f"flag {flag_name(spec)}"
    settings, sources = load_settings_with_sources(**kwargs)
    assert value_of(settings, spec.key) == expected
    assert sources[spec.key] == source
    assert {key for key, where in sources.items() if where != "default"} == {spec.key}


@pytest.mark.parametrize("spec", [spec for spec in SPECS.values() if spec.kind in (int, float)], ids=lambda spec: spec.env)
def test_a_bad_number_names_the_variable_and_the_setting(spec: SettingSpec) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={spec.env: "lots"})
    message = str(caught.value)
    assert spec.env in message and spec.key in message and f"is not a valid {spec.kind.__name__}" in message
    assert "\n" not in message


# --- environment values -------------------------------------------------------------------


def test_alias_works_and_the_canonical_name_beats_it_in_the_same_layer() -> None:
    settings, sources = load_settings_with_sources(environ={"TESTPRESS_CONCURRENCY": "5", "TESTPRESS_BATCH_SIZE": "50"})
    assert settings.http.concurrency == 5 and settings.sync.batch_size == 50
    assert sources["http.concurrency"] == "env TESTPRESS_CONCURRENCY"
    both = {"TESTPRESS_CONCURRENCY": "5", "TESTPRESS_HTTP_CONCURRENCY": "9"}
    settings, sources = load_settings_with_sources(environ=both)
    assert settings.http.concurrency == 9 and sources["http.concurrency"] == "env TESTPRESS_HTTP_CONCURRENCY"


def test_a_layer_beats_a_lower_one_whichever_name_each_uses(tmp_path: Path) -> None:
    dotenv = write(tmp_path / ".env", "TESTPRESS_HTTP_CONCURRENCY=9\n")
    settings = load_settings(environ={"TESTPRESS_CONCURRENCY": "5"}, dotenv_path=dotenv)
    assert settings.http.concurrency == 5


def test_a_bad_alias_value_names_both_names() -> None:
    with pytest.raises(ConfigError, match=r"TESTPRESS_CONCURRENCY='x' is not a valid int \(setting http.concurrency, env TESTPRESS_HTTP_CONCURRENCY\)"):
        load_settings(environ={"TESTPRESS_CONCURRENCY": "x"})


@pytest.mark.parametrize(
    ("variable", "text", "reason"),
    [
        ("TESTPRESS_HTTP_TIMEOUT", "nan", "is not a valid float"),
        ("TESTPRESS_HTTP_TIMEOUT", "inf", "is not a valid float"),
        ("TESTPRESS_SYNC_BATCH_SIZE", "2.5", "is not a valid int"),
        ("TESTPRESS_HTTP_CONCURRENCY", "0", r"http.concurrency must be at least 1 \(set by env TESTPRESS_HTTP_CONCURRENCY\)"),
        ("TESTPRESS_LOG_FORMAT", "xml", r"log.format must be auto, console or json \(set by env TESTPRESS_LOG_FORMAT\)"),
        ("TESTPRESS_BASE_URL", "ftp://x", r"not an http\(s\) URL .* \(set by env TESTPRESS_BASE_URL\)"),
    ],
)
def test_bad_environment_values_are_one_line_naming_the_variable(variable: str, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        load_settings(environ={variable: text})
    assert variable in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_value_in_the_file_names_the_file_setting_and_variable(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[http]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match=rf"http.concurrency must be at least 1 \(set by file {config}; env TESTPRESS_HTTP_CONCURRENCY\)"):
        load_settings(config_path=str(config), environ={})
    config = write(tmp_path / "c.toml", "[testpress]\napi_version = 2.10\n")
    with pytest.raises(ConfigError, match=r"'api.api_version': 2.1 is not a valid str \(quote it\) \(env TESTPRESS_API_VERSION\)"):
        load_settings(config_path=str(config), environ={})


def test_values_are_converted_like_toml_values() -> None:
    flag = SettingSpec("x.flag", "x", "flag", "TESTPRESS_X_FLAG", bool, False, False)
    assert [_convert(flag, text) for text in ("true", "YES", "1", "false", "no", "0", " True ")] == [True, True, True, False, False, False, True]
    with pytest.raises(ValueError, match="is not a valid bool"):
        _convert(flag, "maybe")
    timeout = SPECS["http.timeout"]
    assert _convert(timeout, " 12 ") == 12.0 and _convert(timeout, 3) == 3.0
    for wrong in (True, "soon", float("nan")):
        with pytest.raises(ValueError):
            _convert(timeout, wrong)
    with pytest.raises(ValueError, match="is not a valid int"):
        _convert(SPECS["http.concurrency"], 2.5)  # not silently 2


def test_empty_variables_are_unset_and_keep_the_lower_layer(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[sync]\ncourse = "IBPS"\n[http]\ntimeout = 9\n')
    settings, sources = load_settings_with_sources(
        config_path=str(config), environ={"TESTPRESS_SYNC_COURSE": "", "TESTPRESS_HTTP_TIMEOUT": ""}
    )
    assert settings.sync.course == "IBPS" and settings.http.timeout == 9.0
    assert sources["sync.course"] == sources["http.timeout"] == f"file {config}"
    config = write(tmp_path / "c.toml", '[sync]\ncourse = ""\n')
    assert load_settings(config_path=str(config), environ={}).sync.course is None  # optional: empty is unset


def test_require_api_names_the_canonical_variables() -> None:
    with pytest.raises(ConfigError, match=r"TESTPRESS_BASE_URL is not set \(or \[testpress\] base_url"):
        Settings().require_api()
    settings = load_settings(environ={"TESTPRESS_BASE_URL": "https://x.testpress.in", "TESTPRESS_USERNAME": "u"})
    with pytest.raises(ConfigError, match="TESTPRESS_PASSWORD is not set .*TESTPRESS_PASSWORD_FILE.*password_file"):
        settings.require_api()


# --- the .env file ------------------------------------------------------------------------


def test_dotenv_sits_between_the_file_and_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[http]\ntimeout = 5\nconcurrency = 5\nmax_attempts = 5\n")
    dotenv = write(tmp_path / ".env", "TESTPRESS_HTTP_TIMEOUT=10\nTESTPRESS_HTTP_CONCURRENCY=10\n")
    settings, sources = load_settings_with_sources(
        config_path=str(config), environ={"TESTPRESS_HTTP_TIMEOUT": "20"}, dotenv_path=dotenv
    )
    assert (settings.http.timeout, settings.http.concurrency, settings.http.max_attempts) == (20.0, 10, 5)
    assert sources["http.timeout"] == "env TESTPRESS_HTTP_TIMEOUT"
    assert sources["http.concurrency"] == f".env {dotenv}"
    assert sources["http.max_attempts"] == f"file {config}"


def test_dotenv_in_the_working_directory_is_read_by_default(tmp_path: Path) -> None:
    write(tmp_path / ".env", "TESTPRESS_LOG_LEVEL=debug\n")
    settings, sources = load_settings_with_sources(environ={})
    assert settings.log.level == "debug" and sources["log.level"] == f".env {Path.cwd() / '.env'}"


def test_dotenv_syntax_quotes_export_comments_and_multiline(tmp_path: Path) -> None:
    dotenv = write(
        tmp_path / ".env",
        "# a comment line\n"
        "export TESTPRESS_USERNAME=exported-user\n"
        "TESTPRESS_PASSWORD='pa$$ \"w0rd\" #1 ${HOME}'\n"
        'TESTPRESS_SYNC_COURSE="IBPS PO"  # a trailing comment\n'
        'TESTPRESS_API_VERSION="v${NOT_EXPANDED}"\n'
        'TESTPRESS_DATABASE_URL="sqlite:///first\nsecond.db"\n'
        "TESTPRESS_LOG_LEVEL=\n"
        "UNRELATED=ignored\n",
    )
    settings = load_settings(environ={"HOME": "/home/x"}, dotenv_path=dotenv)
    assert settings.api.username == "exported-user"
    assert settings.api.password == 'pa$$ "w0rd" #1 ${HOME}'  # no ${VAR} expansion: passwords keep their $
    assert settings.sync.course == "IBPS PO"
    assert settings.api.api_version == "v${NOT_EXPANDED}"
    assert settings.database_url == "sqlite:///first\nsecond.db"
    assert settings.log.level == "info"  # empty: unset


def test_dotenv_may_name_the_config_file_and_the_environment_beats_it(tmp_path: Path) -> None:
    first = write(tmp_path / "first.toml", "[http]\ntimeout = 1\n")
    second = write(tmp_path / "second.toml", "[http]\ntimeout = 2\n")
    dotenv = write(tmp_path / ".env", f"TESTPRESS_CONFIG={first}\n")
    assert load_settings(environ={}, dotenv_path=dotenv).http.timeout == 1.0
    assert load_settings(environ={"TESTPRESS_CONFIG": str(second)}, dotenv_path=dotenv).http.timeout == 2.0


def test_a_dotenv_holding_the_password_readable_by_others_warns(tmp_path: Path) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []

    def warn(event: str, **fields_: Any) -> None:
        warnings.append((event, fields_))

    dotenv = write(tmp_path / ".env", "TESTPRESS_PASSWORD=hunter2\n", mode=0o640)
    load_settings(environ={}, dotenv_path=dotenv, warn=warn)
    assert [event for event, _ in warnings] == ["config_file_readable_by_others"]
    assert warnings[0][1]["path"] == str(dotenv) and f"chmod 600 {dotenv}" in warnings[0][1]["hint"]
    assert "hunter2" not in repr(warnings)
    warnings.clear()
    load_settings(environ={}, dotenv_path=write(dotenv, "TESTPRESS_PASSWORD=hunter2\n", mode=0o600), warn=warn)
    load_settings(environ={}, dotenv_path=write(dotenv, "TESTPRESS_LOG_LEVEL=debug\n", mode=0o644), warn=warn)
    assert warnings == []


def test_a_dotenv_line_that_cannot_be_parsed_is_warned_not_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []
    dotenv = write(tmp_path / ".env", "TESTPRESS_USERNAME=u\n'broken\nTESTPRESS_LOG_LEVEL=debug\n")
    settings = load_settings(environ={}, dotenv_path=dotenv, warn=lambda event, **kw: warnings.append((event, kw)))
    assert settings.api.username == "u"
    assert [(event, kw["path"]) for event, kw in warnings] == [("dotenv_line_not_parsed", str(dotenv))]
    assert "line 2" in warnings[0][1]["problem"]
    assert capsys.readouterr().err == ""


def test_a_bad_value_in_dotenv_names_the_file_and_variable(tmp_path: Path) -> None:
    dotenv = write(tmp_path / ".env", "TESTPRESS_SYNC_QUEUE_PAGES=many\n")
    with pytest.raises(ConfigError, match=rf"^\.env file {dotenv}: TESTPRESS_SYNC_QUEUE_PAGES='many' is not a valid int \(setting sync.queue_pages\)$"):
        load_settings(environ={}, dotenv_path=dotenv)


def test_dotenv_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"TESTPRESS_USERNAME=\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot be read: it is not UTF-8"):
        load_settings(environ={}, dotenv_path=dotenv)


def test_python_dotenv_is_imported_only_when_there_is_a_dotenv(tmp_path: Path) -> None:
    write(tmp_path / "present.env", "TESTPRESS_LOG_LEVEL=debug\n")
    probe = (
        "import sys; from sync.config import load_settings\n"
        "load_settings(environ={}, dotenv_path=sys.argv[1]); print('dotenv' in sys.modules)"
    )
    seen = [
        subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True, text=True, check=True).stdout.strip()
        for name in ("absent.env", "present.env")
    ]
    assert seen == ["False", "True"]


# --- the password: one slot, two forms, every layer ---------------------------------------

LAYERS = ["file", "dotenv", "env", "flag"]


def password_layers(tmp_path: Path, given: list[tuple[str, str, str]]) -> dict[str, Any]:
    """load_settings arguments where each (layer, form, text) in `given` puts the password
    in that layer: form is "literal" or "file" (a password file holding the text)."""
    toml: list[str] = []
    dotenv: list[str] = []
    kwargs: dict[str, Any] = {"environ": {}, "overrides": {}, "dotenv_path": tmp_path / "absent.env"}
    for layer, form, text in given:
        value = text if form == "literal" else str(write(tmp_path / f"{layer}-password", text + "\n"))
        key, variable, toml_key = {
            "literal": ("api.password", "TESTPRESS_PASSWORD", "password"),
            "file": ("api.password_file", "TESTPRESS_PASSWORD_FILE", "password_file"),
        }[form]
        if layer == "file":
            toml.append(f"{toml_key} = {json.dumps(value)}")
        elif layer == "dotenv":
            dotenv.append(f"{variable}={value}")
        elif layer == "env":
            kwargs["environ"][variable] = value
        else:
            kwargs["overrides"][key] = value
    if toml:
        kwargs["config_path"] = str(write(tmp_path / "c.toml", "[testpress]\n" + "\n".join(toml) + "\n"))
    if dotenv:
        kwargs["dotenv_path"] = write(tmp_path / ".env", "\n".join(dotenv) + "\n")
    return kwargs


def expected_source(layer: str, form: str, kwargs: dict[str, Any]) -> str:
    variable = "TESTPRESS_PASSWORD" if form == "literal" else "TESTPRESS_PASSWORD_FILE"
    flag = "--password" if form == "literal" else "--password-file"
    return {
        "file": f"file {kwargs.get('config_path')}",
        "dotenv": f".env {kwargs['dotenv_path']}",
        "env": f"env {variable}",
        "flag": f"flag {flag}",
    }[layer]


@pytest.mark.parametrize(("low_form", "high_form"), list(itertools.product(["literal", "file"], repeat=2)))
@pytest.mark.parametrize(("low", "high"), list(itertools.combinations(LAYERS, 2)))
def test_a_higher_layers_password_beats_a_lower_one_in_either_form(
    tmp_path: Path, low: str, high: str, low_form: str, high_form: str
) -> None:
    kwargs = password_layers(tmp_path, [(low, low_form, "from-low"), (high, high_form, "from-high")])
    settings, sources = load_settings_with_sources(**kwargs)
    assert settings.api.password == "from-high"
    assert sources["api.password"] == expected_source(high, high_form, kwargs)


@pytest.mark.parametrize("layer", LAYERS)
def test_within_one_layer_the_literal_password_beats_the_password_file(tmp_path: Path, layer: str) -> None:
    for given in ([(layer, "file", "from-file"), (layer, "literal", "literal")], [(layer, "literal", "literal"), (layer, "file", "from-file")]):
        kwargs = password_layers(tmp_path, given)
        settings, sources = load_settings_with_sources(**kwargs)
        assert settings.api.password == "literal" and sources["api.password"] == expected_source(layer, "literal", kwargs)


def test_the_flag_password_file_beats_the_environment_password(tmp_path: Path) -> None:
    secret = write(tmp_path / "password", "from-flag-file\n")
    settings, sources = load_settings_with_sources(
        environ={"TESTPRESS_PASSWORD": "from-env"}, overrides={"api.password_file": str(secret)}
    )
    assert settings.api.password == "from-flag-file" and sources["api.password"] == "flag --password-file"


def test_only_the_winning_password_file_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    settings = load_settings(environ={"TESTPRESS_PASSWORD_FILE": str(missing), "TESTPRESS_PASSWORD": "x"})
    assert settings.api.password == "x"
    config = write(tmp_path / "c.toml", f'[testpress]\npassword_file = "{missing}"\n')
    assert load_settings(config_path=str(config), environ={"TESTPRESS_PASSWORD": "y"}).api.password == "y"
    with pytest.raises(ConfigError, match=rf"password file {missing} cannot be read: .* \(set by flag --password-file; env TESTPRESS_PASSWORD_FILE\)"):
        load_settings(environ={"TESTPRESS_PASSWORD": "z"}, overrides={"api.password_file": str(missing)})


def test_the_webhook_private_key_is_one_slot_like_the_password(tmp_path: Path) -> None:
    key_file = write(tmp_path / "private-key", "from-file\n")
    config = write(tmp_path / "c.toml", '[webhook]\nprivate_key = "from-toml"\n')
    settings, sources = load_settings_with_sources(
        config_path=str(config), environ={"TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE": str(key_file)}
    )
    assert settings.webhook.private_key == "from-file" and sources["webhook.private_key"] == "env TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE"
    both = {"TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE": str(tmp_path / "absent"), "TESTPRESS_WEBHOOK_PRIVATE_KEY": "literal"}
    assert load_settings(environ=both).webhook.private_key == "literal"  # only the winning file is read
    with pytest.raises(ConfigError, match="private key file .* cannot be read: .*env TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE"):
        load_settings(environ={"TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="TESTPRESS_WEBHOOK_PRIVATE_KEY is not set .*TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE"):
        load_settings(environ={"TESTPRESS_WEBHOOK_PUBLIC_KEY": "public"}).require_webhook()


# --- sources and the report ---------------------------------------------------------------


def test_sources_name_each_layer(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[http]\ntimeout = 5\n[database]\nurl = "sqlite:///f.db"\n')
    dotenv = write(tmp_path / ".env", "TESTPRESS_SYNC_COURSE=IBPS\n")
    _, sources = load_settings_with_sources(
        config_path=str(config),
        environ={"TESTPRESS_BATCH_SIZE": "9"},
        overrides={"log.format": "json", "http.concurrency": 3, "api.username": None},
        dotenv_path=dotenv,
    )
    assert set(sources) == set(SPECS)
    assert sources["http.timeout"] == sources["database_url"] == f"file {config}"
    assert sources["sync.course"] == f".env {dotenv}"
    assert sources["sync.batch_size"] == "env TESTPRESS_BATCH_SIZE"
    assert sources["log.format"] == "flag --log-format"
    assert sources["http.concurrency"] == "flag --concurrency"
    assert sources["api.username"] == sources["http.max_attempts"] == "default"  # a None flag is no flag


def test_flag_names_match_the_command_line() -> None:
    assert [flag_name(SPECS[key]) for key in ("database_url", "api.base_url", "log.level", "sync.batch_size")] == [
        "--database-url", "--base-url", "--log-level", "--batch-size",
    ]
    assert flag_name(PASSWORD_FILE) == "--password-file"


def test_the_report_lists_every_setting_and_redacts_secrets(tmp_path: Path) -> None:
    environ = {
        "TESTPRESS_PASSWORD": "hunter2",
        "TESTPRESS_DATABASE_URL": "postgresql://sync:db-s3cret@db.internal:5432/warehouse",
        "TESTPRESS_HTTP_TIMEOUT": "12.5",
    }
    settings, sources = load_settings_with_sources(environ=environ)
    rows = settings_report(settings, sources)
    by_setting = {row["setting"]: row for row in rows}
    assert list(by_setting) == list(SPECS) and all(set(row) == {"setting", "value", "source", "env"} for row in rows)
    assert by_setting["http.timeout"] == {"setting": "http.timeout", "value": 12.5, "source": "env TESTPRESS_HTTP_TIMEOUT", "env": "TESTPRESS_HTTP_TIMEOUT"}
    assert by_setting["api.password"]["value"] == REDACTED and by_setting["api.password"]["source"] == "env TESTPRESS_PASSWORD"
    assert by_setting["database_url"]["value"] == f"postgresql://sync:{REDACTED}@db.internal:5432/warehouse"
    assert by_setting["api.username"]["value"] is None and by_setting["sync.course"]["value"] is None  # unset
    table = format_settings_report(rows)
    for text in (json.dumps(rows), table):
        assert "hunter2" not in text and "db-s3cret" not in text
    unset = settings_report(load_settings(environ={}), {})
    assert {row["setting"]: row["value"] for row in unset}["api.password"] is None  # unset is visible as unset
    assert "unset" in format_settings_report(unset).splitlines()[3]


def test_the_report_table_is_aligned() -> None:
    settings, sources = load_settings_with_sources(environ={"TESTPRESS_CONCURRENCY": "4"})
    lines = format_settings_report(settings_report(settings, sources)).splitlines()
    assert lines[0].split() == ["setting", "value", "source", "env"]
    assert len(lines) == len(SPECS) + 1
    starts = [lines[0].index(column) for column in ("value", "source", "env")]
    for line in lines[1:]:
        assert all(line[start - 2 : start] == "  " and line[start] != " " for start in starts), line
        assert line == line.rstrip()
    [line] = [line for line in lines if line.startswith("http.concurrency")]
    assert "env TESTPRESS_CONCURRENCY" in line and line.endswith("TESTPRESS_HTTP_CONCURRENCY")


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True), ("api_token", True), ("private_key", True), ("client_secret", True),
        ("password_file", False), ("private_key_path", False), ("username", False), ("timeout", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert _is_secret(name) is secret
    assert [spec.key for spec in SPECS.values() if spec.secret] == ["api.password", "sync.pii_salt", "webhook.private_key"]
