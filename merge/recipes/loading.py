"""Reading recipe files: our format or mergekit's, with errors that name the key and its line.

A file is a mergekit recipe when its top level has ``merge_method``; otherwise it is ours. Line numbers come
from :mod:`.yaml_source`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .yaml_source import describe_error, key_lines, locate_message, parse_yaml, validate, walk  # noqa: F401


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
    from .mergekit import MergekitRecipe  # here: reading our format needs no method registry (nor torch)
    from .schema import Recipe

    node, data = parse_yaml(text, source)
    recipe = validate(MergekitRecipe if "merge_method" in data else Recipe, data, node, source)
    if isinstance(recipe, MergekitRecipe):
        recipe._source_text = text
        recipe._lines = key_lines(node)
    return recipe
