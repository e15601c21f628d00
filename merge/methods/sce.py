"""SCE (select, calculate, erase): keep the entries where the task vectors disagree most, weight each task
vector by its mean square, and average the ones that agree with the elected sign.

mergekit 0.1.5 semantics (parameter ``select_topk``, default 1.0; no per-model weights), with
``d_i = X_i - B`` stacked and computed in the inputs' dtype:

1. select (only when ``select_topk < 1``): ``v = var_i(d_i)`` (population variance over the models, per
   entry); ``k = int(count_nonzero(v) * select_topk)``; keep the ``k`` entries with the largest ``v``
   (``torch.topk``: ties among equal variances are broken as topk breaks them); ``k = 0`` or
   ``select_topk <= 0`` keeps nothing. ``d_i *= mask``.
2. calculate: ``s_i = mean(d_i ** 2)`` over the whole (masked) tensor; ``w_i = s_i / sum_j s_j`` (the sum
   as a Python float), or ``1 / N`` each when ``|sum_j s_j| < 1e-6``.
3. erase: TIES sign election on the masked ``d_i`` (majority ``sign(sum_i d_i)``, 0 counts as +);
   ``m_i = [sign(d_i) == majority]``.
4. ``W = B + sum_i (w_i m_i) d_i / max(sum_i w_i m_i, 1e-6)``.

Streaming: step 1 needs a whole-tensor rank cut of the per-entry variance (one pass counting non-zeros,
:func:`sce_variance` per chunk and :func:`sce_select_count`, then the k-th largest with
:func:`merge.methods.sparsify.rank_cut` and :func:`~merge.methods.sparsify.top_k_mask` per chunk, whose ties
go by flat position instead of topk's order); step 2 needs one pass of per-model sums of squares of the masked deltas
(summing chunk partials differs from one ``mean`` by rounding); steps 3-4 are elementwise.

The kernel (:class:`SceKernel`) does exactly that: with ``0 < select_topk < 1`` a pass counts the non-zero
variances and the exact streaming top-k of :mod:`.selection` finds the cut (a sampled proposal, a proving
count, a refinement at most); then one pass sums ``d_i ** 2`` of the selected deltas (squares in the work
dtype, as mergekit squares them, summed in float64); each chunk is then selected, erased and combined.
Results agree with mergekit's whole-tensor ``sce`` within the rounding of the means (float32), except where
entries of equal variance straddle the cut (topk's order there is its own; bfloat16 variances tie often).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..params import Number
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .chunks import sample_ranges
from .selection import RankCut, magnitudes, rank_cut
from .sparsify import keep_top_
from .task_arithmetic import TieCursor

WEIGHT_EPS = 1e-6


def sce_variance(deltas: torch.Tensor) -> torch.Tensor:
    """Per-entry population variance across the stacked deltas (models first); elementwise, so any chunk."""
    return torch.var(deltas, dim=0, unbiased=False)


def sce_select_count(nonzero: int, select_topk: float) -> int:
    """``k = int(nonzero * select_topk)``: how many entries survive selection (``nonzero`` = entries with
    non-zero variance, summed over chunks)."""
    return int(nonzero * select_topk)


def sce_variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """0/1 mask (the deltas' dtype, one tensor's shape) of the ``int(count_nonzero(var) * select_topk)``
    entries of largest population variance across ``deltas`` (stacked, models first)."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    variance = sce_variance(deltas)
    k = sce_select_count(int(torch.count_nonzero(variance)), select_topk)
    mask = torch.zeros_like(variance)
    if k:
        mask.view(-1)[torch.topk(variance.abs().reshape(-1), k=k).indices] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """``w_i = mean(d_i ** 2) / sum_j mean(d_j ** 2)`` (uniform ``1/N`` when that sum is below 1e-6)."""
    return sce_weights_of(deltas.square().reshape(deltas.shape[0], -1).mean(dim=1))


def sce_weights_of(energy: torch.Tensor) -> torch.Tensor:
    """``w_i = s_i / sum_j s_j`` from the per-model mean squares ``s`` (uniform below 1e-6), in s's dtype."""
    total = torch.sum(energy).item()
    if abs(total) < WEIGHT_EPS:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_combine(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: ``B + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)`` with the TIES ``sum`` sign mask."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    masks = deltas.sign() == majority
    kept_weights = weights.reshape(-1, *([1] * (deltas.dim() - 1))) * masks
    mixed = (deltas * kept_weights).sum(dim=0)
    return base + mixed / kept_weights.sum(dim=0).clamp(min=WEIGHT_EPS)


def sce_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's ``sce`` on whole tensors (one dtype): select -> calculate -> erase -> combine."""
    if not tensors:
        return base
    deltas = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        deltas = deltas * sce_variance_mask(deltas, select_topk).unsqueeze(0)
    return sce_combine(base, deltas, sce_weights(deltas))


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class Sce(Operation):
    """mergekit's ``sce`` of ``inputs`` (base, fine-tunes...), keeping the ``select_topk`` fraction of the
    non-zero variances; ``working_dtype``: see :mod:`.precision` (sce computes in it, as mergekit)."""

    kind: ClassVar[str] = "sce"
    computes_in_working_dtype: ClassVar[bool] = True
    select_topk: float = 1.0
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return True


@dataclass
class SceState:
    """A tensor's selection (None: every entry; ``drop``: none), its tie cursor, and the task-vector weights."""

    cut: RankCut | None
    drop: bool
    weights: torch.Tensor | None = None
    cursor: TieCursor | None = None


def _deltas(xs: list[torch.Tensor]) -> torch.Tensor:
    """``d_i = X_i - B`` stacked, models first."""
    return torch.stack([x - xs[0] for x in xs[1:]])


def _select_(deltas: torch.Tensor, state: SceState, chunk) -> torch.Tensor:
    """``deltas`` of one chunk with the unselected entries zeroed (in place)."""
    if state.drop:
        return deltas.zero_()
    if state.cut is None:
        return deltas
    cursor = state.cursor
    cursor.begin(chunk.index)
    keep = magnitudes(sce_variance(deltas))
    ties = state.cut.ties_by_chunk[chunk.index] if state.cut.ties_by_chunk is not None else None
    cursor.advance((0, keep_top_(keep, state.cut, cursor.ties[1], ties)))
    return deltas.mul_(keep.to(deltas.dtype).view(deltas.shape[1:]))


class SceKernel(KernelBase):
    """A pass counting non-zero variances and the streaming top-k cut (when selecting), a pass of per-model
    sums of squares, then per chunk ``select -> erase -> combine``."""

    def passes(self, op):
        return (4 if 0 < op.select_topk < 1 else 0) + 1

    def buffer_bytes(self, op, elems):  # stacked deltas, variance and products, histograms
        return (2 * len(op.inputs) + 2) * elems * 4 + 2 * (1 << 16) * 8

    def prepare(self, job, reader):
        topk, n = float(job.op.select_topk), job.merged_numel
        state = SceState(cut=None, drop=topk <= 0)
        if 0 < topk < 1:
            def variances(ranges=None):
                for xs in reader.passes(ranges=ranges)():
                    yield sce_variance(_deltas(xs))
            k = sce_select_count(sum(int(torch.count_nonzero(v)) for v in variances()), topk)
            if k == 0:
                state.drop = True
            else:
                sample = None if reader.single else (lambda: variances(sample_ranges(n, reader.chunk)))
                state.cut, state.cursor = rank_cut(variances, k, sample=sample, total=n), TieCursor()
        sums = None
        for chunk, xs in zip(reader.ranges(), reader.passes()()):
            squares = _select_(_deltas(xs), state, chunk).square().reshape(len(xs) - 1, -1).double().sum(dim=1)
            sums = squares if sums is None else sums.add_(squares)
        energy = (sums / max(n, 1)).to(reader.dtype) if sums is not None else None
        state.weights = sce_weights_of(energy) if energy is not None else None
        return state

    def apply(self, job, xs, state, chunk, reader):
        deltas = _select_(_deltas(xs), state, chunk)
        return sce_combine(xs[0], deltas, state.weights.to(deltas.device))


class SceParams(BaseModel):
    """Our recipe's parameter of sce: the fraction of entries (by variance across the deltas) kept."""

    select_topk: Number = Field(1.0, gt=0, le=1, description="sce: fraction of the entries (largest variance "
                                                              "across the deltas) kept; 1 keeps all")


def _check_recipe(recipe) -> None:
    if recipe.schedule is not None:
        raise ValueError("schedule: sce has no t or scale to schedule (its weights come from the deltas); remove it")
    scaled = [i for i, s in enumerate(recipe.sft) if s.scale is not None]
    if scaled:
        raise ValueError(f"sft.{scaled[0]}.scale: sce weighs each delta by its mean square, not by a scale; "
                         "remove it")
    if len(recipe.sft) < 2:
        raise ValueError("sft: sce weighs and elects across several SFTs; give at least two (with one, the "
                         "variance is zero everywhere and nothing would be selected)")


def _plan(recipe, values, name: str) -> Planned:
    op = Sce(("base",) + tuple(f"sft{i}" for i in range(len(recipe.sft))), select_topk=float(recipe.select_topk))
    return Planned(op, f"{op.select_topk:g}")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if not others:
        return Planned(Copy(("base",)), "base")
    topk = resolver.value("select_topk", name)
    op = Sce(("base",) + tuple(keys[r] for r in others), select_topk=topk,
             working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{topk:g}")


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError("base_model: sce needs base_model (the model the task vectors are taken from)")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    topk = chains.scalar("select_topk", None)
    if topk is None:
        problems.append("a per-tensor select_topk (gradients or filters): our sce has one select_topk")
        return
    if len(others) < 2:
        problems.append("sce of a single model (nothing to weigh or elect across)")
        return
    if topk <= 0:
        problems.append(f"select_topk {topk:g} (keeps nothing: the result is base_model)")
        return
    fields.update(method="sce", base=recipe.base_model, sft=others, select_topk=min(float(topk), 1.0))
    notes.append("sce: entries of equal variance at the selection cut are kept by position; mergekit's topk "
                 "orders them its own way")


def _settings(ops: list[Sce], who) -> list[str]:
    topks = sorted({float(op.select_topk) for op in ops})
    spread = f"{topks[0]:g}" if len(topks) == 1 else f"{topks[0]:g}..{topks[-1]:g} across tensors"
    return [f"select_topk: {spread} (fraction of the non-zero variances across the deltas kept)",
            "weights: each delta's mean square over the sum of them; signs elected as in TIES (sum)"]


SPEC = MethodSpec(
    name="sce",
    operation=Sce,
    kernel=SceKernel(),
    params=SceParams,
    settings=_settings,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "select_topk (fraction of entries kept, by variance across the SFTs' deltas)",
    describe=lambda t: ("SCE `W = W_base + sum_i w_i m_i d_i / sum_i w_i m_i`, `d_i = W_sft_i - W_base` restricted "
                        "to the entries of largest variance across the d_i (select_topk), `w_i = mean(d_i^2) / "
                        "sum_j mean(d_j^2)`, `m_i = [sign(d_i) == sign(sum_j d_j)]`."),
    mergekit=(MergekitVariant("sce", (ParamSpec("select_topk", "shared", 1.0),
                                      ParamSpec("int8_mask", "shared", False))),),
    lora_note="SCE runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="mergekit select_topk (fraction of entries kept, by variance across the models)",
    python_params=("select_topk",),
)
