"""Spherical linear interpolation between two tensors, treated as flat vectors."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..keys import BASE, PRIMARY
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .linear import INTERPOLATION_LEGEND, InterpolationParams, check_interpolation, linear

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpCoefficients:
    """``W = a * W_from + b * W_to``; ``spherical`` says which branch ran; ``angle`` is in degrees."""

    a: float
    b: float
    spherical: bool
    angle: float


def slerp_partial_sums(x: torch.Tensor, y: torch.Tensor, acc: torch.Tensor | None = None,
                       block: int = 1 << 17) -> torch.Tensor:
    """Add ``(x.y, x.x, y.y)`` of flat ``x``, ``y`` to ``acc`` (float64, shape [3]; a new one when None).

    Computed in float64 block by block (two float64 buffers of ``block`` elements, small enough to stay in
    cache), and summed block after block: a tensor walked in chunks that are multiples of ``block`` gives the
    same bits as the whole tensor at once.
    """
    x, y = x.reshape(-1), y.reshape(-1)
    n = x.numel()
    acc = torch.zeros(3, dtype=torch.float64, device=x.device) if acc is None else acc
    bx = torch.empty(min(n, block), dtype=torch.float64, device=x.device)
    by = torch.empty_like(bx)
    for i in range(0, n, block):
        j = min(n, i + block)
        a, b = bx[:j - i].copy_(x[i:j]), by[:j - i].copy_(y[i:j])
        acc.add_(torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)]))
    return acc


def slerp_coefficients(dot: float, sq_from: float, sq_to: float, t: float,
                       zero_norm: str = "linear") -> SlerpCoefficients:
    """Coefficients of spherical interpolation from ``W_from`` (t=0) to ``W_to`` (t=1).

    ``cos = dot / (|from| |to|)``, ``theta = arccos(cos)``;
    ``a = sin((1 - t) * theta) / sin(theta)``, ``b = sin(t * theta) / sin(theta)``.
    Falls back to linear interpolation ``a = 1 - t, b = t`` when ``|cos| > 0.9995`` or (``zero_norm="linear"``)
    a norm is ~0. ``zero_norm="unit"`` is mergekit's rule: a norm below 1e-8 counts as 1, so a zero tensor
    gives cos = 0 and the spherical branch with theta = pi/2 (``slerp(0, x, 0.5) = 0.707 x``).
    """
    norm_from, norm_to = math.sqrt(sq_from), math.sqrt(sq_to)
    if zero_norm == "unit":
        norm_from = norm_from if norm_from > EPS else 1.0
        norm_to = norm_to if norm_to > EPS else 1.0
    elif norm_from < EPS or norm_to < EPS:
        return SlerpCoefficients(1.0 - t, t, False, 0.0)
    cos = max(-1.0, min(1.0, dot / (norm_from * norm_to)))
    theta = math.acos(cos)
    if abs(cos) > DOT_THRESHOLD:
        return SlerpCoefficients(1.0 - t, t, False, math.degrees(theta))
    sin_theta = math.sin(theta)
    a = math.sin((1.0 - t) * theta) / sin_theta
    b = math.sin(t * theta) / sin_theta
    return SlerpCoefficients(a, b, True, math.degrees(theta))


def slerp_statistics(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
    """``(x.y, x.x, y.y)`` over the chunk pairs of a walk over two tensors (see :func:`slerp_partial_sums`):
    the statistics the executor, the in-place sweep model and ``inspect`` all compute this way."""
    acc = None
    for x, y in pairs:
        acc = slerp_partial_sums(x, y, acc)
    return (0.0, 0.0, 0.0) if acc is None else tuple(acc.tolist())


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class Slerp(Operation):
    """SLERP from ``inputs[0]`` (t=0) to ``inputs[1]`` (t=1); ``zero_norm``: see :func:`slerp_coefficients`."""

    kind: ClassVar[str] = "slerp"
    t: float = 0.0
    zero_norm: str = "linear"
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return True


def coefficients(op: Slerp, sums: tuple[float, float, float]) -> SlerpCoefficients:
    """``op``'s coefficients from the statistics of its two inputs."""
    return slerp_coefficients(*sums, float(op.t), zero_norm=op.zero_norm)


def combine(c: SlerpCoefficients, xs: list[torch.Tensor]) -> torch.Tensor:
    """One chunk: ``a * from + b * to`` (scaled in place, result in ``xs[0]``)."""
    return linear(xs, [c.a, c.b], out=xs[0], scratch=True)


class SlerpKernel(KernelBase):
    """A statistics pass over the stored inputs (float64 partial sums, exact for any float), then
    ``a * from + b * to`` per chunk; reports the coefficients (branch and angle)."""

    statistic = "slerp"

    def passes(self, op):
        return 1

    def prepare(self, job, reader):
        return coefficients(job.op, slerp_statistics(reader.passes(stored=True)()))

    def apply(self, job, xs, state, chunk, reader):
        return combine(state, xs)

    def report(self, state):
        return state


def _plan(recipe, values, name: str) -> Planned:
    t = values.t_of(name)
    if t == 0:
        return Planned(Copy((PRIMARY,)), f"{t:g}", t)
    return Planned(Slerp((PRIMARY, BASE), t=t), f"{t:g}", t)


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    t = resolver.value("t", name)
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    op = Slerp((BASE, recipe.keys()[other]), t=t, zero_norm="unit", working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, f"{t:g}", 1.0 - t)  # the summary speaks of the share of the base


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError("base_model: slerp needs base_model (t=0 gives base_model)")
    refs = recipe.model_refs()
    if len(refs) != 2:
        raise ValueError(f"models: slerp takes exactly two models (base_model and one other), got {len(refs)}")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    fields.update(method="slerp", base=recipe.base_model, sft=[other], t=chains.value("t", None, lambda v: 1.0 - v))
    notes.append("slerp of an all-zero tensor: mergekit takes the spherical branch (0.707*x at t=0.5), "
                 "mergeback falls back to linear")


def _report(summary) -> list[str]:
    if summary.dry_run:
        return ["slerp: each tensor's angle between the two inputs is computed while merging; nearly "
                "parallel tensors (|cos| > 0.9995) will be interpolated linearly, the others spherically "
                "(the merge reports how many took each branch and the largest angle; `merge inspect --t` "
                "predicts them)"]
    return [f"slerp: {summary.spherical} tensors took the spherical branch, {summary.linear_fallback} fell "
            f"back to linear; largest angle {summary.max_angle:.3f} deg"]


SPEC = MethodSpec(
    name="slerp",
    operation=Slerp,
    kernel=SlerpKernel(),
    params=InterpolationParams,
    check_recipe=check_interpolation,
    plan=_plan,
    legend=lambda recipe: INTERPOLATION_LEGEND,
    describe=lambda t: ("Spherical interpolation per tensor, from the SFT (t=0) towards the base (t=1), on the raw "
                        "flattened tensors; it falls back to linear interpolation when the two tensors are nearly "
                        f"parallel (|cos| > 0.9995) or one is ~0. {t}"),
    report=_report,
    mergekit=(MergekitVariant("slerp", (ParamSpec("t", "shared", required=True),)),),
    lora_note="SLERP runs on the materialised W_base + s*B@A of each targeted tensor",
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="mergekit t (share of the non-base model: 0 = base_model)",
    sweepable=True,
    python_params=("t",),
)
