"""Lazy, validated access to one safetensors file: header first, then tensor bytes by positional reads
into caller buffers (the bulk path) or through mmap (zero-copy views).

The header is parsed and checked by us (not by the safetensors library) so that every hostile or broken
file ends in a one-line :class:`InputError` naming the file, and so that readers can take zero-copy views
of any element range of a tensor without ever materialising the whole file.
"""

from __future__ import annotations

import math
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _fail(path: Path, why: str) -> InputError:
    return InputError(f"{path}: {why}; the file is corrupt or not a safetensors file - re-download or re-save it")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors by name, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = header_length(f.read(8), size, path)
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(raw, size, path)


def header_length(prefix: bytes, size: int, where) -> int:
    """The byte length of the JSON header, from the first 8 bytes of a file of ``size`` bytes named ``where``."""
    if len(prefix) < 8:
        raise _fail(where, f"file is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise _fail(where, f"header length {header_len} exceeds the file size {size}")
    return header_len


def parse_header(raw: bytes, size: int, where) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header ``raw`` of a safetensors file of ``size`` bytes (local or remote, named
    ``where`` in errors); tensor ranges are absolute: ``8 + len(raw) + data_offsets``."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(where, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(where, "__metadata__ is not an object")
    data_start = 8 + len(raw)
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(where, name, entry, data_start, data_len)
    ranges = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise _fail(where, f"tensors {n0!r} and {n1!r} overlap")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"entry for tensor {name!r} is not an object")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {code!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    dtype = DTYPES[code]
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end <= data_len:
        raise _fail(path, f"tensor {name!r} has data_offsets {offsets} outside the data section ({data_len} bytes)")
    if end - begin != numel * dtype.itemsize:
        raise _fail(path, f"tensor {name!r} has {end - begin} bytes but shape {shape} of {code} needs {numel * dtype.itemsize}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsFile:
    """One safetensors file, opened lazily. ``view`` returns zero-copy tensors backed by the page cache."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open_fd(self) -> int:
        with self._lock:  # worker threads share the file
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            size = os.fstat(self._open_fd()).st_size
            # ACCESS_COPY: a private, writable mapping, so torch.frombuffer accepts it without a warning;
            # nothing is ever written through it, so no page is ever copied.
            self._mm = mmap.mmap(self._fd, size, access=mmap.ACCESS_COPY) if size else None
        return self._mm

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat elements [start, stop) of tensor ``name``, without copying."""
        info = self.tensors[name]
        stop = info.numel if stop is None else stop
        count = stop - start
        if count <= 0:
            return torch.empty(0, dtype=info.dtype)
        return torch.frombuffer(self._map(), dtype=info.dtype, count=count, offset=info.start + start * info.dtype.itemsize)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Copy flat elements [start, start + out.numel()) of ``name`` into ``out`` (contiguous, CPU, the stored
        dtype) with positional reads: no page faults on a mapping and nothing mapped into our address space,
        which on many cores and in VMs is several times faster than faulting mmap pages in."""
        info = self.tensors[name]
        if out.dtype != info.dtype or start < 0 or start + out.numel() > info.numel:
            raise ValueError(f"{self.path}: read_into {name!r}: bad range or dtype")
        buf = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        pos = info.start + start * info.dtype.itemsize
        fd = self._open_fd()
        while len(buf):
            got = os.preadv(fd, [buf], pos)
            if got <= 0:
                raise InputError(f"{self.path}: ends inside tensor {name!r} (the file was truncated while reading)")
            buf = buf[got:]
            pos += got
        return out

    def release(self, name: str) -> None:
        """Drop this tensor's pages from our address space (they stay in the page cache), bounding RSS."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        lo = -(-info.start // _PAGE) * _PAGE
        hi = info.end // _PAGE * _PAGE
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the mapping goes when it does
                pass
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
