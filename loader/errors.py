"""Load failures a user can act on, each with the HTTP status it maps to."""

from __future__ import annotations

from .redact import redact


class LoadError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` a stable machine-readable name.

    The message is redacted (URL credentials, registered secrets) on construction, so
    it is safe for logs and HTTP error bodies.
    """

    status = 500
    code = "load_failed"

    def __init__(self, message: str) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message

    def copy(self) -> LoadError:
        """A fresh exception of the same type and message (one per waiting caller)."""
        return type(self)(self.message)


class ModelNotFound(LoadError):
    status = 404
    code = "model_not_found"


class AccessDenied(LoadError):
    status = 403
    code = "access_denied"


class SourceNotAllowed(LoadError):
    """The model-source policy (``loader.policy``) refuses the URI; the message names the setting."""

    status = 403
    code = "source_not_allowed"


class InvalidModel(LoadError):
    """Not an ONNX model, or a flavor we cannot serve."""

    status = 422
    code = "invalid_model"


class SourceUnavailable(LoadError):
    """Registry or object store unreachable or failing."""

    status = 502
    code = "source_unavailable"


class SourceTimeout(LoadError):
    status = 504
    code = "source_timeout"


class InsufficientStorage(LoadError):
    """The artifact cache's disk is full."""

    status = 507
    code = "insufficient_storage"


class InvalidUri(LoadError):
    """A registry URI that does not parse (``models:/`` without a name, ``s3://`` without a bucket)."""

    status = 400
    code = "invalid_uri"


class UnsupportedSource(LoadError):
    status = 400
    code = "unsupported_source"
