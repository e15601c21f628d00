"""mergekit-format recipes (``merge_method:`` at the top), run with mergekit 0.1.5's semantics.

Supported: the registered methods over ``models:`` or ``slices:`` (slices may reorder, repeat or drop layers,
a frankenmerge: every slice lists the same models in the same order, each source a range of the slice's
length; passthrough: one source per slice, from any model), ``chat_template`` (a name mergekit ships, ``auto``
or a jinja string), ``tokenizer_source: base`` or one of the recipe's models (vocabulary rows mapped by token
string), and ``model+adapter`` references (the LoRA folded on read). Refused with an error that names it: other
methods, ``modules``, ``tokenizer:``, ``tokenizer_source: union``. See docs/mergekit-semantics.md for the
semantics reproduced here.

In these recipes ``t`` is mergekit's: the share of the *non-base* model (slerp ``t=0`` gives base_model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from ..errors import InputError
from ..keys import BASE, PRIMARY
from ..methods import registry
from ..methods.base import ParamSpec
from ..tensor_names import Structure
from .yaml_source import model_keys

SUPPORTED = registry.mergekit_names()
KNOWN_UNSUPPORTED = ("task_adapter",)
DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float64": "float64",
               "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32", "fp32": "float32",
               "double": "float64"}
BOOL_PARAMS = ("normalize", "rescale", "int8_mask")
TOP_LEVEL = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "mergeback")


def method_params(method: str) -> list[ParamSpec]:
    """The parameters mergekit reads for ``method`` (all others are ignored, as mergekit does)."""
    _, variant = registry.for_mergekit(method)
    return list(variant.params)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # mergekit ignores unknown keys; we warn about them


class MkModel(_Loose):
    model: str
    parameters: dict[str, Any] | None = None


class MkSource(_Loose):
    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] | None = None


class MkSlice(_Loose):
    sources: list[MkSource]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    residual_weight: float | None = None


class MergebackOptions(BaseModel):
    """Our own settings inside a mergekit file (mergekit ignores this key)."""

    model_config = ConfigDict(extra="forbid")
    out: str | None = None
    device: str = "auto"
    max_shard_size: str = "5GB"
    seed: int = 0


class MergekitRecipe(_Loose):
    """A mergekit YAML config; ``input_refs``/``primary``/``pinned``/``to_yaml`` are what ``merge.run`` uses."""

    merge_method: str
    base_model: str | None = None
    models: list[MkModel] | None = None
    slices: list[MkSlice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    mergeback: MergebackOptions | None = None
    _lines: dict = PrivateAttr(default_factory=dict)  # key path -> line in the file it was read from
    _source: str = PrivateAttr("recipe")

    # -- validation ------------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _supported(self):
        method = self.merge_method
        if method not in SUPPORTED:
            known = "a mergekit method mergeback does not implement" if method in KNOWN_UNSUPPORTED else \
                "not a mergekit method"
            raise ValueError(f"merge_method: {method!r} is {known}; supported: {', '.join(SUPPORTED)}")
        if self.modules is not None:
            raise ValueError("modules: multi-module mergekit recipes are not supported; use models or slices")
        if (self.models is None) == (self.slices is None):
            raise ValueError("models: give exactly one of models or slices")
        if self.tokenizer is not None:
            raise ValueError("tokenizer: building a tokenizer is not supported; remove it (the output takes "
                             "base_model's tokenizer, like tokenizer_source: base)")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: union (a tokenizer built from every model's vocabulary) is not "
                             "supported; use base or one of the recipe's models")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source not in self.model_refs():
            raise ValueError(f"tokenizer_source: {self.tokenizer_source!r} is not one of the recipe's models; use "
                             "base or a model listed in the recipe")
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value.removeprefix("torch.") not in DTYPE_NAMES:
                raise ValueError(f"{key}: {value!r} is not a float dtype; use bfloat16, float16, float32 or "
                                 "float64")
        for path, ref in self._refs_with_paths():
            if ref.count("+") > 1 or "+" in ref and not all(p.strip() for p in ref.split("+")):
                raise ValueError(f"{path}: {ref!r} is not MODEL or MODEL+LORA_ADAPTER")
        for path, params in self._parameter_blocks():
            for name, value in (params or {}).items():
                _check_setting(value, f"{path}.{name}")
        if self.slices is not None:
            _check_slices(self.slices, self.base_model, registry.for_mergekit(method)[0].slice_sources_vary)
        self._check_inputs()
        return self

    def _refs_with_paths(self):
        if self.base_model is not None:
            yield "base_model", self.base_model
        for i, m in enumerate(self.models or []):
            yield f"models.{i}.model", m.model
        for i, s in enumerate(self.slices or []):
            for j, src in enumerate(s.sources):
                yield f"slices.{i}.sources.{j}.model", src.model

    def _parameter_blocks(self):
        yield "parameters", self.parameters
        for i, m in enumerate(self.models or []):
            yield f"models.{i}.parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            yield f"slices.{i}.parameters", s.parameters
            for j, src in enumerate(s.sources):
                yield f"slices.{i}.sources.{j}.parameters", src.parameters

    def _check_inputs(self) -> None:
        listed = [(f"models.{i}.model", m.model) for i, m in enumerate(self.models)] if self.models is not None \
            else [(f"slices.0.sources.{j}.model", s.model) for j, s in enumerate(self.slices[0].sources if self.slices
                                                                                 else [])]
        first: dict[str, str] = {}
        for path, ref in listed:
            if ref in first:
                raise ValueError(f"{path}: {ref!r} is listed twice (also {first[ref]}); list each model once "
                                 "(mergekit refuses duplicate merge inputs)")
            first[ref] = path
        refs = self.model_refs()
        spec, variant = registry.for_mergekit(self.merge_method)
        spec.check_mergekit(variant, self)
        if not refs:
            raise ValueError("models: give at least one model")

    # -- inputs ----------------------------------------------------------------------------------------------
    def source_refs(self) -> list[str]:
        """The models as listed (for slices: every slice's sources in order), duplicates removed."""
        listed = [m.model for m in self.models] if self.models is not None else \
            [src.model for s in self.slices for src in s.sources]
        return list(dict.fromkeys(listed))

    def model_refs(self) -> list[str]:
        """Every input in mergekit's order: the listed models, then base_model when it is not listed."""
        refs = self.source_refs()
        if self.base_model is not None and self.base_model not in refs:
            refs.append(self.base_model)
        return refs

    def keys(self) -> dict[str, str]:
        """Reference -> model key: ``base`` for base_model, ``sft0``, ``sft1``... for the others in order."""
        out, i = {}, 0
        for ref in self.model_refs():
            if ref == self.base_model:
                out[ref] = "base"
            else:
                out[ref], i = f"sft{i}", i + 1
        return out

    def input_refs(self) -> dict[str, str]:
        keys = self.keys()
        ordered = sorted(keys.items(), key=lambda kv: kv[1] != "base")
        return {key: ref for ref, key in ordered}

    @property
    def primary(self) -> str:
        """Output layout, config and tokenizer come from base_model, else the first model (as in mergekit)."""
        return BASE if self.base_model is not None else PRIMARY

    @property
    def method(self) -> str:
        return self.merge_method

    @property
    def options(self) -> MergebackOptions:
        return self.mergeback or MergebackOptions()

    @property
    def out(self) -> str | None:
        return self.options.out

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def max_shard_size(self) -> str:
        return self.options.max_shard_size

    @property
    def output_dtype(self) -> str | None:
        """``out_dtype``, else ``dtype``, normalised (None: each tensor keeps its stored dtype)."""
        value = self.out_dtype or self.dtype
        return DTYPE_NAMES[value.removeprefix("torch.")] if value else None

    @property
    def working_dtype(self) -> str | None:
        """mergekit's ``dtype``: inputs are cast to it before merging (None: the inputs' own dtype)."""
        return DTYPE_NAMES[self.dtype.removeprefix("torch.")] if self.dtype else None

    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key of mergekit's format we read, at any nesting level (for suggestions)."""
        return model_keys(cls)

    def unknown_keys(self) -> list[str]:
        """Keys mergekit would silently ignore (listed as warnings)."""
        found = [k for k in (self.model_extra or {})]
        for path, params in self._parameter_blocks():
            known = {p.name for p in method_params(self.merge_method)}
            found += [f"{path}.{k}" for k in (params or {}) if k not in known]
        for i, m in enumerate(self.models or []):
            found += [f"models.{i}.{k}" for k in (m.model_extra or {})]
        return found

    def with_options(self, **updates) -> MergekitRecipe:
        """A copy with mergeback options (out, device, max_shard_size, seed) replaced."""
        opts = self.options.model_copy(update={k: v for k, v in updates.items() if v is not None})
        return self.model_copy(update={"mergeback": opts if opts != MergebackOptions() else None})

    def pinned(self, refs: dict[str, str]) -> MergekitRecipe:
        """The recipe with every model reference replaced by its pinned form (key -> ref), and no out."""
        keys = self.keys()
        swap = {ref: refs[key] for ref, key in keys.items()}
        data = self.model_dump(mode="json", exclude_none=True)
        if data.get("base_model") is not None:
            data["base_model"] = swap[data["base_model"]]
        if data.get("tokenizer_source") in swap:
            data["tokenizer_source"] = swap[data["tokenizer_source"]]
        for m in data.get("models") or []:
            m["model"] = swap[m["model"]]
        for s in data.get("slices") or []:
            if s.get("base_model") is not None:
                s["base_model"] = swap[s["base_model"]]
            for src in s["sources"]:
                src["model"] = swap[src["model"]]
        if data.get("mergeback"):
            data["mergeback"].pop("out", None)
            data["mergeback"] = {k: v for k, v in data["mergeback"].items()
                                 if v != getattr(MergebackOptions(), k)} or None
            if data["mergeback"] is None:
                del data["mergeback"]
        return MergekitRecipe.model_validate(data)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if "mergeback" in data:
            data["mergeback"] = {k: v for k, v in data["mergeback"].items()
                                 if v != getattr(MergebackOptions(), k)}
            if not data["mergeback"]:
                del data["mergeback"]
        for block in (data.get("slices") or []):
            for src in block["sources"]:
                if "layer_range" in src:
                    src["layer_range"] = list(src["layer_range"])
        return yaml.safe_dump(data, sort_keys=False)


def _check_setting(value, path: str) -> None:
    """A parameter value: scalar, gradient (list of scalars), or conditional ({filter, value} or a list)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            extra = set(v) - {"filter", "value"}
            if extra or "value" not in v:
                raise ValueError(f"{path}: a conditional entry is {{filter: SUBSTRING, value: ...}} (entry {i} "
                                 f"has {sorted(v)})")
            _check_setting(v["value"], f"{path}.{i}.value")
        return
    if isinstance(value, list):
        if any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"{path}: a gradient is a list of numbers, not of lists or mappings")
        return
    if not isinstance(value, (int, float, str, bool)) and value is not None:
        raise ValueError(f"{path}: expected a number, a gradient list or {{filter, value}} entries")


def _check_slices(slices: list[MkSlice], base_model: str | None, sources_vary: bool = False) -> None:
    """Every slice lists the same models in the same order (unless the method lets each slice take its own:
    ``sources_vary``), each source with a layer_range of the slice's length; the ranges may reorder, repeat or
    drop layers (a frankenmerge)."""
    first = [s.model for s in slices[0].sources]
    for i, s in enumerate(slices):
        if not s.sources:
            raise ValueError(f"slices.{i}.sources: empty")
        for j, src in enumerate(s.sources):
            if src.layer_range is None:
                raise ValueError(f"slices.{i}.sources.{j}: every source needs a layer_range")
            start, stop = src.layer_range
            if start < 0 or stop <= start:
                raise ValueError(f"slices.{i}.sources.{j}.layer_range: [{start}, {stop}) is empty or negative; "
                                 "give [first, end) with first < end")
        sizes = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(sizes) != 1:
            raise ValueError(f"slices.{i}.sources: the layer ranges have different lengths {sorted(sizes)}; "
                             "every source of a slice gives the same number of layers")
        if not sources_vary and [src.model for src in s.sources] != first:
            raise ValueError(f"slices.{i}.sources: the models differ from slices.0's; mergeback supports only "
                             "slices over the same models in the same order")
        if s.base_model is not None and s.base_model != base_model:
            raise ValueError(f"slices.{i}.base_model: a per-slice base_model different from base_model is not "
                             "supported")


def output_layers(recipe: MergekitRecipe) -> dict[str, dict[int, int]] | None:
    """Per model reference, output layer -> the input layer it reads: output layer ``start_i + k`` of slice ``i``
    reads layer ``layer_range[0] + k`` of each of the slice's sources (a model lists only the output layers of the
    slices it is a source of); None for ``models:`` recipes."""
    if recipe.slices is None:
        return None
    out: dict[str, dict[int, int]] = {}
    for (start, stop), s in zip(output_ranges(recipe), recipe.slices):
        for src in s.sources:
            out.setdefault(src.model, {}).update(zip(range(start, stop), range(*src.layer_range)))
    return out


def output_ranges(recipe: MergekitRecipe) -> list[tuple[int, int]]:
    """The output layers each slice makes: consecutive ranges of the slices' lengths."""
    ranges, end = [], 0
    for s in recipe.slices:
        start, stop = s.sources[0].layer_range
        ranges.append((end, end + stop - start))
        end += stop - start
    return ranges


CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def named_chat_template(value: str) -> str | None:
    """The template text of a name mergekit 0.1.5 ships (``chatml``, ``llama3``...), else None; mergekit looks
    a value up as a name when it is under 256 characters with no newline and no ``{``."""
    if len(value) < 256 and "\n" not in value and "{" not in value and value in CHAT_TEMPLATE_NAMES:
        from importlib.resources import files

        return files("merge.recipes.chat_templates").joinpath(f"{value}.jinja").read_text(encoding="utf-8")
    return None


def check_chat_template(value: str) -> None:
    """``auto``, a shipped name, or a jinja template (mergekit: at least 20 characters with a ``{``)."""
    if value == "auto" or named_chat_template(value) is not None:
        return
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"chat_template: {value!r} is neither a template name ({', '.join(CHAT_TEMPLATE_NAMES)}, "
                         "auto) nor a jinja template (at least 20 characters with {{ ... }})")


# -- per-tensor parameter resolution ---------------------------------------------------------------------
def evaluate_setting(setting, name: str, t: float):
    """mergekit's value of ``setting`` for tensor ``name`` at layer position ``t``; None when no filter
    matches (resolution then falls through to the next scope)."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or str(f) in name:
                return evaluate_setting(entry["value"], name, t)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        n = len(setting)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            x = t * (n - 1)
            i0 = int(x // 1)
            i1 = min(n - 1, i0 + 1)
            frac = x - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (n - 1))]
    return setting


def coerce(value, spec: ParamSpec, where: str):
    """pydantic's lax validation as mergekit applies it: floats from numbers/numeric strings (not from
    booleans: ``t: true`` is refused), bools from bools/0/1/'true'/'false'."""
    if spec.name in BOOL_PARAMS or isinstance(spec.default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise InputError(f"{where}: {spec.name} must be true or false, got {value!r}")
    if isinstance(value, bool):  # mergekit's pydantic would read true as 1.0: almost surely a slip
        raise InputError(f"{where}: {spec.name} must be a number, got {str(value).lower()} (a boolean is not a "
                         "number)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {spec.name} must be a number, got {value!r}") from None


@dataclass
class TensorPosition:
    """Which slice a tensor belongs to, and its gradient position ``t`` there."""

    slice_index: int
    t: float


class Resolver:
    """Parameter values per tensor and input, with mergekit's precedence and gradient positions."""

    def __init__(self, recipe: MergekitRecipe, n_layers: int | Structure):
        self.recipe = recipe
        self.structure = Structure.coerce(n_layers)
        self.n_layers = n_layers = self.structure.counts["text"]
        self.specs = {p.name: p for p in method_params(recipe.merge_method)}
        if recipe.slices is not None:
            if len(self.structure.layered) > 1:
                raise InputError("slices: the models have several layer stacks (" +
                                 ", ".join(f"{s} {self.structure.counts[s]} layers" for s in self.structure.layered)
                                 + "); mergekit refuses slices there too: use models:")
            self.ranges = output_ranges(recipe)
            if self.ranges[-1][1] != n_layers:
                raise InputError(f"slices: the slices make {self.ranges[-1][1]} layers but the output model has "
                                 f"{n_layers} (inputs not read through the recipe's input_views)")
        else:
            self.ranges = [(0, n_layers)]

    def position(self, name: str) -> TensorPosition:
        """mergekit's gradient position: layer l of its module's (stack's) L layers is ``l / (L - 1)``, 1 when
        L = 1; every tensor outside the layers (embeddings, projector, norms, lm_head) is at t=0."""
        pos = self.structure.position(name)
        layer = pos.layer
        if layer is None:  # embeddings use the first slice, everything after the stack the last; both at t=0
            return TensorPosition(0 if pos.before else len(self.ranges) - 1, 0.0)
        ranges = self.ranges if pos.stack == "text" else [(0, pos.count)]
        for i, (start, stop) in enumerate(ranges):
            if start <= layer < stop:
                size = stop - start
                return TensorPosition(i, (layer - start) / (size - 1) if size > 1 else 1.0)
        raise InputError(f"tensor {name!r}: layer {layer} is outside every slice's layer_range")

    def _scopes(self, slice_index: int, ref: str | None):
        """Parameter blocks in precedence order: the source (model entry), the slice, the global block."""
        r = self.recipe
        blocks = []
        if ref is not None:
            if r.models is not None:
                blocks += [(f"models.{i}.parameters", m.parameters) for i, m in enumerate(r.models) if m.model == ref]
            else:
                s = r.slices[slice_index]
                blocks += [(f"slices.{slice_index}.sources.{j}.parameters", src.parameters)
                           for j, src in enumerate(s.sources) if src.model == ref]
        if r.slices is not None:
            blocks.append((f"slices.{slice_index}.parameters", r.slices[slice_index].parameters))
        blocks.append(("parameters", r.parameters))
        return blocks

    def value(self, param: str, name: str, ref: str | None = None):
        """The value of ``param`` for tensor ``name`` (and input ``ref`` for per-input parameters)."""
        spec = self.specs[param]
        pos = self.position(name)
        scope_ref = ref if spec.scope != "shared" else None  # a shared parameter in a model entry is ignored
        for where, block in self._scopes(pos.slice_index, scope_ref):
            if block and param in block:
                v = evaluate_setting(block[param], name, pos.t)
                if v is not None:
                    return coerce(v, spec, where)
        if spec.required:
            who = f" for {ref}" if ref else ""
            raise InputError(f"parameters: missing required parameter {param}{who} (tensor {name}); set it in "
                             "the model entry or in the global parameters")
        return spec.default
