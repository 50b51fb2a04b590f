"""The V2 control plane, whatever protocol asks: metadata, model config, statistics, the
model repository and system shared memory.

Plain data in, plain data (Python objects shaped as the REST JSON) or ``ApiError`` out;
``frontend.v2`` answers them as JSON, ``frontend.grpc_service`` as protobuf messages.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import orjson

from ipc import client_shm, datatypes
from ipc.messages import ModelEntry, ShmRegion, TensorSpec
from model_server import __version__, naming
from model_server.models_file import MAX_URI_LENGTH, ModelsFileError, model_config_from
from model_server.naming import version_key

from . import stats
from .errors import ApiError
from .rest import tensor_specs
from .service import Service

PLATFORM = "onnxruntime_onnx"
TRITON_TYPES = {t: "TYPE_STRING" if t == "BYTES" else f"TYPE_{t}" for t in datatypes.KNOWN}
SHM_DISABLED = "system shared memory is disabled: set MODEL_SERVER_ALLOW_CLIENT_SHM=true to allow it"
# A Triton model config's batching fields: (load option, prefix in the config, field).
_CONFIG_FIELDS = (
    ("max_batch_size", "", "max_batch_size"),
    ("max_queue_delay_us", "dynamic_batching.", "max_queue_delay_microseconds"),
    ("preferred_batch_sizes", "dynamic_batching.", "preferred_batch_size"),
)


# --- metadata ----------------------------------------------------------------------------


def server_metadata(service: Service) -> dict[str, Any]:
    extensions = ["binary_tensor_data", "classification", "model_repository", "statistics"]
    if service.settings.allow_client_shm:
        extensions.append("system_shared_memory")
    return {"name": "model-server", "version": __version__, "extensions": extensions}


def _versions(service: Service, model: str, entry: ModelEntry) -> list[str]:
    found = sorted(v for (m, v), e in service.table.models.items() if m == model and e.state == "ready")
    return found or [entry.version]


async def model_metadata(service: Service, model: str, version: str | None) -> dict[str, Any]:
    entry = await service.entry(model, version, require_ready=False)
    schema = entry.schema
    return {
        "name": entry.model_id,
        "versions": _versions(service, model, entry),
        "platform": PLATFORM,
        "inputs": tensor_specs(schema.inputs) if schema else [],
        "outputs": tensor_specs(schema.outputs) if schema else [],
    }


async def model_ready(service: Service, model: str, version: str | None) -> ModelEntry | None:
    """The entry, ready or not; None when unknown. Asked of the coordinator, not this process's
    snapshot: an unload made through another frontend process a moment ago counts (and an
    unknown name costs no snapshot of the table)."""
    reply = await service.coordinator.lookup(model, version)
    return reply.entry if reply.status == 200 else None


def _triton_io(specs: list[TensorSpec], batched: int) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": t.shape[1:] if batched else t.shape}
        for t in specs
    ]


async def model_config(service: Service, model: str, version: str | None) -> dict[str, Any]:
    """What Triton's config endpoint returns, so perf_analyzer and tritonclient tools work."""
    entry = await service.entry(model, version, require_ready=False)
    schema = entry.schema
    batching = entry.config.batching
    max_batch = batching.max_batch_size if schema and schema.batched else 0
    config: dict[str, Any] = {
        "name": entry.model_id,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": max_batch,
        "input": _triton_io(schema.inputs, max_batch) if schema else [],
        "output": _triton_io(schema.outputs, max_batch) if schema else [],
    }
    if max_batch:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preferred_batch_size": batching.preferred_batch_sizes,
        }
    return config


async def statistics(service: Service, model: str | None, version: str | None) -> dict[str, Any]:
    """Triton's statistics (JSON form) of one model (every ready version unless ``version``), or
    of every ready model when ``model`` is None."""
    if model is None:
        await service.coordinator.refresh()
        keys = sorted(k for k, e in service.table.models.items() if e.state == "ready")
    else:
        entry = await service.entry(model, version, require_ready=False)  # unknown: 404, no snapshot
        await service.coordinator.refresh()  # the version list below, as the coordinator has it now
        keys = [(entry.model_id, v) for v in ([version] if version else _versions(service, model, entry))]
    # Reading every process's metric files is blocking I/O: kept off the event loop.
    return await asyncio.to_thread(stats.model_stats, keys)


# --- model repository extension --------------------------------------------------------------


async def repository_index(service: Service, ready_only: bool) -> list[dict[str, Any]]:
    reply = await service.coordinator.index()
    return [msgspec.structs.asdict(i) for i in reply.index if i.state == "READY" or not ready_only]


def _load_options(parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Batching options from load parameters, or from a Triton model config passed as ``config``,
    and the name each came by (for an error that names what the client sent)."""
    options = {k: v for k, v in parameters.items() if k not in {"config", "version", "registry_uri"}}
    names = {k: f"parameters.{k}" for k in options}
    raw = parameters.get("config")
    if raw:
        try:
            config = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_config", f"parameters.config is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ApiError(400, "invalid_config", "parameters.config must be a JSON object")
        dynamic = config.get("dynamic_batching") or {}
        sources = {"": config, "dynamic_batching.": dynamic if isinstance(dynamic, dict) else {}}
        for option, prefix, field in _CONFIG_FIELDS:
            if field in sources[prefix] and option not in options:
                options[option] = sources[prefix][field]
                names[option] = f"parameters.config.{prefix}{field}"
    return options, names


async def _default_version(service: Service, model: str) -> str:
    """The newest version the repository index knows for ``model``, else "1"."""
    reply = await service.coordinator.index()
    return max((i.version for i in reply.index if i.name == model), key=version_key, default="1")


async def repository_load(service: Service, model: str, parameters: dict[str, Any]) -> ModelEntry:
    """Load ``model`` with the load request's ``parameters``: version, batching options or a
    Triton ``config`` (JSON), ``registry_uri``."""
    version = str(parameters.get("version") or await _default_version(service, model))
    try:
        naming.check_part("model name", model)
        naming.check_part("version", version)
        options, names = _load_options(parameters)
        config = model_config_from(options, names=names)
    except (naming.InvalidName, ModelsFileError) as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    registry_uri = parameters.get("registry_uri")
    if registry_uri is not None and (not isinstance(registry_uri, str) or len(registry_uri) > MAX_URI_LENGTH):
        raise ApiError(
            400,
            "invalid_request",
            f"parameters.registry_uri: must be a string of at most {MAX_URI_LENGTH} characters",
        )
    return await service.load(model, version, registry_uri or None, config)


async def repository_unload(service: Service, model: str, version: str | None) -> list[str]:
    """Unload ``version`` of ``model``, or every version; the versions unloaded."""
    await service.coordinator.refresh()
    versions = [v for (m, v) in service.table.models if m == model and (not version or v == version)]
    if not versions:
        raise ApiError(404, "model_not_found", f"model '{model}' is not loaded")
    for v in versions:
        await service.unload(model, v)
    return versions


# --- system shared memory extension -------------------------------------------------------------


def require_shm(service: Service) -> None:
    if not service.settings.allow_client_shm:
        raise ApiError(501, "shm_disabled", SHM_DISABLED)


def check_region_name(service: Service, name: str) -> None:
    """The extension is on and ``name`` is 1 to MAX_SHM_NAME_LENGTH characters."""
    require_shm(service)
    limit = service.settings.max_shm_name_length
    if not name or len(name) > limit:
        raise ApiError(400, "bad_region", f"shared memory region name must be 1 to {limit} characters")


async def register_region(service: Service, name: str, key: str, offset: int, byte_size: int) -> None:
    check_region_name(service, name)
    if byte_size <= 0:
        raise ApiError(400, "bad_region", "'byte_size' must be > 0")
    try:
        object_name = client_shm.object_name(key, service.settings.max_shm_name_length)
        if object_name.startswith("msrv_"):
            raise ApiError(400, "bad_region", f"{key!r} belongs to the server")
        # The checks every worker repeats on every use: a regular file of ours, no link, long enough.
        client_shm.check(object_name, offset, byte_size)
    except client_shm.RegionError as exc:
        raise ApiError(400, "bad_region", str(exc)) from None
    reply = await service.coordinator.register_region(ShmRegion(name, object_name, offset, byte_size))
    if reply.status != 200:
        raise ApiError(reply.status, reply.code or "bad_region", reply.error)


async def unregister_region(service: Service, name: str) -> None:
    """Unregister region ``name``; "": every region."""
    require_shm(service)
    await service.coordinator.unregister_region(name)


async def region_status(service: Service, name: str | None) -> list[dict[str, Any]]:
    """Region ``name``, or every region when None."""
    require_shm(service)
    await service.coordinator.refresh()
    regions = service.table.regions
    if name is not None and name not in regions:
        raise ApiError(400, "bad_region", f"shared memory region '{name}' is not registered")
    chosen = [regions[name]] if name is not None else [regions[n] for n in sorted(regions)]
    return [
        {"name": r.name, "key": "/" + r.key, "offset": r.offset, "byte_size": r.byte_size} for r in chosen
    ]
