"""NearSwap: take the fine-tuned value where it is close to the base, interpolate towards it elsewhere.

mergekit 0.1.5 semantics (exactly two inputs, the base and one model; ``t`` required), elementwise in the
inputs' dtype: ``w = clamp(t / max(|B - X|, 1e-6), 0, 1)``; ``W = w * X + (1 - w) * B``. Entries that differ
by at most ``t`` take ``X`` (``w = 1``); larger differences move ``t / |B - X|`` of the way, i.e. exactly
``t`` towards ``X``. ``t <= 0`` gives the base.

Streaming: elementwise, no statistics pass; any chunking works.
"""

from __future__ import annotations

import torch

DIFF_EPS = 1e-6


def nearswap_weight(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``clamp(t / max(|B - X|, 1e-6), 0, 1)``, elementwise."""
    return (t / torch.abs(base - other).clamp(min=DIFF_EPS)).clamp(min=0, max=1)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``w * X + (1 - w) * B`` with ``w`` from :func:`nearswap_weight`."""
    w = nearswap_weight(base, other, t)
    return w * other + (1 - w) * base
