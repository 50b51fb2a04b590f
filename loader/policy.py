"""The model-source policy: which files, buckets and MLflow servers a ``registry_uri`` may name.

Loading a model makes the coordinator open a file or call a server on the
caller's behalf, so a load request is a request to read what the coordinator can
read and to send the registry's credentials where the URI points. The policy:

* **local paths** (plain, ``file://``, ``~``, relative) are resolved with every
  symlink followed *before* anything looks at the file, and must lie under one
  of the model repository or ``MODEL_SERVER_ALLOWED_LOCAL_ROOTS`` (default: none more) and
  not in the artifact cache (whose files are only ever served by the source
  that downloaded them). The refusal never names the resolved path nor says
  whether it exists, so the endpoint is no oracle for the host's files;
* **S3**: the bucket of an ``s3://`` URI must be in ``MODEL_SERVER_ALLOWED_S3_BUCKETS``
  (default: ``AWS_S3_BUCKET`` when set, else any);
* **MLflow**: requests go only to the ``MLFLOW_TRACKING_URI`` server or a host
  in ``MODEL_SERVER_ALLOWED_MLFLOW_HOSTS``; ``mlflow-artifacts://HOST/…`` naming
  any other host is refused before a connection is made (MLflow attaches its
  token or password to every request, so a foreign host would receive them);
* **credentials** inside a URI (``s3://user:pw@…``, ``?token=…``) are refused with
  400: they would end up in the model table, ``/v1/models``, logs and the state
  file. Credentials belong in the environment or a mounted secret.

Artifact locations that the configured MLflow registry itself returns (its
``s3://`` or ``file:`` artifact store) are trusted like the registry: the
operator chose it. Only their MLflow hosts are checked.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from model_server.settings import Settings

from .errors import InvalidUri, SourceNotAllowed
from .redact import has_credentials

LOCAL_SETTING = "MODEL_SERVER_ALLOWED_LOCAL_ROOTS"
S3_SETTING = "MODEL_SERVER_ALLOWED_S3_BUCKETS"
MLFLOW_SETTING = "MODEL_SERVER_ALLOWED_MLFLOW_HOSTS"


def _scheme(uri: str) -> str:
    # Same rule as loader.resolve.scheme_of (imported lazily there; kept here to avoid a cycle).
    head, sep, _ = uri.partition(":")
    if not sep or len(head) < 2 or "/" in head:
        return ""
    return head.lower()


def local_roots(settings: Settings) -> list[Path]:
    # The repository is always a root: the default rule and the start-up models read it.
    roots = [settings.model_repository, *settings.allowed_local_roots]
    return [Path(root).expanduser().resolve() for root in roots]


def _not_allowed_local() -> SourceNotAllowed:
    return SourceNotAllowed(
        f"registry_uri names a local path outside the allowed model sources; local models must lie "
        f"under the model repository or a directory listed in {LOCAL_SETTING}"
    )


def check_local(uri: str, settings: Settings) -> Path:
    """The resolved path of a local ``uri`` if the policy allows it, else SourceNotAllowed (403).

    Nothing is opened or stat'ed beyond what ``resolve`` does to follow links, and
    the answer is the same whether the path exists or not.
    """
    try:
        if uri.startswith("file:"):
            parsed = urlparse(uri)
            if parsed.netloc not in {"", "localhost"}:
                raise _not_allowed_local()
            given = Path(unquote(parsed.path))
        else:
            given = Path(uri).expanduser()
        resolved = given.resolve(strict=False)
    except (OSError, ValueError, RuntimeError):  # loops, NUL bytes, unknown ~user
        raise _not_allowed_local() from None
    cache = Path(settings.cache_dir).expanduser().resolve()
    if resolved.is_relative_to(cache):
        raise _not_allowed_local()
    if not any(resolved.is_relative_to(root) for root in local_roots(settings)):
        raise _not_allowed_local()
    return resolved


def s3_buckets(settings: Settings) -> set[str] | None:
    """Allowed bucket names, or None for any."""
    if settings.allowed_s3_buckets:
        return None if "*" in settings.allowed_s3_buckets else set(settings.allowed_s3_buckets)
    if settings.aws_s3_bucket:
        return {settings.aws_s3_bucket}
    return None


def check_s3(uri: str, settings: Settings) -> None:
    allowed = s3_buckets(settings)
    if allowed is None:
        return
    bucket = uri[5:].partition("/")[0]
    if bucket not in allowed:
        raise SourceNotAllowed(
            f"S3 bucket {bucket!r} is not an allowed model source; allowed buckets are set by {S3_SETTING} "
            "(default: AWS_S3_BUCKET)"
        )


def _netloc(url: str) -> str:
    """``host:port`` of a URL, lower-cased, without userinfo and with the scheme's default port."""
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    try:
        port = parsed.port
    except ValueError:
        raise InvalidUri("the MLflow URI has an invalid port") from None
    if port is None:
        port = {"https": 443, "http": 80}.get(parsed.scheme.lower())
    return f"{host}:{port}" if port else host


def mlflow_hosts(settings: Settings) -> set[str]:
    """``host:port`` of every MLflow server the coordinator may call (and send credentials to)."""
    hosts: set[str] = set()
    tracking = settings.mlflow_tracking_uri or ""
    if _scheme(tracking) in {"http", "https"}:
        hosts.add(_netloc(tracking))
    for listed in settings.allowed_mlflow_hosts:
        item = listed.strip().lower()
        if "://" in item:
            hosts.add(_netloc(item))
        elif item:  # a bare host allows its default http and https ports
            hosts.update({item} if ":" in item else {f"{item}:80", f"{item}:443"})
    return hosts


def check_mlflow_host(url: str, settings: Settings) -> None:
    """``url`` (``http(s)://HOST…`` or ``mlflow-artifacts://HOST…``) must name an allowed server."""
    parsed = urlparse(url)
    if not parsed.netloc:
        return  # no host: the configured tracking server
    scheme = parsed.scheme.lower()
    if scheme == "mlflow-artifacts":
        # Served by the tracking server's scheme; compare host:port only.
        tracking_scheme = urlparse(settings.mlflow_tracking_uri or "").scheme.lower()
        url = f"{tracking_scheme if tracking_scheme in {'http', 'https'} else 'http'}://{parsed.netloc}/"
    if _netloc(url) not in mlflow_hosts(settings):
        raise SourceNotAllowed(
            "the MLflow server named in registry_uri is not the configured tracking server; "
            f"other MLflow hosts must be listed in {MLFLOW_SETTING}"
        )


def check_credentials(uri: str) -> None:
    if has_credentials(uri):
        raise InvalidUri(
            "registry_uri must not carry credentials (user:password@ or a secret query parameter); "
            "give them to the server through its environment or a mounted secret "
            "(AWS_*, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD)"
        )


def admit(uri: str, settings: Settings) -> None:
    """Refuse ``uri`` unless the policy allows it (InvalidUri 400 / SourceNotAllowed 403).

    Cheap and without I/O beyond resolving local symlinks: the coordinator calls it
    before a load enters the table, and the loader again before fetching.
    """
    check_credentials(uri)
    scheme = _scheme(uri)
    if scheme in {"", "file"}:
        check_local(uri, settings)
    elif scheme == "s3":
        check_s3(uri, settings)
    elif scheme == "mlflow-artifacts":
        check_mlflow_host(uri, settings)
