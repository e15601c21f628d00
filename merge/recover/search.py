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

from collections.abc import Callable, Sequence

from ..recipes.schema import Recipe
from ..tensor_names import LAYER_PREFIX, VISION, Structure

STEPS = (0.2, 0.1, 0.05)


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
        rules.append({"match": f"re:{scope}{LAYER_PREFIX}(?:{alternatives})\\.", "value": round(t, 6)})
    return rules


def blocks_recipe(template: Recipe, ts: Sequence[float], n_layers: int | Structure) -> Recipe:
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


def coordinate_search(start: Sequence[float], evaluate: Callable[[tuple], object] | None,
                      key: Callable[[object], tuple], budget: int, *,
                      evaluate_many: Callable[[list[tuple]], list] | None = None, width: int = 1
                      ) -> tuple[tuple, object, int]:
    """Maximise ``key(evaluate(point))`` over points in [0, 1]^n; returns (best point, its result, evaluations).

    Each point depends on the results before it, so the search itself is sequential. ``evaluate_many`` (a list
    of points -> their results, e.g. on parallel workers) with ``width`` > 1 evaluates a point together with the
    next ``width - 1`` points the search would try if none of them improved (the rest of this pass over the
    coordinates); a result the search never asks for (it moved first) is dropped, so the path, the result and
    the count of evaluations are those of ``width=1``."""
    many = evaluate_many or (lambda points: [evaluate(p) for p in points])
    known: dict[tuple, object] = {}

    def result_of(point: tuple, upcoming: list[tuple]) -> object:
        if point not in known:
            batch = [point] + [p for p in upcoming if p not in known][:max(0, width - 1)]
            known.update(zip(batch, many(batch)))
        return known.pop(point)

    best = tuple(round(x, 4) for x in start)
    best_result = result_of(best, [])
    used = 1
    seen = {best}
    for step in STEPS:
        improved = True
        while improved and used < budget:
            improved = False
            for i in range(len(best)):
                for sign in (1, -1):
                    if used >= budget:
                        break
                    point = _moved(best, i, sign * step)
                    if point in seen:
                        continue
                    seen.add(point)
                    upcoming = _upcoming(best, step, i, sign, seen)[:budget - used - 1] if width > 1 else []
                    result = result_of(point, upcoming)
                    used += 1
                    if key(result) > key(best_result):
                        best, best_result, improved = point, result, True
                        break
    return best, best_result, used


def _moved(point: tuple, i: int, delta: float) -> tuple:
    """``point`` with coordinate ``i`` moved by ``delta``, clipped to [0, 1] and rounded to 4 places."""
    moved = list(point)
    moved[i] = round(min(1.0, max(0.0, moved[i] + delta)), 4)
    return tuple(moved)


def _upcoming(best: tuple, step: float, i: int, sign: int, seen: set) -> list[tuple]:
    """The points tried after (coordinate ``i``, ``sign``) of this pass if none of them improves on ``best``."""
    out = []
    for j in range(i, len(best)):
        for s in ((-1,) if sign == 1 else ()) if j == i else (1, -1):
            p = _moved(best, j, s * step)
            if p not in seen and p not in out:
                out.append(p)
    return out
