"""Arcee Fusion: take the fine-tuned entries whose importance is an upper outlier, keep the base elsewhere.

mergekit 0.1.5 semantics (exactly two inputs, the base ``B`` and one model ``X``; no parameters), in the
inputs' dtype:

- importance ``I = |X - B| * KL_row``, with ``KL_row = sum_last_dim p * log(p / q)`` per row (last dim),
  ``p = softmax(X) + 1e-8``, ``q = softmax(B) + 1e-8`` (softmax over the last dim, i.e. over each row).
- threshold ``tau = Q2 + 1.5 * (Q3 - Q1)``, where ``Q_k`` are order statistics of ``I`` flattened:
  ``sorted(I)[floor(q * (n - 1))]`` for ``q = 0.25, 0.5, 0.75`` (no interpolation). When ``I`` has more than
  1,000,000 entries, mergekit takes them from a sample of 1,000,000 entries drawn **with replacement** by
  ``torch.randint`` from the global RNG (``sample_size``/``generator`` here).
- ``W = B + (X - B) * [I >= tau]``.

Streaming: the softmax and KL need whole rows (a chunk of whole rows suffices for ``I``); the threshold needs
three order statistics of ``I`` over the whole tensor (one statistics pass: an exact rank selection, e.g.
:func:`merge.methods.sparsify.rank_cuts` on ``I >= 0``, or the sample mergekit draws), then an apply pass
that recomputes ``I`` per row chunk. Exact quantiles (``sample_size=None``) differ from mergekit's sampled
ones on tensors above 1e6 entries; below that they are the same order statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import KernelBase, MergekitVariant, MethodSpec, Operation, Planned

SOFTMAX_EPS = 1e-8
SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|X - B| * KL(softmax(X) + 1e-8 || softmax(B) + 1e-8)``, the KL per row (last dim, kept as size 1)."""
    p = F.softmax(other, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def order_statistics(values: torch.Tensor, quantiles=QUANTILES, sample_size: int | None = SAMPLE_SIZE,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``sorted(v)[floor(q * (n - 1))]`` per quantile (``q`` as float32), of ``v`` flattened, or of a sample of
    ``sample_size`` entries with replacement when ``v`` is larger (``sample_size`` None: never sample)."""
    flat = values.reshape(-1)
    if sample_size is not None and flat.numel() > sample_size:
        flat = flat[torch.randint(flat.numel(), (sample_size,), device=flat.device, generator=generator)]
    ordered = torch.sort(flat).values
    q = torch.tensor(quantiles, dtype=torch.float32)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def fusion_threshold(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """``tau = Q2 + 1.5 * (Q3 - Q1)``."""
    return median + 1.5 * (q3 - q1)


def fusion_apply(base: torch.Tensor, other: torch.Tensor, importance: torch.Tensor, threshold: torch.Tensor
                 ) -> torch.Tensor:
    """``B + (X - B) * [I >= tau]`` (the mask as float32, as mergekit multiplies it)."""
    return base + (other - base) * (importance >= threshold).float()


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, sample_size: int | None = SAMPLE_SIZE,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's ``arcee_fusion`` on whole tensors: importance -> quantile threshold -> apply."""
    importance = fusion_importance(base, other)
    threshold = fusion_threshold(*order_statistics(importance, sample_size=sample_size, generator=generator))
    return fusion_apply(base, other, importance, threshold)


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class ArceeFusion(Operation):
    """Arcee Fusion of ``inputs = (base, model)``; above ``sample_size`` entries the quantiles come from
    ``sample_size`` indices drawn with ``torch.randint`` from a CPU generator seeded with ``seed`` (what
    mergekit's global RNG gives after ``--random-seed seed`` for the first such tensor); ``float32_written``:
    write the float32 result as it is (mergekit without ``out_dtype``)."""

    kind: ClassVar[str] = "arcee_fusion"
    computes_in_working_dtype: ClassVar[bool] = True
    seed: int = 0
    sample_size: int = SAMPLE_SIZE
    working_dtype: str | None = None
    float32_written: bool = False

    def result_dtype(self, working):  # the float32 mask promotes the result
        return None if working is None else torch.promote_types(working, torch.float32)

    def writes_result_dtype(self) -> bool:
        return self.float32_written


def row_length(shape: tuple[int, ...]) -> int:
    """The softmax/KL row: the last dimension (a 0-d tensor is one row of one)."""
    return shape[-1] if shape else 1


def chunk_importance(job, xs: list[torch.Tensor]) -> torch.Tensor:
    """:func:`fusion_importance` of a chunk of whole rows, flat."""
    row = row_length(job.shape)
    base, other = xs[0].reshape(-1, row), xs[1].reshape(-1, row)
    return fusion_importance(base, other).reshape(-1)


def sampled_positions(n: int, op: ArceeFusion) -> torch.Tensor | None:
    """The flat positions whose importance gives the quantiles: None (all of them) up to ``sample_size``
    entries, else ``sample_size`` draws with replacement, sorted (the order of a sample does not change its
    order statistics)."""
    if n <= op.sample_size:
        return None
    g = torch.Generator().manual_seed(int(op.seed))
    return torch.sort(torch.randint(n, (op.sample_size,), generator=g)).values


class ArceeFusionKernel(KernelBase):
    """Whole rows per chunk (the KL is per row). One statistics pass computes each chunk's importance and keeps
    the sampled entries (every entry up to 1e6: exact order statistics, bounded memory); the threshold
    ``Q2 + 1.5 (Q3 - Q1)`` comes from them; the apply pass recomputes the importance per chunk and masks."""

    def passes(self, op):
        return 1

    def granule(self, op, shape):
        return row_length(shape)

    def buffer_bytes(self, op, elems):
        return 8 * elems * 4 + op.sample_size * (8 + 8 + 8)  # softmax temporaries; positions, values, sorted

    def prepare(self, job, reader):
        positions = sampled_positions(job.merged_numel, job.op)
        kept = []
        for chunk, xs in zip(reader.ranges(), reader.passes()()):
            importance = chunk_importance(job, xs)
            if positions is None:
                kept.append(importance.clone())
                continue
            lo, hi = torch.searchsorted(positions, torch.tensor([chunk.start, chunk.stop])).tolist()
            kept.append(importance[(positions[lo:hi] - chunk.start).to(importance.device)])
        values = torch.cat(kept)
        return fusion_threshold(*order_statistics(values, sample_size=None))

    def apply(self, job, xs, state, chunk, reader):
        return fusion_apply(xs[0], xs[1], chunk_importance(job, xs), state)


def _check_recipe(recipe) -> None:
    if len(recipe.sft) != 1:
        raise ValueError("sft: method arcee_fusion takes exactly one SFT model")
    if recipe.sft[0].scale is not None:
        raise ValueError("sft.0.scale: only for method task_arithmetic")
    if recipe.schedule is not None:
        raise ValueError("schedule: not for method arcee_fusion (it has no t or scale to schedule)")


def _plan(recipe, values, name: str) -> Planned:
    return Planned(ArceeFusion(("base", "sft0")), "fence")


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    op = ArceeFusion(("base", recipe.keys()[other]), seed=recipe.options.seed,
                     working_dtype=recipe.working_dtype or "inputs", float32_written=recipe.out_dtype is None)
    return Planned(op, "fence")


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError("base_model: arcee_fusion needs base_model (the model kept where changes are not salient)")
    refs = recipe.model_refs()
    if len(refs) != 2:
        raise ValueError(f"models: arcee_fusion takes exactly two models (base_model and one other), got {len(refs)}")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    other = next(r for r in recipe.model_refs() if r != recipe.base_model)
    fields.update(method="arcee_fusion", base=recipe.base_model, sft=[other])
    notes.append("arcee_fusion computes in float32 here (mergekit: in the checkpoints' dtype, writing float32); "
                 "above 1e6 entries the quartiles are sampled with seed 0 per tensor (mergekit: its global "
                 "--random-seed generator)")


SPEC = MethodSpec(
    name="arcee_fusion",
    operation=ArceeFusion,
    kernel=ArceeFusionKernel(),
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "fence (the SFT's entries whose importance is an upper outlier)",
    describe=lambda t: ("Arcee Fusion per tensor: importance `I = |W_sft - W_base| * KL(softmax(W_sft) || "
                        "softmax(W_base))` (KL per row), `W = W_base + (W_sft - W_base) * [I >= Q2 + 1.5*(Q3 - Q1)]` "
                        "(quartiles of I; sampled from 1e6 entries of larger tensors)."),
    mergekit=(MergekitVariant("arcee_fusion", ()),),
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="no parameters",
)
