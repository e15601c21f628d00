"""Recipe YAML with line numbers: parsing, validation into a pydantic class, and errors as ``FILE:LINE: key: message``.

Validation errors come from pydantic as key paths (``sft.0.scale``); the composed YAML node tree maps a path to
its line. Nothing here knows a recipe format (:mod:`.loading` picks the class; callers pass the format's keys
for suggestions), so every format can use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


def validate(cls: type, data: dict, node, source: str, vocabulary: Callable[[], set[str]] = set):
    """``cls.model_validate(data)``, with any complaint as one line naming the key and its line; the result
    remembers its file's key lines (``_lines``) and name (``_source``) for errors raised later."""
    from pydantic import ValidationError

    try:
        recipe = cls.model_validate(data)
    except ValidationError as e:
        raise InputError(describe_error(e, node, source, vocabulary)) from None
    except InputError as e:  # raised by our own checks with a key path: "key.path: message"
        raise InputError(locate_message(str(e), node, source)) from None
    recipe._lines = key_lines(node)
    recipe._source = source
    return recipe


def describe_error(error, node, source: str, vocabulary: Callable[[], set[str]] = set) -> str:
    """One line for pydantic's first complaint: ``FILE:LINE: key.path: message`` (``vocabulary()``: every key
    of the format, for suggestions)."""
    err = first_error(error)
    found, line = walk(node, err["loc"])
    msg = error_text(err, vocabulary)
    if err["type"] == "missing" and len(found) < len(err["loc"]):
        found = found + [str(err["loc"][-1])]
    if not found:
        return locate_message(msg, node, source)
    inner = re.match(r"^(\w+): ", msg)  # a model check naming one of its own keys ("gamma: only ...")
    if inner and err["type"] == "value_error":
        child_found, child_line = walk(node, list(user_path(err["loc"])) + [inner.group(1)])
        if len(child_found) == len(found) + 1:
            return f"{source}:{child_line}: {'.'.join(found)}.{msg}"
    return f"{source}:{line}: {'.'.join(found)}: {msg}"


def first_error(error) -> dict:
    """The complaint to show first: an unknown key (usually a misspelling, which also makes the intended key
    look missing) before anything else."""
    errors = error.errors()
    unknown = next((e for e in errors if e["type"] == "extra_forbidden"), None)
    # of a union's branches, the one that got furthest into the value (rules: t.0.match) says what is wrong
    return unknown or max(errors, key=lambda e: len(user_path(e["loc"])))


def user_path(loc) -> list:
    """``loc`` without pydantic's union branch tags (``float``, ``list[Rule]``, ``function-after[...]``)."""
    tags = ("float", "int", "bool", "str", "dict", "list", "none")
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p in tags))]


def error_text(err: dict, vocabulary: Callable[[], set[str]] = set) -> str:
    """pydantic's message for ``err`` in one line, in the user's terms: an unknown key names a close known key."""
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1]) if err["loc"] else ""
        return "unknown key" + suggestion(key, vocabulary())
    msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
    if err["type"] in ("float_type", "int_type", "bool_type") and isinstance(err.get("input"), bool):
        msg += f" (got {str(err['input']).lower()}: a boolean is not a number)"
    return msg


def suggestion(word: str, vocabulary) -> str:
    """`` (did you mean 'x'?)`` for the closest known word (difflib), or nothing."""
    import difflib

    if word in vocabulary:
        return " here (it is a key at another level of the recipe; check the indentation)"
    close = difflib.get_close_matches(word, sorted(vocabulary), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else " (check its spelling)"


def model_keys(*roots) -> set[str]:
    """Every field name of the pydantic models ``roots``, at any nesting level."""
    keys: set[str] = set()
    todo, seen = list(roots), set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, field in cls.model_fields.items():
            keys.add(name)
            todo += _models_in(field.annotation)
    return keys


def _models_in(annotation) -> list:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def locate_message(msg: str, node, source: str) -> str:
    """``key: message`` with the line of ``key`` (a dotted path) when the file has it."""
    m = re.match(r"^([\w.\[\]]+): ", msg)
    if m:
        path = [int(p) if p.isdigit() else p for p in m.group(1).split(".")]
        found, line = walk(node, path)
        if found:
            return f"{source}:{line}: {msg}"
    return f"{source}:{_line(node)}: {msg}"


def locate_after(recipe, msg: str) -> str:
    """``key.path: message`` raised after validation (planning), with the file and line of the longest
    prefix of that key path the recipe's file has; unchanged for recipes not read from a file."""
    lines: dict = getattr(recipe, "_lines", None) or {}
    m = re.match(r"^([\w.]+): ", msg)
    if not lines or not m or re.match(r"^[^:\s]+:\d+: ", msg):
        return msg
    path = tuple(int(p) if p.isdigit() else p for p in m.group(1).split("."))
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f"{recipe._source}:{lines[path[:n]]}: {msg}"
    return msg


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

