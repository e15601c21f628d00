"""Spectral repair: keep only the leading singular components of each 2-D delta.

For a 2-D tensor, ``D = W_sft - W_base`` (m x n) with SVD ``D = U diag(s) V^T`` (``s`` descending):

- ``rank=r``: ``D_kept = U[:, :r] diag(s[:r]) V[:, :r]^T``, the best rank-r approximation (Eckart-Young).
  ``r >= min(m, n)`` keeps everything: ``D_kept = D`` exactly (no decomposition), so full rank **is** plain
  task arithmetic, bit for bit.
- ``threshold=True``: Donoho & Gavish (2014), optimal hard threshold for an unknown noise level:
  ``beta = min(m, n) / max(m, n)`` (<= 1), ``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``
  (the paper's approximation of ``lambda*(beta) / sqrt(mu_beta)``, where ``mu_beta`` is the median of the
  Marchenko-Pastur distribution; within 0.007 of it for 0.05 <= beta <= 1, checked numerically in the
  tests), ``tau = omega(beta) * median(s)`` (the median of
  all ``min(m, n)`` singular values, the mean of the two middle ones for an even count), and the components
  with ``s_i > tau`` are kept. This needs every singular value, so it always uses the exact SVD.
- result ``W = W_base + scale * D_kept``, computed in float32 (float64 for float64 inputs) as
  ``torch.add(W_base, D_kept, alpha=scale)`` (the rounding task arithmetic's kernel has) and rounded once
  to ``W_base``'s dtype. Tensors that are not 2-D use plain task arithmetic ``W_base + scale * D``.

Which SVD (``method="auto"``): the randomized range finder of Halko, Martinsson & Tropp (2011) through
:func:`randomized_svd` (``torch.svd_lowrank``'s algorithm, with a private generator) with ``q = r + 10``
columns and ``niter = 4`` subspace iterations when
``(r + 10) * 4 <= min(m, n)``, else the exact ``torch.linalg.svd`` (``method="exact"``/``"randomized"``
force one). Randomized cost ~ ``(2 niter + 2) m n q`` flops against ~``m n min(m, n)`` times a LAPACK
constant; its error ``|D - D_kept|`` is within a factor ``(1 + c(q, r, m, n))^(1 / (2 niter + 1))`` of the
optimal ``sigma_{r+1}`` (close to 1 at niter = 4), and its components match the exact ones to float32
rounding when ``s_r`` is well separated from ``s_{r+1}`` (measured in tests/test_methods_new.py). Its random
test matrix comes from a private ``torch.Generator`` seeded with ``seed`` (default 0), so results are
deterministic, also with several workers decomposing side by side, and the global RNG is untouched.

Streaming: the SVD is global, so the kernel's granule is the whole 2-D tensor (inherent: every entry of
``D_kept`` depends on every entry of ``D``); tensors run one at a time per worker, and the memory model counts
the decomposition's workspace (:meth:`SpectralKernel.buffer_bytes`). The SVD runs on the device the tensor
is on: ``torch.linalg.svd`` on CUDA (``svd="auto"`` there always takes the exact SVD, fast on the device);
on the CPU ``auto`` picks as above. The decomposition runs with one intra-op thread in every worker (the
kernel sets it: MKL/LAPACK results depend on their thread count), so the bytes do not depend on ``threads``.

Registered as method ``spectral`` of our recipe format (``merge task-arithmetic --sparsify svd --rank r`` /
``--sparsify svd-threshold``): one SFT, ``scale`` per tensor as in task arithmetic (``scale = 1 - t`` matches
linear interpolation at ``t``). mergekit has no equivalent method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..errors import InputError
from ..params import Int, ScaledDelta, Value
from .base import KernelBase, MethodSpec, Operation, Planned

OVERSAMPLE = 10
POWER_ITERATIONS = 4
RANDOMIZED_FRACTION = 4  # randomized when (r + OVERSAMPLE) * RANDOMIZED_FRACTION <= min(m, n)
DG_COEFFICIENTS = (0.56, -0.95, 1.82, 1.43)  # omega(beta) = 0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43


@dataclass(frozen=True)
class SpectralInfo:
    """What one tensor's repair kept: ``rank`` components of ``full_rank``, by ``method``; ``tau`` is the
    threshold (None in rank mode)."""

    rank: int
    full_rank: int
    method: str
    tau: float | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def donoho_gavish_omega(beta: float) -> float:
    """``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` for ``0 < beta <= 1``."""
    if not 0 < beta <= 1:
        raise ValueError(f"donoho_gavish_omega: beta must lie in (0, 1], got {beta}")
    c3, c2, c1, c0 = DG_COEFFICIENTS
    return c3 * beta ** 3 + c2 * beta ** 2 + c1 * beta + c0


def median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor (mean of the two middle values for an even count)."""
    ordered = torch.sort(values.reshape(-1).to(torch.float64)).values
    n = ordered.numel()
    return float(ordered[n // 2]) if n % 2 else float((ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def optimal_hard_threshold(singular_values: torch.Tensor, shape: tuple[int, int]) -> float:
    """Donoho-Gavish ``tau = omega(min(m, n) / max(m, n)) * median(s)``, ``s`` all singular values."""
    m, n = shape
    return donoho_gavish_omega(min(m, n) / max(m, n)) * median(singular_values)


def choose_svd(rank: int, shape: tuple[int, int]) -> str:
    """``"randomized"`` when ``(rank + 10) * 4 <= min(m, n)``, else ``"exact"``."""
    return "randomized" if (rank + OVERSAMPLE) * RANDOMIZED_FRACTION <= min(shape) else "exact"


def truncated_svd(matrix: torch.Tensor, rank: int, method: str = "auto", seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(U_r [m, r], s_r [r], Vh_r [r, n], method)``: the top ``r = min(rank, min(m, n))`` components of a
    2-D ``matrix`` (computed in :func:`compute_dtype`), by the exact or the randomized SVD (module docstring)."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd: needs a 2-D tensor, got shape {tuple(matrix.shape)}")
    a = matrix.to(compute_dtype(matrix.dtype))
    r = min(rank, min(a.shape))
    method = choose_svd(r, tuple(a.shape)) if method == "auto" else method
    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r], s[:r], vh[:r], method
    if method != "randomized":
        raise ValueError(f"truncated_svd: method must be auto, exact or randomized, got {method!r}")
    u, s, vh = randomized_svd(a, min(r + OVERSAMPLE, min(a.shape)), POWER_ITERATIONS, seed)
    return u[:, :r], s[:r], vh[:r], method


def randomized_svd(a: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp with ``niter`` subspace iterations (the algorithm of ``torch.svd_lowrank``):
    ``Q = qr(A G)``, ``G`` [n, q] standard normal from a private generator seeded with ``seed`` (so workers
    running side by side never share a random stream); ``niter`` times ``Q = qr(A qr(A^T Q))``; then the exact
    SVD of the small ``B = Q^T A = U_b diag(s) Vh`` gives ``(Q U_b, s, Vh)``."""
    gen = torch.Generator(device=a.device).manual_seed(seed)
    g = torch.randn(a.shape[1], q, generator=gen, dtype=a.dtype, device=a.device)
    basis = torch.linalg.qr(a @ g).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ u, s, vh


def low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``U diag(s) Vh``."""
    return (u * s) @ vh


def spectral_delta(delta: torch.Tensor, rank: int | None = None, threshold: bool = False, method: str = "auto",
                   seed: int = 0) -> tuple[torch.Tensor, SpectralInfo]:
    """``D_kept`` (compute dtype) of a 2-D delta by ``rank`` or by the Donoho-Gavish ``threshold``
    (exactly one of them), with what was kept."""
    if (rank is None) == (not threshold):
        raise ValueError("spectral_delta: give either rank or threshold=True")
    if delta.dim() != 2:
        raise ValueError(f"spectral_delta: needs a 2-D tensor, got shape {tuple(delta.shape)}")
    d = delta.to(compute_dtype(delta.dtype))
    full = min(d.shape)
    if threshold:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        tau = optimal_hard_threshold(s, tuple(d.shape))
        k = int((s > tau).sum())
        return low_rank(u[:, :k], s[:k], vh[:k]), SpectralInfo(k, full, "exact", tau)
    if rank < 1:
        raise ValueError(f"spectral_delta: rank must be at least 1, got {rank}")
    if rank >= full:
        return d, SpectralInfo(full, full, "identity")
    u, s, vh, used = truncated_svd(d, rank, method, seed)
    return low_rank(u, s, vh), SpectralInfo(rank, full, used)


def spectral_repair(base: torch.Tensor, sft: torch.Tensor, scale: float = 1.0, rank: int | None = None,
                    threshold: bool = False, method: str = "auto", seed: int = 0
                    ) -> tuple[torch.Tensor, SpectralInfo | None]:
    """``W = W_base + scale * D_kept`` in ``base``'s dtype (``D_kept = D`` for tensors that are not 2-D, info
    None then)."""
    work = compute_dtype(base.dtype)
    b = base.to(work)
    delta = sft.to(work) - b
    if delta.dim() != 2:
        return torch.add(b, delta, alpha=scale).to(base.dtype), None
    kept, info = spectral_delta(delta, rank, threshold, method, seed)
    return torch.add(b, kept, alpha=scale).to(base.dtype), info


def svd_for(requested: str, device: torch.device) -> str:
    """The SVD a kernel runs: ``auto`` on CUDA is the exact ``torch.linalg.svd`` on the device; elsewhere the
    request stands (``auto`` then picks by :func:`choose_svd`)."""
    return "exact" if requested == "auto" and device.type == "cuda" else requested


# -- the method: operation, kernel, recipe bindings ----------------------------------------------------------
@dataclass(frozen=True)
class Spectral(Operation):
    """``W_base + scale * D_kept`` with ``D = W_sft - W_base``; inputs are (base, sft). ``rank``: the top
    ``rank`` singular components of a 2-D ``D``; ``rank=None``: those above the Donoho-Gavish threshold.
    Tensors that are not 2-D: ``W_base + scale * D``. ``svd``: auto|exact|randomized (rank mode)."""

    kind: ClassVar[str] = "spectral"
    scale: float = 1.0
    rank: int | None = None
    svd: str = "auto"
    seed: int = 0

    def preserves_equal_inputs(self) -> bool:
        return True


EXACT_WORKSPACE = 9  # float32 copies of D: LAPACK's copy, U, Vh, gesdd work (<= 4k^2), U*s, the product


class SpectralKernel(KernelBase):
    """No statistics pass: a 2-D tensor is one chunk (granule = the whole tensor), decomposed in ``apply``;
    other tensors stream elementwise as task arithmetic. Reports each 2-D tensor's :class:`SpectralInfo`."""

    statistic = "spectral"

    def granule(self, op, shape):
        return math.prod(shape) if len(shape) == 2 else 1

    def buffer_bytes(self, op, elems):
        """The SVD's workspace beyond the input buffers, counted for the exact SVD (the randomized one needs
        less): ``9 * elems`` float32 values (see ``EXACT_WORKSPACE``; ``elems`` is the whole tensor for 2-D
        ones). A bound, not a measurement; float64 checkpoints need twice that."""
        return EXACT_WORKSPACE * elems * 4

    def prepare(self, job, reader):
        return {}

    def apply(self, job, xs, state, chunk, reader):
        op = job.op
        base, delta = xs[0], xs[1].sub_(xs[0])
        if len(job.shape) != 2:
            return base.add_(delta, alpha=op.scale)
        rows = (chunk.stop - chunk.start) // job.shape[-1]  # the merged rows (an SFT's added rows are copied)
        if reader.device.type == "cpu" and torch.get_num_threads() != 1:
            # LAPACK's bits depend on its thread count; a worker thread starts with OpenMP's default count (the
            # executor's one-thread setting holds for the thread that set it), so each worker sets its own
            torch.set_num_threads(1)
        kept, info = spectral_delta(delta.view(rows, job.shape[-1]), op.rank, op.rank is None,
                                    svd_for(op.svd, reader.device), op.seed)
        state["info"] = info
        return base.add_(kept.reshape(-1), alpha=op.scale)

    def report(self, state):
        return state.get("info")


class SpectralParams(ScaledDelta):
    """Our recipe's parameters of spectral repair: the scale of the kept delta, and what is kept: the top
    ``rank`` components, or (``threshold: donoho_gavish``) those above the optimal hard threshold."""

    scale: Value | None = Field(None, description="spectral: scale of the kept delta (1 - t matches linear at t)")
    rank: Int | None = Field(None, ge=1, description="spectral: singular components kept per 2-D delta")
    threshold: Literal["donoho_gavish"] | None = Field(
        None, description="spectral: keep the components above the Donoho-Gavish optimal hard threshold")
    svd: Literal["auto", "exact", "randomized"] = Field(
        "auto", description="spectral, rank mode: the SVD (auto: randomized when the rank is small, CPU)")


def _check_recipe(recipe) -> None:
    if len(recipe.sft) != 1:
        raise ValueError(f"sft: spectral repairs one SFT's delta, got {len(recipe.sft)} SFT models; use "
                         "task_arithmetic to add several")
    if recipe.scale is None and recipe.sft[0].scale is None and recipe.schedule is None:
        raise ValueError("scale: give a scale for spectral (1 - t matches linear interpolation at t)")
    if (recipe.rank is None) == (recipe.threshold is None):
        raise ValueError("rank: spectral keeps either the top `rank` components or those above `threshold: "
                         "donoho_gavish`; give exactly one of them")
    if recipe.threshold is not None and "svd" in recipe.model_fields_set:
        raise ValueError("svd: the threshold needs every singular value, so it always takes the exact SVD; "
                         "remove svd (it is for rank)")


def _plan(recipe, values, name: str) -> Planned:
    (scale,) = values.delta_weights(name)
    op = Spectral(("base", "sft0"), scale=scale, rank=recipe.rank, svd=recipe.svd)
    return Planned(op, f"{scale:g}")


def _legend(recipe) -> str:
    kept = f"the top {recipe.rank} singular components" if recipe.rank is not None else \
        "the components above the Donoho-Gavish threshold"
    return f"scale of the SFT's delta (2-D tensors: {kept} of it)"


def _settings(ops: list[Spectral], who) -> list[str]:
    """Scale, what is kept and which SVD, in words (summary and card)."""
    scales = sorted({op.scale for op in ops})
    spread = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g}..{scales[-1]:g} across tensors"
    op = ops[0]
    if op.rank is None:
        kept = ("keep: per 2-D delta the singular components above the Donoho-Gavish optimal hard threshold "
                "tau = omega(beta) * median(s), beta = min(m, n)/max(m, n), omega(beta) = 0.56 beta^3 - "
                "0.95 beta^2 + 1.82 beta + 1.43 (exact SVD)")
    else:
        how = {"auto": f"randomized SVD (q = r + {OVERSAMPLE}, {POWER_ITERATIONS} power iterations, seed {op.seed})"
                       f" on the CPU when (r + {OVERSAMPLE}) * {RANDOMIZED_FRACTION} <= min(m, n), else exact",
               "exact": "exact SVD", "randomized": f"randomized SVD (q = r + {OVERSAMPLE}, {POWER_ITERATIONS} "
                                                   f"power iterations, seed {op.seed})"}[op.svd]
        kept = (f"keep: per 2-D delta its top {op.rank} singular components (the whole delta where that is "
                f"its full rank), by {how}")
    return [f"scale: {spread} ({who(op.inputs[1])})", kept, "tensors that are not 2-D: the whole delta"]


def _report(summary) -> list[str]:
    if summary.dry_run:
        return ["spectral: each 2-D delta is decomposed while merging (the merge reports the ranks kept)"]
    infos = list(getattr(summary, "reports", {}).get("spectral", {}).values())
    if not infos:
        return []
    kept = sorted(i.rank for i in infos)
    share = sum(i.rank for i in infos) / max(1, sum(i.full_rank for i in infos))
    methods = ", ".join(f"{sum(i.method == m for i in infos)} {m}" for m in ("exact", "randomized", "identity")
                        if any(i.method == m for i in infos))
    lines = [f"spectral: {len(infos)} 2-D deltas, rank kept {kept[0]}..{kept[-1]} (median {kept[len(kept) // 2]}, "
             f"{100 * share:.1f}% of the full ranks); SVD: {methods}"]
    if kept[-1] == 0:
        lines.append("spectral: no singular value of any 2-D delta is above the threshold (the deltas look like "
                     "noise): every 2-D tensor is the base's")
    return lines


SPARSIFY = ("svd", "svd-threshold")  # task arithmetic's --sparsify values that mean spectral repair


def spectral_fields(sfts: list[str], params: dict) -> dict:
    """The recipe fields of ``merge task-arithmetic --sparsify svd --rank R | svd-threshold`` (one SFT, one
    scale, no entrywise options): method ``spectral``. Options without effect are refused in one line."""
    sparsify, scale, rank, svd = params["sparsify"], params.get("scale"), params.get("rank"), params.get("svd")
    if len(sfts) != 1:
        raise InputError(f"--sparsify {sparsify}: spectral repair takes one --sft (got {len(sfts)}); merge several "
                         "SFTs with --sparsify magnitude|random|breadcrumbs or none")
    if isinstance(scale, (list, tuple)) and len(scale) != 1:
        raise InputError(f"--scale: spectral repair takes one --sft, so one --scale (got {len(scale)})")
    for name in ("density", "gamma", "seed", "epsilon", "sign_consensus"):
        if params.get(name) not in (None, False):
            raise InputError(f"--{name.replace('_', '-')}: has no effect with --sparsify {sparsify} (it keeps "
                             "singular components, not entries); drop it")
    if sparsify == "svd" and rank is None:
        raise InputError("--sparsify svd needs --rank (the singular components kept per 2-D delta, >= 1); or use "
                         "--sparsify svd-threshold to let the Donoho-Gavish threshold choose")
    if sparsify == "svd-threshold":
        for name, v in (("--rank", rank), ("--svd", svd)):
            if v is not None:
                raise InputError(f"{name}: --sparsify svd-threshold chooses the rank itself from every singular "
                                 "value (exact SVD); drop it, or use --sparsify svd --rank R")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"--rank: must be a whole number >= 1, got {rank!r}")
    return {"method": "spectral", "sft": [sfts[0]], "rank": rank, "svd": svd,
            "scale": scale[0] if isinstance(scale, (list, tuple)) else scale,
            "threshold": "donoho_gavish" if sparsify == "svd-threshold" else None}


SPEC = MethodSpec(
    name="spectral",
    operation=Spectral,
    kernel=SpectralKernel(),
    params=SpectralParams,
    settings=_settings,
    check_recipe=_check_recipe,
    plan=_plan,
    legend=_legend,
    describe=lambda t: ("Spectral repair `W = W_base + s * D_kept`, `D = W_sft - W_base`: per 2-D tensor `D_kept` "
                        "keeps the leading singular components of `D` (`U_k diag(s_k) V_k^T`); other tensors take "
                        "the whole delta."),
    report=_report,
    lora_note="spectral repair decomposes the materialised delta s*B@A of each targeted tensor (rank <= r)",
    python_params=("scale", "rank", "svd", "threshold"),
)
