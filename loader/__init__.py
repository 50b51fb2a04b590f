"""Model sources: resolve a registry URI to a verified local ONNX file and its schema.

Importing this package registers every source (local paths, ``file:``, ``s3:``,
``models:``, ``runs:``, ``mlflow-artifacts:``); boto3 and mlflow themselves are
imported on first use. See ``loader.resolve`` for the URI rules and
``loader.cache`` for the artifact cache and its pin/release contract.
"""

from . import mlflow_source, policy, s3_source
from .artifact import Artifact, Progress
from .cache import pin, release
from .errors import LoadError
from .resolve import default_uri, load_artifact, register_source

__all__ = [
    "Artifact",
    "LoadError",
    "Progress",
    "default_uri",
    "load_artifact",
    "mlflow_source",
    "pin",
    "policy",
    "register_source",
    "release",
    "s3_source",
]
