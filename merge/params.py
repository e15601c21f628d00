"""Value types of the methods' parameters in our recipe format (pydantic only, no torch): a per-tensor value
(number, gradient over depth, or rules), and how task vectors are sparsified. The recipe schema and the
methods' parameter models (``MethodSpec.params``) share them; a leaf module, outside merge.methods (torch)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

Number = Annotated[float, Strict()]  # strict: a boolean (t: true) or a string is not a number; an int is
Gradient = list[Number]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]


class Rule(BaseModel):
    """One rule of a per-tensor value: tensors matching ``match`` get ``value`` (no match = default)."""

    model_config = ConfigDict(extra="forbid")
    match: str | None = None
    value: Number | Gradient

    @field_validator("match")
    @classmethod
    def _pattern(cls, v):
        if v is not None and v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"{v!r} is not a valid regular expression ({e})") from None
        return v

    @field_validator("value")
    @classmethod
    def _finite(cls, v):
        check_finite(v)
        return v


Value = Union[Number, Gradient, list[Rule]]  # noqa: UP007 (pydantic reads it at import)


def is_rules(v) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], Rule)


def check_finite(v) -> None:
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError("must be a finite number")
    if isinstance(v, list) and not v:
        raise ValueError("must not be empty")


class Sparsify(BaseModel):
    """How each task vector is thinned before it is added (task arithmetic only)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["magnitude", "random", "breadcrumbs", "della"]
    density: Number = Field(gt=0, le=1, description="fraction of each delta's entries kept")
    gamma: Number = Field(0.01, ge=0, lt=1, description="breadcrumbs: fraction of largest entries dropped")
    epsilon: Number = Field(0.15, gt=0, lt=0.5, description="della: keep probabilities span density +/- epsilon")
    seed: Int = 0
    rescale: Bool | Literal["l1"] = Field(
        True, description="random (DARE): divide survivors by density; l1: restore each delta's L1 norm "
                          "(della: true means l1)")

    @model_validator(mode="before")
    @classmethod
    def _spectral(cls, data):
        if isinstance(data, dict) and data.get("method") in ("svd", "svd-threshold", "svd_threshold"):
            raise ValueError(f"{data['method']} keeps singular components, not entries: it is method spectral "
                             "(method: spectral, with rank: R or threshold: donoho_gavish, and no sparsify)")
        return data

    @model_validator(mode="after")
    def _band(self):
        if self.method == "breadcrumbs" and self.gamma + self.density > 1:
            raise ValueError("breadcrumbs needs gamma + density <= 1")
        if "gamma" in self.model_fields_set and self.method != "breadcrumbs":
            raise ValueError(f"gamma: only breadcrumbs drops the largest entries; method {self.method} has no "
                             "gamma (remove it)")
        if "seed" in self.model_fields_set and self.method not in ("random", "della"):
            raise ValueError(f"seed: only methods random and della draw masks; {self.method} is deterministic "
                             "(remove it)")
        if "epsilon" in self.model_fields_set and self.method != "della":
            raise ValueError(f"epsilon: only della spreads keep probabilities by rank; method {self.method} has no "
                             "epsilon (remove it)")
        if self.method == "della" and self.density < 1 and not (
                self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(f"della needs density - epsilon > 0 and density + epsilon < 1 (density {self.density:g}, "
                             f"epsilon {self.epsilon:g}); lower epsilon")
        return self


def finite_value(v):
    """A per-tensor value (number, gradient or rules) that is finite and not empty; rules check their own."""
    if v is not None and not is_rules(v):
        check_finite(v)
    return v


class ScaledDelta(BaseModel):
    """Recipe parameters of a method that adds scaled deltas to the base: a default ``scale``, which an SFT may
    override with its own (``sft: [{model: ..., scale: ...}]``)."""

    scale: Value | None = Field(None, description="default scale of every delta")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v):
        return finite_value(v)

    def scale_of(self, index: int) -> Value:
        """SFT ``index``'s scale: its own, else the default ``scale``."""
        own = self.sft[index].scale
        return own if own is not None else self.scale
