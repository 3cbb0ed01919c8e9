"""Settings: built-in defaults < TOML file < .env file < environment < command-line flags.

Everything is validated here, once; the rest of the code receives a frozen Settings and
never reads the environment itself.

Names. Every setting has one canonical environment variable, derived from the dataclasses
below (so a field added later gets its variable without anyone keeping a list):

    [testpress] <key>   ->  TESTPRESS_<KEY>            TESTPRESS_BASE_URL, TESTPRESS_PASSWORD
    [<section>] <key>   ->  TESTPRESS_<SECTION>_<KEY>  TESTPRESS_HTTP_TIMEOUT, TESTPRESS_DATABASE_URL

`[testpress] password_file` is TESTPRESS_PASSWORD_FILE, and TESTPRESS_CONFIG names the TOML
file. The names used before this scheme, TESTPRESS_CONCURRENCY and TESTPRESS_BATCH_SIZE,
still work as aliases; when an alias and the canonical name are both set in one layer,
the canonical name wins. An empty variable counts as unset. Values are converted like TOML
values: int, float (finite), bool (true/false/1/0/yes/no), and for an optional string
the empty string means unset.

The .env file. `.env` in the working directory (or `dotenv_path`) is read with
python-dotenv (quotes, `export`, comments and multi-line values as a shell would; no
`${VAR}` expansion, so a password may hold a `$`). It is a layer of its own just below the
real environment: a variable set in both takes the environment's value. A missing file is
no layer. It may also name the TOML file (--config beats TESTPRESS_CONFIG in the
environment, which beats the .env's). Nothing is copied into os.environ, and a .env that
holds a secret and is readable by group or others is warned about like the TOML file.

The password is one slot filled by either `password` or `password_file`. A layer that
gives either replaces whatever a lower layer gave in either form, so `--password-file`
beats TESTPRESS_PASSWORD, and TESTPRESS_PASSWORD beats a password_file in the TOML file.
Within one layer a literal password beats a password file (as TESTPRESS_PASSWORD always
beat TESTPRESS_PASSWORD_FILE). Only the winning file is read. The webhook's private key is
one slot in the same way: `[webhook] private_key` or `private_key_file`
(TESTPRESS_WEBHOOK_PRIVATE_KEY / TESTPRESS_WEBHOOK_PRIVATE_KEY_FILE).

Sources. `load_settings_with_sources` also says which layer set each setting: "default",
"file <path>", ".env <path>", "env TESTPRESS_X" or "flag --x" (the password, when read from
a file, names where the file was given). `settings_report` turns that into rows for
`testpress-sync config`: secrets (keys named like password, token, private_key, secret)
and the password inside a URL show as "[redacted]", unset values as None.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from sync.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///testpress.db"
PREFIX = "TESTPRESS_"
CONFIG_VARIABLE = "TESTPRESS_CONFIG"
REDACTED = "[redacted]"


@dataclass(frozen=True)
class ApiSettings:
    base_url: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    api_version: str = "v2.1"
    ca_bundle: str | None = None  # PEM file of extra trusted CAs; TLS checks are always on
    # auto: the admin API (v2.5, the whole institute) when the login may read it, else the
    # student API (v2.1, the login's own attempts); admin / student force one.
    source: str = "auto"


@dataclass(frozen=True)
class HttpSettings:
    concurrency: int = 16  # requests in flight at most
    timeout: float = 30.0  # seconds for one request, connect to last byte
    max_attempts: int = 6  # tries of one request, the first included
    max_retry_wait: float = 300.0  # seconds of waiting between tries of one request, in all
    backoff_initial: float = 0.5  # first backoff, doubled each retry, with jitter
    backoff_max: float = 30.0  # longest single backoff (Retry-After is honoured as given)
    proxy: str | None = None  # http(s)://[user:pass@]host:port; else HTTP(S)_PROXY / NO_PROXY


@dataclass(frozen=True)
class SyncSettings:
    batch_size: int = 500  # rows per upsert statement and per transaction
    commit_interval: float = 1.0  # seconds rows may wait for their batch to fill
    queue_pages: int = 64  # pages buffered between the fetchers and the writer, per resource
    # ... and items in them: an admin page holds 200, and memory follows the items.
    queue_items: int = 2000
    database_retry_seconds: float = 60.0  # how long a lost database connection is retried
    course: str | None = None  # the API's own course filter (a course name)
    # Admin runs: a full walk (the only kind that marks rows deleted) when the last one is
    # older than this; the other nights read only what can have changed.
    full_every: str = "7d"
    # How far before the last run's start a nightly run re-reads attempts: "auto" is the
    # longest stored exam duration plus an hour (at least 6 hours), or a duration ("12h").
    lookback: str = "auto"
    pii: str = "keep"  # personal data (e-mail, phone, birth date, address…): keep, hash or drop
    pii_salt: str | None = field(default=None, repr=False)  # for pii = "hash": keep it secret
    # Admin runs: also read each new or changed attempt's detail (sections, subjects,
    # difficulty levels): one request per such attempt.
    attempt_details: bool = False


@dataclass(frozen=True)
class LogSettings:
    format: str = "auto"  # auto: readable on a terminal, JSON lines otherwise
    level: str = "info"


@dataclass(frozen=True)
class WebhookSettings:
    host: str = "127.0.0.1"  # where `testpress-sync webhook` listens (behind a TLS reverse proxy)
    port: int = 8080
    public_key: str = ""  # the institute's public key: every delivery's `key`
    private_key: str = field(default="", repr=False)  # signs deliveries (HMAC-SHA512): secret
    max_body_bytes: int = 256 * 1024  # a longer delivery is refused (413) unread
    commit_timeout: float = 10.0  # seconds a delivery waits for its commit before a 503


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = ApiSettings()
    http: HttpSettings = HttpSettings()
    sync: SyncSettings = SyncSettings()
    log: LogSettings = LogSettings()
    webhook: WebhookSettings = WebhookSettings()
    database_url: str = DEFAULT_DATABASE_URL  # [database] url: top-level fields are <section>_<key>
    database_schema: str | None = None  # [database] schema: PostgreSQL schema of the tool's tables

    def require_api(self) -> Settings:
        """The API settings a sync needs; raises ConfigError naming the first one missing."""
        for name in ("base_url", "username", "password"):
            if not getattr(self.api, name):
                variable = SPECS[f"api.{name}"].env
                if name == "password":  # the password has a second form, as good as the first
                    raise ConfigError(
                        f"{variable} is not set (or {PASSWORD_FILE.env}, "
                        "or [testpress] password / password_file in the config file)"
                    )
                raise ConfigError(f"{variable} is not set (or [testpress] {name} in the config file)")
        return self

    def require_webhook(self) -> Settings:
        """The keys the webhook receiver verifies deliveries with; raises ConfigError naming
        the first one missing."""
        if not self.webhook.public_key:
            raise ConfigError(f"{SPECS['webhook.public_key'].env} is not set (or [webhook] public_key in the config file)")
        if not self.webhook.private_key:
            raise ConfigError(
                f"{SPECS['webhook.private_key'].env} is not set (or {PRIVATE_KEY_FILE.env}, "
                "or [webhook] private_key / private_key_file in the config file)"
            )
        return self


# --- the table of settings, derived from the dataclasses ----------------------------------


@dataclass(frozen=True)
class SettingSpec:
    """One setting: where it lives in each layer and what it holds."""

    key: str  # "http.timeout" or "database_url": the key of overrides, sources and messages
    section: str  # its TOML section
    name: str  # its key in that section
    env: str  # its canonical environment variable
    kind: type  # str, int, float or bool
    optional: bool  # None is a value: an empty string means unset
    secret: bool  # never shown in a report or an error message
    aliases: tuple[str, ...] = ()  # older variable names, below `env` within a layer


# The TOML section of each settings group; a group not named here is its own section.
_SECTION_OF_GROUP = {"api": "testpress"}
# Variables from before the TESTPRESS_<SECTION>_<KEY> scheme: kept working. The one later
# addition is the short name the attempt-details issue published for its setting.
ALIASES: dict[str, str] = {
    "TESTPRESS_CONCURRENCY": "http.concurrency",
    "TESTPRESS_BATCH_SIZE": "sync.batch_size",
    "TESTPRESS_ATTEMPT_DETAILS": "sync.attempt_details",  # the name the details issue asked for
}
# Keys whose values are secret. A *_file / *_path key holds where a secret is, not the secret.
_SECRET_WORDS = ("password", "token", "private_key", "secret", "salt")
# Flags are --<key>, except for groups whose keys mean little alone (--log-format, not --format).
_FLAGS_WITH_GROUP = {"log"}


def _env_name(section: str, name: str) -> str:
    # [testpress] keys go without the section: TESTPRESS_TESTPRESS_BASE_URL says nothing more.
    middle = "" if section == "testpress" else f"{section.upper()}_"
    return f"{PREFIX}{middle}{name.upper()}"


def _is_secret(name: str) -> bool:
    return any(word in name for word in _SECRET_WORDS) and not name.endswith(("_file", "_path"))


def _kind_of(annotation: Any) -> tuple[type, bool]:
    """(type, optional) of a field annotation such as `float` or `str | None`."""
    optional = False
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        optional = len(members) < len(get_args(annotation))
        annotation = members[0] if len(members) == 1 else annotation
    if annotation not in (str, int, float, bool):
        # A new kind of setting needs its conversion written first; fail at import, not at 2 a.m.
        raise TypeError(f"settings field of unsupported type {annotation!r}")
    return annotation, optional


def _spec(key: str, section: str, name: str, annotation: Any) -> SettingSpec:
    kind, optional = _kind_of(annotation)
    aliases = tuple(variable for variable, target in ALIASES.items() if target == key)
    return SettingSpec(key, section, name, _env_name(section, name), kind, optional, _is_secret(name), aliases)


def _derive_specs() -> dict[str, SettingSpec]:
    specs: dict[str, SettingSpec] = {}
    hints = get_type_hints(Settings)
    for item in fields(Settings):
        group_cls = hints[item.name]
        if is_dataclass(group_cls):
            section = _SECTION_OF_GROUP.get(item.name, item.name)
            group_hints = get_type_hints(group_cls)
            for member in fields(group_cls):
                key = f"{item.name}.{member.name}"
                specs[key] = _spec(key, section, member.name, group_hints[member.name])
        else:
            section, _, name = item.name.partition("_")
            specs[item.name] = _spec(item.name, section, name, group_cls)
    return specs


def _check_unique(specs: Mapping[str, SettingSpec]) -> None:
    """Two settings must never answer to one variable or one TOML key (say a [testpress]
    key named http_timeout): the table is derived, so this is where a clash would show."""
    variables = [CONFIG_VARIABLE] + [name for spec in specs.values() for name in (spec.env, *spec.aliases)]
    places = [(spec.section, spec.name) for spec in specs.values()]
    if len(set(variables)) != len(variables) or len(set(places)) != len(places):
        raise RuntimeError("two settings share an environment variable or a TOML key")


SPECS: dict[str, SettingSpec] = _derive_specs()
# Not fields of Settings: each file is read into the secret it holds (module doc).
PASSWORD_FILE = _spec("api.password_file", "testpress", "password_file", str | None)
PRIVATE_KEY_FILE = _spec("webhook.private_key_file", "webhook", "private_key_file", str | None)
_SECRET_FILES: dict[str, SettingSpec] = {"api.password": PASSWORD_FILE, "webhook.private_key": PRIVATE_KEY_FILE}
_INPUTS: dict[str, SettingSpec] = {**SPECS, **{spec.key: spec for spec in _SECRET_FILES.values()}}
_check_unique(_INPUTS)
# TOML sections and the settings group each fills ("" for top-level fields of Settings).
SECTIONS: dict[str, str] = {spec.section: spec.key.rpartition(".")[0] for spec in SPECS.values()}
# Every variable read, canonical names and aliases, and the setting it sets.
ENVIRONMENT: dict[str, str] = {
    variable: spec.key for spec in _INPUTS.values() for variable in (spec.env, *spec.aliases)
}


def flag_name(spec: SettingSpec) -> str:
    """The command-line flag that sets `spec` in sync.cli (whether or not cli offers it)."""
    group, _, name = spec.key.rpartition(".")
    words = f"{group}_{name}" if group in _FLAGS_WITH_GROUP else name
    return "--" + words.replace("_", "-")


# --- loading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Given:
    """A value one layer gave, already converted, and the layer that gave it."""

    value: Any
    source: str


Layer = dict[str, _Given]
Warn = Callable[..., Any]


def load_settings(
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: Warn | None = None,
    dotenv_path: str | Path | None = None,
) -> Settings:
    """Settings from every layer. `overrides` maps "group.name" (or "database_url", or
    "api.password_file") to values from command-line flags; None values are ignored.
    `dotenv_path` defaults to .env in the working directory; a missing file is no layer."""
    settings, _ = load_settings_with_sources(
        config_path=config_path, environ=environ, overrides=overrides, warn=warn, dotenv_path=dotenv_path
    )
    return settings


def load_settings_with_sources(
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: Warn | None = None,
    dotenv_path: str | Path | None = None,
) -> tuple[Settings, dict[str, str]]:
    """load_settings, and for each setting key the layer that set it (see the module doc)."""
    environ = os.environ if environ is None else environ
    dotenv_file = _default_dotenv() if dotenv_path is None else Path(dotenv_path)
    dotenv = _read_dotenv(dotenv_file, warn) if dotenv_file is not None else {}
    layers: list[Layer] = []
    path = config_path or _nonempty(environ, CONFIG_VARIABLE) or _nonempty(dotenv, CONFIG_VARIABLE)
    if path:
        layers.append(_read_toml(Path(path), warn))
    if dotenv:
        layers.append(_variables_layer(dotenv, lambda _: f".env {dotenv_file}", f".env file {dotenv_file}: "))
    layers.append(_variables_layer(environ, lambda variable: f"env {variable}", ""))
    layers.append(_flags_layer(overrides or {}))
    given = _fill_secret_files(_merge(layers))
    sources = {key: given[key].source if key in given else "default" for key in SPECS}
    settings = _build({key: item.value for key, item in given.items()})
    return validate(settings, sources), sources


def _default_dotenv() -> Path | None:
    try:
        return Path.cwd() / ".env"
    except OSError:  # the working directory was deleted under us: there is no .env in it
        return None


def _nonempty(variables: Mapping[str, str | None], name: str) -> str | None:
    return variables.get(name) or None


def _merge(layers: list[Layer]) -> Layer:
    """Higher layers win key by key; the two forms of a secret (the password, the webhook's
    private key) are one key (module doc)."""
    merged: Layer = {}
    for layer in layers:
        layer = dict(layer)
        for secret, secret_file in _SECRET_FILES.items():
            if secret in layer:
                layer.pop(secret_file.key, None)  # within a layer, the literal secret wins
            if secret in layer or secret_file.key in layer:
                merged.pop(secret, None)
                merged.pop(secret_file.key, None)
        merged.update(layer)
    return merged


def _fill_secret_files(given: Layer) -> Layer:
    """Read each secret's file that won, and only that one: a lower layer's file may not exist."""
    for secret, secret_file in _SECRET_FILES.items():
        chosen = given.pop(secret_file.key, None)
        if chosen is not None:
            text = _read_secret_file(Path(chosen.value), chosen.source, secret_file)
            given[secret] = _Given(text, chosen.source)
    return given


# --- the layers -----------------------------------------------------------------------------


def _read_toml(path: Path, warn: Warn | None) -> Layer:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    by_place = {(spec.section, spec.name): spec for spec in _INPUTS.values()}
    layer: Layer = {}
    for section, values in document.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"config file {path}: unknown section [{section}]")
        for name, value in values.items():
            spec = by_place.get((section, name))
            if spec is None:
                raise ConfigError(f"config file {path}: unknown setting '{section}.{name}'")
            try:
                converted = _convert(spec, value)
            except ValueError as exc:
                raise ConfigError(
                    f"config file {path}: setting {spec.key!r}: {_shown(spec, value)} {exc} (env {spec.env})"
                ) from None
            if converted is not None:
                layer[spec.key] = _Given(converted, f"file {path}")
    _warn_if_secrets_readable(path, _secret_keys(list(layer)), warn)
    return layer


def _read_dotenv(path: Path, warn: Warn | None) -> dict[str, str]:
    """The .env file's variables, empty ones dropped; {} when there is no such file."""
    if not path.is_file():
        return {}
    # Imported here: python-dotenv costs ~15 ms on a cold start, paid only by .env users.
    from dotenv import dotenv_values

    try:
        with _dotenv_parse_problems() as problems:
            values = dotenv_values(path, interpolate=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8"
        raise ConfigError(f".env file {path} cannot be read: {reason}") from None
    if warn is not None:
        for problem in problems:
            warn("dotenv_line_not_parsed", path=str(path), problem=problem)
    variables = {name: value for name, value in values.items() if value}
    _warn_if_secrets_readable(path, _secret_keys([ENVIRONMENT.get(name, "") for name in variables]), warn)
    return variables


@contextmanager
def _dotenv_parse_problems() -> Iterator[list[str]]:
    """python-dotenv skips a line it cannot parse and says so on its stdlib logger; catch
    that and hand it to `warn` instead, for a skipped TESTPRESS_PASSWORD line is otherwise
    only seen as a refused login."""
    problems: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        problems.append(record.getMessage())
        return False  # not printed on stderr as an unstructured line

    logger = logging.getLogger("dotenv.main")
    logger.addFilter(keep)
    try:
        yield problems
    finally:
        logger.removeFilter(keep)


def _variables_layer(variables: Mapping[str, str], source_of: Callable[[str], str], where: str) -> Layer:
    """The settings set by environment variables, or a .env file's. `source_of(variable)` is
    the source to report; `where` starts an error message ("" for the environment)."""
    layer: Layer = {}
    for spec in _INPUTS.values():
        # The canonical name first: it wins over an alias set beside it.
        variable = next((name for name in (spec.env, *spec.aliases) if variables.get(name)), None)
        if variable is None:
            continue
        text = variables[variable]
        try:
            converted = _convert(spec, text)
        except ValueError as exc:
            also = f", env {spec.env}" if variable != spec.env else ""
            raise ConfigError(f"{where}{variable}={_shown(spec, text)} {exc} (setting {spec.key}{also})") from None
        if converted is not None:
            layer[spec.key] = _Given(converted, source_of(variable))
    return layer


def _flags_layer(overrides: Mapping[str, Any]) -> Layer:
    layer: Layer = {}
    for key, value in overrides.items():
        spec = _INPUTS.get(key)
        if spec is None:
            raise ConfigError(f"unknown setting {key!r}")
        if value is None:
            continue
        try:
            converted = _convert(spec, value)
        except ValueError as exc:
            raise ConfigError(f"flag {flag_name(spec)} {_shown(spec, value)} {exc} (setting {key})") from None
        if converted is not None:
            layer[key] = _Given(converted, f"flag {flag_name(spec)}")
    return layer


# --- values ---------------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _convert(spec: SettingSpec, value: Any) -> Any:
    """`value` from any layer (text from the environment, TOML's own types, a flag's value)
    as the setting's type; None for unset. Raises ValueError with the reason."""
    kind = spec.kind
    if isinstance(value, str):
        if kind is not str:
            value = value.strip()
        if value == "" and (spec.optional or kind is not str):
            return None
    if kind is bool:
        return _to_bool(value)
    if isinstance(value, bool):  # TOML `true` is not a number, nor a name
        raise ValueError(f"is not a valid {kind.__name__}")
    try:
        # int accepts no float (2.5 must not become 2 unnoticed), str no float (api_version =
        # 2.10 would read "2.1"); float accepts no inf or nan, which no timeout means.
        if kind is int and isinstance(value, int | str):
            return int(value)
        if kind is float and isinstance(value, int | float | str) and math.isfinite(float(value)):
            return float(value)
        if kind is str and isinstance(value, str | int):
            return str(value)
    except ValueError:
        pass
    hint = " (quote it)" if kind is str and isinstance(value, float) else ""
    raise ValueError(f"is not a valid {kind.__name__}{hint}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in _TRUE + _FALSE:
        raise ValueError("is not a valid bool (true/false, 1/0, yes/no)")
    return text in _TRUE


def _shown(spec: SettingSpec, value: Any) -> str:
    """A value as an error message may show it: a secret is not copied into a log."""
    return REDACTED if spec.secret else repr(value)


def _warn_if_secrets_readable(path: Path, keys: list[str], warn: Warn | None) -> None:
    if keys and warn is not None and _readable_by_others(path):
        warn("config_file_readable_by_others", path=str(path), hint=f"it holds a secret ({', '.join(keys)}): chmod 600 {path}")


def _secret_keys(keys: list[str]) -> list[str]:
    return [key for key in keys if key in SPECS and SPECS[key].secret]


def _readable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))


def _read_secret_file(path: Path, source: str, spec: SettingSpec) -> str:
    what = spec.name.removesuffix("_file").replace("_", " ")  # "password", "private key"
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{what} file {path} cannot be read: {exc.strerror} "
            f"(set by {source}; env {spec.env})"
        ) from None


def _build(values: Mapping[str, Any]) -> Settings:
    """A Settings from converted values keyed like SPECS; the rest keep their defaults."""
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        group, _, name = key.rpartition(".")
        (groups.setdefault(group, {}) if group else top)[name] = value
    defaults = Settings()
    built = {group: replace(getattr(defaults, group), **members) for group, members in groups.items()}
    return replace(defaults, **built, **top)


# --- validation -----------------------------------------------------------------------------


def validate(settings: Settings, sources: Mapping[str, str] | None = None) -> Settings:
    """Reject values that cannot work, naming the setting, its variable and (given
    `sources`) the layer that set it."""
    http, sync, log = settings.http, settings.sync, settings.log
    checks = [
        ("http.concurrency", http.concurrency >= 1, "must be at least 1"),
        ("http.timeout", http.timeout > 0, "must be positive"),
        ("http.max_attempts", http.max_attempts >= 1, "must be at least 1"),
        ("http.max_retry_wait", http.max_retry_wait >= 0, "cannot be negative"),
        ("http.backoff_initial", http.backoff_initial >= 0, "cannot be negative"),
        ("http.backoff_max", http.backoff_max >= 0, "cannot be negative"),
        ("sync.batch_size", sync.batch_size >= 1, "must be at least 1"),
        ("sync.commit_interval", sync.commit_interval >= 0, "cannot be negative"),
        ("sync.queue_pages", sync.queue_pages >= 1, "must be at least 1"),
        ("sync.queue_items", sync.queue_items >= 1, "must be at least 1"),
        ("sync.database_retry_seconds", sync.database_retry_seconds >= 0, "cannot be negative"),
        ("log.format", log.format in ("auto", "console", "json"), "must be auto, console or json"),
        ("log.level", log.level in ("debug", "info", "warning", "error"), "must be debug, info, warning or error"),
        ("api.source", settings.api.source in ("auto", "admin", "student"), "must be auto, admin or student"),
        ("sync.pii", sync.pii in ("keep", "hash", "drop"), "must be keep, hash or drop"),
        ("sync.pii_salt", sync.pii != "hash" or bool(sync.pii_salt), "must be set when sync.pii is hash"),
        ("sync.full_every", _is_duration(sync.full_every), "must be a duration like 7d, 36h or 90m"),
        ("sync.lookback", sync.lookback == "auto" or _is_duration(sync.lookback), "must be auto or a duration like 12h"),
        ("webhook.port", 0 <= settings.webhook.port <= 65535, "must be a TCP port, 0 to 65535 (0: any free one)"),
        ("webhook.max_body_bytes", settings.webhook.max_body_bytes >= 1, "must be at least 1"),
        ("webhook.commit_timeout", settings.webhook.commit_timeout > 0, "must be positive"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            raise ConfigError(f"{key} {requirement} ({_origin(key, sources)})")
    api = settings.api
    if api.base_url:
        parts = urlsplit(api.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"api.base_url {api.base_url!r} is not an http(s) URL like https://demo.testpress.in "
                f"({_origin('api.base_url', sources)})"
            )
        settings = replace(settings, api=replace(api, base_url=api.base_url.rstrip("/")))
    if api.ca_bundle and not Path(api.ca_bundle).is_file():
        raise ConfigError(f"api.ca_bundle {api.ca_bundle} is not a file ({_origin('api.ca_bundle', sources)})")
    return settings


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """"7d", "36h", "90m", "45s" or plain seconds."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 7d, 36h, 90m or 3600")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _is_duration(text: str) -> bool:
    try:
        parse_duration(text)
    except ValueError:
        return False
    return True


def _origin(key: str, sources: Mapping[str, str] | None) -> str:
    """"env TESTPRESS_X", or "set by <layer>; env TESTPRESS_X": where to look, where to fix."""
    env = SPECS[key].env
    source = (sources or {}).get(key, "default")
    if source == "default":
        return f"env {env}"
    if source.startswith("env "):
        return f"set by {source}"
    return f"set by {source}; env {env}"


# --- report ---------------------------------------------------------------------------------


def settings_report(settings: Settings, sources: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per setting: {"setting", "value", "source", "env"}, for `testpress-sync config`.
    A secret's value is "[redacted]" when set; a URL's password too. None means unset."""
    rows: list[dict[str, Any]] = []
    for spec in SPECS.values():
        group, _, name = spec.key.rpartition(".")
        value = getattr(getattr(settings, group) if group else settings, name)
        rows.append(
            {
                "setting": spec.key,
                "value": _reported(spec, value),
                "source": sources.get(spec.key, "default"),
                "env": spec.env,
            }
        )
    return rows


def _reported(spec: SettingSpec, value: Any) -> Any:
    if value is None or value == "":  # an empty base_url or password is as unset as None
        return None
    if spec.secret:
        return REDACTED
    return _without_url_password(value) if isinstance(value, str) else value


def _without_url_password(text: str) -> str:
    """postgresql://sync:pw@db/x as postgresql://sync:[redacted]@db/x: database URLs carry
    passwords, and a settings report is made to be pasted into tickets."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:  # not parseable, so not knowably safe
        return REDACTED
    if password is None:
        return text
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:{REDACTED}@{host}").geturl()


def format_settings_report(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned table with a header line, no trailing spaces."""
    columns = ("setting", "value", "source", "env")
    table = [list(columns)] + [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table)


def _cell(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.isprintable() else repr(value)  # a newline would break the table
    return str(value)
