"""NuSLERP: spherical interpolation of two tensors (or of their deltas from a base), whole-tensor, per row
or per column.

mergekit 0.1.5 semantics (exactly two non-base models, each with a ``weight``; base optional; parameters
``nuslerp_flatten`` default **true**, ``nuslerp_row_wise`` default false), in the inputs' dtype:

- ``t = w_2 / (w_1 + w_2)`` (Python floats), or 0.5 when ``|w_1 + w_2| < 1e-6``; ``t = 0`` gives the first.
- vectors: the whole tensor flattened when ``nuslerp_flatten`` (then ``nuslerp_row_wise`` has **no
  effect**); otherwise slices along the last dim (rows of a 2-D weight), or, with ``nuslerp_row_wise``,
  slices along dim 0 (the *columns* of a 2-D weight, despite the name).
- per vector pair: ``u = v / max(|v|, 1e-7)``; ``cos = clamp(sum(u0 * u1), -1, 1)``; colinear where
  ``1 - cos**2 <= 1e-16``; ``theta = acos(cos)`` (acos(0) on colinear pairs);
  ``r = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``, and ``(1 - t) v0 + t v1`` where colinear.
  The coefficients multiply the raw vectors (norms are not interpolated).
- with a base: ``W = B + nuslerp(X_1 - B, X_2 - B)``; without: ``W = nuslerp(X_1, X_2)``.

Streaming: flattened, one statistics pass (the two norms and the dot product over the whole tensor) then an
elementwise apply pass with two scalar coefficients; last-dim vectors (``flatten`` false, ``row_wise``
false) are per row, so a chunk of whole rows needs no separate pass; ``row_wise`` (per column) needs one
statistics pass over all rows accumulating per-column norms and dots, then the apply pass
(:func:`nuslerp_partial_sums` per chunk, summed, then :func:`nuslerp_coefficients`). Statistics summed chunk
by chunk differ from mergekit's normalise-then-sum by rounding only.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
WEIGHT_EPS = 1e-6


def nuslerp_t(weight_first: float, weight_second: float) -> float:
    """``t = w_2 / (w_1 + w_2)``, 0.5 when the weights sum to ~0 (below 1e-6)."""
    total = weight_first + weight_second
    return 0.5 if abs(total) < WEIGHT_EPS else weight_second / total


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float, row_wise: bool = False, flatten: bool = True
            ) -> torch.Tensor:
    """SLERP of ``v0`` (t=0) to ``v1`` (t=1) over the vectors chosen by ``flatten`` / ``row_wise`` (module
    docstring), with the linear fallback on colinear pairs; ``v0``'s shape."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_merge(first: torch.Tensor, second: torch.Tensor, weights: tuple[float, float],
                  base: torch.Tensor | None = None, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's ``nuslerp``: ``B + nuslerp(X_1 - B, X_2 - B, t)`` with a base, ``nuslerp(X_1, X_2, t)``
    without, ``t`` from :func:`nuslerp_t`."""
    t = nuslerp_t(*weights)
    if base is None:
        return nuslerp(first, second, t, row_wise, flatten)
    return base + nuslerp(first - base, second - base, t, row_wise, flatten)


def nuslerp_partial_sums(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Chunk-additive statistics of vector pairs along the last dim: ``[..., 3]`` float64 holding
    ``(v0 . v1, |v0|^2, |v1|^2)``. Flattened mode: pass flat chunks and sum; per-column mode: pass the
    transposed chunk (columns last) and sum over row chunks; per-row mode: one chunk of whole rows."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    return torch.stack([(a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)], dim=-1)


def nuslerp_coefficients(sums: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``S = a v0 + b v1`` per vector pair from :func:`nuslerp_partial_sums`:
    ``cos = dot / (max(|v0|, 1e-7) max(|v1|, 1e-7))`` clamped to [-1, 1]; ``a = sin((1 - t) theta) / sin theta``,
    ``b = sin(t theta) / sin theta``, or ``(1 - t, t)`` where ``1 - cos^2 <= 1e-16``. float64, shape ``[...]``."""
    dot, sq0, sq1 = sums.unbind(-1)
    cos = (dot / (sq0.sqrt().clamp(min=NORM_EPS) * sq1.sqrt().clamp(min=NORM_EPS))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.where(colinear, 1, torch.sin(theta))
    a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    b = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return a, b
