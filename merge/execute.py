"""The executor: runs a plan tensor by tensor, chunk by chunk, on CPU or GPU, in bounded memory.

Each worker thread takes whole tensors; inside a tensor it walks fixed-size flat chunks (the chunk geometry
depends only on the tensor, so results are byte-identical on any thread count), reads each input chunk from
the page cache (positional reads) into a reused float32 (float64 for float64 inputs) buffer, applies the method
and writes the cast result straight to its planned place in the output shard, from a buffer placed for direct
I/O. Torch kernels, ``pread`` and ``pwrite`` release the GIL, so reading, computing and writing of different
tensors overlap across workers. ``fit_memory`` sizes workers and chunks to the budgets.
"""

from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from . import methods
from .errors import MergeError
from .io.quantized import fp8_block_amax, fp8_quantise_chunk, fp8_scale_inv
from .io.writer import ALIGN, ShardWriter, format_size
from .plan import Plan, TensorJob, TensorSource

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per input buffer: big enough for cheap calls, small enough for caches
RNG_BLOCK = 1 << 16  # random masks are drawn per fixed block, so they do not depend on the chunk size
MIN_CHUNK = 1 << 16
SAMPLE_BLOCKS = 16
DEFAULT_MEMORY = 512 * 2**20  # host memory for the workers' buffers (``--memory``)
DEFAULT_GPU_MEMORY = 4 * 2**30  # device memory for the workers' buffers (``--gpu-memory``)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: torch sees no CUDA GPU here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: use auto, cpu or cuda")
    return torch.device(device)


def chunk_ranges(numel: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int, int]]:
    """``(index, start, stop)`` flat ranges covering ``numel`` elements."""
    return [(i, s, min(s + chunk, numel)) for i, s in enumerate(range(0, numel, chunk))]


def sample_ranges(numel: int, chunk: int = CHUNK_ELEMENTS, blocks: int = SAMPLE_BLOCKS) -> list[tuple[int, int, int]]:
    """``blocks`` evenly spread ``(index, start, stop)`` ranges holding about 1/32 of ``numel`` elements (64Ki
    to 1Mi in all, at most a chunk, so it fits the chunk's buffers): the sample that proposes magnitude cuts."""
    size = max(1, min(max(numel // 32, 1 << 16), 1 << 20, chunk, numel) // blocks)
    starts = [j * numel // blocks for j in range(blocks)]
    return [(j, start, min(start + size, numel)) for j, start in enumerate(starts)]


def block_generator(seed: int, name: str, stream: int, block: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, tensor name, input, block): the same masks on any thread count."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{stream}\0{block}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def dare_keep(seed: int, name: str, stream: int, start: int, stop: int, density: float,
              device: torch.device) -> torch.Tensor:
    """The DARE keep-mask of elements [start, stop) of one delta, assembled from fixed RNG blocks."""
    parts = []
    for b0 in range(start - start % RNG_BLOCK, stop, RNG_BLOCK):
        g = block_generator(seed, name, stream, b0 // RNG_BLOCK, device)
        block = methods.dare_mask(RNG_BLOCK, density, g, device)
        parts.append(block[max(start, b0) - b0: min(stop, b0 + RNG_BLOCK) - b0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class ExecutionStats:
    """What happened, for the summary and the card."""

    slerp: dict[str, methods.SlerpCoefficients] = field(default_factory=dict)
    bytes_written: int = 0

    @property
    def spherical(self) -> int:
        return sum(c.spherical for c in self.slerp.values())

    @property
    def linear_fallback(self) -> int:
        return sum(not c.spherical for c in self.slerp.values())

    @property
    def max_angle(self) -> float:
        return max((c.angle for c in self.slerp.values()), default=0.0)


class _Buffers(threading.local):
    """Per-thread reusable buffers, grown on demand, so steady state allocates nothing."""

    def __init__(self):
        self.slots: dict[tuple, torch.Tensor] = {}
        self.stream = None

    def get(self, slot: str, n: int, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        key = (slot, dtype, device.type, pinned)
        buf = self.slots.get(key)
        if buf is None or buf.numel() < n:
            size = max(n, 1 << 16)
            buf = torch.empty(size, dtype=dtype, device=device, pin_memory=pinned)
            self.slots[key] = buf
        return buf[:n]


class Executor:
    """Runs plans on one device with ``threads`` workers."""

    def __init__(self, device: torch.device, threads: int = 2, chunk_elements: int = CHUNK_ELEMENTS,
                 check_finite: bool = True, memory: int = DEFAULT_MEMORY, gpu_memory: int = DEFAULT_GPU_MEMORY):
        self.device = device
        self.check_finite = check_finite  # fail on the first NaN/Inf written (one cached reduction per chunk)
        self.threads = max(1, threads)
        self.chunk = max(1, chunk_elements)
        self.memory, self.gpu_memory = memory, gpu_memory
        self._buffers = _Buffers()
        self._scales: dict[str, torch.Tensor] = {}  # FP8 output scales computed for one of weight/scale job
        self._scales_lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------------------
    def run(self, plan: Plan, models: Mapping[str, TensorSource], writer: ShardWriter,
            skip: set[str] = frozenset(), on_done: Callable[[TensorJob], None] | None = None,
            progress: Callable[[int], None] | None = None, stats: ExecutionStats | None = None) -> ExecutionStats:
        """Write every job not in ``skip``; ``on_done(job)`` runs once a tensor is fully written; ``stats``
        (default: a new one) is filled in place, so a resumed run can start from recorded results."""
        stats = stats if stats is not None else ExecutionStats()
        fit = fit_memory(plan, self.threads, self.chunk, self.memory, self.device.type == "cuda", self.gpu_memory)
        self.threads, self.chunk = fit.threads, fit.chunk
        lock = threading.Lock()

        def one(job: TensorJob) -> None:
            coeffs = self._run_job(job, models, writer)
            for key in dict.fromkeys(job.op.inputs + (job.primary,)):
                models[key].release(job.source_name(key))
            with lock:
                if coeffs is not None:
                    stats.slerp[job.name] = coeffs
                stats.bytes_written += job.numel * job.out_dtype.itemsize
            if on_done:
                on_done(job)
            if progress:
                progress(job.numel * job.out_dtype.itemsize)

        jobs = [j for j in plan.jobs if j.name not in skip]
        if self.threads > 1:  # largest first, so no big tensor is left to one worker at the end; else file order
            jobs.sort(key=lambda j: -j.numel)
        with _single_threaded_torch():
            if self.threads == 1:
                for job in jobs:
                    one(job)
            else:
                self._run_parallel(jobs, one)
        return stats

    def _run_parallel(self, jobs: list[TensorJob], one: Callable[[TensorJob], None]) -> None:
        window = 2 * self.threads
        pending: set[Future] = set()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="merge") as pool:
            try:
                for job in jobs:
                    if len(pending) >= window:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            f.result()
                    pending.add(pool.submit(one, job))
                for f in pending:
                    f.result()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise

    # -- one tensor ----------------------------------------------------------------------------------------
    def _run_job(self, job: TensorJob, models: Mapping[str, TensorSource], writer: ShardWriter):
        op = job.op
        coeffs = None
        with self._stream():
            if op.kind == "copy":
                self._copy(job, models[op.inputs[0]], job.source_name(op.inputs[0]), 0, job.numel, writer)
                return None
            if op.kind == "fp8_scales":  # the scale_inv tensor of an FP8 output weight
                self._write(job, 0, self._fp8_scales(op.params["weight"], models).reshape(-1), writer)
                return None
            block = op.params.get("fp8_block")
            scales = self._fp8_scales(job, models) if block else None
            state, chunks = self._merged_chunks(job, models)
            for start, stop, result in chunks:
                if block:
                    result = fp8_quantise_chunk(result, scales, start, stop, job.shape, block)
                try:
                    self._write(job, start, result, writer)
                except _NonFinite as bad:
                    raise self._nonfinite_error(job, models, start, stop, bad.first) from None
            if job.merged_numel < job.numel:
                self._copy(job, models[job.primary], job.source_name(job.primary), job.merged_numel, job.numel, writer)
            if op.kind == "slerp":
                coeffs = state
        return coeffs

    def _merged_chunks(self, job: TensorJob, models: Mapping[str, TensorSource]):
        """The kernel's state (after its statistics passes) and an iterator of ``(start, stop, result)`` over
        the merged elements, chunk by chunk."""
        op = job.op
        compute = torch.float64 if any(models[k].info(job.source_name(k)).dtype == torch.float64
                                       for k in op.inputs) else torch.float32
        working = _working_dtype(job, models)
        if working is not None:  # mergekit semantics: task arithmetic computes in it, others upcast
            compute = working if op.kind == "task_arithmetic" else (
                torch.float64 if working == torch.float64 else torch.float32)
        loader = _Loader(self, job, models, compute, round_to=working)
        kernel = _KERNELS[op.kind]
        state = kernel.prepare(job, loader)

        def chunks():
            for index, start, stop in chunk_ranges(job.merged_numel, self.chunk):
                xs = loader.load(index, start, stop)
                result = kernel.apply(job, xs, state, start, stop, self)
                if working is not None and result.dtype != working:
                    result = result.to(working)
                yield start, stop, result

        return state, chunks()

    def _fp8_scales(self, job: TensorJob, models: Mapping[str, TensorSource]) -> torch.Tensor:
        """``scale_inv`` of an FP8 output weight, ``amax(|block|) / 448`` per block of its merged values, from
        one extra pass; computed once for the weight and its scale tensor (whichever job runs first)."""
        with self._scales_lock:
            if job.name in self._scales:
                return self._scales.pop(job.name)
        block = job.op.params["fp8_block"]
        amax = None
        for start, stop, result in self._merged_chunks(job, models)[1]:
            amax = fp8_block_amax(result, start, stop, job.shape, block, amax)
        scales = fp8_scale_inv(amax)
        with self._scales_lock:
            self._scales[job.name] = scales
        return scales

    def _copy(self, job: TensorJob, model: TensorSource, name: str, start: int, stop: int,
              writer: ShardWriter) -> None:
        same = model.info(name).dtype == job.out_dtype and _reads_files(model)
        for _, s, e in chunk_ranges(stop - start, self.chunk):
            out = self._out_buffer(writer, job, start + s, e - s)
            data = model.read_into(name, start + s, out) if same else self._raw(model, name, start + s, start + e, "copy")
            if self.check_finite:
                first = first_nonfinite(data)
                if first is not None:
                    raise MergeError(f"{_label(model)}: tensor {name!r} already holds NaN/Inf (first at flat element "
                                     f"{start + s + first}), copied unchanged to the output; repair that "
                                     "checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) to write it as is")
            if data.data_ptr() != out.data_ptr():
                data = out.copy_(data)
            writer.write(job.name, start + s, data)

    def _out_buffer(self, writer: ShardWriter, job: TensorJob, start: int, n: int,
                    pinned: bool = False) -> torch.Tensor:
        """This thread's output buffer for ``n`` elements of ``job`` from ``start``, placed in memory like the
        bytes will be on disk (see ``ShardWriter.skew``), so that the writer can use direct I/O."""
        size = job.out_dtype.itemsize
        raw = self._buffers.get("out", n * size + 2 * ALIGN, torch.uint8, torch.device("cpu"), pinned=pinned)
        first = (-raw.data_ptr()) % ALIGN + writer.skew(job.name, start)
        if first % size:  # an odd-sized tensor before this one: no placement keeps the dtype aligned
            first = 0
        return raw[first:first + n * size].view(job.out_dtype)

    def _raw(self, model: TensorSource, name: str, start: int, stop: int, slot: str,
             pinned: bool = False) -> torch.Tensor:
        """Elements [start, stop) of ``name`` as the source stores them, on the CPU: read into this thread's
        ``slot`` buffer when the source reads files, else the source's own (view or computed) tensor."""
        if not _reads_files(model):
            return model.view(name, start, stop)
        buf = self._buffers.get(slot, stop - start, model.info(name).dtype, torch.device("cpu"), pinned=pinned)
        return model.read_into(name, start, buf)

    def _write(self, job: TensorJob, start: int, result: torch.Tensor, writer: ShardWriter) -> None:
        cuda = self.device.type == "cuda"
        out = self._out_buffer(writer, job, start, result.numel(), pinned=cuda)
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
            bad = first_nonfinite(self._raw(models[key], name, start, stop, f"check{slot}"))
            if bad is not None:
                return MergeError(f"{where}: its input {_label(models[key])} tensor {name!r} already holds NaN/Inf "
                                  f"(first at flat element {start + bad}); repair that checkpoint, {fix}")
        return MergeError(f"{where}, from finite inputs: the merge overflowed {str(job.out_dtype)[6:]}; use "
                          f"smaller t/scale values or a wider --dtype, {fix}")

    def load_into(self, slot: str, model: TensorSource, name: str, start: int, stop: int, dtype: torch.dtype,
                  round_to: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, stop) of ``name`` in this thread's ``slot`` buffer on the device, as ``dtype``
        (rounded to ``round_to`` first when given)."""
        n = stop - start
        cuda = self.device.type == "cuda"
        stored = model.info(name).dtype
        direct = not cuda and stored == dtype and round_to in (None, dtype) and _reads_files(model)
        if direct:  # read straight into the compute buffer
            return model.read_into(name, start, self._buffers.get(slot, n, dtype, self.device))
        return self.to_compute(slot, self._raw(model, name, start, stop, slot + "/raw", pinned=cuda), dtype, round_to)

    def to_compute(self, slot: str, raw: torch.Tensor, dtype: torch.dtype, round_to: torch.dtype | None = None
                   ) -> torch.Tensor:
        """``raw`` (CPU) converted into this thread's ``slot`` buffer on the device."""
        if round_to is not None and raw.dtype != round_to:
            raw = raw.to(round_to)
        buf = self._buffers.get(slot, raw.numel(), dtype, self.device)
        # asynchronous from pinned memory: each chunk's result is synchronised before the next chunk is read
        buf.copy_(raw, non_blocking=self.device.type == "cuda" and raw.is_pinned())
        return buf

    @contextmanager
    def _stream(self):
        if self.device.type != "cuda":
            yield
            return
        if self._buffers.stream is None:
            self._buffers.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._buffers.stream):
            yield


def _reads_files(model: TensorSource) -> bool:
    """Whether ``model`` can read stored bytes into our buffers (checkpoints); LoRA adapters compute views."""
    return hasattr(model, "read_into")


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
    role = getattr(model, "role", "input")
    return role if " " in role else f"{role} {getattr(model, 'path', '')}".rstrip()


@contextmanager
def _single_threaded_torch():
    """One intra-op thread per worker: parallelism comes from workers, and reductions stay deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Loader:
    """Reads one tensor's input chunks into reused compute-dtype buffers.

    Kernels that need statistics first (slerp's norms, magnitude ranks) walk the tensor several times; each
    pass reads the files again, from the page cache. A single-chunk tensor stays loaded between passes.
    Keeping bigger tensors in memory between passes was measured no faster and made memory grow with tensor
    size, so it is not done.
    """

    def __init__(self, executor: Executor, job: TensorJob, models: Mapping[str, TensorSource], dtype: torch.dtype,
                 round_to: torch.dtype | None = None):
        self.executor, self.job, self.models, self.dtype = executor, job, models, dtype
        self.round_to = round_to  # inputs are rounded to this dtype first (mergekit's ``dtype``)
        self.single = job.merged_numel <= executor.chunk
        self._cached: list[torch.Tensor] | None = None

    def load(self, index: int, start: int, stop: int) -> list[torch.Tensor]:
        if self.single and self._cached is not None:
            cached, self._cached = self._cached, None
            return cached
        return [self.executor.load_into(f"in{slot}", self.models[key], self.job.source_name(key), start, stop,
                                        self.dtype, self.round_to)
                for slot, key in enumerate(self.job.op.inputs)]

    def passes(self, stored: bool = False, ranges: list[tuple[int, int, int]] | None = None
               ) -> Callable[[], Iterator[list[torch.Tensor]]]:
        """A callable that walks all chunks again (a statistics pass), or only ``ranges`` (index, start, stop).
        ``stored=True`` (CPU) may give the inputs as stored (e.g. bfloat16) instead of converted, for kernels
        that convert on their own."""
        ex, job = self.executor, self.job
        # a single chunk is better kept converted (read once) than read again
        stored = stored and ex.device.type == "cpu" and self.round_to is None and not self.single \
            and all(_reads_files(self.models[k]) for k in job.op.inputs)

        def walk():
            for index, start, stop in ranges or chunk_ranges(job.merged_numel, ex.chunk):
                if stored:
                    yield [ex._raw(self.models[k], job.source_name(k), start, stop, f"in{slot}/raw")
                           for slot, k in enumerate(job.op.inputs)]
                    continue
                xs = self.load(index, start, stop)
                if self.single:
                    self._cached = xs
                yield xs

        return walk


# -- kernels: bind the pure methods to chunked execution -----------------------------------------------------
class _Linear:
    @staticmethod
    def prepare(job, loader):
        return None

    @staticmethod
    def apply(job, xs, state, start, stop, executor):
        p = job.op.params
        if p.get("normalize_after"):
            return methods.linear_sum_then_divide(xs, p["weights"], normalize=bool(p.get("normalize")))
        return methods.linear(xs, p["weights"], normalize=bool(p.get("normalize", False)), out=xs[0], scratch=True)


class _Slerp:
    @staticmethod
    def prepare(job, loader):
        acc = None
        for a, b in loader.passes(stored=True)():  # converted straight to float64 blocks: exact for any float
            acc = methods.slerp_partial_sums(a, b, acc)
        dot, sq_a, sq_b = acc.tolist()
        return methods.slerp_coefficients(dot, sq_a, sq_b, float(job.op.params["t"]),
                                          zero_norm=job.op.params.get("zero_norm", "linear"))

    @staticmethod
    def apply(job, xs, state, start, stop, executor):
        return methods.linear(xs, [state.a, state.b], out=xs[0], scratch=True)


class _TaskArithmetic:
    """``W_base + lam * sum_i w_i * m_i * sparsify(W_i - W_base)``; inputs are (base, fine-tunes...).

    ``sparsify``: {method magnitude|random|breadcrumbs, density and gamma (a number, or one per fine-tune),
    seed, rescale (True: DARE survivors / density; "l1": each delta's L1 norm restored, as mergekit)}.
    A density >= 1 leaves a delta unchanged, <= 0 zeroes it; magnitude keeps ``max(1, int(density*n))``
    entries, exactly (ties at the threshold broken by position). ``combine: mergekit`` combines as mergekit does.
    """

    @staticmethod
    def prepare(job, loader):
        sp = job.op.params.get("sparsify")
        if not sp:
            return None
        n = job.merged_numel
        states = []
        for i in range(1, len(job.op.inputs)):
            def deltas(i=i, ranges=None):
                for xs in loader.passes(ranges=ranges)():
                    out = loader.executor._buffers.get("delta", xs[0].numel(), xs[0].dtype, xs[0].device)
                    yield torch.sub(xs[i], xs[0], out=out)
            # spread blocks propose the cuts, so that one pass only counts (a single chunk is simply histogrammed)
            sample = None if loader.single else (lambda i=i: deltas(i, sample_ranges(n, loader.executor.chunk)))
            density, gamma = _per_input(sp["density"], i - 1), _per_input(sp.get("gamma", 0.0), i - 1)
            state = {"density": density, "all": density >= 1, "none": density <= 0, "band": None, "scale": None}
            if not (state["all"] or state["none"]) and sp["method"] == "magnitude":
                state["band"] = (methods.RankCut(float("inf"), 0),
                                 methods.rank_cut(deltas, max(1, int(density * n)), sample=sample, total=n))
            elif not (state["all"] or state["none"]) and sp["method"] == "breadcrumbs":
                keep = int(density * n)
                top = min(int(gamma * n), n - keep)
                state["band"] = tuple(methods.rank_cuts(deltas, [top, top + keep], sample=sample, total=n))
            states.append(state)
        if sp.get("rescale") == "l1":
            _TaskArithmetic._l1_scales(job, loader, sp, states)
        return states

    @staticmethod
    def _l1_scales(job, loader, sp, states) -> None:
        """mergekit's rescale: ``masked * (||d||_1 / ||masked||_1)``, skipped when either norm < 1e-7."""
        before = [0.0] * len(states)
        after = [0.0] * len(states)
        ranges = chunk_ranges(job.merged_numel, loader.executor.chunk)
        for (_, start, stop), xs in zip(ranges, loader.passes()()):
            for i, state in enumerate(states):
                if state["all"] or state["none"]:
                    continue
                d = (xs[i + 1] - xs[0])
                before[i] += float(d.abs().double().sum())
                _sparsify_(job, sp, state, d, i, start, stop, loader.executor)
                after[i] += float(d.abs().double().sum())
        for i, state in enumerate(states):
            if not (state["all"] or state["none"]) and before[i] >= 1e-7 and after[i] >= 1e-7:
                dtype = loader.dtype
                state["scale"] = float(torch.tensor(before[i], dtype=dtype) / torch.tensor(after[i], dtype=dtype))

    @staticmethod
    def apply(job, xs, state, start, stop, executor):
        p = job.op.params
        sp = p.get("sparsify")
        base, fine = xs[0], xs[1:]
        deltas = [x.sub_(base) for x in fine]
        if sp:
            for i, d in enumerate(deltas):
                st = state[i]
                if st["all"]:
                    continue
                if st["none"]:
                    d.zero_()
                    continue
                _sparsify_(job, sp, st, d, i, start, stop, executor)
                if st["scale"] is not None:
                    d.mul_(st["scale"])
                elif sp["method"] == "random" and sp.get("rescale", True) is True:
                    d.div_(st["density"])
        if p.get("combine") == "mergekit":
            return methods.task_arithmetic_mergekit(base, deltas, p["weights"], consensus=p.get("sign_consensus"),
                                                    normalize=bool(p.get("normalize", False)),
                                                    lam=float(p.get("lam", 1.0)), out=base)
        return methods.task_arithmetic(base, deltas, p["weights"], sign_consensus=p.get("sign_consensus"),
                                       normalize=bool(p.get("normalize", False)), lam=float(p.get("lam", 1.0)),
                                       out=base)


def _per_input(value, index: int) -> float:
    """A sparsify setting given once for all fine-tunes or once per fine-tune."""
    return float(value[index]) if isinstance(value, (list, tuple)) else float(value)


def _sparsify_(job, sp, state, d, i, start, stop, executor) -> None:
    """Zeroes in place the entries of fine-tune ``i``'s delta chunk [start, stop) that sparsification drops."""
    if sp["method"] == "random":
        d.mul_(dare_keep(int(sp.get("seed", 0)), job.name, i, start, stop, state["density"], executor.device))
        return
    if start == 0:  # a new pass over the tensor: ties at the cut are counted again from the first element
        state["ties"], state["chunk"] = (0, 0), 0
    scratch = executor._buffers.get("trim", d.numel(), torch.int32, d.device)
    # chunks are those of the pass that found the cuts (the same chunk_ranges), so their tie counts apply
    seen = methods.trim_(d, *state["band"], ties_before=state["ties"], scratch=scratch, chunk=state["chunk"])
    state["ties"] = (state["ties"][0] + seen[0], state["ties"][1] + seen[1])
    state["chunk"] += 1


def _working_dtype(job: TensorJob, models: Mapping[str, TensorSource]) -> torch.dtype | None:
    """An operation's ``working_dtype`` (mergekit's ``dtype``; ``inputs``: the inputs' promoted dtype)."""
    name = job.op.params.get("working_dtype")
    if name is None:
        return None
    if name == "inputs":
        dtypes = [models[k].info(job.source_name(k)).dtype for k in job.op.inputs]
        working = dtypes[0]
        for d in dtypes[1:]:
            working = torch.promote_types(working, d)
        return working
    return getattr(torch, name)


_KERNELS = {"linear": _Linear, "slerp": _Slerp, "task_arithmetic": _TaskArithmetic}


@dataclass(frozen=True)
class MemoryFit:
    """How a plan runs within the memory budgets: workers, chunk size, and an estimate of the executor's
    host and GPU memory (not counting Python, torch and the page cache)."""

    threads: int
    chunk: int
    host_bytes: int
    device_bytes: int = 0


def per_worker_bytes(plan: Plan, chunk: int) -> tuple[int, int]:
    """(host, compute-device) bytes one worker's reused buffers need at most over ``plan``: per input a compute
    buffer (float32, or float64 for float64 tensors) and a stored-dtype read buffer, an output-dtype buffer,
    and for magnitude trimming the 2**16-bin histograms, the masks and the sample proposing the cuts."""
    host = device = 0
    for job in plan.jobs:
        elems = min(job.numel if job.op.kind == "copy" else job.merged_numel, chunk)
        out = elems * job.out_dtype.itemsize + 2 * 4096
        if job.op.kind == "copy":
            host = max(host, out)
            continue
        width = 8 if job.out_dtype == torch.float64 else 4
        compute = (len(job.op.inputs) + 1) * elems * width
        if job.op.params.get("fp8_block"):  # FP8 output: block maxima, then a scale per element of the chunk
            compute += 2 * (elems + 2 * job.shape[-1]) * 4
        sp = job.op.params.get("sparsify") or {}
        if sp.get("method") in ("magnitude", "breadcrumbs"):  # histograms, keys, trimming masks, sample
            compute += 2 * (1 << 16) * 8 + 4 * elems * 4
        staging = len(job.op.inputs) * elems * 4 + out
        host, device = max(host, staging), max(device, compute)
    return host, device


def fit_memory(plan: Plan, threads: int, chunk: int, memory: int, cuda: bool = False,
               gpu_memory: int = DEFAULT_GPU_MEMORY) -> MemoryFit:
    """Fewer workers, then smaller chunks, until the buffers fit ``memory`` (host) and ``gpu_memory`` (CUDA).
    Raises if even one worker with the smallest chunk does not fit."""
    threads = max(1, min(threads, len(plan.jobs) or 1))
    while True:
        host, device = per_worker_bytes(plan, chunk)
        if not cuda:
            host, device = host + device, 0
        fits = lambda n: n * host <= memory and n * device <= gpu_memory  # noqa: E731
        if fits(threads):
            break
        if fits(1):
            threads = max(n for n in range(1, threads + 1) if fits(n))
            break
        if chunk <= MIN_CHUNK:
            need, budget, where = (host, memory, "--memory") if host > memory else (device, gpu_memory, "--gpu-memory")
            least = format_size(need, up=True)
            raise MergeError(f"{where} {format_size(budget)} is too small: one worker needs {least} for this plan; "
                             f"give {where} {least} or more")
        chunk = max(MIN_CHUNK, chunk // 2)
    return MemoryFit(threads, chunk, threads * host, threads * device)


def estimate_peak_bytes(plan: Plan, threads: int, chunk_elements: int = CHUNK_ELEMENTS,
                        memory: int = DEFAULT_MEMORY) -> int:
    """An estimate (not a measurement) of the executor's own host memory for ``plan``: the workers' buffers;
    input bytes come from the page cache and are not counted."""
    return fit_memory(plan, threads, chunk_elements, memory).host_bytes
