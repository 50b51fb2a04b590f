"""The gRPC listener of one frontend process: ``grpc.aio`` on the uvicorn event loop.

Started and stopped by the app's lifespan beside uvicorn, on ``MODEL_SERVER_GRPC_PORT``
(SO_REUSEPORT, so every frontend process listens and the kernel spreads connections).
It serves ``inference.GRPCInferenceService`` (``frontend/grpc_service.py``) and the
standard ``grpc.health.v1.Health``.

Every RPC goes through one wrapper (``_guarded``), the gRPC counterpart of the HTTP
middleware stack: a request id for the logs, access control from ``authorization``
metadata with REST's tokens and scopes, the RPC counted as activity so the SIGTERM
drain waits for it, and the REST errors mapped to gRPC status codes with the same
message. Doing it in the handlers rather than a ``ServerInterceptor`` keeps it one
place for unary and streaming methods and costs no second handler lookup per call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from model_server.logs import request_id_var
from model_server.settings import Settings

from .auth import AuthMiddleware, AuthPolicy, AuthScope
from .errors import describe
from .grpc import grpc_service_pb2 as pb
from .grpc_codec import grpc_status
from .grpc_service import InferenceService
from .middleware import VALID_REQUEST_ID, Activity
from .rest import readiness
from .service import Service

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_PERIOD_S = 1.0  # how often the health service re-reads readiness (what /ready answers)
HEALTH_TICK_S = 0.1  # how soon it reports a drain
# Unary RPCs in flight were already awaited by the drain (they count as activity); what is
# left at stop are streams waiting for their next message, which get this long to end.
STOP_GRACE_S = 1.0

Handler = Callable[[Any, float | None], Awaitable[Any]]

# Scopes as for the REST routes (frontend/auth.py): health open, changes to what is served
# or to client shared memory admin, everything else inference.
SCOPES: dict[str, AuthScope] = {
    "ServerLive": AuthScope.OPEN,
    "ServerReady": AuthScope.OPEN,
    "RepositoryModelLoad": AuthScope.ADMIN,
    "RepositoryModelUnload": AuthScope.ADMIN,
    "SystemSharedMemoryRegister": AuthScope.ADMIN,
    "SystemSharedMemoryUnregister": AuthScope.ADMIN,
}

# name -> (request class, response class) of the unary methods served: those of the proto's
# service that ``InferenceService`` implements (the others answer UNIMPLEMENTED).
UNARY: dict[str, tuple[Any, Any]] = {
    m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    if not m.client_streaming and hasattr(InferenceService, m.name)
}


def bind_address(host: str, port: int) -> str:
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def auth_refusal(
    checker: AuthMiddleware, needed: AuthScope, authorization: str | None
) -> tuple[int, str] | None:
    """(HTTP status, message) refusing a call that needs ``needed`` with this ``authorization``
    metadata value, or None to let it in: the REST middleware's own decision."""
    problem = checker.policy.refusal(needed, None if authorization is None else authorization.encode())
    return None if problem is None else (problem[0], problem[2])


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    """The REST middleware's inner app, never called: only its policy is used."""


class GrpcFrontend:
    """The gRPC server of one frontend process."""

    def __init__(self, settings: Settings, service: Service, activity: Activity, policy: AuthPolicy) -> None:
        self.settings = settings
        self.service = service
        self.activity = activity
        self.auth = AuthMiddleware(_no_app, policy)
        self.rpc = InferenceService(service)
        self.health = health.aio.HealthServicer()
        self.server: Any = None
        self.port = 0
        self._ids = itertools.count(1)
        self._id_prefix = "g" + secrets.token_hex(5)
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, or raise ``OSError`` naming the setting (the process then fails to boot)."""
        settings = self.settings
        limit = settings.grpc_max_message_bytes
        # Every connection-level resource a client can hold has a bound here, as on the HTTP port:
        # connections (refused at connect beyond the limit), idle connections, slow handshakes.
        server = grpc.aio.server(
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
                ("grpc.max_connection_idle_ms", round(settings.grpc_connection_idle_s * 1000)),
                ("grpc.server_handshake_timeout_ms", round(settings.header_timeout_s * 1000)),
            ],
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = bind_address(self.settings.host, self.settings.grpc_port)
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address} (MODEL_SERVER_GRPC_PORT): {exc}") from None
        await server.start()
        self.server = server
        self._watch = asyncio.create_task(self._watch_health(), name="grpc-health")
        log.info("gRPC listening on %s", address)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(STOP_GRACE_S)

    async def _watch_health(self) -> None:
        """SERVING while the frontend is ready (what ``/ready`` says), NOT_SERVING from the moment
        a drain starts: readiness is asked every HEALTH_PERIOD_S, the drain flag every tick."""
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("live", serving)
        shown: bool | None = None
        ready, asked = False, -HEALTH_PERIOD_S
        loop = asyncio.get_running_loop()
        while True:
            if not self.service.draining and loop.time() - asked >= HEALTH_PERIOD_S:
                ready, asked = await self._ready(), loop.time()
            ok = ready and not self.service.draining
            if ok is not shown:
                status = serving if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                shown = ok
            await asyncio.sleep(HEALTH_TICK_S)

    async def _ready(self) -> bool:
        try:
            _, ok = await readiness(self.service)
        except Exception:  # a probe must not die with the coordinator: report not ready
            log.exception("readiness for the gRPC health service failed")
            return False
        return ok

    # --- the handlers -------------------------------------------------------------------------
    def _handlers(self) -> Any:
        # Unary methods are registered client-streaming (the wire is the same: one message, then the
        # client half-closes) so that the handler runs when the headers arrive and can bound the
        # message's arrival as REST bounds a body: gRPC calls a unary handler only once the whole
        # message is in, which a client could put off for ever while holding one of the
        # MODEL_SERVER_GRPC_MAX_CONCURRENT_RPCS.
        handlers = {
            name: grpc.stream_unary_rpc_method_handler(
                self._guarded(name, getattr(self.rpc, name)),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in UNARY.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def _enter(self, name: str, context: Any) -> None:
        """Request id and access control; aborts the call when refused."""
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("x-request-id")
        request_id = given if isinstance(given, str) and VALID_REQUEST_ID.match(given) else ""
        request_id_var.set(request_id or f"{self._id_prefix}{next(self._ids):x}")
        authorization = metadata.get("authorization")
        refused = auth_refusal(
            self.auth,
            SCOPES.get(name, AuthScope.INFERENCE),
            authorization if isinstance(authorization, str) else None,
        )
        if refused is not None:
            await context.abort(grpc_status(refused[0]), refused[1])

    async def _one_message(self, context: Any) -> Any:
        """The call's request message, received within MODEL_SERVER_BODY_TIMEOUT_S of its headers."""
        limit = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(limit):
                request = await context.read()
        except TimeoutError:
            message = f"request message not received within {limit:g} s (MODEL_SERVER_BODY_TIMEOUT_S)"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a unary call needs one request message")
        return request

    def _guarded(self, name: str, method: Handler) -> Callable[[Any, Any], Awaitable[Any]]:
        async def handle(_requests: Any, context: Any) -> Any:  # the message is read via context
            await self._enter(name, context)  # refused before waiting for the message, as REST
            request = await self._one_message(context)
            self.activity.active += 1
            try:
                return await method(request, context.time_remaining())
            except Exception as exc:
                await _abort(context, name, exc)
            finally:
                self.activity.active -= 1

        return handle

    async def _stream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """``ModelStreamInfer``: requests answered in order; each counts as activity while it runs,
        an idle stream does not (the drain does not wait for a client that keeps one open), and is
        closed after MODEL_SERVER_GRPC_STREAM_IDLE_S."""
        await self._enter("ModelStreamInfer", context)
        idle = self.settings.grpc_stream_idle_s
        pending = aiter(requests)
        while True:
            try:
                async with asyncio.timeout(idle):  # no task per message, unlike wait_for
                    request = await anext(pending)
            except StopAsyncIteration:
                return
            except TimeoutError:
                message = f"stream idle for {idle:g} s (MODEL_SERVER_GRPC_STREAM_IDLE_S): closed"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            self.activity.active += 1
            try:
                response = await self.rpc.stream_one(request, context.time_remaining())
            except Exception as exc:
                await _abort(context, "ModelStreamInfer", exc)
            finally:
                self.activity.active -= 1
            yield response


async def _abort(context: Any, name: str, exc: Exception) -> None:
    known = describe(exc)
    if known is None:
        log.error("unhandled error in gRPC %s", name, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        return
    trailing: tuple[tuple[str, str], ...] = ()
    if known.retry_after is not None:  # as REST's Retry-After header
        trailing = (("retry-after", str(max(1, round(known.retry_after)))),)
    await context.abort(grpc_status(known.status), known.message, trailing_metadata=trailing)
