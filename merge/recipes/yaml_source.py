"""Recipe YAML with line numbers: parsing, validation into a pydantic class, and errors as ``FILE:LINE: key: message``.

Validation errors come from pydantic as key paths (``sft.0.scale``); the composed YAML node tree maps a path to
its line. Nothing here knows a recipe format (:mod:`.loading` picks the class), so every format can use it.
"""

from __future__ import annotations

import re

import yaml

from ..errors import InputError


def parse_yaml(text: str, source: str = "recipe"):
    """``(node tree, data)`` of YAML ``text``; data must be a mapping. Raises :class:`InputError` naming the line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{source}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise InputError(f"{source}: a recipe is a YAML mapping (method: ..., base: ..., sft: ...), got {kind}")
    return node, data


def validate(cls: type, data: dict, node, source: str):
    """``cls.model_validate(data)``, with any complaint as one line naming the key and its line."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_error(e, node, source)) from None
    except InputError as e:  # raised by our own checks with a key path: "key.path: message"
        raise InputError(locate_message(str(e), node, source)) from None


def describe_error(error, node, source: str) -> str:
    """One line for pydantic's first complaint: ``FILE:LINE: key.path: message``."""
    err = error.errors()[0]
    found, line = walk(node, err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    elif err["type"] == "missing" and len(found) < len(err["loc"]):
        found = found + [str(err["loc"][-1])]
    if not found:
        return locate_message(msg, node, source)
    return f"{source}:{line}: {'.'.join(found)}: {msg}"


def locate_message(msg: str, node, source: str) -> str:
    """``key: message`` with the line of ``key`` (a dotted path) when the file has it."""
    m = re.match(r"^([\w.\[\]]+): ", msg)
    if m:
        path = [int(p) if p.isdigit() else p for p in m.group(1).split(".")]
        found, line = walk(node, path)
        if found:
            return f"{source}:{line}: {msg}"
    return f"{source}:{_line(node)}: {msg}"


def walk(node, loc) -> tuple[list[str], int]:
    """Follow ``loc`` through the YAML node tree as far as it goes: (the keys found, the line reached).

    Parts that are not in the file (pydantic's union branch tags such as ``list[float]``) are skipped."""
    found: list[str] = []
    line = _line(node)
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue
        key_node, node = child
        found.append(str(part))
        line = _line(key_node)
    return found, line


def _child(node, part):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                return k, v
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part], node.value[part]
    return None


def _line(node) -> int:
    return node.start_mark.line + 1 if node is not None else 1


def key_lines(node) -> dict[tuple, int]:
    """Every key path of the file -> its line (for errors raised after validation)."""
    out: dict[tuple, int] = {}

    def visit(n, path):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                p = path + (k.value,)
                out[p] = _line(k)
                visit(v, p)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                out[path + (i,)] = _line(v)
                visit(v, path + (i,))

    visit(node, ())
    return out

