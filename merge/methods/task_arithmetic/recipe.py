"""Task arithmetic in recipes: our format's parameters and planning, mergekit's family (ties, dare_*, breadcrumbs*,
della*) with its parameter conventions, ``merge convert``, and ``merge.merge``'s keywords."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ...errors import InputError
from ...keys import BASE, sft_key
from ...params import Bool, ScaledDelta, Sparsify, Value
from .. import spectral
from ..base import Copy, ParamSpec, Planned
from ..della import DEFAULT_EPSILON, require_della_density
from .kernel import (
    Sparsification,
    TaskArithmetic,
)


class TaskArithmeticParams(ScaledDelta):
    """Our recipe's parameters of task arithmetic: each SFT's scale (``scale`` is the default; an SFT may
    give its own), pruning, TIES sign consensus and normalisation."""

    scale: Value | None = Field(None, description="task arithmetic: default scale of every delta")
    sparsify: Sparsify | None = None
    sign_consensus: Bool | Literal["sum", "count"] = False
    normalize: Bool = Field(False, description="task arithmetic: divide by the sum of the (kept) scales")


def check_recipe(recipe) -> None:
    if recipe.scale is None and any(s.scale is None for s in recipe.sft) and recipe.schedule is None:
        raise ValueError("scale: give a scale (top level or per SFT) for task_arithmetic")
    if recipe.sign_consensus and len(recipe.sft) < 2:
        raise ValueError("sign_consensus: needs at least two SFT models")


def consensus(value) -> str | None:
    if value is True:
        return "sum"
    return value or None


def plan(recipe, values, name: str) -> Planned:
    weights = values.delta_weights(name)
    n = len(recipe.sft)
    sp = recipe.sparsify
    sparsify = None
    if sp is not None:
        della = sp.method == "della"  # rescale true: DELLA restores the L1 norm, as mergekit's della does
        sparsify = Sparsification(sp.method, (float(sp.density),) * n, (float(sp.gamma),) * n, int(sp.seed),
                                  "l1" if della and sp.rescale else sp.rescale,
                                  (float(sp.epsilon),) * n if della else None)
    op = TaskArithmetic((BASE,) + tuple(sft_key(i) for i in range(n)), weights, sparsify=sparsify,
                        sign_consensus=consensus(recipe.sign_consensus), normalize=recipe.normalize)
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


def mergekit_params(family: Family) -> tuple[ParamSpec, ...]:
    specs = [ParamSpec("weight", "non_base", required=True), ParamSpec("density", "non_base", 1.0),
             ParamSpec("lambda", "shared", 1.0), ParamSpec("normalize", "shared", family.normalize),
             ParamSpec("rescale", "shared", family.rescale), ParamSpec("int8_mask", "shared", False)]
    if family.sparsify == "breadcrumbs":
        specs.append(ParamSpec("gamma", "non_base", 0.01))
    if family.sparsify == "della":
        specs.append(ParamSpec("epsilon", "non_base", DEFAULT_EPSILON))
    return tuple(specs)


def plan_mergekit(variant, recipe, resolver, name: str) -> Planned:
    family = variant.settings
    keys = recipe.keys()
    others = [r for r in recipe.model_refs() if r != recipe.base_model]
    if not others:
        return Planned(Copy((BASE,)), "base")
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
    op = TaskArithmetic((BASE,) + tuple(keys[r] for r in others), weights, sparsify=sparsify,
                        sign_consensus=family.consensus, normalize=resolver.value("normalize", name),
                        lam=resolver.value("lambda", name), combine="mergekit",
                        working_dtype=recipe.working_dtype or "inputs")
    return Planned(op, text)


def check_mergekit(variant, recipe) -> None:
    if recipe.base_model is None:
        raise ValueError(f"base_model: {variant.name} needs base_model (the model the deltas are taken from)")


def convert(variant, recipe, chains, fields: dict, problems: list[str], notes: list[str]) -> None:
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


def python_fields(sfts: list[str], params: dict) -> dict:
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


