"""Dequantising a 4-bit weight into a reused buffer gives bitsandbytes' own bytes, and the buffers are reused."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

# checked, not imported, at collection (importing bitsandbytes takes seconds): the tests import it
# slow: the first call loads bitsandbytes and its CPU kernels (~6 s), which no quick test needs otherwise
pytestmark = [
    pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="needs the quant extra (bitsandbytes)"),
    pytest.mark.slow,
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(512, 256), (96, 80), (7, 322), (3, 64 * 300)])
def test_into_a_buffer_equals_dequantize_4bit_bit_for_bit(dtype, quant_type, nested, shape):
    import bitsandbytes.functional as bf

    from finetrace.models import dequant
    from finetrace.models.dequant import dequantize_4bit_into

    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.02
    w[0, :5] = torch.tensor([0.0, 1e-8, -3.0, 5.0, float(2**-20)])  # zeros, tiny values, a large absmax
    packed, state = bf.quantize_4bit(w.to(dtype), quant_type=quant_type, compress_statistics=nested)
    want = bf.dequantize_4bit(packed, state)
    assert want.dtype == dtype
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert dequant._fast(dequant._bnb_cpu_lib(), packed, state, out)  # the reused-buffer kernels, not a copy
    got = dequantize_4bit_into(packed, state, out)
    assert got is out
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))
    assert (got.float() - w).abs().max() < 0.2 * w.abs().max()  # and it is the weight (4 bits of it)


def test_a_case_the_cpu_kernels_do_not_cover_goes_through_bitsandbytes():
    import bitsandbytes.functional as bf

    from finetrace.models.dequant import dequantize_4bit_into

    w = torch.randn(64, 128)
    packed, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    out = torch.empty(64, 128, dtype=torch.float64)  # not fp32: the generic path, copied in
    assert torch.equal(dequantize_4bit_into(packed, state, out), bf.dequantize_4bit(packed, state).double())


def test_scratch_hands_back_the_same_buffer_and_ignores_views():
    from finetrace.models.dequant import Scratch

    s = Scratch()
    a = s.take((4, 8), torch.float32, "cpu")
    s.give(a)
    b = s.take((8, 4), torch.float32, "cpu")  # same element count: the same memory, another shape
    assert b.data_ptr() == a.data_ptr() and b.shape == (8, 4)
    c = s.take((8, 4), torch.float32, "cpu")  # b not given back yet: a new buffer, never shared
    assert c.data_ptr() != b.data_ptr()
    s.give(b[:2])  # a view, not a whole buffer: ignored
    assert s.held_bytes() == 0
    s.give(b)
    s.give(c)
    assert s.held_bytes() == 2 * 32 * 4
    s.clear()
    assert s.held_bytes() == 0
