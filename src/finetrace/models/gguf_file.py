"""GGUF files: check one thoroughly before use, and convert it once to a safetensors + tokenizer folder.

``check_gguf`` reads the header itself (magic, version, metadata, tensor table) and checks that every
tensor's bytes lie inside the file, so a corrupt or truncated download is named precisely ("truncated:
tensor blk.3.ffn_up.weight needs bytes 5210112..5652480, the file has 5300000") instead of failing deep
inside a loader. GGUF has no checksum of its own: the bytes are pinned by the digest we record.

``convert_gguf`` uses transformers' GGUF loader (which dequantises to fp32 and undoes llama.cpp's Q/K
rope permutation), then copies the weights into a plain model, because a model loaded from GGUF refuses
``save_pretrained``; the tokenizer keeps the file's chat template and bos/eos/pad tokens.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import InputError

MAGIC = b"GGUF"
# value type -> struct format of a scalar (8 = string and 9 = array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Truncated(Exception):
    def __init__(self, pos: int, what: str):
        self.pos, self.what = pos, what


@dataclass
class GGUFInfo:
    """What the header of a checked GGUF file says."""

    path: Path
    version: int
    size: int
    metadata: dict = field(default_factory=dict)
    """Scalar and string values by key; an array is given as ``{"array": type, "length": n}``."""
    tensors: list[tuple[str, tuple[int, ...], str, int, int]] = field(default_factory=list)
    """``(name, shape, type name, absolute start, byte length)`` per tensor."""

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def n_elements(self) -> int:
        total = 0
        for _, shape, *_ in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated(self.pos, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.take("<Q", what)
        if self.pos + n > self.size:
            raise _Truncated(self.pos, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise _Truncated(self.pos, what)
        self.pos += n


def _value(cur: _Cursor, vtype: int, key: str, where: str):
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype], f"the value of {key}")
    if vtype == 8:
        return cur.string(f"the value of {key}")
    if vtype == 9:
        itype = cur.take("<I", f"the array type of {key}")
        count = cur.take("<Q", f"the array length of {key}")
        if itype in _SCALARS:
            cur.skip(struct.calcsize(_SCALARS[itype]) * count, f"the array {key}")
        elif itype == 8:
            for i in range(count):
                n = cur.take("<Q", f"item {i} of {key}")
                cur.skip(n, f"item {i} of {key}")
        else:
            raise InputError(f"corrupt header: array {key!r} has unknown item type {itype} ({where})")
        return {"array": itype, "length": count}
    raise InputError(f"corrupt header: key {key!r} has unknown value type {vtype} ({where})")


def _parse(path: Path, buf, size: int) -> GGUFInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file = str(path)
    cur = _Cursor(buf, size)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise InputError(f"not a GGUF file: it starts with {magic!r}, not {MAGIC!r}", file=file)
    cur.pos = 4
    version = cur.take("<I", "the version")
    if version not in (2, 3):
        raise InputError(
            f"unsupported GGUF version {version} (this reads versions 2 and 3)",
            file=file,
            hint="re-export the model with a current llama.cpp",
        )
    n_tensors = cur.take("<Q", "the tensor count")
    n_kv = cur.take("<Q", "the metadata count")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise InputError(f"corrupt header: {n_tensors} tensors and {n_kv} metadata keys claimed", file=file)
    info = GGUFInfo(path, version, size)
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata key {i}")
        vtype = cur.take("<I", f"the type of {key}")
        try:
            info.metadata[key] = _value(cur, vtype, key, f"at byte {start}")
        except InputError as exc:
            raise InputError(exc.message, file=file) from None
    table = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.take("<I", f"the rank of tensor {name}")
        if n_dims > 8:
            raise InputError(f"corrupt header: tensor {name!r} claims {n_dims} dimensions", file=file)
        dims = tuple(cur.take("<Q", f"the shape of tensor {name}") for _ in range(n_dims))
        ttype = cur.take("<I", f"the type of tensor {name}")
        offset = cur.take("<Q", f"the offset of tensor {name}")
        table.append((name, dims, ttype, offset))
    align = int(info.metadata.get("general.alignment", 32)) or 32
    data_start = -(-cur.pos // align) * align
    for name, dims, ttype, offset in table:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise InputError(f"corrupt header: tensor {name!r} has unknown type {ttype}", file=file) from None
        n = 1
        for d in dims:
            n *= d
        if n % block:
            raise InputError(
                f"corrupt header: tensor {name!r} of shape {dims} is not a whole number of {qtype.name} blocks",
                file=file,
            )
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise InputError(
                f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, the file has "
                f"{size} (at least {start + nbytes - size} bytes missing)",
                file=file,
                hint="download or copy the file again",
            )
        # GGUF stores shapes fastest-varying first; report them the way PyTorch sees them
        info.tensors.append((name, tuple(reversed(dims)), qtype.name, start, nbytes))
    return info


def check_gguf(path: str | Path) -> GGUFInfo:
    """Read and check a GGUF file's header and tensor table; InputError names the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such GGUF file", file=str(path))
    size = path.stat().st_size
    if size < 24:
        raise InputError(f"truncated: {size} bytes is shorter than a GGUF header", file=str(path))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            info = _parse(path, buf, size)
        except _Truncated as exc:
            raise InputError(
                f"truncated: the file ends at byte {size}, inside {exc.what} (byte {exc.pos})",
                file=str(path),
                hint="download or copy the file again",
            ) from None
    if not info.tensors:
        raise InputError("the GGUF file holds no tensors", file=str(path))
    return info


def check_convertible(info: GGUFInfo) -> None:
    """Refuse files transformers cannot turn into a causal LM with a tokenizer, before the slow part."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    file = str(info.path)
    arch = info.architecture
    if not arch:
        raise InputError("the GGUF file names no architecture (general.architecture)", file=file)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"architecture {arch!r} cannot be converted by transformers' GGUF loader",
            file=file,
            hint=f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}",
        )
    if "tokenizer.ggml.tokens" not in info.metadata:
        raise InputError(
            "the GGUF file carries no tokenizer (tokenizer.ggml.tokens)",
            file=file,
            hint="add the model as a Hugging Face folder with its tokenizer instead",
        )


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a checked GGUF file to ``out_dir`` (config, fp32 safetensors, tokenizer, chat template).

    Written into a temporary sibling folder and renamed into place, so ``out_dir`` is complete or absent.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out_dir = Path(path), Path(out_dir)
    file = str(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded, loading = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, output_loading_info=True, trust_remote_code=False
        )
    except (ValueError, KeyError, RuntimeError, OSError, IndexError, TypeError) as exc:
        raise InputError(f"transformers could not load the GGUF file: {exc}", file=file) from exc
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        raise InputError(f"the GGUF file lacks weights for {len(missing)} parameters, e.g. {missing[:3]}", file=file)

    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for junk in ("_model_name_or_path",):
        config.__dict__.pop(junk, None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # what SmolLM2 and ChatML models use; see environment.md on pad == eos
    for cfg in (plain.config, plain.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        cfg.bos_token_id = tok.bos_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(build, safe_serialization=True)
        tok.save_pretrained(build)
        check = AutoTokenizer.from_pretrained(build)
        if (check.chat_template or "") != (tok.chat_template or "") or check.eos_token != tok.eos_token:
            raise InputError("the converted tokenizer lost its chat template or eos token", file=file)
        try:
            build.rename(out_dir)
            fsync_dir(out_dir.parent)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            # another process converted the same file meanwhile: keep its result, drop ours
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return out_dir
