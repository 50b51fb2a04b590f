# ruff: noqa: N802 - the methods are named as the proto's RPCs, which route to them by name
"""The RPCs of ``inference.GRPCInferenceService`` (KServe V2 plus Triton's extensions).

Each method takes the request message and answers the response message or raises
what the REST routes raise (``ApiError``…); ``frontend.grpc_server`` wraps every one
with access control, drain accounting and the error mapping. The policies are the
REST routes' own: the same ``Service`` calls, the same load-option and region checks
(``v2._load_options``, ``models_file.model_config_from``, ``ipc.client_shm``).
Methods missing here (CUDA shared memory, trace and log settings) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import json_format

from ipc import client_shm
from ipc.messages import ModelEntry, ShmRegion, TensorSpec
from model_server import __version__, naming
from model_server.logs import request_id_var
from model_server.models_file import MAX_URI_LENGTH, ModelsFileError, model_config_from

from . import stats
from .call import execute
from .errors import ApiError, describe
from .grpc import grpc_service_pb2 as pb
from .grpc import model_config_pb2 as mc
from .grpc_codec import decode_infer, encode_result, error_stream_response
from .rest import readiness
from .service import Service
from .v2 import PLATFORM, TRITON_TYPES, _default_version, _load_options, extensions


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
        # Asked of the coordinator, not this process's snapshot (as REST): an unload made
        # through another frontend process a moment ago counts. Unknown: not ready, as Triton.
        reply = await self.service.coordinator.lookup(request.name, request.version or None)
        ready = reply.status == 200 and reply.entry is not None and reply.entry.state == "ready"
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, deadline: float | None
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="model-server", version=__version__, extensions=extensions(self.service)
        )

    def _versions(self, model: str, entry: ModelEntry) -> list[str]:
        found = sorted(
            v for (m, v), e in self.service.table.models.items() if m == model and e.state == "ready"
        )
        return found or [entry.version]

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, deadline: float | None
    ) -> pb.ModelMetadataResponse:
        entry = await self.service.entry(request.name, request.version or None, require_ready=False)
        schema = entry.schema
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.model_id,
            versions=self._versions(request.name, entry),
            platform=PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in schema.inputs]
            if schema
            else [],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in schema.outputs]
            if schema
            else [],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, deadline: float | None
    ) -> pb.ModelConfigResponse:
        """What the REST config route answers, as Triton's ``ModelConfig`` message."""
        entry = await self.service.entry(request.name, request.version or None, require_ready=False)
        schema = entry.schema
        batching = entry.config.batching
        max_batch = batching.max_batch_size if schema and schema.batched else 0
        config = mc.ModelConfig(
            name=entry.model_id, platform=PLATFORM, backend="onnxruntime", max_batch_size=max_batch
        )
        if schema is not None:
            _config_io(config.input, schema.inputs, max_batch)
            _config_io(config.output, schema.outputs, max_batch)
        if max_batch:
            config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
            config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, deadline: float | None
    ) -> pb.ModelStatisticsResponse:
        await self.service.coordinator.refresh()
        if request.name:
            entry = await self.service.entry(request.name, request.version or None, require_ready=False)
            versions = [request.version] if request.version else self._versions(request.name, entry)
            keys = [(entry.model_id, v) for v in versions]
        else:
            keys = sorted(k for k, e in self.service.table.models.items() if e.state == "ready")
        # The REST extension's JSON is Triton's message in JSON form; reading the metric files
        # of every process is blocking I/O, kept off the event loop.
        found = await asyncio.to_thread(stats.model_stats, keys)
        response = pb.ModelStatisticsResponse()
        json_format.ParseDict(found, response, ignore_unknown_fields=True)
        return response

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
        reply = await self.service.coordinator.index()
        item = pb.RepositoryIndexResponse.ModelIndex
        items = [item(name=i.name, version=i.version, state=i.state, reason=i.reason) for i in reply.index]
        if request.ready:
            items = [i for i in items if i.state == "READY"]
        return pb.RepositoryIndexResponse(models=items)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, deadline: float | None
    ) -> pb.RepositoryModelLoadResponse:
        """As ``POST /v2/repository/models/{m}/load``: version, batching options or a Triton
        ``config`` (JSON string), ``registry_uri``; validated by the same functions."""
        service, model = self.service, request.model_name
        parameters = _repository_parameters(request.parameters)
        version = str(parameters.get("version") or await _default_version(service, model))
        try:
            naming.check_part("model name", model)
            naming.check_part("version", version)
            options, names = _load_options(parameters)
            config = model_config_from(options, names=names)
        except (naming.InvalidName, ModelsFileError) as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        registry_uri = parameters.get("registry_uri")
        if registry_uri is not None and (
            not isinstance(registry_uri, str) or len(registry_uri) > MAX_URI_LENGTH
        ):
            raise ApiError(
                400,
                "invalid_request",
                f"parameters.registry_uri: must be a string of at most {MAX_URI_LENGTH} characters",
            )
        await service.load(model, version, registry_uri or None, config)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, deadline: float | None
    ) -> pb.RepositoryModelUnloadResponse:
        service, model = self.service, request.model_name
        parameters = _repository_parameters(request.parameters)
        await service.coordinator.refresh()
        versions = [v for (m, v) in service.table.models if m == model]
        if parameters.get("version"):
            versions = [v for v in versions if v == str(parameters["version"])]
        if not versions:
            raise ApiError(404, "model_not_found", f"model '{model}' is not loaded")
        for version in versions:
            await service.unload(model, version)
        return pb.RepositoryModelUnloadResponse()

    # --- system shared memory extension ---------------------------------------------------------
    def _require_shm(self) -> None:
        if not self.settings.allow_client_shm:
            raise ApiError(
                501,
                "shm_disabled",
                "system shared memory is disabled: set MODEL_SERVER_ALLOW_CLIENT_SHM=true to allow it",
            )

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryStatusResponse:
        self._require_shm()
        await self.service.coordinator.refresh()
        regions = self.service.table.regions
        if request.name and request.name not in regions:
            raise ApiError(400, "bad_region", f"shared memory region '{request.name}' is not registered")
        chosen = [regions[request.name]] if request.name else [regions[n] for n in sorted(regions)]
        response = pb.SystemSharedMemoryStatusResponse()
        for r in chosen:
            status = response.regions[r.name]
            status.name, status.key, status.offset, status.byte_size = (
                r.name,
                "/" + r.key,
                r.offset,
                r.byte_size,
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryRegisterResponse:
        """The REST register route's checks: name length, the server's own segments refused, and
        the object a regular file of ours, no link, long enough (which every use repeats)."""
        self._require_shm()
        limit = self.settings.max_shm_name_length
        name = request.name
        if not name or len(name) > limit:
            raise ApiError(400, "bad_region", f"shared memory region name must be 1 to {limit} characters")
        if request.byte_size <= 0:
            raise ApiError(400, "bad_region", "'byte_size' must be > 0")
        try:
            object_name = client_shm.object_name(request.key, limit)
            if object_name.startswith("msrv_"):
                raise ApiError(400, "bad_region", f"{request.key!r} belongs to the server")
            client_shm.check(object_name, request.offset, request.byte_size)
        except client_shm.RegionError as exc:
            raise ApiError(400, "bad_region", str(exc)) from None
        region = ShmRegion(name, object_name, request.offset, request.byte_size)
        reply = await self.service.coordinator.register_region(region)
        if reply.status != 200:
            raise ApiError(reply.status, reply.code or "bad_region", reply.error)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, deadline: float | None
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._require_shm()
        await self.service.coordinator.unregister_region(request.name)  # "": every region, as REST
        return pb.SystemSharedMemoryUnregisterResponse()


def _config_io(where: Any, specs: list[TensorSpec], max_batch: int) -> None:
    """Inputs or outputs of a Triton model config: dims without the batch dimension when batched."""
    for t in specs:
        where.add(
            name=t.name,
            data_type=mc.DataType.Value(TRITON_TYPES.get(t.datatype, f"TYPE_{t.datatype}")),
            dims=t.shape[1:] if max_batch else t.shape,
        )


def _repository_parameters(params: Any) -> dict[str, Any]:
    """``ModelRepositoryParameter``s as the REST body's ``parameters`` object (``config``: JSON text)."""
    found: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is None:
            continue
        item = getattr(value, which)
        if which == "bytes_param":
            # Triton's `file:` overrides carry model files; this server loads from a source URI.
            raise ApiError(400, "invalid_request", f"parameters.{key}: file contents are not supported")
        found[key] = item
    return found
