"""Unit tests of ipc.datatypes: the OIP <-> numpy <-> ONNX tables and BYTES serialization."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import datatypes as dt


def test_every_supported_name_maps_both_ways() -> None:
    for name, dtype in dt.OIP_TO_NUMPY.items():
        if name == "BYTES":
            assert dtype == np.dtype(object)
            continue
        assert dt.numpy_dtype(name) == dtype
        assert dt.oip_datatype(dtype) == name
        assert dt.element_size(name) == dtype.itemsize
    assert dt.SUPPORTED | {"BF16"} == dt.KNOWN
    assert "BF16" not in dt.SUPPORTED


def test_onnx_and_ort_tables_agree() -> None:
    # Same OIP name whether a type is read from the ONNX graph or from an ORT session.
    onnx_names = set(dt.ONNX_ELEM_TO_OIP.values())
    ort_names = set(dt.ORT_TYPE_TO_OIP.values())
    assert onnx_names == ort_names == dt.KNOWN
    assert dt.ONNX_ELEM_TO_OIP[1] == "FP32"
    assert dt.ONNX_ELEM_TO_OIP[7] == "INT64"
    assert dt.ONNX_ELEM_TO_OIP[8] == "BYTES"
    assert dt.ORT_TYPE_TO_OIP["tensor(string)"] == "BYTES"


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (np.dtype(">f4"), "FP32"),
        (np.dtype(">i8"), "INT64"),
        (np.dtype("=u2"), "UINT16"),
        (np.dtype(np.bool_), "BOOL"),
        (np.dtype("U5"), "BYTES"),
        (np.dtype("S3"), "BYTES"),
        (np.dtype(object), "BYTES"),
    ],
)
def test_oip_datatype_of_numpy(dtype: np.dtype[np.generic], name: str) -> None:
    assert dt.oip_datatype(dtype) == name


@pytest.mark.parametrize("dtype", [np.dtype(np.complex64), np.dtype("M8[s]"), np.dtype([("a", "i4")])])
def test_oip_datatype_rejects_unmapped(dtype: np.dtype[np.generic]) -> None:
    with pytest.raises(ValueError, match="no protocol datatype"):
        dt.oip_datatype(dtype)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unsupported datatype 'FP8'"):
        dt.numpy_dtype("FP8")
    with pytest.raises(ValueError, match="BYTES has no fixed element size"):
        dt.element_size("BYTES")
    with pytest.raises(ValueError):
        dt.nbytes_of("BYTES", [2])


def test_nbytes_of() -> None:
    assert dt.nbytes_of("FP32", [2, 3]) == 24
    assert dt.nbytes_of("FP16", [5]) == 10
    assert dt.nbytes_of("INT64", []) == 8  # a scalar
    assert dt.nbytes_of("UINT8", [0, 7]) == 0


def test_bytes_layout_is_length_prefixed_little_endian() -> None:
    arr = np.array([["ab", ""], ["é", "xyz"]], dtype=object)
    raw = dt.serialize_bytes(arr)
    expected = b"".join(struct.pack("<I", len(s)) + s for s in [b"ab", b"", "é".encode(), b"xyz"])
    assert raw == expected


def test_bytes_round_trip_empty_unicode_and_binary() -> None:
    items = ["", "plain", "naïve ✓ 日本語", "\x00nul", "🎉" * 10]
    arr = np.array(items, dtype=object).reshape(5, 1)
    out = dt.deserialize_bytes(dt.serialize_bytes(arr), 5)
    assert out.dtype == object
    assert [b.decode("utf-8") for b in out] == items
    binary = np.array([b"\xff\x00\xfe", b""], dtype=object)
    assert list(dt.deserialize_bytes(dt.serialize_bytes(binary))) == [b"\xff\x00\xfe", b""]
    # numpy fixed-width str and bytes arrays serialize like object arrays.
    assert dt.serialize_bytes(np.array(["a", "bc"])) == dt.serialize_bytes(np.array([b"a", b"bc"]))
    assert len(dt.deserialize_bytes(b"", 0)) == 0
    assert len(dt.deserialize_bytes(memoryview(b""))) == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=20)), max_size=20))
def test_bytes_round_trip_property(items: list[str | bytes]) -> None:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    raw = dt.serialize_bytes(arr)
    want = [i.encode("utf-8") if isinstance(i, str) else i for i in items]
    assert list(dt.deserialize_bytes(raw, len(items))) == want
    assert list(dt.deserialize_bytes(memoryview(raw))) == want
    # Every strict prefix is either a shorter valid sequence or an error: never the full item list.
    for cut in range(len(raw)):
        try:
            got = dt.deserialize_bytes(raw[:cut], len(items))
        except ValueError:
            continue
        pytest.fail(f"truncated buffer of {cut}/{len(raw)} bytes decoded as {got!r}")


def test_truncated_buffers_raise() -> None:
    raw = dt.serialize_bytes(np.array(["hello", "world"], dtype=object))
    with pytest.raises(ValueError, match="inside a length prefix"):
        dt.deserialize_bytes(raw[:11])  # 9 bytes of item 1, then 2 of the next prefix
    with pytest.raises(ValueError, match="runs past the end"):
        dt.deserialize_bytes(raw[:-1])
    with pytest.raises(ValueError, match="holds 1 elements, shape needs 2"):
        dt.deserialize_bytes(raw[:9], 2)
    with pytest.raises(ValueError, match="inside a length prefix"):
        dt.deserialize_bytes(raw + b"\x01")
    # A length prefix claiming more than the buffer holds.
    with pytest.raises(ValueError, match="runs past the end"):
        dt.deserialize_bytes(struct.pack("<I", 2**31) + b"abc")


def test_more_elements_than_the_shape_is_an_error() -> None:
    raw = dt.serialize_bytes(np.array(["a", "b", "c"], dtype=object))
    with pytest.raises(ValueError):
        dt.deserialize_bytes(raw, 2)
