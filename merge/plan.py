"""The planner: which output tensors exist, where each one's bytes come from, and with which parameters.

Everything is decided from headers and configs before a single tensor byte is read, so every user mistake
(missing tensors, shape or architecture mismatch, bad parameters) is reported before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .errors import InputError
from .io.lora import copy_when_unchanged
from .io.safetensors_file import TensorInfo
from .io.writer import PlannedTensor, Shard, layout_shards
from .methods.base import Copy, Operation
from .methods.precision import compute_dtypes
from .tensor_names import group_of


class TensorSource(Protocol):
    """What the planner and executor need from a model: a full checkpoint (:class:`~merge.io.checkpoint.
    Checkpoint`, also read from Hub headers), a LoRA adapter over a base (:class:`~merge.io.lora.LoraAdapter`)
    or an FP8 checkpoint dequantised on read (:class:`~merge.io.quantized.DequantisedCheckpoint`).

    ``role`` names it in errors (``SFT``, ``base``); ``side_files_path`` is the folder its tokenizer and other
    side files come from; ``reads_files``: it stores the bytes ``view`` returns, so ``read_into`` can copy them
    into a caller's buffer (adapters and dequantised checkpoints compute them instead).
    """

    path: Path
    config: dict
    role: str
    reads_files: bool

    @property
    def side_files_path(self) -> Path: ...
    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def info(self, name: str) -> TensorInfo: ...
    # Flat elements [start, stop), in ``view_dtype(name)``: the stored dtype of a checkpoint; float32/float64 for
    # a LoRA adapter's computed tensors and dequantised FP8 (one rounding per merge). Callers convert.
    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor: ...
    def view_dtype(self, name: str) -> torch.dtype: ...
    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor: ...  # only if reads_files
    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    op: Operation
    merged_numel: int  # elements [0, merged_numel) are computed; the rest are copied from the primary model
    primary: str
    aliases: Mapping[str, str] = field(default_factory=dict)  # model key -> the name to read there
    compute: torch.dtype = torch.float32  # the dtype chunks are computed in (see merge.methods.precision)
    round_to: torch.dtype | None = None  # inputs and results are rounded to it (mergekit's working dtype)
    fp8_block: tuple[int, int] | None = None  # written as FP8 codes scaled per block of this shape (--dtype fp8)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def source_name(self, key: str) -> str:
        return self.aliases.get(key, self.name)


@dataclass
class Plan:
    jobs: list[TensorJob]
    shards: list[Shard]
    notes: list[str]
    untied: bool = False  # tied and untied inputs: the output has its own lm_head (tie_word_embeddings: false)

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j.op.kind] = out.get(j.op.kind, 0) + 1
        return out


OpFor = Callable[[str], Operation]


def make_plan(models: Mapping[str, TensorSource], labels: Mapping[str, str], primary: str, op_for: OpFor,
              out_dtype: torch.dtype | None, max_shard_size: int) -> Plan:
    """Validate the inputs against each other and plan every output tensor.

    ``primary`` (the SFT in recovery merges) decides the output's tensor names, extra vocabulary rows and
    default dtype; ``labels`` name models in messages (e.g. "SFT ./med").
    """
    check_configs(models, labels, primary)
    names = models[primary].names()
    jobs: list[TensorJob] = []
    notes: list[str] = []
    missing: dict[str, list[str]] = {}
    heads, stand_ins = _head_stand_ins(models, labels)
    for name in names + [h for h in heads if h not in names]:
        head_of = {k: v[name] for k, v in stand_ins.items() if name in v}  # tied inputs: embedding for head
        info = models[primary].info(head_of.get(primary, name))
        dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        if not info.dtype.is_floating_point:
            jobs.append(TensorJob(name, info.shape, info.dtype, Copy((primary,)), 0, primary))
            continue
        op = copy_when_unchanged(models, op_for(name), name)
        aliases = dict(head_of)
        for key in dict.fromkeys(op.inputs):
            if key == primary or key in aliases:
                continue
            if name not in models[key]:
                alias = _tied_alias(models[key], name, info)
                if alias is None:
                    missing.setdefault(key, []).append(name)
                    continue
                aliases[key] = alias
        if any(name in m for m in missing.values()):
            continue
        merged = _merged_numel(models, labels, primary, op, name, info, aliases, notes)
        compute, round_to = torch.float32, None
        if not isinstance(op, Copy):
            compute, round_to = compute_dtypes(op, [models[k].info(aliases.get(k, name)).dtype for k in op.inputs])
            if op.writes_result_dtype() and round_to is not None:
                dtype = op.result_dtype(round_to)
        jobs.append(TensorJob(name, info.shape, dtype, op, merged, primary, aliases, compute, round_to))
    if missing:
        key, lacking = next(iter(missing.items()))
        more = f" (+{len(lacking) - 3} more)" if len(lacking) > 3 else ""
        raise InputError(
            f"{labels[key]} lacks {len(lacking)} tensor(s) that {labels[primary]} has: "
            f"{', '.join(lacking[:3])}{more}; are both checkpoints of the same model?"
        )
    _check_extra_tensors(models, labels, primary, names)
    if stand_ins:
        notes.append(_untied_note(models, labels, heads, stand_ins))
    planned = [PlannedTensor(j.name, j.out_dtype, j.shape) for j in jobs]
    return Plan(jobs, layout_shards(planned, max_shard_size), notes, untied=bool(stand_ins))


def own_head(model: TensorSource) -> bool:
    """The model has an lm_head of its own: it stores one and its config does not say it is tied."""
    return (any(group_of(n) == "lm_head" for n in model.names())
            and (model.config or {}).get("tie_word_embeddings") is not True)


def _head_stand_ins(models, labels) -> tuple[list[str], dict[str, dict[str, str]]]:
    """When tied and untied inputs meet: the output's head names (the untied models' lm_head tensors) and, per
    tied model, the input embedding standing in for each head (as mergekit does), so every head is the merge
    of the heads. Nothing when all inputs are tied, or all untied.
    """
    untied = [k for k, m in models.items() if own_head(m)]
    if not untied or len(untied) == len(models):
        return [], {}
    heads: dict[str, TensorInfo] = {}
    for key in untied:
        for n in models[key].names():
            if group_of(n) == "lm_head":
                heads.setdefault(n, models[key].info(n))
    out: dict[str, dict[str, str]] = {}
    for key, model in models.items():
        if key in untied:
            continue
        for name, info in heads.items():
            alias = _tied_alias(model, name, info) if len(info.shape) == 2 else None
            if alias is None:
                raise InputError(
                    f"{labels[key]} has tied embeddings but no single input embedding of {list(info.shape[1:])} "
                    f"columns to stand in for {name!r} of {labels[untied[0]]}; are both checkpoints of the same "
                    "model?")
            out.setdefault(key, {})[name] = alias
    return list(heads), out


def _untied_note(models, labels, heads, stand_ins) -> str:
    tied = " and ".join(labels[k] for k in stand_ins)
    own = " and ".join(labels[k] for k in models if k not in stand_ins)
    embeds = ", ".join(sorted({e for v in stand_ins.values() for e in v.values()}))
    return (f"lm_head: {tied} has tied embeddings, {own} its own lm_head; the output's {', '.join(heads)} is the "
            f"merge of the heads, the tied side's {embeds} standing in for its head (as mergekit does), and the "
            "output is untied (tie_word_embeddings: false)")


def _tied_alias(model: TensorSource, name: str, info: TensorInfo) -> str | None:
    """A model with tied embeddings stores no lm_head: its input embedding plays that role."""
    if group_of(name) != "lm_head":
        return None
    candidates = [n for n in model.names() if group_of(n) == "embed" and len(model.info(n).shape) == 2
                  and model.info(n).shape[1:] == info.shape[1:]]
    return candidates[0] if len(candidates) == 1 else None


def _merged_numel(models, labels, primary, op, name, info, aliases, notes) -> int:
    shapes = {key: models[key].info(aliases.get(key, name)).shape for key in op.inputs}
    others = {shapes[k] for k in op.inputs if k != primary}
    if not others or others == {info.shape}:
        return info.numel
    if len(others) == 1:
        (other,) = others
        if (len(other) == len(info.shape) and len(other) >= 1 and other[1:] == info.shape[1:]
                and other[0] < info.shape[0] and group_of(name) in ("embed", "lm_head")):
            extra = info.shape[0] - other[0]
            notes.append(f"{name}: {labels[primary]} has {extra} more vocabulary rows; "
                         f"merged the {other[0]} shared rows and kept its extra rows as they are")
            numel = 1
            for d in other:
                numel *= d
            return numel
    key = next(k for k in op.inputs if shapes[k] != info.shape)
    raise InputError(
        f"tensor {name!r}: shape {list(shapes[key])} in {labels[key]} but {list(info.shape)} in "
        f"{labels[primary]}; only added vocabulary rows (embeddings/lm_head larger in the SFT) can be merged"
    )


def _check_extra_tensors(models, labels, primary, names) -> None:
    have = set(names)
    for key, model in models.items():
        if key == primary:
            continue
        # An lm_head the primary lacks is planned from the primary's embedding when tied and untied inputs
        # meet (_head_stand_ins); when every input is tied, a stored head is a copy and the output stays tied.
        extra = [n for n in model.names() if n not in have and group_of(n) != "lm_head"]
        if extra:
            more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
            raise InputError(
                f"{labels[key]} has {len(extra)} tensor(s) that {labels[primary]} lacks: "
                f"{', '.join(extra[:3])}{more}; are both checkpoints of the same model?"
            )


def check_configs(models: Mapping[str, TensorSource], labels: Mapping[str, str], primary: str) -> None:
    """Same architecture and layer count, when both configs say."""
    ref = models[primary].config
    for key, model in models.items():
        if key == primary or not ref or not model.config:
            continue
        for field_name in ("architectures", "model_type", "num_hidden_layers", "n_layer", "hidden_size", "n_embd"):
            a, b = ref.get(field_name), model.config.get(field_name)
            if a is not None and b is not None and a != b:
                raise InputError(
                    f"config.json: {field_name} is {b!r} in {labels[key]} but {a!r} in {labels[primary]}; "
                    "merge checkpoints of the same architecture (the SFT must be fine-tuned from this base)"
                )
