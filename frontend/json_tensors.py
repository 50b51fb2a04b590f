"""Numeric JSON tensor data straight into numpy, without a Python object per element.

The slow path (``tensors.from_json``) lets orjson build a
Python float or int per element and numpy convert the nested lists: for a
150,528-value image that is most of a request's CPU. ``decode_numeric`` takes
the raw JSON text of a ``data`` value instead and, when the shape is known:

1. finds the commas and brackets with vectorised byte compares; every comma
   ends one element, so the elements are the text between commas;
2. checks the brackets sit exactly where a flat list or a nesting that matches
   the shape puts them, by counting the ``[`` and ``]`` before and after each
   element;
3. hands the elements, as one Arrow string array over the text, to Arrow's C
   number parser: a flat list (``,`` or ``, `` separators) from a copy whose
   separators are zeros that pad each number without changing it, anything
   else after trimming brackets and whitespace from each element;
4. checks the strict JSON number grammar that Arrow's parser is lenient about
   (leading zeros, ``.5``, ``5.``, ``+1``, ``inf``/``nan``, hex) on each
   element's first and last bytes.

pyarrow earns its place because its string-to-number casts are in C and
correctly rounded (fast_float, the same algorithm as C++ ``from_chars``): numpy's
own text parsers (``fromstring``, ``loadtxt``) call Python's ``strtod`` per
element and are slower than orjson.

The result is bit-identical to the slow path's: the slow path makes a float64
array when any element has a fraction or exponent (and an int64 array when none
has), then casts to the tensor's dtype; this module parses to the same
intermediate and casts the same way. Whatever it cannot decode for certain
(a rejected value, a string, ``null``, ragged or differently nested lists,
integers written as floats, values outside int64 or float64) gives ``None``, and
the caller runs the slow path, which produces the error message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ipc import datatypes

Array = npt.NDArray[Any]
Bytes = npt.NDArray[np.uint8]
Indices = npt.NDArray[np.intp]

_COMMA, _OPEN, _CLOSE = ord(","), ord("["), ord("]")
_MINUS, _PLUS, _DOT, _ZERO, _E_LOWER = ord("-"), ord("+"), ord("."), ord("0"), ord("e")
_LEADING = "[ \t\n\r"  # before an element: its list openings and whitespace
_TRAILING = "], \t\n\r"  # after an element: list closings, whitespace and the comma
_SPACES = (b" ", b"\n", b"\t", b"\r")
_SPACE = ord(" ")  # control characters are below it: not JSON, they fail the parse
# Below this many elements orjson and numpy are as fast or faster: Arrow's calls cost ~60 µs before
# the first number, and orjson's cost per element grows only once its floats outgrow the caches
# (python -m bench.json_decode; at 40,000 full-precision floats the fast path is still slower).
MIN_ELEMENTS = 65_536
_MAX_TEXT = 2**31 - 1  # Arrow string offsets are int32
_FEW_EXPONENTS = 256
_MAX_EXPONENT = 8  # bytes of "e-00324" and the like; longer ones take the trimming path


def decode_numeric(
    raw: bytes | memoryview,
    datatype: str,
    shape: Sequence[int],
    *,
    flat_ok: bool = True,
    min_elements: int = MIN_ELEMENTS,
) -> Array | None:
    """The ``datatype`` array of ``shape`` from the raw JSON text of a ``data`` value, or None.

    ``raw`` is a flat list, or nested lists whose nesting matches ``shape``
    (``flat_ok=False`` takes only the nested form, as v1 named tensors, whose
    shape comes from the nesting). A negative first dimension is the batch
    size, read from the element count. None means: use the slow path, which
    is also the faster one below ``min_elements`` elements.
    """
    if datatype not in datatypes.SUPPORTED or datatype == "BYTES" or len(raw) > _MAX_TEXT:
        return None
    if all(d >= 0 for d in shape) and math.prod(shape) < min_elements:
        return None  # before touching the text: small tensors go straight to the slow path
    data = bytes(raw)  # one copy: bytes searches run at memchr speed, numpy compares see the same buffer
    text = np.frombuffer(data, dtype=np.uint8)
    is_comma = text == _COMMA
    dims = _dims(shape, int(np.count_nonzero(is_comma)) + 1)
    if dims is None or math.prod(dims) < min_elements:
        return None  # counted before any per-element array exists: they stay within the tensor's size
    commas = np.flatnonzero(is_comma)
    brackets = _lists(data, text, commas, dims, flat_ok)
    if brackets is None:
        return None
    marks = _exponent_marks(data, text)
    elements = _elements(data, text, commas, marks, brackets, numeric=datatype != "BOOL")
    dtype = datatypes.OIP_TO_NUMPY[datatype]
    flat = _bools(elements) if datatype == "BOOL" else _numbers(data, text, marks, elements, dtype)
    if flat is None:
        return None
    return flat.reshape(dims)


def _dims(shape: Sequence[int], count: int) -> tuple[int, ...] | None:
    """``shape`` with a negative first dimension filled in from ``count``; None if it cannot hold it."""
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims[1:]):
        return None
    if dims and dims[0] < 0:
        row = math.prod(dims[1:])
        if row == 0 or count % row:
            return None
        dims = (count // row, *dims[1:])
    # Zero elements (``[]``, ``[[], []]``) are left to the slow path: they carry no numbers to parse.
    return dims if math.prod(dims) == count else None


class Brackets(NamedTuple):
    """Where the ``[`` and ``]`` are, and which element (commas before them) each falls in."""

    lists: int
    open_at: Indices
    opens: Indices
    close_at: Indices
    closes: Indices


def _lists(
    data: bytes, text: Bytes, commas: Indices, dims: tuple[int, ...], flat_ok: bool
) -> Brackets | None:
    """The brackets, if they sit where a flat list or ``dims`` nesting puts them.

    Element ``i`` is the text after comma ``i - 1`` up to and including comma
    ``i``. Counting brackets per element is enough: each element is then cut
    (or trimmed) to the number between its openings and closings, so a bracket
    anywhere else fails the checks or the parse.
    """
    count = len(commas) + 1
    can_be_flat = (flat_ok or len(dims) == 1) and bool(dims)
    ends = data[:1] == b"[" and data[-1:] == b"]"
    # The usual body: one bracket at each end and none between, found at memchr speed.
    if can_be_flat and ends and data.find(b"[", 1) < 0 and data.find(b"]", 0, len(data) - 1) < 0:
        first, last = np.zeros(1, dtype=np.intp), np.full(1, count - 1, dtype=np.intp)
        return Brackets(1, first, first, np.full(1, len(data) - 1, dtype=np.intp), last)
    positions = np.flatnonzero((text == _OPEN) | (text == _CLOSE))
    opening = text[positions] == _OPEN
    element = np.searchsorted(commas, positions)  # commas before each bracket
    found = Brackets(0, positions[opening], element[opening], positions[~opening], element[~opening])
    opens, closes = found.opens, found.closes
    if len(opens) == 1 and can_be_flat:
        flat = len(closes) == 1 and opens[0] == 0 and closes[0] == count - 1
        return found._replace(lists=1) if flat else None
    lists = sum(math.prod(dims[:depth]) for depth in range(len(dims)))
    if len(opens) != lists:
        return None
    want_opens, want_closes = _nesting(dims)
    fits = np.array_equal(opens, want_opens) and np.array_equal(closes, want_closes)
    return found._replace(lists=lists) if fits else None


def _nesting(dims: tuple[int, ...]) -> tuple[Indices, Indices]:
    """For nested lists of ``dims``: the element each list opens on and closes on, sorted."""
    starts: list[Indices] = []
    ends: list[Indices] = []
    for depth in range(len(dims)):
        lists, size = math.prod(dims[:depth]), math.prod(dims[depth:])
        first = np.arange(lists, dtype=np.intp) * size
        starts.append(first)
        ends.append(first + (size - 1))
    if not starts:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    return np.sort(np.concatenate(starts)), np.sort(np.concatenate(ends))


class Elements(NamedTuple):
    """The elements as Arrow strings to parse, and where their JSON text is, to check it."""

    strings: pa.StringArray
    starts: Indices  # each element's first byte in ``chars``
    ends: Indices  # one past its last byte
    chars: Bytes


def _elements(
    data: bytes,
    text: Bytes,
    commas: Indices,
    marks: Indices,
    brackets: Brackets,
    numeric: bool,
) -> Elements:
    """Each element's text without brackets, whitespace and commas."""
    flat = brackets.lists == 1 and text[0] == _OPEN
    gap = _gap(data, text, commas, flat)
    if gap is not None and numeric:
        padded = _padded(text, commas, marks, brackets, gap)
        if padded is not None:
            return padded
    # Element i starts after comma i - 1 (and the space json.dumps puts there, when each comma has
    # one and there is no other whitespace) and runs up to the next element's start.
    offsets = np.empty(len(commas) + 2, dtype=np.int32)
    separator = 1 + gap if flat and gap is not None else None  # bytes from a comma to the next element
    offsets[0] = 0 if separator is None else 1
    offsets[1:-1] = commas + (1 if separator is None else separator)
    offsets[-1] = len(data)
    # A view over the text: separators stay at each element's end until the trim.
    pieces = pa.StringArray.from_buffers(len(commas) + 1, pa.py_buffer(offsets), pa.py_buffer(data))
    if separator is None:
        pieces = pc.ascii_ltrim(pieces, _LEADING)
    trimmed: pa.StringArray = pc.ascii_rtrim(pieces, _TRAILING)
    starts, chars = _buffers(trimmed)
    return Elements(trimmed, starts[:-1], starts[1:], chars)


def _padded(text: Bytes, commas: Indices, marks: Indices, brackets: Brackets, gap: int) -> Elements | None:
    """Numbers without a sign, or all with a fraction, parsed without trimming each element.

    What separates two elements (``,``, ``, ``, ``],[``) becomes ``0`` in a
    copy of the text. Without any ``-`` those zeros lead the next element
    (``0012`` is 12); otherwise each element runs on over them, as zeros after
    its last fraction digit do not change it either, and where it has an
    exponent, the exponent moves right and the zeros go before its ``e``. The
    JSON checks look at the unpadded text.
    """
    count = len(commas) + 1
    # Without a minus sign anywhere, the zeros can lead the next element instead (0012 is 12).
    leading = not (text == _MINUS).any()
    if not leading and int(np.count_nonzero(text == _DOT)) != count:
        return None  # an integer, or two dots in one (which fails the parse anyway)
    begin = np.zeros(count, dtype=np.intp)
    begin[1:] = commas + (1 + gap)
    starts = begin + np.bincount(brackets.opens, minlength=count)
    finish = np.full(count, len(text), dtype=np.intp)
    finish[:-1] = commas
    ends = finish - np.bincount(brackets.closes, minlength=count)
    if (brackets.open_at >= starts[brackets.opens]).any() or (
        brackets.close_at < ends[brackets.closes]
    ).any():
        return None  # "[11[.5,": a bracket inside a number, which a zero would hide
    padded = text.copy()
    for separators in (commas, brackets.open_at, brackets.close_at, commas + 1 if gap else None):
        if separators is not None:
            padded[separators] = _ZERO
    offsets = np.empty(count + 1, dtype=np.int32)
    if leading:
        offsets[0], offsets[1:] = starts[0], ends  # element i runs from the end of element i - 1
    else:
        if len(marks) and not _shift_exponents(text, padded, commas, marks, ends, starts[1:] - ends[:-1]):
            return None
        offsets[:-1], offsets[-1] = starts, ends[-1]
    strings = pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(padded))
    return Elements(strings, starts, ends, text)


def _shift_exponents(
    text: Bytes,
    padded: Bytes,
    commas: Indices,
    marks: Indices,
    ends: Indices,
    widths: Indices,
) -> bool:
    """In ``padded``, move each exponent but the last element's right by the zeros after it.

    ``widths[i]`` is how many bytes separate element ``i`` from the next. False
    where that cannot be done for certain (two ``e`` in one element, an
    exponent longer than any a float needs): the caller trims instead.
    """
    element = np.searchsorted(commas, marks)
    if (np.diff(element) == 0).any():
        return False  # "1e5e5": the parse would fail anyway
    inner = element < len(commas)  # the last element has no separator after it
    marks, element = marks[inner], element[inner]
    if not len(marks):
        return True
    lengths, width = ends[element] - marks, widths[element]  # "e-05": 4
    if lengths.max() > _MAX_EXPONENT:
        return False
    for offset in range(int(lengths.max())):  # at most _MAX_EXPONENT passes over the exponents
        moving = lengths > offset
        padded[marks[moving] + offset + width[moving]] = text[marks[moving] + offset]
    for offset in range(int(width.max())):  # as many as the deepest separator has brackets
        zero = width > offset
        padded[marks[zero] + offset] = _ZERO
    return True


def _gap(data: bytes, text: Bytes, commas: Indices, flat: bool) -> int | None:
    """0 without whitespace; for a flat list, 1 when the only whitespace is one space after each comma.

    Elements then start exactly there, and need no trimming at their start.
    None: whitespace elsewhere, trim both ends.
    """
    if not any(space in data for space in _SPACES):
        return 0
    if not flat or not len(commas) or int(np.count_nonzero(text <= _SPACE)) != len(commas):
        return None
    after = text[np.minimum(commas + 1, len(text) - 1)]
    return 1 if (after == _SPACE).all() else None


def _buffers(elements: pa.StringArray) -> tuple[Indices, Bytes]:
    """The offsets and bytes of ``elements``, rebased so the first element starts at 0."""
    _, offsets, data = elements.buffers()
    view = np.frombuffer(offsets, dtype=np.int32)[elements.offset : elements.offset + len(elements) + 1]
    starts = view.astype(np.intp) - view[0]  # numpy gathers faster with native indices
    if data is None:
        return starts, np.empty(0, dtype=np.uint8)
    # Arrow pads buffers: only the bytes the offsets cover are the elements.
    chars = np.frombuffer(data, dtype=np.uint8)[view[0] : view[-1]]
    return starts, chars


def _bools(elements: Elements) -> Array | None:
    true = pc.equal(elements.strings, "true")
    if not pc.all(pc.or_(true, pc.equal(elements.strings, "false"))).as_py():
        return None  # 0/1 (v1 takes them), numbers, null: the slow path decides
    flat: Array = true.to_numpy(zero_copy_only=False)
    return flat


def _numbers(
    data: bytes, text: Bytes, marks: Indices, elements: Elements, dtype: np.dtype[Any]
) -> Array | None:
    integral = _json_numbers(data, text, marks, elements)
    if integral is None:
        return None
    try:
        if integral:
            # No fraction or exponent anywhere: the slow path's probe is int64 (orjson ints).
            probe = pc.cast(elements.strings, pa.int64()).to_numpy()
            return _from_ints(probe, dtype)
        if dtype.kind in "iu":
            return None  # integers written as floats: rare, and the slow path's checks decide
        probe = pc.cast(elements.strings, pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # out of int64 range, or not a number after all
    if not np.isfinite(probe).all():
        return None  # orjson rejects 1e400 where Arrow gives inf
    zeros = np.flatnonzero(probe == 0)
    if len(zeros):
        probe = probe.copy()
        probe[zeros[_integer_negative_zero(elements, zeros)]] = 0.0
    with np.errstate(over="ignore"):  # FP16/FP32 overflow is inf, as on the general path
        flat: Array = probe.astype(dtype)
    return flat


def _from_ints(probe: npt.NDArray[np.int64], dtype: np.dtype[Any]) -> Array | None:
    if dtype.kind in "iu":
        info = np.iinfo(dtype.type)
        if probe.min() < info.min or probe.max() > info.max:
            return None
    with np.errstate(over="ignore"):  # FP16/FP32 overflow is inf, as on the general path
        flat: Array = probe.astype(dtype)
    return flat


def _is_digit(chars: Bytes) -> npt.NDArray[np.bool_]:
    result: npt.NDArray[np.bool_] = (chars - np.uint8(_ZERO)) < 10
    return result


def _json_numbers(data: bytes, text: Bytes, marks: Indices, elements: Elements) -> bool | None:
    """Whether every element is a JSON integer (True) or JSON number (False); None if one is neither.

    Arrow's parser is strict about the characters (``1x``, ``1 2``, ``1e``,
    ``1.2.3`` fail the cast) but also takes ``+1``, ``01``, ``.5``, ``5.``,
    ``5.e3``, ``inf``, ``nan`` and, for integers, ``0x1f``: those are ruled out
    from each element's first and last characters and what precedes each ``e``
    (``marks`` in ``text``); outside numbers a valid text has no ``.`` or ``e``.
    """
    if not _ends_fit(elements):
        return None
    if len(marks):
        return None if (text[np.maximum(marks - 1, 0)] == _DOT).any() else False  # "5.e3"
    return b"." not in data


def _ends_fit(elements: Elements) -> bool:
    """Every element starts like a JSON number (``-``, a digit, no leading zero) and ends with a digit."""
    _, starts, ends, chars = elements
    if not len(chars) or (ends <= starts).any():
        return False
    integer_start = starts + (chars[starts] == _MINUS)
    if (integer_start >= ends).any():
        return False  # "-"
    lead = chars[integer_start]
    following = chars[np.minimum(integer_start + 1, len(chars) - 1)]
    fraction_or_exponent = (following == _DOT) | ((following | np.uint8(0x20)) == _E_LOWER)
    leading_zero = (lead == _ZERO) & (integer_start < ends - 1) & ~fraction_or_exponent
    # "+1", ".5", "-.5", "e5", "inf", "nan"; then "01", "-007", "0x1f"; then "5.", "1e", "1e+"
    return bool(_is_digit(lead).all() and not leading_zero.any() and _is_digit(chars[ends - 1]).all())


def _exponent_marks(data: bytes, text: Bytes) -> Indices:
    """Where ``e`` and ``E`` are: outside numbers a valid text has none.

    Typical data has a few (``1.2e-05`` among thousands of plain decimals):
    up to ``_FEW_EXPONENTS`` are found with memchr, more with a vectorised compare.
    """
    found: list[int] = []
    for letter in (b"e", b"E"):
        at = data.find(letter)
        while at >= 0 and len(found) < _FEW_EXPONENTS:
            found.append(at)
            at = data.find(letter, at + 1)
        if at >= 0:
            marks: Indices = np.flatnonzero((text | np.uint8(0x20)) == _E_LOWER)
            return marks
    return np.array(sorted(found), dtype=np.intp)


def _integer_negative_zero(elements: Elements, which: Indices) -> npt.NDArray[np.bool_]:
    """Which of elements ``which`` read ``-0``: orjson makes it the int 0, numpy +0.0 beside floats."""
    _, starts, ends, chars = elements
    first = starts[which]
    second = chars[np.minimum(first + 1, len(chars) - 1)]
    result: npt.NDArray[np.bool_] = (ends[which] - first == 2) & (chars[first] == _MINUS) & (second == _ZERO)
    return result
