"""The one typed settings object, read once at process start.

Every timeout, size and threshold of the server is a field here with a documented
default; no other module reads ``os.environ``. Names map to environment variables
with the ``MODEL_SERVER_`` prefix (``workers`` -> ``MODEL_SERVER_WORKERS``), except
the seed's ``MLFLOW_TRACKING_URI`` and ``AWS_S3_BUCKET`` and the AWS variables
boto3 reads itself. The README's settings table is generated from this class
(``model-server settings --markdown``) so the two cannot drift.
"""

from __future__ import annotations

import hashlib
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Server settings. Each field's description is the README's documentation."""

    model_config = SettingsConfigDict(env_prefix="MODEL_SERVER_", extra="ignore", populate_by_name=True)

    # --- the seed's variables -------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the HTTP frontends listen on.")
    port: int = Field(8001, ge=0, le=65535, description="HTTP port of the frontends.")
    workers: int = Field(4, ge=1, le=256, description="Number of inference worker processes.")
    log_level: str = Field("INFO", description="Log level of every process (DEBUG, INFO, WARNING, ERROR).")
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "MODEL_SERVER_MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI for `models:/` and `runs:/` URIs: an http(s) tracking server, "
        "or a store MLflow's client reads directly "
        "(`sqlite:///mlflow.db`, `postgresql://…`, `file:./mlruns`).",
    )
    mlflow_s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_S3_ENDPOINT_URL", "MODEL_SERVER_MLFLOW_S3_ENDPOINT_URL"),
        description="S3 endpoint for artifacts an MLflow registry keeps in `s3://` (MinIO and other "
        "S3-compatible stores), as MLflow reads it; other S3 URIs use boto3's `AWS_ENDPOINT_URL`.",
    )
    aws_s3_bucket: str | None = Field(
        None,
        validation_alias=AliasChoices("AWS_S3_BUCKET", "MODEL_SERVER_AWS_S3_BUCKET"),
        description="S3 bucket holding `models/<model_id>/<version>/` when `registry_uri` is omitted.",
    )

    grpc_port: int = Field(
        8002,
        ge=0,
        le=65535,
        description="gRPC port of the frontends (KServe V2 / Triton `inference.GRPCInferenceService` and "
        "`grpc.health.v1`), on `MODEL_SERVER_HOST`, shared by the frontend processes (SO_REUSEPORT); "
        "0 turns gRPC off.",
    )
    grpc_max_message_bytes: int = Field(
        64 * MiB,
        ge=1024,
        le=2**31 - 1,
        description="Largest gRPC message received or sent (RESOURCE_EXHAUSTED above), like "
        "`MODEL_SERVER_MAX_REQUEST_BYTES` for HTTP bodies.",
    )
    grpc_max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        description="RPCs one frontend process serves at once; more are refused with RESOURCE_EXHAUSTED.",
    )
    grpc_max_connections: int = Field(
        1000,
        ge=1,
        description="Open gRPC connections one frontend process accepts; more are refused at connect "
        "(the REST counterpart is `MODEL_SERVER_LIMIT_CONCURRENCY`).",
    )
    grpc_connection_idle_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection with no call for this long is closed (GOAWAY; clients reconnect "
        "on their next call), so idle clients do not hold `MODEL_SERVER_GRPC_MAX_CONNECTIONS`.",
    )
    grpc_stream_idle_s: float = Field(
        60.0,
        gt=0,
        description="A `ModelStreamInfer` stream that sends no request for this long is closed "
        "(DEADLINE_EXCEEDED), so an idle client does not hold one of the concurrent RPCs.",
    )

    # --- process layout -------------------------------------------------------
    frontend_processes: int = Field(
        2, ge=1, le=64, description="HTTP frontend processes sharing the port (SO_REUSEPORT)."
    )
    spare_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Extra worker slots supervisord knows but does not start (scale up at run time).",
    )
    run_dir: Path = Field(
        Path(tempfile.gettempdir()) / "model-server",
        description="Directory for ipc:// sockets, the supervisord socket and pid files.",
    )
    instance: str = Field(
        "",
        description="Name of this server instance; prefixes shared-memory segments. "
        "Empty: derived from run_dir.",
    )
    log_format: Literal["text", "json"] = Field("text", description="`text` or `json` (one object per line).")
    access_log: bool = Field(True, description="Log one line per HTTP request (health probes excluded).")
    metrics_flush_interval_s: float = Field(
        0.1,
        ge=0,
        le=10,
        description="Longest time a frontend keeps request counts in memory before writing them to the "
        "metrics files (0: each request at once). A frontend serving /metrics or statistics waits up to "
        "this long for the other frontends' counts of requests answered before it.",
    )

    # --- models ----------------------------------------------------------------
    model_repository: Path = Field(
        Path("model_repository"),
        description="Local model repository, laid out `<model_id>/<version>/model.onnx`.",
    )
    models_file: Path | None = Field(
        None, description="YAML/JSON list of models to load at start; /ready waits for them."
    )
    load_repository: bool = Field(
        False, description="Load every model of the local repository at start, as start-up models (KServe)."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "model-server",
        description="Verified local artifact cache for downloaded models.",
    )
    cache_max_bytes: int = Field(
        20 * 1024 * MiB,
        ge=0,
        description="Size bound of the artifact cache (0: none); unused artifacts are evicted first.",
    )
    download_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Connect/read timeout for MLflow and S3 requests; a remote load that gets no byte "
        "for this long (a source that accepts and never answers, or a download queued behind a slow "
        "source) fails with 504.",
    )
    load_timeout_s: float = Field(600.0, gt=0, description="Longest a model load may take end to end.")
    mlflow_max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a failed MLflow request (set as MLflow's own "
        "`MLFLOW_HTTP_REQUEST_MAX_RETRIES` in the coordinator; `download_timeout_s` becomes "
        "`MLFLOW_HTTP_REQUEST_TIMEOUT`).",
    )

    # --- model-source policy (who may make the coordinator read what) ----------
    allowed_local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma list of directories, besides the model repository, that a local `registry_uri` "
        "(path, `file://`, `~`, relative) may lie under once symlinks are followed; anything else is "
        "refused with 403 `source_not_allowed`. Empty: the model repository only.",
    )
    allowed_s3_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma list of S3 buckets an `s3://` `registry_uri` may name (`*`: any); others get 403. "
        "Empty: `AWS_S3_BUCKET` if set, else any.",
    )
    allowed_mlflow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma list of extra MLflow servers (`host:port`) an `mlflow-artifacts://HOST/…` URI may "
        "name; MLflow credentials are sent to them too. The `MLFLOW_TRACKING_URI` server is always allowed; "
        "any other host gets 403 before a connection is made.",
    )
    model_replicas: int = Field(
        0, ge=0, description="Workers that load each model (0: every worker). Per-model `replicas` overrides."
    )
    max_models: int = Field(
        512,
        ge=1,
        description="Models (versions) the server holds at once, loading or loaded; a load beyond it "
        "answers 409 until one is unloaded.",
    )
    failed_load_ttl_s: float = Field(
        300.0, gt=0, description="How long a failed load stays listed (with its reason) before it expires."
    )
    max_failed_entries: int = Field(
        100, ge=0, description="Failed loads kept listed at most; the oldest is dropped first."
    )
    local_fetch_threads: int = Field(
        2, ge=1, le=64, description="Threads that verify local artifacts (never shared with remote sources)."
    )
    remote_fetch_threads: int = Field(
        8, ge=1, le=256, description="Remote downloads (S3, MLflow) that run at once, over all sources."
    )
    remote_fetch_per_source: int = Field(
        2,
        ge=1,
        le=64,
        description="Remote downloads that run at once from one source (S3 bucket, MLflow registry); "
        "more wait their turn, so one slow source cannot hold every download thread.",
    )

    # --- workers ------------------------------------------------------------------
    worker_index: int = Field(
        0, ge=0, description="Index of this worker (set per process by supervisord's process_num)."
    )
    gpus: Annotated[str, Field(description="`auto` (detect), `none`, or a comma list of GPU ids.")] = "auto"
    cpu_affinity: bool = Field(True, description="Pin CPU workers to a core set with psutil.")
    ort_intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads per worker (0: the size of its core set)."
    )
    worker_max_models: int = Field(0, ge=0, description="Sessions a worker keeps (0: no limit); LRU evicts.")
    worker_max_bytes: int = Field(
        0, ge=0, description="Model bytes a worker keeps (0: no limit); LRU evicts the least recently used."
    )
    worker_recycle_rss_bytes: int = Field(
        0,
        ge=0,
        description="A worker whose RSS stays above this after unloads exits to be replaced (0: off).",
    )

    # --- batching defaults (per-model settings override) -------------------------
    max_batch_size: int = Field(
        0, ge=0, description="Default rows per merged batch (0: no dynamic batching)."
    )
    max_queue_delay_us: int = Field(500, ge=0, description="Default wait to fill a batch, microseconds.")
    max_queue_size: int = Field(1024, ge=1, description="Default queued requests per model before 503.")
    batch_routing_fill: float = Field(
        1.0,
        ge=0,
        le=16,
        description="Batched models: a frontend keeps this many max_batch_size's worth of requests in "
        "flight on one worker before routing to the next, so a burst is batched whole (0: least busy).",
    )

    # --- IPC, shared memory, deadlines -------------------------------------------
    shm_arena_bytes: int = Field(
        128 * MiB, ge=MiB, description="Shared-memory arena per frontend process (needs /dev/shm room)."
    )
    max_request_bytes: int = Field(64 * MiB, ge=1024, description="Largest HTTP body accepted (413 above).")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of one inference, dispatch to reply.")
    coordinator_timeout_s: float = Field(5.0, gt=0, description="Wait for a coordinator answer (not loads).")
    unload_grace_s: float = Field(
        0.25, ge=0, description="On unload, requests sent before frontends saw it still run (this long)."
    )
    heartbeat_interval_s: float = Field(0.5, gt=0, description="Worker heartbeat period.")
    heartbeat_timeout_s: float = Field(3.0, gt=0, description="Worker declared dead after this silence.")

    # --- HTTP edge ----------------------------------------------------------------
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma list of allowed CORS origins (`*` for any; empty: CORS off)."
    )
    response_compression: bool = Field(
        True,
        description="Compress inference responses of 1 KiB or more with gzip or deflate when the client's "
        "`Accept-Encoding` asks, as Triton does. Off where a proxy compresses, or for same-host clients "
        "whose HTTP library asks by default (httpx, requests) and would rather save the CPU.",
    )
    allow_client_shm: bool = Field(
        False, description="Allow clients to register system shared-memory regions (V2 extension)."
    )
    max_shm_regions: int = Field(
        64,
        ge=0,
        description="Most client shared-memory regions registered at once, server-wide (V2 extension).",
    )
    max_shm_name_length: int = Field(
        128,
        ge=1,
        le=255,
        description="Longest client shared-memory region name and key, in characters (V2 extension).",
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, time in-flight requests get to finish before workers stop."
    )
    # Bounds that keep one client from holding what others need (frontend/edge.py, frontend/limits.py).
    max_pending_body_bytes: int = Field(
        32 * MiB,
        ge=0,
        description="Arena bytes that binary bodies still arriving may hold in one frontend, at most a "
        "quarter of `MODEL_SERVER_SHM_ARENA_BYTES`; a body beyond it is read into process memory as it "
        "arrives and copied into the arena when complete (0: always).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time a whole request body may take to arrive after its headers (408 and the "
        "connection closed above); whatever it reserved is freed. On the gRPC port, the time a unary "
        "call's request message may take after its headers (DEADLINE_EXCEEDED above).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a connection may take to send a request's headers (closed above); on the gRPC "
        "port, the time a new connection may take for its HTTP/2 handshake.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request line plus headers (431 and closed above)."
    )
    limit_concurrency: int = Field(
        1000,
        ge=2,
        description="Open connections or running requests per frontend above which new requests get 503 "
        "(uvicorn's `limit_concurrency`; health probes and `/metrics` are exempt).",
    )
    timeout_keep_alive_s: int = Field(
        30, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    max_json_request_bytes: int = Field(
        8 * MiB,
        ge=1024,
        description="Largest JSON inference body (`/v1/infer`, a V2 request without binary tensors, "
        "or a V2 binary request's JSON header), after decompression; parsed JSON takes ~20x its size "
        "in memory, so larger tensors go in the binary extension (413 above).",
    )
    max_rows_per_request: int = Field(
        65536,
        ge=1,
        description="Rows (batch dimension) in one inference request: v1 records or tensors, V2 inputs "
        "(413 above).",
    )
    max_inputs_per_request: int = Field(
        256,
        ge=1,
        description="Input tensors (V2), or named tensors or record features (v1), in one inference "
        "request (413 above).",
    )

    # --- access control (frontend/auth.py; README "Security") -------------------------
    admin_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma list of bearer tokens for the admin routes (model load/unload, client "
        "shared-memory register/unregister); they pass inference checks too. Never logged.",
    )
    inference_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma list of bearer tokens for inference, metadata, model lists and statistics "
        "(empty: those routes are open). Never logged.",
    )
    admin_tokens_file: Path | None = Field(
        None, description="File with admin tokens, one per line (a mounted Kubernetes Secret); read at start."
    )
    inference_tokens_file: Path | None = Field(
        None, description="File with inference tokens, one per line; read at start."
    )
    allow_unauthenticated_admin: bool = Field(
        False,
        description="Without admin tokens, admin routes work only on a loopback host; `true` opens them "
        "on any address (only behind a gateway that checks access).",
    )
    metrics_require_auth: bool = Field(
        False, description="`/metrics` needs an inference (or admin) token; open by default for scrapers."
    )

    @field_validator(
        "cors_origins",
        "admin_tokens",
        "inference_tokens",
        "allowed_local_roots",
        "allowed_s3_buckets",
        "allowed_mlflow_hosts",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @property
    def instance_name(self) -> str:
        """Short name that keeps two servers on one host apart (shm, sockets)."""
        if self.instance:
            return self.instance
        return hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:8]

    @property
    def shm_prefix(self) -> str:
        return f"msrv_{self.instance_name}_"

    def gpu_ids(self, detected: int) -> list[int]:
        """GPU ids the workers are spread over: explicit list, detection, or none."""
        spec = self.gpus.strip().lower()
        if spec in {"", "none", "cpu", "off"}:
            return []
        if spec == "auto":
            return list(range(detected))
        return [int(part) for part in spec.split(",") if part.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; tests build `Settings(...)` directly instead."""
    return Settings()
