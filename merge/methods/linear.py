"""Weighted averages of tensors."""

from __future__ import annotations

from typing import Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = False,
           out: torch.Tensor | None = None, scratch: bool = False) -> torch.Tensor:
    """``W = sum_i w_i * W_i``, divided by ``sum_i w_i`` when ``normalize``.

    ``out`` may be ``tensors[0]`` (it is scaled in place before the others are added), but no other input.
    ``scratch=True`` lets the other inputs be scaled in place too, so nothing is allocated.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear: need one weight per tensor")
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("linear: weights sum to zero, cannot normalize")
    ws = [w / total for w in weights] if normalize else list(weights)
    if out is None:
        out = tensors[0] * ws[0]
    else:
        if any(out is t for t in tensors[1:]):
            raise ValueError("linear: out may alias only the first tensor")
        torch.mul(tensors[0], ws[0], out=out)
    for t, w in zip(tensors[1:], ws[1:]):
        # the product is rounded before the sum (no fused multiply-add), as a direct computation does
        out.add_(t.mul_(w) if scratch else t * w)
    return out


def linear_sum_then_divide(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                           normalize: bool = True) -> torch.Tensor:
    """mergekit's order of rounding: ``acc = 0; acc += w_i * W_i`` (weights rounded to the tensors' dtype),
    then ``acc / sum(w)`` with the sum taken in that dtype. Returns a new tensor; no guard for a zero sum."""
    first = tensors[0]
    w = torch.tensor([float(x) for x in weights], dtype=first.dtype, device=first.device)
    out = torch.zeros_like(first)
    for t, coefficient in zip(tensors, w.unbind(0)):
        out.addcmul_(t, coefficient)
    if normalize:
        out.div_(w.sum(dim=0))
    return out


def lerp(sft: torch.Tensor, base: torch.Tensor, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W = (1 - t) * W_sft + t * W_base``: t is the share of the base (t=0 gives the SFT, t=1 the base)."""
    return linear([sft, base], [1.0 - t, t], out=out)
