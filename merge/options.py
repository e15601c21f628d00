"""How a merge runs, where it writes, where it is pushed, what it prints: four option objects.

None of them changes what is computed: the method and its parameters live in the recipe (or
``merge.merge``'s keywords), so a recipe reproduces a merge whatever options ran it. The CLI builds these from
its flags (:meth:`Options.of`); from Python pass them to :func:`merge.merge`, :func:`merge.run` or
:func:`merge.sweep`::

    merge.merge("linear", sft="./med", base="./llama3-8b", t=0.3, out="./small",
                execution=ExecutionOptions(memory="256MB", threads=2), output=OutputOptions(force=True))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .errors import InputError


@dataclass(frozen=True)
class ExecutionOptions:
    """Where and how fast: results are byte-identical under any of these.

    ``threads`` workers (default: cores + 1, at most 8); ``memory`` bounds the workers' host buffers (default
    512MB), ``gpu_memory`` their CUDA buffers (default 4GB), both as bytes or text ("2GB"); ``chunk_elements``
    (advanced): elements of a tensor processed at once; ``ray`` (``"auto"``, ``"local"`` or an address) runs the
    output shards as tasks on a Ray cluster, at most ``workers`` at a time.
    """

    threads: int | None = None
    memory: str | int | None = None
    gpu_memory: str | int | None = None
    chunk_elements: int | None = None
    ray: str | None = None
    workers: int | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What may be written, and what counts as a failure.

    ``force`` replaces an earlier mergeback output (never other files); ``resume`` continues an interrupted run
    into the same folder; ``dry_run`` plans and writes nothing; ``allow_nonfinite`` writes NaN/Inf outputs
    instead of failing; ``allow_unmatched`` makes a rule that matches no tensor a warning instead of an error;
    ``card_sections`` are markdown sections added to the model card.
    """

    force: bool = False
    resume: bool = False
    dry_run: bool = False
    allow_nonfinite: bool = False
    allow_unmatched: bool = False
    card_sections: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubOptions:
    """Uploading the result, and the token for private inputs.

    ``push_to_hub="org/name"`` uploads the output (created if needed; private when ``private``) to branch
    ``revision`` with ``commit_message``. ``token`` defaults to HF_TOKEN or the cached login; it is never shown.
    """

    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ReportOptions:
    """What is printed and recorded: ``progress`` bars, ``verbose`` (a line per finished tensor on stderr),
    and the ``command`` the model card gives for reproducing the run."""

    progress: bool = False
    verbose: bool = False
    command: str | None = None


GROUPS = {"execution": ExecutionOptions, "output": OutputOptions, "hub": HubOptions, "report": ReportOptions}
_OWNER = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}
OPTION_FIELDS = frozenset(_OWNER)


@dataclass(frozen=True)
class Options:
    """The four option groups together."""

    execution: ExecutionOptions = ExecutionOptions()
    output: OutputOptions = OutputOptions()
    hub: HubOptions = HubOptions()
    report: ReportOptions = ReportOptions()

    @classmethod
    def of(cls, base: Options | None = None, **flat) -> Options:
        """``base`` (default: all defaults) with fields given by their own names (``threads=2, force=True``),
        each routed to its group, as the CLI's flags are; an unknown name is an :class:`InputError`."""
        base = base or cls()
        updates: dict[str, dict] = {}
        for name, value in flat.items():
            group = _OWNER.get(name)
            if group is None:
                raise InputError(f"{name}: not an option of execution, output, hub or report")
            updates.setdefault(group, {})[name] = value
        return dataclasses.replace(base, **{g: dataclasses.replace(getattr(base, g), **u)
                                            for g, u in updates.items()})

    @classmethod
    def gather(cls, options: Options | None = None, **groups) -> Options:
        """``options`` with the groups given by keyword (``execution=``, ``output=``, ...) replaced."""
        options = options or cls()
        given = {k: v for k, v in groups.items() if v is not None}
        for name, value in given.items():
            if name not in GROUPS or not isinstance(value, GROUPS[name]):
                raise TypeError(f"{name}= takes a {GROUPS.get(name, type(None)).__name__}, got {value!r}")
        return dataclasses.replace(options, **given)

    def check(self, device: str) -> None:
        """Refuse options that would have no effect together (one line naming the option)."""
        out, hub, ex = self.output, self.hub, self.execution
        if hub.push_to_hub is None:
            for name, v in (("--private", hub.private or None), ("--revision", hub.revision),
                            ("--commit-message", hub.commit_message)):
                if v is not None:
                    raise InputError(f"{name}: only applies with --push-to-hub REPO")
        if out.dry_run:
            for name, v in (("--resume", out.resume), ("--allow-nonfinite", out.allow_nonfinite),
                            ("--verbose", self.report.verbose), ("--force", out.force),
                            ("--push-to-hub", hub.push_to_hub is not None)):
                if v:
                    raise InputError(f"{name}: has no effect with --dry-run, which writes nothing")
        if ex.gpu_memory is not None and device == "cpu":
            raise InputError("--gpu-memory: has no effect with --device cpu (use --memory for host buffers)")


def misplaced(name: str) -> str | None:
    """For a keyword that belongs in an option group, the line saying where it goes (None otherwise)."""
    group = _OWNER.get(name)
    if group is None:
        return None
    return f"{name}= is a field of {GROUPS[group].__name__}: pass {group}={GROUPS[group].__name__}({name}=...)"
