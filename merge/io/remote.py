"""A Hub checkpoint before its weights are downloaded: its snapshot folder (config, index, tokenizer) with
the safetensors weight files known by their headers alone (read with HTTP range requests,
:func:`merge.hub.read_headers`).

The planner validates it exactly like a local :class:`~merge.io.checkpoint.Checkpoint` (it is one, with
header-only weight files), so names, shapes, vocabularies, layer counts, dtypes and configs are checked
before any weight byte is fetched; the weights are downloaded only for execution.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Mapping

from ..errors import InputError
from .checkpoint import Checkpoint
from .safetensors_file import TensorInfo


class HeaderFile:
    """A weight file known by its header: tensor names, dtypes, shapes and byte ranges, but no bytes."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str]):
        self.path, self.tensors, self.metadata = path, tensors, metadata

    def view(self, name: str, start: int = 0, stop: int | None = None):
        raise RuntimeError(f"{self.path}: only its header was read; download the weights before reading tensors")

    read_into = view

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


class HeaderCheckpoint(Checkpoint):
    """The :class:`Checkpoint` of a snapshot folder whose weight files ``headers`` (file name -> (tensors,
    metadata)) are still on the Hub; files already in the folder are read as usual."""

    def __init__(self, path, headers: Mapping[str, tuple[dict, dict]], role: str = "model"):
        self._remote = dict(headers)
        super().__init__(path, role)

    def _present(self, path: Path) -> bool:
        return self._remote_file(path) or super()._present(path)

    def _glob(self, pattern: str) -> list[Path]:
        remote = [self.path / name for name in self._remote if fnmatch(name, pattern)]
        return sorted(set(super()._glob(pattern)) | set(remote))

    def _open(self, path: Path):
        if self._remote_file(path):
            return HeaderFile(path, *self._remote[path.name])
        return super()._open(path)

    def _remote_file(self, path: Path) -> bool:
        return path.parent == self.path and path.name in self._remote and not path.is_file()


def same_tensors(view: Checkpoint, real, label: str) -> None:
    """The downloaded model must hold exactly the tensors its headers announced (same commit, same bytes)."""
    names = view.names()
    if names != real.names() or any(view.info(n) != real.info(n) for n in names):
        raise InputError(f"{label}: the downloaded weights differ from the headers read before the download; "
                         "the cached copy is damaged - delete it from the Hugging Face cache and rerun")
