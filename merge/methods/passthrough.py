"""Passthrough: copy one input's tensor, optionally multiplied by ``scale``.

mergekit 0.1.5 semantics (at most one input per output tensor, as in frankenmerge ``slices``; ``scale`` is
a per-input parameter, default none): ``W = X`` when ``scale`` is unset, else ``W = X * scale``, rounded
once in the input dtype (for bfloat16 the product of the bf16 value and the Python float, rounded to bf16).
``scale: 0`` zeroes a tensor (mergekit users zero e.g. ``o_proj``/``down_proj`` of repeated layers).

Streaming: elementwise; any chunking works.
"""

from __future__ import annotations

import torch


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``X`` itself (no copy) when ``scale`` is None, else ``X * scale``."""
    return tensor if scale is None else tensor * scale
