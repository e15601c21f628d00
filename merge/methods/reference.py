"""Whole-tensor reference implementations of every method, readable top to bottom.

This is the specification the streaming executor is tested against (tests use it as the oracle); it is not
part of the API and is not exported by :mod:`merge.methods`. Everything here holds whole tensors, computes in
float64 unless it says otherwise, and favours the plain formula over speed. ``t`` is the share of the base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import della
from .linear import linear
from .selection import ChunkSource, RankCut, magnitudes, rank_cut
from .slerp import DOT_THRESHOLD, EPS, SlerpCoefficients, slerp_coefficients, slerp_partial_sums
from .sparsify import dare_keep, keep_top_
from .task_arithmetic import task_arithmetic_mergekit


def lerp(sft: torch.Tensor, base: torch.Tensor, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W = (1 - t) * W_sft + t * W_base``: t is the share of the base (t=0 gives the SFT, t=1 the base)."""
    return linear([sft, base], [1.0 - t, t], out=out)


def slerp(w_from: torch.Tensor, w_to: torch.Tensor, t: float, out: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, SlerpCoefficients]:
    """Whole-tensor SLERP on the raw (unnormalised) tensors: ``a * W_from + b * W_to``.

    For recovery, ``W_from`` is the SFT tensor and ``W_to`` the base, so ``t`` is the share of the base.
    """
    c = slerp_coefficients(*slerp_partial_sums(w_from, w_to).tolist(), t)
    return linear([w_from, w_to], [c.a, c.b], out=out), c


def slerp_textbook(w_from: torch.Tensor, w_to: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP straight from its definition, in float64: ``cos = <a, b> / (|a| |b|)``, ``theta = acos(cos)``,
    ``W = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b``; linear when ``|cos| > 0.9995`` or a
    norm is ~0."""
    a, b = w_from.double().reshape(-1), w_to.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    if na < EPS or nb < EPS:
        return ((1 - t) * a + t * b).reshape(w_from.shape)
    cos = max(-1.0, min(1.0, float(a @ b) / (na * nb)))
    if abs(cos) > DOT_THRESHOLD:
        return ((1 - t) * a + t * b).reshape(w_from.shape)
    theta = math.acos(cos)
    out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.reshape(w_from.shape)


def magnitude_keep(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of largest ``|delta|`` (compared as float32), ties broken by position: a bool mask."""
    flat = delta.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    k = max(0, min(k, flat.numel()))
    if k:  # a stable sort by decreasing float32 magnitude: equal magnitudes stay in position order
        order = torch.sort(flat.float().abs(), descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep.reshape(delta.shape)


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the ``max(1, int(density * n))`` largest-magnitude entries (all for density >= 1)."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    return delta * magnitude_keep(delta, max(1, int(density * delta.numel())))


def breadcrumbs_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma * n)`` largest-magnitude entries and keep the next
    ``int(density * n)``."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    return delta * (magnitude_keep(delta, top + keep) & ~magnitude_keep(delta, top))


def dare(delta: torch.Tensor, density: float, seed: int, name: str, stream: int, rescale: bool = True
         ) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` (the executor's fixed random blocks for tensor
    ``name``, fine-tune ``stream``), survivors divided by ``density`` when ``rescale``."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    keep = dare_keep(seed, name, stream, 0, delta.numel(), density, delta.device).reshape(delta.shape)
    out = delta * keep
    return out / density if rescale else out


def task_arithmetic(base: torch.Tensor, sfts: Sequence[torch.Tensor], weights: Sequence[float], *,
                    pruned: Sequence[torch.Tensor] | None = None, sign_consensus: str | None = None,
                    normalize: bool = False, lam: float = 1.0) -> torch.Tensor:
    """``W = W_base + lam * sum_i w_i m_i d_i`` (``/ sum_i w_i m_i`` elementwise when ``normalize``), with
    ``d_i = W_i - W_base`` (or ``pruned[i]``, already pruned deltas), ``m_i`` TIES sign agreement with
    ``sign(sum_j w_j d_j)`` (``sum``) or with the majority of signs (``count``); all ones without."""
    deltas = list(pruned) if pruned is not None else [s - base for s in sfts]
    weighted = [w * d for w, d in zip(weights, deltas)]
    if sign_consensus == "sum":
        elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    elif sign_consensus == "count":
        elected = torch.where(sum(torch.sign(d) for d in weighted) >= 0, 1.0, -1.0)
    masks = [torch.sign(d) == elected.to(d.dtype) if sign_consensus else torch.ones_like(d, dtype=torch.bool)
             for d in weighted]
    mixed = sum(d * m for d, m in zip(weighted, masks))
    if normalize:
        divisor = sum(w * m.to(base.dtype) for w, m in zip(weights, masks))
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + lam * mixed


# -- mask forms of the streaming selection: what in-place trimming (sparsify.trim_) is tested against ----------
def kth_largest(chunks: ChunkSource, k: int) -> float:
    """The k-th largest ``|x|`` (1-based) over all chunks (``inf`` for k < 1)."""
    return rank_cut(chunks, k).threshold


def top_k_mask(x: torch.Tensor, cut: RankCut, ties_before: int = 0) -> tuple[torch.Tensor, int]:
    """Which entries of this chunk are among the top k of the whole tensor (see :class:`RankCut`);
    ``ties_before`` counts threshold-equal entries in earlier chunks. Returns (mask, ties in this chunk)."""
    mags = magnitudes(x)
    ties = keep_top_(mags, cut, ties_before)
    return mags.reshape(x.shape) != 0, ties


def magnitude_mask(delta: torch.Tensor, cut: RankCut, ties_before: int = 0) -> tuple[torch.Tensor, int]:
    """TIES trimming: keep the ``k = max(1, int(density * n))`` largest-magnitude entries of a delta."""
    return top_k_mask(delta, cut, ties_before)


def breadcrumbs_mask(delta: torch.Tensor, upper: RankCut, lower: RankCut, ties_before: tuple[int, int] = (0, 0)
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Model Breadcrumbs: keep the magnitude ranks in ``[top, top + keep)``: the top ``top = gamma * n``
    entries are dropped (``upper``), and so is everything below rank ``top + keep`` (``lower``)."""
    in_lower, t_low = top_k_mask(delta, lower, ties_before[1])
    if upper.threshold == float("inf"):  # nothing dropped from the top (plain magnitude trimming)
        return in_lower, (0, t_low)
    in_upper, t_up = top_k_mask(delta, upper, ties_before[0])
    return in_lower & ~in_upper, (t_up, t_low)


def della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], epsilons: Sequence[float] | None = None, *,
                consensus: str | None = "sum", normalize: bool = True, rescale: bool = True, lam: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``della`` (defaults) or ``della_linear`` (``consensus=None, normalize=False``), as mergekit runs them:
    ``d_i = della.della_prune(X_i - B, p_i, e_i)`` drawn in input order, then
    ``task_arithmetic_mergekit(B, d, w, consensus, normalize, lam)`` on the flattened tensors. Inputs share
    one dtype."""
    if not tensors:
        return base
    epsilons = [della.DEFAULT_EPSILON] * len(tensors) if epsilons is None else list(epsilons)
    deltas = [della.della_prune(x - base, p, e, rescale, generator).reshape(-1)
              for x, p, e in zip(tensors, densities, epsilons)]
    merged = task_arithmetic_mergekit(base.reshape(-1), deltas, weights, consensus=consensus, normalize=normalize,
                                      lam=lam)
    return merged.reshape(base.shape)


def spectral(base: torch.Tensor, sft: torch.Tensor, scale: float, rank: int | None = None,
             svd: str = "exact", seed: int = 0) -> tuple[torch.Tensor, int | None]:
    """Spectral repair of one whole tensor, in float32 (float64 for float64 inputs): ``D = W_sft - W_base``;
    a 2-D ``D = U diag(s) V^T`` keeps ``k`` components, ``D_k = U[:, :k] diag(s[:k]) V[:, :k]^T``:

    - ``rank=r``: ``k = r`` (``D_k = D`` when ``r >= min(m, n)``); ``svd="randomized"`` takes the seeded
      randomized SVD of :func:`merge.methods.spectral.truncated_svd` instead of the exact one;
    - ``rank=None``: ``k = #{i : s_i > tau}``, the Donoho-Gavish hard threshold for unknown noise
      ``tau = (0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43) * median(s)``, ``b = min(m, n) / max(m, n)``, the median
      of all ``min(m, n)`` values (the mean of the middle two for an even count).

    ``W = W_base + scale * D_k`` (``torch.add`` with ``alpha``); other shapes ``W_base + scale * D``.
    Returns ``(W, k)`` (k None for tensors that are not 2-D).
    """
    from .spectral import truncated_svd

    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    d = sft.to(work) - b
    if d.dim() != 2:
        return torch.add(b, d, alpha=scale), None
    full = min(d.shape)
    if rank is not None and rank >= full:
        return torch.add(b, d, alpha=scale), full
    if rank is not None and svd == "randomized":
        u, s, vh, _ = truncated_svd(d, rank, "randomized", seed)
        k = rank
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if rank is None:
            beta = full / max(d.shape)
            ordered = sorted(float(x) for x in s.double())
            mid = ordered[full // 2] if full % 2 else (ordered[full // 2 - 1] + ordered[full // 2]) / 2
            tau = (0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43) * mid
            k = int((s > tau).sum())
        else:
            k = rank
    kept = (u[:, :k] * s[:k]) @ vh[:k]
    return torch.add(b, kept, alpha=scale), k
