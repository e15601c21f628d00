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
    dtype: bfloat16          # output dtype (default: the SFT's)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .yaml_source import parse_yaml, validate

Number = float
Gradient = list[float]


class Rule(BaseModel):
    """One rule of a per-tensor value: tensors matching ``match`` get ``value`` (no match = default)."""

    model_config = ConfigDict(extra="forbid")
    match: Optional[str] = None
    value: Union[Number, Gradient]

    @field_validator("value")
    @classmethod
    def _finite(cls, v):
        _check_finite(v)
        return v


Value = Union[Number, Gradient, list[Rule]]


def _is_rules(v) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], Rule)


def _check_finite(v) -> None:
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError("must be a finite number")
    if isinstance(v, list) and not v:
        raise ValueError("must not be empty")


class Sparsify(BaseModel):
    """How each task vector is thinned before it is added (task arithmetic only)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude", "random", "breadcrumbs"]
    density: float = Field(gt=0, le=1, description="fraction of each delta's entries kept")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: fraction of largest entries dropped")
    seed: int = 0
    rescale: Union[bool, Literal["l1"]] = Field(
        True, description="random (DARE): divide survivors by density; l1: restore each delta's L1 norm")

    @model_validator(mode="after")
    def _band(self):
        if self.method == "breadcrumbs" and self.gamma + self.density > 1:
            raise ValueError("breadcrumbs needs gamma + density <= 1")
        return self


class LinesSchedule(BaseModel):
    """LiNeS: layer l of L (1-based) keeps ``lam(l) = alpha + beta*(l-1)/(L-1)`` of its delta."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["lines"]
    alpha: float = Field(allow_inf_nan=False)
    beta: float = Field(allow_inf_nan=False)


class BottomKSchedule(BaseModel):
    """The first ``k`` layers are taken from the base; everything else follows ``t`` (or ``scale``)."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["bottom_k"]
    k: int = Field(ge=0)


Schedule = Annotated[Union[LinesSchedule, BottomKSchedule], Field(discriminator="preset")]


class SftModel(BaseModel):
    """An SFT checkpoint (a folder, Hub id or alias), with its own scale for task arithmetic."""

    model_config = ConfigDict(extra="forbid")
    model: str
    scale: Optional[Value] = None


class Recipe(BaseModel):
    """A complete, reproducible description of one merge."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="a registered method (merge.methods.registry): linear, slerp, task_arithmetic")
    base: str
    sft: list[SftModel]
    t: Optional[Value] = Field(None, description="share of the base model: 0 = SFT, 1 = base")
    scale: Optional[Value] = Field(None, description="task arithmetic: default scale of every delta")
    sparsify: Optional[Sparsify] = None
    sign_consensus: Union[bool, Literal["sum", "count"]] = False
    normalize: bool = Field(False, description="task arithmetic: divide by the sum of the (kept) scales")
    schedule: Optional[Schedule] = Field(None, description="a named per-layer preset (lines, bottom_k)")
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_shard_size: str = "5GB"
    out: Optional[str] = None

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

    @field_validator("t", "scale")
    @classmethod
    def _finite(cls, v):
        if v is not None and not (isinstance(v, list) and v and isinstance(v[0], Rule)):
            _check_finite(v)
        return v

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
        return "sft0"

    @property
    def output_dtype(self) -> str | None:
        """The dtype the output is written in (None: each tensor keeps the SFT's)."""
        return self.dtype

    def input_refs(self) -> dict[str, str]:
        """Model key -> reference, base first (``base`` may be ``auto``)."""
        return {"base": self.base, **{f"sft{i}": s.model for i, s in enumerate(self.sft)}}

    def pinned(self, refs: dict[str, str]) -> "Recipe":
        """The recipe with inputs named by ``refs`` (key -> pinned reference) and no ``out``."""
        return self.model_copy(update={
            "base": refs["base"],
            "sft": [s.model_copy(update={"model": refs[f"sft{i}"]}) for i, s in enumerate(self.sft)],
            "out": None,
        })

    # -- YAML ------------------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data = {"method": self.method, **data}
        data["sft"] = [s["model"] if set(s) == {"model"} else s for s in data["sft"]]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> "Recipe":
        """Parse and validate; errors name the key and its line (see :mod:`merge.recipes.yaml_source`)."""
        node, data = parse_yaml(text, source)
        if "merge_method" in data:
            raise ValueError(f"{source}: a mergekit recipe; load it with merge.recipes.load_recipe")
        return validate(cls, data, node, source)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_yaml(Path(path).read_text(), str(path))

    def scale_of(self, index: int) -> Value:
        own = self.sft[index].scale
        return own if own is not None else self.scale
