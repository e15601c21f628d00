"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local): keep the base where no model changed, take a
delta only one model has, average the deltas several models share.

mergekit 0.1.5 semantics (base required; ``epsilon`` default 1e-5), per tensor, ``d_i = X_i - B`` flattened:

- ``c_i = |d_i| > epsilon`` (an entry "changed"); ``n = sum_i c_i`` (how many models changed it);
  ``d_i' = d_i * c_i``; ``unique = (n == 1)``, ``shared = (n > 1)``.
- ``ram``: ``W = B + sum_i (d_i' * unique + d_i' * shared / max(n, 1))``: the lone delta where one model
  changed the entry, the mean of the changed deltas where several did, the base elsewhere (including
  entries every model changed by at most ``epsilon``).
- ``ramplus_tl`` (``r`` default 0.1, ``alpha`` default 0.2): per model, over the whole tensor,
  ``rho_i = #(c_i & shared) / max(#(c_i & unique), epsilon)``, ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``
  and the lone deltas are scaled by ``lambda_i``: ``W = B + sum_i (lambda_i d_i' unique + d_i' shared / n)``.
  Quirk: ``lambda`` is float32, so for bfloat16 or float16 inputs the sum and the result are float32
  (mergekit casts to ``out_dtype``, if set, only when writing).

Streaming: ``ram`` is elementwise (no statistics pass). ``ramplus_tl`` needs one statistics pass of integer
counts per model (``ram_counts`` per chunk, summed: exact), then the elementwise apply pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_EPSILON = 1e-5


def ram_masks(deltas: torch.Tensor, epsilon: float = DEFAULT_EPSILON
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For stacked flat deltas ``[N, n]``: ``(changed [N, n], count [1, n], unique [1, n], shared [1, n])``."""
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return changed, count, count == 1, count > 1


def ram_counts(changed: torch.Tensor, unique: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model: ``(#entries it changed that others changed too, #entries only it changed)`` (int64)."""
    return (changed & shared).sum(dim=1), (changed & unique).sum(dim=1)


def ramplus_lambdas(shared_counts: torch.Tensor, unique_counts: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
                    epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` (float32)."""
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def _stacked(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)


def ram_combine(base: torch.Tensor, deltas: torch.Tensor, masks, lambdas: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``B + sum_i (lambda_i d_i' unique + d_i' shared / max(n, 1))`` (``lambdas`` None: plain RAM)."""
    changed, count, unique, shared = masks
    kept = deltas * changed
    lone = kept * unique if lambdas is None else kept * unique * lambdas.unsqueeze(-1)
    merged = (lone + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """mergekit's ``ram`` on whole tensors."""
    if not tensors:
        return base
    deltas = _stacked(base, tensors)
    return ram_combine(base, deltas, ram_masks(deltas, epsilon))


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """mergekit's ``ramplus_tl`` on whole tensors: counts -> lambdas -> combine."""
    if not tensors:
        return base
    deltas = _stacked(base, tensors)
    masks = ram_masks(deltas, epsilon)
    lambdas = ramplus_lambdas(*ram_counts(masks[0], masks[2], masks[3]), r=r, alpha=alpha, epsilon=epsilon)
    return ram_combine(base, deltas, masks, lambdas)
