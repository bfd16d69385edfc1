"""Chat-template and tokenizer checks: an adapter must use its base's known-good text interface.

A shared adapter can be valid weights and still carry a poisoned chat template (a hidden system
instruction, a changed end-of-turn) or a tokenizer with remapped tokens. The base model's files in the
store are pinned by its digest: they are the known-good ones. Two checks, one rule:

    compare_files(folder, base_dir)     tokenizer files / chat template shipped with an adapter (a Hub folder)
                                        against the base's, as unified diffs
    compare_identity(declared, base_dir) the hashes an adapter declares (``tokenizer_sha256``,
                                        ``chat_template_sha256``, eos) against the base's
    check(differences, what, allow)     refuse (``Refused``, with every difference shown) unless allowed

Used by ``market import-hub`` and ``market pull`` (``--allow-template-change``) and, through
``check_serving``, by serving.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..canonical import sha256_bytes
from .checks import Refused

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
MAX_DIFF_LINES = 60


def _readable(name: str, raw: bytes) -> list[str]:
    text = raw.decode("utf-8", "replace")
    if name.endswith(".json"):
        try:  # one key per line, so that a diff points at the changed entry, not a 2 MB line
            text = json.dumps(json.loads(text), indent=1, sort_keys=True, ensure_ascii=False)
        except ValueError:
            pass
    return text.splitlines(keepends=True)


def chat_template(folder: Path) -> str | None:
    """The chat template of a model or adapter folder (``chat_template.jinja``, else tokenizer_config's)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tpl = json.loads(cfg.read_text("utf-8")).get("chat_template")
        except ValueError:
            return None
        return tpl if isinstance(tpl, str) else None
    return None


def unified(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    lines = list(difflib.unified_diff(a, b, a_name, b_name, n=2))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)\n"]
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def compare_files(folder: Path, base_dir: Path) -> list[dict]:
    """Tokenizer files and the chat template in ``folder`` that differ from ``base_dir``'s:
    ``[{"file", "diff"}]`` (a file the base lacks is a difference too)."""
    out = []
    for name in TOKENIZER_FILES:
        mine = folder / name
        if not mine.is_file():
            continue
        base = base_dir / name
        theirs = base.read_bytes() if base.is_file() else b""
        if mine.read_bytes() == theirs:
            continue
        out.append({"file": name, "diff": unified(f"base/{name}", _readable(name, theirs), f"adapter/{name}",
                                                  _readable(name, mine.read_bytes()))})
    tpl, base_tpl = chat_template(folder), chat_template(base_dir)
    if tpl is not None and tpl != (base_tpl or "") and not any(d["file"] == "chat_template.jinja" for d in out):
        out.append({"file": "chat template", "diff": unified("base chat template", (base_tpl or "").splitlines(True),
                                                             "adapter chat template", tpl.splitlines(True))})
    return out


def compare_identity(declared: dict, base_dir: Path) -> list[dict]:
    """The declared ``chat_template_sha256`` against the base's template (the hash ``models.identity``
    records at training); a mismatch names both hashes (the adapter's template text is not shipped)."""
    want = declared.get("chat_template_sha256")
    if not want:
        return []
    tpl = chat_template(base_dir) or ""
    have = sha256_bytes(tpl.encode("utf-8"))
    if want == have:
        return []
    return [{"file": "chat template", "diff": f"the adapter was trained with chat template {want}; the base's "
                                              f"known-good template is {have}:\n"
                                              + "".join(f"  {line}" for line in tpl.splitlines(True)[:20])}]


def check(differences: list[dict], what: str, allow: bool = False) -> list[dict]:
    """Refuse ``what`` when it has differences, showing each, unless ``allow``; returns the differences."""
    if differences and not allow:
        shown = "\n".join(f"{d['file']}:\n{d['diff']}" for d in differences)
        raise Refused(f"{what}: tokenizer or chat template differs from the base model's known-good one\n{shown}",
                      hint="a changed chat template can smuggle instructions into every prompt; if this change "
                           "is intended, pass --allow-template-change")
    return differences


def check_serving(adapter_dir: Path, base_dir: Path, declared: dict | None = None, allow: bool = False) -> list[dict]:
    """The check serving runs before loading an adapter onto a base (a small hook for serve/)."""
    diffs = compare_files(Path(adapter_dir), Path(base_dir)) + compare_identity(declared or {}, Path(base_dir))
    return check(diffs, f"adapter {adapter_dir}", allow)
