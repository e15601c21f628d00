"""The merge methods, by name: the one place the schema, planner, executor, mergekit reader, converter, CLI
and summary look a method up. Adding a method is one module in ``merge/methods/`` exporting a
:class:`~.base.MethodSpec` as ``SPEC``, plus its line in ``_BUILTIN`` below (and its tests)."""

from __future__ import annotations

from ..errors import InputError
from .arcee_fusion import SPEC as ARCEE_FUSION
from .base import Copy, Kernel, MergekitVariant, MethodSpec, Operation
from .chunks import kernel_chunk
from .karcher import SPEC as KARCHER
from .linear import SPEC as LINEAR
from .model_stock import SPEC as MODEL_STOCK
from .multislerp import SPEC as MULTISLERP
from .nearswap import SPEC as NEARSWAP
from .nuslerp import SPEC as NUSLERP
from .passthrough import SPEC as PASSTHROUGH
from .ram import SPEC as RAM
from .sce import SPEC as SCE
from .slerp import SPEC as SLERP
from .spectral import SPEC as SPECTRAL
from .task_arithmetic import SPEC as TASK_ARITHMETIC

_BUILTIN: tuple[MethodSpec, ...] = (LINEAR, SLERP, TASK_ARITHMETIC, MODEL_STOCK, NUSLERP, MULTISLERP, KARCHER,
                                    NEARSWAP, ARCEE_FUSION, RAM, PASSTHROUGH, SCE, SPECTRAL)

_METHODS: dict[str, MethodSpec] = {}
_MERGEKIT: dict[str, tuple[MethodSpec, MergekitVariant]] = {}
_KINDS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known under its name, its operation kind and its mergekit names."""
    clash = [n for n in (spec.name, *(v.name for v in spec.mergekit)) if n in _METHODS or n in _MERGEKIT
             and _MERGEKIT[n][0].name != spec.name]
    if spec.name in _METHODS or clash:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    _KINDS[spec.operation.kind] = spec
    for variant in spec.mergekit:
        _MERGEKIT[variant.name] = (spec, variant)
    return spec


def unregister(name: str) -> None:
    """Forget the method ``name`` (its kind and mergekit names too)."""
    spec = _METHODS.pop(name)
    _KINDS.pop(spec.operation.kind, None)
    for variant in spec.mergekit:
        _MERGEKIT.pop(variant.name, None)


for _spec in _BUILTIN:
    register(_spec)


def names() -> tuple[str, ...]:
    """The methods of our recipe format, in registration order."""
    return tuple(_METHODS)


def get(name: str) -> MethodSpec:
    """The method called ``name``; an unknown one is an :class:`InputError` listing the known ones."""
    spec = _METHODS.get(name)
    if spec is None:
        raise InputError(f"method: {unknown(name)}")
    return spec


def find(name: str) -> MethodSpec | None:
    """The method called ``name`` in our format or mergekit's, or None."""
    return _METHODS.get(name) or (_MERGEKIT[name][0] if name in _MERGEKIT else None)


def unknown(name: str) -> str:
    """The one-line complaint about an unknown method, listing the known ones."""
    return f"{name!r} is not a merge method; known methods: {', '.join(_METHODS)}"


def mergekit_names() -> tuple[str, ...]:
    """The mergekit ``merge_method`` values we run."""
    return tuple(_MERGEKIT)


def for_mergekit(name: str) -> tuple[MethodSpec, MergekitVariant]:
    """The method running mergekit's ``name`` and that variant's settings (KeyError when unsupported)."""
    return _MERGEKIT[name]


def for_kind(kind: str) -> MethodSpec | None:
    """The method whose operations are of ``kind`` (None: copies, FP8 scales)."""
    return _KINDS.get(kind)


def kernel_for(op: Operation) -> Kernel:
    """The streaming kernel of ``op``'s kind (copies have none: the executor copies bytes itself)."""
    if isinstance(op, Copy):
        raise ValueError("copy operations have no kernel")
    return _KINDS[op.kind].kernel


def buffer_bytes(op: Operation, elems: int) -> int:
    """The compute-device bytes ``op``'s kernel needs beyond the inputs' buffers, for chunks of ``elems``
    (0 for operations without a kernel of a method: copies, FP8 scales)."""
    spec = _KINDS.get(op.kind)
    return 0 if spec is None else spec.kernel.buffer_bytes(op, elems)


def chunk_elements(op: Operation, shape: tuple[int, ...], numel: int, chunk: int) -> int:
    """Elements per chunk when ``op`` walks ``numel`` merged elements of a ``shape`` tensor in chunks of about
    ``chunk``: whole multiples of its kernel's granule (copies and FP8 scales: ``chunk``)."""
    spec = _KINDS.get(op.kind)
    granule = 1 if spec is None else spec.kernel.granule(op, shape)
    return kernel_chunk(chunk, granule, numel)


def check_python_params(spec: MethodSpec, params: dict) -> None:
    """Refuse a ``merge.merge``/CLI keyword ``spec`` does not take (one line naming the option and the fix):
    it would have no effect."""
    for name, value in params.items():
        if value is None or value is False or name in spec.python_params:
            continue
        flag = "--" + name.replace("_", "-")
        if name in spec.hints:
            raise InputError(f"{flag}: {spec.hints[name]}")
        owners = [s.name.replace("_", "-") for s in _METHODS.values() if name in s.python_params]
        if owners:
            raise InputError(f"{flag}: only for {', '.join(owners)}; {spec.name.replace('_', '-')} has no effect of it")
        known = ", ".join(spec.python_params) or "none"
        raise InputError(f"{name}: not a parameter of {spec.name} (its parameters: {known})")


def sweepable() -> tuple[str, ...]:
    """The methods ``merge sweep`` evaluates in place."""
    return tuple(n for n, s in _METHODS.items() if s.sweepable)
