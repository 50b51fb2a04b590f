"""Load failures a user can act on, each with the HTTP status it maps to."""

from __future__ import annotations


class LoadError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` a stable machine-readable name."""

    status = 500
    code = "load_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(LoadError):
    status = 404
    code = "model_not_found"


class AccessDenied(LoadError):
    status = 403
    code = "access_denied"


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


class UnsupportedSource(LoadError):
    status = 400
    code = "unsupported_source"
