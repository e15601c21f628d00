"""Chunk geometry: how a tensor is walked in flat ranges. It depends only on the tensor (and the chunk size),
so the executor, the in-place sweep model and ``inspect`` see the same chunks and sum the same partial sums."""

from __future__ import annotations

from typing import NamedTuple

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per input buffer: big enough for cheap calls, small enough for caches
SAMPLE_BLOCKS = 16


class Chunk(NamedTuple):
    """Flat elements [start, stop) of a tensor, the ``index``-th chunk of a pass over it."""

    index: int
    start: int
    stop: int


def chunk_ranges(numel: int, chunk: int = CHUNK_ELEMENTS) -> list[Chunk]:
    """``(index, start, stop)`` flat ranges covering ``numel`` elements."""
    return [Chunk(i, s, min(s + chunk, numel)) for i, s in enumerate(range(0, numel, chunk))]


def kernel_chunk(chunk: int, granule: int, numel: int) -> int:
    """The chunk size a kernel walks: ``chunk`` rounded down to a multiple of its ``granule`` (rows: the last
    dimension; a whole-tensor method: ``numel``), at least one granule, at most the tensor."""
    granule = max(1, min(granule, numel or 1))
    return min(max(granule, chunk // granule * granule), max(numel, 1))


def sample_ranges(numel: int, chunk: int = CHUNK_ELEMENTS, blocks: int = SAMPLE_BLOCKS) -> list[Chunk]:
    """``blocks`` evenly spread ``(index, start, stop)`` ranges holding about 1/32 of ``numel`` elements (64Ki
    to 1Mi in all, at most a chunk, so it fits the chunk's buffers): the sample that proposes magnitude cuts."""
    size = max(1, min(max(numel // 32, 1 << 16), 1 << 20, chunk, numel) // blocks)
    starts = [j * numel // blocks for j in range(blocks)]
    return [Chunk(j, start, min(start + size, numel)) for j, start in enumerate(starts)]
