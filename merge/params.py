"""Value types of the methods' parameters in our recipe format (pydantic only, no torch): a per-tensor value
(number, gradient over depth, or rules), and how task vectors are sparsified. The recipe schema and the
methods' parameter models (``MethodSpec.params``) share them; a leaf module, outside merge.methods (torch)."""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

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
        check_finite(v)
        return v


Value = Union[Number, Gradient, list[Rule]]


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


def finite_value(v):
    """A per-tensor value (number, gradient or rules) that is finite and not empty; rules check their own."""
    if v is not None and not is_rules(v):
        check_finite(v)
    return v
