"""Sharded safetensors output, written the way a stream needs it.

Every output tensor's shape and dtype is planned before any byte is written, so each shard's header is
written first and tensor bytes are then put straight into place with positional writes, in any order and
from any thread. Nothing is buffered beyond the chunk being written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

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


def format_size(n: float, up: bool = False) -> str:
    """Bytes in the largest decimal unit that keeps the number >= 1, one decimal, as ``parse_size`` reads it
    back: 1000 -> '1KB', 131072 -> '131.1KB', 5e9 -> '5GB'. ``up`` rounds up (for a minimum to give)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            value = n / _UNITS[unit]
            break
    else:
        unit, value = "B", n
    value = math.ceil(value * 10) / 10 if up else round(value, 1)
    return f"{value:g}{unit}"


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


def _writeback_starter():
    """Linux ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to disk without
    waiting, so the disk works while we compute instead of all at the final fdatasync (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, n: fn(fd, offset, n, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_START_WRITEBACK = _writeback_starter()
WRITEBACK_BYTES = 64 << 20  # buffered writes: hint the kernel after this many bytes of a tensor
ALIGN = 4096  # direct I/O: file offsets, lengths and memory addresses on this boundary suit every common device


def _open_direct(path: Path) -> int | None:
    """A second, ``O_DIRECT`` descriptor for ``path``, or None where the OS or file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("MERGEBACK_BUFFERED_WRITES"):
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _pwrite_all(fd: int, buf: memoryview, pos: int) -> None:
    while len(buf):
        written = os.pwrite(fd, buf, pos)
        buf = buf[written:]
        pos += written


@dataclass
class _Target:
    fd: int
    direct: int | None
    offset: int  # of the tensor's first byte in the file
    dtype: torch.dtype
    nbytes: int
    # (bytes so far, running XXH3-64); None once written out of order
    digest: tuple[int, xxhash.xxh3_64] | None = field(default_factory=lambda: (0, xxhash.xxh3_64()))
    unflushed: int | None = None  # buffered writes: file position since which no writeback was started


class ShardWriter:
    """Writes planned shards into ``folder``: headers at open, tensor bytes by positional writes.

    Whole aligned pages go to disk with direct I/O (``O_DIRECT``): no copy into the page cache and no dirty
    pages to flush at the end, so the disk writes while we compute, at almost no CPU cost. The few bytes at
    unaligned edges, and everything where direct I/O is unavailable, are ordinary buffered writes. Callers
    get the best speed from buffers placed by :meth:`skew`.

    Each tensor's bytes arrive in order from one worker, so the writer keeps a running XXH3-64 per tensor (a
    fast non-cryptographic checksum, several times cheaper than CRC-32): the journal's shard checksums come
    from memory, without reading the shard back.
    """

    def __init__(self, folder: Path, shards: list[Shard], skip: set[str] = frozenset(), direct: bool = True):
        self.folder = Path(folder)
        self.shards = shards
        self._fds: dict[str, tuple[int, int | None]] = {}
        self._targets: dict[str, _Target] = {}
        self.direct_bytes = 0  # how many bytes went to disk by direct I/O (the rest: buffered)
        self._count = threading.Lock()
        for shard in shards:
            if shard.filename in skip:
                continue
            path = self.folder / shard.filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)
            dfd = _open_direct(path) if direct else None
            self._fds[shard.filename] = (fd, dfd)
            for t in shard.tensors:
                self._targets[t.name] = _Target(fd, dfd, shard.offsets[t.name], t.dtype, t.nbytes)

    def skew(self, name: str, start_element: int) -> int:
        """Where element ``start_element`` of ``name`` falls within an aligned block of its file: a buffer whose
        address has the same remainder modulo ``ALIGN`` is written with direct I/O."""
        t = self._targets[name]
        return (t.offset + start_element * t.dtype.itemsize) % ALIGN

    def write(self, name: str, start_element: int, data: torch.Tensor) -> None:
        """Put ``data`` (flat, contiguous, the planned dtype, on CPU) at element ``start_element`` of ``name``."""
        t = self._targets[name]
        if data.dtype != t.dtype:
            raise TypeError(f"{name}: writing {data.dtype} into a planned {t.dtype} tensor")
        if data.numel() == 0:
            return
        data = data.contiguous()
        buf = memoryview(data.view(torch.uint8).numpy())
        at = start_element * t.dtype.itemsize  # byte position inside the tensor
        self._checksum(t, at, buf)
        pos = t.offset + at
        if t.direct is not None and self._write_direct(t, buf, pos, data.data_ptr()):
            return
        _pwrite_all(t.fd, buf, pos)
        self._hint_writeback(t, pos, pos + len(buf))

    def _write_direct(self, t: _Target, buf: memoryview, pos: int, address: int) -> bool:
        """Aligned middle by direct I/O, edges buffered; False (nothing written) if the buffer is misplaced."""
        lo = -(-pos // ALIGN) * ALIGN
        hi = (pos + len(buf)) // ALIGN * ALIGN
        if hi <= lo or (address + lo - pos) % ALIGN:
            return False
        try:
            _pwrite_all(t.direct, buf[lo - pos:hi - pos], lo)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system refuses these direct writes after all
                raise
            self._no_direct(t.direct)
            return False
        _pwrite_all(t.fd, buf[:lo - pos], pos)
        _pwrite_all(t.fd, buf[hi - pos:], hi)
        with self._count:
            self.direct_bytes += hi - lo
        return True

    def _no_direct(self, dfd: int) -> None:
        for target in self._targets.values():
            if target.direct == dfd:
                target.direct = None

    def _hint_writeback(self, t: _Target, pos: int, end: int) -> None:
        if _START_WRITEBACK is None:
            return
        since = pos if t.unflushed is None else t.unflushed
        if end - since >= WRITEBACK_BYTES or end == t.offset + t.nbytes:
            _START_WRITEBACK(t.fd, since, end - since)
            t.unflushed = None
        else:
            t.unflushed = since

    @staticmethod
    def _checksum(t: _Target, at: int, buf: memoryview) -> None:
        if t.digest is not None and t.digest[0] == at:
            t.digest[1].update(buf)
            t.digest = (at + len(buf), t.digest[1])
        else:
            t.digest = None  # written out of order: the journal reads this tensor back instead

    def tensor_checksum(self, name: str) -> str | None:
        """XXH3-64 (hex) of all of ``name``'s planned bytes if they were written once and in order, else None."""
        t = self._targets[name]
        return t.digest[1].hexdigest() if t.digest is not None and t.digest[0] == t.nbytes else None

    def sync(self, filename: str | None = None) -> None:
        """fdatasync one shard (or all) so its bytes survive a crash."""
        for name, (fd, _) in self._fds.items():
            if filename is None or name == filename:
                os.fdatasync(fd)

    def close(self) -> None:
        for fd, dfd in self._fds.values():
            os.close(fd)
            if dfd is not None:
                os.close(dfd)
        self._fds = {}


def write_index(folder: Path, shards: list[Shard]) -> None:
    """``model.safetensors.index.json`` as transformers writes it (only when there is more than one shard)."""
    if len(shards) < 2:
        return
    total = sum(t.nbytes for s in shards for t in s.tensors)
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
