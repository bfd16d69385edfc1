"""Dequantising a 4-bit bitsandbytes weight into a reused buffer, for the training step on a CPU.

The fused LoRA layer (``train.fused``) dequantises each 4-bit base weight where it is used, in the forward
pass and again in the backward pass (three times per step with gradient checkpointing). On a CPU,
``bitsandbytes.functional.dequantize_4bit`` allocates its output (64 MB for a 8192 x 2048 weight) and the
double-quantised absmax afresh each time; a fresh allocation that large is mapped by glibc and faults in
page by page, which cost about three times the dequantisation itself (measured: 160 ms against 45 ms for
8192 x 2048). Here the same bitsandbytes kernels write into buffers kept between uses, so the bytes are
bitsandbytes' own (tests compare them bit for bit).
"""

from __future__ import annotations

import threading


class Scratch:
    """Reusable buffers for large short-lived tensors, kept by element count, dtype and device.

    ``take`` hands out a free buffer of that size (or a new one) and ``give`` returns it once nothing reads
    it any more. One weight is dequantised at a time, so one buffer per weight size is held between steps;
    a second ``take`` before the first ``give`` simply gets a new tensor (nothing is ever shared).
    """

    def __init__(self):
        self._free: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype, device):
        import torch

        n = 1
        for d in shape:
            n *= int(d)
        key = (n, dtype, str(device))
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(n, dtype=dtype, device=device)
        return buf.view(*shape)

    def give(self, t) -> None:
        """Return a tensor from ``take`` (anything that is not a whole contiguous buffer is ignored)."""
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            return
        flat = t.view(-1)
        with self._lock:
            free = self._free.setdefault((flat.numel(), flat.dtype, str(flat.device)), [])
            if len(free) < 2:
                free.append(flat)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


SCRATCH = Scratch()


_4BIT = ("nf4", "fp4")
_OUT = ("fp32", "bf16")  # the output dtypes written here: torch.float32 and torch.bfloat16


def _out_suffix(dtype) -> str | None:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)


def _bnb_cpu_lib():
    """bitsandbytes' CPU library when it has the blockwise dequantisation entry points, else None."""
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return None
    lib = getattr(ops, "lib", None)
    names = ("cdequantize_blockwise_cpu_fp32", *(f"cdequantize_blockwise_cpu_{q}_{d}" for q in _4BIT for d in _OUT))
    return lib if lib is not None and all(hasattr(lib, n) for n in names) else None


def _fast(lib, packed, state, out) -> bool:
    import torch

    shape = tuple(state.shape)
    return (
        lib is not None
        and packed.device.type == "cpu"
        and packed.dtype == torch.uint8
        and packed.is_contiguous()
        and _out_suffix(out.dtype) is not None
        and out.is_contiguous()
        and tuple(out.shape) == shape
        and state.dtype == out.dtype
        and state.quant_type in _4BIT
        and state.blocksize < 2048  # bitsandbytes routes 2048 and more to its generic path on some CPUs
        and len(shape) == 2
        and shape[-1] % 2 == 0
        and (not state.nested or state.state2.dtype == torch.float32)
    )


def dequantize_4bit_into(packed, state, out):
    """``bitsandbytes.functional.dequantize_4bit(packed, state)`` written into ``out`` (fp32 or bf16, the
    state's dtype, on a CPU), by the
    same bitsandbytes kernels, with the double-quantised absmax decoded into a reused buffer. Returns ``out``.
    Anything the CPU kernels do not cover (CUDA, another dtype or block size) goes through
    ``dequantize_4bit`` and is copied into ``out``."""
    import ctypes

    import torch
    from bitsandbytes.functional import dequantize_4bit, get_ptr

    lib = _bnb_cpu_lib()
    if not _fast(lib, packed, state, out):
        return out.copy_(dequantize_4bit(packed, state))
    absmax, buf = state.absmax, None
    if state.nested:  # what dequantize_blockwise(absmax, state2) + offset computes
        s2 = state.state2
        buf = SCRATCH.take((absmax.numel(),), torch.float32, "cpu")  # absmax is fp32 for every output dtype
        lib.cdequantize_blockwise_cpu_fp32(
            get_ptr(s2.code.contiguous()),
            get_ptr(absmax.contiguous()),
            get_ptr(s2.absmax.contiguous()),
            get_ptr(buf),
            ctypes.c_longlong(s2.blocksize),
            ctypes.c_longlong(absmax.numel()),
        )
        absmax = buf.add_(state.offset)
    else:
        absmax = absmax.float().contiguous()
    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{_out_suffix(out.dtype)}")
    m, n = state.shape
    kernel(
        get_ptr(packed),
        get_ptr(absmax),
        get_ptr(out),
        ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(m),
        ctypes.c_longlong(n),
    )
    if buf is not None:
        SCRATCH.give(buf)
    return out
