"""Model references -> local folders. A reference is a local folder (Hub ids and aliases come later)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference led: the local folder, and for Hub models the repo id and exact commit."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def pinned(self) -> str:
        """How the card and the recipe name this input: repo@commit for Hub models, else the absolute path."""
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)


def resolve_model(ref: str, role: str) -> ResolvedModel:
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(ref, path.resolve())
    if path.exists():
        raise InputError(f"{role} {ref}: expected a model folder, got a file")
    raise InputError(f"{role} {ref}: no such folder")
