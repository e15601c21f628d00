"""SCE (select, calculate, erase): keep the entries where the task vectors disagree most, weight each task
vector by its mean square, and average the ones that agree with the elected sign.

mergekit 0.1.5 semantics (parameter ``select_topk``, default 1.0; no per-model weights), with
``d_i = X_i - B`` stacked and computed in the inputs' dtype:

1. select (only when ``select_topk < 1``): ``v = var_i(d_i)`` (population variance over the models, per
   entry); ``k = int(count_nonzero(v) * select_topk)``; keep the ``k`` entries with the largest ``v``
   (``torch.topk``: ties among equal variances are broken as topk breaks them); ``k = 0`` or
   ``select_topk <= 0`` keeps nothing. ``d_i *= mask``.
2. calculate: ``s_i = mean(d_i ** 2)`` over the whole (masked) tensor; ``w_i = s_i / sum_j s_j`` (the sum
   as a Python float), or ``1 / N`` each when ``|sum_j s_j| < 1e-6``.
3. erase: TIES sign election on the masked ``d_i`` (majority ``sign(sum_i d_i)``, 0 counts as +);
   ``m_i = [sign(d_i) == majority]``.
4. ``W = B + sum_i (w_i m_i) d_i / max(sum_i w_i m_i, 1e-6)``.

Streaming: step 1 needs a whole-tensor rank cut of the per-entry variance (one pass counting non-zeros,
:func:`sce_variance` per chunk and :func:`sce_select_count`, then the k-th largest with
:func:`merge.methods.sparsify.rank_cut` and :func:`~merge.methods.sparsify.top_k_mask` per chunk, whose ties
go by flat position instead of topk's order); step 2 needs one pass of per-model sums of squares of the masked deltas
(summing chunk partials differs from one ``mean`` by rounding); steps 3-4 are elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WEIGHT_EPS = 1e-6


def sce_variance(deltas: torch.Tensor) -> torch.Tensor:
    """Per-entry population variance across the stacked deltas (models first); elementwise, so any chunk."""
    return torch.var(deltas, dim=0, unbiased=False)


def sce_select_count(nonzero: int, select_topk: float) -> int:
    """``k = int(nonzero * select_topk)``: how many entries survive selection (``nonzero`` = entries with
    non-zero variance, summed over chunks)."""
    return int(nonzero * select_topk)


def sce_variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """0/1 mask (the deltas' dtype, one tensor's shape) of the ``int(count_nonzero(var) * select_topk)``
    entries of largest population variance across ``deltas`` (stacked, models first)."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    variance = sce_variance(deltas)
    k = sce_select_count(int(torch.count_nonzero(variance)), select_topk)
    mask = torch.zeros_like(variance)
    if k:
        mask.view(-1)[torch.topk(variance.abs().reshape(-1), k=k).indices] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """``w_i = mean(d_i ** 2) / sum_j mean(d_j ** 2)`` (uniform ``1/N`` when that sum is below 1e-6)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < WEIGHT_EPS:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_combine(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: ``B + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)`` with the TIES ``sum`` sign mask."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    masks = deltas.sign() == majority
    kept_weights = weights.reshape(-1, *([1] * (deltas.dim() - 1))) * masks
    mixed = (deltas * kept_weights).sum(dim=0)
    return base + mixed / kept_weights.sum(dim=0).clamp(min=WEIGHT_EPS)


def sce_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's ``sce`` on whole tensors (one dtype): select -> calculate -> erase -> combine."""
    if not tensors:
        return base
    deltas = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        deltas = deltas * sce_variance_mask(deltas, select_topk).unsqueeze(0)
    return sce_combine(base, deltas, sce_weights(deltas))
