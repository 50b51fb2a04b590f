"""frontend.json_tensors against the slow path it stands in for.

The slow path is orjson then ``tensors.from_json`` (V2) or ``tensors.from_json(lenient=True)``
(v1 named tensors, whose shape is the nesting). Whatever the fast path decodes
must be accepted there too and come out bit for bit the same; whatever it
cannot vouch for it returns as None, never as a different array.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.errors import ApiError
from frontend.json_tensors import decode_numeric
from frontend.tensors import from_json
from ipc import datatypes

NUMERIC = ["FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
FLOATS = ["FP16", "FP32", "FP64"]
INTS = [d for d in NUMERIC if d not in FLOATS]
Outcome = np.ndarray[Any, Any] | None


def decode(raw: bytes | memoryview, datatype: str, shape: Sequence[int], flat_ok: bool = True) -> Outcome:
    """The fast path at any size (by default it leaves small texts, where it is slower, to the slow one)."""
    return decode_numeric(raw, datatype, shape, flat_ok=flat_ok, min_elements=0)


def slow_v2(raw: bytes, datatype: str, shape: Sequence[int]) -> Outcome:
    """The V2 slow path's array, or None where it rejects the data."""
    try:
        return from_json(orjson.loads(raw), datatype, "input 'x'", list(shape))
    except (orjson.JSONDecodeError, ApiError, OverflowError):
        return None


def slow_v1(raw: bytes, datatype: str, shape: Sequence[int]) -> Outcome:
    """The /v1 (lenient) array where its shape is the one asked for, else None."""
    try:
        arr = from_json(orjson.loads(raw), datatype, "input 'x'", lenient=True)
    except (orjson.JSONDecodeError, ApiError, OverflowError):
        return None
    return arr if arr.shape == tuple(shape) else None


def same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> bool:
    """Same dtype, shape and bytes: -0.0 and +0.0, or two float roundings, are different here."""
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def check(raw: bytes, datatype: str, shape: Sequence[int]) -> Outcome:
    """The fast path's answer, after checking it against both slow paths."""
    fast = decode(raw, datatype, shape)
    if fast is not None:
        want = slow_v2(raw, datatype, shape)
        assert want is not None, f"fast path accepted what V2 rejects: {raw[:200]!r}"
        assert same(fast, want), f"{raw[:200]!r}: {fast!r} != {want!r}"
    nested = decode(memoryview(raw), datatype, shape, flat_ok=False)
    if nested is not None:
        want = slow_v1(raw, datatype, shape)
        assert want is not None, f"fast path accepted what v1 rejects: {raw[:200]!r}"
        assert same(nested, want.astype(datatypes.OIP_TO_NUMPY[datatype]))
        assert fast is not None and same(nested, fast)
    return fast


# --- what the generated data is made of --------------------------------------------------------

INT_EDGES = [
    0,
    1,
    -1,
    127,
    128,
    -128,
    -129,
    255,
    256,
    32767,
    -32768,
    65535,
    65536,
    2**31 - 1,
    -(2**31),
    2**32 - 1,
    2**32,
    2**53,
    2**53 + 1,
    -(2**53) - 1,
    2**63 - 1,
    -(2**63),
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
]
FLOAT_EDGES = [
    "-0.0",
    "0.0",
    "-0",
    "0e0",
    "-0E-0",
    "1E5",
    "1e+5",
    "5e-324",
    "2.4703282292062328e-324",
    "2.2250738585072011e-308",
    "1.7976931348623157e308",
    "1.7976931348623159e308",
    "1e400",
    "-1e400",
    "1e-400",
    "65504",
    "65520",
    "65519.99999",
    "6.103515625e-05",
    "5.960464477539063e-08",
    "3.4028234663852886e38",
    "3.4028235677973366e38",
    "16777217",
    "0.1",
    "0.30000000000000004",
    "9007199254740993",
    "9007199254740993.0",
    "123456789012345678901234567890",
    "0.000001",
    "1.00000000000000011102230246251565404236316680908203125",
]
# JSON Arrow's parser (or a loose reading) would take but JSON does not, and plain bad values.
INVALID = [
    "01",
    "-01",
    "00",
    "00.5",
    ".5",
    "-.5",
    "5.",
    "5.e3",
    "+1",
    "+1.5",
    "inf",
    "-inf",
    "Infinity",
    "NaN",
    "nan",
    "0x10",
    "0X1f",
    "1e",
    "1e+",
    "1.2.3",
    "1e5.5",
    "--1",
    "-",
    "1-2",
    "1_0",
    "1 2",
    "",
    "null",
    "true",
    "false",
    '"1"',
    '"1.5"',
    "[]",
    "{}",
    "1d",
    "\u0661",
]


@st.composite
def json_numbers(draw: st.DrawFn) -> str:
    """A valid JSON number: digits of any length, any exponent, either case, either sign."""
    sign = draw(st.sampled_from(["", "-"]))
    integer = draw(st.sampled_from(["0", ""]) | st.from_regex(r"[1-9][0-9]{0,24}", fullmatch=True))
    if not integer:
        integer = "0"
    fraction = draw(st.sampled_from(["", ""]) | st.from_regex(r"\.[0-9]{1,25}", fullmatch=True))
    exponent = draw(st.sampled_from(["", ""]) | st.from_regex(r"[eE][+-]?[0-9]{1,3}", fullmatch=True))
    return sign + integer + fraction + exponent


def float_token() -> st.SearchStrategy[str]:
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
        st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 25)).map(
            lambda fp: f"{fp[0]:.{fp[1]}e}"
        ),
        json_numbers(),
        st.sampled_from(FLOAT_EDGES),
    )


def int_token() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.integers(-300, 300).map(str),
        st.sampled_from(INT_EDGES).map(str),
    )


def token(datatype: str) -> st.SearchStrategy[str]:
    if datatype == "BOOL":
        usual = st.sampled_from(["true", "false"])
        return st.one_of(usual, usual, usual, st.sampled_from(["0", "1", "null", "1.0", "True"]))
    mostly = float_token() if datatype in FLOATS else int_token()
    return st.one_of(mostly, mostly, mostly, float_token(), int_token(), st.sampled_from(INVALID))


def render(tokens: list[str], shape: Sequence[int], nested: bool, sep: str) -> str:
    """Tokens as a JSON list, flat or nested as ``shape``, elements joined by ``sep``."""
    if not nested or len(shape) <= 1:
        return "[" + sep.join(tokens) + "]" if shape else tokens[0]
    size = math.prod(shape[1:])
    rows = [render(tokens[i * size : (i + 1) * size], shape[1:], True, sep) for i in range(shape[0])]
    return "[" + sep.join(rows) + "]"


MUTATIONS = [
    "drop",
    "extra",
    "ragged",
    "bracket",
    "unbracket",
    "comma",
    "transpose",
    "space",
    "garbage",
    "wrap",
]


def mutate(text: str, how: str, rnd: np.random.Generator) -> str:
    """One structural mistake in ``text`` (JSON that does not fit, or text that is not JSON)."""
    if how == "drop":  # the last element goes: one value short (and ragged when nested)
        cut = text.rfind(",")
        return text[:cut] + text[text.rfind("]") :] if cut > 0 else text
    if how == "extra":
        return text[:-1] + ",1]" if text.endswith("]") else text
    if how == "ragged":  # an element moves from one row to the next
        i = text.find("],[")
        return text[:i] + text[i + 1 : i + 3] + "]" + text[i + 3 :] if i > 0 else text
    pos = int(rnd.integers(0, len(text) + 1))
    insert = {
        "bracket": "[",
        "unbracket": "]",
        "comma": ",",
        "space": " ",
        "garbage": str(rnd.choice(["x", "-", ".", "e", "0", "\x00", "\u00e9", '"', "]["])),
    }
    if how in insert:
        return text[:pos] + insert[how] + text[pos:]
    if how == "wrap":
        return "[" + text + "]"
    return text  # transpose: changes the shape, not the text


@st.composite
def cases(draw: st.DrawFn, mutations: bool) -> tuple[bytes, str, list[int]]:
    datatype = draw(st.sampled_from([*NUMERIC, "BOOL"]))
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    tokens = draw(st.lists(token(datatype), min_size=math.prod(shape), max_size=math.prod(shape)))
    nested = draw(st.booleans())
    sep = draw(st.sampled_from([",", ",", ", ", " , ", ",\n  ", "\t,"]))
    text = render(tokens, shape, nested, sep)
    if mutations and draw(st.booleans()):
        how = draw(st.sampled_from(MUTATIONS))
        text = mutate(text, how, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
        if how == "transpose" and len(shape) > 1:
            shape = shape[::-1]
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", " ", "\r\n"]))
    return text.encode(), datatype, shape


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None, derandomize=True)
@given(cases(mutations=True))
def test_never_disagrees_with_the_slow_paths(case: tuple[bytes, str, list[int]]) -> None:
    raw, datatype, shape = case
    check(raw, datatype, shape)


@st.composite
def valid_cases(draw: st.DrawFn) -> tuple[bytes, str, list[int]]:
    """Data the slow path takes, of a kind the fast path is for: it must decode every one."""
    datatype = draw(st.sampled_from([*NUMERIC, "BOOL"]))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    count = math.prod(shape)
    if datatype == "BOOL":
        tokens = draw(st.lists(st.sampled_from(["true", "false"]), min_size=count, max_size=count))
    elif datatype in FLOATS:
        finite = float_token().filter(lambda t: math.isfinite(float(t)) and abs(float(t)) < 1e300)
        small_ints = st.integers(-(2**62), 2**62).map(str)
        tokens = draw(st.lists(st.one_of(finite, small_ints), min_size=count, max_size=count))
    else:
        info = np.iinfo(datatypes.OIP_TO_NUMPY[datatype].str)
        fits = st.integers(int(info.min), min(int(info.max), 2**63 - 1)).map(str)
        tokens = draw(st.lists(fits, min_size=count, max_size=count))
    nested = draw(st.booleans())
    text = render(tokens, shape, nested, draw(st.sampled_from([",", ", ", ",\n "])))
    return text.encode(), datatype, shape


@settings(max_examples=300, deadline=None, derandomize=True)
@given(valid_cases())
def test_decodes_what_it_is_for(case: tuple[bytes, str, list[int]]) -> None:
    raw, datatype, shape = case
    assert check(raw, datatype, shape) is not None, raw[:200]


# --- examples ------------------------------------------------------------------------------------


def test_cnn_image_flat_nested_and_spaced_match_the_slow_path() -> None:
    rng = np.random.default_rng(7)
    image = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    shape = [1, 3, 224, 224]
    bodies = {
        "flat": orjson.dumps(image.ravel().tolist()),
        "nested": orjson.dumps(image.tolist()),
        "spaced": json.dumps(image.ravel().tolist()).encode(),
        "rounded": json.dumps(np.round(image.astype(np.float64).ravel(), 4).tolist()).encode(),
    }
    for name, raw in bodies.items():
        fast = decode(raw, "FP32", shape)
        assert fast is not None, name
        assert same(fast, from_json(orjson.loads(raw), "FP32", "x", shape)), name


@pytest.mark.parametrize("datatype", ["UINT8", "INT64", "FP16", "FP64"])
def test_integer_image_matches_the_slow_path(datatype: str) -> None:
    """Pixel values as JSON integers: the int64 path, and big enough for the default MIN_ELEMENTS."""
    image = np.random.default_rng(11).integers(0, 256, size=(1, 3, 224, 224))
    for raw in (orjson.dumps(image.ravel().tolist()), json.dumps(image.tolist()).encode()):
        fast = decode_numeric(raw, datatype, [1, 3, 224, 224])
        assert fast is not None
        assert same(fast, from_json(orjson.loads(raw), datatype, "x", [1, 3, 224, 224]))


def test_tabular_row() -> None:
    row = np.random.default_rng(3).standard_normal(30)
    raw = orjson.dumps(row.tolist())
    assert decode_numeric(raw, "FP32", [1, 30]) is None  # below MIN_ELEMENTS: the slow path is faster
    fast = decode(raw, "FP32", [1, 30])
    assert fast is not None
    assert same(fast, row.astype(np.float32).reshape(1, 30))


@pytest.mark.parametrize("bad", INVALID)
@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BOOL"])
def test_bad_values_fall_back(bad: str, datatype: str) -> None:
    """Each of them, among good values, leaves the tensor to the slow path, which rejects it."""
    if datatype == "BOOL" and bad in ("true", "false"):
        pytest.skip("a good value for BOOL")
    good = "true" if datatype == "BOOL" else "1"
    raw = f"[{good},{bad},{good}]".encode()
    assert decode(raw, datatype, [3]) is None
    if bad not in ("true", "false"):  # V2 takes [1,true,1] as numbers (bool and int make int64)
        assert slow_v2(raw, datatype, [3]) is None


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("[[1,2],[3]]", [2, 2]),  # ragged, right rank
        ("[[1,2],[3,4,5]]", [5]),  # ragged, right count
        ("[[1,2],3,4]", [4]),
        ("[1,2,3]", [2, 2]),
        ("[1,2,3,4,5]", [2, 2]),
        ("[1,2,3,4]]", [4]),
        ("[[1,2,3,4]", [4]),
        ("[1,2,,3]", [4]),
        ("[1,2,3,]", [3]),
        ("[,1,2,3]", [3]),
        ("[[1,2]5,[3,4]]", [2, 2]),
        ("[[1,]2,[3,4]]", [2, 2]),
        ("[[1,2],[3,4]]x", [2, 2]),
        ("[1,2][3,4]", [4]),
        ("[1 2,3]", [2]),
        ("[[1.5,2.5],3[.5,4.5]]", [2, 2]),  # a bracket inside a number, the counts right
        ("[1[1.25,2.5],[3.5,4.5]]", [2, 2]),
        ("[[1.5,2.5]0,[3.5,4.5]]", [2, 2]),
        ("[[1.5,2.5],[3.5,4.5]0]", [2, 2]),
        ("[[1.5,2.]5,[3.5,4.5]]", [2, 2]),
        ("[[1.5,2.]55,[3.5,4.5]]", [2, 2]),  # the bracket where a separator's zero would hide it
        ("[[1.5,2.5],11[.5,4.5]]", [2, 2]),
        ("[]", [0]),
        ("[[],[]]", [2, 0]),
    ],
)
def test_bad_structure_falls_back(text: str, shape: list[int]) -> None:
    assert decode(text.encode(), "FP32", shape) is None


def test_nesting_other_than_the_shape_falls_back_though_the_slow_path_takes_it() -> None:
    raw = b"[[1,2,3],[4,5,6]]"
    assert slow_v2(raw, "FP32", [3, 2]) is not None
    assert decode(raw, "FP32", [3, 2]) is None
    assert decode(raw, "FP32", [2, 3]) is not None


def test_v1_takes_only_the_nesting_of_its_shape() -> None:
    assert decode(b"[1,2,3,4]", "FP32", [2, 2], flat_ok=False) is None
    nested = decode(b"[[1,2],[3,4]]", "FP32", [-1, 2], flat_ok=False)
    assert nested is not None and nested.shape == (2, 2)
    assert decode(b"[[1,2],[3,4],[5,6]]", "FP32", [-1, 2], flat_ok=False) is not None
    assert decode(b"[[1,2,3],[4,5,6]]", "FP32", [-1, 2], flat_ok=False) is None
    assert decode(b"[1,2,3]", "FP32", [-1, 2]) is None  # 3 values are not rows of 2


def test_integer_minus_zero_is_plus_zero_beside_floats() -> None:
    """orjson reads ``-0`` as the int 0; numpy makes it +0.0. ``-0.0`` stays negative."""
    for text in (b"[-0,1.5]", b"[1.5,-0]", b"[-0.0,-0,-0e0]", b"[-0,-0]"):
        fast = check(text, "FP64", [len(orjson.loads(text))])
        assert fast is not None
    fast = decode(b"[-0,-0.0,1.5]", "FP64", [3])
    assert fast is not None
    assert np.signbit(fast).tolist() == [False, True, False]


def test_integers_beyond_two_to_the_53_stay_exact() -> None:
    values = [2**53 + 1, -(2**63), 2**63 - 1, 123456789012345678]
    fast = check(orjson.dumps(values), "INT64", [4])
    assert fast is not None and fast.tolist() == values
    # All integers: int64 then cast, as the slow path does (not float64 first).
    fast = check(b"[9007199254740993, 1]", "FP32", [2])
    assert fast is not None
    # Beside a float they go through float64, as the slow path does.
    assert check(b"[9007199254740993, 1.5]", "FP32", [2]) is not None


def test_out_of_range_integers_fall_back() -> None:
    assert check(b"[1,128]", "INT8", [2]) is None
    assert check(b"[-1,2]", "UINT8", [2]) is None
    assert check(b"[9223372036854775808]", "UINT64", [1]) is None  # the slow path takes it as uint64
    assert check(b"[1.0,2]", "INT32", [2]) is None  # integers written as floats: the slow path decides


def test_half_floats_round_like_numpy() -> None:
    text = b"[65519.99999,65520,0.1,5.960464477539063e-08,2.98e-08,1e-9,-65504]"
    fast = check(text, "FP16", [7])
    assert fast is not None and fast.dtype == np.float16


def test_bools() -> None:
    fast = check(b"[[true,false],[false,true]]", "BOOL", [2, 2])
    assert fast is not None and fast.tolist() == [[True, False], [False, True]]
    assert check(b"[1,0]", "BOOL", [2]) is None  # v1 takes 0/1, V2 does not: the slow paths decide
    assert check(b"[true,1]", "FP32", [2]) is None


def test_nested_exponents_and_separators() -> None:
    """Exponents before separators of every width ("," "],[" "]],[[") move right to make room."""
    for text, shape in [
        (b"[[1.5e-3,-2.5],[3.5E+2,4.5e1]]", [2, 2]),
        (b"[[[1.5,2.5e-300]],[[-3.5e10,4.5]]]", [2, 1, 2]),
        (b"[[1.5e0],[2.5E-0],[-0.5e+00]]", [3, 1]),
        (b"[1.5e-3, -2.5e-3, 3.5, 4.5E7]", [4]),
    ]:
        fast = check(text, "FP64", shape)
        assert fast is not None, text


def test_many_exponents() -> None:
    """More exponents than memchr looks for one by one: found by the vectorised compare instead."""
    values = np.random.default_rng(5).standard_normal(1000) * 10.0 ** np.linspace(-300, 300, 1000)
    tokens = [f"{v:.9e}" if i % 2 else f"{v:.17E}" for i, v in enumerate(values)]
    for sep in (",", ", "):
        fast = check(("[" + sep.join(tokens) + "]").encode(), "FP64", [1000])
        assert fast is not None
        nested = check(("[[" + "],[".join(tokens) + "]]").encode(), "FP32", [1000, 1])
        assert nested is not None


def test_scalar_and_whitespace() -> None:
    assert check(b"2.5", "FP32", []) is not None
    assert check(b" [ [ 1 , 2 ] ,\n [ 3 , 4 ] ] ", "INT32", [2, 2]) is not None
    assert check(b"[\t1,\r\n2]", "FP64", [2]) is not None


def test_unsupported_datatypes() -> None:
    assert decode(b'["a"]', "BYTES", [1]) is None
    assert decode(b"[1]", "BF16", [1]) is None
    assert decode(b"[1]", "FP8", [1]) is None


def test_result_is_writable_and_owns_its_memory() -> None:
    raw = bytearray(b"[1.5,2.5]")
    fast = decode(memoryview(raw), "FP64", [2])
    assert fast is not None
    raw[1:4] = b"9.5"  # the request buffer goes back to its pool: the array must not see it
    assert fast.tolist() == [1.5, 2.5]
    fast[0] = 0.0
