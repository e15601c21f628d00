"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local): keep the base where no model changed, take a
delta only one model has, average the deltas several models share.

mergekit 0.1.5 semantics (base required; ``epsilon`` default 1e-5), per tensor, ``d_i = X_i - B`` flattened:

- ``c_i = |d_i| > epsilon`` (an entry "changed"); ``n = sum_i c_i`` (how many models changed it);
  ``d_i' = d_i * c_i``; ``unique = (n == 1)``, ``shared = (n > 1)``.
- ``ram``: ``W = B + sum_i (d_i' * unique + d_i' * shared / max(n, 1))``: the lone delta where one model
  changed the entry, the mean of the changed deltas where several did, the base elsewhere (including
  entries every model changed by at most ``epsilon``).
- ``ramplus_tl`` (``r`` default 0.1, ``alpha`` default 0.2): per model, over the whole tensor,
  ``rho_i = #(c_i & shared) / max(#(c_i & unique), epsilon)``, ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``
  and the lone deltas are scaled by ``lambda_i``: ``W = B + sum_i (lambda_i d_i' unique + d_i' shared / n)``.
  Quirk: ``lambda`` is float32, so for bfloat16 or float16 inputs the sum and the result are float32
  (mergekit casts to ``out_dtype``, if set, only when writing).

Streaming: ``ram`` is elementwise (no statistics pass). ``ramplus_tl`` needs one statistics pass of integer
counts per model (``ram_counts`` per chunk, summed: exact), then the elementwise apply pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from ..params import Bool, Number
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned

DEFAULT_EPSILON = 1e-5


def ram_masks(deltas: torch.Tensor, epsilon: float = DEFAULT_EPSILON
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For stacked flat deltas ``[N, n]``: ``(changed [N, n], count [1, n], unique [1, n], shared [1, n])``."""
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return changed, count, count == 1, count > 1


def ram_counts(changed: torch.Tensor, unique: torch.Tensor, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model: ``(#entries it changed that others changed too, #entries only it changed)`` (int64)."""
    return (changed & shared).sum(dim=1), (changed & unique).sum(dim=1)


def ramplus_lambdas(shared_counts: torch.Tensor, unique_counts: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
                    epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` (float32)."""
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def _stacked(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)


def ram_combine(base: torch.Tensor, deltas: torch.Tensor, masks, lambdas: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``B + sum_i (lambda_i d_i' unique + d_i' shared / max(n, 1))`` (``lambdas`` None: plain RAM)."""
    changed, count, unique, shared = masks
    kept = deltas * changed
    lone = kept * unique if lambdas is None else kept * unique * lambdas.unsqueeze(-1)
    merged = (lone + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """mergekit's ``ram`` on whole tensors."""
    if not tensors:
        return base
    deltas = _stacked(base, tensors)
    return ram_combine(base, deltas, ram_masks(deltas, epsilon))


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """mergekit's ``ramplus_tl`` on whole tensors: counts -> lambdas -> combine."""
    if not tensors:
        return base
    deltas = _stacked(base, tensors)
    masks = ram_masks(deltas, epsilon)
    lambdas = ramplus_lambdas(*ram_counts(masks[0], masks[2], masks[3]), r=r, alpha=alpha, epsilon=epsilon)
    return ram_combine(base, deltas, masks, lambdas)


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class Ram(Operation):
    """RAM over ``inputs = (base, models...)``; ``plus``: RAM+ tensor-local with ``r``, ``alpha``;
    ``float32_written``: write the float32 result RAM+ gives for narrower inputs (mergekit without
    ``out_dtype``)."""

    kind: ClassVar[str] = "ram"
    computes_in_working_dtype: ClassVar[bool] = True
    epsilon: float = DEFAULT_EPSILON
    plus: bool = False
    r: float = 0.1
    alpha: float = 0.2
    working_dtype: str | None = None
    float32_written: bool = False

    def preserves_equal_inputs(self) -> bool:
        return not (self.plus and self.working_dtype is not None)  # RAM+ widens mergekit's bf16 math

    def result_dtype(self, working):
        if self.plus and working is not None:  # its float32 lambdas promote the sum
            return torch.promote_types(working, torch.float32)
        return working

    def writes_result_dtype(self) -> bool:
        return self.float32_written


class RamKernel(KernelBase):
    """RAM: elementwise, one pass. RAM+: a statistics pass sums each model's shared/unique counts over the
    tensor (integers: exact for any chunking), then the elementwise pass with the lambdas."""

    def passes(self, op):
        return 1 if op.plus else 0

    def buffer_bytes(self, op, elems):
        n = len(op.inputs) - 1
        return (4 * n + 4) * elems * 4  # stacked deltas, masks and the terms of the sum

    def prepare(self, job, reader):
        op = job.op
        if not op.plus:
            return None
        shared = unique = None
        for xs in reader.passes()():
            changed, _, one, many = ram_masks(_stacked(xs[0], xs[1:]), op.epsilon)
            s, u = ram_counts(changed, one, many)
            shared, unique = (s, u) if shared is None else (shared + s, unique + u)
        return ramplus_lambdas(shared, unique, r=op.r, alpha=op.alpha, epsilon=op.epsilon)

    def apply(self, job, xs, state, chunk, reader):
        deltas = _stacked(xs[0], xs[1:])
        return ram_combine(xs[0], deltas, ram_masks(deltas, job.op.epsilon), state)


class RamParams(BaseModel):
    """Our recipe's parameters of RAM: ``epsilon`` (a change above it counts), ``plus`` (RAM+ tensor-local)
    with its ``r`` and ``alpha``."""

    epsilon: Number = Field(DEFAULT_EPSILON, ge=0, allow_inf_nan=False,
                            description="ram: an entry counts as changed when |W_sft - W_base| > epsilon")
    plus: Bool = Field(False, description="ram: RAM+ (tensor-local): lone deltas scaled by 1 + r*min(rho, alpha)")
    r: Number | None = Field(None, allow_inf_nan=False, description="ram plus: r (default 0.1)")
    alpha: Number | None = Field(None, allow_inf_nan=False, description="ram plus: alpha (default 0.2)")


def _check_recipe(recipe) -> None:
    if any(s.scale is not None for s in recipe.sft):
        raise ValueError("sft.scale: only for method task_arithmetic (ram takes every delta whole)")
    if recipe.schedule is not None:
        raise ValueError("schedule: not for method ram (it has no t or scale to schedule)")
    if not recipe.plus and (recipe.r is not None or recipe.alpha is not None):
        raise ValueError("r/alpha: only with plus: true (RAM+); add plus: true or remove them")


def _plan(recipe, values, name: str) -> Planned:
    n = len(recipe.sft)
    op = Ram(("base",) + tuple(f"sft{i}" for i in range(n)), epsilon=float(recipe.epsilon), plus=bool(recipe.plus),
             r=0.1 if recipe.r is None else float(recipe.r), alpha=0.2 if recipe.alpha is None else float(recipe.alpha))
    return Planned(op, f"eps={op.epsilon:g}" + (f" r={op.r:g} alpha={op.alpha:g}" if op.plus else ""))


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if not others:
        return Planned(Copy(("base",)), "base")
    plus = variant.name == "ramplus_tl"
    epsilon = resolver.value("epsilon", name)
    extra = dict(r=resolver.value("r", name), alpha=resolver.value("alpha", name)) if plus else {}
    op = Ram(("base",) + tuple(keys[r] for r in others), epsilon=epsilon, plus=plus, **extra,
             working_dtype=recipe.working_dtype or "inputs", float32_written=plus and recipe.out_dtype is None)
    return Planned(op, f"eps={epsilon:g}" + (f" r={op.r:g} alpha={op.alpha:g}" if plus else ""))


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError(f"base_model: {variant.name} needs base_model (the model the deltas are taken from)")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    names = ("epsilon", "r", "alpha") if variant.name == "ramplus_tl" else ("epsilon",)
    got = {n: chains.scalar(n, None) for n in names}
    if None in got.values():
        problems.append(f"{variant.name} with per-tensor {'/'.join(names)} (gradients or filters)")
        return
    fields.update(method="ram", base=recipe.base_model, sft=others, epsilon=got["epsilon"])
    if variant.name == "ramplus_tl":
        fields.update(plus=True, r=got["r"], alpha=got["alpha"])
        notes.append("ram plus computes in float32 here; mergekit computes in the checkpoints' dtype and writes "
                     "float32 tensors for bfloat16 inputs")
    else:
        notes.append("ram computes in float32 here; mergekit computes in the checkpoints' dtype")


_RAM_PARAMS = (ParamSpec("epsilon", "shared", DEFAULT_EPSILON),)

SPEC = MethodSpec(
    name="ram",
    operation=Ram,
    kernel=RamKernel(),
    params=RamParams,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "epsilon (a change above it counts)" + (", r, alpha (RAM+)" if recipe.plus else ""),
    describe=lambda t: ("RAM per entry, d_i = W_sft_i - W_base, c_i = |d_i| > epsilon, n = sum_i c_i: "
                        "`W = W_base + sum_i c_i*d_i*([n = 1]*lambda_i + [n > 1]/n)`: the base where no SFT changed "
                        "the entry, a lone change taken whole, shared changes averaged (lambda_i = 1; RAM+: "
                        "`1 + r*clamp(rho_i, 0, alpha)`, rho_i = model i's shared/unique counts over the tensor)."),
    mergekit=(MergekitVariant("ram", _RAM_PARAMS),
              MergekitVariant("ramplus_tl", _RAM_PARAMS + (ParamSpec("r", "shared", 0.1),
                                                           ParamSpec("alpha", "shared", 0.2)))),
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="epsilon (r, alpha for ramplus_tl)",
    python_params=("epsilon", "plus", "r", "alpha"),
)
