"""Settings: built-in defaults < TOML file < environment < command-line flags.

Everything is validated here, once; the rest of the code receives a frozen Settings and
never reads the environment itself.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sync.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///testpress.db"


@dataclass(frozen=True)
class ApiSettings:
    base_url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    api_version: str = "v2.1"
    ca_bundle: str | None = None  # PEM file of extra trusted CAs; TLS checks are always on


@dataclass(frozen=True)
class HttpSettings:
    concurrency: int = 16  # requests in flight at most
    timeout: float = 30.0  # seconds for one request, connect to last byte
    max_attempts: int = 6  # tries of one request, the first included
    max_retry_wait: float = 300.0  # seconds of waiting between tries of one request, in all
    backoff_initial: float = 0.5  # first backoff, doubled each retry, with jitter
    backoff_max: float = 30.0  # longest single backoff (Retry-After is honoured as given)


@dataclass(frozen=True)
class SyncSettings:
    batch_size: int = 500  # rows per upsert statement and per transaction
    commit_interval: float = 1.0  # seconds rows may wait for their batch to fill
    queue_pages: int = 64  # pages buffered between the fetchers and the writer
    database_retry_seconds: float = 60.0  # how long a lost database connection is retried
    course: str | None = None  # the API's own course filter (a course name)


@dataclass(frozen=True)
class LogSettings:
    format: str = "auto"  # auto: readable on a terminal, JSON lines otherwise
    level: str = "info"


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = ApiSettings()
    http: HttpSettings = HttpSettings()
    sync: SyncSettings = SyncSettings()
    log: LogSettings = LogSettings()
    database_url: str = DEFAULT_DATABASE_URL

    def require_api(self) -> Settings:
        """The API settings a sync needs; raises ConfigError naming the first one missing."""
        for name, env in (
            ("base_url", "TESTPRESS_BASE_URL"),
            ("username", "TESTPRESS_USERNAME"),
            ("password", "TESTPRESS_PASSWORD"),
        ):
            if not getattr(self.api, name):
                raise ConfigError(f"{env} is not set (or [testpress] {name} in the config file)")
        return self


# Environment variables and the settings they set.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "TESTPRESS_BASE_URL": ("api", "base_url"),
    "TESTPRESS_USERNAME": ("api", "username"),
    "TESTPRESS_PASSWORD": ("api", "password"),
    "TESTPRESS_CA_BUNDLE": ("api", "ca_bundle"),
    "TESTPRESS_DATABASE_URL": ("", "database_url"),
    "TESTPRESS_CONCURRENCY": ("http", "concurrency"),
    "TESTPRESS_BATCH_SIZE": ("sync", "batch_size"),
    "TESTPRESS_LOG_FORMAT": ("log", "format"),
    "TESTPRESS_LOG_LEVEL": ("log", "level"),
}
# TOML sections and the settings group each fills.
SECTIONS = {"testpress": "api", "http": "http", "sync": "sync", "log": "log", "database": ""}


def load_settings(
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: Any = None,
) -> Settings:
    """Settings from every layer. `overrides` maps "group.name" (or "database_url") to
    values from command-line flags; None values are ignored."""
    environ = os.environ if environ is None else environ
    layers: dict[str, Any] = {}
    path = config_path or environ.get("TESTPRESS_CONFIG")
    if path:
        layers.update(_read_toml(Path(path), warn))
    for variable, (group, name) in ENVIRONMENT.items():
        if environ.get(variable):
            layers[_key(group, name)] = environ[variable]
    password_file = environ.get("TESTPRESS_PASSWORD_FILE") or layers.pop("api.password_file", None)
    for key, value in (overrides or {}).items():
        if key == "api.password_file":
            password_file = value or password_file
        elif value is not None:
            layers[key] = value
    if password_file and not environ.get("TESTPRESS_PASSWORD"):
        layers["api.password"] = _read_password_file(Path(password_file))
    return validate(_build(layers))


def _key(group: str, name: str) -> str:
    return f"{group}.{name}" if group else name


def _read_toml(path: Path, warn: Any) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for section, values in document.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"config file {path}: unknown section [{section}]")
        group = SECTIONS[section]
        for name, value in values.items():
            if section == "database":
                if name != "url":
                    raise ConfigError(f"config file {path}: unknown key {name!r} in [database]")
                flat["database_url"] = value
            else:
                flat[_key(group, name)] = value
    if "api.password" in flat and warn is not None and _readable_by_others(path):
        warn(
            "config_file_readable_by_others",
            path=str(path),
            hint=f"it holds a password: chmod 600 {path}",
        )
    return flat


def _readable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))


def _read_password_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise ConfigError(f"TESTPRESS_PASSWORD_FILE {path} cannot be read: {exc.strerror}") from None


def _build(layers: Mapping[str, Any]) -> Settings:
    groups: dict[str, dict[str, Any]] = {"api": {}, "http": {}, "sync": {}, "log": {}}
    top: dict[str, Any] = {}
    for key, value in layers.items():
        group, _, name = key.rpartition(".")
        (groups[group] if group else top)[name] = value
    built: dict[str, Any] = {}
    for group_name, values in groups.items():
        cls = type(getattr(Settings(), group_name))
        built[group_name] = cls(**_coerce(cls, group_name, values))
    return Settings(**built, **_coerce(Settings, "", top))


def _coerce(cls: Any, group: str, values: dict[str, Any]) -> dict[str, Any]:
    """Values from TOML or the environment, converted to the field's type, named on error."""
    known = {f.name: f for f in fields(cls) if f.name not in ("api", "http", "sync", "log")}
    defaults = cls()
    result: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"unknown setting {_key(group, name)!r}")
        kind = type(getattr(defaults, name))
        try:
            if isinstance(value, bool):  # TOML `true` is not a number of anything
                raise ValueError
            result[name] = value if kind is type(None) else kind(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"setting {_key(group, name)!r}: {value!r} is not a valid {kind.__name__}"
            ) from None
    return result


def validate(settings: Settings) -> Settings:
    """Reject values that cannot work, naming the setting."""
    http, sync, log = settings.http, settings.sync, settings.log
    checks = [
        (http.concurrency >= 1, "http.concurrency must be at least 1"),
        (http.timeout > 0, "http.timeout must be positive"),
        (http.max_attempts >= 1, "http.max_attempts must be at least 1"),
        (http.max_retry_wait >= 0, "http.max_retry_wait cannot be negative"),
        (http.backoff_initial >= 0, "http.backoff_initial cannot be negative"),
        (http.backoff_max >= 0, "http.backoff_max cannot be negative"),
        (sync.batch_size >= 1, "sync.batch_size must be at least 1"),
        (sync.commit_interval >= 0, "sync.commit_interval cannot be negative"),
        (sync.queue_pages >= 1, "sync.queue_pages must be at least 1"),
        (sync.database_retry_seconds >= 0, "sync.database_retry_seconds cannot be negative"),
        (log.format in ("auto", "console", "json"), "log.format must be auto, console or json"),
        (
            log.level in ("debug", "info", "warning", "error"),
            "log.level must be debug, info, warning or error",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if settings.api.base_url:
        parts = urlsplit(settings.api.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"TESTPRESS_BASE_URL {settings.api.base_url!r} is not an http(s) URL "
                "like https://demo.testpress.in"
            )
        settings = replace(settings, api=replace(settings.api, base_url=settings.api.base_url.rstrip("/")))
    if settings.api.ca_bundle and not Path(settings.api.ca_bundle).is_file():
        raise ConfigError(f"api.ca_bundle {settings.api.ca_bundle} is not a file")
    return settings
