"""Reading the YAML files users write, with errors that name the file (and line) and what to do.

Shared by every YAML-driven input (train and pipeline configs, datasheets, intended-use files): one
implementation, one behaviour.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def key_lines(text: str) -> dict[str, int]:
    """1-based line number of each dotted key (``lora.r``) of a YAML mapping; {} if it does not parse."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + str(k.value)
                lines.setdefault(key, k.start_mark.line + 1)
                walk(v, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def read_mapping(path: str | Path, what: str, missing_hint: str | None = None) -> dict:
    """The mapping in YAML file ``path`` (empty file: {}); InputError naming the file otherwise.

    ``what`` names the file's role in messages ("datasheet", "intended-use file").
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such {what}", file=str(p), hint=missing_hint)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid YAML: {exc}", file=str(p)) from None
    if not isinstance(doc, dict):
        raise InputError(f"the {what} must be a mapping of key: value", file=str(p))
    return doc
