"""The result of a merge, as a value: what the CLI prints and the card records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io.resolve import ResolvedModel


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
    peak_bytes: int | None = None  # dry runs: estimated executor memory (merge.execute.estimate_peak_bytes)
    already_complete: bool = False  # resume=True found OUT already written by this same run: nothing written
    settings: list[str] = field(default_factory=list)  # task arithmetic: scales, sparsify, consensus (settings_of)
    cluster: object | None = None  # a Ray run: merge.distributed.ClusterStats (workers, nodes, where time went)

    def method_description(self) -> str:
        t = ""
        if self.t_range is not None:
            lo, hi = self.t_range
            t = f"t = {lo:g}" if lo == hi else f"t from {lo:g} to {hi:g} across tensors"
            t += " (t is the share of the base model: t=0 keeps the SFT unchanged, t=1 gives the base)."
        return {
            "linear": f"Linear interpolation `W = (1-t)*W_sft + t*W_base`, per tensor. {t}",
            "slerp": ("Spherical interpolation per tensor, from the SFT (t=0) towards the base (t=1), on the raw "
                      "flattened tensors; it falls back to linear interpolation when the two tensors are nearly "
                      f"parallel (|cos| > 0.9995) or one is ~0. {t}"),
            "task_arithmetic": "Task arithmetic `W = W_base + sum_i s_i * sparsify(W_sft_i - W_base)`.",
        }.get(self.method, f"{self.method} merge" + (
            " (task arithmetic: `W = W_base + lambda * sum_i w_i * sparsify(W_i - W_base)`)." if self.settings
            else ".")) + "".join(f" {line[0].upper()}{line[1:]}." for line in self.settings)

    def report(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.tensors.items()))
        lines = [f"method: {self.method}"]
        if self.t_range is not None:
            lo, hi = self.t_range
            lines.append(f"t (share of base): {lo:g}" if lo == hi else f"t (share of base): {lo:g}..{hi:g}")
        lines.append(f"tensors: {sum(self.tensors.values())} ({counts})")
        lines += self.settings
        if self.method == "slerp" and self.dry_run:
            lines.append("slerp: each tensor's angle between the two inputs is computed while merging; nearly "
                         "parallel tensors (|cos| > 0.9995) will be interpolated linearly, the others spherically "
                         "(the merge reports how many took each branch and the largest angle; `merge inspect --t` "
                         "predicts them)")
        elif self.method == "slerp":
            lines.append(f"slerp: {self.spherical} tensors took the spherical branch, {self.linear_fallback} fell "
                         f"back to linear; largest angle {self.max_angle:.3f} deg")
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
        if self.peak_bytes is not None:
            lines.append(f"estimated peak memory of the merge buffers: {self.peak_bytes / 1e6:.1f} MB (an estimate: "
                         "each worker's chunk buffers, within --memory; "
                         "Python and torch add ~250 MB; inputs are read from the page cache and not counted)")
        if self.parameter_table:
            lines += ["", self.parameter_table]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


_SPARSIFY = {"magnitude": "magnitude (TIES trimming: the largest |delta| entries kept)",
             "random": "random (DARE: entries kept at random)",
             "breadcrumbs": "breadcrumbs (the largest gamma and the smallest entries dropped)"}
_CONSENSUS = {"sum": "sum (TIES sign election: the sign of the summed deltas)",
              "count": "count (the sign most deltas have)"}


def settings_of(jobs, inputs: dict[str, ResolvedModel]) -> list[str]:
    """The task-arithmetic settings a plan's jobs use, in words: scales per SFT (a range where they vary by
    tensor), lambda, normalize, the sparsify method with density (gamma, seed, rescale where they apply), and
    sign consensus. Empty when no job is a task-arithmetic one."""
    ops = [j.op for j in jobs if j.op.kind == "task_arithmetic"]
    if not ops:
        return []
    sfts = ops[0].inputs[1:]
    scales = ", ".join(f"{_spread(op.params['weights'][i] for op in ops)} ({_who(k, inputs)})"
                       for i, k in enumerate(sfts))
    lines = [f"scale{'s' if len(sfts) > 1 else ''}: {scales}"]
    lams = {float(op.params.get("lam", 1.0)) for op in ops}
    if lams != {1.0}:
        lines.append(f"lambda (multiplies the summed deltas): {_spread(lams)}")
    if any(op.params.get("normalize") for op in ops):
        lines.append("normalize: the sum is divided by the sum of the scales of the deltas kept per entry")
    sparse = [op.params["sparsify"] for op in ops if op.params.get("sparsify")]
    if not sparse:
        lines.append("sparsify: none (whole deltas are added)")
    else:
        method = sparse[0]["method"]
        where = "" if len(sparse) == len(ops) else f" on {len(sparse)} of {len(ops)} tensors (whole deltas elsewhere)"
        parts = [f"sparsify: {_SPARSIFY.get(method, method)}{where}", f"density {_per_sft(sparse, 'density')}"]
        if method == "breadcrumbs":
            parts.append(f"gamma {_per_sft(sparse, 'gamma')}")
        if method == "random":
            parts.append(f"seed {_spread(sp.get('seed', 0) for sp in sparse)}")
        rescale = {str(sp.get("rescale", True)) for sp in sparse}
        if method == "random" or rescale != {"True"}:
            words = {"True": "survivors divided by the density", "l1": "each delta's L1 norm restored",
                     "False": "not rescaled"}
            parts.append("; ".join(words.get(r, r) for r in sorted(rescale)))
        lines.append(", ".join(parts))
    consensus = {op.params.get("sign_consensus") for op in ops}
    lines.append("sign consensus: " + ", ".join(_CONSENSUS.get(c, c) if c else "none" for c in sorted(
        consensus, key=str)))
    return lines


def _who(key: str, inputs: dict) -> str:
    model = inputs.get(key)
    return f"SFT {model.ref}" if model is not None else key


def _spread(values) -> str:
    """One value, or the range a per-tensor value takes."""
    vals = sorted({float(v) for v in values})
    return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}..{vals[-1]:g} across tensors"


def _per_sft(sparse: list[dict], key: str) -> str:
    """A sparsify number given once or per fine-tune (tuples), spread over the tensors."""
    values = [sp.get(key) for sp in sparse]
    if all(isinstance(v, (list, tuple)) for v in values):
        n = len(values[0])
        per = [_spread(v[i] for v in values) for i in range(n)]
        return per[0] if len(set(per)) == 1 else "/".join(per) + " (per model)"
    return _spread(values)
