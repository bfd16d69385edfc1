"""A native forward step: every row's new tokens (a decode step or a prefill chunk) through the whole Llama
forward in one C call.

Why our own code: a decode step of SmolLM2-135M through the lean forward (``lean.py``) is about 65 torch
kernels a layer, some 2,000 a step, and on this CPU their dispatch cost as much as reading the weights
(about 20 ms of a 41 ms single-stream step); fbgemm's fp16 GEMM also sums a row differently at
different batch sizes. Here a step runs in C (``native_decode.c``): the same fp16 weights, fp32
arithmetic and the formulas of ``lean.py`` (RMSNorm, rotary embedding, grouped-query attention over the
slab cache with each row's mask, SiLU MLP), each row's own LoRA terms read by slot from the adapters'
stacks (``lora.GatheredLoRA``, their fp16 copies: the adapters decode on fp16 values as the base does),
weight GEMMs, attention and LoRA split over the torch threads (the same OpenMP runtime: torch, imported first, has loaded the ``libgomp.so.1`` the library links). Every
weight output is summed in one fixed order, so a row's logits are the same bits alone as in any batch
with any adapters (tested), and equal the torch path up to the order of fp32 sums (tested to 1e-4
relative, greedy tokens equal). Forwards with an explicit attention mask (label
scoring's label pass: its labels side by side after each prompt) run here too, returning the logits of
every new token; what the lean forward does not cover stays on torch.

The weights are copied once per base into fp16 panels of 16 outputs (``panels``), about the size of the
packed fp16 weights again. A batch of up to 64 rows runs against each panel in row tiles of up to 16
with AVX-512 (of up to 6 without, and for larger batches), prefetching the next panel while it computes
(``native_gemm.h``, included by ``native_decode.c``). The source is compiled once per machine with the
system C compiler (``cc``, AVX2/FMA/F16C) into ``~/.cache/finetrace/native`` (``FINETRACE_CACHE_DIR``
moves it), named by the digest of the source, its header and the flags, written atomically. Without a
compiler or those instructions, or with ``FINETRACE_NATIVE_DECODE=0``, ``library()`` is None and the
torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..environment import cpu_flags

SOURCE = Path(__file__).with_name("native_decode.c")
HEADERS = (Path(__file__).with_name("native_gemm.h"),)  # included by SOURCE: part of the build's digest
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double


class _Seg(ctypes.Structure):
    _fields_ = [("c0", _I), ("n", _I), ("r", _I), ("a", _P), ("bm", _P), ("scale", _P), ("sa", _I), ("sb", _I)]


SEGS, MAX_RANK = 3, 256  # LoRA terms per projection group (q, k, v) and the largest rank, as in the C


class _Layer(ctypes.Structure):
    _fields_ = [
        ("w", _P * 4),
        ("b", _P * 4),
        ("lora", (_Seg * SEGS) * 4),
        ("norm_in", _P),
        ("norm_post", _P),
        ("k", _P),
        ("v", _P),
        ("T", _I),
        ("eps_in", _D),
        ("eps_post", _D),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("n_layers", _I),
        ("d", _I),
        ("heads", _I),
        ("kv_heads", _I),
        ("head_dim", _I),
        ("inter", _I),
        ("vocab", _I),
        ("rows", _I),
        ("q", _I),
        ("t", _I),
        ("threads", _I),
        ("scale", _D),
        ("eps_final", _D),
        ("tokens", _P),
        ("slots", _P),
        ("cos", _P),
        ("sin", _P),
        ("mask", _P),
        ("embed", _P),
        ("head", _P),
        ("head_bias", _P),
        ("norm_final", _P),
        ("logits", _P),
        ("keep", _P),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("FINETRACE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "finetrace")
    return Path(root) / "native"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled decode step, built on first use; None where it cannot run here (torch path then)."""
    if os.environ.get("FINETRACE_NATIVE_DECODE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not {"avx2", "fma", "f16c"} <= cpu_flags():
        return None
    src = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = _cache_dir() / f"decode-{key}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
            os.close(fd)
            try:
                subprocess.run(
                    [cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, timeout=120
                )
                os.replace(tmp, out)  # never a half-written library under the final name
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"finetrace: native decode step unavailable, decoding through torch ({exc})", stacklevel=2)
        return None
    lib.ft_decode.argtypes = [ctypes.POINTER(_Step), ctypes.POINTER(_Layer)]
    lib.ft_decode.restype = ctypes.c_int
    return lib


PANEL = 16  # outputs per weight panel, as OB in the C


def panels(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) as the C kernels read it: fp16 panels of 16 outputs, (ceil(out / 16), in, 16), the
    last one zero-padded."""
    out, inp = w.shape
    blocks = -(-out // PANEL)
    padded = torch.zeros((blocks * PANEL, inp), dtype=torch.float16)
    padded[:out] = w.detach()
    return padded.view(blocks, PANEL, inp).transpose(1, 2).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cat_bias(lins: list) -> torch.Tensor | None:
    if all(m.bias is None for m in lins):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in lins]).detach().float()


class NativeStep:
    """The C step over one model's fp16 weights (copies in panels, made once per packed base: about the
    size of the packed fp16 weights again)."""

    def __init__(self, lean, lib: ctypes.CDLL):
        self.lib, self.lean = lib, lean
        base = lean.base
        cfg = base.config
        self.w16 = []  # per layer (weights, biases) of the four groups: the tensors the C pointers refer to
        with torch.no_grad():
            for _, _, p in lean.layers:
                lins = [lin for lin, _ in p]
                groups = [[lins[j] for j in members] for members in GROUPS]
                ws = [panels(torch.cat([m.weight for m in g])) for g in groups]
                bs = [_cat_bias(g) for g in groups]
                self.w16.append((ws, bs))
            self.embed16 = lean.embed.weight.detach().half().contiguous()  # rows looked up
            head = lean.head.weight
            self.head16 = panels(head)
            self.head_bias = None if lean.head.bias is None else lean.head.bias.detach().float().contiguous()
        self.step = _Step(
            n_layers=len(lean.layers),
            d=cfg.hidden_size,
            heads=lean.heads,
            kv_heads=lean.kv_heads,
            head_dim=lean.head_dim,
            inter=cfg.intermediate_size,
            vocab=head.shape[0],
            scale=lean.scale,
            eps_final=float(lean.norm.variance_epsilon),
            embed=self.embed16.data_ptr(),
            head=self.head16.data_ptr(),
            head_bias=_ptr(self.head_bias),
            norm_final=lean.norm.weight.data_ptr(),
        )
        self._layers_for: tuple = ((), None, None)  # (adapters key, the ctypes array, the adapters)

    def _layers(self, adapters) -> ctypes.Array | None:
        """The C layers with the LoRA stacks of ``adapters`` (``lora.GatheredLoRA``, or None), made once per
        stacking (its version); None when a stack is one the C step does not take (the torch path then)."""
        key = (id(adapters), getattr(adapters, "version", None))
        if self._layers_for[0] == key:
            return self._layers_for[1]
        arr = (_Layer * len(self.lean.layers))()
        for i, ((n_in, n_post, p), (ws, bs)) in enumerate(zip(self.lean.layers, self.w16)):
            L = arr[i]
            for g, members in enumerate(GROUPS):
                L.w[g] = ws[g].data_ptr()
                L.b[g] = _ptr(bs[g])
                c0, q = 0, 0
                for j in members:
                    lin, m = p[j]
                    if adapters is not None and m is not None:
                        seg = _segment(m, c0)
                        if seg is None:
                            return None
                        L.lora[g][q] = seg
                        q += 1
                    c0 += lin.out_features
            L.norm_in, L.norm_post = n_in.weight.data_ptr(), n_post.weight.data_ptr()
            L.eps_in, L.eps_post = float(n_in.variance_epsilon), float(n_post.variance_epsilon)
        self._layers_for = (key, arr, adapters)  # the adapters (their stacks) live as long as the pointers
        return arr

    def __call__(self, ids, mask, positions, layers, adapters, keep=None) -> torch.Tensor | None:
        """Logits (B, V) of every row's last new token, the slabs updated; None: take the torch path.
        ``ids``/``positions``: (B, q) (q = 1: a decode step; more: a prefill chunk); ``mask``: (B, t + q);
        ``adapters``: the ``GatheredLoRA`` whose ``select`` chose the rows' slots, or None. ``keep``: an
        explicit (B, 1, q, t + q) boolean attention mask in place of ``mask`` + causal; then the logits of
        every new token, (B, q, V) (label scoring's label pass)."""
        B, q = ids.shape
        t = layers[0].t if layers[0].kbuf is not None else 0
        if mask.shape != (B, t + q) or mask.dtype != torch.long or not mask.is_contiguous():
            return None
        if keep is not None:
            if keep.shape != (B, 1, q, t + q) or keep.dtype != torch.bool:
                return None
            keep = keep.reshape(B, q, t + q).contiguous()  # bools are bytes: the C reads them as uint8
        for c in layers:
            fresh = c.kbuf is None and c.t == 0
            if not fresh and (c.kbuf is None or c.b != B or c.t != t or c.kbuf.dtype != torch.float32):
                return None
        slots = None
        if adapters is not None:
            if adapters.single is not None:
                slots = torch.full((B,), int(adapters.single), dtype=torch.int64)
            elif adapters.rows is not None and adapters.rows.numel() == B:
                slots = adapters.rows.to(torch.int64).contiguous()
            else:
                return None
        made = self._layers(adapters)
        if made is None:
            return None
        arr = type(made).from_buffer_copy(made)  # this call's own copies: decoders on one base may run in threads
        lean = self.lean
        for L, c in zip(arr, layers):
            c.open_columns(B, lean.kv_heads, q, lean.head_dim, torch.float32)
            L.k, L.v, L.T = c.kbuf.data_ptr(), c.vbuf.data_ptr(), c.kbuf.shape[2]
        cos, sin = lean.rotary(self.embed16[:1].float()[None], positions)  # (B, q, hd) each
        cos, sin = cos.reshape(B * q, -1).float().contiguous(), sin.reshape(B * q, -1).float().contiguous()
        tokens = ids.reshape(B * q).to(torch.int64).contiguous()
        logits = torch.empty((B, q, self.step.vocab) if keep is not None else (B, self.step.vocab))
        s = _Step.from_buffer_copy(self.step)
        s.rows, s.q, s.t, s.threads = B, q, t, torch.get_num_threads()
        s.tokens, s.slots, s.cos, s.sin = tokens.data_ptr(), _ptr(slots), cos.data_ptr(), sin.data_ptr()
        s.mask, s.logits, s.keep = mask.data_ptr(), logits.data_ptr(), _ptr(keep)
        rc = self.lib.ft_decode(ctypes.byref(s), arr)
        if rc != 0:
            raise RuntimeError(f"native decode step failed (code {rc})")
        for c in layers:
            c.close_columns(q)
        return logits


GROUPS = ((0, 1, 2), (3,), (4, 5), (6,))  # projections in one weight GEMM: q/k/v, o, gate/up, down


def _segment(m, c0: int) -> _Seg | None:
    """A LoRA layer's fp16 stacks (``_ft_A16`` (slots, r, in), ``_ft_B16`` (slots, r, out); ``_ft_S`` fp32)
    as a C term; None without them (stacks not rounded: ``GatheredLoRA.use_fp16``)."""
    a, b, scale = getattr(m, "_ft_A16", None), getattr(m, "_ft_B16", None), m._ft_S
    if a is None or b is None or a.shape != m._ft_A.shape or b.shape != m._ft_B.shape:
        return None
    dtypes = (torch.float16, torch.float16, torch.float32)
    if any(x.dtype != dt or not x.is_contiguous() or x.device.type != "cpu" for x, dt in zip((a, b, scale), dtypes)):
        return None
    r = a.shape[1]
    if r > MAX_RANK:
        return None
    return _Seg(
        c0=c0,
        n=b.shape[2],
        r=r,
        a=a.data_ptr(),
        bm=b.data_ptr(),
        scale=scale.data_ptr(),
        sa=r * a.shape[2],
        sb=r * b.shape[2],
    )


def native_step(lean, packed) -> NativeStep | None:
    """The native step for ``lean`` (a ``LeanLlama`` on fp16 weights), cached on its ``packed`` weights."""
    lib = library()
    if lib is None:
        return None
    step = getattr(packed, "_ft_native", None)
    if step is None:  # the copies depend on the base only: one per packed base, whichever adapters
        step = NativeStep(lean, lib)
        packed._ft_native = step
    return step
