"""A native decode step for a single row: the whole Llama forward of one token in one C call.

Why our own code: decoding one row of SmolLM2-135M through the lean forward (``lean.py``) takes about
65 torch kernels a layer, some 2,000 a token, and on this CPU their dispatch cost as much as reading the
weights (about 20 ms of a 41 ms step, measured with ``bench/serve_throughput.py``'s single stream). A
single stream is the latency a user of a deployed adapter sees, so for batch 1 the step runs in C
(``native_decode.c``): the same fp16 weights, fp32 arithmetic, the same formulas as ``lean.py`` (RMSNorm,
rotary embedding, grouped-query attention over the slab cache, SiLU MLP, the LoRA "one" plan), with the
weight GEMVs split over the torch threads (the same OpenMP runtime). Results equal the torch path up to
the order of fp32 sums, as batch sizes already differ there (tested to 1e-4 relative, tokens equal).

The source is compiled once per machine with the system C compiler (``cc``, AVX2/FMA/F16C) into
``~/.cache/finetrace/native`` (``FINETRACE_CACHE_DIR`` moves it), named by the digest of the source and
flags, written atomically. Without a compiler or those instructions, or with ``FINETRACE_NATIVE_DECODE=0``,
``library()`` is None and the torch path runs (the same answers). Everything else (batches, prefill,
label scoring, other adapter compositions) stays on the torch path.
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

SOURCE = Path(__file__).with_name("native_decode.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double


class _Layer(ctypes.Structure):
    _fields_ = [
        ("w", _P * 4),
        ("b", _P * 4),
        ("la", _P * 4),
        ("lb", _P * 4),
        ("r", _I * 4),
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
        ("token", _I),
        ("t", _I),
        ("threads", _I),
        ("scale", _D),
        ("eps_final", _D),
        ("cos", _P),
        ("sin", _P),
        ("mask", _P),
        ("embed", _P),
        ("head", _P),
        ("head_bias", _P),
        ("norm_final", _P),
        ("logits", _P),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("FINETRACE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "finetrace")
    return Path(root) / "native"


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            have.update(line.split(":", 1)[1].split())
            break
    return all(f in have for f in flags)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled decode step, built on first use; None where it cannot run here (torch path then)."""
    if os.environ.get("FINETRACE_NATIVE_DECODE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not _cpu_has("avx2", "fma", "f16c"):
        return None
    src = SOURCE.read_bytes()
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
        import torch  # noqa: F401 - torch's libgomp is loaded first, so the library shares its OpenMP runtime

        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"finetrace: native decode step unavailable, decoding through torch ({exc})", stacklevel=2)
        return None
    lib.ft_decode_one.argtypes = [ctypes.POINTER(_Step), ctypes.POINTER(_Layer)]
    lib.ft_decode_one.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cat_bias(lins: list) -> torch.Tensor | None:
    if all(m.bias is None for m in lins):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in lins]).detach().float()


class NativeStep:
    """The C step over one model's fp16 weights (plain row-major copies, made once per packed base)."""

    def __init__(self, lean, lib: ctypes.CDLL):
        self.lib, self.lean = lib, lean
        base = lean.base
        cfg = base.config
        self.keep: list[torch.Tensor] = []  # every tensor a pointer below refers to
        self.w16 = []
        with torch.no_grad():
            for _, _, p in lean.layers:
                lins = [lin for lin, _ in p]
                groups = [lins[0:3], lins[3:4], lins[4:6], lins[6:7]]
                ws = [torch.cat([m.weight for m in g]).detach().half().contiguous() for g in groups]
                bs = [_cat_bias(g) for g in groups]
                self.w16.append((ws, bs))
                self.keep += ws + [b for b in bs if b is not None]
            embed = lean.embed.weight
            self.embed16 = embed.detach().half().contiguous()
            head = lean.head.weight
            tied = head.data_ptr() == embed.data_ptr()
            self.head16 = self.embed16 if tied else head.detach().half().contiguous()
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
        self._layers_for: tuple = ((), None)  # (the plans it was made for, the ctypes array)

    def _layers(self, plans) -> ctypes.Array:
        if self._layers_for[0] is plans:
            return self._layers_for[1]
        arr = (_Layer * len(self.lean.layers))()
        for i, ((n_in, n_post, _), (ws, bs)) in enumerate(zip(self.lean.layers, self.w16)):
            L = arr[i]
            for g in range(4):
                L.w[g] = ws[g].data_ptr()
                L.b[g] = _ptr(bs[g])
                plan = plans[i][g] if plans is not None else None
                if plan is not None:
                    L.la[g], L.lb[g], L.r[g] = plan[1].data_ptr(), plan[2].data_ptr(), plan[1].shape[0]
            L.norm_in, L.norm_post = n_in.weight.data_ptr(), n_post.weight.data_ptr()
            L.eps_in, L.eps_post = float(n_in.variance_epsilon), float(n_post.variance_epsilon)
        self._layers_for = (plans, arr)
        return arr

    def __call__(self, ids, mask, positions, layers, plans) -> torch.Tensor | None:
        """Logits (1, V) of the one row's next token, its slabs updated; None: take the torch path."""
        if plans is not None and any(p is not None and p[0] != "one" for lp in plans for p in lp):
            return None
        t = layers[0].t
        if mask.shape[1] != t + 1 or mask.dtype != torch.long or not mask.is_contiguous():
            return None
        for c in layers:
            if c.kbuf is None or c.b != 1 or c.t != t or c.kbuf.dtype != torch.float32:
                return None
            c.reserve(1, t + 1)
        arr = self._layers(plans)
        for L, c in zip(arr, layers):
            L.k, L.v, L.T = c.kbuf.data_ptr(), c.vbuf.data_ptr(), c.kbuf.shape[2]
        cos, sin = self.lean.rotary(self.embed16[:1].float()[None], positions)  # (1, 1, hd) each
        cos, sin = cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()
        logits = torch.empty((1, self.step.vocab))
        s = self.step
        s.token, s.t, s.threads = int(ids[0, 0]), t, torch.get_num_threads()
        s.cos, s.sin, s.mask, s.logits = cos.data_ptr(), sin.data_ptr(), mask.data_ptr(), logits.data_ptr()
        rc = self.lib.ft_decode_one(ctypes.byref(s), arr)
        if rc != 0:
            raise RuntimeError(f"native decode step failed (code {rc})")
        for c in layers:
            c.t = t + 1
            c._views()
        return logits


def native_step(lean) -> NativeStep | None:
    """The native step for ``lean`` (a ``LeanLlama`` on fp16 weights), cached on its packed weights."""
    packed = lean.packed()
    if packed is None:
        return None
    lib = library()
    if lib is None:
        return None
    step = getattr(packed, "_ft_native", None)
    if step is None:  # the copies depend on the base only: one per packed base, whichever adapters
        step = NativeStep(lean, lib)
        packed._ft_native = step
    return step
