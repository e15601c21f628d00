"""Checks that a model folder is complete and consistent: ``merge verify OUT`` / ``merge.verify(out)``.

The cheap part (run on every merge before the final rename) reads only headers: the index against the shard
files, every safetensors header, and that the sizes add up (each file's data section exactly tiled by its
tensors, ``total_size`` equal to the tensor bytes). ``load=True`` also loads the folder with transformers
and runs one forward pass.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, MergeError
from .io.checkpoint import SAFE_INDEX, SAFE_SINGLE, read_json, safe_member
from .io.safetensors_file import TensorInfo, read_header


class VerifyError(MergeError):
    """The folder is not a complete, consistent model."""


@dataclass
class VerifyReport:
    folder: Path
    shards: int
    tensors: int
    tensor_bytes: int
    loaded: bool = False

    def __str__(self) -> str:
        text = f"ok: {self.folder}: {self.tensors} tensors, {self.tensor_bytes} bytes in {self.shards} shard(s)"
        return text + ("; loaded with transformers and ran a forward pass" if self.loaded else "")


def verify(out, load: bool = False) -> VerifyReport:
    """Verify the model folder ``out``; raises :class:`VerifyError` (a MergeError) naming the first problem."""
    folder = Path(out).expanduser()
    if not folder.is_dir():
        raise VerifyError(f"{folder}: no such folder")
    try:
        report = _check_files(folder)
    except InputError as e:
        raise VerifyError(str(e)) from None
    if load:
        _load_and_run(folder)
        report.loaded = True
    return report


def _check_files(folder: Path) -> VerifyReport:
    index_path = folder / SAFE_INDEX
    present = {p.name for p in folder.glob("*.safetensors")}
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise VerifyError(f"{index_path}: weight_map is missing, empty or malformed")
        files = list(dict.fromkeys(weight_map.values()))
        for rel in files:
            if not safe_member(folder, rel, index_path).is_file():
                raise VerifyError(f"{index_path}: names shard {rel!r}, which is missing")
        stray = sorted(present - set(files))
        if stray:
            raise VerifyError(f"{folder / stray[0]}: a shard the index does not name (left from another run?); delete it")
    elif SAFE_SINGLE in present and len(present) == 1:
        weight_map, files = None, [SAFE_SINGLE]
    elif present:
        raise VerifyError(f"{folder}: {len(present)} safetensors files but no {SAFE_INDEX}")
    else:
        raise VerifyError(f"{folder}: no model weights (no *.safetensors file)")

    tensors: dict[str, str] = {}
    total = 0
    for rel in files:
        path = folder / rel
        infos, _ = read_header(path)
        _check_tiling(path, infos)
        for name, info in infos.items():
            if name in tensors:
                raise VerifyError(f"{path}: tensor {name!r} is also in {tensors[name]}")
            tensors[name] = rel
            total += info.nbytes
    if weight_map is not None:
        for name, rel in weight_map.items():
            if tensors.get(name) != rel:
                raise VerifyError(f"{index_path}: lists tensor {name!r} in {rel!r}, but that shard does not hold it")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise VerifyError(f"{folder / tensors[unlisted[0]]}: holds tensor {unlisted[0]!r}, which the index does not list")
        declared = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        if declared is not None and declared != total:
            raise VerifyError(f"{index_path}: total_size is {declared} but the shards hold {total} tensor bytes")
    if (folder / "config.json").exists():
        read_json(folder / "config.json")
    return VerifyReport(folder, len(files), len(tensors), total)


def _check_tiling(path: Path, infos: dict[str, TensorInfo]) -> None:
    """The data section must be exactly covered by the tensors (read_header already refused overlaps)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    data_len = path.stat().st_size - 8 - header_len
    covered = sum(i.nbytes for i in infos.values())
    if covered != data_len:
        raise VerifyError(f"{path}: tensors cover {covered} of its {data_len} data bytes; the file is truncated, "
                          "padded or has gaps")


def model_class(config: dict):
    """The transformers class that loads a checkpoint with ``config``: the class its ``architectures`` names
    (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ``LlamaForCausalLM``...) when
    transformers has it, else ``AutoModelForImageTextToText`` for a ``*ForConditionalGeneration``, else
    ``AutoModelForCausalLM``."""
    import transformers

    archs = config.get("architectures") if isinstance(config, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch.isidentifier() and "For" in arch and isinstance(getattr(transformers, arch, None), type):
        return getattr(transformers, arch)
    if arch.endswith("ForConditionalGeneration"):
        for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            if hasattr(transformers, auto):
                return getattr(transformers, auto)
    return transformers.AutoModelForCausalLM


def _load_and_run(folder: Path) -> None:
    """Load ``folder`` with the class its config names and run a text-only forward pass (vision-language
    models too: input ids alone, no image); the logits must be finite."""
    import warnings

    import torch

    if not (folder / "config.json").exists():
        raise VerifyError(f"{folder}: no config.json, so transformers cannot load it")
    try:
        cls = model_class(read_json(folder / "config.json"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(folder, use_safetensors=True)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        vocab = int(getattr(text_config, "vocab_size", None) or getattr(model.config, "vocab_size", 8) or 8)
        with torch.no_grad():
            logits = model(input_ids=torch.arange(min(8, vocab)).unsqueeze(0)).logits
    except Exception as e:  # any failure to load or run is the finding
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VerifyError(f"{folder}: transformers could not load and run it ({first[:300]})") from None
    if not bool(torch.isfinite(logits).all()):
        raise VerifyError(f"{folder}: loads, but a forward pass gives NaN/Inf logits")
