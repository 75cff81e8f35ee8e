"""Run the app under uvicorn: loopback unless told otherwise, and bounded against slow or idle clients.

What a client can hold, and for how long:
- a connection that has not sent a whole request's headers within ``read_timeout_s`` is dropped
  (uvicorn has no such deadline of its own: a client trickling header bytes kept its connection
  forever), and so is one idle ``KEEP_ALIVE_S`` after a response;
- h11 buffers at most ``MAX_HEADER_BYTES`` of an unfinished header block (400 beyond; a block that
  arrives whole in one read, at most asyncio's 256 KiB, is parsed); bodies are capped at
  ``max_body_bytes`` and ``read_timeout_s`` by the app (413 / 408);
- generation work is capped by the app's queue (503 beyond it), not by connections: uvicorn's
  ``limit_concurrency`` counts idle connections too, so a few dozen of them made it answer 503 to
  ``/health`` and ``/metrics``. An idle connection costs a socket for a few seconds, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from deploykit.runtime.pipeline import Pipeline
from deploykit.serve.app import create_app
from deploykit.serve.schema import ServeConfig

KEEP_ALIVE_S = 5
MAX_HEADER_BYTES = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, counted from the connection's
    start or the previous response and not reset by each byte that arrives; and a 400 for a malformed
    body that is the connection's last word (see send_400_response)."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: the app's body deadline takes over
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn starts a pipelined request, whose headers then disarm it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # Found by fuzzing, both logged a traceback per request: (1) a request whose headers were fine and
        # whose body is malformed is already in the app, whose own answer then came after this 400 on a
        # finished connection; it is abandoned here, so that the app's answer goes nowhere. (2) After a
        # HEAD request uvicorn framed its 400 as a HEAD response, which h11 refuses to send.
        if self.cycle is not None:
            self.cycle.disconnected = True
        try:
            super().send_400_response(msg)
        except h11.LocalProtocolError:
            self.transport.close()


def uvicorn_config(app: FastAPI, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info") -> uvicorn.Config:
    """The one uvicorn configuration `deploykit serve` runs under (and its tests too)."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": config.read_timeout_s})
    # h11 pinned (not httptools when installed): the limits and deadlines above are written and tested against it
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, ws="none",
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=5)


def run_server(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
               config: ServeConfig | None = None, log_level: str = "info",
               on_loaded: Callable[[Pipeline], None] | None = None) -> None:
    """Load ``artifact`` (raises InputError before binding anything if it is not a sound artifact) and serve it."""
    config = config or ServeConfig()
    pipeline = Pipeline.from_artifact(artifact, backend)
    if on_loaded is not None:
        on_loaded(pipeline)
    server = uvicorn.Server(uvicorn_config(create_app(pipeline, config), config, host, port, log_level))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the server has stopped cleanly
        pass
