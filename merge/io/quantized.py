"""Quantised checkpoints: FP8 block-scaled weights are dequantised on read; every other format is refused.

FP8 block-scaled layout (DeepSeek-V3, Qwen3-FP8, transformers' ``quant_method: fp8``): a 2-D weight stored as
``float8_e4m3fn`` codes with a float32 ``<name>_scale_inv`` of shape ``[ceil(rows/b0), ceil(cols/b1)]``,
``[b0, b1]`` being ``quantization_config.weight_block_size``. The weight it stands for is
``W[i, j] = code[i, j] * scale_inv[i // b0, j // b1]``, computed in float32. :class:`DequantisedCheckpoint`
presents such a folder as the float model it stands for (like a LoRA adapter presents its fine-tune): the
scales are consumed, never output as tensors of their own, and ``view`` dequantises only the rows covering the
range asked for.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError
from .checkpoint import Checkpoint
from .safetensors_file import TensorInfo

SCALE_SUFFIX = "_scale_inv"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEQUANTISED_DTYPE = torch.bfloat16  # what a dequantised tensor is written as by default
FIX = ("dequantise it first (e.g. load it with transformers and save_pretrained the unquantised model) "
       "or use the unquantised checkpoint")
# Tensor names (last dotted part) that only quantised formats store, and the format they betray.
QUANTISED_TENSORS = {
    "qweight": "GPTQ/AWQ", "qzeros": "GPTQ/AWQ", "scales": "GPTQ/AWQ", "g_idx": "GPTQ",
    "absmax": "bitsandbytes", "quant_map": "bitsandbytes", "nested_absmax": "bitsandbytes",
    "nested_quant_map": "bitsandbytes", "SCB": "bitsandbytes (int8)", "weight_format": "bitsandbytes (int8)",
    "weight_packed": "compressed-tensors", "weight_scale": "compressed-tensors / per-channel FP8",
    "weight_zero_point": "compressed-tensors", "weight_global_scale": "compressed-tensors (NVFP4)",
    "weight_shape": "compressed-tensors",
}
QUANT_METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "compressed-tensors":
                      "compressed-tensors", "fbgemm_fp8": "FBGEMM FP8 (per-channel)", "aqlm": "AQLM",
                      "quanto": "Quanto", "eetq": "EETQ", "hqq": "HQQ", "torchao": "torchao", "gguf": "GGUF"}


@dataclass(frozen=True)
class Quantisation:
    """How a checkpoint's weights are stored: FP8 codes in ``block`` (rows, cols) blocks, scales by weight."""

    block: tuple[int, int]
    scales: dict[str, str]  # weight name -> its ``_scale_inv`` tensor

    def describe(self) -> str:
        return f"FP8 block-scaled ({self.block[0]}x{self.block[1]})"


def refuse_unsupported(path: Path, role: str, config: dict) -> None:
    """Refuse quantised formats we cannot read correctly, from what the folder and its config.json say."""
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and _only_gguf(path):
        raise InputError(f"{role} {path}: is a GGUF (llama.cpp) checkpoint, which cannot be merged; use the "
                         "original safetensors checkpoint (or convert it with transformers' "
                         "from_pretrained(..., gguf_file=...) and save_pretrained)")
    qc = config.get("quantization_config")
    if qc is None:
        return
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if not method and isinstance(qc, dict) and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"
    if method != "fp8":
        what = QUANT_METHOD_NAMES.get(method, method or "an unnamed method")
        raise InputError(f"{role} {path}: is quantised with {what} (config.json quantization_config.quant_method "
                         f"{method!r}); only FP8 block-scaled checkpoints are read - {FIX}")


def _only_gguf(folder: Path) -> bool:
    names = os.listdir(folder)
    weights = [n for n in names if n.endswith((".safetensors", ".bin"))]
    return not weights and any(n.endswith(".gguf") for n in names)


def find_quantisation(checkpoint: Checkpoint) -> Quantisation | None:
    """The FP8 block layout of ``checkpoint`` (None for a float checkpoint); any other quantised tensor names
    are refused. Shapes and dtypes of every code/scale pair are checked here, before any tensor is read."""
    where = f"{checkpoint.role} {checkpoint.path}"
    names = checkpoint.names()
    for name in names:
        last = name.rsplit(".", 1)[-1]
        if last in QUANTISED_TENSORS or ".quant_state." in name:
            what = QUANTISED_TENSORS.get(last, "bitsandbytes")
            raise InputError(f"{where}: tensor {name!r} is {what} quantisation data, which cannot be merged; {FIX}")
    scales = {n[:-len(SCALE_SUFFIX)]: n for n in names if n.endswith(SCALE_SUFFIX)}
    if not scales:
        if "quantization_config" in checkpoint.config:
            raise InputError(f"{where}: config.json has quantization_config (quant_method fp8) but no tensor has a "
                             f"{SCALE_SUFFIX}; remove quantization_config if the weights are plain floats, or "
                             "re-download the checkpoint")
        return None
    block = _block_size(checkpoint, where)
    for weight, scale in scales.items():
        _check_pair(checkpoint, weight, scale, block, where)
    return Quantisation(block, scales)


def _block_size(checkpoint: Checkpoint, where: str) -> tuple[int, int]:
    qc = checkpoint.config.get("quantization_config")
    size = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(b, int) and b > 0 for b in size)):
        raise InputError(f"{where}: has {SCALE_SUFFIX} tensors (FP8 block-scaled) but config.json gives no "
                         f"quantization_config.weight_block_size [rows, cols] (got {size!r}); add it "
                         "(DeepSeek-V3 uses [128, 128])")
    return size[0], size[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """``[ceil(rows/b0), ceil(cols/b1)]``: one scale per block, partial blocks at the edges included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _check_pair(checkpoint: Checkpoint, weight: str, scale: str, block: tuple[int, int], where: str) -> None:
    if weight not in checkpoint:
        raise InputError(f"{where}: scale tensor {scale!r} has no weight {weight!r}; the checkpoint is incomplete")
    w, s = checkpoint.info(weight), checkpoint.info(scale)
    if w.dtype not in FP8_CODES or len(w.shape) != 2:
        raise InputError(f"{where}: tensor {weight!r} has a {SCALE_SUFFIX} but is {w.dtype} of shape "
                         f"{list(w.shape)}, not a 2-D FP8 weight; the checkpoint is inconsistent")
    want = scale_shape(w.shape, block)
    if s.dtype not in (torch.float32, torch.bfloat16, torch.float16) or tuple(s.shape) != want:
        raise InputError(f"{where}: scale {scale!r} is {s.dtype} of shape {list(s.shape)}, but weight {weight!r} "
                         f"{list(w.shape)} with weight_block_size {list(block)} needs float32 {list(want)}")


def open_checkpoint(path: str | os.PathLike, role: str = "model", checkpoint: Checkpoint | None = None):
    """A :class:`Checkpoint`, or a :class:`DequantisedCheckpoint` when it is FP8 block-scaled; other quantised
    formats are refused with one line. ``checkpoint``: the already opened view of ``path`` to wrap (e.g. a
    Hub checkpoint known by its headers only)."""
    path = Path(path)
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file():
        from .checkpoint import read_json

        refuse_unsupported(path, role, read_json(config_path))
    else:
        refuse_unsupported(path, role, {})
    checkpoint = checkpoint if checkpoint is not None else Checkpoint(path, role=role)
    try:
        quant = find_quantisation(checkpoint)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint if quant is None else DequantisedCheckpoint(checkpoint, quant)


class DequantisedCheckpoint:
    """A :class:`~merge.plan.TensorSource` over an FP8 block-scaled checkpoint: the float model it stands for.

    ``info`` gives a quantised weight as the output stores it by default (bfloat16); ``view`` gives it
    dequantised in float32 (one rounding per merge). Other tensors are the checkpoint's zero-copy views.
    ``config`` has no ``quantization_config``; ``quantisation`` says what was read.
    """

    def __init__(self, checkpoint: Checkpoint, quantisation: Quantisation):
        self.checkpoint = checkpoint
        self.quantisation = quantisation
        self.path, self.role = checkpoint.path, checkpoint.role
        self.stored_config = checkpoint.config
        self.config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
        self._scale_names = set(quantisation.scales.values())
        self._lock = threading.Lock()  # files are mapped on first use; worker threads may race to it

    def names(self) -> list[str]:
        return [n for n in self.checkpoint.names() if n not in self._scale_names]

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint and name not in self._scale_names

    def info(self, name: str) -> TensorInfo:
        info = self.checkpoint.info(name)
        return replace(info, dtype=DEQUANTISED_DTYPE) if name in self.quantisation.scales else info

    reads_files = False  # weights are dequantised on read

    def is_quantised(self, name: str) -> bool:
        return name in self.quantisation.scales

    def view_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if self.is_quantised(name) else self.checkpoint.view_dtype(name)

    @property
    def side_files_path(self):
        return self.checkpoint.side_files_path

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat elements [start, stop); a quantised weight's covering rows are dequantised, in float32."""
        scale = self.quantisation.scales.get(name)
        if scale is None:
            return self._view(name, start, stop)
        rows, cols = self.checkpoint.info(name).shape
        stop = rows * cols if stop is None else stop
        if stop <= start:
            return torch.empty(0, dtype=torch.float32)
        r0, r1 = start // cols, -(-stop // cols)
        codes = self._view(name, r0 * cols, r1 * cols).reshape(r1 - r0, cols)
        scales = self._view(scale).reshape(self.checkpoint.info(scale).shape)
        values = dequantise_rows(codes, scales, r0, self.quantisation.block)
        return values.reshape(-1)[start - r0 * cols: stop - r0 * cols]

    def _view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        with self._lock:
            return self.checkpoint.view(name, start, stop)

    def release(self, name: str) -> None:
        self.checkpoint.release(name)
        if name in self.quantisation.scales:
            self.checkpoint.release(self.quantisation.scales[name])

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        """One line: what was read and what happens to it."""
        return (f"{self.role}: {self.quantisation.describe()}, {len(self.quantisation.scales)} weight(s) "
                "dequantised on read (code * scale_inv per block, float32) and merged in float32")


def dequantise_rows(codes: torch.Tensor, scale_inv: torch.Tensor, r0: int, block: tuple[int, int]) -> torch.Tensor:
    """Rows ``r0 .. r0 + len(codes)`` of ``W[i, j] = code[i, j] * scale_inv[i // b0, j // b1]``, float32."""
    n, cols = codes.shape
    return codes.to(torch.float32) * _scale_per_element(scale_inv, r0, n, cols, block)


def _scale_per_element(scale_inv: torch.Tensor, r0: int, n: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """``scale_inv[i // b0, j // b1]`` for rows ``r0 .. r0 + n`` and every column, float32."""
    b0, b1 = block
    s0, s1 = r0 // b0, -(-(r0 + n) // b0)
    per_row = scale_inv[s0:s1].to(torch.float32).repeat_interleave(b0, dim=0)[r0 - s0 * b0: r0 - s0 * b0 + n]
    return per_row.repeat_interleave(b1, dim=1)[:, :cols]


# -- writing FP8 block-scaled output (``--dtype fp8``) ----------------------------------------------------------
def fp8_block_amax(values: torch.Tensor, start: int, stop: int, shape: tuple[int, int], block: tuple[int, int],
                   amax: torch.Tensor | None = None) -> torch.Tensor:
    """``amax`` (``[ceil(rows/b0), ceil(cols/b1)]``, float32) updated with ``max |W|`` of flat elements
    [start, stop) of W (``values``): chunks may start and end anywhere, blocks are completed across calls."""
    rows, cols = shape
    b0, b1 = block
    grid = scale_shape(shape, block)
    if amax is None:
        amax = torch.zeros(grid, dtype=torch.float32, device=values.device)
    r0, r1 = start // cols, -(-stop // cols)
    full = torch.zeros((r1 - r0) * cols, dtype=torch.float32, device=values.device)  # |W| >= 0: zeros are neutral
    full[start - r0 * cols: stop - r0 * cols] = values.abs()
    full = full.reshape(r1 - r0, cols)
    if grid[1] * b1 != cols:
        full = torch.nn.functional.pad(full, (0, grid[1] * b1 - cols))
    row_max = full.reshape(r1 - r0, grid[1], b1).amax(dim=2)
    s0, s1 = r0 // b0, -(-r1 // b0)
    band = torch.arange(r0, r1, device=values.device) // b0 - s0
    part = torch.zeros(s1 - s0, grid[1], dtype=torch.float32, device=values.device).scatter_reduce_(
        0, band.unsqueeze(1).expand_as(row_max), row_max, "amax")
    amax[s0:s1] = torch.maximum(amax[s0:s1], part)
    return amax


def fp8_scale_inv(amax: torch.Tensor) -> torch.Tensor:
    """``scale_inv = amax / 448`` per block (the largest entry maps to the largest FP8 code); an all-zero
    block gets 1 (its codes are 0 whatever the scale)."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def fp8_quantise_chunk(values: torch.Tensor, scale_inv: torch.Tensor, start: int, stop: int,
                       shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Flat elements [start, stop) of ``code = W / scale_inv[i // b0, j // b1]`` as float8_e4m3fn."""
    cols = shape[1]
    r0, r1 = start // cols, -(-stop // cols)
    per_element = _scale_per_element(scale_inv, r0, r1 - r0, cols, block).reshape(-1)[start - r0 * cols:
                                                                                      stop - r0 * cols]
    return (values.to(torch.float32) / per_element).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantised_of(model) -> DequantisedCheckpoint | None:
    """The FP8 checkpoint a tensor source reads through, if any (itself, or a LoRA adapter's base)."""
    for m in (model, getattr(model, "base", None)):
        if isinstance(m, DequantisedCheckpoint):
            return m
    return None


def quantisation_notes(models: dict, out_dtype_name: str | None) -> list[str]:
    """Summary notes for FP8 inputs: what was dequantised and how the output is stored."""
    notes = [d.describe() for d in map(dequantised_of, models.values()) if d is not None]
    if notes and out_dtype_name != "fp8":
        written = out_dtype_name or "bfloat16 where the input was FP8"
        notes.append(f"output written as {written}, without quantization_config in config.json "
                     "(pass --dtype to choose another float dtype)")
    return list(dict.fromkeys(notes))


DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's, for FP8 output of float inputs


def fp8_output_block(models: dict, primary: str) -> tuple[int, int]:
    """The block size of the FP8 output: the primary's (else the first FP8 input's), else 128x128."""
    for key in [primary] + [k for k in models if k != primary]:
        d = dequantised_of(models[key])
        if d is not None:
            return d.quantisation.block
    return DEFAULT_BLOCK


def quantised_in_input(job, models: dict) -> bool:
    """Whether an input of ``job`` stores its tensor FP8-quantised."""
    for key in dict.fromkeys(job.op.inputs + (job.primary,)):
        d = dequantised_of(models[key])
        if d is not None and d.is_quantised(job.source_name(key)):
            return True
    return False


def fp8_config(models: dict, primary: str) -> dict:
    """The primary's config.json with the ``quantization_config`` of the FP8 output (an FP8 input's, with
    the output's block size; else transformers' fp8 defaults)."""
    block = list(fp8_output_block(models, primary))
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    for key in [primary] + [k for k in models if k != primary]:
        d = dequantised_of(models[key])
        if d is not None:
            qc = dict(d.stored_config["quantization_config"])
            break
    return {**models[primary].config, "quantization_config": {**qc, "weight_block_size": block}}
