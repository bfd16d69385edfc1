"""What the registry accepts: files recognised by content, strict safetensors, tensors that fit the base.

Every check raises ``Refused`` (an ``InputError``) with a message naming the file and exactly what is
wrong, so the publisher can fix it. Nothing here trusts a file name: a name only says which *kind* of
content is expected at that path (``ALLOWED_FILES``), and the bytes must then prove to be that kind.

    sniff(data) -> "pickle" | "zip" | "tar" | ... | None      # formats that are never accepted
    parse_safetensors(data, where) -> {name: {"dtype", "shape"}}
    check_file(path, data, limits) -> dict                     # per-file, at upload time
    check_adapter(files, base_shapes, limits) -> dict          # cross-file, at commit time

Tensor names map to base modules the way PEFT saves them: ``base_model.model.<module>.lora_A.weight``
has shape ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` for a base ``<module>.weight`` of shape
``[out, in]``; embeddings use ``lora_embedding_A`` ``[r, num]`` / ``lora_embedding_B`` ``[dim, r]``;
DoRA adds ``lora_magnitude_vector`` ``[out]``. Anything else (full layers from ``modules_to_save``)
is refused unless the server allows it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import InputError


class Refused(InputError):
    """A publish (or pull) refused by a check; ``http_status`` is what the server answers."""

    http_status = 422


@dataclass(frozen=True)
class Limits:
    """Caps the server enforces on every package."""

    max_file_bytes: int = 512 << 20  # one file
    max_package_bytes: int = 1 << 30  # all files together
    max_header_bytes: int = 1 << 20  # safetensors JSON header
    max_tensors: int = 10_000
    max_rank: int = 256  # LoRA r
    max_alpha: float = 4096.0  # lora_alpha and every alpha_pattern value
    allow_modules_to_save: bool = False  # full layers inside an adapter
    max_text_bytes: int = 4 << 20  # documents, JSON, markdown


DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# path in the package -> kind of content that must be there. Everything else is refused.
ALLOWED_FILES = {
    "adapter/adapter_config.json": "json",
    "adapter/adapter_model.safetensors": "safetensors",
    "adapter/finetrace_adapter.json": "json",
    "adapter/metrics.jsonl": "jsonl",
    "adapter/loss_curve.png": "png",
    "adapter/README.md": "text",
    "eval/report.json": "json",
    "eval/report.html": "html",
    "attestation/attestation.dsse.json": "json",
}
DOCUMENT_KINDS = ("model_card", "annex_iv", "ab2013", "datasheet")
DOCUMENT_EXTS = {"md": "text", "txt": "text", "json": "json", "html": "html"}
# The one place that says which documents a package must carry (the audit stage produces them).
REQUIRED_DOCUMENTS = ("model_card", "annex_iv", "ab2013")
REQUIRED_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/finetrace_adapter.json")

_MAGIC = [
    (b"PK\x03\x04", "zip archive"),
    (b"PK\x05\x06", "zip archive"),
    (b"PK\x07\x08", "zip archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"BZh", "bzip2 archive"),
    (b"\xfd7zXZ\x00", "xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"\x28\xb5\x2f\xfd", "zstd archive"),
    (b"Rar!", "rar archive"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O/Java class"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"),
    (b"#!", "script"),
    (b"\x00asm", "WebAssembly"),
    (b"GGUF", "GGUF model"),
    (b"\x93NUMPY", "numpy array"),
    (b"\x89HDF", "HDF5 file"),
]
_CODE_RE = re.compile(
    rb"^\s*(import |from \S+ import |def |class |#include|<\?php|function |const |var )", re.MULTILINE
)


def refuse(message: str, path: str | None = None, hint: str | None = None) -> Refused:
    return Refused(message, file=path, hint=hint)


def sniff(data: bytes) -> str | None:
    """The name of a never-accepted format that ``data`` is, judged by its bytes, else None."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    if len(data) > 262 and data[257:262] == b"ustar":
        return "tar archive"
    return None


def check_path(path: str) -> str:
    """A package path: relative, no '..', no backslashes or control characters, and on the allow-list."""
    p = PurePosixPath(path)
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or ".." in p.parts
        or any(ord(c) < 32 for c in path)
        or p.as_posix() != path
    ):
        raise refuse(f"unsafe file name {path!r}", hint="package paths are relative, without '..' or '\\'")
    return expected_kind(path)


def expected_kind(path: str) -> str:
    if path in ALLOWED_FILES:
        return ALLOWED_FILES[path]
    p = PurePosixPath(path)
    if len(p.parts) == 2 and p.parts[0] == "documents" and p.stem in DOCUMENT_KINDS and p.suffix[1:] in DOCUMENT_EXTS:
        return DOCUMENT_EXTS[p.suffix[1:]]
    raise refuse(
        f"file {path!r} is not allowed in a package",
        hint=f"allowed: {', '.join(ALLOWED_FILES)}, documents/<{'|'.join(DOCUMENT_KINDS)}>.<md|txt|json|html>",
    )


# -- safetensors ---------------------------------------------------------------------------------
def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_safetensors(data: bytes, where: str, max_header: int = 1 << 20, max_tensors: int = 10_000) -> dict:
    """Strictly parse a safetensors file; returns ``{name: {"dtype", "shape"}}`` or raises Refused.

    Checks: 8-byte little-endian header length within the cap and the file; a UTF-8 JSON object with no
    duplicate keys; ``__metadata__`` string to string; known dtypes; non-negative integer shapes;
    offsets in bounds, of exactly the tensor's byte size, non-overlapping, covering the data section
    exactly; no trailing bytes.
    """
    if len(data) < 8:
        raise refuse("not a safetensors file: shorter than its 8-byte header length", where)
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header:
        raise refuse(f"safetensors header of {n} bytes exceeds the {max_header}-byte cap", where)
    if 8 + n > len(data):
        raise refuse(f"safetensors header length {n} runs past the end of the file ({len(data)} bytes)", where)
    raw = data[8 : 8 + n]
    if not raw.lstrip().startswith(b"{"):
        raise refuse("not a safetensors file: the header is not a JSON object", where)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise refuse(f"safetensors header is not valid JSON: {exc}", where) from None
    if not isinstance(header, dict):
        raise refuse("safetensors header is not a JSON object", where)
    meta = header.pop("__metadata__", None)
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise refuse("safetensors __metadata__ must map strings to strings", where)
    if len(header) > max_tensors:
        raise refuse(f"{len(header)} tensors exceed the cap of {max_tensors}", where)
    data_len = len(data) - 8 - n
    spans, out = [], {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets", where)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise refuse(f"tensor {name!r}: unknown dtype {dtype!r}", where, hint=f"one of {', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise refuse(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers", where)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise refuse(
                f"tensor {name!r}: data_offsets {offs!r} out of bounds (data section is {data_len} bytes)", where
            )
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != need:
            raise refuse(f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} {dtype} (needs {need})", where)
        spans.append((offs[0], offs[1], name))
        out[name] = {"dtype": dtype, "shape": shape, "start": 8 + n + offs[0], "end": 8 + n + offs[1]}
    pos = 0
    for b, e, name in sorted(spans):
        if b < pos:
            raise refuse(f"tensor {name!r} overlaps the previous tensor (starts at {b}, previous ends at {pos})", where)
        if b > pos:
            raise refuse(f"gap of {b - pos} unreferenced bytes before tensor {name!r}", where)
        pos = e
    if pos != data_len:
        raise refuse(
            f"{data_len - pos} trailing bytes after the last tensor",
            where,
            hint="a safetensors file must end where its last tensor ends",
        )
    return out


# (unsigned view, exponent mask, mantissa mask): a value is NaN or infinite when all exponent bits are set
_FLOAT_BITS = {
    "F64": ("<u8", 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
    "F32": ("<u4", 0x7F800000, 0x007FFFFF),
    "F16": ("<u2", 0x7C00, 0x03FF),
    "BF16": ("<u2", 0x7F80, 0x007F),
    "F8_E5M2": ("u1", 0x7C, 0x03),
}


def check_finite(data: bytes, tensors: dict, where: str) -> None:
    """Refuse a float tensor holding NaN or infinity (an all-NaN adapter serves empty answers)."""
    import numpy as np

    for name, info in tensors.items():
        dtype = info["dtype"]
        if dtype == "F8_E4M3":  # no infinities; NaN is S.1111.111
            bits = np.frombuffer(data, "u1", offset=info["start"], count=info["end"] - info["start"])
            bad = int(np.count_nonzero((bits & 0x7F) == 0x7F))
        elif dtype in _FLOAT_BITS:
            view, exp, _ = _FLOAT_BITS[dtype]
            width = np.dtype(view).itemsize
            bits = np.frombuffer(data, view, offset=info["start"], count=(info["end"] - info["start"]) // width)
            bad = int(np.count_nonzero((bits & exp) == exp))
        else:
            continue
        if bad:
            raise refuse(
                f"tensor {name!r} holds {bad} NaN or infinite value(s) of {math.prod(info['shape'])}",
                where,
                hint="the training diverged; publish a finite adapter",
            )


# -- per file ------------------------------------------------------------------------------------
def check_file(path: str, data: bytes, limits: Limits = Limits()) -> dict:
    """Check one file's bytes against the kind its path requires; returns facts (tensors for safetensors)."""
    kind = check_path(path)
    if len(data) > limits.max_file_bytes:
        raise refuse(f"{len(data)} bytes exceed the per-file cap of {limits.max_file_bytes}", path)
    bad = sniff(data)
    if bad:
        raise refuse(
            f"content is a {bad}, not {kind}",
            path,
            hint="only safetensors weights, JSON, "
            "markdown/text and PNG are accepted; pickles, archives and code never are",
        )
    if kind == "safetensors":
        tensors = parse_safetensors(data, path, limits.max_header_bytes, limits.max_tensors)
        check_finite(data, tensors, path)
        return {"tensors": tensors}
    if kind == "png":
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise refuse("content is not a PNG image", path)
        return {}
    if len(data) > limits.max_text_bytes:
        raise refuse(f"{len(data)} bytes exceed the text cap of {limits.max_text_bytes}", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("content is not UTF-8 text", path) from None
    if "\x00" in text:
        raise refuse("text contains NUL bytes", path)
    if kind == "json":
        try:
            doc = json.loads(text, object_pairs_hook=_no_dupes)
        except RecursionError:
            raise refuse("JSON nested too deeply", path) from None
        except ValueError as exc:
            raise refuse(f"not valid JSON: {exc}", path) from None
        return {"json": doc}
    if kind == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except RecursionError:
                    raise Refused("JSON nested too deeply", file=path, line=i) from None
                except ValueError as exc:
                    raise Refused(f"not valid JSON: {exc}", file=path, line=i) from None
        return {}
    if kind == "html":
        low = text.lower()
        if "<script" in low or "javascript:" in low or re.search(r"\son[a-z]+\s*=", low):
            raise refuse("HTML with scripts or event handlers is not accepted", path)
        return {}
    if _CODE_RE.search(data[:4096]) and path.endswith(".txt"):
        raise refuse("content looks like program code", path)
    return {}


# -- across files --------------------------------------------------------------------------------
_LORA_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)


def check_adapter(
    adapter_config: dict,
    tensors: dict,
    base_shapes: dict,
    limits: Limits = Limits(),
    where: str = "adapter/adapter_model.safetensors",
) -> dict:
    """Every tensor maps to a module of the base with the right shape; rank and full-layer caps.

    ``base_shapes``: ``{base tensor name: shape}`` of the declared base model. Returns
    ``{"r", "modules", "parameters"}``.
    """
    r = adapter_config.get("r")
    if type(r) is not int or r <= 0:
        raise refuse(f"adapter_config.json field 'r' is {r!r}, not a positive integer", "adapter/adapter_config.json")
    if r > limits.max_rank:
        raise refuse(f"rank r={r} exceeds the registry's cap of {limits.max_rank}", "adapter/adapter_config.json")
    if adapter_config.get("modules_to_save") and not limits.allow_modules_to_save:
        raise refuse(
            f"modules_to_save {adapter_config['modules_to_save']} would ship full layers",
            "adapter/adapter_config.json",
            hint="this registry accepts adapter weights only",
        )
    rank_pattern = check_config_values(adapter_config, limits)
    modules, params = set(), 0
    for name, info in tensors.items():
        shape = info["shape"]
        params += math.prod(shape)
        m = _LORA_RE.match(name)
        if not m:
            if limits.allow_modules_to_save:
                continue
            raise refuse(f"tensor {name!r} is not a LoRA weight (full layers are not accepted)", where)
        module, part = m.group("module"), m.group("part")
        base = base_shapes.get(f"{module}.weight")
        if base is None:
            raise refuse(
                f"tensor {name!r} targets module {module!r}, which the declared base model does not have",
                where,
                hint="was this adapter trained on a different base model?",
            )
        rank_here = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") and len(shape) != 2:
            raise refuse(f"tensor {name!r} has shape {shape}, expected 2 dimensions", where)
        if part == "lora_A":
            ok = len(base) >= 2 and shape[1] == base[1] and shape[0] <= limits.max_rank
            want = f"[r, {base[1] if len(base) > 1 else '?'}]"
        elif part == "lora_B":
            ok = len(base) >= 2 and shape[0] == base[0] and shape[1] <= limits.max_rank
            want = f"[{base[0]}, r]"
        elif part == "lora_embedding_A":
            ok = shape[1] == base[0] and shape[0] <= limits.max_rank
            want = f"[r, {base[0]}]"
        elif part == "lora_embedding_B":
            ok = len(base) >= 2 and shape[0] == base[1] and shape[1] <= limits.max_rank
            want = f"[{base[1] if len(base) > 1 else '?'}, r]"
        else:  # lora_magnitude_vector
            ok = shape == [base[0]]
            want = f"[{base[0]}]"
        if not ok:
            raise refuse(
                f"tensor {name!r} has shape {shape}; module {module!r} of the declared base "
                f"(weight {base}) needs {want}",
                where,
                hint="the adapter does not fit the declared base model",
            )
        if part in ("lora_A", "lora_embedding_A") and shape[0] != rank_here:
            raise refuse(f"tensor {name!r} has rank {shape[0]} but adapter_config.json declares r={rank_here}", where)
        modules.add(module)
    if not modules:
        raise refuse("the adapter holds no LoRA tensors", where)
    dora = any(_LORA_RE.match(n).group("part") == "lora_magnitude_vector" for n in tensors if _LORA_RE.match(n))
    if dora != bool(adapter_config.get("use_dora")):
        raise refuse(
            f"adapter_config.json says use_dora={adapter_config.get('use_dora')!r} but the tensors "
            f"{'are' if dora else 'are not'} DoRA (lora_magnitude_vector)",
            "adapter/adapter_config.json",
            hint="the config must describe the weights it ships with",
        )
    return {"r": r, "modules": sorted(modules), "parameters": params}


_CFG = "adapter/adapter_config.json"
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config_values(cfg: dict, limits: Limits = Limits()) -> dict:
    """The values of adapter_config.json a loader trusts: type, finite, within caps. Returns rank_pattern.

    ``peft_type`` must be ``LORA`` (the only tensors this registry recognises); ``lora_alpha`` and every
    ``alpha_pattern`` value a finite number in (0, max_alpha]; ``rank_pattern`` a mapping to ranks in
    [1, max_rank]; ``base_model_name_or_path`` a name, digest or local path, never a URL or a ``..`` path.
    """
    if cfg.get("peft_type") != "LORA":
        raise Refused(
            f"is {cfg.get('peft_type')!r}; the tensors are LoRA weights, so it must be 'LORA'",
            file=_CFG,
            field="peft_type",
            hint="publish the adapter_config.json PEFT saved with it",
        )
    alpha = cfg.get("lora_alpha", 8)
    if not _number(alpha) or not 0 < alpha <= limits.max_alpha:
        raise Refused(
            f"is {alpha!r}; it must be a finite number in (0, {limits.max_alpha:g}]", file=_CFG, field="lora_alpha"
        )
    for key, cap, ok in (
        ("alpha_pattern", limits.max_alpha, lambda v: _number(v) and 0 < v <= limits.max_alpha),
        ("rank_pattern", limits.max_rank, lambda v: type(v) is int and 0 < v <= limits.max_rank),
    ):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise Refused(
                f"must be a mapping of module name patterns to values, not {type(pattern).__name__}",
                file=_CFG,
                field=key,
                hint='e.g. {"q_proj": 8}',
            )
        bad = next(((k, v) for k, v in pattern.items() if not ok(v)), None)
        if bad:
            raise Refused(
                f"{bad[0]!r}: {bad[1]!r} is not a {'finite number' if key == 'alpha_pattern' else 'rank'}"
                f" in (0, {cap:g}]",
                file=_CFG,
                field=key,
            )
    path = cfg.get("base_model_name_or_path")
    if path is not None:
        text = path if isinstance(path, str) else ""
        parts = re.split(r"[/\\]", text)
        if (
            not isinstance(path, str)
            or len(text) > 512
            or ".." in parts
            or "\\" in text
            or text.startswith("~")
            or any(ord(c) < 32 for c in text)
            or (_SCHEME_RE.match(text) and not text.startswith("sha256:"))
        ):
            raise Refused(
                f"{path!r} is not a model name, digest or local path (no URL, '~' or '..')",
                file=_CFG,
                field="base_model_name_or_path",
                hint="a loader would fetch or read from there; name the base model instead",
            )
    return cfg.get("rank_pattern") or {}


def base_shapes_from_folder(folder) -> dict:
    """``{tensor name: shape}`` of a base model folder, read from its safetensors headers only."""
    from pathlib import Path

    shapes: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        shapes.update({k: v["shape"] for k, v in header.items()})
    return shapes
