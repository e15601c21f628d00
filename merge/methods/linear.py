"""Weighted averages of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field, field_validator

from ..keys import BASE, PRIMARY
from ..params import Value, finite_value
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = False,
           out: torch.Tensor | None = None, scratch: bool = False) -> torch.Tensor:
    """``W = sum_i w_i * W_i``, divided by ``sum_i w_i`` when ``normalize``.

    ``out`` may be ``tensors[0]`` (it is scaled in place before the others are added), but no other input.
    ``scratch=True`` lets the other inputs be scaled in place too, so nothing is allocated.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear: need one weight per tensor")
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("linear: weights sum to zero, cannot normalize")
    ws = [w / total for w in weights] if normalize else list(weights)
    if out is None:
        out = tensors[0] * ws[0]
    else:
        if any(out is t for t in tensors[1:]):
            raise ValueError("linear: out may alias only the first tensor")
        torch.mul(tensors[0], ws[0], out=out)
    for t, w in zip(tensors[1:], ws[1:]):
        # the product is rounded before the sum (no fused multiply-add), as a direct computation does
        out.add_(t.mul_(w) if scratch else t * w)
    return out


def linear_sum_then_divide(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                           normalize: bool = True) -> torch.Tensor:
    """mergekit's order of rounding: ``acc = 0; acc += w_i * W_i`` (weights rounded to the tensors' dtype),
    then ``acc / sum(w)`` with the sum taken in that dtype. Returns a new tensor; no guard for a zero sum."""
    first = tensors[0]
    w = torch.tensor([float(x) for x in weights], dtype=first.dtype, device=first.device)
    out = torch.zeros_like(first)
    for t, coefficient in zip(tensors, w.unbind(0)):
        out.addcmul_(t, coefficient)
    if normalize:
        out.div_(w.sum(dim=0))
    return out


def lerp(sft: torch.Tensor, base: torch.Tensor, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W = (1 - t) * W_sft + t * W_base``: t is the share of the base (t=0 gives the SFT, t=1 the base)."""
    return linear([sft, base], [1.0 - t, t], out=out)


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class Linear(Operation):
    """``sum_i w_i * inputs[i]`` (``/ sum_i w_i`` when ``normalize``); ``sum_then_divide``: mergekit's order
    of rounding (:func:`linear_sum_then_divide`); ``working_dtype``: see :mod:`.precision`."""

    kind: ClassVar[str] = "linear"
    weights: tuple[float, ...] = ()
    normalize: bool = False
    sum_then_divide: bool = False
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return self.normalize or abs(sum(self.weights) - 1) <= 1e-9


def combine(op: Linear, xs: list[torch.Tensor]) -> torch.Tensor:
    """One chunk of ``op`` from its compute-dtype input chunks (scaled in place, result in ``xs[0]``)."""
    if op.sum_then_divide:
        return linear_sum_then_divide(xs, op.weights, normalize=bool(op.normalize))
    return linear(xs, op.weights, normalize=bool(op.normalize), out=xs[0], scratch=True)


class LinearKernel(KernelBase):
    """One pass: each chunk is its weighted sum."""

    def apply(self, job, xs, state, chunk, reader):
        return combine(job.op, xs)


class InterpolationParams(BaseModel):
    """Our recipe's parameter of an interpolation of one SFT with its base (linear, slerp)."""

    t: Value | None = Field(None, description="share of the base model: 0 = SFT, 1 = base")

    @field_validator("t")
    @classmethod
    def _finite(cls, v):
        return finite_value(v)


def check_interpolation(recipe) -> None:
    """Our recipe's rules for an interpolation of one SFT with its base (linear, slerp): ``t`` or a lines
    schedule, and one SFT without a scale of its own."""
    method = recipe.method
    lines = getattr(recipe.schedule, "preset", None) == "lines"
    if recipe.t is None and not lines:
        raise ValueError(f"t: required for method {method} (share of the base, 0..1)")
    if lines and recipe.t is not None and not _is_rules(recipe.t):
        raise ValueError("t: with schedule lines, t may only be rules ({match, value}) that override "
                         "the schedule for the tensors they match")
    if len(recipe.sft) != 1:
        raise ValueError(f"sft: method {method} takes exactly one SFT model")
    if recipe.sft[0].scale is not None:
        raise ValueError("sft.0.scale: only for method task_arithmetic")


def _is_rules(value) -> bool:
    return isinstance(value, list) and bool(value) and hasattr(value[0], "match")


INTERPOLATION_LEGEND = "t (share of the base: 0 = SFT, 1 = base)"


def _plan(recipe, values, name: str) -> Planned:
    t = values.t_of(name)
    if t == 0:
        return Planned(Copy((PRIMARY,)), f"{t:g}", t)
    return Planned(Linear((PRIMARY, BASE), (1.0 - t, t)), f"{t:g}", t)


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    order = recipe.model_refs()
    keys = recipe.keys()
    weights = tuple(resolver.value("weight", name, ref) for ref in order)
    normalize = resolver.value("normalize", name)
    op = Linear(tuple(keys[r] for r in order), weights, normalize=normalize, sum_then_divide=True,
                working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, "/".join(f"{w:g}" for w in weights) + ("" if normalize else " (sum)"))


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    """mergekit linear over base_model and one other model as our ``t = w_base / (w_base + w_other)``."""
    refs = recipe.model_refs()
    if recipe.base_model is None or len(refs) != 2:
        problems.append("linear over models other than base_model plus exactly one other model (our linear "
                        "interpolates one SFT with its base; name the base with base_model)")
        return
    other = next(r for r in refs if r != recipe.base_model)
    w_base, w_other = chains.scalar("weight", recipe.base_model), chains.scalar("weight", other)
    normalize = chains.scalar("normalize", None)
    if w_base is None or w_other is None or normalize is None:
        problems.append("linear with per-tensor weights or normalize (gradients/filters): t = w_base / "
                        "(w_base + w_other) is not a rule of its own")
        return
    if normalize:
        if w_base + w_other == 0:
            problems.append("linear weights summing to 0")
            return
        t = w_base / (w_base + w_other)
    elif abs(w_base + w_other - 1) < 1e-12:
        t = w_base
    else:
        problems.append(f"linear with normalize: false and weights summing to {w_base + w_other:g} (not 1)")
        return
    fields.update(method="linear", base=recipe.base_model, sft=[other], t=t)


SPEC = MethodSpec(
    name="linear",
    operation=Linear,
    kernel=LinearKernel(),
    params=InterpolationParams,
    check_recipe=check_interpolation,
    plan=_plan,
    legend=lambda recipe: INTERPOLATION_LEGEND,
    describe=lambda t: f"Linear interpolation `W = (1-t)*W_sft + t*W_base`, per tensor. {t}",
    mergekit=(MergekitVariant("linear", (ParamSpec("weight", "input", required=True),
                                         ParamSpec("normalize", "shared", True))),),
    lora_note=("for LoRA-targeted tensors this linear merge is exactly W_base + (1-t)*s*B@A, computed "
              "tensor by tensor without materialising the merged model"),
    plan_mergekit=_plan_mergekit,
    convert=_convert,
    mergekit_legend="mergekit weight of each model ({order})",
    sweepable=True,
    python_params=("t",),
)
