"""The HTTP listener of a broker or a worker (``--metrics-bind HOST:PORT``): ``/metrics`` for Prometheus, and on
a broker the live dashboard (:mod:`fedctl.observe.dashboard`).

aiohttp's server runs on the broker's own event loop, so a scrape reads the broker's state between two of its
steps, never half-way through one. Every route is read-only (GET): nothing on HTTP can change the run. It binds
loopback unless told otherwise; any other address needs a bearer token (``--metrics-token FILE``: requests
without ``Authorization: Bearer <token>`` get 401) or an explicit ``--metrics-insecure``, as ``--bind`` needs CURVE
keys or ``--insecure``. A browser cannot send that header, so the page is opened once as ``/?token=TOKEN``: the
listener answers with an HttpOnly, SameSite=Strict cookie holding the token and a redirect to ``/``, and accepts
the cookie from then on.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fedctl.errors import ConfigError
from fedctl.observe.bind import HttpBind

if TYPE_CHECKING:
    from fedctl.observe.dashboard import Dashboard

log = logging.getLogger(__name__)
REFUSAL_LOG_EVERY_S = 10.0
"""At most one WARNING line per this many seconds for refused HTTP requests (a scanner must not flood the log)."""
TOKEN_COOKIE = "fedctl_token"
SHUTDOWN_S = 2.0
"""How long stopping waits for requests in flight (a dashboard's stream ends at once)."""


class MetricsServer:
    """The aiohttp application and its site, started and stopped with the broker's run."""

    def __init__(self, registry: CollectorRegistry, bind: HttpBind, dashboard: Dashboard | None = None) -> None:
        self.registry = registry
        self.dashboard = dashboard
        self.bind = bind
        self.url = bind.url
        self._runner: web.AppRunner | None = None
        self._last_refusal_log = -1e18
        self.refused = 0
        app = web.Application(client_max_size=1024, middlewares=[self._authorize])
        app.router.add_get("/metrics", self._metrics)
        if dashboard is not None:
            dashboard.routes(app)
        self.app = app

    @web.middleware
    async def _authorize(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        token = self.bind.token
        if token is not None:
            expected = token.encode()
            given = request.headers.get("Authorization", "")
            cookie = request.cookies.get(TOKEN_COOKIE, "")
            offered = request.query.get("token", "")
            if hmac.compare_digest(given.encode(), b"Bearer " + expected) or hmac.compare_digest(cookie.encode(),
                                                                                              expected):
                return await handler(request)
            if offered and hmac.compare_digest(offered.encode(), expected):
                # A browser opening the page with its token: keep it in a cookie and take it out of the address bar.
                response = web.HTTPSeeOther(request.path)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
                return response
            self.refused += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= REFUSAL_LOG_EVERY_S:
                self._last_refusal_log = now
                log.warning("refused an HTTP request for %r from %s: no valid bearer token (%d refused so far)",
                            request.path, request.remote, self.refused)
            return web.Response(status=401, text="401: a valid 'Authorization: Bearer <token>' is needed (a browser: "
                                "open /?token=<token> once)\n", headers={"WWW-Authenticate": 'Bearer realm="fedctl"'})
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> str:
        """Bind and serve; returns the URL (with the port the OS chose for port 0). ConfigError when the address
        cannot be bound."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.bind.host, self.bind.port, reuse_address=True, shutdown_timeout=SHUTDOWN_S)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(f"--metrics-bind {self.bind.host}:{self.bind.port} cannot be bound: "
                              f"{err.strerror or err}", "pass another port, or stop what listens there") from None
        self._runner = runner
        server = site._server  # (aiohttp keeps the bound sockets there; the port of port 0 is only known now)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            port = sockets[0].getsockname()[1]
            self.url = HttpBind(self.bind.host, int(port), self.bind.token).url
        log.info("metrics on %s/metrics%s%s", self.url, "" if self.dashboard is None else f", dashboard on {self.url}/",
                 " (bearer token required)" if self.bind.token else "")
        return self.url

    async def stop(self) -> None:
        if self.dashboard is not None:
            self.dashboard.closing.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
