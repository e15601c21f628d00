"""Pruning of task vectors (deltas): which entries survive, as masks or trimmed in place.

Magnitude pruning keeps the entries a :class:`~.selection.RankCut` selects (the exact streaming top-k of
:mod:`.selection`); DARE keeps each entry with probability ``density``, from random blocks that do not depend
on the chunk size or the thread count.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from .selection import RankCut, keep_rules, magnitudes

RNG_BLOCK = 1 << 16  # random masks are drawn per fixed block, so they do not depend on the chunk size


def keep_top_(mags: torch.Tensor, cut: RankCut, ties_before: int, ties_here: int | None = None) -> int:
    """Turns ``mags`` (float32 ``|x|`` of a chunk) in place into 1.0 for the entries among the top k of the whole
    tensor and 0.0 for the others (a multiplier); returns the threshold-equal entries in this chunk (see
    :func:`keep_rules`). The threshold is a float32 value, so the comparisons are exact."""
    rules, ties = keep_rules(cut, ties_before, ties_here, lambda: mags == cut.threshold)
    for part, rule in rules:
        m = mags[part]
        if rule == "none":
            m.zero_()
        elif rule == "all":
            m.fill_(1.0)
        elif rule == ">":
            m.gt_(cut.threshold)
        else:
            m.ge_(cut.threshold)
    return ties


def trim_(delta: torch.Tensor, upper: RankCut, lower: RankCut, ties_before: tuple[int, int] = (0, 0),
          scratch: torch.Tensor | None = None, chunk: int | None = None) -> tuple[int, int]:
    """:func:`~.reference.breadcrumbs_mask` applied in place: ``delta`` keeps its magnitude ranks in the band
    and is zero elsewhere (``scratch``: a 4-byte buffer of delta's size; ``chunk``: this chunk's index in the
    pass that found the cuts, to use their ``ties_by_chunk``). Returns the ties seen, as ``breadcrumbs_mask``.

    float32 deltas are trimmed by ``hardshrink`` (one pass): the band is ``top_lower(d) - top_upper(d)``."""
    if delta.dtype != torch.float32:  # ranks compare |x| as float32: other dtypes go through the mask
        return _trim_by_mask_(delta, upper, lower, ties_before, scratch, chunk)
    flat = delta.view(-1)
    if upper.threshold == float("inf"):  # nothing dropped from the top (plain magnitude trimming)
        return 0, _zero_below_cut_(flat, lower, ties_before[1], _ties_in(lower, chunk))
    top = flat.clone() if scratch is None else scratch.view(torch.float32)[:flat.numel()].copy_(flat)
    t_up = _zero_below_cut_(top, upper, ties_before[0], _ties_in(upper, chunk))
    t_low = _zero_below_cut_(flat, lower, ties_before[1], _ties_in(lower, chunk))
    flat.sub_(top)  # kept by the lower cut and not among the top ones (the upper's top set is inside the lower's)
    return t_up, t_low


def _trim_by_mask_(delta, upper, lower, ties_before, scratch, chunk) -> tuple[int, int]:
    keep = magnitudes(delta, None if scratch is None else scratch.view(torch.float32))
    t_low = keep_top_(keep, lower, ties_before[1], _ties_in(lower, chunk))
    t_up = 0
    if upper.threshold != float("inf"):
        above = magnitudes(delta)
        t_up = keep_top_(above, upper, ties_before[0], _ties_in(upper, chunk))
        keep.sub_(above).clamp_(min=0)  # kept by the lower cut and not among the top ones
    delta.mul_(keep.view(delta.shape))
    return t_up, t_low


def _zero_below_cut_(x: torch.Tensor, cut: RankCut, ties_before: int, ties_here: int | None = None) -> int:
    """Zeroes in place the entries of ``x`` (flat float32) outside the top k of the whole tensor, by
    ``hardshrink``: ``x if |x| > t else 0``, with ``>=`` as ``>`` against the next float32 below ``t`` (exact
    comparisons). Returns the threshold-equal entries in this chunk (see :func:`keep_rules`)."""
    rules, ties = keep_rules(cut, ties_before, ties_here, lambda: x.abs() == cut.threshold)
    for part, rule in rules:
        if rule == "none":
            x[part].zero_()
        elif rule != "all" and cut.threshold != 0:  # entries of magnitude 0 are zeros, kept or not
            torch.hardshrink(x[part], cut.threshold if rule == ">" else _next_below(cut.threshold), out=x[part])
    return ties


def _next_below(value: float) -> float:
    """The largest float32 below a positive float32 ``value``."""
    (bits,) = struct.unpack("<i", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<i", bits - 1))[0]


def _ties_in(cut: RankCut, chunk: int | None) -> int | None:
    return None if chunk is None or cut.ties_by_chunk is None else cut.ties_by_chunk[chunk]


def dare_mask(numel: int, density: float, generator: torch.Generator, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (callers rescale by ``1/density``)."""
    return torch.rand(numel, generator=generator, device=device) < density


def block_generator(seed: int, name: str, stream: int, block: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, tensor name, input, block): the same masks on any thread count."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{stream}\0{block}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def dare_keep(seed: int, name: str, stream: int, start: int, stop: int, density: float,
              device: torch.device) -> torch.Tensor:
    """The DARE keep-mask of elements [start, stop) of one delta, assembled from fixed RNG blocks."""
    parts = []
    for b0 in range(start - start % RNG_BLOCK, stop, RNG_BLOCK):
        g = block_generator(seed, name, stream, b0 // RNG_BLOCK, device)
        block = dare_mask(RNG_BLOCK, density, g, device)
        parts.append(block[max(start, b0) - b0: min(stop, b0 + RNG_BLOCK) - b0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def l1_rescale_factor(before: float, after: float, dtype: torch.dtype) -> float | None:
    """mergekit's rescale of a pruned delta: ``||d||_1 / ||pruned||_1``, divided in ``dtype``; None (no
    rescale) when either norm is below 1e-7."""
    if not (before >= 1e-7 and after >= 1e-7):
        return None
    return float(torch.tensor(before, dtype=dtype) / torch.tensor(after, dtype=dtype))
