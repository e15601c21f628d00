"""Passthrough: copy one input's tensor, optionally multiplied by ``scale``.

mergekit 0.1.5 semantics (at most one input per output tensor, as in frankenmerge ``slices``; ``scale`` is
a per-input parameter, default none): ``W = X`` when ``scale`` is unset, else ``W = X * scale``, rounded
once in the input dtype (for bfloat16 the product of the bf16 value and the Python float, rounded to bf16).
``scale: 0`` zeroes a tensor (mergekit users zero e.g. ``o_proj``/``down_proj`` of repeated layers).

Streaming: elementwise; any chunking works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``X`` itself (no copy) when ``scale`` is None, else ``X * scale``."""
    return tensor if scale is None else tensor * scale


# -- the method: operation, kernel and mergekit bindings --------------------------------------------------------
@dataclass(frozen=True)
class Passthrough(Operation):
    """``inputs[0] * scale``, computed in the working dtype (one rounding, as mergekit)."""

    kind: ClassVar[str] = "passthrough"
    computes_in_working_dtype: ClassVar[bool] = True
    scale: float = 1.0
    working_dtype: str | None = None


class PassthroughKernel(KernelBase):
    """Elementwise, one pass: ``W = X * scale``."""

    def apply(self, job, xs, state, chunk, reader):
        return xs[0].mul_(float(job.op.scale))


def slice_source(recipe, resolver, name: str) -> str:
    """The model a passthrough tensor comes from: the only model of ``models:``, else the one source of the
    slice the tensor falls in (embeddings: the first slice, tensors after the layers: the last)."""
    if recipe.slices is None:
        return recipe.models[0].model
    return recipe.slices[resolver.position(name).slice_index].sources[0].model


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    ref = slice_source(recipe, resolver, name)
    key = recipe.keys()[ref]
    scale = resolver.value("scale", name, ref)
    if scale is None:
        return Planned(Copy((key,)), ref)
    op = Passthrough((key,), scale=scale, working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{ref} x{scale:g}")


def _check_mergekit(variant, recipe) -> None:
    blocks = [("models", [m.model for m in recipe.models])] if recipe.models is not None else \
        [(f"slices.{i}.sources", [s.model for s in sl.sources]) for i, sl in enumerate(recipe.slices)]
    for where, refs in blocks:
        if len(refs) != 1:
            raise ValueError(f"{where}: passthrough takes exactly one model per tensor, got {len(refs)} (merge them "
                             "with another method, or give each slice one source)")
        if recipe.base_model is not None and recipe.base_model != refs[0]:
            raise ValueError(f"base_model: passthrough takes one model per tensor and mergekit adds base_model to "
                             f"the inputs ({where} takes {refs[0]!r}); remove base_model")


def _check_recipe(recipe) -> None:
    raise ValueError("method passthrough: only in mergekit recipes (merge_method: passthrough); in mergeback's "
                     "format a copy of the SFT is t=0 of linear, a scaled one task_arithmetic")


SPEC = MethodSpec(
    name="passthrough",
    operation=Passthrough,
    kernel=PassthroughKernel(),
    check_recipe=_check_recipe,
    plan=lambda recipe, values, name: Planned(Copy(("sft0",)), "copy"),
    legend=lambda recipe: "model the tensor is copied from",
    describe=lambda t: "Passthrough: each tensor copied from one model, `W = X` or `W = scale * X`.",
    mergekit=(MergekitVariant("passthrough", (ParamSpec("scale", "input", None),)),),
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    mergekit_legend="the model each tensor comes from (x scale)",
    slice_sources_vary=True,
)
