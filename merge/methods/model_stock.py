"""Model Stock: move from the base towards the average of the fine-tunes by a ratio set by the angle
between their deltas.

mergekit 0.1.5 semantics (base required, at least two fine-tunes; ``filter_wise`` default false), in the
inputs' dtype:

- vectors: the whole tensor flattened (default), or with ``filter_wise`` each slice along the **last** dim
  (the rows of a 2-D weight; a 1-D tensor is one row).
- ``d_i = X_i - B``; for each pair i < j: ``cos_ij = clamp(d_i . d_j / max(|d_i| |d_j|, 1e-6), -1, 1)``
  (norms by ``torch.norm``); ``cos`` = the mean over the N(N-1)/2 pairs.
- ``t = N cos / (1 + (N - 1) cos)``, but ``t = 0`` (keep the base) where ``|1 + (N - 1) cos| < 1e-6``.
- ``W = t * mean_i(X_i) + (1 - t) * B``, ``mean_i(X_i) = (X_1 + ... + X_N) / N`` summed in input order.

Streaming: flattened, one statistics pass of N squared norms and N(N-1)/2 dot products over the whole
tensor (:func:`model_stock_sums` per chunk, summed), then :func:`model_stock_ratio` and an elementwise apply
pass; summing chunk partials (float64) instead of ``torch.norm`` over the whole tensor changes ``t`` by
rounding only. ``filter_wise``: every statistic is per row, so a chunk of whole rows needs no separate pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..params import Bool
from .base import KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .gram import BLOCK, gram_of

COS_EPS = 1e-6
SINGULAR_EPS = 1e-6


def _vectors(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    if filter_wise:
        return tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    return tensor.reshape(-1)


def model_stock_statistics(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, dots)``: ``norms[i] = |d_i|`` and ``dots[p] = d_i . d_j`` for the pairs ``p = (i, j), i < j``
    in lexicographic order; scalars per tensor, or one value per row (last-dim slice) with ``filter_wise``."""
    b = _vectors(base, filter_wise)
    deltas = [_vectors(x, filter_wise) - b for x in tensors]
    norms = torch.stack([torch.norm(d, dim=-1) for d in deltas])
    dots = torch.stack([(deltas[i] * deltas[j]).sum(dim=-1)
                        for i in range(len(deltas)) for j in range(i + 1, len(deltas))])
    return norms, dots


def model_stock_sums(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunk-additive float64 statistics for the flattened mode: the Gram matrix ``G[i, j] = d_i . d_j``
    (N x N) of this chunk's deltas; sum it over chunks, then ``norms = sqrt(diag G)``."""
    deltas = torch.stack([(x - base).reshape(-1) for x in tensors]).to(torch.float64)
    return deltas @ deltas.T


def gram_statistics(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, dots)`` in :func:`model_stock_statistics`'s layout from a summed Gram matrix."""
    n = gram.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return gram.diagonal().sqrt(), torch.stack([gram[i, j] for i, j in pairs])


def model_stock_ratio(norms: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine (0 where the denominator is
    below 1e-6), shaped ``[..., 1]`` to broadcast over a row (or the flat tensor)."""
    count = norms.shape[0]
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    cosines = [(dots[p] / (norms[i] * norms[j]).clamp(min=COS_EPS)).clamp(-1, 1) for p, (i, j) in enumerate(pairs)]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    ratio = (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), ratio)


def model_stock_apply(base: torch.Tensor, tensors: Sequence[torch.Tensor], ratio: torch.Tensor,
                      filter_wise: bool = False) -> torch.Tensor:
    """``W = t * mean_i(X_i) + (1 - t) * B`` (``t`` per row with ``filter_wise``), in ``base``'s shape."""
    b = _vectors(base, filter_wise)
    average = sum(_vectors(x, filter_wise) for x in tensors) / len(tensors)
    return (ratio * average + (1 - ratio) * b).reshape(base.shape)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """mergekit's ``model_stock`` on whole tensors: statistics -> ratio -> apply."""
    if len(tensors) < 2:
        raise ValueError("model_stock: needs at least two fine-tuned models besides the base")
    ratio = model_stock_ratio(*model_stock_statistics(base, tensors, filter_wise))
    return model_stock_apply(base, tensors, ratio, filter_wise)


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class ModelStock(Operation):
    """Model Stock over ``inputs = (base, fine-tunes...)``: ``W = t * mean_i(X_i) + (1 - t) * B`` with
    ``t = N cos / (1 + (N - 1) cos)`` per tensor, or per row (last-dim slice) with ``filter_wise``."""

    kind: ClassVar[str] = "model_stock"
    filter_wise: bool = False
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return True  # equal inputs: zero deltas, cos = 0, t = 0: the base exactly


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.reshape(-1, width)


class ModelStockKernel(KernelBase):
    """Flattened: one statistics pass of the deltas' float64 Gram matrix (N norms, N(N-1)/2 dots), then
    ``t * mean + (1 - t) * base`` per chunk. ``filter_wise``: chunks of whole rows, each row's statistics
    (float64) and ratio computed with its chunk, no statistics pass."""

    def passes(self, op):
        return 0 if op.filter_wise else 1

    def granule(self, op, shape):
        return shape[-1] if op.filter_wise and shape else 1

    def buffer_bytes(self, op, elems):
        return (len(op.inputs) + 2) * elems * 8 if op.filter_wise else (len(op.inputs) + 1) * BLOCK * 8

    def prepare(self, job, reader):
        if job.op.filter_wise:
            return None
        gram = gram_of(reader.passes(stored=True), origin_slot=0)
        if gram is None:
            return 0.0
        return float(model_stock_ratio(*gram_statistics(gram.cpu())).reshape(-1)[0])

    def apply(self, job, xs, state, chunk, reader):
        base, fine = xs[0], xs[1:]
        if job.op.filter_wise:
            width = job.shape[-1] if job.shape else 1
            b64 = _rows(base, width).to(torch.float64)
            norms, dots = model_stock_statistics(b64, [_rows(x, width).to(torch.float64) for x in fine], True)
            ratio = model_stock_ratio(norms, dots).to(base.dtype)
            return model_stock_apply(_rows(base, width), [_rows(x, width) for x in fine], ratio, True).reshape(-1)
        ratio = torch.tensor(state, dtype=base.dtype, device=base.device)
        return model_stock_apply(base, fine, ratio)


def check_count(count: int, where: str) -> None:
    """Model Stock needs the base and at least two fine-tunes (one-line error naming ``where``)."""
    if count < 2:
        raise ValueError(f"{where}: model_stock needs at least two fine-tuned models besides the base (got {count}); "
                         "its ratio comes from the angle between their deltas")


class ModelStockParams(BaseModel):
    """Our recipe's parameter of Model Stock: one ratio per tensor, or per row (``filter_wise``)."""

    filter_wise: Bool = Field(False, description="model_stock: one ratio per row (last-dim slice) instead of "
                                                 "per tensor")


def _check_recipe(recipe) -> None:
    check_count(len(recipe.sft), "sft")
    for i, s in enumerate(recipe.sft):
        if s.scale is not None:
            raise ValueError(f"sft.{i}.scale: only for method task_arithmetic (model_stock sets its own ratio)")
    if recipe.schedule is not None:
        raise ValueError("schedule: model_stock sets its own ratio per tensor; a schedule would have no effect")


def _plan(recipe, values, name: str) -> Planned:
    op = ModelStock(("base",) + tuple(f"sft{i}" for i in range(len(recipe.sft))), filter_wise=recipe.filter_wise)
    return Planned(op, "per row" if recipe.filter_wise else "per tensor")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    filter_wise = bool(resolver.value("filter_wise", name))
    op = ModelStock(("base",) + tuple(keys[r] for r in others), filter_wise=filter_wise,
                    working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, "per row" if filter_wise else "per tensor")


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError("base_model: model_stock needs base_model (the deltas are taken from it)")
    check_count(len([r for r in recipe.model_refs() if r != recipe.base_model]), "models")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    filter_wise = chains.scalar("filter_wise", None)
    if filter_wise is None:
        problems.append("per-tensor filter_wise (gradients or filters): our model_stock has one filter_wise")
        return
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    fields.update(method="model_stock", base=recipe.base_model, sft=others, filter_wise=bool(filter_wise) or None)


FORMULA = ("W = t*mean_i(W_sft_i) + (1-t)*W_base with t = N*cos/(1+(N-1)*cos), cos the mean pairwise cosine "
           "of the deltas W_sft_i - W_base (t = 0 where 1+(N-1)*cos ~ 0)")

SPEC = MethodSpec(
    name="model_stock",
    operation=ModelStock,
    kernel=ModelStockKernel(),
    params=ModelStockParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "Model Stock ratio t (share of the SFTs' mean, from the angle between their deltas)",
    describe=lambda t: (f"Model Stock per tensor (or per row with filter_wise): `{FORMULA}`; this t is Model "
                        "Stock's ratio (the share of the SFTs' mean, set by the angles): 1-t is the share of the "
                        "base."),
    mergekit=(MergekitVariant("model_stock", (ParamSpec("filter_wise", "shared", False),)),),
    lora_note="Model Stock runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="model_stock ratio: per tensor or per row (filter_wise)",
    python_params=("filter_wise",),
)
