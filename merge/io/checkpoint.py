"""A model folder opened lazily: which tensors exist, their shapes and dtypes, and their bytes on demand.

Supports a single ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and
``pytorch_model*.bin`` through ``torch.load(weights_only=True)`` only. Safetensors is preferred when both exist.
Paths inside an index are never trusted: they must name files inside the model folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import InputError
from .safetensors_file import SafetensorsFile, TensorInfo

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or re-download the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def safe_member(folder: Path, relative: str, what: Path) -> Path:
    """Resolve ``relative`` inside ``folder``, refusing absolute paths, ``..`` and symlinks that leave it.

    A Hugging Face cache snapshot (``.../snapshots/<rev>/``) links its files to ``.../blobs/``; those links are
    allowed because the cache itself put them there.
    """
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        raise InputError(f"{what}: refuses path {relative!r}: index entries must be file names inside the model folder")
    parts = Path(relative).parts
    if ".." in parts:
        raise InputError(f"{what}: refuses path {relative!r}: it points outside the model folder")
    candidate = folder / relative
    real_folder = folder.resolve()
    real = candidate.resolve()
    allowed = [real_folder]
    if real_folder.parent.name == "snapshots":
        allowed.append(real_folder.parent.parent / "blobs")
    if not any(real == root or root in real.parents for root in allowed):
        raise InputError(f"{what}: refuses {relative!r}: it is a link to {real}, outside the model folder")
    return candidate


class BinFile:
    """A ``pytorch_model*.bin`` file loaded with ``weights_only=True`` (memory-mapped when the format allows)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, unsafe globals, truncation: all untrusted-input failures
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"{path}: refused to load ({first[:200]}); only plain tensor checkpoints are accepted - "
                "convert it to safetensors with a trusted tool"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: does not hold a flat dict of tensors")
        self._state = {k: v.contiguous() for k, v in state.items()}
        self.tensors = {
            k: TensorInfo(k, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in self._state.items()
        }
        self.metadata: dict[str, str] = {}

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._state[name].reshape(-1)[start:stop]

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.view(name, start, start + out.numel()))

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        self._state = {}


class Checkpoint:
    """The tensors of one model folder, by name, read lazily from its weight files (a
    :class:`~merge.plan.TensorSource`)."""

    reads_files = True

    def __init__(self, path: str | os.PathLike, role: str = "model"):
        self.path = Path(path)
        self.role = role
        if not self.path.exists():
            raise InputError(f"{role} {self.path}: no such folder")
        if not self.path.is_dir():
            raise InputError(f"{role} {self.path}: expected a model folder, got a file")
        config_path = self.path / "config.json"
        self.config: dict = read_json(config_path) if config_path.exists() else {}
        self.files: list = [self._open(p) for p in self._weight_files()]
        self._where: dict[str, object] = {}
        for f in self.files:
            for name in f.tensors:
                if name in self._where:
                    raise InputError(f"{role} {self.path}: tensor {name!r} appears in two weight files")
                self._where[name] = f
        self._check_index_coverage()

    def _open(self, path: Path):
        return BinFile(path) if path.suffix == ".bin" else SafetensorsFile(path)

    def _present(self, path: Path) -> bool:
        """Whether the weight file ``path`` exists (a header-only view also counts files still on the Hub)."""
        return path.is_file()

    def _glob(self, pattern: str) -> list[Path]:
        return sorted(self.path.glob(pattern))

    def _weight_files(self) -> list[Path]:
        p = self.path
        self._index: dict[str, str] | None = None
        for index_name, single, pattern in (
            (SAFE_INDEX, SAFE_SINGLE, "*.safetensors"),
            (BIN_INDEX, BIN_SINGLE, "pytorch_model*.bin"),
        ):
            if (p / index_name).exists():
                index = read_json(p / index_name)
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise InputError(f"{p / index_name}: has no weight_map; re-save the model")
                bad = [v for v in weight_map.values() if not isinstance(v, str)]
                if bad:
                    raise InputError(f"{p / index_name}: weight_map values must be shard file names, got {bad[0]!r}")
                files = []
                for rel in dict.fromkeys(weight_map.values()):
                    f = safe_member(p, rel, p / index_name)
                    if not self._present(f):
                        raise InputError(f"{p / index_name}: names shard {rel!r}, which is missing from {p}")
                    files.append(f)
                self._index = weight_map
                return files
            if self._present(p / single):
                return [safe_member(p, single, p / single)]
            found = self._glob(pattern)
            if found:
                return [safe_member(p, f.name, f) for f in found]
        if any(p.glob("adapter_model.*")) or (p / "adapter_config.json").exists():
            raise InputError(f"{self.role} {p}: is a LoRA adapter folder, not a full checkpoint")
        what = "has a config.json but no weights" if self.config else "holds no model weights"
        raise InputError(
            f"{self.role} {p}: {what} (expected model.safetensors, sharded safetensors with "
            f"{SAFE_INDEX}, or pytorch_model.bin)"
        )

    def _check_index_coverage(self) -> None:
        if self._index is None:
            return
        for name, rel in self._index.items():
            f = self._where.get(name)
            if f is None or f.path.name != Path(rel).name:
                raise InputError(f"{self.path}: the index lists tensor {name!r} in {rel!r}, "
                                 "but that shard does not hold it")

    # -- queries ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in storage order (file by file, by offset), the order that reads sequentially."""
        out = []
        for f in self.files:
            out.extend(sorted(f.tensors, key=lambda n: f.tensors[n].start))
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name]

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat elements [start, stop) of ``name`` in its stored dtype, zero-copy where possible."""
        return self._where[name].view(name, start, stop)

    def view_dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    @property
    def side_files_path(self) -> Path:
        return self.path

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Copy flat elements [start, start + out.numel()) of ``name`` (stored dtype) into ``out``."""
        return self._where[name].read_into(name, start, out)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

