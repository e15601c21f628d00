"""Per-layer schedules and a small derivative-free search over them.

* ``lines``: LiNeS, layer l of L (1-based, L of its own stack) keeps ``lam(l) = alpha + beta*(l-1)/(L-1)`` of its delta
  (``t(l) = 1 - lam(l)``); searched as (lam of the first layer, lam of the last layer), each in [0, 1].
* ``blocks``: one t per block of consecutive layers (Heterogeneous Model Averaging, 3 blocks by default);
  embeddings take the first block's t, the final norm and lm_head the last block's. Counted per stack: with
  a vision tower, block b holds the b-th run of the tower's layers and the b-th run of the decoder's.

The search is coordinate search on a shrinking step (0.2, 0.1, 0.05) from the best global t, each point
clipped to [0, 1], with at most ``budget`` evaluations; it only moves to strictly better points.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..recipes.schema import Recipe
from ..tensor_names import VISION, Structure

STEPS = (0.2, 0.1, 0.05)
LAYER_PREFIX = r"re:(?:^|\.)(?:layers|layer|h|blocks|block)\."


def lines_recipe(template: Recipe, lam_first: float, lam_last: float) -> Recipe:
    """``template`` with ``schedule: {preset: lines, alpha: lam_first, beta: lam_last - lam_first}``."""
    data = template.model_dump(mode="json", exclude_none=True)
    data.pop("t", None)
    data["schedule"] = {"preset": "lines", "alpha": round(lam_first, 6), "beta": round(lam_last - lam_first, 6)}
    return Recipe.model_validate(data)


def block_ranges(n_layers: int, blocks: int) -> list[range]:
    """``blocks`` runs of consecutive layers, as equal as possible (earlier blocks get no more layers)."""
    blocks = max(1, min(blocks, n_layers))
    edges = [round(b * n_layers / blocks) for b in range(blocks + 1)]
    return [range(edges[b], edges[b + 1]) for b in range(blocks)]


def _block_rules(scope: str, ts: Sequence[float], n_layers: int) -> list[dict]:
    """One regex rule per block but the last of a stack of ``n_layers`` layers; ``scope`` (a regex) goes first."""
    rules = []
    for layers, t in zip(block_ranges(n_layers, len(ts))[:-1], ts[:-1]):
        alternatives = "|".join(str(i) for i in layers)
        rules.append({"match": f"re:{scope}{LAYER_PREFIX[3:]}(?:{alternatives})\\.", "value": round(t, 6)})
    return rules


def blocks_recipe(template: Recipe, ts: Sequence[float], n_layers: "int | Structure") -> Recipe:
    """``template`` with ``t`` rules: one regex rule per block but the last, embeddings with the first block,
    everything else (last block, final norm, lm_head) the default.

    With a vision tower, block b holds the b-th run of each stack's own layers: the vision rules come first
    (its pre-layer norm with the first block, the rest of the tower with the last), the projector goes with
    the first block."""
    structure = Structure.coerce(n_layers)
    rules = [{"match": "embed", "value": round(ts[0], 6)}]
    if structure.multi:
        rules.append({"match": "projector", "value": round(ts[0], 6)})
    if structure.counts.get("vision"):
        vision = f"^(?=.*{VISION.pattern}).*"  # a vision name, then the layer part searched as for text
        rules.append({"match": f"re:{vision}(?:^|\\.)pre_", "value": round(ts[0], 6)})
        rules += _block_rules(vision, ts, structure.counts["vision"])
        rules.append({"match": "vision", "value": round(ts[-1], 6)})
    rules += _block_rules("", ts, structure.counts["text"])
    rules.append({"value": round(ts[-1], 6)})
    data = template.model_dump(mode="json", exclude_none=True)
    data["t"] = rules
    return Recipe.model_validate(data)


def coordinate_search(start: Sequence[float], evaluate: Callable[[tuple], object], key: Callable[[object], tuple],
                      budget: int, start_result=None) -> tuple[tuple, object, int]:
    """Maximise ``key(evaluate(point))`` over points in [0, 1]^n; returns (best point, its result, evaluations).

    ``start_result`` (the start point's result, when already known) saves one evaluation.
    """
    best = tuple(round(x, 4) for x in start)
    best_result = start_result if start_result is not None else evaluate(best)
    used = 0 if start_result is not None else 1
    seen = {best}
    for step in STEPS:
        improved = True
        while improved and used < budget:
            improved = False
            for i in range(len(best)):
                for sign in (1, -1):
                    if used >= budget:
                        break
                    point = list(best)
                    point[i] = round(min(1.0, max(0.0, point[i] + sign * step)), 4)
                    point = tuple(point)
                    if point in seen:
                        continue
                    seen.add(point)
                    result = evaluate(point)
                    used += 1
                    if key(result) > key(best_result):
                        best, best_result, improved = point, result, True
                        break
    return best, best_result, used
