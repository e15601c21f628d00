"""Reading recipe files: our format or mergekit's, with errors that name the key and its line.

A file is a mergekit recipe when its top level has ``merge_method``; otherwise it is ours. Line numbers and
suggestions come from :mod:`.yaml_source`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .yaml_source import (  # noqa: F401
    describe_error,
    first_error,
    key_lines,
    locate_message,
    parse_yaml,
    suggestion,
    user_path,
    validate,
    walk,
)
from .yaml_source import error_text as _error_text


def load_recipe(path: str | Path):
    """The recipe in ``path``: a :class:`~merge.recipes.schema.Recipe` or a
    :class:`~merge.recipes.mergekit.MergekitRecipe`. Raises :class:`InputError` naming key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the recipe ({e})") from None
    return parse_text(text, str(path))


def parse_text(text: str, source: str = "recipe"):
    """Parse recipe YAML ``text`` (``source`` names it in errors) into a validated recipe object."""
    from .mergekit import MergekitRecipe
    from .schema import Recipe

    node, data = parse_yaml(text, source)
    if "merge_method" in data:
        return validate(MergekitRecipe, data, node, source, MergekitRecipe.known_keys)
    return validate(Recipe, data, node, source, Recipe.known_keys)


def known_keys(model_name: str = "") -> set[str]:
    """Every key of the recipe format named ``model_name`` (ours or mergekit's), at any nesting level."""
    from .mergekit import MergekitRecipe
    from .schema import Recipe

    return MergekitRecipe.known_keys() if model_name.startswith("Mergekit") else Recipe.known_keys()


def error_text(err: dict, vocabulary=None) -> str:
    """pydantic's message for ``err`` in one line (an unknown key names a close key of our format)."""
    from .schema import Recipe

    return _error_text(err, vocabulary or Recipe.known_keys)
