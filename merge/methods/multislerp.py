"""Multi-SLERP: barycentric interpolation of several tensors (or deltas from a base) on the hypersphere.

mergekit 0.1.5 semantics (non-base models with a ``weight`` each; base optional; ``normalize_weights``
default true; ``eps`` default 1e-8), in the inputs' dtype, each tensor flattened to one vector ``x_i``
(``x_i = X_i - B`` with a base):

- one model: ``X_1`` itself (even with a base).
- ``w = w / sum(w)`` when ``normalize_weights``; ``n_i = |x_i|``; ``u_i = x_i / (n_i + eps)``.
- ``m = sum_i w_i u_i``; if ``|m| < eps``: with two models ``w_1 x_1 + w_2 x_2`` (+ B), else ``ValueError``.
- ``m^ = m / |m|``; tangent ``g = sum_i w_i (u_i - (u_i . m^) m^)``; ``s = |g| + eps``;
  ``r = m^ cos(s) + g sin(s) / s``; ``W = r * sum_i w_i n_i`` (+ B).

Quirk: ``sum_i w_i (u_i . m^) = m . m^ = |m|``, so ``g = m - |m| m^ = 0`` up to rounding: the tangent step
is a no-op and the result is ``(m / |m|) * sum_i w_i n_i``, the direction of the weighted mean of the unit
vectors with the weighted mean norm. :func:`multislerp_coefficients` uses that closed form.

Streaming: one statistics pass of the N x N Gram matrix ``G = x x^T`` (chunk-additive, float64), then
:func:`multislerp_coefficients` gives ``W = sum_i a_i x_i`` (+ B), an elementwise apply pass. It agrees with
the whole-tensor function to float32 rounding (the rounding noise mergekit's tangent step adds included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-8


def _weights(weights: Sequence[float], normalize: bool, like: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=like.dtype, device=like.device)
    return w / w.sum() if normalize else w


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = EPS) -> torch.Tensor:
    """mergekit's ``multislerp`` on whole tensors (the steps of the module docstring, in that order)."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(list(tensors))
    if base is not None:
        x = x - base
    flat = x.reshape(x.shape[0], -1)
    w = _weights(weights, normalize_weights, x)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs "
                             "with balancing weights); choose other weights")
        result = x[0] * w[0] + x[1] * w[1]
        return result if base is None else result + base
    direction = mean / mean_norm
    tangent = ((units - (units * direction).sum(-1, keepdim=True) * direction) * w.view(-1, 1)).sum(0)
    step = torch.norm(tangent) + eps
    result = direction * torch.cos(step) + tangent * (torch.sin(step) / step)
    result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return result if base is None else result + base


def multislerp_gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk-additive statistics: ``G[i, j] = x_i . x_j`` in float64 for this chunk (sum over chunks)."""
    x = torch.stack([(t if base is None else t - base).reshape(-1) for t in tensors]).to(torch.float64)
    return x @ x.T


def multislerp_coefficients(gram: torch.Tensor, weights: Sequence[float], normalize_weights: bool = True,
                            eps: float = EPS) -> list[float]:
    """``a_i`` with ``W = sum_i a_i x_i`` (+ B): ``a_i = w_i / (n_i + eps) / |m| * sum_j w_j n_j`` where
    ``n = sqrt(diag G)`` and ``|m|^2 = c^T G c``, ``c_i = w_i / (n_i + eps)``. Two models with ``|m| < eps``:
    ``a = w``; more: ``ValueError``. (One model is the identity; the caller handles it.)"""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum() if normalize_weights else w
    gram = gram.to(torch.float64).cpu()
    norms = gram.diagonal().clamp(min=0).sqrt()
    c = w / (norms + eps)
    mean_norm = float(c @ gram @ c) ** 0.5
    if mean_norm < eps:
        if len(w) != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs "
                             "with balancing weights); choose other weights")
        return w.tolist()
    return (c / mean_norm * float(w @ norms)).tolist()
