"""Arcee Fusion: take the fine-tuned entries whose importance is an upper outlier, keep the base elsewhere.

mergekit 0.1.5 semantics (exactly two inputs, the base ``B`` and one model ``X``; no parameters), in the
inputs' dtype:

- importance ``I = |X - B| * KL_row``, with ``KL_row = sum_last_dim p * log(p / q)`` per row (last dim),
  ``p = softmax(X) + 1e-8``, ``q = softmax(B) + 1e-8`` (softmax over the last dim, i.e. over each row).
- threshold ``tau = Q2 + 1.5 * (Q3 - Q1)``, where ``Q_k`` are order statistics of ``I`` flattened:
  ``sorted(I)[floor(q * (n - 1))]`` for ``q = 0.25, 0.5, 0.75`` (no interpolation). When ``I`` has more than
  1,000,000 entries, mergekit takes them from a sample of 1,000,000 entries drawn **with replacement** by
  ``torch.randint`` from the global RNG (``sample_size``/``generator`` here).
- ``W = B + (X - B) * [I >= tau]``.

Streaming: the softmax and KL need whole rows (a chunk of whole rows suffices for ``I``); the threshold needs
three order statistics of ``I`` over the whole tensor (one statistics pass: an exact rank selection, e.g.
:func:`merge.methods.sparsify.rank_cuts` on ``I >= 0``, or the sample mergekit draws), then an apply pass
that recomputes ``I`` per row chunk. Exact quantiles (``sample_size=None``) differ from mergekit's sampled
ones on tensors above 1e6 entries; below that they are the same order statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFTMAX_EPS = 1e-8
SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|X - B| * KL(softmax(X) + 1e-8 || softmax(B) + 1e-8)``, the KL per row (last dim, kept as size 1)."""
    p = F.softmax(other, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def order_statistics(values: torch.Tensor, quantiles=QUANTILES, sample_size: int | None = SAMPLE_SIZE,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``sorted(v)[floor(q * (n - 1))]`` per quantile (``q`` as float32), of ``v`` flattened, or of a sample of
    ``sample_size`` entries with replacement when ``v`` is larger (``sample_size`` None: never sample)."""
    flat = values.reshape(-1)
    if sample_size is not None and flat.numel() > sample_size:
        flat = flat[torch.randint(flat.numel(), (sample_size,), device=flat.device, generator=generator)]
    ordered = torch.sort(flat).values
    q = torch.tensor(quantiles, dtype=torch.float32)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def fusion_threshold(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """``tau = Q2 + 1.5 * (Q3 - Q1)``."""
    return median + 1.5 * (q3 - q1)


def fusion_apply(base: torch.Tensor, other: torch.Tensor, importance: torch.Tensor, threshold: torch.Tensor
                 ) -> torch.Tensor:
    """``B + (X - B) * [I >= tau]`` (the mask as float32, as mergekit multiplies it)."""
    return base + (other - base) * (importance >= threshold).float()


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, sample_size: int | None = SAMPLE_SIZE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's ``arcee_fusion`` on whole tensors: importance -> quantile threshold -> apply."""
    importance = fusion_importance(base, other)
    threshold = fusion_threshold(*order_statistics(importance, sample_size=sample_size, generator=generator))
    return fusion_apply(base, other, importance, threshold)
