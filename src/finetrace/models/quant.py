"""Quantised bases through bitsandbytes: 4-bit NF4/FP4 (QLoRA) and 8-bit (LLM.int8), loaded by transformers.

A quantisation is described by a small dict (the *spec*), recorded with the adapter, the run and the
documents, and turned into transformers' ``BitsAndBytesConfig`` only here:

    {"backend": "bitsandbytes", "version": "0.50.2", "bits": 4, "quant_type": "nf4",
     "double_quant": true, "compute_dtype": "float32"}

The compute dtype is chosen from the device when not given (``auto``): bfloat16 on CUDA, and on a CPU
bfloat16 for a 4-bit base when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16: 3-4x fp32's GEMM
speed, and bitsandbytes dequantises NF4 straight to bf16), float32 otherwise (bf16 is emulated and many
times slower on CPUs without it; 8-bit bases keep float32 on a CPU, where bitsandbytes' int8 matmul was
measured only in fp32). The resolved dtype is what the spec records. ``bitsandbytes`` is the optional extra
``finetrace[quant]``; without it asking for a quantised base is a ``DependencyError`` saying how to
install it. The adapter trained on a quantised base is a plain PEFT adapter: it loads on the unquantised
base as well (``load_causal_lm(path, quantization=None)``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DependencyError

EXTRA_HINT = "install the extra: pip install 'finetrace[quant]' (scripts/install.sh installs it)"


def require_bitsandbytes(what: str = "a quantised base") -> str:
    """The installed bitsandbytes version; DependencyError naming the extra when it is missing."""
    try:
        from importlib import metadata

        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError(
            f"{what} needs bitsandbytes, which is not installed (extra finetrace[quant])", hint=EXTRA_HINT
        ) from None
    return metadata.version("bitsandbytes")


def make_spec(
    bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto", device_type: str = "cpu"
) -> dict:
    """The recorded description of a bitsandbytes quantisation (compute dtype resolved for the device)."""
    version = require_bitsandbytes(f"a {bits}-bit base")
    if compute_dtype == "auto":
        compute_dtype = auto_compute_dtype(bits, device_type)
    spec = {"backend": "bitsandbytes", "version": version, "bits": int(bits), "compute_dtype": compute_dtype}
    if bits == 4:
        spec.update(quant_type=quant_type, double_quant=bool(double_quant))
    return spec


def auto_compute_dtype(bits: int, device_type: str = "cpu") -> str:
    """The compute dtype ``auto`` resolves to for a ``bits``-bit base on a device type (see the module doc)."""
    from ..environment import cpu_has_native_bf16

    if device_type == "cuda" or (bits == 4 and cpu_has_native_bf16()):
        return "bfloat16"
    return "float32"


def bnb_config(spec: dict):
    """transformers' ``BitsAndBytesConfig`` for a spec."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if spec["bits"] == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec["quant_type"],
            bnb_4bit_use_double_quant=spec["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, spec["compute_dtype"]),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def weight_bytes(spec: dict | None, dtype: str = "float32") -> float:
    """Bytes per element of a quantised linear weight (NF4 with double quantisation: ~0.516)."""
    if spec is None:
        return {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}.get(dtype, 4.0)
    if spec["bits"] == 8:
        return 1.0 + 4.0 / 4096  # int8 + one fp32 scale per row (rows ~ thousands)
    # 4 bits + an absmax per 64 values: 8 bits (double quant, plus fp32 per 256 blocks) or 32 bits
    return 0.5 + (1.0 + 4.0 / 256) / 64 if spec.get("double_quant", True) else 0.5 + 4.0 / 64


def load_causal_lm(
    path: Path,
    dtype: str = "float32",
    quantization: dict | None = None,
    device=None,
    attn_implementation: str | None = None,
):
    """A causal LM from a safetensors folder (no remote code), quantised by bitsandbytes when a spec is given.

    A quantised model is placed on ``device`` as it loads, one tensor at a time (read with ``pread``, not
    mapped, so a shard's pages never count as resident); an unquantised one loads on the CPU, to be moved by
    the caller. On a quantised base the frozen embedding and output layer keep the dtype they are stored in
    when it is narrower than the compute dtype (bf16 on the Hub; half of fp32) and are widened where they are
    used (``keep_stored_embeddings``): the same numbers as a widened copy, at half the memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False, **kw
        )
    dev = torch.device(device or "cpu")
    kw.update(quantization_config=bnb_config(quantization), device_map={"": dev.index if dev.type == "cuda" else "cpu"})
    compute = getattr(torch, quantization["compute_dtype"])
    with _LOAD_LOCK, _quantised_loading(path, compute):
        _mmap_threshold(1 << 20)  # each tensor's read buffer and fp32 copy go back to the system when freed
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=compute, use_safetensors=True, trust_remote_code=False, **kw
            )
        finally:
            _mmap_threshold(32 << 20)  # glibc's own ceiling for its dynamic threshold
            _mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: what the dynamic scheme pairs with it (see below)
    keep_stored_embeddings(model, compute)
    release_freed_memory()
    return model


_LOAD_LOCK = __import__("threading").Lock()
_NARROW = {"BF16": "bfloat16", "F16": "float16"}


def stored_dtypes(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype (``BF16``, ``F32``...) over every shard of a folder (headers only)."""
    from .folder import read_safetensors_header

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v["dtype"] for k, v in read_safetensors_header(f).items() if k != "__metadata__"})
    return out


class _quantised_loading:
    """transformers' loader, for one quantised load: shards read with ``pread`` instead of ``mmap``, and the
    embedding and output weights kept at their stored dtype when it is narrower than ``compute``."""

    def __init__(self, folder: Path, compute):
        import torch

        stored = stored_dtypes(folder)
        self.narrow = {
            k: getattr(torch, _NARROW[d]) for k, d in stored.items() if d in _NARROW and compute == torch.float32
        }

    def __enter__(self):
        import re

        from transformers import modeling_utils

        self.saved = modeling_utils.safe_open, modeling_utils.PreTrainedModel._get_dtype_plan
        opener, narrow, original = self.saved[0], self.narrow, self.saved[1]
        modeling_utils.safe_open = lambda *a, **kw: opener(*a, **{**kw, "backend": "pread"})  # it passes "mmap"

        def dtype_plan(model, dtype):
            plan = original(model, dtype)
            for key in embedding_keys(model):
                if key in narrow:
                    plan[re.escape(key) + "$"] = narrow[key]
            return plan

        modeling_utils.PreTrainedModel._get_dtype_plan = dtype_plan
        return self

    def __exit__(self, *exc):
        from transformers import modeling_utils

        modeling_utils.safe_open, modeling_utils.PreTrainedModel._get_dtype_plan = self.saved


def embedding_keys(model) -> list[str]:
    """State-dict names of the input embedding and output layer weights of a causal LM."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if id(m) in wanted]


def keep_stored_embeddings(model, compute) -> None:
    """Widen a narrow-stored embedding's output and output layer's input weight to ``compute`` where used.

    The embedding returns ``compute`` vectors (a forward hook); the output layer multiplies in ``compute``
    with its weight widened one block of rows at a time (``widened_linear``), so no widened copy of the
    (vocab x hidden) matrix ever exists. Nothing happens when both are already at ``compute``.
    """
    import types

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and emb.weight.dtype != compute:
        emb.register_forward_hook(lambda mod, args, out: out.to(compute))
    if head is not None and head.weight.dtype != compute:
        head.forward = types.MethodType(lambda self, x: widened_linear(x, self.weight, self.bias), head)


VOCAB_BLOCK = 8192  # rows of a narrow-stored output weight widened at a time (8192 x 2048 fp32 = 64 MiB)
WIDENED_LOGITS_BYTES = 64 << 20  # the chunked losses' (rows x vocab) fp32 block when the head is widened


def loss_rows(chunk: int, vocab: int, capped: bool) -> int:
    """Rows per chunk of the chunked losses: ``loss_chunk``, and at most a 64 MiB fp32 logits block when
    ``capped``: with a widened (narrow-stored) output layer, or hidden states narrower than fp32 (a bf16
    QLoRA run), where memory was saved on the base and should not be spent on logits (measured at
    Llama-3.2-1B's shape, bf16 QLoRA: 642 MiB of logits at 1024 rows). A widened weight is widened once
    more per chunk (a few hundred ms per micro-batch at 1B); a bf16 one costs only smaller GEMMs."""
    return max(16, min(chunk, WIDENED_LOGITS_BYTES // (4 * vocab))) if capped else chunk


def logits_capped(h, weight) -> bool:
    """Whether the chunked losses cap their logits block for these hidden states and output weight."""
    import torch

    return weight.dtype != h.dtype or h.dtype != torch.float32


def widened_linear(x, weight, bias=None, out=None):
    """``x @ weight.T + bias`` in ``x``'s dtype, for a weight stored narrower (widened block by block into one
    reused buffer); written into ``out`` (rows x out_features, ``x``'s dtype) when given."""
    import torch

    if weight.dtype == x.dtype and out is None:
        return torch.nn.functional.linear(x, weight, bias)
    if out is None:
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
    if weight.dtype == x.dtype:
        torch.mm(x2, weight.t(), out=o2)
    else:
        buf = x.new_empty((min(VOCAB_BLOCK, weight.shape[0]), weight.shape[1]))
        for s in range(0, weight.shape[0], VOCAB_BLOCK):
            w = buf[: min(VOCAB_BLOCK, weight.shape[0] - s)].copy_(weight[s : s + VOCAB_BLOCK])
            torch.mm(x2, w.t(), out=o2[:, s : s + len(w)])  # (n, block)
        del buf
    if bias is not None:
        out += bias.to(x.dtype)
    return out


def widened_matmul(dz, weight):
    """``dz @ weight`` (n x V by V x H) in ``dz``'s dtype, widening a narrow-stored weight block by block."""
    if weight.dtype == dz.dtype:
        return dz @ weight
    out = dz.new_zeros(dz.shape[0], weight.shape[1])
    buf = dz.new_empty((min(VOCAB_BLOCK, weight.shape[0]), weight.shape[1]))
    for s in range(0, weight.shape[0], VOCAB_BLOCK):
        w = buf[: min(VOCAB_BLOCK, weight.shape[0] - s)].copy_(weight[s : s + VOCAB_BLOCK])
        out.addmm_(dz[:, s : s + len(w)], w)
    return out


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the loader back to the system (glibc keeps freed heap pages otherwise)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD: allocations at least this large are mapped, and unmapped when freed.

    While a base loads and quantises tensor by tensor, freed buffers kept on the heap would add up to a
    transient peak of several shards; mapped ones are returned at once. Setting it turns glibc's dynamic
    thresholds off, and with them the trim threshold's growth: left at its 128 KiB default, the top of the
    heap is returned to the system whenever that much is free and faults back in page by page at the next
    allocation (millions of faults per training step at 1B), so the loader sets it as well."""
    _mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _mallopt(param: int, value: int) -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(param, value)


def adapters_quantization(adapters, device_type: str = "cpu") -> dict | None:
    """The quantised base the adapters were trained on (re-resolved for this device), or None.

    Evaluating an adapter defaults to the base it was trained on; adapters trained on different bases
    cannot share one evaluation (InputError).
    """
    from ..errors import InputError

    specs = {
        (q["bits"], q.get("quant_type"), q.get("double_quant")) if q else None
        for q in ((a.metadata or {}).get("quantization") for a in adapters)
    }
    if len(specs) > 1:
        raise InputError(
            f"these adapters were trained on differently quantised bases: {', '.join(a.ref for a in adapters)}",
            hint="evaluate them in separate runs",
        )
    spec = next(iter(specs), None)
    if spec is None:
        return None
    bits, quant_type, double_quant = spec
    return make_spec(bits, quant_type or "nf4", True if double_quant is None else double_quant, "auto", device_type)
