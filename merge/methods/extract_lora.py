"""LoRA factors of a delta: the truncated SVD of ``D = W_sft - W_base`` split into PEFT's ``lora_A`` and
``lora_B``.

PEFT applies ``W = W_base + (lora_alpha / r) * B @ A`` with ``A = lora_A.weight`` (r x in) and
``B = lora_B.weight`` (out x r), for a ``Linear`` whose weight is ``D``'s shape (out x in). With the rank-k
SVD ``D ~ U_k diag(s_k) Vh_k`` (k = min(r, out, in); exact or randomized as in :mod:`merge.methods.spectral`)
and ``g = r / lora_alpha``, the singular values are split evenly between the two sides:

    B = U_k diag(sqrt(g s_k)),   A = diag(sqrt(g s_k)) Vh_k,   so (lora_alpha / r) B @ A = U_k diag(s_k) Vh_k.

Both factors then have the same scale (``|B e_i| = |A^T e_i| = sqrt(g s_i)``), which keeps them in range for
bfloat16. When ``k < r`` (a matrix thinner than the rank) the factors are padded with zero rows/columns so
every module of one adapter has the configured ``r``. At full rank the reconstruction equals ``D`` to float32
rounding. Computed in float32 (float64 for float64 deltas); the caller casts. For GPT-2's ``Conv1D`` (weight
stored in x out) pass ``D.T``; embeddings and ``lm_head`` go to ``modules_to_save`` instead.

Streaming: one whole 2-D delta at a time (the SVD is global), as in spectral repair.
"""

from __future__ import annotations

import torch

from .spectral import truncated_svd


def lora_factors(delta: torch.Tensor, rank: int, alpha: float, method: str = "auto", seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``(alpha / rank) * B @ A`` the best rank-``rank`` approximation
    of the 2-D ``delta`` (module docstring)."""
    if rank < 1:
        raise ValueError(f"lora_factors: rank must be at least 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"lora_factors: lora_alpha must be positive, got {alpha}")
    u, s, vh, _ = truncated_svd(delta, rank, method, seed)
    root = torch.sqrt(s * (rank / alpha))
    a = torch.zeros(rank, delta.shape[1], dtype=u.dtype, device=u.device)
    b = torch.zeros(delta.shape[0], rank, dtype=u.dtype, device=u.device)
    k = s.numel()
    a[:k] = root.unsqueeze(1) * vh
    b[:, :k] = u * root
    return a, b


def lora_delta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(alpha / r) * B @ A`` with ``r = A.shape[0]``: the weight change PEFT applies."""
    return (alpha / a.shape[0]) * (b @ a)
