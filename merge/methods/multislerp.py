"""Multi-SLERP: barycentric interpolation of several tensors (or deltas from a base) on the hypersphere.

mergekit 0.1.5 semantics (non-base models with a ``weight`` each; base optional; ``normalize_weights``
default true; ``eps`` default 1e-8), in the inputs' dtype, each tensor flattened to one vector ``x_i``
(``x_i = X_i - B`` with a base):

- one model: ``X_1`` itself (even with a base).
- ``w = w / sum(w)`` when ``normalize_weights``; ``n_i = |x_i|``; ``u_i = x_i / (n_i + eps)``.
- ``m = sum_i w_i u_i``; if ``|m| < eps``: with two models ``w_1 x_1 + w_2 x_2`` (+ B), else ``ValueError``.
- ``m^ = m / |m|``; tangent ``g = sum_i w_i (u_i - (u_i . m^) m^)``; ``s = |g| + eps``;
  ``r = m^ cos(s) + g sin(s) / s``; ``W = r * sum_i w_i n_i`` (+ B).

Quirk: ``sum_i w_i (u_i . m^) = m . m^ = |m|``, so ``g = m - |m| m^ = 0`` up to rounding: the tangent step
is a no-op and the result is ``(m / |m|) * sum_i w_i n_i``, the direction of the weighted mean of the unit
vectors with the weighted mean norm. :func:`multislerp_coefficients` uses that closed form.

Streaming: one statistics pass of the N x N Gram matrix ``G = x x^T`` (chunk-additive, float64), then
:func:`multislerp_coefficients` gives ``W = sum_i a_i x_i`` (+ B), an elementwise apply pass. It agrees with
the whole-tensor function to float32 rounding (the rounding noise mergekit's tangent step adds included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..errors import MergeError
from ..params import Number
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .gram import BLOCK, gram_of

EPS = 1e-8


def _weights(weights: Sequence[float], normalize: bool, like: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([float(x) for x in weights], dtype=like.dtype, device=like.device)
    return w / w.sum() if normalize else w


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = EPS) -> torch.Tensor:
    """mergekit's ``multislerp`` on whole tensors (the steps of the module docstring, in that order)."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(list(tensors))
    if base is not None:
        x = x - base
    flat = x.reshape(x.shape[0], -1)
    w = _weights(weights, normalize_weights, x)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs "
                             "with balancing weights); choose other weights")
        result = x[0] * w[0] + x[1] * w[1]
        return result if base is None else result + base
    direction = mean / mean_norm
    tangent = ((units - (units * direction).sum(-1, keepdim=True) * direction) * w.view(-1, 1)).sum(0)
    step = torch.norm(tangent) + eps
    result = direction * torch.cos(step) + tangent * (torch.sin(step) / step)
    result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return result if base is None else result + base


def multislerp_gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk-additive statistics: ``G[i, j] = x_i . x_j`` in float64 for this chunk (sum over chunks)."""
    x = torch.stack([(t if base is None else t - base).reshape(-1) for t in tensors]).to(torch.float64)
    return x @ x.T


def multislerp_coefficients(gram: torch.Tensor, weights: Sequence[float], normalize_weights: bool = True,
                            eps: float = EPS) -> list[float]:
    """``a_i`` with ``W = sum_i a_i x_i`` (+ B): ``a_i = w_i / (n_i + eps) / |m| * sum_j w_j n_j`` where
    ``n = sqrt(diag G)`` and ``|m|^2 = c^T G c``, ``c_i = w_i / (n_i + eps)``. Two models with ``|m| < eps``:
    ``a = w``; more: ``ValueError``. (One model is the identity; the caller handles it.)"""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum() if normalize_weights else w
    gram = gram.to(torch.float64).cpu()
    norms = gram.diagonal().clamp(min=0).sqrt()
    c = w / (norms + eps)
    mean_norm = float(c @ gram @ c) ** 0.5
    if mean_norm < eps:
        if len(w) != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs "
                             "with balancing weights); choose other weights")
        return w.tolist()
    return (c / mean_norm * float(w @ norms)).tolist()


# -- the method: operation, kernel and mergekit bindings --------------------------------------------------------
@dataclass(frozen=True)
class Multislerp(Operation):
    """Multi-SLERP of the models in ``inputs`` (after the base when ``with_base``: then of their deltas, added to
    the base), with one weight per model; ``W = sum_i a_i x_i`` (+ base), ``a`` from the Gram matrix."""

    kind: ClassVar[str] = "multislerp"
    weights: tuple[float, ...] = ()
    normalize_weights: bool = True
    eps: float = EPS
    with_base: bool = False
    working_dtype: str | None = None


class MultislerpKernel(KernelBase):
    """One statistics pass (the float64 Gram matrix of the vectors), then ``sum_i a_i x_i`` (+ base) per chunk."""

    def passes(self, op):
        return 1

    def buffer_bytes(self, op, elems):
        return (len(op.inputs) + 1) * BLOCK * 8

    def prepare(self, job, reader):
        op = job.op
        gram = gram_of(reader.passes(stored=True), origin_slot=0 if op.with_base else None)
        n = len(op.weights)
        gram = torch.zeros(n, n, dtype=torch.float64) if gram is None else gram.cpu()
        try:
            return multislerp_coefficients(gram, op.weights, op.normalize_weights, op.eps)
        except ValueError as e:
            raise MergeError(f"tensor {job.name!r}: {e}") from None

    def apply(self, job, xs, state, chunk, reader):
        if job.op.with_base:
            base, fine = xs[0], xs[1:]
            out = torch.zeros_like(base)
            for a, x in zip(state, fine):
                out.add_(x.sub_(base), alpha=a)
            return out.add_(base)
        out = xs[0].mul_(state[0])
        for a, x in zip(state[1:], xs[1:]):
            out.add_(x, alpha=a)
        return out


class MultislerpParams(BaseModel):
    """Our recipe's parameter of Multi-SLERP: the weight of each SFT's delta (default: equal)."""

    weights: list[Number] | None = Field(None, description="multislerp: the weight of each SFT (default equal)")


def _check_recipe(recipe) -> None:
    if len(recipe.sft) < 2:
        raise ValueError("sft: multislerp needs at least two SFTs (of one it is that SFT itself)")
    if recipe.weights is not None and len(recipe.weights) != len(recipe.sft):
        raise ValueError(f"weights: give one weight per SFT ({len(recipe.sft)}), got {len(recipe.weights)}")
    if recipe.weights is not None and abs(sum(recipe.weights)) < 1e-12:
        raise ValueError("weights: they sum to 0; multislerp divides by their sum")
    for i, s in enumerate(recipe.sft):
        if s.scale is not None:
            raise ValueError(f"sft.{i}.scale: only for method task_arithmetic (multislerp takes weights)")
    if recipe.schedule is not None:
        raise ValueError("schedule: multislerp has no t or scale for a schedule to set; remove it")


def _plan(recipe, values, name: str) -> Planned:
    n = len(recipe.sft)
    weights = tuple(float(w) for w in recipe.weights) if recipe.weights is not None else (1.0,) * n
    op = Multislerp(("base",) + tuple(f"sft{i}" for i in range(n)), weights, with_base=True)
    return Planned(op, "/".join(f"{w:g}" for w in weights))


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    weights = [chains.scalar("weight", r) for r in others]
    normalize, eps = chains.scalar("normalize_weights", None), chains.scalar("eps", None)
    if recipe.base_model is None or len(others) < 2:
        problems.append("multislerp without base_model or of fewer than two models (our multislerp spreads the "
                        "deltas of two or more SFTs from a base)")
    elif None in weights or normalize is None or eps is None:
        problems.append("multislerp with per-tensor weights or settings (gradients or filters)")
    elif not normalize or eps != EPS:
        problems.append("multislerp with normalize_weights: false or another eps (ours normalises the weights, "
                        "eps 1e-8)")
    else:
        fields.update(method="multislerp", base=recipe.base_model, sft=others, weights=weights)


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    weights = tuple(resolver.value("weight", name, r) for r in others)
    text = "/".join(f"{w:g}" for w in weights)
    if len(others) == 1:
        return Planned(Copy((keys[others[0]],)), text)
    with_base = recipe.base_model is not None
    op = Multislerp((("base",) if with_base else ()) + tuple(keys[r] for r in others), weights,
                    normalize_weights=bool(resolver.value("normalize_weights", name)),
                    eps=resolver.value("eps", name), with_base=with_base,
                    working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, text)


def _check_mergekit(variant, recipe) -> None:
    if not [r for r in recipe.model_refs() if r != recipe.base_model]:
        raise ValueError("models: multislerp needs at least one model besides base_model")


SPEC = MethodSpec(
    name="multislerp",
    operation=Multislerp,
    kernel=MultislerpKernel(),
    params=MultislerpParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "multislerp weight of each SFT's delta (sft0/sft1/...)",
    describe=lambda t: ("Multi-SLERP per tensor: the direction of the weighted mean of the unit (delta) vectors "
                        "times their weighted mean norm, `W = W_base + (m/|m|) * sum_i w_i |d_i|`, "
                        "`m = sum_i w_i d_i/|d_i|`."),
    mergekit=(MergekitVariant("multislerp", (ParamSpec("weight", "non_base", required=True),
                                             ParamSpec("normalize_weights", "shared", True),
                                             ParamSpec("eps", "shared", EPS))),),
    lora_note="Multi-SLERP runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="multislerp weight of each model",
    python_params=("weights",),
)
