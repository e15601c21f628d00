"""Task arithmetic: add (weighted, possibly pruned) task vectors to the base.

Per chunk the kernel composes ``delta -> prune -> rescale -> elect -> combine``: ``delta_i = W_i - W_base``;
pruning (:mod:`.sparsify`: magnitude/breadcrumbs bands found by the exact streaming top-k of
:mod:`.selection`, DARE's random keep-mask, or DELLA's rank-weighted one per row from :mod:`.della`);
rescaling (DARE: ``/ density``; mergekit: each delta's L1 norm restored); sign election
(:func:`sign_consensus_mask`, :func:`elect_signs_mergekit`); the combination (:func:`task_arithmetic`, or
:func:`task_arithmetic_mergekit` with mergekit's order of rounding). mergekit's ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della and della_linear are this method with other settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from ..errors import InputError
from ..params import Bool, Sparsify, Value, finite_value
from . import spectral
from .base import Copy, KernelBase, MergekitVariant, MethodSpec, Operation, ParamSpec, Planned
from .chunks import Chunk, sample_ranges
from .della import DEFAULT_EPSILON, della_granule, della_prune_chunk_, require_della_density
from .selection import RankCut, rank_cut, rank_cuts
from .sparsify import dare_keep, l1_rescale_factor, trim_


def sign_consensus_mask(weighted_deltas: Sequence[torch.Tensor], method: str = "sum") -> list[torch.Tensor]:
    """TIES sign election: the elected sign is ``sign(sum_i d_i)`` (``method='sum'``) or the sign held by
    more task vectors (``'count'``); each ``d_i`` keeps only the entries whose sign agrees."""
    if method == "sum":
        total = torch.zeros_like(weighted_deltas[0])
        for d in weighted_deltas:
            total.add_(d)
    elif method == "count":
        total = torch.zeros_like(weighted_deltas[0])
        for d in weighted_deltas:
            total.add_(torch.sign(d))
    else:
        raise ValueError(f"unknown sign consensus method {method!r}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted_deltas[0].dtype)
    return [torch.sign(d) == elected for d in weighted_deltas]


def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                    sign_consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``W = W_base + lam * sum_i w_i * m_i * delta_i`` (``/ sum_i w_i * m_i`` elementwise when ``normalize``).

    ``delta_i = W_sft_i - W_base``, already sparsified by the caller; ``m_i`` is the TIES sign-consensus mask
    (all ones without ``sign_consensus``). ``out`` may be ``base``.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("task_arithmetic: need one weight per delta")
    weighted = [d * w for d, w in zip(deltas, weights)] if (sign_consensus or normalize) else None
    masks = sign_consensus_mask(weighted, sign_consensus) if sign_consensus else None
    mixed = None
    if weighted is None:
        if out is None:
            out = base.clone()
        elif out is not base:
            out.copy_(base)
        for d, w in zip(deltas, weights):
            out.add_(d, alpha=w * lam)
        return out
    for i, wd in enumerate(weighted):
        term = wd * masks[i] if masks else wd
        mixed = term if mixed is None else mixed.add_(term)
    if normalize:
        divisor = torch.zeros_like(base)
        for i, w in enumerate(weights):
            divisor.add_(masks[i].to(base.dtype) * w if masks else torch.full_like(base, w))
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    if out is None:
        return base + lam * mixed
    if out is not base:
        out.copy_(base)
    return out.add_(mixed, alpha=lam)


def task_arithmetic_mergekit(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                             consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's combination step, in the tensors' dtype (its weights are rounded to that dtype):

    ``D_i = w_i d_i``; with ``consensus='sum'``: ``m_i = [sign(D_i) == sign(sum_j D_j)]`` (0 counts as +),
    ``mixed = sum_i m_i D_i``, ``div = sum_i w_i m_i`` (0 -> 1); without: ``mixed = sum_i D_i``,
    ``div = sum_i w_i`` (|div| < 1e-8 -> 1). ``normalize``: ``mixed /= div``; then ``mixed *= lam`` when
    ``lam != 1``; result ``base + mixed``. ``out`` may be ``base``.
    """
    stacked = torch.stack(list(deltas))
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device).unsqueeze(-1)
    stacked.mul_(w)
    if consensus:
        if consensus != "sum":
            raise ValueError(f"unknown sign consensus method {consensus!r}")
        mask = elect_signs_mergekit(stacked, base.dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    if out is None:
        return base + mixed
    return torch.add(base, mixed, out=out)


def elect_signs_mergekit(weighted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mergekit's TIES election over stacked weighted deltas ``D`` [n, ...]: the majority sign is
    ``sign(sum_i D_i)`` (0 counts as +); returns the mask ``sign(D_i) == majority`` (computed in ``dtype``)."""
    majority = (weighted.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return weighted.sign().to(dtype) == majority


# -- the method: operation, kernel, recipe and mergekit bindings ----------------------------------------------
@dataclass(frozen=True)
class Sparsification:
    """How each delta is pruned: ``method`` magnitude|random|breadcrumbs|della, ``density`` and ``gamma``
    (``epsilon`` for della) per fine-tune, the ``seed`` of random masks (DARE, DELLA), ``rescale`` (True: DARE
    survivors / density; "l1": each delta's L1 norm restored, as mergekit; False: none)."""

    method: str
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    seed: int = 0
    rescale: bool | str = True
    epsilon: tuple[float, ...] | None = None

    @property
    def ranked(self) -> bool:
        """Whether pruning keeps magnitude ranks (and so needs the streaming top-k)."""
        return self.method in ("magnitude", "breadcrumbs")


@dataclass(frozen=True)
class TaskArithmetic(Operation):
    """``W_base + lam * sum_i w_i * m_i * prune(W_i - W_base)``; inputs are (base, fine-tunes...).

    A density >= 1 leaves a delta unchanged, <= 0 zeroes it; magnitude keeps ``max(1, int(density*n))``
    entries, exactly (ties at the threshold broken by position). ``combine="mergekit"`` combines as mergekit
    does; ``working_dtype``: see :mod:`.precision` (task arithmetic computes in it)."""

    kind: ClassVar[str] = "task_arithmetic"
    computes_in_working_dtype: ClassVar[bool] = True
    weights: tuple[float, ...] = ()
    sparsify: Sparsification | None = None
    sign_consensus: str | None = None
    normalize: bool = False
    lam: float = 1.0
    combine: str = "ours"
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return True


@dataclass
class TieCursor:
    """Where a pass over a tensor stands in a magnitude cut's tie accounting: the threshold-equal entries seen
    in earlier chunks (upper cut, lower cut) and the index of the chunk expected next. Every pass walks the
    chunks of the pass that found the cuts, in order, from chunk 0 (which starts the count again)."""

    ties: tuple[int, int] = (0, 0)
    next_chunk: int = 0

    def begin(self, index: int) -> None:
        if index == 0:
            self.ties, self.next_chunk = (0, 0), 0
        elif index != self.next_chunk:
            raise RuntimeError(f"tie cursor: chunk {index} pruned after chunk {self.next_chunk - 1}; passes must "
                               "walk the chunks in order")

    def advance(self, seen: tuple[int, int]) -> None:
        self.ties = (self.ties[0] + seen[0], self.ties[1] + seen[1])
        self.next_chunk += 1


@dataclass
class DeltaPrune:
    """One fine-tune's pruning state: its density, the magnitude band (upper, lower cut) where pruning keeps
    ranks, mergekit's L1 rescale factor once known, and the tie cursor."""

    density: float
    band: tuple[RankCut, RankCut] | None = None
    scale: float | None = None
    cursor: TieCursor = field(default_factory=TieCursor)

    @property
    def keep_all(self) -> bool:
        return self.density >= 1

    @property
    def drop_all(self) -> bool:
        return self.density <= 0


def prune_(d: torch.Tensor, sp: Sparsification, state: DeltaPrune, name: str, stream: int, chunk: Chunk,
           reader, shape: tuple[int, ...] = ()) -> None:
    """Zeroes in place the entries of delta chunk ``d`` (fine-tune ``stream`` of tensor ``name``, of ``shape``)
    that pruning drops."""
    if sp.method == "random":
        d.mul_(dare_keep(int(sp.seed), name, stream, chunk.start, chunk.stop, state.density, reader.device))
        return
    if sp.method == "della":
        della_prune_chunk_(d, shape, chunk.start, state.density, sp.epsilon[stream], int(sp.seed), name, stream)
        return
    state.cursor.begin(chunk.index)
    scratch = reader.scratch("trim", d.numel(), torch.int32)
    # chunks are those of the pass that found the cuts (the same chunk_ranges), so their tie counts apply
    state.cursor.advance(trim_(d, *state.band, ties_before=state.cursor.ties, scratch=scratch, chunk=chunk.index))


def rescale_(d: torch.Tensor, sp: Sparsification, state: DeltaPrune) -> None:
    """A pruned delta rescaled: by mergekit's L1 factor when known, else DARE's ``1 / density``."""
    if state.scale is not None:
        d.mul_(state.scale)
    elif sp.method == "random" and sp.rescale is True:
        d.div_(state.density)


def combine(op: TaskArithmetic, base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Sign election and combination of the pruned, rescaled deltas into ``base`` (in place)."""
    if op.combine == "mergekit":
        return task_arithmetic_mergekit(base, deltas, op.weights, consensus=op.sign_consensus,
                                        normalize=bool(op.normalize), lam=float(op.lam), out=base)
    return task_arithmetic(base, deltas, op.weights, sign_consensus=op.sign_consensus,
                           normalize=bool(op.normalize), lam=float(op.lam), out=base)


class TaskArithmeticKernel(KernelBase):
    """Statistics passes find each delta's magnitude band (ranked pruning) and mergekit's L1 factors; then per
    chunk ``delta -> prune -> rescale -> elect -> combine``."""

    def passes(self, op):
        sp = op.sparsify
        if sp is None:
            return 0
        ranked = 3 * (len(op.inputs) - 1) if sp.ranked else 0  # sample, proving count, refinement at most
        return ranked + (sp.rescale == "l1")

    def granule(self, op, shape):
        return della_granule(shape) if op.sparsify is not None and op.sparsify.method == "della" else 1

    def buffer_bytes(self, op, elems):
        if op.sparsify is not None and op.sparsify.method == "della":  # ranks (int64 x2), probabilities, draws
            return 4 * elems * 8
        if op.sparsify is not None and op.sparsify.ranked:  # histograms, keys, trimming masks, sample
            return 2 * (1 << 16) * 8 + 4 * elems * 4
        return 0

    def prepare(self, job, reader):
        sp = job.op.sparsify
        if sp is None:
            return None
        n = job.merged_numel
        states = []
        for i in range(1, len(job.op.inputs)):
            def deltas(i=i, ranges=None):
                for xs in reader.passes(ranges=ranges)():
                    out = reader.scratch("delta", xs[0].numel(), xs[0].dtype)
                    yield torch.sub(xs[i], xs[0], out=out)
            # spread blocks propose the cuts, so that one pass only counts (a single chunk is simply histogrammed)
            sample = None if reader.single else (lambda i=i: deltas(i, sample_ranges(n, reader.chunk)))
            density, gamma = float(sp.density[i - 1]), float(sp.gamma[i - 1])
            state = DeltaPrune(density)
            if not (state.keep_all or state.drop_all) and sp.method == "magnitude":
                state.band = (RankCut(float("inf"), 0), rank_cut(deltas, max(1, int(density * n)), sample=sample,
                                                                 total=n))
            elif not (state.keep_all or state.drop_all) and sp.method == "breadcrumbs":
                keep = int(density * n)
                top = min(int(gamma * n), n - keep)
                state.band = tuple(rank_cuts(deltas, [top, top + keep], sample=sample, total=n))
            states.append(state)
        if sp.rescale == "l1":
            self._l1_scales(job, reader, sp, states)
        return states

    @staticmethod
    def _l1_scales(job, reader, sp: Sparsification, states: list[DeltaPrune]) -> None:
        """mergekit's rescale: ``pruned * (||d||_1 / ||pruned||_1)``, skipped when either norm < 1e-7."""
        before = [0.0] * len(states)
        after = [0.0] * len(states)
        for chunk, xs in zip(reader.ranges(), reader.passes()()):
            for i, state in enumerate(states):
                if state.keep_all or state.drop_all:
                    continue
                d = (xs[i + 1] - xs[0])
                before[i] += float(d.abs().double().sum())
                prune_(d, sp, state, job.name, i, chunk, reader, job.shape)
                after[i] += float(d.abs().double().sum())
        for i, state in enumerate(states):
            if not (state.keep_all or state.drop_all):
                state.scale = l1_rescale_factor(before[i], after[i], reader.dtype)

    def apply(self, job, xs, state, chunk, reader):
        op = job.op
        sp = op.sparsify
        base, fine = xs[0], xs[1:]
        deltas = [x.sub_(base) for x in fine]
        if sp is not None:
            for i, d in enumerate(deltas):
                st = state[i]
                if st.keep_all:
                    continue
                if st.drop_all:
                    d.zero_()
                    continue
                prune_(d, sp, st, job.name, i, chunk, reader, job.shape)
                rescale_(d, sp, st)
        return combine(op, base, deltas)


class TaskArithmeticParams(BaseModel):
    """Our recipe's parameters of task arithmetic: each SFT's scale (``scale`` is the default; an SFT may
    give its own), pruning, TIES sign consensus and normalisation."""

    scale: Value | None = Field(None, description="task arithmetic: default scale of every delta")
    sparsify: Sparsify | None = None
    sign_consensus: Bool | Literal["sum", "count"] = False
    normalize: Bool = Field(False, description="task arithmetic: divide by the sum of the (kept) scales")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v):
        return finite_value(v)

    def scale_of(self, index: int) -> Value:
        """SFT ``index``'s scale: its own, else the default ``scale``."""
        own = self.sft[index].scale
        return own if own is not None else self.scale


def _check_recipe(recipe) -> None:
    if recipe.scale is None and any(s.scale is None for s in recipe.sft) and recipe.schedule is None:
        raise ValueError("scale: give a scale (top level or per SFT) for task_arithmetic")
    if recipe.sign_consensus and len(recipe.sft) < 2:
        raise ValueError("sign_consensus: needs at least two SFT models")


def _consensus(value) -> str | None:
    if value is True:
        return "sum"
    return value or None


def _plan(recipe, values, name: str) -> Planned:
    weights = values.delta_weights(name)
    n = len(recipe.sft)
    sp = recipe.sparsify
    sparsify = None
    if sp is not None:
        della = sp.method == "della"  # rescale true: DELLA restores the L1 norm, as mergekit's della does
        sparsify = Sparsification(sp.method, (float(sp.density),) * n, (float(sp.gamma),) * n, int(sp.seed),
                                  "l1" if della and sp.rescale else sp.rescale,
                                  (float(sp.epsilon),) * n if della else None)
    op = TaskArithmetic(("base",) + tuple(f"sft{i}" for i in range(n)), weights, sparsify=sparsify,
                        sign_consensus=_consensus(recipe.sign_consensus), normalize=recipe.normalize)
    return Planned(op, "/".join(f"{w:g}" for w in weights))


@dataclass(frozen=True)
class Family:
    """A mergekit method of the task-arithmetic family: its pruning, sign election and defaults."""

    sparsify: str | None
    consensus: str | None
    normalize: bool
    rescale: bool


FAMILY = {
    "task_arithmetic": Family(None, None, False, False),
    "ties": Family("magnitude", "sum", True, False),
    "dare_linear": Family("random", None, False, True),
    "dare_ties": Family("random", "sum", False, True),
    "breadcrumbs": Family("breadcrumbs", None, False, False),
    "breadcrumbs_ties": Family("breadcrumbs", "sum", False, False),
    "della": Family("della", "sum", True, True),
    "della_linear": Family("della", None, False, True),
}


def _mergekit_params(family: Family) -> tuple[ParamSpec, ...]:
    specs = [ParamSpec("weight", "non_base", required=True), ParamSpec("density", "non_base", 1.0),
             ParamSpec("lambda", "shared", 1.0), ParamSpec("normalize", "shared", family.normalize),
             ParamSpec("rescale", "shared", family.rescale), ParamSpec("int8_mask", "shared", False)]
    if family.sparsify == "breadcrumbs":
        specs.append(ParamSpec("gamma", "non_base", 0.01))
    if family.sparsify == "della":
        specs.append(ParamSpec("epsilon", "non_base", DEFAULT_EPSILON))
    return tuple(specs)


def _plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    family = variant.settings
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if not others:
        return Planned(Copy(("base",)), "base")
    weights = tuple(resolver.value("weight", name, r) for r in others)
    densities = tuple(resolver.value("density", name, r) for r in others)
    text = "/".join(f"{w:g}" for w in weights)
    sparsify = None
    if family.sparsify and any(d < 1 for d in densities):
        gammas = tuple(resolver.value("gamma", name, r) for r in others) if family.sparsify == "breadcrumbs" \
            else (0.0,) * len(others)
        epsilons = None
        if family.sparsify == "della":
            epsilons = tuple(resolver.value("epsilon", name, r) for r in others)
            for ref, d, e in zip(others, densities, epsilons):
                if 0 < d < 1:  # mergekit checks epsilon only where it prunes (density <= 0: zeros)
                    require_della_density(d, e, f"{ref} (tensor {name})")
        sparsify = Sparsification(family.sparsify, densities, gammas, recipe.options.seed,
                                  "l1" if resolver.value("rescale", name) else False, epsilons)
        text += " d=" + "/".join(f"{d:g}" for d in densities)
    op = TaskArithmetic(("base",) + tuple(keys[r] for r in others), weights, sparsify=sparsify,
                        sign_consensus=family.consensus, normalize=resolver.value("normalize", name),
                        lam=resolver.value("lambda", name), combine="mergekit",
                        working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, text)


def _check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError(f"base_model: {variant.name} needs base_model (the model the deltas are taken from)")


def _convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
    family = variant.settings
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    lam = chains.scalar("lambda", None)
    normalize = chains.scalar("normalize", None)
    rescale = chains.scalar("rescale", None)
    if lam is None or normalize is None or rescale is None:
        problems.append("per-tensor lambda/normalize/rescale (gradients or filters)")
        return
    if normalize and lam != 1:
        problems.append(f"lambda {lam:g} together with normalize: true")
        return
    factor = 1.0 if normalize else lam
    sfts = [{"model": r, "scale": chains.value("weight", r, lambda v, f=factor: f * v)} for r in others]
    fields.update(method="task_arithmetic", base=recipe.base_model, sft=sfts, normalize=bool(normalize) or None,
                  sign_consensus="sum" if family.consensus and len(others) > 1 else None)
    if family.sparsify:
        densities = {chains.scalar("density", r) for r in others}
        gammas = {chains.scalar("gamma", r) for r in others} if family.sparsify == "breadcrumbs" else {0.01}
        if None in densities or len(densities) != 1 or None in gammas or len(gammas) != 1:
            problems.append("densities (or gammas) that differ between models or across tensors: our sparsify has "
                            "one density and gamma for every SFT")
            return
        (density,), (gamma,) = densities, gammas
        if density < 1:
            fields["sparsify"] = {"method": family.sparsify, "density": density, "rescale": "l1" if rescale else False}
            if family.sparsify == "breadcrumbs":
                fields["sparsify"]["gamma"] = gamma
            if family.sparsify == "della":
                epsilons = {chains.scalar("epsilon", r) for r in others}
                if None in epsilons or len(epsilons) != 1:
                    problems.append("epsilons that differ between models or across tensors: our sparsify has one "
                                    "epsilon for every SFT")
                    return
                fields["sparsify"].update(epsilon=next(iter(epsilons)), rescale=bool(rescale))
            if family.sparsify in ("random", "della"):
                fields["sparsify"]["seed"] = recipe.options.seed
                notes.append(f"{'DARE' if family.sparsify == 'random' else 'DELLA'} masks come from a different "
                             "random generator than mergekit's: same distribution, different entries")


# -- merge.merge / CLI keywords ----------------------------------------------------------------------------------
PYTHON_PARAMS = ("scale", "sparsify", "density", "gamma", "seed", "epsilon", "sign_consensus", "rank", "svd")


def _python_fields(sfts: list[str], params: dict) -> dict:
    """``scale`` (one for all SFTs or one per SFT), ``sparsify`` with ``density`` (``gamma``: breadcrumbs,
    ``seed``: random and della, ``epsilon``: della) and ``sign_consensus`` as recipe fields; options without
    effect are refused."""
    scale, sparsify, density = params.get("scale"), params.get("sparsify"), params.get("density")
    if sparsify in spectral.SPARSIFY:  # spectral repair: its own method (whole-tensor SVDs), one SFT
        return spectral.spectral_fields(sfts, params)
    for name in ("rank", "svd"):
        if params.get(name) is not None:
            raise InputError(f"--{name}: only for --sparsify svd (spectral repair); drop it"
                             + (f" or use --sparsify svd instead of {sparsify}" if sparsify else ""))
    gamma, seed, epsilon = params.get("gamma"), params.get("seed"), params.get("epsilon")
    consensus = params.get("sign_consensus", False)
    if sparsify is None:
        for name, v in (("--density", density), ("--gamma", gamma), ("--seed", seed), ("--epsilon", epsilon)):
            if v is not None:
                raise InputError(f"{name}: has no effect without --sparsify magnitude|random|breadcrumbs|della")
    else:
        if gamma is not None and sparsify != "breadcrumbs":
            raise InputError(f"--gamma: only breadcrumbs drops the largest entries; --sparsify {sparsify} has "
                             "no gamma (drop --gamma)")
        if seed is not None and sparsify not in ("random", "della"):
            raise InputError(f"--seed: only --sparsify random and della draw random masks; --sparsify {sparsify} "
                             "is deterministic (drop --seed)")
        if epsilon is not None and sparsify != "della":
            raise InputError(f"--epsilon: only --sparsify della spreads keep probabilities by rank; --sparsify "
                             f"{sparsify} has no epsilon (drop --epsilon)")
        if density is None:
            raise InputError("--sparsify needs --density (the fraction of each delta kept, 0..1]")
    if consensus and len(sfts) < 2:
        raise InputError("--sign-consensus: elects signs across several SFTs; with one --sft it has no effect "
                         "(drop it or add another --sft)")
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(sfts)
    if len(scales) != len(sfts):
        raise InputError(f"--scale: give one scale for all SFTs or one per SFT ({len(sfts)}), got {len(scales)}")
    fields = {"sft": [{"model": s, "scale": sc} for s, sc in zip(sfts, scales)], "sign_consensus": consensus}
    if sparsify:
        fields["sparsify"] = {"method": sparsify, "density": density}
        fields["sparsify"].update({k: v for k, v in (("gamma", gamma), ("seed", seed), ("epsilon", epsilon))
                                   if v is not None})
    return fields


# -- summary and card wording ----------------------------------------------------------------------------------
_SPARSIFY = {"magnitude": "magnitude (TIES trimming: the largest |delta| entries kept)",
             "random": "random (DARE: entries kept at random)",
             "breadcrumbs": "breadcrumbs (the largest gamma and the smallest entries dropped)",
             "della": "della (DELLA: entries kept at random with P_keep = density - epsilon + 2*epsilon*r, r the "
                      "entry's magnitude rank in its row scaled to 0..1)"}
_CONSENSUS = {"sum": "sum (TIES sign election: the sign of the summed deltas)",
              "count": "count (the sign most deltas have)"}


def _settings(ops: list[TaskArithmetic], who) -> list[str]:
    """The settings of a plan's task-arithmetic operations, in words (the summary and the card): scales per
    SFT (a range where they vary by tensor; ``who(key)`` names an SFT), lambda, normalize, the sparsify method
    with density (gamma, seed, rescale where they apply), and sign consensus."""
    sfts = ops[0].inputs[1:]
    scales = ", ".join(f"{_spread(op.weights[i] for op in ops)} ({who(k)})" for i, k in enumerate(sfts))
    lines = [f"scale{'s' if len(sfts) > 1 else ''}: {scales}"]
    lams = {float(op.lam) for op in ops}
    if lams != {1.0}:
        lines.append(f"lambda (multiplies the summed deltas): {_spread(lams)}")
    if any(op.normalize for op in ops):
        lines.append("normalize: the sum is divided by the sum of the scales of the deltas kept per entry")
    sparse = [op.sparsify for op in ops if op.sparsify is not None]
    if not sparse:
        lines.append("sparsify: none (whole deltas are added)")
    else:
        method = sparse[0].method
        where = "" if len(sparse) == len(ops) else f" on {len(sparse)} of {len(ops)} tensors (whole deltas elsewhere)"
        parts = [f"sparsify: {_SPARSIFY.get(method, method)}{where}", f"density {_per_sft(sparse, 'density')}"]
        if method == "breadcrumbs":
            parts.append(f"gamma {_per_sft(sparse, 'gamma')}")
        if method == "della":
            parts.append(f"epsilon {_per_sft(sparse, 'epsilon')}")
        if method in ("random", "della"):
            parts.append(f"seed {_spread(sp.seed for sp in sparse)}")
        rescale = {str(sp.rescale) for sp in sparse}
        if method == "random" or rescale != {"True"}:
            words = {"True": "survivors divided by the density", "l1": "each delta's L1 norm restored",
                     "False": "not rescaled"}
            parts.append("; ".join(words.get(r, r) for r in sorted(rescale)))
        lines.append(", ".join(parts))
    consensus = {op.sign_consensus for op in ops}
    lines.append("sign consensus: " + ", ".join(_CONSENSUS.get(c, c) if c else "none" for c in sorted(
        consensus, key=str)))
    return lines


def _spread(values) -> str:
    """One value, or the range a per-tensor value takes."""
    vals = sorted({float(v) for v in values})
    return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}..{vals[-1]:g} across tensors"


def _per_sft(sparse: list[Sparsification], key: str) -> str:
    """A sparsify number per fine-tune, spread over the tensors (one value when all fine-tunes agree)."""
    values = [getattr(sp, key) for sp in sparse]
    if all(isinstance(v, (list, tuple)) for v in values):
        n = len(values[0])
        per = [_spread(v[i] for v in values) for i in range(n)]
        return per[0] if len(set(per)) == 1 else "/".join(per) + " (per model)"
    return _spread(values)


SPEC = MethodSpec(
    name="task_arithmetic",
    operation=TaskArithmetic,
    kernel=TaskArithmeticKernel(),
    params=TaskArithmeticParams,
    settings=_settings,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=lambda recipe: "scale of each SFT's delta" + (" (sft0/sft1/...)" if len(recipe.sft) > 1 else ""),
    describe=lambda t: "Task arithmetic `W = W_base + sum_i s_i * sparsify(W_sft_i - W_base)`.",
    mergekit=tuple(MergekitVariant(name, _mergekit_params(f), f) for name, f in FAMILY.items()),
    lora_note=("for LoRA-targeted tensors this task arithmetic merge is exactly W_base + scale_i*s*B@A, "
              "computed tensor by tensor without materialising the merged model"),
    plan_mergekit=_plan_mergekit,
    check_mergekit=_check_mergekit,
    convert=_convert,
    mergekit_legend="mergekit weight of each model's delta (d = density)",
    sweepable=True,
    python_params=PYTHON_PARAMS,
    python_fields=_python_fields,
    hints={"t": "task-arithmetic uses --scale (the multiplier of each delta; scale 1-t equals linear with t), "
                "not --t"},
)
