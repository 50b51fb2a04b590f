"""Model sources: resolve a registry URI to a verified local ONNX file and its schema."""

from .artifact import Artifact, Progress
from .errors import LoadError
from .resolve import default_uri, load_artifact, register_source

__all__ = ["Artifact", "LoadError", "Progress", "default_uri", "load_artifact", "register_source"]
