"""Task arithmetic's formulas: sign election and the combination, ours and mergekit's order of rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sign_consensus_mask(weighted_deltas: Sequence[torch.Tensor], method: str = "sum") -> list[torch.Tensor]:
    """TIES sign election: the elected sign is ``sign(sum_i d_i)`` (``method='sum'``) or the sign held by
    more task vectors (``'count'``); each ``d_i`` keeps only the entries whose sign agrees."""
    if method == "sum":
        total = torch.zeros_like(weighted_deltas[0])
        for d in weighted_deltas:
            total.add_(d)
    elif method == "count":
        total = torch.zeros_like(weighted_deltas[0])
        for d in weighted_deltas:
            total.add_(torch.sign(d))
    else:
        raise ValueError(f"unknown sign consensus method {method!r}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted_deltas[0].dtype)
    return [torch.sign(d) == elected for d in weighted_deltas]


def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                    sign_consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``W = W_base + lam * sum_i w_i * m_i * delta_i`` (``/ sum_i w_i * m_i`` elementwise when ``normalize``).

    ``delta_i = W_sft_i - W_base``, already sparsified by the caller; ``m_i`` is the TIES sign-consensus mask
    (all ones without ``sign_consensus``). ``out`` may be ``base``.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("task_arithmetic: need one weight per delta")
    weighted = [d * w for d, w in zip(deltas, weights)] if (sign_consensus or normalize) else None
    masks = sign_consensus_mask(weighted, sign_consensus) if sign_consensus else None
    mixed = None
    if weighted is None:
        if out is None:
            out = base.clone()
        elif out is not base:
            out.copy_(base)
        for d, w in zip(deltas, weights):
            out.add_(d, alpha=w * lam)
        return out
    for i, wd in enumerate(weighted):
        term = wd * masks[i] if masks else wd
        mixed = term if mixed is None else mixed.add_(term)
    if normalize:
        divisor = torch.zeros_like(base)
        for i, w in enumerate(weights):
            divisor.add_(masks[i].to(base.dtype) * w if masks else torch.full_like(base, w))
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    if out is None:
        return base + lam * mixed
    if out is not base:
        out.copy_(base)
    return out.add_(mixed, alpha=lam)


def task_arithmetic_mergekit(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                             consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's combination step, in the tensors' dtype (its weights are rounded to that dtype):

    ``D_i = w_i d_i``; with ``consensus='sum'``: ``m_i = [sign(D_i) == sign(sum_j D_j)]`` (0 counts as +),
    ``mixed = sum_i m_i D_i``, ``div = sum_i w_i m_i`` (0 -> 1); without: ``mixed = sum_i D_i``,
    ``div = sum_i w_i`` (|div| < 1e-8 -> 1). ``normalize``: ``mixed /= div``; then ``mixed *= lam`` when
    ``lam != 1``; result ``base + mixed``. ``out`` may be ``base``.
    """
    stacked = torch.stack(list(deltas))
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device).unsqueeze(-1)
    stacked.mul_(w)
    if consensus:
        if consensus != "sum":
            raise ValueError(f"unknown sign consensus method {consensus!r}")
        mask = elect_signs_mergekit(stacked, base.dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    if out is None:
        return base + mixed
    return torch.add(base, mixed, out=out)


def elect_signs_mergekit(weighted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mergekit's TIES election over stacked weighted deltas ``D`` [n, ...]: the majority sign is
    ``sign(sum_i D_i)`` (0 counts as +); returns the mask ``sign(D_i) == majority`` (computed in ``dtype``)."""
    majority = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return weighted.sign().to(dtype) == majority


