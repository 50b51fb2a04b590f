"""Frontend process shell: uvicorn on a SO_REUSEPORT socket, so supervisord can run several.

Each frontend process is a full peer: its own event loop, arena, and sockets
to the coordinator and workers. The kernel spreads connections over the
processes listening on the port.
"""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from model_server import exitcodes
from model_server.roles import start_role
from model_server.settings import Settings, get_settings

from .app import create_app

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


def build_server(settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.drain_seconds) or None,
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)


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
    server = build_server(settings)
    server.run(sockets=[sock])
    return exitcodes.OK
