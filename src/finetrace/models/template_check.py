"""Chat-template and tokenizer checks: an adapter must use its base's known-good text interface.

A shared adapter can be valid weights and still carry a poisoned chat template (a hidden system
instruction, a changed end-of-turn) or a tokenizer with remapped tokens. The base model's files in the
store are pinned by its digest: they are the known-good ones. One rule, used by the marketplace
(``market import-hub``, ``market pull``) and by serving (``serve.registry.check_adapter``), which is why
it lives here, below both:

    compare_files(folder, base)          tokenizer files / chat template shipped with an adapter against the
                                         base's (a folder, or ``base_files(store, digest)``), as unified diffs
    compare_identity(declared, base, actual=None)
                                         the identity an adapter declares (``chat_template_sha256``, and with
                                         ``actual`` the tokenizer hash and end-of-turn token) against the base's
    check(differences, what, allow)      refuse (``TemplateChanged`` or the caller's error, every difference
                                         shown) unless allowed
    check_serving(adapter_dir, store, base_digest, declared, actual, allow, error)
                                         both comparisons, then ``check``: what serving runs before loading
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path

from ..canonical import sha256_bytes
from ..errors import FinetraceError, InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
MAX_DIFF_LINES = 60
HINT = (
    "a changed chat template can smuggle instructions into every prompt; if this change is intended, "
    "pass --allow-template-change"
)

Files = Mapping[str, bytes]  # tokenizer file name -> bytes


class TemplateChanged(InputError):
    """An adapter's tokenizer or chat template differs from its base model's known-good one."""


def folder_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files present in ``folder``."""
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def base_files(store, digest: str) -> dict[str, bytes]:
    """The tokenizer files of a stored model folder, each re-hashed now (only those: a multi-GB base is not
    read to check its tokenizer)."""
    out = {}
    for e in store.tree(digest):
        if e.path in TOKENIZER_FILES:
            out[e.path] = store.file(e.digest).read_bytes()
    return out


def _as_files(src: Path | Files) -> Files:
    return folder_files(Path(src)) if isinstance(src, (str, Path)) else src


def _readable(name: str, raw: bytes) -> list[str]:
    text = raw.decode("utf-8", "replace")
    if name.endswith(".json"):
        try:  # one key per line, so that a diff points at the changed entry, not a 2 MB line
            text = json.dumps(json.loads(text), indent=1, sort_keys=True, ensure_ascii=False)
        except ValueError:
            pass
    return text.splitlines(keepends=True)


def chat_template(src: Path | Files) -> str | None:
    """The chat template of a model or adapter (``chat_template.jinja``, else tokenizer_config's)."""
    files = _as_files(src)
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8", "replace")
    if "tokenizer_config.json" in files:
        try:
            tpl = json.loads(files["tokenizer_config.json"]).get("chat_template")
        except (ValueError, AttributeError):
            return None
        return tpl if isinstance(tpl, str) else None
    return None


def template_sha256(src: Path | Files) -> str:
    """``sha256:...`` of the chat template (empty text when there is none), as ``models.identity`` records it."""
    return sha256_bytes((chat_template(src) or "").encode("utf-8"))


def unified(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    lines = list(difflib.unified_diff(a, b, a_name, b_name, n=2))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)\n"]
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def compare_files(folder: Path | Files, base: Path | Files) -> list[dict]:
    """Tokenizer files and the chat template of ``folder`` that differ from ``base``'s:
    ``[{"file", "diff"}]`` (a file the base lacks is a difference too)."""
    mine, theirs = _as_files(folder), _as_files(base)
    out = []
    for name in TOKENIZER_FILES:
        if name not in mine or mine[name] == theirs.get(name, b""):
            continue
        out.append(
            {
                "file": name,
                "diff": unified(
                    f"base/{name}",
                    _readable(name, theirs.get(name, b"")),
                    f"adapter/{name}",
                    _readable(name, mine[name]),
                ),
            }
        )
    tpl, base_tpl = chat_template(mine), chat_template(theirs)
    if tpl is not None and tpl != (base_tpl or "") and not any(d["file"] == "chat_template.jinja" for d in out):
        out.append(
            {
                "file": "chat template",
                "diff": unified(
                    "base chat template",
                    (base_tpl or "").splitlines(True),
                    "adapter chat template",
                    tpl.splitlines(True),
                ),
            }
        )
    return out


def compare_identity(declared: dict, base: Path | Files, actual: dict | None = None) -> list[dict]:
    """The identity an adapter declares against its base's: the ``chat_template_sha256`` against the base's
    template (shown, since the adapter's template text is not shipped), and, given ``actual`` (the running
    base's ``models.identity.text_identity``), the tokenizer vocabulary hash and the end-of-turn token."""
    files = _as_files(base)
    have = dict(actual or {})
    have.setdefault("chat_template_sha256", template_sha256(files))
    out = []
    want = declared.get("chat_template_sha256")
    if want and want != have["chat_template_sha256"]:
        tpl = chat_template(files) or ""
        out.append(
            {
                "file": "chat template (chat_template_sha256)",
                "diff": f"the adapter was trained with chat template {want}; the base's known-good template "
                f"is {have['chat_template_sha256']}:\n" + "".join(f"  {line}" for line in tpl.splitlines(True)[:20]),
            }
        )
    tok_want, tok_have = declared.get("tokenizer_sha256"), have.get("tokenizer_sha256")
    if tok_want and tok_have and tok_want != tok_have:
        out.append(
            {
                "file": "tokenizer vocabulary (tokenizer_sha256)",
                "diff": f"the adapter was trained with vocabulary {tok_want}; the base's is {tok_have}\n",
            }
        )
    for key in ("eos_token", "eos_token_id"):
        if key in declared and key in have and declared[key] != have[key]:
            out.append(
                {
                    "file": key,
                    "diff": f"the adapter was trained with {key} {declared[key]!r}; the base's is {have[key]!r}\n",
                }
            )
    return out


def check(
    differences: list[dict],
    what: str,
    allow: bool = False,
    error: type[FinetraceError] = TemplateChanged,
    hint: str = HINT,
) -> list[dict]:
    """Refuse ``what`` with ``error`` when it has differences, showing each, unless ``allow``; returns them."""
    if differences and not allow:
        shown = "\n".join(f"{d['file']}:\n{d['diff']}" for d in differences)
        raise error(
            f"{what}: tokenizer or chat template differs from the base model's known-good one\n{shown}", hint=hint
        )
    return differences


def check_serving(
    adapter_dir: Path,
    base: Path | Files,
    declared: dict,
    actual: dict | None = None,
    allow: bool = False,
    what: str | None = None,
    error: type[FinetraceError] = TemplateChanged,
    hint: str = HINT,
) -> list[dict]:
    """What serving runs before it loads an adapter onto a base: the adapter folder's tokenizer files and
    its declared identity against the base's known-good ones (``base``: a folder or ``base_files(...)``)."""
    diffs = compare_files(Path(adapter_dir), base) + compare_identity(declared or {}, base, actual)
    return check(diffs, what or f"adapter {adapter_dir}", allow, error, hint)
