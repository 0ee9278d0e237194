"""``--metrics-bind HOST:PORT`` and its token, checked before anything starts (no aiohttp imported here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedctl.errors import ConfigError
from fedctl.security import is_loopback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpBind:
    """Where the listener binds, and the token its requests must carry (None: none needed)."""

    host: str
    port: int
    token: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_http_bind(text: str, token_file: Path | None, insecure: bool) -> HttpBind:
    """``--metrics-bind HOST:PORT`` with its ``--metrics-token``/``--metrics-insecure``, checked before anything
    starts; ConfigError names the cause and the fix."""
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--metrics-bind {text!r} is not HOST:PORT",
                          "pass e.g. --metrics-bind 127.0.0.1:9464 (port 0: any free port)")
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--metrics-token {token_file} cannot be read: {getattr(err, 'strerror', None) or err}",
                              "pass a readable file holding the bearer token") from None
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ConfigError(f"--metrics-token {token_file} must hold one token of at least 16 characters, no spaces",
                              "write one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`")
    elif not insecure and not is_loopback(host):
        raise ConfigError(f"--metrics-bind {text} is reachable from other machines and has no token",
                          "pass --metrics-token FILE (requests then need 'Authorization: Bearer <token>'), "
                          "--metrics-insecure to serve it openly, or bind 127.0.0.1")
    if insecure and token is None and not is_loopback(host):
        log.warning("serving metrics on %s without a token (--metrics-insecure): anyone who reaches it can read "
                    "them", text)
    return HttpBind(host, int(port_text), token)
