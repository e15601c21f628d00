"""A PEFT LoRA (or DoRA) adapter folder seen as the full fine-tuned model it stands for, computed lazily.

For a targeted tensor the SFT weight is ``W_base + s * B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA; ``rank_pattern``/``alpha_pattern`` override per module), transposed for ``fan_in_fan_out`` (GPT-2
Conv1D) and for embeddings. DoRA rescales it per output feature: ``W' = m * V / ||V||`` with
``V = W_base + s * B @ A`` and the norm taken over each output feature's inputs (PEFT's definition).
Tensors the adapter saves whole (``modules_to_save``, e.g. a trained ``lm_head``; embedding layers saved with
resized vocabularies) replace the base's; every other tensor is read straight through from the base.

``view(name, start, stop)`` computes only the rows of ``B @ A`` covering the flat range asked for, so memory
stays bounded by one chunk; each thread caches the factors of the one tensor it is working on.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..methods import registry
from ..methods.base import Copy, Operation
from ..tensor_names import group_of
from .checkpoint import BinFile, Checkpoint, read_json
from .quantized import open_checkpoint
from .safetensors_file import SafetensorsFile, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ROW_BLOCK = 64  # rows of B@A computed per matmul; fixed so results do not depend on how callers chunk
PREFIX = "base_model.model."
# Transformers architectures whose linear layers are GPT-2 style Conv1D (weights stored input-major); PEFT
# transposes for them even when the saved config says fan_in_fan_out=false.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# LoRA variants that change the math in ways a fold cannot reproduce: config key -> what it is.
UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication", "use_bdlora": "block-diagonal LoRA",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder: it holds ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class _Target:
    """One base tensor changed by low-rank factors: ``stored = base + scale * (B @ A)`` (transposed if asked)."""

    name: str
    a: str | None
    b: str
    scale: float
    transposed: bool = False
    magnitude: str | None = None  # DoRA magnitude vector, one entry per output feature
    bias: bool = False  # lora_bias: base bias + scale * lora_B.bias


class LoraAdapter:
    """A :class:`~merge.plan.TensorSource` for a LoRA adapter folder over a base checkpoint.

    ``info(name)`` describes the fine-tuned tensor as the output should store it (the base's dtype). ``view``
    returns computed tensors in float32 (float64 for float64 bases) so merges round once; saved modules come in
    the adapter's own dtype; untargeted tensors are the base's zero-copy views.
    """

    def __init__(self, path: str | Path, base: str | Path | Checkpoint, role: str = "SFT"):
        self.path = Path(path)
        self.role = role
        self.adapter_config = read_json(self.path / ADAPTER_CONFIG)
        self._check_kind()
        self._owns_base = isinstance(base, (str, os.PathLike))
        self.base = open_checkpoint(base, role="base") if self._owns_base else base
        self.file = self._open_weights()
        self.targets: dict[str, _Target] = {}
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter tensor name
        try:
            self._index_tensors()
        except BaseException:
            self.close()
            raise
        self.config = self._config()
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- the adapter's settings ------------------------------------------------------------------------------
    @property
    def r(self) -> int:
        return int(self.adapter_config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.adapter_config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.adapter_config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.adapter_config.get("use_dora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.adapter_config.get("fan_in_fan_out", False))

    @property
    def target_modules(self):
        return self.adapter_config.get("target_modules")

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.adapter_config.get("modules_to_save") or [])

    @property
    def rank_pattern(self) -> dict:
        return dict(self.adapter_config.get("rank_pattern") or {})

    @property
    def alpha_pattern(self) -> dict:
        return dict(self.adapter_config.get("alpha_pattern") or {})

    @property
    def base_model_name_or_path(self) -> str | None:
        """The base the adapter was trained on, as its config records it (for ``--base auto``)."""
        return self.adapter_config.get("base_model_name_or_path") or None

    @property
    def scale(self) -> float:
        """The default ``s``: alpha/r, or alpha/sqrt(r) with rsLoRA (patterns may override per module)."""
        return self._scale(self.r, self.lora_alpha)

    @property
    def side_files_path(self) -> Path:
        """Where tokenizer files come from: the adapter folder when it has a tokenizer, else the base."""
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else Path(self.base.path)

    def _scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def _fail(self, why: str) -> InputError:
        return InputError(f"LoRA adapter {self.path}: {why}")

    def _check_kind(self) -> None:
        kind = str(self.adapter_config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise self._fail(f"peft_type {kind} is not supported (only LoRA and DoRA adapters can be merged); "
                             "merge it into its base with PEFT's merge_and_unload() and pass that folder as --sft")
        for key, what in UNSUPPORTED_OPTIONS.items():
            value = self.adapter_config.get(key)
            if value not in (None, False, [], {}, 0):
                raise self._fail(f"{what} ({key} in {ADAPTER_CONFIG}) is not supported; merge it with PEFT's "
                                 "merge_and_unload() and pass that folder as --sft")

    def _open_weights(self):
        st, binary = self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"
        if st.is_file():
            return SafetensorsFile(st)
        if binary.is_file():
            return BinFile(binary)
        raise self._fail("has adapter_config.json but no adapter_model.safetensors (or adapter_model.bin)")

    # -- mapping adapter tensors to base tensors -------------------------------------------------------------
    def _base_name(self, module: str, suffix: str, key: str) -> str:
        """The base tensor ``module.suffix`` under the names the base checkpoint uses."""
        candidates = [f"{module}.{suffix}", f"model.{module}.{suffix}"]
        if module.startswith("model."):
            candidates.append(f"{module[len('model.'):]}.{suffix}")
        for c in candidates:
            if c in self.base:
                return c
        ends = [n for n in self.base.names() if n.endswith(f".{module}.{suffix}")]
        if len(ends) == 1:
            return ends[0]
        raise self._fail(f"tensor {key!r} targets {module}.{suffix}, which base {self.base.path} does not have; "
                         "was the adapter trained on this base?")

    def _pattern_value(self, pattern: dict, module: str, default):
        for key, value in pattern.items():  # PEFT: the first key matching a dotted suffix of the module name
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def _index_tensors(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self.file.tensors:
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _LORA_KEY.match(name)
            if m:
                part = "lora_B.bias" if m["part"] == "lora_B.bias" else m["part"].split(".")[0]
                parts.setdefault(m["module"], {})[part] = key
                continue
            self._add_replacement(key, name)
        for module, p in parts.items():
            self._add_target(module, p)

    def _add_replacement(self, key: str, name: str) -> None:
        clean = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.(weight|bias)$)", "", name)
        clean = clean.replace(".base_layer.", ".")
        module, _, suffix = clean.rpartition(".")
        if suffix not in ("weight", "bias") or not module:
            raise self._fail(f"tensor {key!r} is not a LoRA tensor this tool understands (unsupported adapter "
                             "variant); merge it with PEFT's merge_and_unload() first")
        target = self._base_name(module, suffix, key)
        info, base_info = self.file.tensors[key], self.base.info(target)
        fits = info.shape == base_info.shape or (
            group_of(target) in ("embed", "lm_head") and len(info.shape) == 2 == len(base_info.shape)
            and info.shape[1] == base_info.shape[1])
        if not fits:
            raise self._fail(f"saved tensor {key!r} has shape {list(info.shape)} but base tensor {target!r} has "
                             f"{list(base_info.shape)}; was the adapter trained on this base?")
        self.replaced[target] = key

    def _add_target(self, module: str, p: dict[str, str]) -> None:
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key = p.get("lora_embedding_A" if embedding else "lora_A")
        b_key = p.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            missing = "A" if a_key is None else "B"
            raise self._fail(f"module {module!r} has no lora_{missing} tensor; the adapter file is incomplete")
        a, b = self.file.tensors[a_key], self.file.tensors[b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise self._fail(f"{a_key!r} has shape {list(a.shape)}: only LoRA on linear, Conv1D and embedding "
                             "layers is supported (not convolutions)")
        r = int(self._pattern_value(self.rank_pattern, module, self.r))
        alpha = float(self._pattern_value(self.alpha_pattern, module, self.lora_alpha))
        if a.shape[0] != r or b.shape[1] != r:
            raise self._fail(f"{a_key!r} has rank {a.shape[0]} but {ADAPTER_CONFIG} says r={r} for {module!r}")
        name = self._base_name(module, "weight", a_key)
        base_shape = (self.file.tensors[self.replaced[name]].shape if name in self.replaced
                      else self.base.info(name).shape)
        transposed = embedding or self.fan_in_fan_out or self.base.config.get("model_type") in CONV1D_MODEL_TYPES
        want = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if tuple(base_shape) != want:
            hint = " (check fan_in_fan_out)" if tuple(base_shape) == want[::-1] else ""
            raise self._fail(f"B@A of {module!r} has shape {list(want)} but base tensor {name!r} has "
                             f"{list(base_shape)}{hint}; the adapter does not fit this base - was it trained on it?")
        magnitude = p.get("lora_magnitude_vector")
        if self.use_dora != (magnitude is not None):
            raise self._fail(f"module {module!r}: use_dora is {self.use_dora} in {ADAPTER_CONFIG} but the magnitude "
                             f"vector is {'missing' if magnitude is None else 'present'}; the adapter is inconsistent")
        if magnitude is not None and self.file.tensors[magnitude].numel != b.shape[0]:
            raise self._fail(f"{magnitude!r} has {self.file.tensors[magnitude].numel} entries, expected {b.shape[0]}")
        scale = self._scale(r, alpha)
        self.targets[name] = _Target(name, a_key, b_key, scale, transposed, magnitude)
        if "lora_B.bias" in p:
            if magnitude is not None:
                raise self._fail(f"module {module!r}: lora_bias together with DoRA is not supported")
            bias = self._base_name(module, "bias", p["lora_B.bias"])
            if self.base.info(bias).shape != (b.shape[0],):
                raise self._fail(f"{p['lora_B.bias']!r} does not fit base tensor {bias!r}")
            self.targets[bias] = _Target(bias, None, p["lora_B.bias"], scale, bias=True)

    def _config(self) -> dict:
        config = dict(self.base.config)
        for name, key in self.replaced.items():
            rows = self.file.tensors[key].shape[0]
            if group_of(name) in ("embed", "lm_head") and "vocab_size" in config and rows > config["vocab_size"]:
                config["vocab_size"] = rows  # the fine-tune added tokens and saved the resized embeddings
        return config

    # -- TensorSource ----------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        base_info = self.base.info(name)
        if name in self.replaced:
            return replace(self.file.tensors[self.replaced[name]], name=name, dtype=base_info.dtype)
        return base_info

    reads_files = False  # changed tensors are computed

    def view_dtype(self, name: str) -> torch.dtype:
        if name in self.targets:
            return torch.float64 if self.info(name).dtype == torch.float64 else torch.float32
        if name in self.replaced:
            return self.file.tensors[self.replaced[name]].dtype
        return self.base.view_dtype(name)

    def changes(self, name: str) -> bool:
        """Whether the fine-tuned tensor differs from the base's (targeted or replaced by the adapter)."""
        return name in self.targets or name in self.replaced

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat elements [start, stop) of the fine-tuned tensor; only the rows covering them are computed."""
        target = self.targets.get(name)
        if target is None:
            return self._base_view(name, start, stop)
        info = self.info(name)
        stop = info.numel if stop is None else stop
        dtype = torch.float64 if info.dtype == torch.float64 else torch.float32
        if stop <= start:
            return torch.empty(0, dtype=dtype)
        if target.bias:
            factors = self._factors(target, dtype)
            return (self._base_view(name, start, stop).to(dtype) + factors["b"][start:stop])
        cols = info.shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        rows = self._rows(target, r0, r1, cols, dtype)
        return rows.reshape(-1)[start - r0 * cols: stop - r0 * cols]

    def _base_view(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.replaced:
            return self._file_view(self.replaced[name], start, stop)
        return self.base.view(name, start, stop)

    def _file_view(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        with self._lock:  # the adapter file is mapped on first use; worker threads may race to it
            return self.file.view(key, start, stop)

    def _rows(self, target: _Target, r0: int, r1: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [r0, r1) of the stored fine-tuned matrix, in ``dtype``."""
        f = self._factors(target, dtype)
        # copy=True: the base view may be an mmap of the file, never to be written through
        rows = self._base_view(target.name, r0 * cols, r1 * cols).to(dtype, copy=True).reshape(r1 - r0, cols)
        rows.add_(self._delta_rows(target, f, r0, r1))
        if target.magnitude is None:
            return rows
        if target.transposed:  # output features are columns: norms over all rows, computed once per tensor
            return rows.mul_(f["m"] / self._column_norms(target, cols, dtype))
        return rows.mul_((f["m"][r0:r1] / torch.linalg.vector_norm(rows, dim=1)).unsqueeze(1))

    def _delta_rows(self, target: _Target, f: dict, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of ``s * B@A`` in stored orientation, computed in fixed aligned row blocks so that
        every element comes out of the same matmul shape however the caller chunks the tensor."""
        total = self.info(target.name).shape[0]
        blocks = []
        for b0 in range(r0 - r0 % ROW_BLOCK, r1, ROW_BLOCK):
            b1 = min(b0 + ROW_BLOCK, total)
            if target.transposed:  # stored = (B@A).T: row i of it is B @ A[:, i]
                blocks.append(f["a"][:, b0:b1].T.contiguous() @ f["bt"])
            else:
                blocks.append(f["b"][b0:b1] @ f["a"])
        first = r0 - r0 % ROW_BLOCK
        delta = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return delta[r0 - first: r1 - first]

    def _column_norms(self, target: _Target, cols: int, dtype: torch.dtype) -> torch.Tensor:
        f = self._factors(target, dtype)
        if "norms" not in f:
            total_rows = self.info(target.name).shape[0]
            step = max(1, (1 << 22) // cols)
            sq = torch.zeros(cols, dtype=dtype)
            plain = replace(target, magnitude=None)
            for r0 in range(0, total_rows, step):
                r1 = min(total_rows, r0 + step)
                sq += self._rows(plain, r0, r1, cols, dtype).square().sum(dim=0)
            f["norms"] = sq.sqrt_()
        return f["norms"]

    def _factors(self, target: _Target, dtype: torch.dtype) -> dict:
        """This thread's cached factors of ``target`` (scale folded into B): at most one tensor's worth."""
        cache = getattr(self._local, "cache", None)
        if cache is not None and cache[0] == (target.name, dtype):
            return cache[1]
        f = {"b": self._file_view(target.b).to(dtype).reshape(self.file.tensors[target.b].shape) * target.scale}
        if target.a is not None:
            f["a"] = self._file_view(target.a).to(dtype).reshape(self.file.tensors[target.a].shape)
            f["bt"] = f["b"].T.contiguous()
        if target.magnitude is not None:
            f["m"] = self._file_view(target.magnitude).to(dtype).reshape(-1)
        self._local.cache = ((target.name, dtype), f)
        return f

    def release(self, name: str) -> None:
        cache = getattr(self._local, "cache", None)
        if cache is not None and cache[0][0] == name:
            self._local.cache = None
        if name in self.replaced:
            self.file.release(self.replaced[name])
        if name not in self.replaced and name in self.base:
            self.base.release(name)

    def close(self) -> None:
        self.file.close()
        if self._owns_base:
            self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        """One line: what the adapter is and how much of the base it changes."""
        kind = "DoRA" if self.use_dora else ("rsLoRA" if self.use_rslora else "LoRA")
        scale = self.scale
        weights = sum(not t.bias for t in self.targets.values())
        return (f"{self.role} is a {kind} adapter (r={self.r}, alpha={self.lora_alpha:g}, scale={scale:g}"
                f"{', per-module rank/alpha patterns' if self.rank_pattern or self.alpha_pattern else ''}) "
                f"over base {self.base.path}: {weights} targeted tensor(s), {len(self.replaced)} saved whole; "
                f"the rest are the base's")


def adapter_notes(method: str, models: dict) -> list[str]:
    """Summary notes saying what a merge with LoRA inputs computes (each method's ``lora_note``)."""
    spec = registry.get(method) if method in registry.names() else None
    notes = []
    for model in models.values():
        if not isinstance(model, LoraAdapter):
            continue
        notes.append(model.describe())
        if model.use_dora:
            notes.append(f"{model.role}: DoRA tensors are materialised as m * V / ||V|| with V = W_base + s*B@A "
                         "(norm per output feature), then merged")
        elif spec is not None and spec.lora_note:
            notes.append(f"{model.role}: {spec.lora_note}")
    return notes


def copy_when_unchanged(models: dict, op: Operation, name: str) -> Operation:
    """The base's tensor as a plain copy when every input of ``op`` equals it (LoRA leaves the tensor alone).

    Operations that give equal inputs back (``Operation.preserves_equal_inputs``: interpolations, task
    arithmetic; not unnormalised linear weights summing to other than 1) cost no arithmetic then and stay
    bit-exact.
    """
    if isinstance(op, Copy) or not op.preserves_equal_inputs():
        return op
    adapters = [k for k in op.inputs if isinstance(models[k], LoraAdapter)]
    if not adapters or any(models[k].changes(name) for k in adapters):
        return op
    bases = {Path(models[k].base.path).resolve() for k in adapters}
    plain = [k for k in op.inputs if k not in adapters]
    if len(bases) != 1 or any(Path(models[k].path).resolve() not in bases or name not in models[k] for k in plain):
        return op
    return Copy((plain[0] if plain else adapters[0],))
