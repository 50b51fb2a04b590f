"""Frontend process shell: uvicorn on a SO_REUSEPORT socket, so supervisord can run several.

Each frontend process is a full peer: its own event loop, arena, and sockets
to the coordinator and workers. The kernel spreads connections over the
processes listening on the port.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from model_server import exitcodes
from model_server.roles import start_role
from model_server.settings import Settings, get_settings

from .app import asgi_app, create_app
from .edge import protocol_class

log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: on SIGTERM, /ready and new inferences answer 503 at once while the
    requests already running finish (up to MODEL_SERVER_DRAIN_SECONDS); then uvicorn shuts down.

    On uvicorn's public hooks: ``handle_exit`` (the SIGINT/SIGTERM handler ``capture_signals``
    installs) only records the time, ``on_tick`` (every 100 ms on the loop) runs the drain, and a
    second signal sets ``should_exit``/``force_exit``. Not calling uvicorn's ``handle_exit`` keeps
    the signal from being re-raised after the shutdown: the process exits 0 after a drain.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
        else:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        done = await super().on_tick(counter)
        if self.drain_started is None:
            return done
        service = getattr(self.app.state, "service", None)
        self.app.state.activity.draining = True
        if service is not None and not service.draining:
            service.draining = True
            log.info(
                "draining: refusing new requests, waiting up to %.0f s for running ones", self.drain_seconds
            )
        active = self.app.state.activity.active
        if active == 0 or time.monotonic() - self.drain_started >= self.drain_seconds:
            if active:
                log.warning("drain time is up with %d request(s) still running", active)
            return True
        return done


def build_server(settings: Settings) -> uvicorn.Server:
    app = create_app(settings)
    config = uvicorn.Config(
        asgi_app(app, settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with a header timeout, a header size bound and limit_concurrency (frontend/edge.py).
        http=protocol_class(settings),
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # no proxy rewriting on the hot path; forwarded headers are not used
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds)),
        timeout_keep_alive=settings.timeout_keep_alive_s,
    )
    return DrainingServer(config, app, settings.drain_seconds)


def main() -> int:
    settings = get_settings()
    start_role("frontend", settings)
    # The product's rule: the frontend never runs models.
    assert "onnxruntime" not in sys.modules
    try:
        sock = listen_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (MODEL_SERVER_HOST/PORT)", settings.host, settings.port, exc)
        return exitcodes.BOOT_ERROR
    build_server(settings).run(sockets=[sock])
    return exitcodes.OK
