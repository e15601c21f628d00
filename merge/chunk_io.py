"""Chunk I/O for the executor: thread-local reused buffers, device staging (CUDA streams, pinned memory) and
output buffers placed for direct I/O. Kernels get a :class:`TensorReader` (a
:class:`~merge.methods.base.ChunkReader`) and nothing else of the executor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from .io.writer import ALIGN, ShardWriter
from .methods import registry
from .methods.chunks import Chunk, chunk_ranges
from .plan import TensorJob, TensorSource


def reads_files(model: TensorSource) -> bool:
    """Whether ``model`` can read stored bytes into our buffers (checkpoints); LoRA adapters compute views."""
    return model.reads_files


class _Buffers(threading.local):
    """Per-thread reusable buffers, grown on demand, so steady state allocates nothing."""

    def __init__(self):
        self.slots: dict[tuple, torch.Tensor] = {}
        self.stream = None

    def get(self, slot: str, n: int, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        key = (slot, dtype, device.type, pinned)
        buf = self.slots.get(key)
        if buf is None or buf.numel() < n:
            size = max(n, 1 << 16)
            buf = torch.empty(size, dtype=dtype, device=device, pin_memory=pinned)
            self.slots[key] = buf
        return buf[:n]


class ChunkIO:
    """Reads input chunks into this thread's buffers on ``device`` and places output chunks for the writer."""

    def __init__(self, device: torch.device, chunk: int):
        self.device, self.chunk = device, chunk
        self._buffers = _Buffers()

    def scratch(self, slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """This thread's ``slot`` buffer of ``n`` elements on the compute device."""
        return self._buffers.get(slot, n, dtype, self.device)

    def out_buffer(self, writer: ShardWriter, job: TensorJob, start: int, n: int,
                   pinned: bool = False) -> torch.Tensor:
        """This thread's output buffer for ``n`` elements of ``job`` from ``start``, placed in memory like the
        bytes will be on disk (see ``ShardWriter.skew``), so that the writer can use direct I/O."""
        size = job.out_dtype.itemsize
        raw = self._buffers.get("out", n * size + 2 * ALIGN, torch.uint8, torch.device("cpu"), pinned=pinned)
        first = (-raw.data_ptr()) % ALIGN + writer.skew(job.name, start)
        if first % size:  # an odd-sized tensor before this one: no placement keeps the dtype aligned
            first = 0
        return raw[first:first + n * size].view(job.out_dtype)

    def raw(self, model: TensorSource, name: str, start: int, stop: int, slot: str,
            pinned: bool = False) -> torch.Tensor:
        """Elements [start, stop) of ``name`` as the source stores them, on the CPU: read into this thread's
        ``slot`` buffer when the source reads files, else the source's own (view or computed) tensor."""
        if not reads_files(model):
            return model.view(name, start, stop)
        buf = self._buffers.get(slot, stop - start, model.info(name).dtype, torch.device("cpu"), pinned=pinned)
        return model.read_into(name, start, buf)

    def load_into(self, slot: str, model: TensorSource, name: str, start: int, stop: int, dtype: torch.dtype,
                  round_to: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, stop) of ``name`` in this thread's ``slot`` buffer on the device, as ``dtype``
        (rounded to ``round_to`` first when given)."""
        n = stop - start
        cuda = self.device.type == "cuda"
        stored = model.info(name).dtype
        direct = not cuda and stored == dtype and round_to in (None, dtype) and reads_files(model)
        if direct:  # read straight into the compute buffer
            return model.read_into(name, start, self._buffers.get(slot, n, dtype, self.device))
        return self.to_compute(slot, self.raw(model, name, start, stop, slot + "/raw", pinned=cuda), dtype, round_to)

    def to_compute(self, slot: str, raw: torch.Tensor, dtype: torch.dtype, round_to: torch.dtype | None = None
                   ) -> torch.Tensor:
        """``raw`` (CPU) converted into this thread's ``slot`` buffer on the device."""
        if round_to is not None and raw.dtype != round_to:
            raw = raw.to(round_to)
        buf = self._buffers.get(slot, raw.numel(), dtype, self.device)
        # asynchronous from pinned memory: each chunk's result is synchronised before the next chunk is read
        buf.copy_(raw, non_blocking=self.device.type == "cuda" and raw.is_pinned())
        return buf

    @contextmanager
    def stream(self):
        """This thread's CUDA stream (nothing on the CPU)."""
        if self.device.type != "cuda":
            yield
            return
        if self._buffers.stream is None:
            self._buffers.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._buffers.stream):
            yield

    def reader(self, job: TensorJob, models: Mapping[str, TensorSource]) -> TensorReader:
        return TensorReader(self, job, models)


class TensorReader:
    """Reads one tensor's input chunks into reused compute-dtype buffers (the planner's ``job.compute``).

    Kernels that need statistics first (slerp's norms, magnitude ranks) walk the tensor several times; each
    pass reads the files again, from the page cache. A single-chunk tensor stays loaded between passes.
    Keeping bigger tensors in memory between passes was measured no faster and made memory grow with tensor
    size, so it is not done.
    """

    def __init__(self, io: ChunkIO, job: TensorJob, models: Mapping[str, TensorSource]):
        self.io, self.job, self.models = io, job, models
        self.device, self.dtype = io.device, job.compute
        self.chunk = registry.chunk_elements(job.op, job.shape, job.merged_numel, io.chunk)
        self.round_to = job.round_to  # inputs are rounded to this dtype first (mergekit's ``dtype``)
        self.single = job.merged_numel <= self.chunk
        self._cached: list[torch.Tensor] | None = None

    def ranges(self) -> list[Chunk]:
        return chunk_ranges(self.job.merged_numel, self.chunk)

    def scratch(self, slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.io.scratch(slot, n, dtype)

    def load(self, index: int, start: int, stop: int) -> list[torch.Tensor]:
        if self.single and self._cached is not None:
            cached, self._cached = self._cached, None
            return cached
        return [self.io.load_into(f"in{slot}", self.models[key], self.job.source_name(key), start, stop,
                                  self.dtype, self.round_to)
                for slot, key in enumerate(self.job.op.inputs)]

    def passes(self, stored: bool = False, ranges: list[Chunk] | None = None
               ) -> Callable[[], Iterator[list[torch.Tensor]]]:
        """A callable that walks all chunks again (a statistics pass), or only ``ranges`` (index, start, stop).
        ``stored=True`` (CPU) may give the inputs as stored (e.g. bfloat16) instead of converted, for kernels
        that convert on their own."""
        io, job = self.io, self.job
        # a single chunk is better kept converted (read once) than read again
        stored = stored and io.device.type == "cpu" and self.round_to is None and not self.single \
            and all(reads_files(self.models[k]) for k in job.op.inputs)

        def walk():
            for index, start, stop in ranges or self.ranges():
                if stored:
                    yield [io.raw(self.models[k], job.source_name(k), start, stop, f"in{slot}/raw")
                           for slot, k in enumerate(job.op.inputs)]
                    continue
                xs = self.load(index, start, stop)
                if self.single:
                    self._cached = xs
                yield xs

        return walk
