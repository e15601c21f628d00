"""Sharded safetensors output, written the way a stream needs it.

Every output tensor's shape and dtype is planned before any byte is written, so each shard's header is
written first and tensor bytes are then put straight into place with positional writes, in any order and
from any thread. Nothing is buffered beyond the chunk being written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MergeError
from .safetensors_file import DTYPE_CODES

INDEX_NAME = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2**31, as transformers' ``max_shard_size`` reads them."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise MergeError(f"invalid size {value!r}; use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    filename: str
    tensors: list[PlannedTensor]
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each tensor's data
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def layout_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[Shard]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(_with_header(Shard(name, group)))
    return shards


def _with_header(shard: Shard) -> Shard:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    rel = {}
    for t in shard.tensors:
        entries[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        rel[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    shard.header = len(raw).to_bytes(8, "little") + raw
    shard.offsets = {name: len(shard.header) + off for name, off in rel.items()}
    return shard


class ShardWriter:
    """Writes planned shards into ``folder``: headers at open, tensor bytes by positional writes."""

    def __init__(self, folder: Path, shards: list[Shard], skip: set[str] = frozenset()):
        self.folder = Path(folder)
        self.shards = shards
        self._fds: dict[str, int] = {}
        self._where: dict[str, tuple[int, int, torch.dtype]] = {}
        for shard in shards:
            if shard.filename in skip:
                continue
            path = self.folder / shard.filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.filename] = fd
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)
            for t in shard.tensors:
                self._where[t.name] = (fd, shard.offsets[t.name], t.dtype)

    def write(self, name: str, start_element: int, data: torch.Tensor) -> None:
        """Put ``data`` (flat, contiguous, the planned dtype, on CPU) at element ``start_element`` of ``name``."""
        fd, offset, dtype = self._where[name]
        if data.dtype != dtype:
            raise TypeError(f"{name}: writing {data.dtype} into a planned {dtype} tensor")
        if data.numel() == 0:
            return
        buf = memoryview(data.contiguous().view(torch.uint8).numpy())
        pos = offset + start_element * dtype.itemsize
        while len(buf):
            written = os.pwrite(fd, buf, pos)
            buf = buf[written:]
            pos += written

    def sync(self, filename: str | None = None) -> None:
        """fdatasync one shard (or all) so its bytes survive a crash."""
        for name, fd in self._fds.items():
            if filename is None or name == filename:
                os.fdatasync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def write_index(folder: Path, shards: list[Shard]) -> None:
    """``model.safetensors.index.json`` as transformers writes it (only when there is more than one shard)."""
    if len(shards) < 2:
        return
    total = sum(t.nbytes for s in shards for t in s.tensors)
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
