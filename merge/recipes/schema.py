"""Our recipe format, validated with pydantic. ``t`` is always the share of the base model.

.. code-block:: yaml

    method: slerp            # linear | slerp | task_arithmetic
    base: ./llama3-8b
    sft: ./med               # or a list; task arithmetic: [{model: ./a, scale: 0.7}, ./b]
    t: 0.3                   # a number, a gradient over depth [0.6, 0.1], or rules:
    # t:
    #   - {match: embed, value: 0}          # group, glob, or re:REGEX; first match wins
    #   - {match: attn, value: [0.5, 0.1]}
    #   - {value: 0.3}                      # no match = default
    # schedule: {preset: lines, alpha: 0.2, beta: 0.8}   # per-layer delta scale, see values.py
    # schedule: {preset: bottom_k, k: 8}                 # first k layers from the base, the rest per t
    dtype: bfloat16          # output dtype (default: the SFT's; fp8: FP8 block-scaled weights)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from ..errors import InputError
from ..keys import PRIMARY
from ..params import Bool, Int, Number, Rule, Sparsify, Value  # noqa: F401  (Rule, Sparsify, Bool: re-exported)
from .yaml_source import model_keys, parse_yaml, validate


class LinesSchedule(BaseModel):
    """LiNeS: layer l of L (1-based) keeps ``lam(l) = alpha + beta*(l-1)/(L-1)`` of its delta."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["lines"]
    alpha: Number = Field(allow_inf_nan=False)
    beta: Number = Field(allow_inf_nan=False)


class BottomKSchedule(BaseModel):
    """The first ``k`` layers are taken from the base; everything else follows ``t`` (or ``scale``)."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["bottom_k"]
    k: Int = Field(ge=0)


Schedule = Annotated[LinesSchedule | BottomKSchedule, Field(discriminator="preset")]


class SftModel(BaseModel):
    """An SFT checkpoint (a folder, Hub id or alias), with its own scale for task arithmetic."""

    model_config = ConfigDict(extra="forbid")
    model: str
    scale: Value | None = None


class Recipe(BaseModel):
    """A complete, reproducible description of one merge: the fields every method shares.

    A recipe is one branch of a union keyed by ``method``: validating (``Recipe.model_validate``,
    ``from_yaml``) gives an instance of the method's own class, ``Recipe`` plus the method's parameter model
    (``MethodSpec.params``: ``t`` for linear/slerp; ``scale``, ``sparsify``, ``sign_consensus``, ``normalize``
    for task arithmetic). A field of another method is a one-line error naming the methods that take it.
    """

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="a registered method (merge.methods.registry): linear, slerp, task_arithmetic")
    base: str
    sft: list[SftModel]
    schedule: Schedule | None = Field(None, description="a named per-layer preset (lines, bottom_k)")
    dtype: Literal["float32", "float16", "bfloat16", "float64", "fp8"] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_shard_size: str = "5GB"
    out: str | None = None
    _lines: dict = PrivateAttr(default_factory=dict)  # key path -> line in the file it was read from
    _source: str = PrivateAttr("recipe")

    @classmethod
    def model_validate(cls, obj, *args, **kwargs):
        """Validate ``obj`` as the recipe class of its ``method`` (the union's branch)."""
        if cls is Recipe and isinstance(obj, dict):
            branch = _branch(obj.get("method"))
            if branch is not None:
                _refuse_foreign_fields(obj, branch)
                return branch.model_validate(obj, *args, **kwargs)
            # no or an unknown method: that is the complaint, not the fields some method would take
            obj = {k: v for k, v in obj.items() if k in Recipe.model_fields or k not in _method_fields()}
        return super().model_validate(obj, *args, **kwargs)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        from ..methods import registry  # here, not at the top: `import merge` must not import torch

        if v not in registry.names():
            raise ValueError(registry.unknown(v))
        return v

    @field_validator("sft", mode="before")
    @classmethod
    def _sft_list(cls, v):
        items = v if isinstance(v, list) else [v]
        return [{"model": x} if isinstance(x, str) else x for x in items]

    @model_validator(mode="after")
    def _method_fields(self):
        if not self.sft:
            raise ValueError("sft: give at least one SFT model")
        from ..methods import registry

        registry.get(self.method).check_recipe(self)
        return self

    # -- the interface merge.run uses (shared with MergekitRecipe) -------------------------------------------
    @property
    def primary(self) -> str:
        """The input whose layout, config and tokenizer the output takes: the (first) SFT."""
        return PRIMARY

    @property
    def output_dtype(self) -> str | None:
        """The dtype the output is written in (None: each tensor keeps the SFT's)."""
        return self.dtype

    def input_refs(self) -> dict[str, str]:
        """Model key -> reference, base first (``base`` may be ``auto``)."""
        return {"base": self.base, **{f"sft{i}": s.model for i, s in enumerate(self.sft)}}

    def pinned(self, refs: dict[str, str]) -> Recipe:
        """The recipe with inputs named by ``refs`` (key -> pinned reference) and no ``out``."""
        return self.model_copy(update={
            "base": refs["base"],
            "sft": [s.model_copy(update={"model": refs[f"sft{i}"]}) for i, s in enumerate(self.sft)],
            "out": None,
        })

    # -- YAML ------------------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        """The recipe as YAML: method, base, sft, the method's parameters, then the shared settings."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        head = {"method": self.method, **{k: data.pop(k) for k in ("base", "sft") if k in data}}
        params = {k: data.pop(k) for k in list(data) if k not in Recipe.model_fields}
        data = {**head, **params, **data}
        data["sft"] = [s["model"] if set(s) == {"model"} else s for s in data["sft"]]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        """Parse and validate; errors name the key and its line (see :mod:`merge.recipes.yaml_source`)."""
        node, data = parse_yaml(text, source)
        if "merge_method" in data:
            raise ValueError(f"{source}: a mergekit recipe; load it with merge.recipes.load_recipe")
        return validate(cls, data, node, source, Recipe.known_keys)

    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key of our format, at any nesting level, every method's included (for suggestions)."""
        from ..methods import registry

        return model_keys(Recipe, *(_branch(n) for n in registry.names())) | {"match", "value", "model", "scale"}

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_yaml(Path(path).read_text(), str(path))



_BRANCHES: dict[object, type[Recipe]] = {}


def _branch(method) -> type[Recipe] | None:
    """The recipe class of a registered ``method`` (None for an unknown one: ``Recipe`` refuses it)."""
    from ..methods import registry

    if not isinstance(method, str) or method not in registry.names():
        return None
    spec = registry.get(method)
    if spec not in _BRANCHES:
        name = "".join(part.title() for part in method.split("_")) + "Recipe"
        _BRANCHES[spec] = create_model(name, __base__=(Recipe, spec.params), __module__=__name__,
                                       method=(Literal[method], Field(description=f"the method: {method}")))
    return _BRANCHES[spec]


def _method_fields() -> set[str]:
    """The fields some registered method's branch adds to the shared ones."""
    from ..methods import registry

    return {k for n in registry.names() for k in _branch(n).model_fields} - set(Recipe.model_fields)


def _refuse_foreign_fields(data: dict, branch: type[Recipe]) -> None:
    """A key that only other methods take: one line naming them (rather than pydantic's "unknown key")."""
    from ..methods import registry

    for key in data:
        if key in branch.model_fields:
            continue
        takers = [n for n in registry.names() if key in _branch(n).model_fields]
        if takers:
            raise InputError(f"{key}: only for method {' or '.join(takers)} (method {data['method']} does not "
                             "take it)")
