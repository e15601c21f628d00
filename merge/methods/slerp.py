"""Spherical linear interpolation between two tensors, treated as flat vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linear import linear

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpCoefficients:
    """``W = a * W_from + b * W_to``; ``spherical`` says which branch ran; ``angle`` is in degrees."""

    a: float
    b: float
    spherical: bool
    angle: float


def slerp_partial_sums(x: torch.Tensor, y: torch.Tensor, acc: torch.Tensor | None = None,
                       block: int = 1 << 17) -> torch.Tensor:
    """Add ``(x.y, x.x, y.y)`` of flat ``x``, ``y`` to ``acc`` (float64, shape [3]; a new one when None).

    Computed in float64 block by block (two float64 buffers of ``block`` elements, small enough to stay in
    cache), and summed block after block: a tensor walked in chunks that are multiples of ``block`` gives the
    same bits as the whole tensor at once.
    """
    x, y = x.reshape(-1), y.reshape(-1)
    n = x.numel()
    acc = torch.zeros(3, dtype=torch.float64, device=x.device) if acc is None else acc
    bx = torch.empty(min(n, block), dtype=torch.float64, device=x.device)
    by = torch.empty_like(bx)
    for i in range(0, n, block):
        j = min(n, i + block)
        a, b = bx[:j - i].copy_(x[i:j]), by[:j - i].copy_(y[i:j])
        acc.add_(torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)]))
    return acc


def slerp_coefficients(dot: float, sq_from: float, sq_to: float, t: float,
                       zero_norm: str = "linear") -> SlerpCoefficients:
    """Coefficients of spherical interpolation from ``W_from`` (t=0) to ``W_to`` (t=1).

    ``cos = dot / (|from| |to|)``, ``theta = arccos(cos)``;
    ``a = sin((1 - t) * theta) / sin(theta)``, ``b = sin(t * theta) / sin(theta)``.
    Falls back to linear interpolation ``a = 1 - t, b = t`` when ``|cos| > 0.9995`` or (``zero_norm="linear"``)
    a norm is ~0. ``zero_norm="unit"`` is mergekit's rule: a norm below 1e-8 counts as 1, so a zero tensor
    gives cos = 0 and the spherical branch with theta = pi/2 (``slerp(0, x, 0.5) = 0.707 x``).
    """
    norm_from, norm_to = math.sqrt(sq_from), math.sqrt(sq_to)
    if zero_norm == "unit":
        norm_from = norm_from if norm_from > EPS else 1.0
        norm_to = norm_to if norm_to > EPS else 1.0
    elif norm_from < EPS or norm_to < EPS:
        return SlerpCoefficients(1.0 - t, t, False, 0.0)
    cos = max(-1.0, min(1.0, dot / (norm_from * norm_to)))
    theta = math.acos(cos)
    if abs(cos) > DOT_THRESHOLD:
        return SlerpCoefficients(1.0 - t, t, False, math.degrees(theta))
    sin_theta = math.sin(theta)
    a = math.sin((1.0 - t) * theta) / sin_theta
    b = math.sin(t * theta) / sin_theta
    return SlerpCoefficients(a, b, True, math.degrees(theta))


def slerp(w_from: torch.Tensor, w_to: torch.Tensor, t: float, out: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, SlerpCoefficients]:
    """Whole-tensor SLERP on the raw (unnormalised) tensors: ``a * W_from + b * W_to``.

    For recovery, ``W_from`` is the SFT tensor and ``W_to`` the base, so ``t`` is the share of the base.
    """
    c = slerp_coefficients(*slerp_partial_sums(w_from, w_to).tolist(), t)
    return linear([w_from, w_to], [c.a, c.b], out=out), c
