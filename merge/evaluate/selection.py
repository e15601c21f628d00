"""Recovery scores of a candidate merge and the rule that picks one.

On bits per byte (lower is better), with G = general probes, D = domain probes, m = the candidate:

* ``general_recovered = (G_sft - G_m) / (G_sft - G_base)``: 0 = as forgetful as the SFT, 1 = back to the base.
* ``domain_retained  = (D_base - D_m) / (D_base - D_sft)``: 1 = all of the SFT's domain gain, 0 = none.
* ``score`` = their harmonic mean ``2gr*dr/(gr+dr)`` (0 when either is <= 0).

Rule ``keep-domain`` (default): the candidate with the largest general_recovered among those with
domain_retained >= ``keep_domain`` (0.9); if none qualifies, the largest score. Rule ``score``: the largest
score. Ties go to the earlier candidate (candidates are ordered from the SFT towards the base).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

RULES = ("keep-domain", "score")


@dataclass(frozen=True)
class Recovery:
    general_recovered: float
    domain_retained: float

    @property
    def score(self) -> float:
        return harmonic_mean(self.general_recovered, self.domain_retained)


def harmonic_mean(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return 0.0 if math.isfinite(a) and math.isfinite(b) else float("nan")
    return 2 * a * b / (a + b)


def recovery(g_base: float, g_sft: float, g_m: float, d_base: float, d_sft: float, d_m: float) -> Recovery:
    """Both fractions on bits per byte; NaN when the SFT neither forgot (G_sft <= G_base) nor gained
    (D_sft >= D_base) anything to measure against."""
    forgot, gained = g_sft - g_base, d_base - d_sft
    gr = (g_sft - g_m) / forgot if forgot > 0 else float("nan")
    dr = (d_base - d_m) / gained if gained > 0 else float("nan")
    return Recovery(gr, dr)


def rule_text(rule: str, keep_domain: float) -> str:
    if rule == "score":
        return "largest recovery score (harmonic mean of general_recovered and domain_retained)"
    return (f"largest general_recovered with domain_retained >= {keep_domain:g} (--keep-domain); "
            "if none qualifies, largest recovery score")


def objective(rec: Recovery, rule: str = "keep-domain", keep_domain: float = 0.9) -> tuple:
    """A sort key (larger = better) that orders candidates as the rule does."""
    score = rec.score if math.isfinite(rec.score) else -math.inf
    if rule == "score":
        return (score,)
    gr = rec.general_recovered if math.isfinite(rec.general_recovered) else -math.inf
    feasible = math.isfinite(rec.domain_retained) and rec.domain_retained >= keep_domain
    return (1, gr, score) if feasible else (0, score, gr)


T = TypeVar("T")


def select(candidates: Sequence[T], recovery_of: Callable[[T], Recovery], rule: str = "keep-domain",
           keep_domain: float = 0.9) -> T:
    """The candidate the rule picks (the first of equals)."""
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r}; use one of {', '.join(RULES)}")
    best, best_key = None, None
    for c in candidates:
        key = objective(recovery_of(c), rule, keep_domain)
        if best_key is None or key > best_key:
            best, best_key = c, key
    if best is None:
        raise ValueError("select: no candidates")
    return best
