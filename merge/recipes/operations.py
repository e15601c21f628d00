"""From a recipe to one :class:`~merge.plan.Operation` per tensor, for our format and for mergekit's.

``operations_for(recipe, n_layers)`` returns an :class:`OpBuilder`: call it with a tensor name to get the
operation; ``describe(name)`` gives the short value the ``merge plan`` table shows; ``t_values`` collects
the t (share of the base) handed out, for the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import InputError
from ..methods import registry
from ..methods.base import Operation, Planned
from ..tensor_names import OUTSIDE_LAYERS, Structure
from .mergekit import MergekitRecipe, Resolver
from .schema import BottomKSchedule, LinesSchedule, Recipe
from .values import matches, value_for


class OpBuilder:
    """Per-tensor operations plus what the plan table shows for each tensor."""

    def __init__(self, build: Callable[[str], Planned], legend: str):
        self._build = build
        self.legend = legend
        self.t_values: list[float] = []
        self._described: dict[str, str] = {}

    def __call__(self, name: str) -> Operation:
        planned = self._build(name)
        if planned.t is not None:
            self.t_values.append(planned.t)
        self._described[name] = planned.text
        return planned.op

    def describe(self, name: str) -> str:
        if name not in self._described:
            self(name)
        return self._described[name]

    def __iter__(self):  # ``op_for, t_values = operations_for(...)`` keeps working
        return iter((self, self.t_values))


def operations_for(recipe, n_layers: int | Structure) -> OpBuilder:
    """The per-tensor operations of ``recipe`` (ours or mergekit's) for a model of structure ``n_layers``
    (a :class:`~merge.tensor_names.Structure`, or the layer count of a single-stack model)."""
    if isinstance(recipe, MergekitRecipe):
        return mergekit_operations(recipe, n_layers)
    return our_operations(recipe, n_layers)


# -- our format ----------------------------------------------------------------------------------------------
def delta_scale(schedule, name: str, n_layers: int | Structure) -> float | None:
    """The share of the delta a preset keeps for ``name``; None where the preset leaves it to ``t``/``scale``.

    Counted per stack (a vision tower and a text decoder each have their own L). lines: layer l of L
    (1-based) keeps ``alpha + beta*(l-1)/(L-1)``; embeddings (below layer 1, and a projector) get the
    layer-1 value, tensors after the stack (final norm, lm_head) the layer-L value. bottom_k: layers
    ``0..k-1`` of each stack keep nothing (they are the base's); every other tensor (embeddings included)
    follows t/scale.
    """
    pos = Structure.coerce(n_layers).position(name)
    if isinstance(schedule, LinesSchedule):
        return schedule.alpha + schedule.beta * (pos.depth if pos.count > 1 else 0.0)
    if isinstance(schedule, BottomKSchedule):
        return 0.0 if pos.layer is not None and pos.layer < schedule.k else None
    return None


def _number(value, what: str, name: str, n_layers: int) -> float:
    v = value_for(value, name, n_layers)
    if v is None:
        raise InputError(f"{what}: no rule matches tensor {name!r}; add a default rule without match")
    if not math.isfinite(v):
        raise InputError(f"{what}: value for {name!r} is {v}; give a finite number")
    return v


def _rule_value(rules, name: str, n_layers: int) -> float | None:
    """The value of the first rule matching ``name`` (t overrides under a lines schedule), else None."""
    for rule in rules or ():
        if rule.match is None or matches(rule.match, name):
            return value_for(rule.value, name, n_layers)
    return None


class OurValues:
    """Per-tensor values of our recipe format, for the methods' ``plan``: ``t_of`` (share of the base, presets
    expanded) and ``delta_weights`` (each SFT's scale times the preset's share of the delta)."""

    def __init__(self, recipe: Recipe, n_layers: int | Structure):
        self.recipe, self.n_layers = recipe, n_layers

    def t_of(self, name: str) -> float:
        recipe, schedule, n_layers = self.recipe, self.recipe.schedule, self.n_layers
        lam = delta_scale(schedule, name, n_layers)
        if isinstance(schedule, LinesSchedule):
            override = _rule_value(recipe.t, name, n_layers) if recipe.t is not None else None
            return override if override is not None else 1.0 - lam
        if lam is not None:
            return 1.0 - lam
        return _number(recipe.t, "t", name, n_layers)

    def delta_weights(self, name: str) -> tuple[float, ...]:
        lam = delta_scale(self.recipe.schedule, name, self.n_layers)
        weights = []
        for i in range(len(self.recipe.sft)):
            own = self.recipe.scale_of(i)
            scale = 1.0 if own is None else _number(own, f"sft[{i}].scale", name, self.n_layers)
            weights.append(scale if lam is None else scale * lam)
        return tuple(weights)


def our_operations(recipe: Recipe, n_layers: int | Structure) -> OpBuilder:
    """Operations of our recipe format (t = share of the base), presets expanded per tensor."""
    schedule = recipe.schedule
    n_layers = Structure.coerce(n_layers)
    if isinstance(schedule, BottomKSchedule) and schedule.k > n_layers.max_layers:
        raise InputError(f"schedule.k: {schedule.k} is more than the model's {n_layers.max_layers} layers")
    spec = registry.get(recipe.method)
    values = OurValues(recipe, n_layers)
    return OpBuilder(lambda name: spec.plan(recipe, values, name), spec.legend(recipe))


# -- mergekit's format ---------------------------------------------------------------------------------------
def mergekit_operations(recipe: MergekitRecipe, n_layers: int | Structure) -> OpBuilder:
    """Operations reproducing mergekit 0.1.5 for ``recipe`` (see docs/mergekit-semantics.md).

    Every operation carries ``working_dtype`` (mergekit's ``dtype``, or the inputs' own dtype): inputs are
    rounded to it, task-arithmetic math runs in it, and results are rounded to it before the output cast.
    """
    resolver = Resolver(recipe, n_layers)
    spec, variant = registry.for_mergekit(recipe.merge_method)
    legend = spec.mergekit_legend.format(order="/".join(recipe.model_refs()))
    return OpBuilder(lambda name: spec.plan_mergekit(variant, recipe, resolver, name), legend)


# -- rules that match nothing --------------------------------------------------------------------------------
MATCH_HELP = "groups embed, lm_head, norm, attn, mlp; a glob such as 'model.layers.*.mlp.*'; or re:REGEX"


def unmatched_rules(recipe, names) -> list[str]:
    """One message per ``match`` rule (ours) or ``filter`` entry (mergekit) that matches none of ``names``,
    each naming the rule and, for a recipe read from a file, its line."""
    names = list(names)
    source = getattr(recipe, "_source", "recipe")
    lines = getattr(recipe, "_lines", {}) or {}
    out = []
    for path, pattern, test, help_text in _patterns(recipe):
        if any(test(pattern, n) for n in names):
            continue
        line = lines.get(path) or lines.get(path[:-1])
        where = f"{source}:{line}: " if line else ""
        key = ".".join(str(p) for p in path)
        out.append(f"{where}{key}: {pattern!r} matches no tensor of the model ({help_text})")
    return out


def _patterns(recipe):
    """(key path, pattern, test(pattern, name), help) for every rule of ``recipe`` that names tensors."""
    if isinstance(recipe, MergekitRecipe):
        def substring(f, name):
            return f == "*" or str(f) in name

        for where, block in _mergekit_blocks(recipe):
            for param, setting in (block or {}).items():
                entries = [setting] if isinstance(setting, dict) else setting
                if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
                    continue
                for i, entry in enumerate(entries):
                    if entry.get("filter") is not None:
                        path = where + (param,) + ((i,) if isinstance(setting, list) else ()) + ("filter",)
                        yield path, entry["filter"], substring, "mergekit filters are substrings of tensor names"
        return
    values = [((key,), getattr(recipe, key, None)) for key in ("t", "scale")]  # the method's own value fields
    values += [(("sft", i, "scale"), s.scale) for i, s in enumerate(recipe.sft)]
    for path, value in values:
        if isinstance(value, list):
            for i, rule in enumerate(value):
                # `merge convert` adds rules for tensors outside the layer stack "if there are any": exempt
                if getattr(rule, "match", None) is not None and OUTSIDE_LAYERS not in rule.match:
                    yield path + (i, "match"), rule.match, matches, MATCH_HELP


def _mergekit_blocks(recipe: MergekitRecipe):
    """Every parameters block of a mergekit recipe, with its key path."""
    yield ("parameters",), recipe.parameters
    for i, m in enumerate(recipe.models or ()):
        yield ("models", i, "parameters"), m.parameters
    for i, s in enumerate(recipe.slices or ()):
        yield ("slices", i, "parameters"), s.parameters
        for j, src in enumerate(s.sources):
            yield ("slices", i, "sources", j, "parameters"), src.parameters
