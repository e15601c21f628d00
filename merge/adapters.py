"""Adapters out: write a PEFT LoRA adapter instead of a full model.

``extract_lora(sft, base, out, rank=r)`` approximates the SFT's delta ``D = W_sft - W_base`` as an adapter:

- every targeted 2-D weight (default: the 2-D ``.weight`` of every attention, MLP and router module inside the
  layer stacks) gets the factors of :func:`merge.methods.extract_lora.lora_factors`, so PEFT's
  ``(lora_alpha / r) * B @ A`` is the rank-r truncated SVD of ``D`` (of ``D.T`` for GPT-2's Conv1D, whose
  weight is stored in x out: ``fan_in_fan_out``);
- changed biases of targeted modules go into ``lora_B.bias`` (PEFT's ``lora_bias``: merged bias
  ``b_base + (lora_alpha / r) * lora_B.bias``, so ``lora_B.bias = (b_sft - b_base) * r / lora_alpha``, exact)
  when every targeted module has a bias; otherwise they are not captured;
- changed embeddings, ``lm_head`` and norms (modules whose tensors are all 1-D) are saved whole through
  ``modules_to_save`` (exact; PEFT's key ``base_model.model.<module>.weight``);
- anything else that changed (a tensor outside those, 3-D expert stacks, tensors only the SFT has, biases
  when ``lora_bias`` is impossible) is *not captured*: refused, naming them, unless ``allow_uncaptured``;
  tensors the caller's own ``target_modules`` leave out are reported, not refused.

The summary gives per tensor the captured share ``||D_kept|| / ||D||`` (Frobenius; ``D_kept`` the adapter's
delta after rounding to the output dtype) and per kind (attn, mlp, embed, norm, bias...) the relative error
``sqrt(sum ||D - D_kept||^2) / sqrt(sum ||D||^2)``.

``interpolate_adapter(adapter, base, t, out)`` writes ``merge linear --t`` of a LoRA SFT as an adapter: the
merged weight ``(1-t)(W_base + s B@A) + t W_base = W_base + s ((1-t) B)@A``, so every ``lora_B`` (and
``lora_B.bias``, ``lora_embedding_B``) is multiplied by ``(1-t)``: correct for any ``rank_pattern``,
``alpha_pattern`` and rsLoRA, whose scale ``s`` stays as it is. Saved modules become
``(1-t) * saved + t * base`` (extra rows of a resized embedding kept, as ``merge linear`` does). DoRA's
``m * V / ||V||`` is not linear in ``B``, so a DoRA adapter is refused for ``t != 0``.

Streaming and memory: one tensor at a time. Each targeted delta is read whole (the SVD is global; about 3x the
tensor in float32 with its factors) and released; the adapter file's header is planned first and every tensor
is written into place as it is computed, so nothing accumulates beyond one tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dtypes import OUTPUT_DTYPES
from .errors import InputError
from .inputs import open_inputs, open_model, resolve_inputs
from .io import output
from .io.lora import ADAPTER_CONFIG, CONV1D_MODEL_TYPES, PREFIX, TOKENIZER_FILES, LoraAdapter, is_adapter
from .io.writer import PlannedTensor, ShardWriter, layout_shards
from .keys import BASE, PRIMARY, input_label
from .methods.extract_lora import lora_delta, lora_factors
from .tensor_names import group_of, layer_index

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TARGET_GROUPS = ("attn", "mlp", "router")
TIED_HEAD = "lm_head"  # the output layer's module name in transformers' *ForCausalLM classes
WHOLE_GROUPS = ("embed", "lm_head")


@dataclass(frozen=True)
class CapturedTensor:
    """One changed tensor: ``how`` it is in the adapter (lora, bias, saved, not captured), ``delta_sq`` =
    ``||D||^2`` and ``error_sq`` = ``||D - D_kept||^2``."""

    name: str
    kind: str
    how: str
    delta_sq: float
    error_sq: float

    @property
    def captured(self) -> float:
        """``||D_kept|| / ||D||`` for a low-rank tensor (1 - relative error for exact ones)."""
        if self.delta_sq == 0:
            return 1.0
        if self.how != "lora":
            return 1.0 - math.sqrt(self.error_sq / self.delta_sq)
        return self._kept_norm / math.sqrt(self.delta_sq)

    _kept_norm: float = 0.0


@dataclass
class AdapterSummary:
    """What an adapter-writing command did, printable with :meth:`report`."""

    out: Path
    rank: int | None
    lora_alpha: float | None
    target_modules: list[str] | str
    modules_to_save: list[str]
    tensors: list[CapturedTensor] = field(default_factory=list)
    adapter_bytes: int = 0
    model_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def uncaptured(self) -> list[CapturedTensor]:
        return [c for c in self.tensors if c.how == "not captured"]

    def kind_errors(self) -> dict[str, float]:
        """kind -> ``sqrt(sum ||D - D_kept||^2) / sqrt(sum ||D||^2)`` over its changed tensors."""
        sums: dict[str, list[float]] = {}
        for c in self.tensors:
            acc = sums.setdefault(c.kind, [0.0, 0.0])
            acc[0] += c.error_sq
            acc[1] += c.delta_sq
        return {k: math.sqrt(e / d) if d > 0 else 0.0 for k, (e, d) in sorted(sums.items())}

    def report(self, verbose: bool = False) -> str:
        lines = [f"adapter -> {self.out}"]
        if self.rank is not None:
            lines.append(f"LoRA r={self.rank}, lora_alpha={self.lora_alpha:g}; target_modules: "
                         + (", ".join(self.target_modules) if isinstance(self.target_modules, list)
                            else self.target_modules))
        if self.modules_to_save:
            more = f" (+{len(self.modules_to_save) - 6} more)" if len(self.modules_to_save) > 6 else ""
            lines.append("modules_to_save (saved whole): " + ", ".join(self.modules_to_save[:6]) + more)
        lora = [c for c in self.tensors if c.how == "lora"]
        if lora:
            shares = [c.captured for c in lora]
            lines.append(f"captured share of each low-rank delta ||D_r||/||D||: min {min(shares):.4f}, median "
                         f"{statistics.median(shares):.4f} over {len(lora)} tensor(s)")
            if verbose:
                lines += [f"  {c.name}: {c.captured:.4f}" for c in lora]
        errors = self.kind_errors()
        if errors:
            lines.append("relative error of the delta per kind, ||D - D_adapter||/||D||: "
                         + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
        missed = self.uncaptured
        if missed:
            names = ", ".join(c.name for c in missed[:5]) + (f" (+{len(missed) - 5} more)" if len(missed) > 5 else "")
            lines.append(f"NOT captured by the adapter ({len(missed)} changed tensor(s), left as the base's): {names}")
        else:
            lines.append("every changed tensor is in the adapter")
        if self.model_bytes:
            lines.append(f"size: {self.adapter_bytes:,} bytes of adapter weights vs {self.model_bytes:,} bytes of "
                         f"model weights ({self.adapter_bytes / self.model_bytes:.2%})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _kind(name: str, shape) -> str:
    group = group_of(name)
    if len(shape) == 1 and name.endswith(".bias") and group != "norm":
        return "bias"
    return group or "other"


def _is_default_target(name: str, shape) -> bool:
    return (name.endswith(".weight") and len(shape) == 2 and group_of(name) in TARGET_GROUPS
            and layer_index(name) is not None)


def _select_targets(names_shapes: dict, target_modules) -> list[str]:
    """The 2-D weights that get LoRA factors (module docstring); bad ``target_modules`` are one-line errors."""
    if target_modules is None:
        return [n for n, s in names_shapes.items() if _is_default_target(n, s)]
    targets = []
    for leaf in target_modules:
        leaf = leaf.strip()
        hits = [n for n in names_shapes if _module(n) == leaf or _module(n).endswith("." + leaf)]
        if not hits:
            raise InputError(f"--target-modules {leaf}: no module of that name in the SFT; give module names like "
                             "q_proj, v_proj, down_proj")
        for n in hits:
            if n.endswith(".bias"):
                continue
            shape = names_shapes[n]
            if len(shape) != 2:
                raise InputError(f"--target-modules {leaf}: {n} has shape {list(shape)}, not 2-D; only 2-D linear "
                                 "weights take LoRA factors (changed norms are saved whole)")
            if group_of(n) in WHOLE_GROUPS:
                raise InputError(f"--target-modules {leaf}: {n} is an embedding/lm_head, which the adapter saves "
                                 "whole (modules_to_save) when it changed; leave it out of --target-modules")
            targets.append(n)
    return sorted(set(targets), key=list(names_shapes).index)


def _peft_target_modules(targets: list[str], names: list[str]) -> list[str] | str:
    """Leaf names (PEFT matches ``key == t or key.endswith('.' + t)``) when they select exactly ``targets``'
    modules among all modules of the model; else a regex PEFT full-matches against module names."""
    wanted = {_module(n) for n in targets}
    modules = {p for n in names for p in _prefixes(n)}
    leaves = sorted({m.rpartition(".")[2] for m in wanted})
    selected = {m for m in modules if any(m == leaf or m.endswith("." + leaf) for leaf in leaves)}
    if selected == wanted:
        return leaves
    return "^(?:" + "|".join(re.escape(m) for m in sorted(wanted)) + ")$"


def _peft_modules_to_save(modules: list[str], names: list[str]) -> list[str]:
    """``modules`` as PEFT's ``modules_to_save`` (matched by plain ``key.endswith(entry)``): a leaf name where
    it selects only modules of ``modules`` (``input_layernorm`` for every layer's), else the full name."""
    every = {p for n in names for p in _prefixes(n)} | set(modules)
    entries = []
    for module in modules:
        leaf = module.rpartition(".")[2]
        entry = leaf if all(m in modules for m in every if m.endswith(leaf)) else module
        if entry not in entries:
            entries.append(entry)
    return entries


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _changed(sft, base, name: str, chunk: int = 1 << 22) -> bool:
    """Whether the two tensors differ (compared chunk by chunk; a different shape counts as changed)."""
    a, b = sft.info(name), base.info(name)
    if tuple(a.shape) != tuple(b.shape):
        return True
    numel = math.prod(a.shape)
    try:
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            got, ref = sft.view(name, start, stop), base.view(name, start, stop)
            if not torch.equal(got.to(torch.float64), ref.to(torch.float64)):
                return True
        return False
    finally:
        sft.release(name)
        base.release(name)


def _whole(model, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor in ``dtype``, refused when it holds NaN/Inf (an adapter of it would too)."""
    info = model.info(name)
    t = model.view(name).to(dtype).reshape(tuple(info.shape))
    model.release(name)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{model.role}: tensor {name} holds NaN or Inf; the adapter would "
                         "too - check that checkpoint")
    return t


def _stage_and_commit(out_path: Path, force: bool, inputs: dict, write) -> None:
    """Build the adapter folder in a staging sibling and commit it, under OUT's lock (merge.io.output rules)."""
    output.check_target(out_path, inputs)
    with output.output_lock(out_path):
        output.check_output(out_path, force)
        stage = output.fresh_staging(out_path)
        try:
            write(stage)
            output.write_marker(stage, kind="adapter")
            output.commit(stage, out_path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def _out_path(out) -> Path:
    if out is None or not str(out).strip():
        raise InputError("no output folder: pass -o ADAPTER (a new folder for the adapter)")
    return Path(out).expanduser().resolve()


def extract_lora(sft: str | Path, base: str | Path, out: str | Path, *, rank: int, alpha: float | None = None,
                 target_modules=None, dtype: str | None = None, allow_uncaptured: bool = False,
                 force: bool = False, svd: str = "auto", seed: int = 0, token: str | None = None) -> AdapterSummary:
    """Write a PEFT LoRA adapter at ``out`` approximating ``sft - base`` (module docstring).

    ``rank`` r >= 1 and ``alpha`` (default r: scale 1) are PEFT's ``r`` and ``lora_alpha``; ``target_modules``
    (leaf module names, e.g. ``["q_proj", "v_proj"]``) replaces the default targets; ``dtype`` of the written
    tensors defaults to the SFT's; ``svd`` is ``auto``/``exact``/``randomized`` (:mod:`merge.methods.spectral`).
    """
    from . import api

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"--rank {rank}: the LoRA rank must be a whole number >= 1")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0 or not math.isfinite(alpha):
        raise InputError(f"--alpha {alpha:g}: lora_alpha must be a positive number")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(f"--dtype {dtype}: choose one of {', '.join(OUTPUT_DTYPES)}")
    if svd not in ("auto", "exact", "randomized"):
        raise InputError(f"svd={svd!r}: choose auto, exact or randomized")
    out_path = _out_path(out)
    output.check_target(out_path, output.local_inputs({f"SFT {sft}": sft, f"base {base}": base}))
    output.check_output(out_path, force)
    recipe = api.build_recipe({"method": "linear", "base": str(base), "sft": [str(sft)], "t": 0.0})
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack, token=token)
        resolved, labels, notes = inputs.resolved, inputs.labels, inputs.notes
        s, b = inputs.models[PRIMARY], inputs.models[BASE]
        plan = _plan_extraction(s, b, rank, target_modules, dtype, allow_uncaptured)
        b_ref = resolved[BASE]
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": _peft_target_modules(plan.targets, s.names()),
            "modules_to_save": _peft_modules_to_save(plan.modules_to_save, s.names()) or None,
            "fan_in_fan_out": plan.transposed,
            "lora_bias": plan.lora_bias, "bias": "none", "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "lora_dropout": 0.0, "inference_mode": True, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": b_ref.repo_id or str(b_ref.path),
            "revision": b_ref.revision if b_ref.repo_id else None,
        }
        summary = AdapterSummary(out_path, rank, alpha, config["target_modules"], config["modules_to_save"] or [],
                                 notes=notes + plan.notes, model_bytes=_weight_bytes(s))

        def write(stage: Path) -> None:
            _write_extraction(stage, s, b, plan, rank, alpha, svd, seed, summary)
            (stage / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            summary.adapter_bytes = (stage / ADAPTER_WEIGHTS).stat().st_size

        _stage_and_commit(out_path, force, {labels[k]: m.path for k, m in resolved.items()}, write)
    return summary


@dataclass
class _ExtractionPlan:
    targets: list[str]
    transposed: bool
    lora_bias: bool
    modules_to_save: list[str]
    saved: list[str]  # the tensors written whole (all tensors of the modules_to_save)
    uncaptured: list[tuple[str, str]]  # (name, kind) changed but not in the adapter
    planned: list[PlannedTensor]
    dtypes: dict[str, torch.dtype]
    notes: list[str] = field(default_factory=list)
    tied_head: str | None = None  # the embedding also written as lm_head.weight (tied models)


def _plan_extraction(s, b, rank: int, target_modules, dtype: str | None, allow_uncaptured: bool) -> _ExtractionPlan:
    """Which tensors go where (module docstring), and the adapter file's layout, before any delta is read."""
    names = s.names()
    base_names = set(b.names())
    shapes = {n: tuple(s.info(n).shape) for n in names}
    floating = {n for n in names if s.info(n).dtype.is_floating_point}
    targets = [n for n in _select_targets({n: shapes[n] for n in names if n in floating}, target_modules)
               if n in base_names]
    target_modules_set = {_module(n) for n in targets}
    transposed = s.config.get("model_type") in CONV1D_MODEL_TYPES or b.config.get("model_type") in CONV1D_MODEL_TYPES
    changed = [n for n in names if n in floating and n not in targets
               and (n not in base_names or _changed(s, b, n))]
    target_biases = {f"{m}.bias" for m in target_modules_set}
    changed_biases = [n for n in changed if n in target_biases]
    lora_bias = bool(changed_biases) and all(f"{m}.bias" in base_names for m in target_modules_set)
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(_module(n), []).append(n)
    save_modules, uncaptured = [], []
    for n in changed:
        module = _module(n)
        if n in target_biases:
            if not lora_bias:
                uncaptured.append(n)
            continue
        whole = (group_of(n) in WHOLE_GROUPS or all(len(shapes[x]) == 1 for x in by_module[module]))
        if whole and module not in target_modules_set and n in base_names:
            if module not in save_modules:
                save_modules.append(module)
        else:
            uncaptured.append(n)
    tied_head = _tied_embedding(s, b, save_modules, shapes)
    if tied_head is not None:
        save_modules.append(TIED_HEAD)
    out_dtype = {n: OUTPUT_DTYPES[dtype] if dtype else s.info(n).dtype for n in names}
    planned, dtypes, saved = [], {}, []
    for n in targets:
        out_, in_ = shapes[n][::-1] if transposed else shapes[n]
        key = PREFIX + _module(n)
        planned += [PlannedTensor(f"{key}.lora_A.weight", out_dtype[n], (rank, in_)),
                    PlannedTensor(f"{key}.lora_B.weight", out_dtype[n], (out_, rank))]
        if lora_bias:
            planned.append(PlannedTensor(f"{key}.lora_B.bias", out_dtype[n], (out_,)))
    for module in save_modules:
        if module == TIED_HEAD and tied_head is not None:
            planned.append(PlannedTensor(f"{PREFIX}{TIED_HEAD}.weight", out_dtype[tied_head], shapes[tied_head]))
            continue
        for n in by_module[module]:
            planned.append(PlannedTensor(PREFIX + n, out_dtype[n], shapes[n]))
            saved.append(n)
    for p in planned:
        dtypes[p.name] = p.dtype
    user_excluded = {n for n in uncaptured if target_modules is not None and _is_default_target(n, shapes[n])}
    refused = [n for n in uncaptured if n not in user_excluded]
    if refused and not allow_uncaptured:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        first = refused[0]
        why = ("only in the SFT" if first not in base_names else
               "a bias; lora_bias needs a bias on every targeted module" if first in target_biases else
               f"shape {list(shapes[first])}, neither a target nor an embedding, lm_head or norm")
        raise InputError(f"the adapter cannot capture changed tensor(s) {', '.join(refused[:3])}{more} ({why}); "
                         "pass --allow-uncaptured to write it without them (the summary lists each with its error)")
    notes = []
    if not targets:
        raise InputError("no 2-D linear weight to extract: the SFT has no attention/MLP weights in a layer stack "
                         "that the base has too; name them with --target-modules")
    if tied_head is not None:
        notes.append(f"tied embeddings: {tied_head} is also saved as {TIED_HEAD}.weight (modules_to_save), so the "
                     "output layer follows the new embeddings under PEFT")
    for module in save_modules:
        for n in by_module.get(module, []):
            if n in base_names and shapes[n] != tuple(b.info(n).shape):
                notes.append(f"{n} is saved with the SFT's shape {list(shapes[n])}, the base has "
                             f"{list(b.info(n).shape)}: resize the base's embeddings before loading with PEFT")
    if any(group_of(x) == "norm" for m in save_modules for x in by_module.get(m, [])):
        notes.append("changed norms are saved whole in modules_to_save (exact); not every LoRA server loads them")
    return _ExtractionPlan(targets, transposed, lora_bias, save_modules, saved,
                           [(n, _kind(n, shapes[n])) for n in uncaptured], planned, dtypes, notes, tied_head)


def _tied_embedding(s, b, save_modules: list[str], shapes: dict) -> str | None:
    """The input embedding's name when the model ties ``lm_head`` to it (no lm_head tensor stored, config not
    saying otherwise) and the adapter saves it: PEFT would leave the tied head on the base's copy."""
    names = s.names()
    if any(group_of(n) == "lm_head" for n in names) or s.config.get("tie_word_embeddings", True) is False:
        return None
    vocab = s.config.get("vocab_size")
    for module in save_modules:
        weight = f"{module}.weight"
        if group_of(weight) == "embed" and weight in shapes and len(shapes[weight]) == 2 \
                and (vocab is None or shapes[weight][0] >= vocab):
            return weight
    return None


def _weight_bytes(model) -> int:
    return sum(math.prod(model.info(n).shape) * model.info(n).dtype.itemsize for n in model.names())


def _write_extraction(stage: Path, s, b, plan: _ExtractionPlan, rank: int, alpha: float, svd: str, seed: int,
                      summary: AdapterSummary) -> None:
    shard = layout_shards(plan.planned, 1 << 62)[0]
    shard.filename = ADAPTER_WEIGHTS
    writer = ShardWriter(stage, [shard], direct=False)
    try:
        for n in plan.targets:
            summary.tensors += _extract_one(writer, s, b, n, plan, rank, alpha, svd, seed)
        for n in plan.saved:
            key = PREFIX + n
            stored = _whole(s, n, plan.dtypes[key])
            writer.write(key, 0, stored.reshape(-1))
            if n in b and tuple(stored.shape) == tuple(b.info(n).shape):
                base_w = _whole(b, n, torch.float64)
                d = _whole(s, n, torch.float64) - base_w
                sq = float(d.square().sum())
                if sq > 0:
                    err = float((d - (stored.to(torch.float64) - base_w)).square().sum())
                    summary.tensors.append(CapturedTensor(n, _kind(n, d.shape), "saved", sq, err))
        if plan.tied_head is not None:
            key = f"{PREFIX}{TIED_HEAD}.weight"
            writer.write(key, 0, _whole(s, plan.tied_head, plan.dtypes[key]).reshape(-1))
        for n, kind in plan.uncaptured:
            sq = _delta_sq(s, b, n)
            summary.tensors.append(CapturedTensor(n, kind, "not captured", sq, sq))
        writer.sync()
    finally:
        writer.close()


def _delta_sq(s, b, n: str) -> float:
    """``||W_sft - W_base||^2`` (``||W_sft||^2`` when the base lacks the tensor or its shape differs)."""
    x = _whole(s, n, torch.float64)
    if n in b and tuple(b.info(n).shape) == tuple(x.shape):
        x = x - _whole(b, n, torch.float64)
    return float(x.square().sum())


def _extract_one(writer, s, b, n: str, plan: _ExtractionPlan, rank: int, alpha: float, svd: str,
                 seed: int) -> list[CapturedTensor]:
    """Factor one targeted delta, write A, B (and the bias delta), and measure what was kept."""
    info = s.info(n)
    compute = torch.float64 if info.dtype == torch.float64 else torch.float32
    delta = _whole(s, n, compute) - _whole(b, n, compute)
    if plan.transposed:
        delta = delta.T  # Conv1D stores in x out; PEFT's fan_in_fan_out transposes B@A back
    key = PREFIX + _module(n)
    a, bb = lora_factors(delta, rank, alpha, method=svd, seed=seed)
    a_out, b_out = a.to(plan.dtypes[f"{key}.lora_A.weight"]), bb.to(plan.dtypes[f"{key}.lora_B.weight"])
    writer.write(f"{key}.lora_A.weight", 0, a_out.contiguous().reshape(-1))
    writer.write(f"{key}.lora_B.weight", 0, b_out.contiguous().reshape(-1))
    kept = lora_delta(a_out.to(compute), b_out.to(compute), alpha)
    delta_sq = float(delta.double().square().sum())
    error_sq = float((delta - kept).double().square().sum())
    result = [CapturedTensor(n, _kind(n, info.shape), "lora", delta_sq, error_sq,
                             _kept_norm=float(kept.double().norm()))]
    if plan.lora_bias:
        bias = f"{_module(n)}.bias"
        d = _whole(s, bias, compute) - _whole(b, bias, compute)
        out = (d * (rank / alpha)).to(plan.dtypes[f"{key}.lora_B.bias"])
        writer.write(f"{key}.lora_B.bias", 0, out.reshape(-1))
        dsq = float(d.double().square().sum())
        if dsq > 0:
            err = float((d - out.to(compute) * (alpha / rank)).double().square().sum())
            result.append(CapturedTensor(bias, "bias", "lora bias", dsq, err))
    return result


def interpolate_adapter(adapter: str | Path, base: str | Path, t: float, out: str | Path, *,
                        method: str = "linear", force: bool = False, token: str | None = None) -> AdapterSummary:
    """Write ``merge linear --t`` of the LoRA adapter ``adapter`` over ``base`` as an adapter (module docstring):
    every ``lora_B`` times ``(1-t)``, saved modules ``(1-t) * saved + t * base``."""
    from . import api

    if method != "linear":
        raise InputError(f"--as-adapter: {method} of a LoRA SFT is not a rescaling of its factors (it runs on the "
                         "materialised weights), so it cannot be written as an adapter; use `merge linear`")
    t = float(t)
    if not math.isfinite(t):
        raise InputError(f"--t {t}: give a finite number")
    out_path = _out_path(out)
    if not is_adapter(adapter):
        raise InputError(f"--as-adapter: --sft {adapter} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); "
                         "only an adapter SFT can be written as an adapter (see `merge extract-lora` for a full SFT)")
    output.check_target(out_path, output.local_inputs({f"SFT {adapter}": adapter, f"base {base}": base}))
    output.check_output(out_path, force)
    recipe = api.build_recipe({"method": "linear", "base": str(base), "sft": [str(adapter)], "t": t})
    resolved, notes = resolve_inputs(recipe, token=token)
    labels = {k: input_label(k, m.ref) for k, m in resolved.items()}
    with ExitStack() as stack:
        lora = stack.enter_context(open_model(resolved[PRIMARY], labels[PRIMARY], resolved, token=token))
        if lora.use_dora and t != 0:
            raise InputError(f"--as-adapter: {adapter} is a DoRA adapter; m * V / ||V|| is not linear in B, so "
                             f"t={t:g} has no exact adapter form; write the full model (drop --as-adapter)")
        summary = AdapterSummary(out_path, lora.r, lora.lora_alpha, lora.target_modules or [], lora.modules_to_save,
                                 notes=notes + [f"adapter = merge linear --t {t:g}: every lora_B scaled by 1-t = "
                                                f"{1 - t:g}; saved modules (1-t)*saved + t*base"],
                                 model_bytes=_weight_bytes(lora))
        if not 0 <= t <= 1:
            summary.warnings.append(f"t={t:g} is outside [0, 1]: extrapolating "
                                    f"{'past the base' if t > 1 else 'away from the base, past the SFT'}")

        def write(stage: Path) -> None:
            _write_interpolated(stage, lora, t)
            config = dict(lora.adapter_config)
            if not config.get("base_model_name_or_path"):
                b_ref = resolved["base"]
                config["base_model_name_or_path"] = b_ref.repo_id or str(b_ref.path)
            (stage / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name in TOKENIZER_FILES + output.SIDE_FILES:
                src = lora.path / name
                if src.is_file() and not (stage / name).exists():
                    shutil.copyfile(src, stage / name)
            summary.adapter_bytes = (stage / ADAPTER_WEIGHTS).stat().st_size

        _stage_and_commit(out_path, force, {labels[k]: m.path for k, m in resolved.items()}, write)
    return summary


_SCALED = re.compile(r"\.(?:lora_B\.weight|lora_B\.bias|lora_embedding_B)$")


def _write_interpolated(stage: Path, lora: LoraAdapter, t: float) -> None:
    """Every tensor of the adapter file, in its own dtype: B-side factors times ``1-t``, saved modules
    interpolated with the base, the rest (``lora_A``, DoRA magnitudes at t=0) copied."""
    keys = list(lora.file.tensors)
    saved = {key: name for name, key in lora.replaced.items()}
    planned = [PlannedTensor(k, lora.file.tensors[k].dtype, tuple(lora.file.tensors[k].shape)) for k in keys]
    shard = layout_shards(planned, 1 << 62)[0]
    shard.filename = ADAPTER_WEIGHTS
    writer = ShardWriter(stage, [shard], direct=False)
    try:
        for key, p in zip(keys, planned):
            x = lora.file.view(key)
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            if _SCALED.search(key):
                x = (x.to(compute) * (1 - t)).to(p.dtype)
            elif key in saved:
                x = _interpolate_saved(x.to(compute).reshape(p.shape), lora.base, saved[key], t).to(p.dtype)
            writer.write(key, 0, x.contiguous().reshape(-1))
            lora.file.release(key)
        writer.sync()
    finally:
        writer.close()


def _interpolate_saved(saved: torch.Tensor, base, name: str, t: float) -> torch.Tensor:
    """``(1-t) * saved + t * base`` on the rows both have; extra rows of a resized embedding are kept."""
    info = base.info(name)
    base_w = base.view(name).to(saved.dtype).reshape(tuple(info.shape))
    base.release(name)
    rows = min(saved.shape[0], base_w.shape[0]) if saved.dim() else None
    out = saved.clone()
    if rows is None:
        return (1 - t) * saved + t * base_w
    out[:rows] = (1 - t) * saved[:rows] + t * base_w[:rows]
    return out
