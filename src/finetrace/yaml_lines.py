"""Where each key of a YAML file is, so that a config error can name ``file:line`` and the key.

Shared by every YAML-driven config (train, pipeline): one implementation, one behaviour.
"""

from __future__ import annotations


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
