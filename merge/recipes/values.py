"""Turning a recipe value (number, gradient or rules) into the number one tensor gets."""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence, Union

from ..tensor_names import GROUPS, STACKS, Structure, group_of, stack_of

Gradient = Sequence[float]


def interpolate(values: Gradient, position: float) -> float:
    """Piecewise-linear interpolation of evenly spaced anchor ``values`` at ``position`` in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    x = min(max(position, 0.0), 1.0) * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return float(values[i] + (values[i + 1] - values[i]) * frac)


def depth_position(name: str, n_layers: "int | Structure") -> float:
    """Where a tensor sits in depth in its own stack, in [0, 1]: layer l of the stack's L is ``l / (L - 1)``;
    embeddings (and a vision-language projector) sit at 0, everything after the layers (final norm, lm_head)
    at 1. ``n_layers`` is a :class:`~merge.tensor_names.Structure` or, for a single-stack model, its L."""
    return Structure.coerce(n_layers).position(name).depth


def matches(pattern: str, name: str) -> bool:
    """A rule's ``match``: a group name (embed, lm_head, norm, attn, mlp, router, projector), a stack name
    (vision, text), ``re:REGEX`` (searched), or a glob."""
    if pattern in GROUPS:
        return group_of(name) == pattern
    if pattern in STACKS:
        return stack_of(name) == pattern
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def value_for(value: Union[float, Gradient, list], name: str, n_layers: "int | Structure") -> float | None:
    """The number ``name`` gets from ``value``; None when rules are given and none matches."""
    if isinstance(value, (int, float)):
        return float(value)
    if value and all(isinstance(v, (int, float)) for v in value):
        return interpolate(value, depth_position(name, n_layers))
    for rule in value:
        if rule.match is None or matches(rule.match, name):
            return value_for(rule.value, name, n_layers)
    return None
