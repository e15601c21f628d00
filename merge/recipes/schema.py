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
    dtype: bfloat16          # output dtype (default: the SFT's)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    rescale: bool = Field(True, description="random (DARE): divide survivors by density")

    @model_validator(mode="after")
    def _band(self):
        if self.method == "breadcrumbs" and self.gamma + self.density > 1:
            raise ValueError("breadcrumbs needs gamma + density <= 1")
        return self


class SftModel(BaseModel):
    """An SFT checkpoint (a folder, Hub id or alias), with its own scale for task arithmetic."""

    model_config = ConfigDict(extra="forbid")
    model: str
    scale: Optional[Value] = None


class Recipe(BaseModel):
    """A complete, reproducible description of one merge."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["linear", "slerp", "task_arithmetic"]
    base: str
    sft: list[SftModel]
    t: Optional[Value] = Field(None, description="share of the base model: 0 = SFT, 1 = base")
    scale: Optional[Value] = Field(None, description="task arithmetic: default scale of every delta")
    sparsify: Optional[Sparsify] = None
    sign_consensus: Union[bool, Literal["sum", "count"]] = False
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_shard_size: str = "5GB"
    out: Optional[str] = None

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
        if self.method in ("linear", "slerp"):
            if self.t is None:
                raise ValueError(f"t: required for method {self.method} (share of the base, 0..1)")
            if len(self.sft) != 1:
                raise ValueError(f"sft: method {self.method} takes exactly one SFT model")
            if self.scale is not None or self.sparsify is not None or self.sign_consensus:
                raise ValueError("scale/sparsify/sign_consensus: only for method task_arithmetic")
        else:
            if self.t is not None:
                raise ValueError("t: task_arithmetic uses scale (the multiplier of each delta), not t")
            if self.scale is None and any(s.scale is None for s in self.sft):
                raise ValueError("scale: give a scale (top level or per SFT) for task_arithmetic")
            if self.sign_consensus and len(self.sft) < 2:
                raise ValueError("sign_consensus: needs at least two SFT models")
        return self

    # -- YAML ------------------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data = {"method": self.method, **data}
        data["sft"] = [s["model"] if set(s) == {"model"} else s for s in data["sft"]]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_yaml(Path(path).read_text())

    def scale_of(self, index: int) -> Value:
        own = self.sft[index].scale
        return own if own is not None else self.scale
