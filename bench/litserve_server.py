"""LitServe 0.2.19 serving the reference ONNX models with onnxruntime, V2 JSON in and out.

Run inside ``.venv-litserve`` by :class:`bench.peers.LitServePeer`::

    python -m bench.litserve_server --port P --workers 2 --api-servers 2 tabular=/path/tabular.onnx

One ``LitAPI`` per model on ``/v2/models/<name>/infer`` so the same wrk bodies drive
every peer; ``decode_request`` takes the V2 JSON body (LitServe parses it with
``request.json()`` in the API server), ``predict`` runs onnxruntime with
:func:`bench.ort_options.session_options` (one thread), ``encode_response`` answers V2
JSON. ``fast_queue=True`` puts LitServe's ZeroMQ queue between API servers and workers.
"""

import argparse
from typing import Any

import litserve as ls  # type: ignore[import-not-found, unused-ignore]
import numpy as np
from fastapi import Request

from bench.ort_options import session_options
from bench.v2_peer_codec import decode_inputs, encode_outputs


class OnnxV2API(ls.LitAPI):  # type: ignore[misc, unused-ignore]
    def __init__(self, model_name: str, model_path: str) -> None:
        super().__init__(api_path=f"/v2/models/{model_name}/infer")
        self.model_name = model_name
        self.model_path = model_path

    def setup(self, device: str) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            self.model_path, session_options(), providers=["CPUExecutionProvider"]
        )
        self.output_names = [output.name for output in self.session.get_outputs()]

    # LitServe reads this annotation at run time (so no postponed annotations in this
    # module): ``Request`` makes its API server pass the parsed JSON body here.
    def decode_request(self, request: Request, **kwargs: Any) -> dict[str, np.ndarray]:
        return decode_inputs(request)

    def predict(self, x: dict[str, np.ndarray], **kwargs: Any) -> list[np.ndarray]:
        return list(self.session.run(self.output_names, x))

    def encode_response(self, output: list[np.ndarray], **kwargs: Any) -> dict[str, Any]:
        return encode_outputs(self.model_name, self.output_names, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="inference workers per model")
    parser.add_argument("--api-servers", type=int, default=2)
    parser.add_argument("models", nargs="+", metavar="NAME=PATH")
    args = parser.parse_args()
    apis = [OnnxV2API(*item.split("=", 1)) for item in args.models]
    server = ls.LitServer(
        apis, accelerator="cpu", devices=1, workers_per_device=args.workers, fast_queue=True, timeout=60
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
