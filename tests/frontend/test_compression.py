"""Accept-Encoding negotiation and the size/status rules of response compression."""

from __future__ import annotations

import gzip
import zlib

import pytest
from starlette.responses import Response

from frontend.compression import MIN_COMPRESS_BYTES, compress_response, decompress_request, response_encoding
from frontend.errors import ApiError


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("br", None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("deflate, gzip", "gzip"),  # equal q: gzip
        ("gzip;q=0.5, deflate", "deflate"),
        ("GZIP ; Q=0.9, deflate;q=0.2", "gzip"),
        ("gzip;q=0", None),
        ("gzip;q=0, deflate;q=0.1", "deflate"),
        ("gzip;q=oops", None),
        ("*", None),  # a wildcard does not oblige us to compress
    ],
)
def test_accept_encoding(header: str | None, chosen: str | None) -> None:
    assert response_encoding(header) == chosen


def test_large_ok_responses_are_compressed_and_round_trip() -> None:
    body = b'{"outputs": [' + b"0.125, " * 2000 + b"1]}"
    packed = compress_response(Response(body, media_type="application/json"), "gzip")
    headers = dict(packed.raw_headers)
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"vary"] == b"accept-encoding"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(packed.body) < len(body)
    assert gzip.decompress(packed.body) == body
    deflated = compress_response(Response(body), "deflate")
    assert zlib.decompress(deflated.body) == body


def test_small_and_error_responses_are_left_alone() -> None:
    small = b"x" * (MIN_COMPRESS_BYTES - 1)
    assert compress_response(Response(small), "gzip").body == small
    error = b"e" * 5000
    kept = compress_response(Response(error, status_code=400), "gzip")
    assert kept.body == error and b"content-encoding" not in dict(kept.raw_headers)


def test_request_bodies_inflate_with_a_cap() -> None:
    raw = b"a" * 10_000
    assert decompress_request({"content-encoding": "gzip"}, gzip.compress(raw), 10_000) == raw
    assert decompress_request({"content-encoding": "deflate"}, zlib.compress(raw), 10_000) == raw
    assert decompress_request({}, raw, 10) == raw  # not compressed: not the cap's business here
    with pytest.raises(ApiError) as bomb:
        decompress_request({"content-encoding": "gzip"}, gzip.compress(raw), 9_999)
    assert bomb.value.status == 413
    with pytest.raises(ApiError) as unknown:
        decompress_request({"content-encoding": "br"}, raw, 10_000)
    assert unknown.value.status == 400
    with pytest.raises(ApiError) as broken:
        decompress_request({"content-encoding": "gzip"}, b"not gzip at all", 10_000)
    assert broken.value.status == 400 and "cannot decompress" in broken.value.message
