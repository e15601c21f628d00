"""Sparsification of task vectors (deltas): masks that say which entries survive.

Magnitude ranks use a streaming exact selection, so a tensor's threshold can be found chunk by chunk
without holding the whole tensor: ``kth_largest`` takes a callable that yields the chunks again per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

ChunkSource = Callable[[], Iterable[torch.Tensor]]


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 values the int32 bit pattern orders exactly like the value.
    return x.detach().abs().to(torch.float32).view(torch.int32)


@dataclass(frozen=True)
class RankCut:
    """The top-k entries by ``|x|``, exactly k of them: every entry above ``threshold`` plus the first
    ``ties_kept`` entries (in flat order) equal to it, of ``ties_total`` such entries (None: not counted).
    Ranking is by magnitude, then by position."""

    threshold: float
    ties_kept: int
    ties_total: int | None = None


def rank_cut(chunks: ChunkSource, k: int) -> RankCut:
    """Where the k-th largest ``|x|`` (1-based) over all chunks lies, exactly, in two histogram passes of
    2**16 bins over the float32 bit patterns (high half, then the low half inside the bucket the k-th entry
    falls in); memory is one chunk plus the histograms."""
    if k < 1:
        return RankCut(float("inf"), 0, 0)
    bins = 1 << 16
    high = None
    for c in chunks():
        h = torch.bincount((_abs_bits(c) >> 16).reshape(-1), minlength=bins).cpu()  # counted where c lives
        high = h if high is None else high + h
    if high is None or k > int(high.sum()):
        return RankCut(-1.0, 0)  # more asked than there are: everything is kept
    from_top = torch.flip(high, [0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k)))
    bucket = bins - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    low = torch.zeros(bins + 2, dtype=torch.int64)
    for c in chunks():
        # the low 16 bits of the entries in the bucket, shifted by one; all others land in the two end bins
        index = (_abs_bits(c).reshape(-1) - (bucket << 16)).clamp_(-1, bins).add_(1)
        low += torch.bincount(index, minlength=bins + 2).cpu()
    low = low[1:-1]
    low_from_top = torch.flip(low, [0]).cumsum(0)
    lpos = int(torch.searchsorted(low_from_top, torch.tensor(k - above)))
    bits = (bucket << 16) | (bins - 1 - lpos)
    greater = above + (int(low_from_top[lpos - 1]) if lpos > 0 else 0)
    return RankCut(float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)), k - greater,
                   int(low[bins - 1 - lpos]))


def kth_largest(chunks: ChunkSource, k: int) -> float:
    """The k-th largest ``|x|`` (1-based) over all chunks (``inf`` for k < 1)."""
    return rank_cut(chunks, k).threshold


def top_k_mask(x: torch.Tensor, cut: RankCut, ties_before: int = 0) -> tuple[torch.Tensor, int]:
    """Which entries of this chunk are among the top k of the whole tensor (see :class:`RankCut`);
    ``ties_before`` counts threshold-equal entries in earlier chunks. Returns (mask, ties in this chunk).
    Ties are counted only while they matter: once the quota is spent, or when every tie is kept, 0."""
    a = x.abs().to(torch.float32)
    if cut.ties_kept <= ties_before:
        return a > cut.threshold, 0
    if cut.ties_total is not None and cut.ties_kept >= cut.ties_total:
        return a >= cut.threshold, 0
    tie = a == cut.threshold
    n_ties = int(tie.sum())
    if ties_before + n_ties <= cut.ties_kept:
        return a >= cut.threshold, n_ties
    rank = torch.cumsum(tie.reshape(-1), 0).reshape(tie.shape) + ties_before
    return (a > cut.threshold) | (tie & (rank <= cut.ties_kept)), n_ties


def magnitude_mask(delta: torch.Tensor, cut: RankCut, ties_before: int = 0) -> tuple[torch.Tensor, int]:
    """TIES trimming: keep the ``k = max(1, int(density * n))`` largest-magnitude entries of a delta."""
    return top_k_mask(delta, cut, ties_before)


def breadcrumbs_mask(delta: torch.Tensor, upper: RankCut, lower: RankCut, ties_before: tuple[int, int] = (0, 0)
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Model Breadcrumbs: keep the magnitude ranks in ``[top, top + keep)``: the top ``top = gamma * n``
    entries are dropped (``upper``), and so is everything below rank ``top + keep`` (``lower``)."""
    in_lower, t_low = top_k_mask(delta, lower, ties_before[1])
    if upper.threshold == float("inf"):  # nothing dropped from the top (plain magnitude trimming)
        return in_lower, (0, t_low)
    in_upper, t_up = top_k_mask(delta, upper, ties_before[0])
    return in_lower & ~in_upper, (t_up, t_low)


def dare_mask(numel: int, density: float, generator: torch.Generator, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (callers rescale by ``1/density``)."""
    return torch.rand(numel, generator=generator, device=device) < density
