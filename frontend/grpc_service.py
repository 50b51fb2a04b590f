# ruff: noqa: N802 - the methods are named as the proto's RPCs, which route to them by name
"""The RPCs of ``inference.GRPCInferenceService`` (KServe V2 plus Triton's extensions).

Each method answers the response message or raises ``ApiError`` as the REST routes do
(``frontend.control`` answers both); ``frontend.grpc_server`` wraps every one with access
control, drain accounting and the error mapping. Methods missing here answer UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from model_server.logs import request_id_var

from . import control
from .call import execute
from .errors import ApiError, describe
from .grpc import grpc_service_pb2 as pb
from .grpc import model_config_pb2 as mc
from .grpc_codec import decode_infer, encode_result, error_stream_response, parameter_value
from .rest import readiness
from .service import Service

M = TypeVar("M", bound=Message)


def _message(data: dict[str, Any], message: M) -> M:
    """``data`` (the REST JSON of the same answer) as a protobuf message: Triton's JSON is the
    proto's JSON mapping, with the proto's own field names."""
    json_format.ParseDict(data, message, ignore_unknown_fields=True)
    return message


class InferenceService:
    """One per frontend process, on its ``Service``."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings

    # --- health and metadata ----------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, deadline: float | None
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, deadline: float | None
    ) -> pb.ServerReadyResponse:
        _, ok = await readiness(self.service)
        return pb.ServerReadyResponse(ready=ok)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, deadline: float | None
    ) -> pb.ModelReadyResponse:
        # Unknown: not ready, as Triton answers (REST answers 404).
        entry = await control.model_ready(self.service, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=entry is not None and entry.state == "ready")

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, deadline: float | None
    ) -> pb.ServerMetadataResponse:
        return _message(control.server_metadata(self.service), pb.ServerMetadataResponse())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, deadline: float | None
    ) -> pb.ModelMetadataResponse:
        found = await control.model_metadata(self.service, request.name, request.version or None)
        return _message(found, pb.ModelMetadataResponse())

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, deadline: float | None
    ) -> pb.ModelConfigResponse:
        found = await control.model_config(self.service, request.name, request.version or None)
        return pb.ModelConfigResponse(config=_message(found, mc.ModelConfig()))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, deadline: float | None
    ) -> pb.ModelStatisticsResponse:
        model, version = request.name or None, request.version or None
        found = await control.statistics(self.service, model, version)
        return _message(found, pb.ModelStatisticsResponse())

    # --- inference -------------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        service = self.service
        with service.track("grpc") as tracker:
            call = decode_infer(request, self.settings.allow_client_shm, request_id_var.get(), deadline)
            with await execute(service, call, tracker) as result:
                return encode_result(result)

    async def stream_one(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        """One request of ``ModelStreamInfer``: an error answers that request, the stream goes on."""
        try:
            return pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, deadline))
        except Exception as exc:
            known = describe(exc)
            if known is None:
                raise
            return error_stream_response(request, known.message)

    # --- model repository extension ------------------------------------------------------------
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, deadline: float | None
    ) -> pb.RepositoryIndexResponse:
        items = await control.repository_index(self.service, request.ready)
        return _message({"models": items}, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, deadline: float | None
    ) -> pb.RepositoryModelLoadResponse:
        parameters = _repository_parameters(request.parameters)
        await control.repository_load(self.service, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, deadline: float | None
    ) -> pb.RepositoryModelUnloadResponse:
        version = str(_repository_parameters(request.parameters).get("version") or "")
        await control.repository_unload(self.service, request.model_name, version or None)
        return pb.RepositoryModelUnloadResponse()

    # --- system shared memory extension ---------------------------------------------------------
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryStatusResponse:
        found = await control.region_status(self.service, request.name or None)
        return _message({"regions": {r["name"]: r for r in found}}, pb.SystemSharedMemoryStatusResponse())

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryRegisterResponse:
        r = request
        await control.register_region(self.service, r.name, r.key, r.offset, r.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await control.unregister_region(self.service, request.name)  # "": every region, as REST
        return pb.SystemSharedMemoryUnregisterResponse()


def _repository_parameters(params: Any) -> dict[str, Any]:
    """``ModelRepositoryParameter``s as the REST body's ``parameters`` object (``config``: JSON text)."""
    found: dict[str, Any] = {}
    for key, value in params.items():
        if value.WhichOneof("parameter_choice") == "bytes_param":
            # Triton's `file:` overrides carry model files; this server loads from a source URI.
            raise ApiError(400, "invalid_request", f"parameters.{key}: file contents are not supported")
        item = parameter_value(value)
        if item is not None:
            found[key] = item
    return found
