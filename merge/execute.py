"""The executor: runs a plan tensor by tensor, chunk by chunk, on CPU or GPU, in bounded memory.

Each worker thread takes whole tensors; inside a tensor it walks fixed-size flat chunks (the chunk geometry
depends only on the tensor, so results are byte-identical on any thread count), reads each input chunk from
the page cache (positional reads) into a reused buffer of the compute dtype the planner chose, applies the
method's kernel and writes the cast result straight to its planned place in the output shard, from a buffer
placed for direct I/O. Torch kernels, ``pread`` and ``pwrite`` release the GIL, so reading, computing and
writing of different tensors overlap across workers.

The concerns live apart: :mod:`merge.scheduler` (workers, order, memory fit), :mod:`merge.chunk_io`
(buffers, staging, placement) and the kernels in :mod:`merge.methods` (every formula).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import methods
from .chunk_io import ChunkIO, reads_files
from .errors import MergeError
from .fp8_output import Fp8Scales
from .io.quantized import fp8_block_amax, fp8_quantise_chunk, fp8_scale_inv
from .io.writer import ShardWriter
from .methods import registry
from .methods.base import Copy
from .methods.chunks import CHUNK_ELEMENTS, chunk_ranges
from .plan import Plan, TensorJob, TensorSource
from .scheduler import DEFAULT_GPU_MEMORY, DEFAULT_MEMORY, estimate_peak_bytes, fit_memory, order, run_jobs  # noqa: F401


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: torch sees no CUDA GPU here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: use auto, cpu or cuda")
    return torch.device(device)


@dataclass
class ExecutionStats:
    """What happened, for the summary and the card: what kernels report, by tensor (``slerp``: the
    coefficients, branch and angle of each SLERP)."""

    slerp: dict[str, methods.SlerpCoefficients] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)  # other kernels' statistic -> tensor -> value

    @property
    def spherical(self) -> int:
        return sum(c.spherical for c in self.slerp.values())

    @property
    def linear_fallback(self) -> int:
        return sum(not c.spherical for c in self.slerp.values())

    @property
    def max_angle(self) -> float:
        return max((c.angle for c in self.slerp.values()), default=0.0)

    def record(self, statistic: str, name: str, value) -> None:
        own = getattr(self, statistic, None) if statistic != "reports" else None
        (own if isinstance(own, dict) else self.reports.setdefault(statistic, {}))[name] = value


class Executor:
    """Runs plans on one device with ``threads`` workers."""

    def __init__(self, device: torch.device, threads: int = 2, chunk_elements: int = CHUNK_ELEMENTS,
                 check_finite: bool = True, memory: int = DEFAULT_MEMORY, gpu_memory: int = DEFAULT_GPU_MEMORY):
        self.device = device
        self.check_finite = check_finite  # fail on the first NaN/Inf written (one cached reduction per chunk)
        self.threads = max(1, threads)
        self.chunk = max(1, chunk_elements)
        self.memory, self.gpu_memory = memory, gpu_memory
        self.io = ChunkIO(device, self.chunk)
        self._scales: dict[str, torch.Tensor] = {}  # FP8 output scales computed for one of weight/scale job
        self._scales_lock = threading.Lock()

    def run(self, plan: Plan, models: Mapping[str, TensorSource], writer: ShardWriter,
            skip: set[str] = frozenset(), on_done: Callable[[TensorJob], None] | None = None,
            progress: Callable[[int], None] | None = None, stats: ExecutionStats | None = None) -> ExecutionStats:
        """Write every job not in ``skip``; ``on_done(job)`` runs once a tensor is fully written; ``stats``
        (default: a new one) is filled in place, so a resumed run can start from recorded results."""
        stats = stats if stats is not None else ExecutionStats()
        fit = fit_memory(plan, self.threads, self.chunk, self.memory, self.device.type == "cuda", self.gpu_memory)
        self.threads, self.chunk = fit.threads, fit.chunk
        self.io.chunk = self.chunk
        lock = threading.Lock()

        def one(job: TensorJob) -> None:
            reported = self._run_job(job, models, writer)
            for key in dict.fromkeys(job.op.inputs + (job.primary,)):
                models[key].release(job.source_name(key))
            if reported is not None:
                with lock:
                    stats.record(*reported)
            if on_done:
                on_done(job)
            if progress:
                progress(job.numel * job.out_dtype.itemsize)

        run_jobs(order([j for j in plan.jobs if j.name not in skip], self.threads), one, self.threads)
        return stats

    # -- one tensor ----------------------------------------------------------------------------------------
    def _run_job(self, job: TensorJob, models: Mapping[str, TensorSource], writer: ShardWriter):
        """Writes ``job``; returns what its kernel reports as ``(statistic, name, value)``, or None."""
        op = job.op
        with self.io.stream():
            if isinstance(op, Copy):
                self._copy(job, models[op.inputs[0]], job.source_name(op.inputs[0]), 0, job.numel, writer)
                return None
            if isinstance(op, Fp8Scales):  # the scale_inv tensor of an FP8 output weight
                self._write(job, 0, self._fp8_scales(op.weight, models).reshape(-1), writer)
                return None
            block = job.fp8_block
            scales = self._fp8_scales(job, models) if block else None
            kernel, state, chunks = self._merged_chunks(job, models)
            for chunk, result in chunks:
                if block:
                    result = fp8_quantise_chunk(result, scales, chunk.start, chunk.stop, job.shape, block)
                try:
                    self._write(job, chunk.start, result, writer)
                except _NonFinite as bad:
                    raise self._nonfinite_error(job, models, chunk.start, chunk.stop, bad.first) from None
            if job.merged_numel < job.numel:
                self._copy(job, models[job.primary], job.source_name(job.primary), job.merged_numel, job.numel, writer)
        value = kernel.report(state)
        return None if value is None else (kernel.statistic, job.name, value)

    def _merged_chunks(self, job: TensorJob, models: Mapping[str, TensorSource]):
        """``job``'s kernel, its state (after its statistics passes) and an iterator of ``(chunk, result)``
        over the merged elements: the kernel's result per chunk, rounded to the job's working dtype."""
        kernel = registry.kernel_for(job.op)
        reader = self.io.reader(job, models)
        state = kernel.prepare(job, reader)
        round_to = job.op.result_dtype(job.round_to)

        def chunks():
            for chunk in reader.ranges():
                result = kernel.apply(job, reader.load(*chunk), state, chunk, reader)
                if round_to is not None and result.dtype != round_to:
                    result = result.to(round_to)
                yield chunk, result

        return kernel, state, chunks()

    def _fp8_scales(self, job: TensorJob, models: Mapping[str, TensorSource]) -> torch.Tensor:
        """``scale_inv`` of an FP8 output weight, ``amax(|block|) / 448`` per block of its merged values, from
        one extra pass; computed once for the weight and its scale tensor (whichever job runs first)."""
        with self._scales_lock:
            if job.name in self._scales:
                return self._scales.pop(job.name)
        amax = None
        for chunk, result in self._merged_chunks(job, models)[2]:
            amax = fp8_block_amax(result, chunk.start, chunk.stop, job.shape, job.fp8_block, amax)
        scales = fp8_scale_inv(amax)
        with self._scales_lock:
            self._scales[job.name] = scales
        return scales

    def _copy(self, job: TensorJob, model: TensorSource, name: str, start: int, stop: int,
              writer: ShardWriter) -> None:
        same = model.info(name).dtype == job.out_dtype and reads_files(model)
        for _, s, e in chunk_ranges(stop - start, self.chunk):
            out = self.io.out_buffer(writer, job, start + s, e - s)
            data = model.read_into(name, start + s, out) if same else \
                self.io.raw(model, name, start + s, start + e, "copy")
            if self.check_finite:
                first = first_nonfinite(data)
                if first is not None:
                    raise MergeError(f"{_label(model)}: tensor {name!r} already holds NaN/Inf (first at flat element "
                                     f"{start + s + first}), copied unchanged to the output; repair that "
                                     "checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) to write it as is")
            if data.data_ptr() != out.data_ptr():
                data = out.copy_(data)
            writer.write(job.name, start + s, data)

    def _write(self, job: TensorJob, start: int, result: torch.Tensor, writer: ShardWriter) -> None:
        cuda = self.device.type == "cuda"
        out = self.io.out_buffer(writer, job, start, result.numel(), pinned=cuda)
        if cuda:
            out.copy_(result.to(job.out_dtype), non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            out.copy_(result)
        if self.check_finite:  # after the cast: overflow to the output dtype counts too
            first = first_nonfinite(out)
            if first is not None:
                raise _NonFinite(job, start, first)
        writer.write(job.name, start, out)

    def _nonfinite_error(self, job: TensorJob, models: Mapping[str, TensorSource], start: int, stop: int,
                         first: int) -> MergeError:
        """The error for a non-finite output chunk [start, stop): an input already non-finite there is named as
        the cause, else the merge itself overflowed (parameters or output dtype)."""
        where = f"output tensor {job.name!r} has NaN/Inf (first at flat element {start + first})"
        fix = "or pass --allow-nonfinite (allow_nonfinite=True) to write it anyway"
        for slot, key in enumerate(job.op.inputs):
            name = job.source_name(key)
            bad = first_nonfinite(self.io.raw(models[key], name, start, stop, f"check{slot}"))
            if bad is not None:
                return MergeError(f"{where}: its input {_label(models[key])} tensor {name!r} already holds NaN/Inf "
                                  f"(first at flat element {start + bad}); repair that checkpoint, {fix}")
        return MergeError(f"{where}, from finite inputs: the merge overflowed {str(job.out_dtype)[6:]}; use "
                          f"smaller t/scale values or a wider --dtype, {fix}")


class _NonFinite(MergeError):
    """An output chunk of ``job`` from ``start`` holds NaN/Inf at chunk element ``first`` (the chunk loop turns
    it into an error naming the cause)."""

    def __init__(self, job: TensorJob, start: int, first: int):
        super().__init__(f"output tensor {job.name!r} has NaN/Inf (first at flat element {start + first}); pass "
                         "--allow-nonfinite (allow_nonfinite=True) to write it anyway")
        self.first = first


_SUMMABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def first_nonfinite(values: torch.Tensor) -> int | None:
    """The flat index of the first NaN/Inf in ``values``, or None when all are finite (non-float: None).

    Fast path: one sum over the chunk, just written and still in cache. IEEE arithmetic makes a sum NaN/Inf
    whenever any term is (inf + finite = inf, inf - inf = nan, nan + x = nan), so a finite sum proves every
    element finite. A non-finite sum may also be an overflow of large finite values (a float16 sum passes
    65504 easily), so it is summed again in float64, which no chunk of 16/32-bit values can overflow; only
    when that is not finite either (or for float64 values) is each element tested.
    """
    if not values.dtype.is_floating_point or values.numel() == 0:
        return None
    if values.dtype not in _SUMMABLE:  # FP8 codes and the like: torch sums and tests them as float32
        values = values.float()
    if math.isfinite(float(values.sum())) or (
            values.dtype != torch.float64 and math.isfinite(float(values.sum(dtype=torch.float64)))):
        return None
    bad = ~torch.isfinite(values.reshape(-1))
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0])


def _label(model: TensorSource) -> str:
    """How errors name an input: its role and folder (e.g. ``SFT ./med``)."""
    role = model.role
    return role if " " in role else f"{role} {model.path}".rstrip()
