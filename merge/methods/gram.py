"""Chunk-additive float64 Gram sums, the statistics of the spherical methods (model_stock, nuslerp, multislerp,
karcher) over flattened tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 1 << 17


def gram_partial_sums(tensors: Sequence[torch.Tensor], origin: torch.Tensor | None = None,
                      acc: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """Add ``G[i, j] = x_i . x_j`` of this chunk to ``acc`` (float64 ``[N, N]``; a new one when None), with
    ``x_i = flat(tensors[i] - origin)`` (``origin`` None: the tensors themselves).

    Computed in float64 (the differences of float32/bfloat16 values are exact there) block by block, and
    summed block after block like :func:`~merge.methods.slerp.slerp_partial_sums`: chunks that are multiples
    of ``block`` give the same bits as the whole tensor at once.
    """
    flat = [x.reshape(-1) for x in tensors]
    n, count = flat[0].numel(), len(flat)
    device = flat[0].device
    acc = torch.zeros(count, count, dtype=torch.float64, device=device) if acc is None else acc
    if n == 0:
        return acc
    buf = torch.empty(count, min(n, block), dtype=torch.float64, device=device)
    zero = origin.reshape(-1) if origin is not None else None
    shift = torch.empty(min(n, block), dtype=torch.float64, device=device) if zero is not None else None
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = buf[:, :stop - start]
        for i, x in enumerate(flat):
            rows[i].copy_(x[start:stop])
        if zero is not None:
            rows.sub_(shift[:stop - start].copy_(zero[start:stop]))
        dots = [torch.dot(rows[i], rows[j]) for i in range(count) for j in range(i, count)]
        block_gram = torch.zeros_like(acc)
        k = 0
        for i in range(count):
            for j in range(i, count):
                block_gram[i, j] = block_gram[j, i] = dots[k]
                k += 1
        acc.add_(block_gram)
    return acc


def gram_of(walk, origin_slot: int | None = None, slots: Sequence[int] | None = None) -> torch.Tensor:
    """The Gram matrix summed over a statistics pass (``walk()`` yields each chunk's input list): of the inputs
    in ``slots`` (default: all but ``origin_slot``), minus input ``origin_slot`` when given."""
    acc = None
    for xs in walk():
        chosen = slots if slots is not None else [i for i in range(len(xs)) if i != origin_slot]
        acc = gram_partial_sums([xs[i] for i in chosen], None if origin_slot is None else xs[origin_slot], acc)
    return acc
