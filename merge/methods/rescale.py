"""Norm-preserving rescale of a pruned task vector (mergekit's ``rescale: true``, always the L1 norm).

``rescaled = masked * (||d||_1 / ||masked||_1)``, left unscaled when either norm is below ``1e-7``.

Streaming: both norms are whole-tensor sums, so a kernel needs one statistics pass (``l1_norms`` per chunk,
summed) before it can scale; summing chunk partials in float64 differs from one float32 sum by rounding only.
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7


def l1_norms(delta: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||delta||_1, ||masked||_1)`` as 0-dim tensors in the inputs' dtype (one ``abs().sum()`` each)."""
    return delta.abs().sum(), masked.abs().sum()


def l1_scale(before: torch.Tensor | float, after: torch.Tensor | float, eps: float = RESCALE_EPS
             ) -> torch.Tensor | float | None:
    """``before / after``, or None (no rescale) when ``before < eps`` or ``after < eps``."""
    if before < eps or after < eps:
        return None
    return before / after


def l1_rescale(delta: torch.Tensor, masked: torch.Tensor, eps: float = RESCALE_EPS) -> torch.Tensor:
    """``masked * (||delta||_1 / ||masked||_1)`` (the ratio is a 0-dim tensor of the inputs' dtype, so the
    product rounds once, in that dtype); ``masked`` itself when either norm is below ``eps``."""
    scale = l1_scale(*l1_norms(delta, masked), eps=eps)
    return masked if scale is None else masked * scale
