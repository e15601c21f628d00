"""``merge convert``: a mergekit recipe rewritten in our format (t = share of the base), or the exact list of
what our format cannot express.

Parameter chains become rules: mergekit's filters (plain substrings, first match wins, no match falls
through to the next scope) become ``re:`` rules in precedence order; a gradient gets an extra rule giving
tensors outside the layer stack its first value (mergekit puts embeddings, final norm and lm_head at the
first value; our depth convention puts the final norm and lm_head at the last).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import InputError
from ..methods import registry
from ..tensor_names import OUTSIDE_LAYERS
from .mergekit import MergekitRecipe, method_params
from .schema import Recipe


class _Unexpressible(Exception):
    pass


def convert(recipe: MergekitRecipe) -> tuple[Recipe, list[str]]:
    """Our-format :class:`Recipe` equivalent to ``recipe``, and notes on remaining differences.

    Raises :class:`InputError` listing everything that cannot be expressed."""
    problems: list[str] = []
    notes = ["converted from a mergekit recipe; t is now the share of the BASE model (0 = SFT, 1 = base)",
             "output layout, config.json and tokenizer files now come from the (first) SFT; mergekit takes them "
             "from base_model (tensor values are the same)"]
    chains = _Chains(recipe, problems)
    problems += feature_problems(recipe)
    spec, variant = registry.for_mergekit(recipe.merge_method)
    fields: dict = {"dtype": recipe.output_dtype}
    if recipe.working_dtype not in (None, "float32", "float64"):
        notes.append(f"mergekit rounds inputs to dtype {recipe.working_dtype} (and computes task arithmetic in it); "
                     "mergeback's format computes in float32: results differ by that rounding")
    if spec.convert is None:
        problems.append(f"merge_method {variant.name} (mergeback's format has no equivalent)")
    else:
        spec.convert(variant, recipe, chains, fields, problems, notes)
    if problems:
        raise InputError("cannot express this mergekit recipe in mergeback's format: " + "; ".join(problems)
                         + " (run it as is with `merge run`)")
    fields = {k: v for k, v in fields.items() if v is not None}
    from pydantic import ValidationError

    try:
        return Recipe.model_validate(fields), notes
    except ValidationError as e:  # a value our schema refuses (e.g. breadcrumbs gamma + density > 1)
        raise InputError("cannot express this mergekit recipe in mergeback's format: "
                         + "; ".join(dict.fromkeys(_problem(err) for err in e.errors()))
                         + " (run it as is with `merge run`)") from None


def feature_problems(recipe: MergekitRecipe) -> list[str]:
    """mergekit recipe features our format has no field for: frankenmerge slices, tokenizer_source of another
    model, chat_template, ``model+adapter`` references."""
    out = []
    if recipe.slices is not None:
        end = 0
        for s in recipe.slices:
            ranges = {tuple(src.layer_range) for src in s.sources}
            if len(ranges) != 1 or next(iter(ranges))[0] != end:
                out.append("slices that reorder or repeat layers (a frankenmerge)")
                break
            end = next(iter(ranges))[1]
    if recipe.tokenizer_source not in (None, "base"):
        out.append(f"tokenizer_source: {recipe.tokenizer_source} (embedding rows mapped to another tokenizer)")
    if recipe.chat_template is not None:
        out.append("chat_template")
    out += [f"{ref!r} (a LoRA folded over another model; fold it with `merge fold` first)"
            for ref in recipe.model_refs() if "+" in ref]
    return out


def _problem(err: dict) -> str:
    """One pydantic complaint about the converted recipe, in mergekit's words (its parameter names)."""
    from .loading import error_text, user_path

    path = [str(p) for p in user_path(err["loc"])]
    if path[:1] == ["sparsify"]:
        key = "parameters " + ("/".join(path[1:]) if len(path) > 1 else "density/gamma")
    else:
        key = ".".join(path) or "recipe"
    got = err.get("input")
    shown = f" (got {got!r})" if isinstance(got, (int, float, str)) and len(path) > 1 else ""
    return f"{key}: {error_text(err)}{shown}"


def convert_text(recipe: MergekitRecipe) -> str:
    """The converted recipe as YAML, the notes as comments on top."""
    ours, notes = convert(recipe)
    return "".join(f"# {n}\n" for n in notes) + ours.to_yaml()


class _Chains:
    """mergekit parameter precedence (model entry -> slice -> global -> default) as our values."""

    def __init__(self, recipe: MergekitRecipe, problems: list[str]):
        self.recipe, self.problems = recipe, problems
        self.specs = {p.name: p for p in method_params(recipe.merge_method)}
        slices = recipe.slices or []
        if len(slices) > 1:
            blocks = [s.parameters or {} for s in slices] + [src.parameters or {} for s in slices for src in s.sources]
            if any(_has_list(v) for b in blocks for v in b.values()) or _has_list_in(recipe.parameters):
                problems.append("gradients or filters over several slices (mergekit restarts gradients in every slice)")
            if any((s.parameters or {}) != (slices[0].parameters or {}) for s in slices):
                problems.append("slices with different parameters")
            per_source = [[src.parameters or {} for src in s.sources] for s in slices]
            if any(p != per_source[0] for p in per_source):
                problems.append("slices whose sources have different parameters")

    def _settings(self, name: str, ref: str | None) -> list:
        r = self.recipe
        blocks = []
        if ref is not None and self.specs[name].scope != "shared":
            if r.models is not None:
                blocks += [m.parameters for m in r.models if m.model == ref]
            else:
                blocks += [src.parameters for src in r.slices[0].sources if src.model == ref]
        if r.slices is not None:
            blocks.append(r.slices[0].parameters)
        blocks.append(r.parameters)
        return [b[name] for b in blocks if b and name in b and b[name] is not None]

    def scalar(self, name: str, ref: str | None):
        """The value when it is one plain scalar for every tensor, else None."""
        settings = self._settings(name, ref)
        if not settings:
            return self.specs[name].default
        first = settings[0]
        if isinstance(first, (list, dict)):
            return None
        return _bool_or_float(first, name)

    def value(self, name: str, ref: str | None, f: Callable[[float], float]):
        """Our value (number, gradient or rules) for the chain, each number mapped through ``f``."""
        rules: list[dict] = []
        for setting in self._settings(name, ref):
            if self._add(setting, None, f, rules):
                break
        else:
            default = self.specs[name].default
            if default is not None:
                rules.append({"value": f(float(default))})
        if len(rules) == 1 and "match" not in rules[0]:
            return rules[0]["value"]
        return rules

    def _add(self, setting, pattern: str | None, f, rules: list) -> bool:
        """Append the rules for ``setting`` (under ``pattern``); True when it matches every tensor."""
        if isinstance(setting, dict):
            setting = [setting]
        if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
            for entry in setting:
                flt = entry.get("filter")
                if flt is None or flt == "*":
                    if self._add(entry["value"], pattern, f, rules):
                        return True
                else:
                    self._add(entry["value"], "re:" + re.escape(str(flt)), f, rules)
            return False
        if isinstance(setting, list):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
                self.problems.append(f"a gradient of non-numbers {setting!r}")
                return True
            values = [_tidy(f(float(v))) for v in setting]
            outside = OUTSIDE_LAYERS if pattern is None else f"(?=.*{pattern[3:]}){OUTSIDE_LAYERS}"
            rules.append({"match": "re:" + outside, "value": values[0]})
            rules.append({"value": values} if pattern is None else {"match": pattern, "value": values})
            return pattern is None
        value = _tidy(f(float(_bool_or_float(setting, "value"))))
        rules.append({"value": value} if pattern is None else {"match": pattern, "value": value})
        return pattern is None


def _tidy(x: float) -> float:
    """1 - 0.7 printed as 0.3, not 0.30000000000000004."""
    return round(x, 12)


def _bool_or_float(value, name: str):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"parameters.{name}: {value!r} is not a number") from None


def _has_list(v) -> bool:
    return isinstance(v, (list, dict))


def _has_list_in(block) -> bool:
    return any(_has_list(v) for v in (block or {}).values())

