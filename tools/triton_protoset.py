"""Writes the KServe V2 / Triton gRPC protocol as a FileDescriptorSet (``frontend/grpc/triton.protoset``).

The source is the published ``grpc_service.proto`` and ``model_config.proto`` as compiled into
the installed ``tritonclient`` wheel (``tritonclient.grpc.service_pb2``/``model_config_pb2``): the
exact protocol Triton's clients speak, with the original file names, so the descriptors our
generated modules register are the very ones tritonclient's register (both can live in one
process). ``make grpc-proto`` runs this, then ``grpc_tools.protoc`` on the set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2


def main() -> int:
    out = Path(sys.argv[1])
    files = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.file.append(proto)
    out.write_bytes(files.SerializeToString(deterministic=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
