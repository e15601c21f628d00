"""Short model names (``llama3`` -> ``meta-llama/Meta-Llama-3-8B``): a packaged table plus the user's own.

The user file is ``$MERGEBACK_ALIASES`` if set, else ``$XDG_CONFIG_HOME/mergeback/aliases.yaml`` (default
``~/.config/mergeback/aliases.yaml``): a YAML mapping ``alias: target``, where a target is a Hub repo id
(``org/name[@revision]``) or a local folder. User entries override packaged ones of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ..errors import InputError

PACKAGED = "aliases.yaml"


@dataclass(frozen=True)
class Alias:
    name: str
    target: str
    source: str  # "built-in" or the user file's path


def user_alias_file() -> Path:
    """Where the user's aliases live (the file need not exist)."""
    if os.environ.get("MERGEBACK_ALIASES"):
        return Path(os.environ["MERGEBACK_ALIASES"]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home).expanduser() / "mergeback" / "aliases.yaml"


def _read_table(text: str, where: str) -> dict[str, str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise InputError(f"{where}: not valid YAML{line}; write one `alias: org/name` per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of `alias: org/name` lines")
    table = {}
    for name, target in data.items():
        if not isinstance(target, str) or not target.strip() or not str(name).strip():
            raise InputError(f"{where}: alias {name!r} must map to a Hub repo id or a folder, got {target!r}")
        table[str(name).strip()] = target.strip()
    return table


def load_aliases() -> dict[str, Alias]:
    """Every alias, packaged first, then the user's (which win)."""
    packaged = resources.files("merge").joinpath(PACKAGED).read_text(encoding="utf-8")
    aliases = {n: Alias(n, t, "built-in") for n, t in _read_table(packaged, f"merge/{PACKAGED}").items()}
    user = user_alias_file()
    if user.is_file():
        try:
            text = user.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{user}: cannot read the alias file ({e})") from None
        aliases.update({n: Alias(n, t, str(user)) for n, t in _read_table(text, str(user)).items()})
    return aliases


def list_aliases() -> list[Alias]:
    """All aliases sorted by name (what ``merge aliases`` prints)."""
    return sorted(load_aliases().values(), key=lambda a: a.name)
