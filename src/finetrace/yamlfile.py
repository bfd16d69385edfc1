"""Reading the YAML files users write, with errors that name the file (and line) and what to do.

Shared by every YAML-driven input (train and pipeline configs, eval suites, datasheets, intended-use
files): one implementation, one behaviour. Beyond YAML syntax it refuses, each in one line:

- a binary or non-UTF-8 file (the line of the first bad byte), and files over ``MAX_BYTES``;
- a key written twice in one mapping (PyYAML keeps the last silently; both lines are named);
- nesting deeper than ``MAX_DEPTH`` and alias expansions ("billion laughs") over ``MAX_NODES``.

    >>> doc, lines = load_yaml("train.yaml", "train config")   # lines: {"lora.r": 7, ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError

MAX_BYTES = 4 << 20  # a config is a few kB; anything this large is not one
MAX_DEPTH = 50  # nesting levels of mappings/lists
MAX_NODES = 200_000  # values after expanding aliases


def _loader_class():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader (no Python tags) that refuses duplicate keys, naming both lines."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise _Duplicate(key_node.value, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

        def refuse_tag(self, node):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{node.tag.replace('tag:yaml.org,2002:', '!!')} values are not allowed here "
                "(write text, numbers, true/false, lists and mappings)",
                node.start_mark,
            )

        def compose_node(self, parent, index):  # refuse deep nesting early (the composer recurses)
            self.depth = getattr(self, "depth", 0) + 1
            try:
                if self.depth > MAX_DEPTH:
                    raise _Refused(
                        f"nested more than {MAX_DEPTH} levels deep",
                        self.peek_event().start_mark.line + 1,
                        "a config is a few levels of key: value; flatten it",
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    for tag in ("binary", "set", "omap", "pairs"):  # not JSON: nothing a config or a ledger can hold
        Loader.add_constructor(f"tag:yaml.org,2002:{tag}", Loader.refuse_tag)
    return Loader


class _Refused(Exception):
    def __init__(self, message: str, line: int, hint: str):
        super().__init__(message)
        self.message, self.line, self.hint = message, line, hint


class _Duplicate(Exception):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _walk(node, lines: dict[str, int]) -> None:
    """Check depth and expanded size of a composed document; fill ``lines`` with dotted key lines."""
    import yaml

    sizes: dict[int, int] = {}

    def size(n, depth: int, prefix: str | None) -> int:
        if depth > MAX_DEPTH:
            raise _Refused(
                f"nested more than {MAX_DEPTH} levels deep",
                n.start_mark.line + 1,
                "a config is a few levels of key: value; flatten it",
            )
        if id(n) in sizes:  # an alias: counted again, walked once
            return sizes[id(n)]
        total = 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = None
                if prefix is not None and isinstance(k, yaml.ScalarNode):
                    key = prefix + str(k.value)
                    lines.setdefault(key, k.start_mark.line + 1)
                total += size(k, depth + 1, None) + size(v, depth + 1, None if key is None else key + ".")
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v, depth + 1, None) for v in n.value)
        sizes[id(n)] = total
        if total > MAX_NODES:
            raise _Refused(
                f"expands to more than {MAX_NODES:,} values (aliases repeated inside aliases)",
                n.start_mark.line + 1,
                "write the values out; do not nest aliases",
            )
        return total

    size(node, 0, "")


def parse_text(text: str, file: str | None = None, error: type[InputError] = InputError) -> tuple[Any, dict[str, int]]:
    """(document, {dotted key: line}) of YAML ``text``; ``error`` (naming file and line) if it is bad."""
    import yaml

    loader = None
    try:
        _check_brackets(text)
        loader = _loader_class()(text)  # the reader refuses control characters here
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _walk(node, lines)
        return loader.construct_document(node), lines
    except _Duplicate as d:
        raise error(
            f"key '{d.key}' is written twice (first at line {d.first})",
            file=file,
            line=d.second,
            hint="keep one of them: YAML would silently use the last",
        ) from None
    except _Refused as exc:  # depth / size
        raise error(exc.message, file=file, line=exc.line, hint=exc.hint) from None
    except RecursionError:
        raise error(
            f"nested too deeply to read (more than {MAX_DEPTH} levels)",
            file=file,
            hint="a config is a few levels of key: value; flatten it",
        ) from None
    except yaml.YAMLError as exc:
        if isinstance(exc, yaml.reader.ReaderError):
            hint = "remove it (inside double quotes an escape such as \\x07 is allowed)"
        elif isinstance(exc, yaml.constructor.ConstructorError):
            hint = "finetrace reads plain YAML: remove the !!tag, write the value as text"
        else:
            hint = "check the indentation and quoting on that line"
        raise error(f"not valid YAML: {_problem(exc)}", file=file, line=_line(exc, text), hint=hint) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_brackets(text: str) -> None:
    """Refuse deep [ { nesting before PyYAML's scanner sees it (its cost grows with the square of it)."""
    import itertools
    import re

    steps = [1 if c in "[{" else -1 for c in re.sub(r"[^\[\]{}]", "", text)]
    for i, depth in enumerate(itertools.accumulate(steps)):
        if depth > 4 * MAX_DEPTH:  # generous: brackets inside quoted text count here too
            pos = next(m.start() for k, m in enumerate(re.finditer(r"[\[\]{}]", text)) if k == i)
            raise _Refused(
                f"nested more than {MAX_DEPTH} levels deep",
                text[:pos].count("\n") + 1,
                "a config is a few levels of key: value; flatten it",
            )


def _problem(exc) -> str:
    import yaml

    if isinstance(exc, yaml.reader.ReaderError):
        return (
            f"control character #x{exc.character:04x} is not allowed"
            if isinstance(exc.character, int)
            else "unreadable character"
        )
    parts = [p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p]
    return ", ".join(parts) or str(exc).splitlines()[0]


def _line(exc, text: str) -> int | None:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    pos = getattr(exc, "position", None)  # ReaderError: a character index
    return text[:pos].count("\n") + 1 if isinstance(pos, int) else None


def decode(raw: bytes, file: str, what: str, error: type[InputError] = InputError) -> str:
    """The text of a YAML file's bytes (UTF-8, or UTF-16 with a byte-order mark); refuses binary files."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].decode("utf-16", errors="ignore").count("\n") + 1
            raise error(f"the {what} is not valid UTF-16 text", file=file, line=line, hint="save it as UTF-8") from None
    if b"\x00" in raw:
        raise error(
            f"the {what} is a binary file (or UTF-16 without a byte-order mark), not YAML text",
            file=file,
            line=raw[: raw.index(b"\x00")].count(b"\n") + 1,
            hint=f"give the path of the YAML {what}, saved as UTF-8 text",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
            file=file,
            line=raw[: exc.start].count(b"\n") + 1,
            hint="save it as UTF-8",
        ) from None


def load_yaml(
    path: str | Path, what: str, missing_hint: str | None = None, error: type[InputError] = InputError
) -> tuple[Any, dict[str, int]]:
    """(document, {dotted key: line}) of YAML file ``path``; ``error`` naming the file otherwise.

    ``what`` names the file's role in messages ("train config", "datasheet"); ``error`` is the
    InputError subclass raised (ConfigError for configs).
    """
    p = Path(path)
    if not p.is_file():
        raise error(
            f"no such {what}" + (" (it is a folder)" if p.is_dir() else ""),
            file=str(p),
            hint=missing_hint or f"give the path of a YAML {what}",
        )
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read the {what}: {exc.strerror}", file=str(p), line=1) from None
    if len(raw) > MAX_BYTES:
        raise error(
            f"the {what} is {p.stat().st_size:,} bytes; a YAML {what} is at most {MAX_BYTES:,}",
            file=str(p),
            line=raw[:MAX_BYTES].count(b"\n") + 1,
            hint=f"give the path of the YAML {what}, not of a data file",
        )
    return parse_text(decode(raw, str(p), what, error), str(p), error)


def load_mapping(
    path: str | Path, what: str, missing_hint: str | None = None, error: type[InputError] = InputError
) -> tuple[dict | None, dict[str, int]]:
    """``load_yaml`` of a file that must hold a mapping (None: the file is empty); ``error`` otherwise.
    The one check of facts files (``read_mapping``) and typed configs (``read_config``)."""
    doc, lines = load_yaml(path, what, missing_hint, error)
    if doc is not None and not isinstance(doc, dict):
        raise error(
            f"the {what} must be a mapping of key: value, not a {_kind(doc)}",
            file=str(path),
            line=1,
            hint="write one 'key: value' per line",
        )
    return doc, lines


def key_lines(text: str) -> dict[str, int]:
    """1-based line number of each dotted key (``lora.r``) of a YAML mapping; {} if it does not parse."""
    try:
        return parse_text(text)[1]
    except InputError:
        return {}


def read_mapping(
    path: str | Path,
    what: str,
    missing_hint: str | None = None,
    error: type[InputError] = InputError,
    known: list[str] | None = None,
    aliases: dict[str, str] | None = None,
    noun: str = "key",
) -> dict:
    """The mapping of facts in YAML file ``path`` (empty file: {}); ``error`` naming the file otherwise.

    ``what`` names the file's role in messages ("datasheet", "intended-use file"). With ``known``, any
    other key (after ``aliases``) is refused ("unknown <noun> 'x'"), naming its line and the closest one.
    """
    doc, lines = load_mapping(path, what, missing_hint, error)
    if doc is None:
        return {}
    out = {}
    for key, value in doc.items():
        if not isinstance(key, str) or not key.strip():
            raise error(
                f"key {key!r} is not a name",
                file=str(path),
                line=lines.get(str(key), 1),
                field=str(key) or None,
                hint="write keys as plain names (quote them if needed)",
            )
        name = (aliases or {}).get(key, key)
        if known is not None and name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, 1)
            raise error(
                f"unknown {noun} {key!r}",
                file=str(path),
                line=lines.get(key),
                field=key,
                hint=f"did you mean {close[0]!r}?" if close else f"keys: {', '.join(known)}",
            )
        out[name] = _fact(value, key, str(path), lines, error)
    return out


MAX_TEXT = 100_000  # characters of one fact


def _fact(value, key: str, file: str, lines: dict[str, int], error, depth: int = 0):
    """A fact a person wrote: text, a number, true/false, a date (kept as ISO text), or a list or mapping of
    those (two levels at most). Anything else names the key and says what to write."""
    import datetime
    import math

    def bad(msg: str):
        top = key.split(".")[0]
        return error(
            msg,
            file=file,
            line=lines.get(key, lines.get(top)),
            field=key,
            hint="write text, a number, true/false, or a list of those",
        )

    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"{value} is not a usable number")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise bad(f"{len(value):,} characters; a fact is at most {MAX_TEXT:,}")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, dict)) and depth >= 2:
        raise bad("nested more than two levels")
    if isinstance(value, list):
        return [_fact(v, key, file, lines, error, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise bad("its keys must be names")
        return {k: _fact(v, f"{key}.{k}", file, lines, error, depth + 1) for k, v in value.items()}
    raise bad(f"a {_kind(value)} value ({type(value).__name__}) is not a fact finetrace can record")


def _kind(value) -> str:
    return {list: "list", str: "text", int: "number", float: "number", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


# -- typed configs: YAML (or a mapping) -> a pydantic model, errors naming file, line and key ------------
# The one loader of train configs, pipeline files and eval suites. Every error is a ConfigError
# ``FILE:LINE field 'KEY': what (what to do)``: an unknown key suggests the closest valid one, a missing
# key says what to add, a bad value quotes the field's description.


def read_config(path: str | Path, what: str, missing_hint: str | None = None) -> tuple[dict, dict[str, int]]:
    """(mapping, {dotted key: line}) of YAML config file ``path`` (empty file: {}); ConfigError otherwise."""
    from .errors import ConfigError

    doc, lines = load_mapping(path, what, missing_hint, ConfigError)
    if doc is None:
        return {}, lines
    return doc, lines


def load_model(
    model,
    path: str | Path,
    what: str,
    *,
    missing_hint: str | None = None,
    reference: str = "",
    aliases: dict[str, str] | None = None,
):
    """Read YAML config file ``path`` and validate it as ``model`` (see :func:`validate_model`)."""
    doc, lines = read_config(path, what, missing_hint)
    return validate_model(model, doc, what, file=str(path), lines=lines, reference=reference, aliases=aliases)


def validate_model(
    model,
    doc: Any,
    what: str,
    *,
    file: str | None = None,
    lines: dict[str, int] | None = None,
    prefix: str = "",
    reference: str = "",
    aliases: dict[str, str] | None = None,
    locate=None,
):
    """``model.model_validate(doc)``, or a ConfigError naming the key, its file and line, and a fix.

    ``lines`` are the dotted-key lines of ``file``; ``prefix`` is where ``doc`` sits in that file
    (``train.`` for a pipeline's inline train keys). ``reference`` says where the keys are documented;
    ``aliases`` maps names from other tools to ours (suggested for an unknown key). ``locate(key)``
    may return ``(file, line, field)`` instead, for a document merged from two files.
    """
    from pydantic import ValidationError

    from .errors import ConfigError

    if not isinstance(doc, dict):
        raise ConfigError(
            f"a {what} must be a mapping of key: value, not a {_kind(doc)}",
            file=file,
            line=1 if file else None,
            field=prefix.rstrip(".") or None,
            hint=reference or "write one 'key: value' per line",
        )
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        errs = exc.errors()
        err = next((e for e in errs if e["type"] == "extra_forbidden"), errs[0])  # a typo explains the rest
        key = loc_key(err["loc"], model)
        if locate is not None:
            file, line, field = locate(key)
        else:
            line, field = (lines or {}).get(prefix + key), prefix + key
        where = {"file": file, "line": line, "field": field}
        desc = describe_key(model, key)
        if err["type"] == "extra_forbidden":
            close = suggest_key(model, key, aliases)
            hint = (
                f"did you mean '{prefix}{close}'?"
                if close
                else f"valid keys here: {', '.join(keys_beside(model, key))}"
            )
            raise ConfigError("unknown key", hint=hint, **where) from None
        if err["type"] == "missing":
            raise ConfigError(
                "required key is missing", hint=f"add '{key}: ...'" + (f" ({desc})" if desc else ""), **where
            ) from None
        raise ConfigError(
            f"{err['msg']} (got {err.get('input')!r:.200})", hint=desc or reference or None, **where
        ) from None


def artifact_name(v: str) -> str:
    """A pydantic field check: ``v`` is a valid artifact name (``ledger.log.check_name``), raised as a
    ValueError so that the config error names the file, line and key."""
    from .ledger.log import check_name

    try:
        check_name(v)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    return v


def _model_of(ann):
    """The pydantic model behind an annotation (``X``, ``X | None``, ``X | dict``), else None."""
    from pydantic import BaseModel

    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _field(model, part: str):
    """The field named ``part`` (by name or alias) of ``model``, else None."""
    if model is None:
        return None
    info = model.model_fields.get(part)
    return info if info is not None else next((i for i in model.model_fields.values() if i.alias == part), None)


def field_names(model, prefix: str = "") -> list[str]:
    """Every valid dotted key of ``model`` (aliases where a field has one), nested models included."""
    out = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        out.append(prefix + key)
        sub = _model_of(info.annotation)
        if sub is not None:
            out += field_names(sub, prefix + key + ".")
    return out


def loc_key(loc: tuple, model=None) -> str:
    """The dotted key a pydantic error location points at (list indices and union branches dropped)."""
    parts: list[str] = []
    if "[key]" in loc:  # a key that is not a name (a number, a list)
        return ".".join(str(p) for p in loc[: loc.index("[key]")])
    for p in loc:
        if isinstance(p, int):
            continue
        if model is None:  # inside a plain field (a union branch, a list item): the field is the key
            break
        parts.append(str(p))
        info = _field(model, str(p))
        if info is None:  # an unknown key
            break
        model = _model_of(info.annotation)
    return ".".join(parts) or "(root)"


def describe_key(model, key: str) -> str:
    """The description of dotted ``key`` of ``model`` ("" if it has none or is not a key)."""
    info = None
    for p in key.split("."):
        info = _field(model, p)
        if info is None:
            return ""
        model = _model_of(info.annotation)
    return (info.description or "") if info is not None else ""


def keys_beside(model, key: str) -> list[str]:
    """The valid keys at the level of dotted ``key`` (for "valid keys here")."""
    for p in key.split(".")[:-1]:
        model = _model_of(getattr(_field(model, p), "annotation", None))
    return [i.alias or n for n, i in model.model_fields.items()] if model is not None else []


def suggest_key(model, key: str, aliases: dict[str, str] | None = None) -> str | None:
    """The valid key closest to an unknown dotted ``key``: an alias, a close full key, a close last part."""
    import difflib

    names = field_names(model)
    leaf = key.rsplit(".", 1)[-1]
    for k in (key, leaf):
        if aliases and k in aliases:
            return aliases[k]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:  # compare the last part only ("lora.rank" -> "lora.r")
        leaves = difflib.get_close_matches(leaf, [n.rsplit(".", 1)[-1] for n in names], n=1, cutoff=0.5)
        close = [n for n in names if n.rsplit(".", 1)[-1] == leaves[0]][:1] if leaves else []
    return close[0] if close else None
