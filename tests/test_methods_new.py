"""The math of the methods added for mergekit parity (della, sce, model_stock, nuslerp, multislerp, karcher,
nearswap, arcee_fusion, ram, passthrough), spectral repair and LoRA extraction.

mergekit 0.1.5's own kernels are the oracle for the mergekit methods: called in-process through
``mergekit.merge_methods.merge_tensors`` on random tensors (inputs already in one dtype, so mergekit computes
in that dtype, as with checkpoints of that dtype). Agreement is bit for bit unless a test says otherwise.
"""

import math

import numpy as np
import pytest
import torch

from merge.methods import arcee_fusion as fusion
from merge.methods import (
    della,
    extract_lora,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    reference,
    sce,
    spectral,
)

mergekit_methods = pytest.importorskip("mergekit.merge_methods")

DTYPES = [torch.float32, torch.bfloat16]


def mk(method, tensors, base_index=None, **parameters):
    """mergekit's result for one output tensor (``tensors`` in input order; the base at ``base_index``)."""
    return mergekit_methods.merge_tensors(tensors, method, base_index=base_index, parameters=parameters)


def fine_tunes(shape, n, dtype=torch.float32, seed=0, spread=0.05):
    """A base and ``n`` models near it (deltas ~ spread), all in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + spread * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def same(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs), f"max abs diff {(ours.double() - theirs.double()).abs().max().item()}"


# ---------------------------------------------------------------- della / della_linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 40), (50,)])
@pytest.mark.parametrize("linear", [False, True])
def test_della_bit_exact_with_mergekit_under_the_same_seed(dtype, shape, linear):
    base, models = fine_tunes(shape, 2, dtype)
    params = dict(weight=[1.0, 0.6], density=[0.5, 0.35], epsilon=[0.1, 0.2], **{"lambda": 1.3})
    torch.manual_seed(7)
    theirs = mk("della_linear" if linear else "della", [base, *models], 0, **params)
    torch.manual_seed(7)
    consensus, normalize = (None, False) if linear else ("sum", True)
    ours = reference.della_merge(base, models, [1.0, 0.6], [0.5, 0.35], [0.1, 0.2], consensus=consensus,
                             normalize=normalize, lam=1.3)
    same(ours, theirs)


def test_della_without_rescale_and_at_full_density():
    base, models = fine_tunes((16, 30), 2)
    torch.manual_seed(3)
    theirs = mk("della", [base, *models], 0, weight=[0.5, 0.5], density=[0.4, 1.0], rescale=False)
    torch.manual_seed(3)
    same(reference.della_merge(base, models, [0.5, 0.5], [0.4, 1.0], rescale=False), theirs)


def test_della_keep_probabilities_rise_linearly_with_rank_per_row():
    delta = torch.randn(8, 101, generator=torch.Generator().manual_seed(1))
    p = della.della_keep_probabilities(delta, 0.5, 0.2)
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1).float()  # 0 = smallest in its row
    assert torch.allclose(p, 0.3 + 0.4 * ranks / 100, atol=1e-6)
    assert p.dtype == torch.float32 and p.shape == delta.shape


def test_della_mask_keep_rates_follow_magnitude_rank():
    # rows of distinct magnitudes: each column of `delta` holds rank c in every row
    rows, cols = 400, 50
    delta = torch.arange(1, cols + 1, dtype=torch.float32).repeat(rows, 1)
    probs = della.della_keep_probabilities(delta, 0.5, 0.15)
    mask = della.della_mask(probs, torch.Generator().manual_seed(0))
    rate = mask.mean(dim=0)  # keep rate per rank
    expected = 0.35 + 0.3 * torch.arange(cols) / (cols - 1)
    sd = torch.sqrt(expected * (1 - expected) / rows)
    assert ((rate - expected).abs() < 4.5 * sd).all()
    assert abs(float(mask.mean()) - 0.5) < 0.02  # overall density
    slope = np.polyfit(np.arange(cols), rate.numpy(), 1)[0]
    assert abs(slope * (cols - 1) - 0.3) < 0.06


def test_della_prune_rescales_l1_and_is_seeded():
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    one = della.della_prune(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(5))
    two = della.della_prune(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(5))
    other = della.della_prune(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(one, two) and not torch.equal(one, other)
    kept = one != 0
    scale = delta.abs().sum() / delta[kept].abs().sum()
    assert torch.allclose(one[kept], delta[kept] * scale, rtol=1e-6)
    assert torch.isclose(one.abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_della_rows_of_one_entry_keep_with_probability_density():
    # mergekit divides 0 by 0 here and fails inside bernoulli; we use the middle probability
    delta = torch.randn(6, 1)
    assert torch.equal(della.della_keep_probabilities(delta, 0.4, 0.1), torch.full((6, 1), 0.4))
    with pytest.raises(RuntimeError):
        mk("della", [torch.zeros(6, 1), delta], 0, weight=1.0, density=0.4, epsilon=0.1)


@pytest.mark.parametrize("density,epsilon", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)])
def test_della_rejects_density_epsilon_outside_unit_interval(density, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        della.della_prune(torch.randn(4, 4), density, epsilon)


# ---------------------------------------------------------------- sce

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.0])
@pytest.mark.parametrize("n", [2, 3])
def test_sce_bit_exact(dtype, select_topk, n):
    base, models = fine_tunes((20, 36), n, dtype, seed=n)
    same(sce.sce_merge(base, models, select_topk), mk("sce", [base, *models], 0, select_topk=select_topk))


def test_sce_mask_keeps_the_highest_variance_entries():
    deltas = torch.randn(3, 10, 10, generator=torch.Generator().manual_seed(4))
    mask = sce.sce_variance_mask(deltas, 0.3)
    var = deltas.var(dim=0, unbiased=False)
    assert int(mask.sum()) == 30
    assert var[mask.bool()].min() > var[~mask.bool()].max()


def test_sce_mask_streams_with_an_exact_rank_cut():
    from merge.methods.reference import top_k_mask
    from merge.methods.selection import rank_cut
    base, models = fine_tunes((40, 30), 3, seed=23)
    deltas = torch.stack([m - base for m in models])
    chunks = [deltas[:, i:i + 8] for i in range(0, 40, 8)]
    variances = [sce.sce_variance(c) for c in chunks]
    k = sce.sce_select_count(sum(int(torch.count_nonzero(v)) for v in variances), 0.3)
    cut = rank_cut(lambda: iter(variances), k)
    streamed, ties = [], 0
    for v in variances:
        mask, here = top_k_mask(v, cut, ties)
        streamed.append(mask)
        ties += here
    assert torch.equal(torch.cat(streamed).to(deltas.dtype), sce.sce_variance_mask(deltas, 0.3))


# ---------------------------------------------------------------- model_stock

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(12, 30), (40,)])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_bit_exact(dtype, filter_wise, shape, n):
    base, models = fine_tunes(shape, n, dtype, seed=10 + n)
    models = [m + 0.03 * (models[0] - base) for m in models]  # correlated deltas: 0 < cos < 1
    same(model_stock.model_stock(base, models, filter_wise), mk("model_stock", [base, *models], 0,
                                                                   filter_wise=filter_wise))


def test_model_stock_ratio_formula_and_streaming_sums():
    base, models = fine_tunes((30, 20), 3, seed=3)
    norms, dots = model_stock.model_stock_statistics(base, models)
    d = [(m - base).reshape(-1).double() for m in models]
    cos = np.mean([float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i, j in [(0, 1), (0, 2), (1, 2)]])
    t = float(model_stock.model_stock_ratio(norms, dots))
    assert t == pytest.approx(3 * cos / (1 + 2 * cos), rel=1e-5)
    halves = [model_stock.model_stock_sums(base[:15], [m[:15] for m in models]),
              model_stock.model_stock_sums(base[15:], [m[15:] for m in models])]
    streamed = model_stock.model_stock_ratio(*model_stock.gram_statistics(halves[0] + halves[1]))
    assert float(streamed) == pytest.approx(t, rel=1e-6)


def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    base = torch.zeros(6)
    d = torch.randn(6)
    out = model_stock.model_stock(base, [base + d, base - d])  # cos = -1: 1 + (N-1) cos = 0
    same(out, mk("model_stock", [base, base + d, base - d], 0))
    assert torch.equal(out, base)


# ---------------------------------------------------------------- nuslerp

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (True, True), (False, False), (False, True)])
def test_nuslerp_bit_exact(dtype, with_base, flatten, row_wise):
    base, (a, b) = fine_tunes((14, 22), 2, dtype, seed=5, spread=0.5)
    params = dict(weight=[0.7, 0.4], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    theirs = mk("nuslerp", [base, a, b], 0, **params) if with_base else mk("nuslerp", [a, b], **params)
    ours = nuslerp.nuslerp_merge(a, b, (0.7, 0.4), base if with_base else None, row_wise, flatten)
    same(ours, theirs)


def test_nuslerp_colinear_falls_back_to_lerp_and_zero_weights_give_half():
    a = torch.randn(5, 7)
    same(nuslerp.nuslerp_merge(a, 2 * a, (1.0, 1.0)), mk("nuslerp", [a, 2 * a], weight=[1.0, 1.0]))
    assert torch.allclose(nuslerp.nuslerp(a, 2 * a, 0.5), 1.5 * a)
    assert nuslerp.nuslerp_t(0.0, 0.0) == 0.5 and nuslerp.nuslerp_t(1.0, 3.0) == 0.75


@pytest.mark.parametrize("dtype,noise", [(torch.float32, 1e-3), (torch.float32, 1e-5), (torch.float64, 1e-5)])
def test_nuslerp_nearly_colinear_rows_bit_exact(dtype, noise):
    # float64 resolves 1 - cos^2 ~ 1e-10, between the colinear cut (1e-16) and float32's resolution
    a = torch.randn(6, 50, generator=torch.Generator().manual_seed(20), dtype=dtype)
    b = 2 * a + noise * torch.randn(6, 50, generator=torch.Generator().manual_seed(21), dtype=dtype)
    same(nuslerp.nuslerp_merge(a, b, (0.6, 0.4), flatten=False),
         mk("nuslerp", [a, b], weight=[0.6, 0.4], nuslerp_flatten=False))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_chunked_statistics_match_the_whole_tensor_result(flatten, row_wise):
    _, (a, b) = fine_tunes((20, 12), 2, seed=22, spread=0.5)
    t = nuslerp.nuslerp_t(0.3, 0.5)
    whole = nuslerp.nuslerp(a, b, t, row_wise, flatten)
    chunks = [(a[i:i + 5], b[i:i + 5]) for i in range(0, 20, 5)]
    if flatten:
        sums = sum(nuslerp.nuslerp_partial_sums(x.reshape(-1), y.reshape(-1)) for x, y in chunks)
        ca, cb = nuslerp.nuslerp_coefficients(sums, t)
        streamed = float(ca) * a + float(cb) * b
    elif row_wise:  # per column: statistics summed over row chunks, then applied per column
        sums = sum(nuslerp.nuslerp_partial_sums(x.T, y.T) for x, y in chunks)
        ca, cb = nuslerp.nuslerp_coefficients(sums, t)
        streamed = ca.float() * a + cb.float() * b
    else:  # per row: each chunk of whole rows on its own
        parts = []
        for x, y in chunks:
            ca, cb = nuslerp.nuslerp_coefficients(nuslerp.nuslerp_partial_sums(x, y), t)
            parts.append(ca.float().unsqueeze(-1) * x + cb.float().unsqueeze(-1) * y)
        streamed = torch.cat(parts)
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_nuslerp_row_wise_interpolates_each_column():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    out = nuslerp.nuslerp(a, b, 0.3, row_wise=True, flatten=False)
    for j in range(4):
        x, y = a[:, j], b[:, j]
        theta = torch.arccos(torch.dot(x, y) / (x.norm() * y.norm()))
        ref = (torch.sin(0.7 * theta) * x + torch.sin(0.3 * theta) * y) / torch.sin(theta)
        assert torch.allclose(out[:, j], ref)


# ---------------------------------------------------------------- multislerp

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_bit_exact(dtype, with_base, normalize):
    base, models = fine_tunes((10, 18), 3, dtype, seed=6, spread=0.4)
    weights = [0.5, 0.3, 0.4]
    if with_base:
        theirs = mk("multislerp", [base, *models], 0, weight=weights, normalize_weights=normalize)
    else:
        theirs = mk("multislerp", models, weight=weights, normalize_weights=normalize)
    ours = multislerp.multislerp(models, weights, base if with_base else None, normalize)
    same(ours, theirs)


def test_multislerp_gram_coefficients_match_the_whole_tensor_result():
    base, models = fine_tunes((40, 25), 3, seed=8, spread=0.4)
    weights = [0.2, 0.5, 0.3]
    whole = multislerp.multislerp(models, weights, base)
    gram = sum(multislerp.multislerp_gram([m[i:i + 10] for m in models], base[i:i + 10]) for i in range(0, 40, 10))
    coeffs = multislerp.multislerp_coefficients(gram, weights)
    streamed = base + sum(c * (m - base) for c, m in zip(coeffs, models))
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_multislerp_antipodal_pair_falls_back_and_three_raise():
    a = torch.randn(8)
    same(multislerp.multislerp([a, -a], [1.0, 1.0]), mk("multislerp", [a, -a], weight=[1.0, 1.0]))
    with pytest.raises(ValueError):
        multislerp.multislerp([a, -a, a * 0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        mk("multislerp", [a, -a, a * 0], weight=[1.0, 1.0, 1.0])


# ---------------------------------------------------------------- karcher

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3])
def test_karcher_bit_exact(dtype, n):
    _, models = fine_tunes((16, 20), n, dtype, seed=9, spread=0.8)
    same(karcher.karcher_mean(models), mk("karcher", models))
    same(karcher.karcher_mean(models, max_iter=2, tol=1e-3), mk("karcher", models, max_iter=2, tol=1e-3))


def test_karcher_gram_coefficients_match_the_whole_tensor_iteration():
    _, models = fine_tunes((30, 30), 3, seed=11, spread=1.0)
    whole = karcher.karcher_mean(models)
    coeffs = karcher.karcher_coefficients(karcher.karcher_gram(models))
    streamed = sum(c * m for c, m in zip(coeffs, models))
    assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_karcher_of_two_is_the_normalized_midpoint_direction():
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    out = karcher.karcher_mean([a, b])
    ua, ub = a / a.norm(), b / b.norm()
    mid = (ua + ub) / (ua + ub).norm()  # geodesic midpoint of two points
    assert torch.allclose(out, (a.norm() + b.norm()) / 2 * mid, atol=1e-6)


# ---------------------------------------------------------------- nearswap, passthrough

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.02, 0.3, 5.0])
def test_nearswap_bit_exact(dtype, t):
    base, (other,) = fine_tunes((12, 12), 1, dtype, seed=12, spread=0.1)
    other = other.clone()
    other[0, :3] = base[0, :3]  # identical entries hit the 1e-6 clamp
    same(nearswap.nearswap(base, other, t), mk("nearswap", [base, other], 0, t=t))


def test_nearswap_moves_by_at_most_t():
    base, other = torch.zeros(4), torch.tensor([0.05, -0.2, 1.0, 0.0])
    assert torch.allclose(nearswap.nearswap(base, other, 0.1), torch.tensor([0.05, -0.1, 0.1, 0.0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.0, 0.37])
def test_passthrough_bit_exact(dtype, scale):
    x = torch.randn(7, 9).to(dtype)
    same(passthrough.passthrough(x, scale), mk("passthrough", [x], scale=[scale]))


# ---------------------------------------------------------------- arcee_fusion

@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_bit_exact(dtype):
    base, (other,) = fine_tunes((30, 40), 1, dtype, seed=13, spread=0.2)
    same(fusion.arcee_fusion(base, other), mk("arcee_fusion", [base, other], 0))


def test_arcee_fusion_sampled_quantiles_match_mergekit_under_the_same_seed():
    base, (other,) = fine_tunes((1001, 1000), 1, seed=14, spread=0.2)  # > 1e6 entries: sampled quantiles
    torch.manual_seed(21)
    theirs = mk("arcee_fusion", [base, other], 0)
    torch.manual_seed(21)
    same(fusion.arcee_fusion(base, other), theirs)
    exact = fusion.arcee_fusion(base, other, sample_size=None)
    assert (exact != theirs).float().mean() < 0.01  # exact quantiles move the threshold only slightly


def test_arcee_fusion_threshold_is_an_upper_outlier_fence():
    importance = torch.arange(101, dtype=torch.float32).reshape(1, -1)
    q1, q2, q3 = fusion.order_statistics(importance)
    assert (float(q1), float(q2), float(q3)) == (25.0, 50.0, 75.0)
    assert float(fusion.fusion_threshold(q1, q2, q3)) == 125.0


# ---------------------------------------------------------------- ram / ramplus_tl

def sparse_fine_tunes(dtype, n=3, seed=15):
    """Deltas with exact zeros, so entries changed by none, one or several models all occur."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(20, 24, generator=g)
    models = [base + torch.randn(20, 24, generator=g) * (torch.rand(20, 24, generator=g) < 0.4) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
def test_ram_bit_exact(dtype, epsilon):
    base, models = sparse_fine_tunes(dtype)
    same(ram.ram(base, models, epsilon), mk("ram", [base, *models], 0, epsilon=epsilon))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 2.0)])
def test_ramplus_tl_bit_exact(dtype, r, alpha):
    base, models = sparse_fine_tunes(dtype, seed=16)
    same(ram.ramplus_tl(base, models, r, alpha), mk("ramplus_tl", [base, *models], 0, r=r, alpha=alpha))


def test_ram_rules_on_a_small_example():
    base = torch.zeros(4)
    a = torch.tensor([0.0, 1.0, 2.0, 0.0])
    b = torch.tensor([0.0, 0.0, 4.0, 3.0])
    assert torch.equal(ram.ram(base, [a, b]), torch.tensor([0.0, 1.0, 3.0, 3.0]))


# ---------------------------------------------------------------- spectral repair

def known_spectrum(m, n, signal, noise, seed=0):
    """``U diag(signal) V^T + noise * N(0, 1/n)``, with orthonormal ``U``, ``V`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(signal), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(signal), generator=g, dtype=torch.float64))
    x = (u * torch.tensor(signal, dtype=torch.float64)) @ v.T
    return x + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)


def test_spectral_full_rank_is_task_arithmetic():
    base, (sft,) = fine_tunes((24, 16), 1, torch.bfloat16, seed=17)
    expected = torch.add(base.float(), sft.float() - base.float(), alpha=0.8).to(torch.bfloat16)
    out, info = spectral.spectral_repair(base, sft, 0.8, rank=16)
    same(out, expected)
    assert info.rank == 16 and info.method == "identity"
    d = (sft.float() - base.float())
    u, s, vh, _ = spectral.truncated_svd(d, 16, "exact")
    assert torch.allclose(spectral.low_rank(u, s, vh), d, atol=1e-6)  # the SVD at full rank is D too


def test_spectral_rank_r_is_the_best_rank_r_approximation():
    base, (sft,) = fine_tunes((30, 20), 1, seed=18)
    out, info = spectral.spectral_repair(base, sft, 1.0, rank=5, method="exact")
    d = (sft - base).double().numpy()
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    ref = base.double().numpy() + (u[:, :5] * s[:5]) @ vt[:5]
    assert np.abs(out.double().numpy() - ref).max() < 1e-5
    assert info.rank == 5 and info.full_rank == 20


def test_donoho_gavish_constant():
    assert spectral.donoho_gavish_omega(1.0) == pytest.approx(2.858, abs=0.01)  # the paper's square-matrix value
    assert spectral.donoho_gavish_omega(0.5) == pytest.approx(0.56 / 8 - 0.95 / 4 + 0.91 + 1.43)
    with pytest.raises(ValueError):
        spectral.donoho_gavish_omega(1.5)
    assert spectral.median(torch.tensor([3.0, 1.0, 2.0, 10.0])) == 2.5


def marchenko_pastur_median(beta):
    """Median of the Marchenko-Pastur law with aspect ratio ``beta`` (variance 1), by numerical integration."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    x = np.linspace(lo, hi, 200001)
    mid = (x[1:] + x[:-1]) / 2
    density = np.sqrt(np.maximum((hi - mid) * (mid - lo), 0)) / (2 * math.pi * beta * mid)
    cdf = np.cumsum(density * np.diff(x))
    return float(np.interp(0.5, cdf / cdf[-1], x[1:]))


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.8, 1.0])
def test_donoho_gavish_omega_approximates_the_exact_threshold(beta):
    # exact omega(beta) = lambda*(beta) / sqrt(median of Marchenko-Pastur) (Donoho & Gavish 2014)
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta ** 2 + 14 * beta + 1)))
    exact = lam / math.sqrt(marchenko_pastur_median(beta))
    assert abs(spectral.donoho_gavish_omega(beta) - exact) < 0.007


@pytest.mark.parametrize("m,n", [(120, 80), (60, 150)])
def test_spectral_threshold_keeps_the_planted_components(m, n):
    signal = [40.0, 25.0, 12.0, 8.0]
    delta = known_spectrum(m, n, signal, noise=1.0, seed=m)
    base = torch.randn(m, n, dtype=torch.float64)
    out, info = spectral.spectral_repair(base, base + delta, 1.0, threshold=True)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    beta = min(m, n) / max(m, n)
    tau = (0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43) * np.median(s)
    assert info.tau == pytest.approx(tau, rel=1e-12)
    assert info.rank == int((s > tau).sum()) == len(signal)
    u, _, vt = np.linalg.svd(delta.numpy(), full_matrices=False)
    k = len(signal)
    ref = base.numpy() + (u[:, :k] * s[:k]) @ vt[:k]
    assert np.abs(out.numpy() - ref).max() < 1e-10


def test_spectral_threshold_drops_pure_noise():
    base = torch.zeros(90, 60)
    noise = known_spectrum(90, 60, [], noise=1.0, seed=4).float()
    out, info = spectral.spectral_repair(base, noise, 1.0, threshold=True)
    assert info.rank == 0 and torch.equal(out, base)


def test_spectral_randomized_matches_exact_for_small_rank():
    delta = known_spectrum(400, 300, [50.0, 40.0, 30.0, 20.0, 10.0], noise=0.5, seed=3).float()
    assert spectral.choose_svd(5, (400, 300)) == "randomized"
    assert spectral.choose_svd(70, (400, 300)) == "exact"
    fast, info = spectral.spectral_delta(delta, rank=5)
    exact, _ = spectral.spectral_delta(delta, rank=5, method="exact")
    assert info.method == "randomized"
    assert (fast - exact).abs().max() < 1e-4 * exact.abs().max()
    again, _ = spectral.spectral_delta(delta, rank=5)
    assert torch.equal(fast, again)  # seeded: deterministic


def test_spectral_leaves_1d_tensors_to_task_arithmetic_and_checks_options():
    base, (sft,) = fine_tunes((10,), 1, seed=19)
    out, info = spectral.spectral_repair(base, sft, 0.5, rank=1)
    same(out, torch.add(base, sft - base, alpha=0.5))
    assert info is None
    with pytest.raises(ValueError):
        spectral.spectral_delta(torch.randn(4, 4))
    with pytest.raises(ValueError):
        spectral.spectral_delta(torch.randn(4, 4), rank=2, threshold=True)


# ---------------------------------------------------------------- LoRA extraction

def test_lora_full_rank_reconstructs_the_delta():
    d = torch.randn(24, 16)
    a, b = extract_lora.lora_factors(d, 16, alpha=32)
    assert a.shape == (16, 16) and b.shape == (24, 16)
    assert torch.allclose(extract_lora.lora_delta(a, b, 32), d, atol=1e-5)


def test_lora_rank_r_is_the_truncated_svd_with_balanced_factors():
    d = torch.randn(40, 30, dtype=torch.float64)
    a, b = extract_lora.lora_factors(d, 6, alpha=12)
    u, s, vt = np.linalg.svd(d.numpy(), full_matrices=False)
    assert np.abs(extract_lora.lora_delta(a, b, 12).numpy() - (u[:, :6] * s[:6]) @ vt[:6]).max() < 1e-10
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0))


def test_lora_pads_a_rank_above_the_matrix_size():
    d = torch.randn(5, 3)
    a, b = extract_lora.lora_factors(d, 8, alpha=8)
    assert a.shape == (8, 3) and b.shape == (5, 8)
    assert torch.all(a[3:] == 0) and torch.all(b[:, 3:] == 0)
    assert torch.allclose(extract_lora.lora_delta(a, b, 8), d, atol=1e-5)


def test_lora_factors_follow_peft_convention():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=False))
    base_weight = model[0].weight.detach().clone()
    delta = torch.randn(20, 12) * 0.1
    a, b = extract_lora.lora_factors(delta, 4, alpha=8)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = lora.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(a)
    layer.lora_B["default"].weight.data.copy_(b)
    merged = lora.merge_and_unload()[0].weight.detach()
    assert torch.allclose(merged, base_weight + extract_lora.lora_delta(a, b, 8), atol=1e-6)


# ---------------------------------------------------------------- mergekit-yaml on tiny checkpoints

def _end_to_end_recipes(base, s0, s1, s2):
    def m(path, **parameters):
        return {"model": str(path), **({"parameters": parameters} if parameters else {})}

    three = [m(s0), m(s1), m(s2)]
    return {  # name -> (recipe, our function of (base tensor, [model tensors]) per tensor)
        "model_stock": ({"merge_method": "model_stock", "base_model": str(base), "models": three},
                        lambda b, xs: model_stock.model_stock(b, xs)),
        "model_stock_fw": ({"merge_method": "model_stock", "base_model": str(base), "models": three,
                            "parameters": {"filter_wise": True}},
                           lambda b, xs: model_stock.model_stock(b, xs, filter_wise=True)),
        "nuslerp_cols": ({"merge_method": "nuslerp", "base_model": str(base),
                          "models": [m(s0, weight=0.7), m(s1, weight=0.3)],
                          "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
                         lambda b, xs: nuslerp.nuslerp_merge(xs[0], xs[1], (0.7, 0.3), b, True, False)),
        "multislerp": ({"merge_method": "multislerp", "base_model": str(base),
                        "models": [m(s0, weight=0.5), m(s1, weight=0.2), m(s2, weight=0.3)]},
                       lambda b, xs: multislerp.multislerp(xs, [0.5, 0.2, 0.3], b)),
        # karcher ignores the base's role but base_model joins the inputs (last, after the models)
        "karcher": ({"merge_method": "karcher", "base_model": str(base), "models": [m(s0), m(s1)]},
                    lambda b, xs: karcher.karcher_mean([xs[0], xs[1], b])),
        "nearswap": ({"merge_method": "nearswap", "base_model": str(base), "models": [m(s0)],
                      "parameters": {"t": 0.01}}, lambda b, xs: nearswap.nearswap(b, xs[0], 0.01)),
        "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": str(base), "models": [m(s0)]},
                         lambda b, xs: fusion.arcee_fusion(b, xs[0])),
        "ramplus_tl": ({"merge_method": "ramplus_tl", "base_model": str(base), "models": three,
                        "parameters": {"epsilon": 0.015}}, lambda b, xs: ram.ramplus_tl(b, xs, epsilon=0.015)),
        "ram": ({"merge_method": "ram", "base_model": str(base), "models": three,
                 "parameters": {"epsilon": 0.015}}, lambda b, xs: ram.ram(b, xs, epsilon=0.015)),
        "passthrough_scale": ({"merge_method": "passthrough", "models": [m(s0, scale=0.37)]},
                              lambda b, xs: passthrough.passthrough(xs[0], 0.37)),
        "sce": ({"merge_method": "sce", "base_model": str(base), "models": three,
                 "parameters": {"select_topk": 0.5}}, lambda b, xs: sce.sce_merge(b, xs, 0.5)),
    }


@pytest.fixture(scope="module")
def end_to_end(pairs, tmp_path_factory):
    """name -> (mergekit-yaml's tensors, ours applied tensor by tensor to the same bf16 inputs)."""
    from tests.mergekit_runner import load_folder_tensors, run_mergekit_many
    base, sfts = pairs("llama", torch.bfloat16, sft_count=3)
    recipes = _end_to_end_recipes(base, *sfts)
    folders = run_mergekit_many({k: r for k, (r, _) in recipes.items()}, tmp_path_factory.mktemp("methods_new"))
    inputs = [load_folder_tensors(p) for p in [base, *sfts]]
    results = {}
    for name, (recipe, ours) in recipes.items():
        theirs = load_folder_tensors(folders[name])
        count = len(recipe["models"])
        results[name] = (theirs, {k: ours(inputs[0][k], [x[k] for x in inputs[1:1 + count]]) for k in theirs})
    return results


@pytest.mark.parametrize("name", list(_end_to_end_recipes("b", "s0", "s1", "s2")))
def test_mergekit_yaml_conformance_on_tiny_checkpoints(end_to_end, name, pairs):
    theirs, ours = end_to_end[name]
    base, _ = pairs("llama", torch.bfloat16, sft_count=3)
    from tests.mergekit_runner import load_folder_tensors
    assert set(theirs) == set(load_folder_tensors(base))
    for key, value in theirs.items():  # dtypes too: ramplus_tl and arcee_fusion write float32 for bf16 inputs
        mine = ours[key]
        assert mine.dtype == value.dtype and torch.equal(mine, value), (
            name, key, mine.dtype, value.dtype, (mine.double() - value.double()).abs().max().item())
