"""A client shared-memory region registered for one test, for the HTTP and gRPC tritonclients alike."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


@contextlib.contextmanager
def client_region(client: Any, name: str, size: int, tag: str) -> Iterator[Any]:
    """Create ``size`` bytes under a fresh key, register them as ``name``; always unregister and
    destroy. ``client``: a ``tritonclient.http`` or ``tritonclient.grpc`` client."""
    key = f"/ms_{tag}_{name}_{secrets.token_hex(3)}"
    handle = shm.create_shared_memory_region(name, key, size)
    try:
        client.register_system_shared_memory(name, key, size)
        yield handle
    finally:
        with contextlib.suppress(InferenceServerException):
            client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
