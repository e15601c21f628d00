"""Sparsification of task vectors (deltas): masks that say which entries survive.

Magnitude ranks use a streaming exact selection, so a tensor's threshold can be found chunk by chunk
without holding the whole tensor: ``kth_largest`` takes a callable that yields the chunks again per pass.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

ChunkSource = Callable[[], Iterable[torch.Tensor]]


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 values the int32 bit pattern orders exactly like the value.
    return x.detach().abs().to(torch.float32).view(torch.int32)


def kth_largest(chunks: ChunkSource, k: int) -> float:
    """The k-th largest ``|x|`` (1-based) over all chunks, exactly, in two histogram passes of 2**16 bins."""
    if k < 1:
        return float("inf")
    high = None
    for c in chunks():
        h = torch.bincount((_abs_bits(c) >> 16).reshape(-1).cpu(), minlength=1 << 16)
        high = h if high is None else high + h
    if high is None or k > int(high.sum()):
        return 0.0
    from_top = torch.flip(high, [0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k)))
    bucket = (1 << 16) - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for c in chunks():
        bits = _abs_bits(c).reshape(-1)
        sel = bits[(bits >> 16) == bucket]
        if sel.numel():
            low += torch.bincount((sel & 0xFFFF).cpu(), minlength=1 << 16)
    low_from_top = torch.flip(low, [0]).cumsum(0)
    lpos = int(torch.searchsorted(low_from_top, torch.tensor(k - above)))
    bits = (bucket << 16) | ((1 << 16) - 1 - lpos)
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def magnitude_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """TIES trimming: keep entries with ``|delta| >= threshold``, where threshold is the k-th largest
    magnitude for ``k = int(density * numel)`` (see :func:`kth_largest`)."""
    return delta.abs() >= threshold


def breadcrumbs_mask(delta: torch.Tensor, upper: float, lower: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (``|delta| >= upper``) and everything below
    the kept band (``|delta| < lower``); ``upper``/``lower`` are k-th largest magnitudes for
    ``k = int(gamma * n)`` and ``k = int((gamma + density) * n)``."""
    a = delta.abs()
    keep = a >= lower
    if upper != float("inf"):
        keep &= a < upper
    return keep


def dare_mask(numel: int, density: float, generator: torch.Generator, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (callers rescale by ``1/density``)."""
    return torch.rand(numel, generator=generator, device=device) < density
