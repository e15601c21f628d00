"""An example method, written as a new module in merge/methods/ would be: ``W = (W_sft + W_base) / 2``.

It is registered only by the test that uses it (merge.methods.registry.register(SPEC)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from merge.methods.base import KernelBase, MethodSpec, Operation, Planned


@dataclass(frozen=True)
class Midpoint(Operation):
    """The elementwise midpoint of the two inputs."""

    kind: ClassVar[str] = "midpoint"

    def preserves_equal_inputs(self) -> bool:
        return True


class MidpointKernel(KernelBase):
    def apply(self, job, xs, state, chunk, reader):
        return xs[0].add_(xs[1]).mul_(0.5)


def _check(recipe) -> None:
    if len(recipe.sft) != 1 or recipe.sft[0].scale is not None:
        raise ValueError("sft: method midpoint takes one SFT model, without a scale")


SPEC = MethodSpec(
    name="midpoint",
    operation=Midpoint,
    kernel=MidpointKernel(),
    check_recipe=_check,
    plan=lambda recipe, values, name: Planned(Midpoint(("sft0", "base")), "1/2"),
    legend=lambda recipe: "midpoint of SFT and base",
    describe=lambda t: "The midpoint `W = (W_sft + W_base) / 2`, per tensor.",
)
