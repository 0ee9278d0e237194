"""The live dashboard a broker serves beside ``/metrics`` (docs/observability.md, "The dashboard").

One page and its assets, all shipped in ``fedctl/observe/static`` (uPlot is vendored: no CDN, no build step), and
two read-only endpoints:

* ``GET /api/status``: the broker's status map (the ``status_reply`` of docs/protocol.md §7.5, plus ``endpoint``,
  ``state_dir`` and ``server_time``) as JSON.
* ``GET /api/stream``: server-sent events, one ``update`` about every second: ``{"status", "rounds", "events",
  "reset"}``. The first after a (re)connect has ``reset: true``, the run's whole round history (read from
  metrics.jsonl at start, then appended as rounds complete) and the recent events; later ones only what is new.

The page's state is built once per tick for every viewer. A viewer that does not read is dropped after
:data:`WRITE_TIMEOUT_S` (aiohttp buffers at most its high-water mark for it), and at most :data:`MAX_STREAMS`
stream at once: neither a slow phone nor a crowd delays the broker's loop for more than one JSON encoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fedctl.broker.events import MAX_EVENTS

if TYPE_CHECKING:
    from fedctl.broker.service import Broker

log = logging.getLogger(__name__)
TICK_S = 1.0
"""How often a viewer gets an update."""
WRITE_TIMEOUT_S = 10.0
MAX_STREAMS = 32
ROUND_FIELDS = ("round", "version", "test_accuracy", "test_loss", "train_loss", "fed_eval_accuracy", "fed_eval_loss",
                "participants", "selected", "duration_s", "bytes_in", "bytes_out", "elapsed_s")
"""What the charts and tables use of a metrics.jsonl record (``bytes_total`` is added: cumulative bytes)."""
STATIC = resources.files("fedctl.observe") / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}


def _clean(value: Any) -> Any:
    """JSON the browser can parse: NaN and infinities become null (``JSON.parse`` rejects them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RoundHistory:
    """The run's round records, trimmed to what the page draws, with cumulative bytes."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._bytes_total = 0

    def add(self, record: Mapping[str, Any]) -> None:
        if self.records and record.get("round") is not None and self.records[-1].get("round") == record["round"]:
            return  # (a resumed run's metrics line of its last round comes once from the file)
        self._bytes_total += int(record.get("bytes_in") or 0) + int(record.get("bytes_out") or 0)
        trimmed = {k: record.get(k) for k in ROUND_FIELDS}
        trimmed["bytes_total"] = self._bytes_total
        self.records.append(_clean(trimmed))

    def load(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.add(record)


class Dashboard:
    """The page, its assets and its two endpoints, for one running broker."""

    def __init__(self, broker: Broker, history: list[dict[str, Any]]) -> None:
        self.broker = broker
        self.history = RoundHistory()
        self.history.load(history)
        self.streams = 0
        self.closing = asyncio.Event()
        self._tick: tuple[float, bytes] | None = None
        self._assets = {name: (STATIC / name).read_bytes() for name in
                        ("index.html", "dashboard.js", "dashboard.css", "vendor/uPlot.iife.min.js",
                         "vendor/uPlot.min.css")}

    def observe_round(self, record: Mapping[str, Any]) -> None:
        """A round's metrics record (the broker's ``on_round``)."""
        self.history.add(record)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/favicon.ico", self._no_icon)  # (browsers ask for it; a 404 would be logged as an error)
        app.router.add_get("/static/{name:.+}", self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/stream", self._stream)

    # ------------------------------------------------------------------ pages
    async def _index(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _static(self, request: web.Request) -> web.Response:
        return self._asset(request.match_info["name"])

    def _asset(self, name: str) -> web.Response:
        body = self._assets.get(name)
        if body is None:  # (only the shipped files: a path is never joined to the file system)
            raise web.HTTPNotFound(text="404: not a file of the dashboard\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPES[Path(name).suffix],
                                                "Cache-Control": "no-cache",
                                                "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------ data
    def status(self) -> dict[str, Any]:
        broker = self.broker
        out = broker.core.status(broker.now(), events=0)
        out.pop("events", None)
        out.update(endpoint=broker.endpoint, state_dir=str(broker.config.state_dir), server_time=time.time())
        return _clean(out)

    def _status_bytes(self) -> bytes:
        """The status as JSON, built once per tick for every viewer."""
        now = time.monotonic()
        if self._tick is None or now - self._tick[0] >= TICK_S / 2:
            self._tick = (now, json.dumps(self.status(), separators=(",", ":")).encode())
        return self._tick[1]

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(body=self._status_bytes(), headers={"Content-Type": "application/json",
                                                                  "Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if self.streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text=f"503: {MAX_STREAMS} dashboards are open already\n",
                                             headers={"Retry-After": "10"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        self.streams += 1
        try:
            await response.prepare(request)
            await self._feed(response)
        except (TimeoutError, ConnectionError):
            pass  # the viewer went away, or stopped reading: its connection is closed
        finally:
            self.streams -= 1
        return response

    async def _feed(self, response: web.StreamResponse) -> None:
        core = self.broker.core
        rounds_sent, event_seq, reset = 0, 0, True
        while not self.closing.is_set():
            records = self.history.records
            if reset:
                events = core.events.recent(MAX_EVENTS, self.broker.now())
            else:
                events = core.events.since(event_seq, self.broker.now())
            rounds, rounds_sent = records[rounds_sent:], len(records)
            event_seq = core.events.seq
            body = (b'{"reset":' + (b"true" if reset else b"false") + b',"status":' + self._status_bytes()
                    + b',"rounds":' + json.dumps(rounds, separators=(",", ":")).encode()
                    + b',"events":' + json.dumps(_clean(events), separators=(",", ":")).encode() + b"}")
            reset = False
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write(b"event: update\ndata: " + body + b"\n\n")
            try:
                async with asyncio.timeout(TICK_S):
                    await self.closing.wait()
            except TimeoutError:
                pass
