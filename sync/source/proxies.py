"""Which forward proxy a request goes through, if any.

`[http] proxy` (TESTPRESS_HTTP_PROXY), when set, carries every request. Otherwise the
standard variables apply as Python's urllib reads them (getproxies and proxy_bypass, as
aiohttp's own `trust_env` does; on macOS and Windows they also read the system's proxy
settings): HTTP_PROXY for http:// URLs, HTTPS_PROXY for https:// ones (upper or lower
case), and NO_PROXY's hosts and domain suffixes go direct.

Why not aiohttp's `trust_env=True`, which reads the same variables: it also reads
~/.netrc (or $NETRC), and a matching or `default` entry there (written for curl, say)
sends its Basic credentials to the API with the login, and makes every request that
carries our JWT fail ("Cannot combine AUTHORIZATION header with AUTH argument", aiohttp
3.14, checked). It also reads the environment and ~/.netrc again, in a worker thread,
for every request: ~0.3 ms of CPU each (measured), more than the rest of an exchange.
Here the environment is read once, and each origin's answer is kept.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit
from urllib.request import getproxies, proxy_bypass

from sync.errors import ConfigError

# Not part of the API: which variable names a proxy, for messages.
_VARIABLE = {"http": "HTTP_PROXY", "https": "HTTPS_PROXY"}


class Proxies:
    """The proxy of each URL: `configured` for all of them when set, else the environment's."""

    def __init__(self, configured: str | None) -> None:
        self._configured = _proxy_url(configured, "http.proxy (TESTPRESS_HTTP_PROXY)") if configured else None
        self._environment: dict[str, str] = {}
        if self._configured is None:
            found = getproxies()
            for scheme, variable in _VARIABLE.items():
                if found.get(scheme):
                    self._environment[scheme] = _proxy_url(found[scheme], variable)
        self._by_origin: dict[str, str | None] = {}

    @property
    def passwords(self) -> set[str]:
        """The password of every proxy a request may go through, as written and decoded:
        secrets for the log redactor."""
        proxies = [self._configured] if self._configured else list(self._environment.values())
        written = {urlsplit(proxy).password for proxy in proxies}
        return {text for password in written if password for text in (password, unquote(password))}

    def for_url(self, url: str) -> str | None:
        """The proxy for `url` (an absolute http(s) URL), or None to connect directly."""
        if self._configured is not None:
            return self._configured
        if not self._environment:
            return None
        # The origin ("https://host:port") is all that decides; it is cut out by hand
        # because this runs for every request.
        end = url.find("/", url.find("//") + 2)
        origin = url if end < 0 else url[:end]
        if origin not in self._by_origin:
            self._by_origin[origin] = self._from_environment(origin)
        return self._by_origin[origin]

    def describe(self, url: str) -> str:
        """How `url` is reached, for the doctor: "directly" or "through proxy …" (no password)."""
        proxy = self.for_url(url)
        if proxy is None:
            return "directly"
        source = "http.proxy" if self._configured is not None else _VARIABLE[urlsplit(url).scheme]
        parts = urlsplit(proxy)
        return f"through proxy {parts.scheme}://{parts.netloc.rpartition('@')[2]} ({source})"

    def _from_environment(self, origin: str) -> str | None:
        parts = urlsplit(origin)
        proxy = self._environment.get(parts.scheme)
        if proxy is None or (parts.hostname and proxy_bypass(parts.hostname)):
            return None
        return proxy


def _proxy_url(value: str, source: str) -> str:
    """`value` as a proxy URL; "host:port" alone means http://host:port, as curl reads it.
    A ConfigError, without the password, for anything else."""
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        shown = text.rpartition("@")[2]  # whatever precedes an @ may be a password
        raise ConfigError(f"{source}: {shown!r} is not a proxy URL like http://[user:password@]host:port")
    return text
