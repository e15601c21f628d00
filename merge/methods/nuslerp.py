"""NuSLERP: spherical interpolation of two tensors (or of their deltas from a base), whole-tensor, per row
or per column.

mergekit 0.1.5 semantics (exactly two non-base models, each with a ``weight``; base optional; parameters
``nuslerp_flatten`` default **true**, ``nuslerp_row_wise`` default false), in the inputs' dtype:

- ``t = w_2 / (w_1 + w_2)`` (Python floats), or 0.5 when ``|w_1 + w_2| < 1e-6``; ``t = 0`` gives the first.
- vectors: the whole tensor flattened when ``nuslerp_flatten`` (then ``nuslerp_row_wise`` has **no
  effect**); otherwise slices along the last dim (rows of a 2-D weight), or, with ``nuslerp_row_wise``,
  slices along dim 0 (the *columns* of a 2-D weight, despite the name).
- per vector pair: ``u = v / max(|v|, 1e-7)``; ``cos = clamp(sum(u0 * u1), -1, 1)``; colinear where
  ``1 - cos**2 <= 1e-16``; ``theta = acos(cos)`` (acos(0) on colinear pairs);
  ``r = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``, and ``(1 - t) v0 + t v1`` where colinear.
  The coefficients multiply the raw vectors (norms are not interpolated).
- with a base: ``W = B + nuslerp(X_1 - B, X_2 - B)``; without: ``W = nuslerp(X_1, X_2)``.

Streaming: flattened, one statistics pass (the two norms and the dot product over the whole tensor) then an
elementwise apply pass with two scalar coefficients; last-dim vectors (``flatten`` false, ``row_wise``
false) are per row, so a chunk of whole rows needs no separate pass; ``row_wise`` (per column) needs one
statistics pass over all rows accumulating per-column norms and dots, then the apply pass
(:func:`nuslerp_partial_sums` per chunk, summed, then :func:`nuslerp_coefficients`). Statistics summed chunk
by chunk differ from mergekit's normalise-then-sum by rounding only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from ..params import Number, Value, finite_value
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .gram import BLOCK, gram_of

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
WEIGHT_EPS = 1e-6


def nuslerp_t(weight_first: float, weight_second: float) -> float:
    """``t = w_2 / (w_1 + w_2)``, 0.5 when the weights sum to ~0 (below 1e-6)."""
    total = weight_first + weight_second
    return 0.5 if abs(total) < WEIGHT_EPS else weight_second / total


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def nuslerp(v0: torch.Tensor, v1: torch.Tensor, t: float, row_wise: bool = False, flatten: bool = True
            ) -> torch.Tensor:
    """SLERP of ``v0`` (t=0) to ``v1`` (t=1) over the vectors chosen by ``flatten`` / ``row_wise`` (module
    docstring), with the linear fallback on colinear pairs; ``v0``'s shape."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_merge(first: torch.Tensor, second: torch.Tensor, weights: tuple[float, float],
                  base: torch.Tensor | None = None, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's ``nuslerp``: ``B + nuslerp(X_1 - B, X_2 - B, t)`` with a base, ``nuslerp(X_1, X_2, t)``
    without, ``t`` from :func:`nuslerp_t`."""
    t = nuslerp_t(*weights)
    if base is None:
        return nuslerp(first, second, t, row_wise, flatten)
    return base + nuslerp(first - base, second - base, t, row_wise, flatten)


def nuslerp_partial_sums(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Chunk-additive statistics of vector pairs along the last dim: ``[..., 3]`` float64 holding
    ``(v0 . v1, |v0|^2, |v1|^2)``. Flattened mode: pass flat chunks and sum; per-column mode: pass the
    transposed chunk (columns last) and sum over row chunks; per-row mode: one chunk of whole rows."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    return torch.stack([(a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)], dim=-1)


def nuslerp_coefficients(sums: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``S = a v0 + b v1`` per vector pair from :func:`nuslerp_partial_sums`:
    ``cos = dot / (max(|v0|, 1e-7) max(|v1|, 1e-7))`` clamped to [-1, 1]; ``a = sin((1 - t) theta) / sin theta``,
    ``b = sin(t theta) / sin theta``, or ``(1 - t, t)`` where ``1 - cos^2 <= 1e-16``. float64, shape ``[...]``."""
    dot, sq0, sq1 = sums.unbind(-1)
    cos = (dot / (sq0.sqrt().clamp(min=NORM_EPS) * sq1.sqrt().clamp(min=NORM_EPS))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.where(colinear, 1, torch.sin(theta))
    a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    b = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return a, b


# -- the method: operation, kernel and mergekit bindings --------------------------------------------------------
MODES = ("flat", "row", "column")


def nuslerp_mode(flatten: bool, row_wise: bool) -> str:
    """mergekit's two flags as one mode: ``flat`` (flatten; row_wise then has no effect), ``column``
    (row_wise: dim-0 slices, the columns of a 2-D weight) or ``row`` (last-dim slices)."""
    return "flat" if flatten else ("column" if row_wise else "row")


@dataclass(frozen=True)
class Nuslerp(Operation):
    """NuSLERP from the first to the second model (``t`` = share of the second); ``inputs`` are (first,
    second), or (base, first, second) with ``with_base`` (then the deltas are interpolated and added to the
    base); ``mode``: see :func:`nuslerp_mode`."""

    kind: ClassVar[str] = "nuslerp"
    t: float = 0.5
    mode: str = "flat"
    with_base: bool = False
    working_dtype: str | None = None


def _column_width(shape: tuple[int, ...]) -> int:
    """Elements per dim-0 slice: the vectors of the per-column mode run along dim 0 across them."""
    return math.prod(shape[1:]) if shape else 1


def _pair(op: Nuslerp, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two vectors interpolated (deltas from the base with a base; in place)."""
    if not op.with_base:
        return xs[0], xs[1]
    return xs[1].sub_(xs[0]), xs[2].sub_(xs[0])


def _column_sums(op: Nuslerp, walk, width: int) -> torch.Tensor:
    """Per-column ``(v0 . v1, |v0|^2, |v1|^2)`` (float64 ``[width, 3]``) summed over chunks of whole rows."""
    acc = None
    for xs in walk():
        xs = [x.to(torch.float64) for x in xs]
        v0, v1 = _pair(op, xs)
        sums = nuslerp_partial_sums(v0.reshape(-1, width).T, v1.reshape(-1, width).T)
        acc = sums if acc is None else acc.add_(sums)
    return acc


class NuslerpKernel(KernelBase):
    """flat: one statistics pass (float64 Gram sums of the two vectors) and two scalar coefficients; row: chunks
    of whole rows, each row's sums computed with its chunk; column: one statistics pass over chunks of whole
    rows accumulating per-column sums, then per-column coefficients. Every chunk is ``a v0 + b v1`` (+ base)."""

    def passes(self, op):
        return 0 if op.mode == "row" else 1

    def granule(self, op, shape):
        if op.mode == "row":
            return shape[-1] if shape else 1
        return _column_width(shape) if op.mode == "column" else 1

    def buffer_bytes(self, op, elems):
        return 4 * elems * 8 if op.mode != "flat" else 3 * BLOCK * 8

    def prepare(self, job, reader):
        op = job.op
        if op.mode == "row":
            return None
        if op.mode == "column":
            sums = _column_sums(op, reader.passes(stored=True), _column_width(job.shape))
        else:
            slots = [1, 2] if op.with_base else [0, 1]
            gram = gram_of(reader.passes(stored=True), origin_slot=0 if op.with_base else None, slots=slots)
            sums = torch.zeros(3, dtype=torch.float64) if gram is None else \
                torch.stack([gram[0, 1], gram[0, 0], gram[1, 1]]).cpu()
        return nuslerp_coefficients(sums.cpu(), float(op.t))

    def apply(self, job, xs, state, chunk, reader):
        op = job.op
        v0, v1 = _pair(op, xs)
        if op.mode == "row":
            width = job.shape[-1] if job.shape else 1
            a, b = nuslerp_coefficients(nuslerp_partial_sums(v0.reshape(-1, width), v1.reshape(-1, width)), float(op.t))
            a, b = a.unsqueeze(-1), b.unsqueeze(-1)
        else:
            a, b = state
        a, b = a.to(v0.dtype).to(v0.device), b.to(v0.dtype).to(v0.device)
        shape = v0.shape
        width = job.shape[-1] if op.mode == "row" and job.shape else (_column_width(job.shape) if op.mode == "column"
                                                                      else v0.numel())
        result = (a * v0.reshape(-1, width) + b * v1.reshape(-1, width)).reshape(shape)
        return result.add_(xs[0]) if op.with_base else result


VECTORS = {"tensor": "flat", "row": "row", "column": "column"}


class NuslerpParams(BaseModel):
    """Our recipe's parameters of NuSLERP: one SFT with ``t`` (share of the base), or two SFTs with ``weights``
    (their deltas from the base interpolated, ``t = w_2 / (w_1 + w_2)`` of the second); ``vectors``: whole
    tensors, rows, or columns (mergekit's ``nuslerp_row_wise``)."""

    t: Value | None = Field(None, description="nuslerp with one SFT: share of the base model: 0 = SFT, 1 = base")
    weights: list[Number] | None = Field(None, description="nuslerp with two SFTs: the weight of each")
    vectors: Literal["tensor", "row", "column"] = Field("tensor", description="nuslerp: vectors interpolated")

    @field_validator("t")
    @classmethod
    def _finite(cls, v):
        return finite_value(v)


def _check_recipe(recipe) -> None:
    for i, s in enumerate(recipe.sft):
        if s.scale is not None:
            raise ValueError(f"sft.{i}.scale: only for method task_arithmetic (nuslerp takes t or weights)")
    if len(recipe.sft) == 1:
        if recipe.weights is not None:
            raise ValueError("weights: nuslerp with one SFT interpolates it with the base by t; weights are for "
                             "two SFTs")
        if recipe.t is None and recipe.schedule is None:
            raise ValueError("t: required for nuslerp with one SFT (share of the base, 0..1)")
    elif len(recipe.sft) == 2:
        if recipe.t is not None or recipe.schedule is not None:
            key = "t" if recipe.t is not None else "schedule"
            raise ValueError(f"{key}: nuslerp with two SFTs interpolates their deltas by weights (t = w_2/(w_1+w_2) "
                             f"of the second); give weights: [w_1, w_2] instead of {key}")
        if recipe.weights is None or len(recipe.weights) != 2:
            raise ValueError("weights: nuslerp with two SFTs needs weights: [w_1, w_2], one per SFT")
    else:
        raise ValueError(f"sft: nuslerp takes one SFT (with t) or two (with weights), got {len(recipe.sft)}")


def _plan(recipe, values, name: str) -> Planned:
    mode = VECTORS[recipe.vectors]
    if len(recipe.sft) == 1:
        t = values.t_of(name)
        if t == 0:
            return Planned(Copy(("sft0",)), f"{t:g}", t)
        return Planned(Nuslerp(("sft0", "base"), t=t, mode=mode), f"{t:g}", t)
    t = nuslerp_t(*recipe.weights)
    return Planned(Nuslerp(("base", "sft0", "sft1"), t=t, mode=mode, with_base=True), f"{t:g} of sft1")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if recipe.base_model is None:
        problems.append("nuslerp without base_model (our format interpolates deltas from a base, or one SFT "
                        "with its base)")
        return
    weights = [chains.scalar("weight", r) for r in others]
    flatten, row_wise = chains.scalar("nuslerp_flatten", None), chains.scalar("nuslerp_row_wise", None)
    if None in weights or flatten is None or row_wise is None:
        problems.append("nuslerp with per-tensor weights or flags (gradients or filters)")
        return
    mode = nuslerp_mode(bool(flatten), bool(row_wise))
    fields.update(method="nuslerp", base=recipe.base_model, sft=others, weights=weights,
                  vectors={v: k for k, v in VECTORS.items()}[mode])


def _check_mergekit(variant, recipe) -> None:
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if len(others) != 2:
        raise ValueError(f"models: nuslerp takes exactly two models besides base_model, got {len(others)}")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    weights = tuple(resolver.value("weight", name, r) for r in others)
    t = nuslerp_t(*weights)
    mode = nuslerp_mode(bool(resolver.value("nuslerp_flatten", name)), bool(resolver.value("nuslerp_row_wise", name)))
    with_base = recipe.base_model is not None
    inputs = (("base",) if with_base else ()) + tuple(keys[r] for r in others)
    op = Nuslerp(inputs, t=t, mode=mode, with_base=with_base, working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{t:g} {mode}")


SPEC = MethodSpec(
    name="nuslerp",
    operation=Nuslerp,
    kernel=NuslerpKernel(),
    params=NuslerpParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: ("t (share of the base: 0 = SFT, 1 = base)" if len(recipe.sft) == 1 else
                           "nuslerp t (share of sft1's delta, from the weights)"),
    describe=lambda t: ("NuSLERP: spherical interpolation of two models (of their deltas from the base when there "
                        "is one), per tensor, row or column, `S = (sin((1-t)θ) v0 + sin(tθ) v1) / sin θ`. " + t),
    mergekit=(MergekitVariant("nuslerp", (ParamSpec("weight", "non_base", required=True),
                                          ParamSpec("nuslerp_flatten", "shared", True),
                                          ParamSpec("nuslerp_row_wise", "shared", False))),),
    lora_note="NuSLERP runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="nuslerp t = w_2/(w_1+w_2) (share of the second model) and vectors (flat/row/column)",
    python_params=("t", "weights", "vectors"),
)
