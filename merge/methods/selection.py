"""Exact streaming top-k by magnitude: where the k-th largest ``|x|`` of a tensor lies, found chunk by chunk.

``rank_cuts`` takes a callable that yields the tensor's chunks again per pass and returns :class:`RankCut`
values (threshold, ties kept, ties per chunk); ``keep_rules`` turns a cut into per-chunk keep rules, with the
tie accounting that makes the selection exact (ties at the threshold are kept in flat order). Memory is one
chunk and the 2**16-bin histograms. Masks and in-place trimming built on it are in :mod:`.sparsify`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

ChunkSource = Callable[[], Iterable[torch.Tensor]]


def _abs_bits(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``|x|`` as float32 bit patterns (int32; into ``out`` when given): for non-negative floats they order
    exactly like the values."""
    return magnitudes(x, None if out is None else out.view(torch.float32)).view(torch.int32)


def _as_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


@dataclass(frozen=True)
class RankCut:
    """The top-k entries by ``|x|``, exactly k of them: every entry above ``threshold`` plus the first
    ``ties_kept`` entries (in flat order) equal to it, of ``ties_total`` such entries (None: not counted).
    Ranking is by magnitude (as float32), then by position. ``ties_by_chunk``, when known, counts the entries
    equal to ``threshold`` in each chunk of the pass that found the cut, so applying it need not count them."""

    threshold: float
    ties_kept: int
    ties_total: int | None = None
    ties_by_chunk: tuple[int, ...] | None = field(default=None, compare=False)


_BINS = 1 << 16  # buckets of the high (and low) 16 bits of a pattern
_HIGH = 1 << 15  # high halves of |x| patterns: the sign bit is clear
_BLOCK = 1 << 18


class _HighHistogram:
    """First pass: how many ``|x|`` bit patterns fall in each bucket of their high 16 bits, counted apart for
    entries whose low 16 bits are zero (``exact``: their bucket says their value) and the others
    (``inexact``, which rank above the exact ones of their bucket). Deltas of bfloat16/float16 checkpoints are
    short multiples of the base's ulp, nearly all exact, so the cut usually falls on an exact value and needs
    no second pass."""

    def __init__(self):
        self.counts: torch.Tensor | None = None  # [exact per bucket | inexact per bucket]
        self._bits = self._keys = self._chunk_counts = None
        self._exact_by_chunk: list[tuple[torch.Tensor, torch.Tensor]] = []  # (non-empty buckets, exact counts)

    def add(self, chunk: torch.Tensor) -> None:
        flat = chunk.detach().reshape(-1)
        block = min(flat.numel(), _BLOCK)
        if self._bits is None or self._bits.numel() < block or self._bits.device != flat.device:
            self._bits = torch.empty(block, dtype=torch.int32, device=flat.device)
            self._keys = torch.empty_like(self._bits)
        if self._chunk_counts is None or self._chunk_counts.device != flat.device:
            self._chunk_counts = torch.zeros(2 * _HIGH, dtype=torch.int64, device=flat.device)
        counts = self._chunk_counts.zero_()
        for i in range(0, flat.numel(), _BLOCK):  # blocks that stay in the CPU's cache between the steps
            part = flat[i:i + _BLOCK]
            bits, keys = _abs_bits(part, self._bits[:part.numel()]), self._keys[:part.numel()]
            torch.bitwise_right_shift(bits, 16, out=keys)
            keys.add_(bits.bitwise_and_(0xFFFF).clamp_(max=1), alpha=_HIGH)
            counts += torch.bincount(keys, minlength=2 * _HIGH)  # counted where the chunk lives
        counts = counts.cpu()
        exact = counts[:_HIGH]
        buckets = exact.nonzero().squeeze(1)
        self._exact_by_chunk.append((buckets.int(), exact[buckets].int()))  # sparse: a chunk fills few buckets
        self.counts = counts.clone() if self.counts is None else self.counts.add_(counts)

    def exact_by_chunk(self, bucket: int) -> tuple[int, ...]:
        """How many entries of each chunk added so far equal the bucket's exact value."""
        return tuple(int(n[b == bucket].sum()) for b, n in self._exact_by_chunk)

    def locate(self, k: int) -> tuple[int, int]:
        """(the bucket holding the k-th largest entry, entries in higher buckets)."""
        from_top = torch.flip(self.counts[:_HIGH] + self.counts[_HIGH:], [0]).cumsum(0)
        pos = int(torch.searchsorted(from_top, torch.tensor(k)))
        return _HIGH - 1 - pos, int(from_top[pos - 1]) if pos > 0 else 0

    def cut(self, k: int) -> RankCut | None:
        """The exact cut when the k-th entry is one of its bucket's exact entries, else None."""
        bucket, above = self.locate(k)
        inexact = int(self.counts[_HIGH + bucket])
        if k - above <= inexact:
            return None
        return RankCut(_as_float(bucket << 16), k - above - inexact, int(self.counts[bucket]),
                       self.exact_by_chunk(bucket))


def rank_cuts(chunks: ChunkSource, ks: list[int], one_pass: bool = True, sample: ChunkSource | None = None,
              total: int | None = None) -> list[RankCut]:
    """Where the k-th largest ``|x|`` (1-based) over all chunks lies, exactly, for each k in ``ks``.

    A first pass counts the float32 bit patterns' high halves (2**16 buckets), apart for entries whose low
    half is zero. That settles a cut falling on such an entry; otherwise (or with ``one_pass=False``) a second
    pass counts the low halves inside the cut's bucket. Memory is one chunk and the histograms.

    ``sample`` (chunks of a sample of the ``total`` entries) can make this cheaper: where the sample says with
    confidence that the k-th entry is one of many equal ones (as with deltas of bfloat16 checkpoints), the pass
    only counts the entries above and at that value, which proves the cut or not; the cuts it does not prove
    are found as above. The result never depends on the sample, only the cost does."""
    cuts: list[RankCut | None] = [RankCut(float("inf"), 0, 0) if k < 1 else None for k in ks]
    if sample is not None and total is not None:
        if total == 0:
            return [cut or RankCut(-1.0, 0) for cut in cuts]
        for i, cut in _proved_cuts(chunks, ks, _proposals(sample, ks, total)).items():
            cuts[i] = cut
    pending = [i for i, cut in enumerate(cuts) if cut is None]
    if pending:
        for i, cut in zip(pending, _histogram_cuts(chunks, [ks[i] for i in pending], one_pass)):
            cuts[i] = cut
    return cuts


def _histogram_cuts(chunks: ChunkSource, ks: list[int], one_pass: bool) -> list[RankCut]:
    first = _HighHistogram()
    for c in chunks():
        first.add(c)
    total = 0 if first.counts is None else int(first.counts.sum())
    cuts: list[RankCut | None] = [None] * len(ks)
    for i, k in enumerate(ks):
        if k > total:
            cuts[i] = RankCut(-1.0, 0)  # more asked than there are: everything is kept
        elif one_pass:
            cuts[i] = first.cut(k)
    pending = [i for i, cut in enumerate(cuts) if cut is None]
    if pending:
        for i, cut in zip(pending, _refine(chunks, first, [ks[i] for i in pending])):
            cuts[i] = cut
    return cuts


_CONFIDENCE = 2.0  # a sample's margin, times 1/sqrt(sample size): 4 standard deviations of a quantile at 1/2


def _proposals(sample: ChunkSource, ks: list[int], total: int) -> list[float | None]:
    """For each k, a float32 value that the sample says holds the k-th largest ``|x|`` of ``total`` among many
    equal entries, with a margin on both sides; None where it does not."""
    hist = _HighHistogram()
    parts = [magnitudes(c) for c in sample()]  # new tensors: a chunk source may reuse its buffer
    if parts:
        hist.add(torch.cat(parts))  # one histogram call: a small block costs as much as a chunk
    size = 0 if hist.counts is None else int(hist.counts.sum())
    proposals: list[float | None] = []
    for k in ks:
        if not size or not 1 <= k <= total:
            proposals.append(None)
            continue
        k_here = min(size, max(1, math.ceil(k / total * size)))  # the same rank, scaled to the sample
        cut = hist.cut(k_here)
        if cut is None:  # an inexact entry: no value is likely to hold many
            proposals.append(None)
            continue
        above, margin = k_here - cut.ties_kept, _CONFIDENCE / math.sqrt(size)
        confident = above / size + margin < k / total <= (above + cut.ties_total) / size - margin
        proposals.append(cut.threshold if confident else None)
    return proposals


def _proved_cuts(chunks: ChunkSource, ks: list[int], proposals: list[float | None]) -> dict[int, RankCut]:
    """One pass counting, for each proposed value, the entries above it and, per chunk, equal to it: the cuts
    for the ks whose k-th entry is proved to be that value, by index in ``ks``."""
    values = sorted({v for v in proposals if v is not None})
    if not values:
        return {}
    greater, equal = _counts_at(chunks, values)
    cuts = {}
    for i, (k, value) in enumerate(zip(ks, proposals)):
        if value is None:
            continue
        above, ties = greater[values.index(value)], equal[values.index(value)]
        if above < k <= above + sum(ties):
            cuts[i] = RankCut(value, k - above, sum(ties), tuple(ties))
    return cuts


def _counts_at(chunks: ChunkSource, values: list[float]) -> tuple[list[int], list[list[int]]]:
    """For each value: how many ``|x|`` are above it, and how many equal it in each chunk. Counted per block of
    ``_BLOCK`` entries in float32 (exact: a block holds fewer than 2**24 entries), summed per chunk in float64."""
    greater = [0] * len(values)
    equal: list[list[int]] = [[] for _ in values]
    mags = flags = None
    for c in chunks():
        flat = c.detach().reshape(-1)
        if mags is None or mags.numel() < min(flat.numel(), _BLOCK) or mags.device != flat.device:
            mags = torch.empty(min(flat.numel(), _BLOCK), dtype=torch.float32, device=flat.device)
            flags = torch.empty_like(mags)
        sums = []
        for i in range(0, flat.numel(), _BLOCK):
            part = flat[i:i + _BLOCK]
            m, f = magnitudes(part, mags[:part.numel()]), flags[:part.numel()]
            for v in values:
                sums.append(torch.gt(m, v, out=f).sum())
                sums.append(torch.eq(m, v, out=f).sum())
        per_chunk = torch.stack(sums).view(-1, len(values), 2).double().sum(0).tolist() if sums else \
            [[0.0, 0.0]] * len(values)
        for j, (above, ties) in enumerate(per_chunk):
            greater[j] += int(above)
            equal[j].append(int(ties))
    return greater, equal


def _refine(chunks: ChunkSource, first: _HighHistogram, ks: list[int]) -> list[RankCut]:
    """Second pass: the low 16 bits of the entries inside each cut's bucket."""
    located = [first.locate(k) for k in ks]
    buckets = sorted({b for b, _ in located})
    low = {b: torch.zeros(_BINS + 2, dtype=torch.int64) for b in buckets}
    for c in chunks():
        bits = _abs_bits(c)
        for b in buckets:
            # the low 16 bits of the entries in the bucket, shifted by one; all others land in the two end bins
            index = (bits - (b << 16)).clamp_(-1, _BINS).add_(1)
            low[b] += torch.bincount(index, minlength=_BINS + 2).cpu()
    cuts = []
    for k, (bucket, above) in zip(ks, located):
        counts = low[bucket][1:-1]
        from_top = torch.flip(counts, [0]).cumsum(0)
        pos = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        greater = above + (int(from_top[pos - 1]) if pos > 0 else 0)
        cuts.append(RankCut(_as_float((bucket << 16) | (_BINS - 1 - pos)), k - greater, int(counts[_BINS - 1 - pos])))
    return cuts


def rank_cut(chunks: ChunkSource, k: int, one_pass: bool = True, sample: ChunkSource | None = None,
             total: int | None = None) -> RankCut:
    """The exact cut for one k (see :func:`rank_cuts`)."""
    return rank_cuts(chunks, [k], one_pass, sample, total)[0]


def magnitudes(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``|x|`` as flat float32 (into ``out`` when given): the values magnitude ranks compare."""
    x = x.detach().reshape(-1)
    return torch.abs(x if x.dtype == torch.float32 else x.to(torch.float32), out=out)


def keep_rules(cut: RankCut, ties_before: int, ties_here: int | None, tie_mask: Callable[[], torch.Tensor]
               ) -> tuple[list[tuple[slice, str]], int]:
    """Which entries of a chunk are among the top k of the whole tensor, as ``(part of the chunk, rule)`` with
    rule ``none``, ``all``, ``>`` or ``>=`` (against ``cut.threshold``), and the threshold-equal entries in the
    chunk. ``ties_here`` gives that count when known (``RankCut.ties_by_chunk``); else ``tie_mask()`` (the
    chunk's threshold-equal entries) is counted, only while ties matter: once the quota is spent, or when every
    tie is kept, 0 is returned."""
    whole = slice(None)
    if cut.threshold == float("inf"):
        return [(whole, "none")], 0
    if cut.threshold < 0:  # more asked than there are
        return [(whole, "all")], 0
    if cut.ties_kept <= ties_before:
        return [(whole, ">")], 0
    if cut.ties_total is not None and cut.ties_kept >= cut.ties_total:
        return [(whole, ">=")], 0
    tie = None
    if ties_here is None:
        tie = tie_mask()
        ties_here = int(torch.count_nonzero(tie))
    if ties_before + ties_here > cut.ties_kept:  # the quota runs out in this chunk, after its last kept tie
        split = _index_of_nth(tie_mask() if tie is None else tie, cut.ties_kept - ties_before - 1) + 1
        return [(slice(None, split), ">="), (slice(split, None), ">")], ties_here
    return [(whole, ">=")], ties_here


def _index_of_nth(mask: torch.Tensor, n: int) -> int:
    """Where the ``n``-th (from 0) True of a flat bool mask is: counted per block first, so only one block's
    positions are listed (``nonzero`` of a whole chunk heavy with ties costs milliseconds)."""
    block = 1 << 12
    full = mask.numel() // block * block
    before = 0
    if full:
        ends = mask[:full].view(torch.uint8).view(-1, block).sum(1, dtype=torch.int32).cumsum(0)  # bool sums are slow
        at = int(torch.searchsorted(ends, n, right=True))
        if at < ends.numel():
            before = int(ends[at - 1]) if at else 0
            return at * block + int(mask[at * block:(at + 1) * block].nonzero()[n - before])
        before = int(ends[-1])
    return full + int(mask[full:].nonzero()[n - before])
