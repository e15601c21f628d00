"""Scheduling: how many workers, which chunk size (the memory model), and in which order tensors run.

Each worker thread takes whole tensors. The memory model asks each method's kernel what buffers it needs
beyond the per-input ones, so it knows no method's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import MergeError
from .io.writer import format_size
from .methods import registry
from .methods.base import Copy
from .methods.chunks import CHUNK_ELEMENTS
from .plan import Plan, TensorJob

MIN_CHUNK = 1 << 16
DEFAULT_MEMORY = 512 * 2**20  # host memory for the workers' buffers (``--memory``)
DEFAULT_GPU_MEMORY = 4 * 2**30  # device memory for the workers' buffers (``--gpu-memory``)


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
    buffer (float32, or float64 for float64 outputs) and a stored-dtype read buffer, an output-dtype buffer,
    what the method's kernel declares (``Kernel.buffer_bytes``: e.g. magnitude pruning's histograms), and for
    FP8 output the block maxima and per-element scales."""
    host = device = 0
    for job in plan.jobs:
        copy = isinstance(job.op, Copy)
        elems = min(job.numel, chunk) if copy else \
            min(job.merged_numel, registry.chunk_elements(job.op, job.shape, job.merged_numel, chunk))
        out = elems * job.out_dtype.itemsize + 2 * 4096
        if copy:
            host = max(host, out)
            continue
        width = 8 if job.out_dtype == torch.float64 else 4
        compute = (len(job.op.inputs) + 1) * elems * width + registry.buffer_bytes(job.op, elems)
        if job.fp8_block:  # FP8 output: block maxima, then a scale per element of the chunk
            compute += 2 * (elems + 2 * job.shape[-1]) * 4
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
        def fits(n: int, host=host, device=device) -> bool:
            return n * host <= memory and n * device <= gpu_memory

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


def read_bytes_at_most(plan: Plan, models) -> int:
    """Input bytes a run reads at most: each merged tensor's inputs once per statistics pass its kernel declares
    (``Kernel.passes``) plus once to merge, every copied tensor once (a one-chunk tensor stays loaded between
    passes, so it is read once: the bound is loose there)."""
    total = 0
    for job in plan.jobs:
        keys = job.op.inputs
        stored = sum(models[k].info(job.source_name(k)).dtype.itemsize for k in keys if k in models)
        if isinstance(job.op, Copy) or registry.for_kind(job.op.kind) is None:
            total += job.numel * stored
            continue
        passes = registry.kernel_for(job.op).passes(job.op)
        tail = models[job.primary].info(job.source_name(job.primary)).dtype.itemsize
        total += job.merged_numel * stored * (1 + passes) + (job.numel - job.merged_numel) * tail
    return total


def order(jobs: list[TensorJob], threads: int) -> list[TensorJob]:
    """Largest first with several workers, so no big tensor is left to one worker at the end; else file order."""
    return sorted(jobs, key=lambda j: -j.numel) if threads > 1 else list(jobs)


def run_jobs(jobs: list[TensorJob], one: Callable[[TensorJob], None], threads: int) -> None:
    """``one(job)`` for every job, on ``threads`` workers (at most ``2 * threads`` queued); the first failure
    cancels the rest and is raised."""
    with single_threaded_torch():
        if threads == 1:
            for job in jobs:
                one(job)
            return
        window = 2 * threads
        pending: set[Future] = set()
        with ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
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


@contextmanager
def single_threaded_torch():
    """One intra-op thread per worker: parallelism comes from workers, and reductions stay deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
