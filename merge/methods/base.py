"""What every method shares: the typed operation base, the chunk reader a kernel is handed, the kernel
protocol, and :class:`MethodSpec`, the one description of a method the rest of the package looks up.

A kernel binds a method's pure functions to chunked execution (chunks are multiples of its ``granule``:
whole rows, or the whole tensor, for methods that need them): ``prepare`` walks the tensor for statistics
(``passes`` of them at most) and returns the kernel's typed state; ``apply`` computes one chunk from the
compute-dtype input chunks (it may overwrite them). Kernels see only a :class:`ChunkReader`: they never reach
into the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel

from .chunks import Chunk


@dataclass(frozen=True)
class Operation:
    """How one output tensor is computed from the named input models; one frozen subclass per kind."""

    inputs: tuple[str, ...]
    kind: ClassVar[str] = ""
    computes_in_working_dtype: ClassVar[bool] = False  # mergekit's ``dtype``: compute in it, not just round to it

    def preserves_equal_inputs(self) -> bool:
        """Whether equal inputs give that same tensor back (so equal inputs can be copied instead)."""
        return False

    def result_dtype(self, working: torch.dtype | None) -> torch.dtype | None:
        """The dtype results are rounded to before the output cast, for a working dtype (None: none).
        mergekit methods whose float32 masks or factors widen bfloat16 math return ``float32`` here."""
        return working

    def writes_result_dtype(self) -> bool:
        """Whether the output tensor is written in :meth:`result_dtype` instead of the planned output dtype
        (mergekit writes such widened results as they are when a recipe sets no ``out_dtype``)."""
        return False


@dataclass(frozen=True)
class Copy(Operation):
    """``inputs[0]``'s tensor as it is (the executor copies it, converting only the dtype)."""

    kind: ClassVar[str] = "copy"


class ChunkReader(Protocol):
    """One tensor's input chunks for a kernel: the only view a kernel has of the executor."""

    device: torch.device
    dtype: torch.dtype  # the compute dtype the planner chose
    chunk: int  # elements per chunk
    single: bool  # the tensor is one chunk (kept loaded between passes)

    def ranges(self) -> list[Chunk]: ...
    def load(self, index: int, start: int, stop: int) -> list[torch.Tensor]: ...
    def passes(self, stored: bool = False, ranges: list[Chunk] | None = None
               ) -> Callable[[], Iterator[list[torch.Tensor]]]: ...
    def scratch(self, slot: str, n: int, dtype: torch.dtype) -> torch.Tensor: ...


class Kernel(Protocol):
    """The streaming side of a method (see the module docstring)."""

    statistic: ClassVar[str | None]  # the ExecutionStats field ``report`` fills (e.g. "slerp"), or None

    def passes(self, op: Operation) -> int: ...
    def granule(self, op: Operation, shape: tuple[int, ...]) -> int: ...
    def buffer_bytes(self, op: Operation, elems: int) -> int: ...
    def prepare(self, job, reader: ChunkReader) -> Any: ...
    def apply(self, job, xs: list[torch.Tensor], state: Any, chunk: Chunk, reader: ChunkReader) -> torch.Tensor: ...
    def report(self, state: Any) -> Any: ...


class KernelBase:
    """Defaults: no statistics pass, no buffers beyond the inputs', nothing reported."""

    statistic: ClassVar[str | None] = None

    def passes(self, op: Operation) -> int:
        return 0

    def granule(self, op: Operation, shape: tuple[int, ...]) -> int:
        """Chunks start and stop at multiples of this many flat elements: 1 for elementwise methods, the row
        length ``shape[-1]`` for per-row ones, the whole tensor for methods that need it at once (an SVD)."""
        return 1

    def buffer_bytes(self, op: Operation, elems: int) -> int:
        return 0

    def prepare(self, job, reader: ChunkReader) -> Any:
        return None

    def report(self, state: Any) -> Any:
        return None


@dataclass(frozen=True)
class Planned:
    """A planned tensor: its operation, what the ``merge plan`` table shows, and the t (share of the base)
    it hands out, for the summary (None: no t)."""

    op: Operation
    text: str
    t: float | None = None


@dataclass(frozen=True)
class ParamSpec:
    """A mergekit parameter: its name, scope (``shared``, ``input`` or ``non_base``) and default."""

    name: str
    scope: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class MergekitVariant:
    """One mergekit ``merge_method`` this method runs: its parameters and method-specific settings."""

    name: str
    params: tuple[ParamSpec, ...]
    settings: Any = None


class NoParams(BaseModel):
    """A method without parameters of its own in our recipe format."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything about one merge method, in one place (see :mod:`merge.methods.registry`).

    - ``operation``/``kernel``: the typed operation it plans and the streaming kernel that runs it;
    - ``params``: its parameters in our recipe format, a pydantic model: the recipe schema's branch for the
      method is ``Recipe`` plus this model (:mod:`merge.recipes.schema`);
    - ``check_recipe(recipe)`` raises ``ValueError`` for one of our recipes it cannot run (the fields it
      takes, the number of SFTs); ``plan(recipe, values, name)`` gives a :class:`Planned` (``values``: the
      per-tensor t/scale resolution of :mod:`merge.recipes.operations`); ``legend(recipe)`` heads the plan
      table;
    - ``describe(t_text)``: its sentence in the summary and card; ``report(summary)``: extra summary lines;
      ``settings(ops, who)``: a plan's settings of it in words (summary and card); ``lora_note``: what it
      computes for LoRA inputs (a summary note);
    - ``mergekit``: the mergekit methods it runs, ``plan_mergekit(variant, recipe, resolver, name)``,
      ``check_mergekit(variant, recipe)`` and ``convert(variant, recipe, chains, fields, problems, notes)``
      (our format's equivalent, for ``merge convert``); ``mergekit_legend``;
    - ``sweepable``: ``merge sweep`` can evaluate it in place;
    - ``python_params``: the keywords ``merge.merge(method, ...)`` (and the CLI command) take for it;
      ``python_fields(sfts, params)`` turns them into recipe fields (default: ``sft`` plus the keywords as
      they are); ``hints``: a better line than "only for <other method>" for a keyword it does not take;
    - ``slice_sources_vary``: mergekit ``slices`` may each take their own models (passthrough frankenmerges:
      one source per slice), instead of the same models in every slice.
    """

    name: str
    operation: type[Operation]
    kernel: Kernel
    check_recipe: Callable[[Any], None]
    plan: Callable[[Any, Any, str], Planned]
    legend: Callable[[Any], str]
    describe: Callable[[str], str]
    params: type[BaseModel] = NoParams
    report: Callable[[Any], list[str]] = lambda summary: []
    settings: Callable[[list, Callable[[str], str]], list[str]] = lambda ops, who: []
    lora_note: str = ""
    mergekit: tuple[MergekitVariant, ...] = ()
    plan_mergekit: Callable[..., Planned] | None = None
    check_mergekit: Callable[..., None] = lambda variant, recipe: None
    convert: Callable[..., None] | None = None
    mergekit_legend: str = ""
    sweepable: bool = False
    python_params: tuple[str, ...] = ()
    python_fields: Callable[[list[str], dict], dict] | None = None
    hints: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    slice_sources_vary: bool = False

    def recipe_fields(self, sfts: list[str], params: dict) -> dict:
        """The recipe fields of ``merge.merge(self.name, sfts, base, **params)`` (base and options aside)."""
        if self.python_fields is not None:
            return self.python_fields(sfts, params)
        return {"sft": sfts, **params}
