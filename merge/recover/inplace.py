"""One model in memory whose parameters are re-set for each candidate merge, bit-identical to a written merge.

The transformers model is built once from the SFT's config; base and SFT tensors are read once (through the
TensorSource interface, so LoRA adapters work) and kept on the device in the dtype their reader gives. For a
candidate recipe, the same planner as ``merge run`` (``make_plan``) gives each tensor's operation, and the
same kernels compute it (:mod:`merge.methods`), on a reader over the resident inputs with the executor's chunk
geometry and the planner's compute dtype, then cast to the output dtype. So the in-place model equals the
written one bit for bit, by construction.

Evaluation dtype: on the CPU, half-precision parameters are held upcast to float32 (exactly the written
bf16/fp16 values; CPU half-precision matmuls are slow); on a GPU they stay in their own dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError, MergeError
from ..execute import first_nonfinite
from ..io.writer import format_size
from ..keys import BASE, PRIMARY
from ..methods import registry
from ..methods.base import Copy
from ..methods.chunks import CHUNK_ELEMENTS, chunk_ranges
from ..methods.slerp import Slerp, coefficients, slerp_statistics
from ..plan import Plan, TensorJob, make_plan
from ..recipes.operations import operations_for
from ..scheduler import single_threaded_torch
from ..tensor_names import Structure

NO_SHARDING = 1 << 62


class InPlaceModel:
    """``apply(recipe)`` sets every parameter to the merge the recipe describes; ``model`` is then evaluated."""

    def __init__(self, models: dict, labels: dict, device: torch.device, template_recipe,
                 eval_dtype: torch.dtype | None = None):
        self.models, self.labels, self.device = models, labels, device
        self.primary = PRIMARY
        self.n_layers = Structure.of(models[self.primary].config, models[self.primary].names())
        layout = self.plan(template_recipe)
        check_memory(layout, models, device)
        self.model = build_model(models[self.primary].config, layout, device, eval_dtype)
        self.params = _parameters_by_name(self.model)
        self._check_coverage(layout)
        self.inputs: dict[tuple[str, str], torch.Tensor] = {}
        for job in layout.jobs:
            if job.name not in self.params:
                continue
            for key in (PRIMARY, BASE):
                name = job.source_name(key)
                if key in models and name in models[key] and (key, name) not in self.inputs:
                    self.inputs[(key, name)] = models[key].view(name).to(device, copy=True)
                    models[key].release(name)
        self._slerp_stats: dict[str, tuple[float, float, float]] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.current = None

    def plan(self, recipe) -> Plan:
        """The engine's plan of ``recipe`` over these inputs (names, operations, dtypes; no bytes read)."""
        op_for = operations_for(recipe, self.n_layers)
        out_dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
        return make_plan(self.models, self.labels, self.primary, op_for, out_dtype, NO_SHARDING)

    @torch.no_grad()
    def apply(self, recipe) -> None:
        """Set every parameter to what ``merge run`` would write for ``recipe`` (any sweepable method)."""
        for job in self.plan(recipe).jobs:
            param = self.params.get(job.name)
            if param is not None:
                self._set(job, param)
        self.current = recipe

    def _set(self, job: TensorJob, param: torch.Tensor) -> None:
        """Chunk by chunk through reused buffers (no fresh allocations per candidate), with the executor's
        kernel for the operation, over the executor's chunk geometry and the planner's compute dtype."""
        flat = param.view(-1)
        op = job.op
        if isinstance(op, Copy):
            source = self.inputs[(op.inputs[0], job.source_name(op.inputs[0]))].view(-1)
            self._store(flat, source, job.out_dtype)
            self._require_finite(job, flat, 0, {op.inputs[0]: source})
            return
        if op.kind not in registry.sweepable() or job.round_to is not None or getattr(op, "sum_then_divide", False):
            raise InputError(f"sweep: tensor {job.name!r} needs a {op.kind} merge; a sweep evaluates "
                             f"{', '.join(registry.sweepable())} merges in our recipe format")
        sources = [self.inputs[(k, job.source_name(k))].view(-1)[:job.merged_numel] for k in op.inputs]
        reader = _Resident(self, job, sources)
        kernel = registry.kernel_for(op)
        # SLERP's statistics do not depend on t: computed once per tensor, for every candidate
        state = coefficients(op, self._stats(job, reader)) if isinstance(op, Slerp) else kernel.prepare(job, reader)
        for chunk in reader.ranges():
            result = kernel.apply(job, reader.load(*chunk), state, chunk, reader)
            self._store(flat[chunk.start:chunk.stop], result, job.out_dtype)  # the written values, then eval dtype
            self._require_finite(job, flat[chunk.start:chunk.stop], chunk.start, dict(zip(op.inputs, sources)))
        if job.merged_numel < job.numel:  # added vocabulary rows: the SFT's, as the executor copies them
            rows = self.inputs[(job.primary, job.source_name(job.primary))].view(-1)[job.merged_numel:]
            self._store(flat[job.merged_numel:], rows, job.out_dtype)
            self._require_finite(job, flat[job.merged_numel:], job.merged_numel,
                                 {job.primary: self.inputs[(job.primary, job.name)].view(-1)})

    def _require_finite(self, job: TensorJob, stored: torch.Tensor, start: int, sources: dict) -> None:
        """Refuse a candidate whose parameter chunk (elements ``start``.. of ``job``) holds NaN/Inf, naming an
        input that already holds it there, else the candidate's overflow (as ``merge run`` would refuse it)."""
        first = first_nonfinite(stored)
        if first is None:
            return
        where = f"sweep: candidate tensor {job.name!r} has NaN/Inf (first at flat element {start + first})"
        for key, source in sources.items():
            bad = first_nonfinite(source[start:start + stored.numel()])
            if bad is not None:
                raise MergeError(f"{where}: its input {self.labels.get(key, key)} tensor {job.source_name(key)!r} "
                                 f"already holds NaN/Inf (first at flat element {start + bad}); repair that "
                                 "checkpoint")
        raise MergeError(f"{where}, from finite inputs: the merge overflowed {str(job.out_dtype)[6:]}; use t values "
                         "closer to [0, 1]")

    def _buffer(self, slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        key = (slot, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]

    def _store(self, target: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype) -> None:
        """``target = values`` rounded to ``out_dtype`` (what a merge writes), held in ``target``'s dtype."""
        if target.dtype == out_dtype or values.dtype == out_dtype:
            target.copy_(values)
            return
        for _, start, stop in chunk_ranges(values.numel(), CHUNK_ELEMENTS):
            target[start:stop].copy_(self._buffer("out", stop - start, out_dtype).copy_(values[start:stop]))

    def _stats(self, job: TensorJob, reader: _Resident) -> tuple[float, float, float]:
        """SLERP's (dot, |from|^2, |to|^2) as the kernel computes them (:func:`slerp_statistics`)."""
        key = job.name + "|" + ",".join(job.op.inputs)
        if key not in self._slerp_stats:
            with single_threaded_torch():  # reductions in the executor's workers' order: the same bits
                self._slerp_stats[key] = slerp_statistics(reader.passes()())
        return self._slerp_stats[key]

    def _check_coverage(self, layout: Plan) -> None:
        planned = {j.name for j in layout.jobs}
        missing = [n for n in self.params if n not in planned]
        if missing:
            raise InputError(f"sweep: the model built from the SFT's config has parameter(s) the checkpoint lacks: "
                             f"{', '.join(missing[:3])}; is config.json the checkpoint's own?")


class _Resident:
    """A :class:`~merge.methods.base.ChunkReader` over input tensors held on the device: the kernels run on
    it exactly as on the executor's reader (same chunks, same compute dtype, reused buffers)."""

    def __init__(self, model: InPlaceModel, job: TensorJob, sources: list[torch.Tensor]):
        self.model, self.job, self.sources = model, job, sources
        self.device, self.dtype = model.device, job.compute
        self.chunk = registry.chunk_elements(job.op, job.shape, job.merged_numel, CHUNK_ELEMENTS)
        self.single = job.merged_numel <= self.chunk

    def ranges(self):
        return chunk_ranges(self.job.merged_numel, self.chunk)

    def load(self, index: int, start: int, stop: int) -> list[torch.Tensor]:
        return [self.model._buffer(f"in{i}", stop - start, self.dtype).copy_(x[start:stop])
                for i, x in enumerate(self.sources)]

    def passes(self, stored: bool = False, ranges=None):
        def walk():
            for chunk in ranges or self.ranges():
                yield self.load(*chunk)
        return walk

    def scratch(self, slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.model._buffer(slot, n, dtype)


def _parameters_by_name(model) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by checkpoint name; a tied lm_head is left to its embedding."""
    out, seen = {}, set()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p.data
    persistent = set(model.state_dict().keys())
    return {n: p for n, p in out.items() if n in persistent}


def eval_dtype_for(dtype: torch.dtype, device: torch.device, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype a parameter is evaluated in: ``requested``, else float32 for half precision on the CPU."""
    if requested is not None:
        return requested
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def build_model(config: dict, layout: Plan, device: torch.device, eval_dtype: torch.dtype | None = None):
    """A transformers causal LM from ``config`` (no random init), each parameter in its evaluation dtype."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = dict(config)
    if layout.untied:  # tied and untied inputs: the merge has its own lm_head, as the written config says
        cfg["tie_word_embeddings"] = False
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise InputError("sweep: the SFT's config.json has no model_type; cannot build the model to evaluate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config)
        model.tie_weights()  # as from_pretrained does: a tied lm_head is the embedding's own Parameter
    dtypes = {j.name: j.out_dtype for j in layout.jobs}
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            p.data = torch.empty(p.shape, dtype=eval_dtype_for(dtypes.get(name, p.dtype), device, eval_dtype),
                                 device=device)
    return model.to(device).eval()


def check_memory(layout: Plan, models: dict, device: torch.device) -> None:
    """Refuse, with the number, when base + SFT + the model (+ float32 work space) do not fit ``device``."""
    need = estimate_bytes(layout, models)
    free = available_bytes(device)
    if free is not None and need > free:
        raise InputError(f"sweep: needs about {format_size(need)} of {device.type} memory to hold base, SFT and "
                         f"the model being evaluated ({format_size(free)} available); use a machine with more "
                         "memory (or a GPU with --device cuda), or write merges with `merge linear --t ...` and "
                         "evaluate them one by one")


def estimate_bytes(layout: Plan, models: dict) -> int:
    """Input copies in their read dtype + the parameters (float32 on the CPU) + the chunk buffers."""
    total, largest = 0, 0
    for job in layout.jobs:
        total += job.numel * max(job.out_dtype.itemsize, 4)
        largest = max(largest, job.numel)
        for key in (PRIMARY, BASE):
            name = job.source_name(key)
            if key in models and name in models[key]:
                total += job.numel * _read_itemsize(models[key], name)
    return total + 3 * min(largest, CHUNK_ELEMENTS) * 8  # chunk buffers (float64 at most)


def _read_itemsize(model, name: str) -> int:
    """Bytes per element that ``view`` returns (a LoRA adapter computes changed tensors in float32, FP8 weights
    are dequantised to float32)."""
    return model.view_dtype(name).itemsize


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
