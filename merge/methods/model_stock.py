"""Model Stock: move from the base towards the average of the fine-tunes by a ratio set by the angle
between their deltas.

mergekit 0.1.5 semantics (base required, at least two fine-tunes; ``filter_wise`` default false), in the
inputs' dtype:

- vectors: the whole tensor flattened (default), or with ``filter_wise`` each slice along the **last** dim
  (the rows of a 2-D weight; a 1-D tensor is one row).
- ``d_i = X_i - B``; for each pair i < j: ``cos_ij = clamp(d_i . d_j / max(|d_i| |d_j|, 1e-6), -1, 1)``
  (norms by ``torch.norm``); ``cos`` = the mean over the N(N-1)/2 pairs.
- ``t = N cos / (1 + (N - 1) cos)``, but ``t = 0`` (keep the base) where ``|1 + (N - 1) cos| < 1e-6``.
- ``W = t * mean_i(X_i) + (1 - t) * B``, ``mean_i(X_i) = (X_1 + ... + X_N) / N`` summed in input order.

Streaming: flattened, one statistics pass of N squared norms and N(N-1)/2 dot products over the whole
tensor (:func:`model_stock_sums` per chunk, summed), then :func:`model_stock_ratio` and an elementwise apply
pass; summing chunk partials (float64) instead of ``torch.norm`` over the whole tensor changes ``t`` by
rounding only. ``filter_wise``: every statistic is per row, so a chunk of whole rows needs no separate pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COS_EPS = 1e-6
SINGULAR_EPS = 1e-6


def _vectors(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if filter_wise:
        return tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    return tensor.reshape(-1)


def model_stock_statistics(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, dots)``: ``norms[i] = |d_i|`` and ``dots[p] = d_i . d_j`` for the pairs ``p = (i, j), i < j``
    in lexicographic order; scalars per tensor, or one value per row (last-dim slice) with ``filter_wise``."""
    b = _vectors(base, filter_wise)
    deltas = [_vectors(x, filter_wise) - b for x in tensors]
    norms = torch.stack([torch.norm(d, dim=-1) for d in deltas])
    dots = torch.stack([(deltas[i] * deltas[j]).sum(dim=-1)
                        for i in range(len(deltas)) for j in range(i + 1, len(deltas))])
    return norms, dots


def model_stock_sums(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunk-additive float64 statistics for the flattened mode: the Gram matrix ``G[i, j] = d_i . d_j``
    (N x N) of this chunk's deltas; sum it over chunks, then ``norms = sqrt(diag G)``."""
    deltas = torch.stack([(x - base).reshape(-1) for x in tensors]).to(torch.float64)
    return deltas @ deltas.T


def gram_statistics(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, dots)`` in :func:`model_stock_statistics`'s layout from a summed Gram matrix."""
    n = gram.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return gram.diagonal().sqrt(), torch.stack([gram[i, j] for i, j in pairs])


def model_stock_ratio(norms: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine (0 where the denominator is
    below 1e-6), shaped ``[..., 1]`` to broadcast over a row (or the flat tensor)."""
    count = norms.shape[0]
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    cosines = [(dots[p] / (norms[i] * norms[j]).clamp(min=COS_EPS)).clamp(-1, 1) for p, (i, j) in enumerate(pairs)]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    ratio = (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), ratio)


def model_stock_apply(base: torch.Tensor, tensors: Sequence[torch.Tensor], ratio: torch.Tensor,
                      filter_wise: bool = False) -> torch.Tensor:
    """``W = t * mean_i(X_i) + (1 - t) * B`` (``t`` per row with ``filter_wise``), in ``base``'s shape."""
    b = _vectors(base, filter_wise)
    average = sum(_vectors(x, filter_wise) for x in tensors) / len(tensors)
    return (ratio * average + (1 - ratio) * b).reshape(base.shape)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """mergekit's ``model_stock`` on whole tensors: statistics -> ratio -> apply."""
    if len(tensors) < 2:
        raise ValueError("model_stock: needs at least two fine-tuned models besides the base")
    ratio = model_stock_ratio(*model_stock_statistics(base, tensors, filter_wise))
    return model_stock_apply(base, tensors, ratio, filter_wise)
