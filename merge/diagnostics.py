"""``merge inspect``: how far the SFT drifted from its base, per tensor and per layer, without writing anything.

Streaming and bounded: each tensor is read in chunks through the TensorSource views (a LoRA adapter works as
an SFT), statistics are float64 partial sums, and each tensor is released after use. Per tensor:
``rel_delta = ||W_sft - W_base|| / ||W_base||`` (Frobenius), ``cosine = <W_sft, W_base> / (||W_sft|| ||W_base||)``
and which SLERP branch it would take at ``t`` (``methods.slerp_coefficients``). Per layer and group (attention,
MLP): ``sqrt(sum ||D||^2) / sqrt(sum ||W_base||^2)`` over the group's tensors.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import methods
from .io.quantized import dequantised_of
from .keys import BASE, PRIMARY
from .methods.chunks import CHUNK_ELEMENTS, chunk_ranges
from .scheduler import single_threaded_torch
from .tensor_names import Structure, group_of

IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures_version"}


@dataclass(frozen=True)
class TensorDrift:
    name: str
    group: str | None
    layer: int | None
    shape: tuple[int, ...]
    dtype_sft: str
    dtype_base: str
    delta_sq: float  # ||D||^2 over the shared elements
    base_sq: float
    sft_sq: float
    dot: float
    compared_rows: int | None = None  # resized embeddings: only the shared rows are compared
    slerp: methods.SlerpCoefficients | None = None
    stack: str = "text"  # the layer stack ``layer`` counts in (vision, projector, text)

    @property
    def rel_delta(self) -> float:
        if self.base_sq > 0:
            return math.sqrt(self.delta_sq / self.base_sq)
        return 0.0 if self.delta_sq == 0 else math.inf

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.sft_sq * self.base_sq)
        return self.dot / denom if denom > 0 else float("nan")


@dataclass(frozen=True)
class LayerDrift:
    layer: int
    attn: float
    mlp: float
    other: float
    total: float
    stack: str = "text"


@dataclass
class InspectReport:
    """Everything ``merge inspect`` prints; ``layers`` is the per-layer drift table."""

    sft: str
    base: str
    t: float
    tensors: list[TensorDrift]
    layers: list[LayerDrift]
    only_in_sft: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    tied: dict[str, bool] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    config_diff: dict[str, tuple] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def spherical(self) -> list[TensorDrift]:
        """Tensors that would take SLERP's spherical branch at ``t`` (the rest fall back to linear)."""
        return [d for d in self.tensors if d.slerp is not None and d.slerp.spherical]

    def tensor(self, name: str) -> TensorDrift:
        return next(d for d in self.tensors if d.name == name)

    def report(self, top: int = 10) -> str:
        changed = [d for d in self.tensors if d.delta_sq > 0]
        lines = [f"inspect: SFT {self.sft} vs base {self.base}",
                 f"tensors compared: {len(self.tensors)} ({len(changed)} changed); dtypes: "
                 + ", ".join(f"{k} {v}" for k, v in self.dtypes.items())]
        total_d = sum(d.delta_sq for d in self.tensors)
        total_b = sum(d.base_sq for d in self.tensors)
        if total_b:
            lines.append(f"overall relative delta ||D||/||W_base||: {math.sqrt(total_d / total_b):.4%}")
        multi = any(ld.stack != "text" for ld in self.layers)
        width = 9 if multi else 5
        lines += ["", "per-layer drift (||D||/||W_base|| per group):",
                  f"{'layer':>{width}}  {'attention':>10} {'mlp':>10} {'other':>10} {'total':>10}"]
        for ld in self.layers:
            label = f"{ld.stack} {ld.layer}" if multi else str(ld.layer)
            lines.append(f"{label:>{width}}  {_pct(ld.attn):>10} {_pct(ld.mlp):>10} {_pct(ld.other):>10} "
                         f"{_pct(ld.total):>10}")
        outside = [d for d in self.tensors if d.layer is None]
        if outside:
            lines += ["", "outside the layer stack:"]
            lines += [f"  {d.name}: rel_delta {_pct(d.rel_delta)}, cosine {d.cosine:.6f}" for d in outside]
        lines += ["", f"largest relative deltas (top {min(top, len(self.tensors))}):"]
        for d in sorted(self.tensors, key=lambda d: -d.rel_delta)[:top]:
            lines.append(f"  {d.name}: rel_delta {_pct(d.rel_delta)}, cosine {d.cosine:.6f}")
        sph = self.spherical
        lines += ["", f"slerp at t={self.t:g}: {len(sph)} tensor(s) would take the spherical branch, "
                      f"{sum(1 for d in self.tensors if d.slerp is not None) - len(sph)} fall back to linear "
                      "(|cos| > 0.9995: SLERP equals linear interpolation there)"]
        lines += [f"  spherical: {d.name} (angle {d.slerp.angle:.3f} deg)" for d in sph[:top]]
        if self.resized:
            lines += ["", "resized embeddings: " + "; ".join(self.resized)]
        if self.added_tokens:
            more = f" (+{len(self.added_tokens) - 10} more)" if len(self.added_tokens) > 10 else ""
            lines.append(f"tokens added by the SFT: {', '.join(self.added_tokens[:10])}{more}")
        lines.append("tied embeddings: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in self.tied.items()))
        if self.only_in_sft:
            lines.append(f"only in the SFT: {', '.join(self.only_in_sft[:5])}"
                         + (f" (+{len(self.only_in_sft) - 5} more)" if len(self.only_in_sft) > 5 else ""))
        if self.only_in_base:
            lines.append(f"only in the base: {', '.join(self.only_in_base[:5])}"
                         + (f" (+{len(self.only_in_base) - 5} more)" if len(self.only_in_base) > 5 else ""))
        if self.config_diff:
            lines += ["config differences (SFT vs base):"]
            lines += [f"  {k}: {a!r} vs {b!r}" for k, (a, b) in sorted(self.config_diff.items())]
        else:
            lines.append("config: no differences")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def plot(self, path: str | Path) -> Path:
        """A PNG of the per-layer drift (attention, MLP, total) against the layer index."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        stacks = list(dict.fromkeys(ld.stack for ld in self.layers))
        for stack in stacks:  # one set of lines per stack (vision tower, text decoder)
            rows = [ld for ld in self.layers if ld.stack == stack]
            for attr, style in (("attn", "o-"), ("mlp", "s-"), ("total", "k--")):
                label = attr if len(stacks) == 1 else f"{stack} {attr}"
                ax.plot([ld.layer for ld in rows], [getattr(ld, attr) for ld in rows], style, label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel("||W_sft - W_base|| / ||W_base||")
        ax.set_title("Per-layer drift of the SFT from its base")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def _pct(x: float) -> str:
    return f"{x:.4%}" if math.isfinite(x) else "n/a"


def inspect(sft: str, base: str, t: float = 0.5, *, plot: str | Path | None = None, token: str | None = None,
            chunk_elements: int = CHUNK_ELEMENTS) -> InspectReport:
    """Compare ``sft`` with ``base`` tensor by tensor (nothing is written but the optional ``plot`` PNG)."""
    from . import api

    recipe = api.build_recipe({"method": "slerp", "base": str(base), "sft": [str(sft)], "t": t})
    resolved, _ = api.resolve_inputs(recipe, token=token)
    labels = {k: f"{'base' if k == 'base' else 'SFT'} {m.ref}" for k, m in resolved.items()}
    with ExitStack() as stack:
        models = {k: stack.enter_context(api.open_model(m, labels[k], resolved)) for k, m in resolved.items()}
        s, b = models[PRIMARY], models[BASE]
        report = InspectReport(str(sft), str(base), t, [], [])
        names_s, names_b = s.names(), b.names()
        set_b = set(names_b)
        structure = Structure.of(s.config, names_s)
        for name in names_s:
            if name not in set_b:
                report.only_in_sft.append(name)
                continue
            drift = _tensor_drift(s, b, name, t, chunk_elements, report, structure)
            if drift is not None:
                report.tensors.append(drift)
        set_s = set(names_s)
        report.only_in_base = [n for n in names_b if n not in set_s]
        report.layers = _layer_table(report.tensors, structure)
        report.tied = {"SFT": _tied(s), "base": _tied(b)}
        report.dtypes = {"SFT": _dominant_dtype(s), "base": _dominant_dtype(b)}
        report.config_diff = _config_diff(s.config, b.config)
        for role, model in (("SFT", s), ("base", b)):
            fp8 = dequantised_of(model)
            if fp8 is not None:
                report.notes.append(f"{role}: {fp8.quantisation.describe()}, dequantised on read "
                                    f"({len(fp8.quantisation.scales)} weights; drift is of the dequantised weights)")
        report.added_tokens = _added_tokens(Path(s.side_files_path), Path(b.side_files_path))
    if plot is not None:
        report.plot(plot)
    return report


def _tensor_drift(s, b, name: str, t: float, chunk: int, report: InspectReport,
                  structure: Structure) -> TensorDrift | None:
    info_s, info_b = s.info(name), b.info(name)
    if not (info_s.dtype.is_floating_point and info_b.dtype.is_floating_point):
        return None
    numel = math.prod(info_s.shape)
    rows = None
    if info_s.shape != info_b.shape:
        if len(info_s.shape) == len(info_b.shape) >= 1 and info_s.shape[1:] == info_b.shape[1:]:
            rows = min(info_s.shape[0], info_b.shape[0])
            numel = rows * math.prod(info_s.shape[1:])
            report.resized.append(f"{name} {list(info_b.shape)} (base) -> {list(info_s.shape)} (SFT); compared "
                                  f"the {rows} shared rows")
        else:
            report.notes.append(f"{name}: shape {list(info_s.shape)} in the SFT but {list(info_b.shape)} in the "
                                "base; not compared")
            return None
    delta_sq = 0.0

    def pairs():
        nonlocal delta_sq
        for _, start, stop in chunk_ranges(numel, chunk):
            x, y = s.view(name, start, stop), b.view(name, start, stop)
            d = x.double() - y.double()
            delta_sq += float(torch.dot(d, d))
            yield x, y

    # the merge's own statistics (the slerp kernel's float64 block sums, on one intra-op thread as the
    # executor's workers run), so the branch and angle shown are the merge's to the bit
    with single_threaded_torch():
        dot, sft_sq, base_sq = methods.slerp_statistics(pairs())
    s.release(name)
    b.release(name)
    coeffs = methods.slerp_coefficients(dot, sft_sq, base_sq, t)
    pos = structure.position(name)
    return TensorDrift(name, group_of(name), pos.layer, tuple(info_s.shape), _name(info_s.dtype),
                       _name(info_b.dtype), delta_sq, base_sq, sft_sq, dot, rows, coeffs, pos.stack)


def _layer_table(tensors: list[TensorDrift], structure: Structure) -> list[LayerDrift]:
    """One row per layer of each stack (vision tower first, then the text decoder), counted in its stack."""
    sums: dict[tuple[str, int], dict[str, list[float]]] = {}
    for d in tensors:
        if d.layer is None:
            continue
        group = d.group if d.group in ("attn", "mlp") else "other"
        for key in (group, "total"):
            acc = sums.setdefault((d.stack, d.layer), {}).setdefault(key, [0.0, 0.0])
            acc[0] += d.delta_sq
            acc[1] += d.base_sq

    def rel(at: tuple[str, int], key: str) -> float:
        dsq, bsq = sums.get(at, {}).get(key, (0.0, 0.0))
        return math.sqrt(dsq / bsq) if bsq > 0 else float("nan")

    order = {s: i for i, s in enumerate(("vision", "projector", "text"))}
    rows = set(sums) | {(s, i) for s in structure.layered for i in range(structure.counts[s])}
    rows = sorted(rows, key=lambda r: (order.get(r[0], 3), r[1]))
    return [LayerDrift(i, rel((s, i), "attn"), rel((s, i), "mlp"), rel((s, i), "other"), rel((s, i), "total"), s)
            for s, i in rows]


def _tied(model) -> bool:
    """Tied when the checkpoint stores no lm_head (the embedding serves) or its config says so."""
    has_head = any(group_of(n) == "lm_head" for n in model.names())
    return not has_head or (model.config or {}).get("tie_word_embeddings") is True


def _dominant_dtype(model) -> str:
    sizes: dict[str, int] = {}
    for n in model.names():
        info = model.info(n)
        sizes[_name(info.dtype)] = sizes.get(_name(info.dtype), 0) + math.prod(info.shape)
    return max(sizes, key=sizes.get) if sizes else "n/a"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_diff(a: dict, b: dict) -> dict[str, tuple]:
    keys = (set(a) | set(b)) - IGNORED_CONFIG_KEYS
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def _added_tokens(sft_folder: Path, base_folder: Path) -> list[str]:
    """Tokens in the SFT's tokenizer vocabulary (tokenizer.json vocab + added_tokens) that the base lacks."""
    def vocab(folder: Path) -> dict[str, int] | None:
        import json

        path = folder / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        model_vocab = (data.get("model") or {}).get("vocab")
        tokens = dict(model_vocab) if isinstance(model_vocab, dict) else {}
        for tok in data.get("added_tokens") or []:
            if isinstance(tok, dict) and "content" in tok:
                tokens[tok["content"]] = tok.get("id")
        return tokens

    vs, vb = vocab(sft_folder), vocab(base_folder)
    if vs is None or vb is None:
        return []
    return sorted((k for k in vs if k not in vb), key=lambda k: (vs[k] is None, vs[k] if vs[k] is not None else 0))
