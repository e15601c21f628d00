"""NearSwap: take the fine-tuned value where it is close to the base, interpolate towards it elsewhere.

mergekit 0.1.5 semantics (exactly two inputs, the base and one model; ``t`` required), elementwise in the
inputs' dtype: ``w = clamp(t / max(|B - X|, 1e-6), 0, 1)``; ``W = w * X + (1 - w) * B``. Entries that differ
by at most ``t`` take ``X`` (``w = 1``); larger differences move ``t / |B - X|`` of the way, i.e. exactly
``t`` towards ``X``. ``t <= 0`` gives the base.

In our format the same formula takes ``distance`` (``d``; mergekit's ``t``): ``W = W_base + clamp(W_sft -
W_base, -d, d)`` up to rounding, the SFT's changes kept up to ``d`` per entry.

Streaming: elementwise, no statistics pass; any chunking works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..params import Number
from .base import KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned

DIFF_EPS = 1e-6


def nearswap_weight(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``clamp(t / max(|B - X|, 1e-6), 0, 1)``, elementwise."""
    return (t / torch.abs(base - other).clamp(min=DIFF_EPS)).clamp(min=0, max=1)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``w * X + (1 - w) * B`` with ``w`` from :func:`nearswap_weight`."""
    w = nearswap_weight(base, other, t)
    return w * other + (1 - w) * base


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class NearSwap(Operation):
    """:func:`nearswap` of ``inputs = (base, model)`` with distance ``t`` (mergekit computes in its working
    dtype, so does a mergekit recipe here)."""

    kind: ClassVar[str] = "nearswap"
    computes_in_working_dtype: ClassVar[bool] = True
    t: float = 0.0
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:  # w is 0 or 1 where X == B, except for 0 < t < 1e-6
        return not 0 < self.t < DIFF_EPS


class NearSwapKernel(KernelBase):
    """Elementwise, one pass: ``W = w X + (1 - w) B``, ``w = clamp(t / max(|B - X|, 1e-6), 0, 1)``."""

    def apply(self, job, xs, state, chunk, reader):
        return nearswap(xs[0], xs[1], float(job.op.t))


class NearSwapParams(BaseModel):
    """Our recipe's parameter of nearswap: the ``distance`` (mergekit's ``t``) up to which the SFT's change of
    an entry is kept whole; larger changes are cut to that distance."""

    distance: Number | None = Field(None, gt=0, allow_inf_nan=False,
                                   description="nearswap: largest change of an entry kept (mergekit's t)")


def _check_recipe(recipe) -> None:
    if recipe.distance is None:
        raise ValueError("distance: required for method nearswap (the largest change of an entry kept, > 0; "
                         "mergekit calls it t)")
    if len(recipe.sft) != 1:
        raise ValueError("sft: method nearswap takes exactly one SFT model")
    if recipe.sft[0].scale is not None:
        raise ValueError("sft.0.scale: only for method task_arithmetic")
    if recipe.schedule is not None:
        raise ValueError("schedule: not for method nearswap (it has no t or scale to schedule)")


def _plan(recipe, values, name: str) -> Planned:
    return Planned(NearSwap(("base", "sft0"), t=float(recipe.distance)), f"d={recipe.distance:g}")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    t = resolver.value("t", name)
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    op = NearSwap(("base", recipe.keys()[other]), t=t, working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{t:g}")


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError("base_model: nearswap needs base_model (entries far from it move t towards the model)")
    refs = recipe.model_refs()
    if len(refs) != 2:
        raise ValueError(f"models: nearswap takes exactly two models (base_model and one other), got {len(refs)}")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    t = chains.scalar("t", None)
    if t is None:
        problems.append("nearswap with a per-tensor t (gradients or filters): our distance is one number")
        return
    if t <= 0:
        problems.append(f"nearswap t {t:g} <= 0 (that gives base_model unchanged; copy it instead)")
        return
    fields.update(method="nearswap", base=recipe.base_model, sft=[other], distance=t)
    notes.append("mergekit's nearswap t is a distance, not a share: it is our distance (float32 math here, "
                 "mergekit computes in the checkpoints' dtype)")


SPEC = MethodSpec(
    name="nearswap",
    operation=NearSwap,
    kernel=NearSwapKernel(),
    params=NearSwapParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "d (largest change of an entry kept)",
    describe=lambda t: ("NearSwap per entry: `W = w*W_sft + (1-w)*W_base`, `w = clamp(d / |W_sft - W_base|, 0, 1)`: "
                        "the SFT's value where it is within d of the base, else the base moved d towards it "
                        "(the delta clipped to [-d, d])."),
    mergekit=(MergekitVariant("nearswap", (ParamSpec("t", "shared", required=True),)),),
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="mergekit t (distance: entries within t of base_model take the model's value)",
    python_params=("distance",),
)
