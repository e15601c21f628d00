"""The result of a merge, as a value: what the CLI prints and the card records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io.resolve import ResolvedModel
from .io.writer import format_size
from .methods import registry


@dataclass
class MergeSummary:
    method: str
    inputs: dict[str, ResolvedModel]
    out: Path | None
    tensors: dict[str, int]  # operation kind -> count
    t_range: tuple[float, float] | None = None
    spherical: int = 0
    linear_fallback: int = 0
    max_angle: float = 0.0
    shards: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    pushed_to: str | None = None  # the Hub URL after push_to_hub
    parameter_table: str | None = None  # dry runs: the resolved parameters per layer and tensor group
    read_bytes: int | None = None  # dry runs: input bytes read at most (merge.scheduler.read_bytes_at_most)
    peak_bytes: int | None = None  # dry runs: estimated executor memory (merge.execute.estimate_peak_bytes)
    already_complete: bool = False  # resume=True found OUT already written by this same run: nothing written
    settings: list[str] = field(default_factory=list)  # task arithmetic: scales, sparsify, consensus (settings_of)
    cluster: object | None = None  # a Ray run: merge.distributed.ClusterStats (workers, nodes, where time went)
    reports: dict = field(default_factory=dict)  # what kernels reported, by statistic then tensor

    def method_description(self) -> str:
        t = ""
        if self.t_range is not None:
            lo, hi = self.t_range
            t = f"t = {lo:g}" if lo == hi else f"t from {lo:g} to {hi:g} across tensors"
            t += " (t is the share of the base model: t=0 keeps the SFT unchanged, t=1 gives the base)."
        spec = registry.get(self.method) if self.method in registry.names() else None
        what = spec.describe(t) if spec is not None else f"{self.method} merge" + (
            " (task arithmetic: `W = W_base + lambda * sum_i w_i * sparsify(W_i - W_base)`)." if self.settings
            else ".")
        return what + "".join(f" {line[0].upper()}{line[1:]}." for line in self.settings)

    def report(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.tensors.items()))
        lines = [f"method: {self.method}"]
        if self.t_range is not None:
            lo, hi = self.t_range
            lines.append(f"t (share of base): {lo:g}" if lo == hi else f"t (share of base): {lo:g}..{hi:g}")
        lines.append(f"tensors: {sum(self.tensors.values())} ({counts})")
        lines += self.settings
        spec = registry.find(self.method)
        if spec is not None:
            lines += spec.report(self)
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        size = f"{self.output_bytes / 1e9:.2f} GB" if self.output_bytes >= 1e8 else f"{self.output_bytes / 1e6:.2f} MB"
        where = f" -> {self.out}" if self.out else ""
        if self.already_complete:
            lines.append(f"already complete (same recipe and inputs; nothing written): {size} in {self.shards} "
                         f"shard(s){where}")
        else:
            verb = "would write" if self.dry_run else "wrote"
            lines.append(f"{verb} {size} in {self.shards} shard(s){where}"
                         + ("" if self.dry_run else f" in {self.seconds:.1f}s"))
        if self.cluster is not None:
            lines.append(self.cluster.line())
        if self.pushed_to:
            lines.append(f"pushed to {self.pushed_to}")
        if self.read_bytes is not None:
            lines.append(f"reads at most {format_size(self.read_bytes)} of the inputs (each merged tensor once, plus "
                         "once per statistics pass its method needs: slerp's norms, magnitude ranks)")
        if self.peak_bytes is not None:
            lines.append(f"estimated peak memory of the merge buffers: {self.peak_bytes / 1e6:.1f} MB (an estimate: "
                         "each worker's chunk buffers, within --memory; "
                         "Python and torch add ~250 MB; inputs are read from the page cache and not counted)")
        if self.parameter_table:
            lines += ["", self.parameter_table]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def settings_of(jobs, inputs: dict[str, ResolvedModel]) -> list[str]:
    """The settings a plan's merge operations use, in words (each method's ``settings``: task arithmetic's
    scales, lambda, normalize, sparsify, sign consensus); empty when none has any."""
    def who(key: str) -> str:
        model = inputs.get(key)
        return f"SFT {model.ref}" if model is not None else key

    by_kind: dict[str, list] = {}
    for j in jobs:
        by_kind.setdefault(j.op.kind, []).append(j.op)
    lines: list[str] = []
    for kind, ops in by_kind.items():
        spec = registry.for_kind(kind)
        if spec is not None:
            lines += spec.settings(ops, who)
    return lines
