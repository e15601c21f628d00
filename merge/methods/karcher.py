"""Karcher (Riemannian) mean of tensors on the unit hypersphere, rescaled by their mean norm.

mergekit 0.1.5 semantics (``karcher``: every input, base included when it is among the models, with equal
weights ``1/N``; ``max_iter`` default 10, ``tol`` default 1e-5). Norms are taken in float32 (float64 for
float64 inputs); the unit vectors and iterates stay in the inputs' dtype, each tensor a flat vector:

- one input: itself. ``n_i = |X_i|``; ``u_i = X_i / n_i`` (zero where ``n_i = 0``).
- valid inputs: ``n_i > tol``; none valid: zeros. Their weights are renormalised: ``a_i = w_i / sum``.
- start: ``m = sum_i a_i u_i`` normalised (the first valid ``u_i`` when ``|m| < tol``).
- up to ``max_iter`` times: ``g = sum_i a_i (theta_i / sin theta_i) (u_i - cos_i m)`` over the inputs with
  ``theta_i = acos(clamp(m . u_i, -1, 1)) >= tol``; stop when ``|g| < tol``; else
  ``m = cos|g| m + sin|g| g / |g|``, renormalised when its norm exceeds ``tol``.
- ``W = (sum_i w_i n_i) m``, with the original (not renormalised) weights over all inputs.

Streaming: every iteration needs dot products of the current mean with every input over the whole tensor.
All iterates stay in the span of the inputs, so a kernel needs one statistics pass (the N x N Gram matrix),
runs the iteration on N coefficients, and applies ``W = sum_i c_i X_i`` in one pass; that agrees with the
whole-tensor iteration to rounding (mergekit rounds each iterate to the input dtype, the Gram form does not).
This module gives the whole-tensor reference; the Gram form is :func:`karcher_coefficients`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..params import Int, Number
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .gram import BLOCK, gram_of

DEFAULT_MAX_ITER = 10
DEFAULT_TOL = 1e-5


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                 max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL) -> torch.Tensor:
    """The weighted Karcher mean of the module docstring (``weights`` default: ``1/N`` each)."""
    if len(tensors) == 1:
        return tensors[0]
    weights = [1.0 / len(tensors)] * len(tensors) if weights is None else list(weights)
    norm_dtype = _norm_dtype(tensors[0].dtype)
    norms = [torch.linalg.vector_norm(x.to(norm_dtype)) for x in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    units = [(tensors[i] / norms[i]).to(tensors[i].dtype) for i in valid]

    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    mean = _normalized(mean, norm_dtype, tol, fallback=units[0])
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(norm_dtype))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(w * n for w, n in zip(weights, norms)) * mean


def _normalized(v: torch.Tensor, norm_dtype: torch.dtype, tol: float, fallback: torch.Tensor) -> torch.Tensor:
    length = torch.linalg.vector_norm(v.to(norm_dtype))
    return fallback.clone() if length.item() < tol else (v / length).to(v.dtype)


def karcher_gram(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunk-additive statistics: ``G[i, j] = X_i . X_j`` in float64 for this chunk (sum over chunks)."""
    x = torch.stack([t.reshape(-1) for t in tensors]).to(torch.float64)
    return x @ x.T


def karcher_coefficients(gram: torch.Tensor, weights: Sequence[float] | None = None,
                         max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL) -> list[float]:
    """``c`` with ``W = sum_i c_i X_i``: the iteration of :func:`karcher_mean` run on coefficient vectors over
    the inputs (``m = sum_i k_i X_i``, ``m . u_j = (G k)_j / n_j``, ``|m|^2 = k^T G k``), in float64."""
    gram = gram.to(torch.float64).cpu()
    n = gram.shape[0]
    weights = [1.0 / n] * n if weights is None else list(weights)
    if n == 1:
        return [1.0]
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = sum(weights[i] for i in valid)
    alphas = {i: weights[i] / total for i in valid}
    unit = {i: torch.eye(n, dtype=torch.float64)[i] / norms[i] for i in valid}  # u_i in input coordinates

    def length(k: torch.Tensor) -> float:
        return math.sqrt(max(float(k @ gram @ k), 0.0))

    mean = sum(alphas[i] * unit[i] for i in valid)
    mean = unit[valid[0]].clone() if length(mean) < tol else mean / length(mean)
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            cos = max(-1.0, min(1.0, float(mean @ gram @ unit[i])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += alphas[i] * (theta / math.sin(theta)) * (unit[i] - cos * mean)
        step = length(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        if length(mean) > tol:
            mean = mean / length(mean)
    scale = sum(w * nm for w, nm in zip(weights, norms))
    return (scale * mean).tolist()


# -- the method: operation, kernel and mergekit bindings --------------------------------------------------------
@dataclass(frozen=True)
class Karcher(Operation):
    """The Karcher mean of every input (equal weights ``1/N``), ``W = sum_i c_i X_i`` with ``c`` from the
    iteration on the Gram matrix (:func:`karcher_coefficients`)."""

    kind: ClassVar[str] = "karcher"
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    working_dtype: str | None = None


class KarcherKernel(KernelBase):
    """One statistics pass (the inputs' float64 Gram matrix), the iteration on N coefficients, then
    ``sum_i c_i X_i`` per chunk."""

    def passes(self, op):
        return 1

    def buffer_bytes(self, op, elems):
        return (len(op.inputs) + 1) * BLOCK * 8

    def prepare(self, job, reader):
        n = len(job.op.inputs)
        gram = gram_of(reader.passes(stored=True))
        gram = torch.zeros(n, n, dtype=torch.float64) if gram is None else gram.cpu()
        return karcher_coefficients(gram, None, int(job.op.max_iter), float(job.op.tol))

    def apply(self, job, xs, state, chunk, reader):
        out = xs[0].mul_(state[0])
        for c, x in zip(state[1:], xs[1:]):
            out.add_(x, alpha=c)
        return out


class KarcherParams(BaseModel):
    """Our recipe's parameters of the Karcher mean (of the SFTs and the base, equal weights)."""

    max_iter: Int = Field(DEFAULT_MAX_ITER, ge=1, description="karcher: most iterations")
    tol: Number = Field(DEFAULT_TOL, gt=0, allow_inf_nan=False, description="karcher: convergence tolerance")


def _check_recipe(recipe) -> None:
    for i, s in enumerate(recipe.sft):
        if s.scale is not None:
            raise ValueError(f"sft.{i}.scale: only for method task_arithmetic (karcher weighs every input 1/N)")
    if recipe.schedule is not None:
        raise ValueError("schedule: karcher has no t or scale for a schedule to set; remove it")


def _plan(recipe, values, name: str) -> Planned:
    inputs = tuple(f"sft{i}" for i in range(len(recipe.sft))) + ("base",)
    return Planned(Karcher(inputs, max_iter=int(recipe.max_iter), tol=float(recipe.tol)), f"{len(inputs)} inputs")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    max_iter, tol = chains.scalar("max_iter", None), chains.scalar("tol", None)
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if recipe.base_model is None or not others:
        problems.append("karcher without base_model (our karcher is the mean of the SFTs and their base)")
    elif max_iter is None or tol is None:
        problems.append("karcher with per-tensor max_iter or tol (gradients or filters)")
    else:
        fields.update(method="karcher", base=recipe.base_model, sft=others, max_iter=int(max_iter), tol=tol)
        if recipe.base_model in recipe.source_refs() and recipe.source_refs()[-1] != recipe.base_model:
            notes.append("karcher: mergeback takes the base last among the inputs; mergekit in the order listed "
                         "(the mean is the same up to rounding)")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    refs = recipe.model_refs()
    if len(refs) == 1:
        return Planned(Copy((keys[refs[0]],)), "1 input")
    max_iter = resolver.value("max_iter", name)
    if max_iter != int(max_iter):
        from ..errors import InputError
        raise InputError(f"parameters: max_iter must be a whole number, got {max_iter:g}")
    op = Karcher(tuple(keys[r] for r in refs), max_iter=int(max_iter), tol=resolver.value("tol", name),
                 working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{len(refs)} inputs")


SPEC = MethodSpec(
    name="karcher",
    operation=Karcher,
    kernel=KarcherKernel(),
    params=KarcherParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "karcher: the SFTs and the base, weight 1/N each",
    describe=lambda t: ("Karcher (Riemannian) mean per tensor of the inputs on the unit hypersphere, rescaled by "
                        "their mean norm: `W = (sum_i |X_i|/N) * m`, `m` the point minimising "
                        "`sum_i angle(m, X_i)^2`."),
    mergekit=(MergekitVariant("karcher", (ParamSpec("max_iter", "shared", DEFAULT_MAX_ITER),
                                          ParamSpec("tol", "shared", DEFAULT_TOL))),),
    lora_note="The Karcher mean runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    convert=_convert,
    mergekit_legend="karcher: every model, base_model included, weight 1/N",
    python_params=("max_iter", "tol"),
)
