"""gzip and deflate on the inference routes, both ways, as Triton's HTTP endpoint does.

Requests: ``Content-Encoding: gzip|deflate`` bodies are inflated with a cap, so a
small compressed body cannot expand past ``MODEL_SERVER_MAX_REQUEST_BYTES``.
Responses: compressed only when the client's ``Accept-Encoding`` asks for gzip or
deflate (tritonclient's ``response_compression_algorithm``, ``curl --compressed``)
and the body is large enough for it to pay; otherwise sent as they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from starlette.responses import Response

from .errors import ApiError

ENCODINGS = ("gzip", "deflate")
# Below this a compressed body saves less than its CPU and header cost.
MIN_COMPRESS_BYTES = 1024
# Speed over ratio: tensors compress poorly past level 1 and the frontend's CPU is the budget.
LEVEL = 1


def _wbits(encoding: str) -> int:
    # HTTP "deflate" is the zlib format (RFC 9110), which is what clients send and expect.
    return 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS


def decompress_request(
    headers: Mapping[str, str], body: bytes | memoryview, limit: int
) -> bytes | memoryview:
    encoding = headers.get("content-encoding", "").lower().strip()
    if encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise ApiError(400, "bad_encoding", f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(_wbits(encoding))
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, "bad_encoding", f"cannot decompress the {encoding} body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ApiError(413, "payload_too_large", f"decompressed body exceeds {limit} bytes")
    return out


def response_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate if ``Accept-Encoding`` accepts one (highest q wins, gzip on a tie), else None."""
    best: tuple[float, int, str] | None = None
    for item in (accept_encoding or "").split(","):
        token, *params = (part.strip().lower() for part in item.split(";"))
        if token not in ENCODINGS:
            continue
        q = _quality(next((v for k, _, v in (p.partition("=") for p in params) if k.strip() == "q"), "1"))
        rank = (q, -ENCODINGS.index(token), token)
        if q > 0 and (best is None or rank > best):
            best = rank
    return best[2] if best else None


def _quality(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0  # a q we cannot read accepts nothing


def compress_response(response: Response, accept_encoding: str | None) -> Response:
    """The response, its body compressed if the client asked and it pays (status 200 only)."""
    if response.status_code != 200 or len(response.body) < MIN_COMPRESS_BYTES:
        return response
    encoding = response_encoding(accept_encoding)
    if encoding is None:
        return response
    body = zlib.compress(response.body, LEVEL, _wbits(encoding))
    response.body = body
    response.raw_headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"] + [
        (b"content-length", str(len(body)).encode()),
        (b"content-encoding", encoding.encode()),
        (b"vary", b"accept-encoding"),
    ]
    return response
