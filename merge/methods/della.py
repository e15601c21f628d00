"""DELLA (MAGPRUNE): drop delta entries at random, with keep probabilities rising with magnitude rank.

mergekit 0.1.5 semantics, per task vector ``d`` (``density`` p, ``epsilon`` e; default e = 0.15):

- ``p >= 1``: ``d`` unchanged (no check of e); ``p <= 0``: zeros; otherwise ``0 < p - e`` and ``p + e < 1``
  are required (``ValueError``).
- Ranks run **along dim 1** (per row of a 2-D weight; a 1-D tensor is one row): ``rank = 1 + position of
  |d| in an ascending argsort`` (torch's default, unstable argsort, the call mergekit makes: tied magnitudes
  are ordered as that sort leaves them, deterministic on one device and torch version). The ranks are cast
  to the work dtype (float32 on CPU, but bfloat16 stays bfloat16 and any dtype stays as it is on an
  accelerator), then ``u = clamp((rank - min) / (max - min), 0, 1)`` per row (min = 1, max = row length
  after that cast), and ``P_keep = (p - e) + (u * 2) * e``: from ``p - e`` for the smallest entry of a row
  to ``p + e`` for its largest. A row of one entry (where mergekit divides 0 by 0 and fails) gets ``p``.
- ``mask = bernoulli(P_keep)`` (the generator given, else torch's global RNG, which is what mergekit uses);
  ``pruned = d * mask`` in the work dtype; ``rescale`` (default true for both methods) is the L1 rescale
  of :mod:`merge.methods.rescale` over the whole tensor, **not** DELLA's ``1 / P_keep``; the result is cast
  back to ``d``'s dtype.
- Combination: mergekit's generalized task arithmetic (``task_arithmetic_mergekit``): ``della`` elects
  signs (TIES ``sum``) and normalizes by default; ``della_linear`` does neither by default. The whole-tensor
  form is :func:`merge.methods.reference.della_merge`; here DELLA is a sparsifier of the task-arithmetic
  kernel (:mod:`.task_arithmetic` calls :func:`della_prune_chunk_`).

Streaming: ranks need whole dim-1 fibres, so a chunk of whole rows (a slice along dim 0) suffices for the
probabilities and the mask; 1-D tensors are one row. The L1 rescale needs one statistics pass (both norms
over the whole tensor), so a kernel either keeps the pruned chunks or regenerates the same mask in the
apply pass (a generator re-seeded per chunk). Chunked draws keep the distribution, not mergekit's bits.

Streamed form (:func:`della_keep_chunk`): chunks hold whole slices along dim 0 (granule
:func:`della_granule`); ranks along dim 1 use a stable sort (tied magnitudes ordered by position, so the
ranks do not depend on how many rows a chunk holds); the draw is ``u < P_keep`` with ``u`` uniform from
generators seeded per fixed block of :data:`~.sparsify.RNG_BLOCK` flat elements by (seed, tensor, input,
block), like DARE's, so the mask is the same for any chunk size, thread count or run.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .rescale import l1_rescale
from .sparsify import RNG_BLOCK, block_generator

DEFAULT_EPSILON = 0.15


def della_work_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype DELLA's ranks, probabilities and mask live in: the tensor's own on an accelerator or for
    bfloat16, float32 otherwise (CPU ``bernoulli`` has no float16)."""
    return dtype if torch.device(device).type != "cpu" or dtype == torch.bfloat16 else torch.float32


def check_della_density(density: float, epsilon: float) -> None:
    """``ValueError`` unless ``density - epsilon > 0`` and ``density + epsilon < 1``."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density {density} +/- epsilon {epsilon} must lie inside (0, 1)")


def require_della_density(density: float, epsilon: float, who: str) -> None:
    """:func:`check_della_density` as a one-line :class:`~merge.errors.InputError` naming the model ``who``."""
    try:
        check_della_density(density, epsilon)
    except ValueError:
        raise InputError(f"parameters: della density {density:g} and epsilon {epsilon:g} for {who}: density - "
                         "epsilon must be > 0 and density + epsilon < 1; lower epsilon or change density") from None


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float,
                             dtype: torch.dtype | None = None, stable: bool = False) -> torch.Tensor:
    """``P_keep = (p - e) + 2e * u`` with ``u`` the min-max normalised magnitude rank along dim 1 (see the
    module docstring), in ``dtype`` (default: :func:`della_work_dtype`). Shape of ``delta`` with a leading
    row axis added for 1-D input. ``stable``: tied magnitudes ranked by position (mergekit's sort is not
    stable)."""
    check_della_density(density, epsilon)
    work = dtype or della_work_dtype(delta.dtype, delta.device)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ascending = torch.argsort(rows.abs(), dim=1, stable=stable)
    if stable:  # the inverse permutation by one scatter (mergekit sorts the permutation again; same ranks)
        positions = torch.arange(rows.shape[1], device=rows.device).view(1, -1, *([1] * (rows.dim() - 2)))
        ranks = torch.empty_like(ascending).scatter_(1, ascending, positions.expand_as(ascending))
    else:
        ranks = torch.argsort(ascending, dim=1)
    ranks = ranks.to(work) + 1
    low = ranks.amin(dim=1, keepdim=True)
    span = ranks.amax(dim=1, keepdim=True) - low
    unit = torch.where(span > 0, ((ranks - low) / span).clamp(0, 1), torch.full_like(ranks, 0.5))
    return (density - epsilon) + unit * 2 * epsilon


def della_mask(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``bernoulli(P_keep)`` as 0/1 in the probabilities' dtype (``generator`` None: torch's global RNG)."""
    return torch.bernoulli(probabilities, generator=generator)


def della_prune(delta: torch.Tensor, density: float, epsilon: float = DEFAULT_EPSILON, rescale: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's ``della_magprune``: ``d * bernoulli(P_keep)``, L1-rescaled when ``rescale``; computed in
    the work dtype, returned in ``delta``'s dtype and shape. ``density >= 1``: ``delta`` itself."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probabilities = della_keep_probabilities(delta, density, epsilon)
    mask = della_mask(probabilities, generator)
    rows = delta.to(probabilities.dtype)
    rows = rows if rows.dim() >= 2 else rows.unsqueeze(0)
    pruned = rows * mask
    if rescale:
        pruned = l1_rescale(rows, pruned)
    return pruned.to(delta.dtype).reshape(delta.shape)


# -- streamed: chunks of whole dim-0 slices, masks from fixed RNG blocks ------------------------------------------
def della_granule(shape: tuple[int, ...]) -> int:
    """Flat elements of one dim-0 slice (``prod(shape[1:])``; a 1-D tensor is one row): DELLA's chunks hold
    whole slices, since ranks run along dim 1."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def della_uniforms(seed: int, name: str, stream: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for flat elements [start, stop) of input ``stream``'s delta of tensor
    ``name``, assembled from fixed blocks (see :func:`~.sparsify.block_generator`)."""
    parts = []
    for b0 in range(start - start % RNG_BLOCK, stop, RNG_BLOCK):
        g = block_generator(seed, f"della\0{name}", stream, b0 // RNG_BLOCK, device)
        block = torch.rand(RNG_BLOCK, generator=g, device=device)
        parts.append(block[max(start, b0) - b0: min(stop, b0 + RNG_BLOCK) - b0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def della_keep_chunk(delta: torch.Tensor, shape: tuple[int, ...], start: int, density: float, epsilon: float,
                     seed: int, name: str, stream: int) -> torch.Tensor:
    """The 0/1 keep-mask (flat, DELLA's work dtype) of a flat chunk ``delta`` of whole dim-0 slices starting
    at flat element ``start`` of a ``shape`` tensor: ``u < P_keep`` with ``P_keep`` from stable per-row ranks
    and ``u`` from :func:`della_uniforms`."""
    rows = delta.view(-1, *shape[1:]) if len(shape) >= 2 else delta.view(1, -1)
    probabilities = della_keep_probabilities(rows, density, epsilon, stable=True).reshape(-1)
    u = della_uniforms(seed, name, stream, start, start + delta.numel(), delta.device)
    return (u < probabilities.float()).to(probabilities.dtype)


def della_prune_chunk_(delta: torch.Tensor, shape: tuple[int, ...], start: int, density: float, epsilon: float,
                       seed: int, name: str, stream: int) -> None:
    """Zeroes in place the entries of the delta chunk that :func:`della_keep_chunk` drops (the L1 rescale,
    which needs the whole tensor's norms, is the caller's)."""
    delta.mul_(della_keep_chunk(delta.reshape(-1), shape, start, density, epsilon, seed, name, stream
                                ).view(delta.shape))
