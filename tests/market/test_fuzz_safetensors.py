"""Seeded, bounded fuzzing of the registry's safetensors validator (hypothesis, derandomized: the same
examples on every run, no example database). Properties:

1. any bytes: ``check_file`` returns or raises ``Refused``, never anything else;
2. a header built from random entries: whatever the validator accepts, the official ``safetensors``
   parser accepts too, with the same names, dtypes and shapes (it never accepts a file the loader breaks on);
3. a real file of random finite tensors is accepted with its shapes; one NaN or infinity anywhere is refused.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetrace.market.checks import DTYPE_SIZES, Refused, check_file, parse_safetensors

pytestmark = pytest.mark.slow  # hundreds of generated files (~6 s)

WEIGHTS = "adapter/adapter_model.safetensors"
FUZZ = settings(
    derandomize=True, database=None, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_are_accepted_or_refused_never_crash(data):
    try:
        check_file(WEIGHTS, data)
    except Refused:
        pass


def _raw(header: dict, data: bytes, pad: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + data


entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPE_SIZES) + ["F33", "", "f32"]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 40), min_size=0, max_size=3),
    }
) | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), st.integers(0, 3), max_size=3)
headers = st.dictionaries(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6), entry, max_size=4)


@st.composite
def near_valid(draw):
    """A valid layout of random tensors, then at most one mutation of it: most examples sit at the edge."""
    names = draw(st.lists(st.text("abcxyz._", min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    header, pos = {}, 0
    for n in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = int(np.prod(shape)) * DTYPE_SIZES[dtype]
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    data = bytes(pos)
    victim = header[draw(st.sampled_from(names))]
    mutation = draw(st.sampled_from(["none", "shift", "grow", "dtype", "negative", "trailing", "short", "meta"]))
    if mutation == "shift":
        victim["data_offsets"] = [o + draw(st.integers(-2, 2)) for o in victim["data_offsets"]]
    elif mutation == "grow":
        victim["data_offsets"][1] += draw(st.integers(-3, 3))
    elif mutation == "dtype":
        victim["dtype"] = draw(st.sampled_from(["F33", "f32", "U64", "C64"]))
    elif mutation == "negative":
        victim["shape"] = [-1] + victim["shape"]
    elif mutation == "trailing":
        data += b"\0"
    elif mutation == "short":
        data = data[:-1]
    elif mutation == "meta":
        header["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, [], "x"]))
    return header, data


@FUZZ
@given(headers | near_valid().map(lambda hd: hd[0]), st.binary(max_size=64), st.sampled_from([b"", b" ", b"  \n"]))
def test_random_headers_are_refused_or_load(header, data, pad):
    _differential(_raw(header, data, pad))


@FUZZ
@given(near_valid(), st.sampled_from([b"", b" "]))
def test_what_the_validator_accepts_the_official_parser_loads(header_data, pad):
    _differential(_raw(*header_data, pad))


def _differential(raw: bytes) -> None:
    from safetensors import deserialize

    try:
        ours = parse_safetensors(raw, WEIGHTS)
    except Refused:
        return
    theirs = {name: (info["dtype"], info["shape"]) for name, info in deserialize(raw)}
    assert {n: (v["dtype"], v["shape"]) for n, v in ours.items()} == theirs


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3)
dtypes = st.sampled_from(["float32", "float16", "float64", "int8", "int32"])


@FUZZ
@given(
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}\.lora_A\.weight", fullmatch=True), st.tuples(shapes, dtypes), min_size=1, max_size=4
    ),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_real_files_are_accepted_and_one_non_finite_value_is_refused(spec, seed, bad):
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    arrays = {n: (rng.standard_normal(s) * 10).astype(d) for n, (s, d) in spec.items()}
    facts = check_file(WEIGHTS, save(arrays))["tensors"]
    assert {n: v["shape"] for n, v in facts.items()} == {n: list(a.shape) for n, a in arrays.items()}
    floats = [n for n, a in arrays.items() if a.dtype.kind == "f"]
    if not floats:
        return
    victim = floats[seed % len(floats)]
    flat = arrays[victim].reshape(-1).copy()
    flat[seed % flat.size] = bad
    arrays[victim] = flat.reshape(arrays[victim].shape)
    with pytest.raises(Refused, match=f"tensor '{victim}' holds 1 NaN or infinite value"):
        check_file(WEIGHTS, save(arrays))
