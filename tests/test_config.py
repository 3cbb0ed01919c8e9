"""Settings layers and validation: defaults < TOML file < environment < flags."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from sync.config import DEFAULT_DATABASE_URL, load_settings
from sync.errors import ConfigError
from sync.sink.database import database_url_from

TOML = """
[testpress]
base_url = "https://file.testpress.in/"
username = "from-file"
password = "file-password"

[http]
concurrency = 3
timeout = 12.5

[database]
url = "sqlite:///from-file.db"
"""


@pytest.fixture(autouse=True)
def _no_dotenv_from_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings reads ./.env by default: a developer's own must not leak into these tests."""
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, text: str = TOML, mode: int = 0o600) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_defaults_without_any_layer() -> None:
    settings = load_settings(environ={})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.http.concurrency == 16 and settings.sync.batch_size == 500


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    environ = {"TESTPRESS_USERNAME": "from-env", "TESTPRESS_CONCURRENCY": "5"}
    settings = load_settings(config_path=str(path), environ=environ, overrides={"http.concurrency": 7, "api.base_url": None})
    assert settings.api.base_url == "https://file.testpress.in"  # trailing slash dropped
    assert settings.api.username == "from-env"
    assert settings.http.concurrency == 7 and settings.http.timeout == 12.5
    assert settings.database_url == "sqlite:///from-file.db"


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")
    settings = load_settings(environ={"TESTPRESS_PASSWORD_FILE": str(secret)})
    assert settings.api.password == "s3cret-from-file"
    assert "s3cret" not in repr(settings)


def test_config_with_password_readable_by_others_warns(tmp_path: Path) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []
    load_settings(config_path=str(write_config(tmp_path, mode=0o644)), environ={}, warn=lambda e, **kw: warnings.append((e, kw)))
    assert warnings and warnings[0][0] == "config_file_readable_by_others"
    assert "chmod 600" in warnings[0][1]["hint"]
    warnings.clear()
    load_settings(config_path=str(write_config(tmp_path, mode=0o600)), environ={}, warn=lambda e, **kw: warnings.append((e, kw)))
    assert warnings == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nconcurrency = 0\n", "http.concurrency must be at least 1"),
        ("[http]\nconcurrency = 'many'\n", "'http.concurrency': 'many' is not a valid int"),
        ("[http]\nretries = 3\n", "unknown setting 'http.retries'"),
        ("[nonsense]\nx = 1\n", "unknown section"),
        ("[testpress]\nbase_url = 'ftp://x'\n", "not an http(s) URL"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[sync]\ncommit_interval = -1\n", "sync.commit_interval cannot be negative"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(config_path=str(write_config(tmp_path, text)), environ={})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_path=str(tmp_path / "nope.toml"), environ={})


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("sqlite:///sync.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u:p@h:5433/db", "postgresql+asyncpg"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_database_urls_users_know_get_the_async_driver(given: str, driver: str) -> None:
    assert database_url_from(given).drivername == driver


@pytest.mark.parametrize("bad", ["mysql://u@h/db", "not a url"])
def test_unsupported_database_urls_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="TESTPRESS_DATABASE_URL"):
        database_url_from(bad)


def test_config_example_documents_every_key_and_loads() -> None:
    from dataclasses import fields as dataclass_fields

    from sync.config import SECTIONS, Settings

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    text = example.read_text()
    groups = {group: section for section, group in SECTIONS.items() if group}
    for group, section in groups.items():
        for item in dataclass_fields(type(getattr(Settings(), group))):
            assert re.search(rf"^#? ?{item.name} = ", text.split(f"[{section}]")[1], re.MULTILINE), f"[{section}] {item.name}"
    assert "[database]" in text and re.search(r"^url = ", text, re.MULTILINE)
    settings = load_settings(config_path=str(example), environ={})
    assert settings.api.base_url == "https://demo.testpress.in" and settings.http.concurrency == 16
