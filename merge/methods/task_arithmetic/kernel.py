"""Task arithmetic's typed operation and streaming kernel: ``delta -> prune -> rescale -> elect -> combine``
per chunk, with the statistics passes pruning needs (exact magnitude bands, L1 factors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..base import KernelBase, Operation
from ..chunks import Chunk, sample_ranges
from ..della import della_granule, della_prune_chunk_
from ..selection import RankCut, rank_cut, rank_cuts
from ..sparsify import dare_keep, l1_rescale_factor, trim_
from .formulas import task_arithmetic, task_arithmetic_mergekit


@dataclass(frozen=True)
class Sparsification:
    """How each delta is pruned: ``method`` magnitude|random|breadcrumbs|della, ``density`` and ``gamma``
    (``epsilon`` for della) per fine-tune, the ``seed`` of random masks (DARE, DELLA), ``rescale`` (True: DARE
    survivors / density; "l1": each delta's L1 norm restored, as mergekit; False: none)."""

    method: str
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    seed: int = 0
    rescale: bool | str = True
    epsilon: tuple[float, ...] | None = None

    @property
    def ranked(self) -> bool:
        """Whether pruning keeps magnitude ranks (and so needs the streaming top-k)."""
        return self.method in ("magnitude", "breadcrumbs")


@dataclass(frozen=True)
class TaskArithmetic(Operation):
    """``W_base + lam * sum_i w_i * m_i * prune(W_i - W_base)``; inputs are (base, fine-tunes...).

    A density >= 1 leaves a delta unchanged, <= 0 zeroes it; magnitude keeps ``max(1, int(density*n))``
    entries, exactly (ties at the threshold broken by position). ``combine="mergekit"`` combines as mergekit
    does; ``working_dtype``: see :mod:`.precision` (task arithmetic computes in it)."""

    kind: ClassVar[str] = "task_arithmetic"
    computes_in_working_dtype: ClassVar[bool] = True
    weights: tuple[float, ...] = ()
    sparsify: Sparsification | None = None
    sign_consensus: str | None = None
    normalize: bool = False
    lam: float = 1.0
    combine: str = "ours"
    working_dtype: str | None = None

    def preserves_equal_inputs(self) -> bool:
        return True


@dataclass
class TieCursor:
    """Where a pass over a tensor stands in a magnitude cut's tie accounting: the threshold-equal entries seen
    in earlier chunks (upper cut, lower cut) and the index of the chunk expected next. Every pass walks the
    chunks of the pass that found the cuts, in order, from chunk 0 (which starts the count again)."""

    ties: tuple[int, int] = (0, 0)
    next_chunk: int = 0

    def begin(self, index: int) -> None:
        if index == 0:
            self.ties, self.next_chunk = (0, 0), 0
        elif index != self.next_chunk:
            raise RuntimeError(f"tie cursor: chunk {index} pruned after chunk {self.next_chunk - 1}; passes must "
                               "walk the chunks in order")

    def advance(self, seen: tuple[int, int]) -> None:
        self.ties = (self.ties[0] + seen[0], self.ties[1] + seen[1])
        self.next_chunk += 1


@dataclass
class DeltaPrune:
    """One fine-tune's pruning state: its density, the magnitude band (upper, lower cut) where pruning keeps
    ranks, mergekit's L1 rescale factor once known, and the tie cursor."""

    density: float
    band: tuple[RankCut, RankCut] | None = None
    scale: float | None = None
    cursor: TieCursor = field(default_factory=TieCursor)

    @property
    def keep_all(self) -> bool:
        return self.density >= 1

    @property
    def drop_all(self) -> bool:
        return self.density <= 0


def prune_(d: torch.Tensor, sp: Sparsification, state: DeltaPrune, name: str, stream: int, chunk: Chunk,
           reader, shape: tuple[int, ...] = ()) -> None:
    """Zeroes in place the entries of delta chunk ``d`` (fine-tune ``stream`` of tensor ``name``, of ``shape``)
    that pruning drops."""
    if sp.method == "random":
        d.mul_(dare_keep(int(sp.seed), name, stream, chunk.start, chunk.stop, state.density, reader.device))
        return
    if sp.method == "della":
        della_prune_chunk_(d, shape, chunk.start, state.density, sp.epsilon[stream], int(sp.seed), name, stream)
        return
    state.cursor.begin(chunk.index)
    scratch = reader.scratch("trim", d.numel(), torch.int32)
    # chunks are those of the pass that found the cuts (the same chunk_ranges), so their tie counts apply
    state.cursor.advance(trim_(d, *state.band, ties_before=state.cursor.ties, scratch=scratch, chunk=chunk.index))


def rescale_(d: torch.Tensor, sp: Sparsification, state: DeltaPrune) -> None:
    """A pruned delta rescaled: by mergekit's L1 factor when known, else DARE's ``1 / density``."""
    if state.scale is not None:
        d.mul_(state.scale)
    elif sp.method == "random" and sp.rescale is True:
        d.div_(state.density)


def combine(op: TaskArithmetic, base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Sign election and combination of the pruned, rescaled deltas into ``base`` (in place)."""
    if op.combine == "mergekit":
        return task_arithmetic_mergekit(base, deltas, op.weights, consensus=op.sign_consensus,
                                        normalize=bool(op.normalize), lam=float(op.lam), out=base)
    return task_arithmetic(base, deltas, op.weights, sign_consensus=op.sign_consensus,
                           normalize=bool(op.normalize), lam=float(op.lam), out=base)


class TaskArithmeticKernel(KernelBase):
    """Statistics passes find each delta's magnitude band (ranked pruning) and mergekit's L1 factors; then per
    chunk ``delta -> prune -> rescale -> elect -> combine``."""

    def passes(self, op):
        sp = op.sparsify
        if sp is None:
            return 0
        ranked = 3 * (len(op.inputs) - 1) if sp.ranked else 0  # sample, proving count, refinement at most
        return ranked + (sp.rescale == "l1")

    def granule(self, op, shape):
        return della_granule(shape) if op.sparsify is not None and op.sparsify.method == "della" else 1

    def buffer_bytes(self, op, elems):
        if op.sparsify is not None and op.sparsify.method == "della":  # ranks (int64 x2), probabilities, draws
            return 4 * elems * 8
        if op.sparsify is not None and op.sparsify.ranked:  # histograms, keys, trimming masks, sample
            return 2 * (1 << 16) * 8 + 4 * elems * 4
        return 0

    def prepare(self, job, reader):
        sp = job.op.sparsify
        if sp is None:
            return None
        n = job.merged_numel
        states = []
        for i in range(1, len(job.op.inputs)):
            def deltas(i=i, ranges=None):
                for xs in reader.passes(ranges=ranges)():
                    out = reader.scratch("delta", xs[0].numel(), xs[0].dtype)
                    yield torch.sub(xs[i], xs[0], out=out)
            # spread blocks propose the cuts, so that one pass only counts (a single chunk is simply histogrammed)
            sample = None if reader.single else (lambda i=i: deltas(i, sample_ranges(n, reader.chunk)))
            density, gamma = float(sp.density[i - 1]), float(sp.gamma[i - 1])
            state = DeltaPrune(density)
            if not (state.keep_all or state.drop_all) and sp.method == "magnitude":
                state.band = (RankCut(float("inf"), 0), rank_cut(deltas, max(1, int(density * n)), sample=sample,
                                                                 total=n))
            elif not (state.keep_all or state.drop_all) and sp.method == "breadcrumbs":
                keep = int(density * n)
                top = min(int(gamma * n), n - keep)
                state.band = tuple(rank_cuts(deltas, [top, top + keep], sample=sample, total=n))
            states.append(state)
        if sp.rescale == "l1":
            self._l1_scales(job, reader, sp, states)
        return states

    @staticmethod
    def _l1_scales(job, reader, sp: Sparsification, states: list[DeltaPrune]) -> None:
        """mergekit's rescale: ``pruned * (||d||_1 / ||pruned||_1)``, skipped when either norm < 1e-7."""
        before = [0.0] * len(states)
        after = [0.0] * len(states)
        for chunk, xs in zip(reader.ranges(), reader.passes()()):
            for i, state in enumerate(states):
                if state.keep_all or state.drop_all:
                    continue
                d = (xs[i + 1] - xs[0])
                before[i] += float(d.abs().double().sum())
                prune_(d, sp, state, job.name, i, chunk, reader, job.shape)
                after[i] += float(d.abs().double().sum())
        for i, state in enumerate(states):
            if not (state.keep_all or state.drop_all):
                state.scale = l1_rescale_factor(before[i], after[i], reader.dtype)

    def apply(self, job, xs, state, chunk, reader):
        op = job.op
        sp = op.sparsify
        base, fine = xs[0], xs[1:]
        deltas = [x.sub_(base) for x in fine]
        if sp is not None:
            for i, d in enumerate(deltas):
                st = state[i]
                if st.keep_all:
                    continue
                if st.drop_all:
                    d.zero_()
                    continue
                prune_(d, sp, st, job.name, i, chunk, reader, job.shape)
                rescale_(d, sp, st)
        return combine(op, base, deltas)


