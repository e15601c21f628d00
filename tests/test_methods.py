"""The pure merge math against direct computations and independent reference implementations."""

import math

import numpy as np
import pytest
import torch

from merge import methods
from merge.methods import reference


def reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Textbook SLERP in float64 numpy, written independently of merge.methods."""
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    omega = np.arccos(np.clip(np.dot(ua, ub), -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_linear_matches_direct_formula():
    a, b = torch.randn(1000), torch.randn(1000)
    assert torch.equal(reference.lerp(a, b, 0.3), 0.7 * a + 0.3 * b)
    assert torch.equal(methods.linear([a, b], [2.0, 2.0], normalize=True), 0.5 * a + 0.5 * b)


def test_linear_out_aliasing_first_input_only():
    a, b = torch.randn(10), torch.randn(10)
    expected = 0.25 * a + 0.75 * b
    out = methods.linear([a.clone(), b], [0.25, 0.75], out=None)
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError):
        methods.linear([a, b], [0.5, 0.5], out=b)


@pytest.mark.parametrize("angle_deg", [20.0, 60.0, 120.0, 170.0])
@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.9])
def test_slerp_matches_reference_on_large_angles(angle_deg, t):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(512)
    y = rng.standard_normal(512)
    y -= x * np.dot(x, y) / np.dot(x, x)  # orthogonal to x
    theta = math.radians(angle_deg)
    a = x
    b = 3.0 * (np.cos(theta) * x / np.linalg.norm(x) + np.sin(theta) * y / np.linalg.norm(y))
    out, c = reference.slerp(torch.tensor(a), torch.tensor(b), t)
    assert c.spherical and abs(c.angle - angle_deg) < 1e-6
    np.testing.assert_allclose(out.numpy(), reference_slerp(a, b, t), rtol=1e-9, atol=1e-12)


def test_slerp_endpoints_exact_and_fallbacks():
    a, b = torch.randn(300), torch.randn(300)
    assert torch.equal(reference.slerp(a, b, 0.0)[0], a)
    assert torch.equal(reference.slerp(a, b, 1.0)[0], b)
    near = a + 1e-4 * torch.randn(300)
    out, c = reference.slerp(a, near, 0.3)
    assert not c.spherical and torch.allclose(out, 0.7 * a + 0.3 * near)
    out, c = reference.slerp(torch.zeros(300), b, 0.5)
    assert not c.spherical and torch.allclose(out, 0.5 * b)


def test_slerp_chunked_statistics_equal_whole():
    a, b = torch.randn(10_000, dtype=torch.float64), torch.randn(10_000, dtype=torch.float64)
    direct = [float(a @ b), float(a @ a), float(b @ b)]
    whole = methods.slerp_partial_sums(a, b, block=1000)
    assert all(math.isclose(w, d, rel_tol=1e-12) for w, d in zip(whole.tolist(), direct))
    acc = None
    for i in range(0, 10_000, 3000):  # chunks that are multiples of the block: the same bits
        acc = methods.slerp_partial_sums(a[i:i + 3000], b[i:i + 3000], acc, block=1000)
    assert torch.equal(acc, whole)
    acc = None
    for i in range(0, 10_000, 999):  # other chunks: the same up to rounding
        acc = methods.slerp_partial_sums(a[i:i + 999], b[i:i + 999], acc, block=1000)
    assert all(math.isclose(p, w, rel_tol=1e-12) for p, w in zip(acc.tolist(), whole.tolist()))


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("k", [1, 2, 17, 500, 9999, 10_000])
def test_kth_largest_is_exact_over_chunks(k, one_pass):
    x = torch.randn(10_000)
    chunks = lambda: (x[i:i + 3000] for i in range(0, 10_000, 3000))  # noqa: E731
    expected = torch.topk(x.abs(), k).values[-1].item()
    assert methods.rank_cut(chunks, k, one_pass).threshold == expected


@pytest.mark.parametrize("k", [1, 3, 1000, 12_345, 20_000, 39_999, 40_000])
def test_one_pass_cut_of_bfloat16_deltas_equals_the_two_pass_cut(k):
    """Deltas of bf16 weights: mostly short multiples of an ulp (zero low bits, heavy ties), some not
    (where the base is small); the cut found from the first pass's list equals the refined one."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(40_000, generator=g) * 0.02).bfloat16()
    base[::97] *= 1e-3
    sft = (base.float() + torch.randn(40_000, generator=g) * 2e-4).bfloat16()
    d = sft.float() - base.float()
    assert 0 < int(((d.abs().view(torch.int32) & 0xFFFF) != 0).sum()) < 1000  # both kinds present
    passes = []

    def chunks():
        passes.append(1)
        return (d[i:i + 7000] for i in range(0, 40_000, 7000))

    one = methods.rank_cuts(chunks, [k, 40_000 - k])
    assert len(passes) == 1  # settled by the first pass
    assert one == methods.rank_cuts(chunks, [k, 40_000 - k], one_pass=False)
    assert one[0].threshold == torch.topk(d.abs(), k).values[-1].item()


def _bf16_deltas(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    return (base.float() + torch.randn(n, generator=g) * 2e-4).bfloat16().float() - base.float()


def _counted(d: torch.Tensor, size: int, passes: list):
    def chunks():
        passes.append(1)
        return (d[i:i + size] for i in range(0, d.numel(), size))
    return chunks


@pytest.mark.parametrize("kind", ["bf16 deltas", "distinct values"])
@pytest.mark.parametrize("k", [0, 1, 7, 12_000, 20_000, 39_999, 40_000, 40_001])
def test_cuts_proposed_by_a_sample_equal_the_histogram_cuts(kind, k):
    """A spread sample proposes the cut value and one pass proves it by counting (heavy ties), or the
    histogram finds it (no proposal); either way the cut, and its ties per chunk, are the same."""
    d = _bf16_deltas(40_000) if kind == "bf16 deltas" else torch.randn(40_000)
    plain, sampled = [], []
    expected = methods.rank_cut(_counted(d, 7000, plain), k)
    sample = lambda: (d[i:i + 500] for i in range(0, 40_000, 2500))  # noqa: E731
    got = methods.rank_cut(_counted(d, 7000, sampled), k, sample=sample, total=40_000)
    assert got == expected and got.ties_by_chunk == expected.ties_by_chunk
    if kind == "bf16 deltas" and 1000 <= k <= 39_000:  # a heavily tied cut: proved by the counting pass alone
        assert len(sampled) == 1 and len(got.ties_by_chunk) == 6 and sum(got.ties_by_chunk) == got.ties_total


@pytest.mark.parametrize("k", [5_000, 20_000, 35_000])
def test_a_misleading_sample_still_gives_the_exact_cut(k):
    """The sample comes from the start of the tensor, where every magnitude is 0.5: it proposes 0.5 with
    confidence, the count disproves it (only 2000 entries are that large), and the histogram finds the cut."""
    d = _bf16_deltas(40_000)
    d[:2000] = 0.5
    expected = methods.rank_cut(_counted(d, 7000, []), k)
    sampled = []
    got = methods.rank_cut(_counted(d, 7000, sampled), k, sample=lambda: [d[:2000]], total=40_000)
    assert got == expected and got.ties_by_chunk == expected.ties_by_chunk
    assert len(sampled) == 2  # the count that disproved the proposal, then the histogram


def test_magnitude_mask_keeps_top_density():
    d = torch.randn(1000)
    mask, _ = reference.magnitude_mask(d, methods.rank_cut(lambda: [d], 300))
    assert mask.sum() == 300
    assert d.abs()[mask].min() >= d.abs()[~mask].max()


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("k", [1, 5, 37, 61, 64, 99, 100])  # 61: the cut is the one inexact 0.25
def test_magnitude_keeps_exactly_k_with_ties_broken_by_position_across_chunks(k, one_pass):
    d = torch.tensor([0.5, -0.25, 0.25, 1.0, -0.5] * 20)  # heavy ties, as bf16 deltas have
    d[7] = 0.2500305  # one entry with low bits set, in the bucket of 0.25
    cut = methods.rank_cut(lambda: [d[:33], d[33:70], d[70:]], k, one_pass)
    masks, seen = [], 0
    for chunk in (d[:33], d[33:70], d[70:]):
        m, ties = reference.top_k_mask(chunk, cut, seen)
        masks.append(m)
        seen += ties
    mask = torch.cat(masks)
    order = sorted(range(100), key=lambda i: (-abs(d[i].item()), i))  # by magnitude, then position
    expected = torch.zeros(100, dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("k", [1, 9_000, 20_001, 33_333, 49_999])
def test_ties_split_inside_long_chunks(k):
    """The quota of kept ties runs out deep inside a chunk of many blocks: the position is still exact."""
    g = torch.Generator().manual_seed(1)
    d = torch.randint(-3, 4, (50_000,), generator=g) * 0.25
    spans = [(0, 20_000), (20_000, 40_000), (40_000, 50_000)]
    chunks = lambda: (d[a:b] for a, b in spans)  # noqa: E731
    cut = methods.rank_cut(chunks, k)
    expected = torch.zeros(50_000)
    order = torch.sort(-d.abs(), stable=True).indices[:k]  # by magnitude, then position
    expected[order] = d[order]
    for known in (False, True):
        trimmed, seen = d.clone(), (0, 0)
        for i, (a, b) in enumerate(spans):
            got = methods.trim_(trimmed[a:b], methods.RankCut(float("inf"), 0), cut, seen, chunk=i if known else None)
            seen = (0, seen[1] + got[1])
        assert torch.equal(trimmed, expected)


@pytest.mark.parametrize("known_ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("band", [(0, 300), (10, 500), (0, 1000), (0, 0), (0, 433)])
def test_trim_in_place_equals_the_breadcrumbs_mask(dtype, band, known_ties):
    """Trimming chunk by chunk keeps exactly the band, ties broken by position, whether the ties in each chunk
    are counted again or taken from the pass that found the cuts (``ties_by_chunk``)."""
    d = (torch.randint(-6, 7, (1000,)) * 0.125).to(dtype)  # heavy ties, zeros included
    upper, lower = methods.rank_cuts(lambda: (d[i:i + 300] for i in range(0, 1000, 300)),
                                     [band[0], band[0] + band[1]])
    if 0 < band[0] + band[1] <= 1000:  # a cut on an exact value: settled in one pass, ties known per chunk
        assert len(lower.ties_by_chunk) == 4 and sum(lower.ties_by_chunk) == lower.ties_total
    trimmed, expected, kept, seen_in, seen_out = d.clone(), [], 0, (0, 0), (0, 0)
    for i in range(0, 1000, 300):
        chunk = trimmed[i:i + 300]
        seen = methods.trim_(chunk, upper, lower, seen_in, chunk=i // 300 if known_ties else None)
        seen_in = tuple(a + b for a, b in zip(seen_in, seen))
        mask, seen = reference.breadcrumbs_mask(d[i:i + 300], upper, lower, seen_out)
        seen_out = tuple(a + b for a, b in zip(seen_out, seen))
        expected.append(d[i:i + 300] * mask)
        kept += int(mask.sum())
    assert torch.equal(trimmed, torch.cat(expected))
    assert kept == min(band[1], 1000 - band[0])  # exactly the band, ties broken by position


@pytest.mark.parametrize("band", [(0, 1), (0, 300), (7, 500), (0, 999), (999, 1)])
def test_trim_of_distinct_float32_values_keeps_exactly_the_band(band):
    """No ties: the cuts sit on single values, so keeping ``>=`` against ``>`` differs by one entry per cut."""
    d = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    upper, lower = methods.rank_cuts(lambda: (d[i:i + 300] for i in range(0, 1000, 300)), [band[0], sum(band)])
    trimmed, seen = d.clone(), (0, 0)
    for i in range(0, 1000, 300):
        got = methods.trim_(trimmed[i:i + 300], upper, lower, seen, chunk=i // 300)
        seen = (seen[0] + got[0], seen[1] + got[1])
    order = torch.sort(-d.abs(), stable=True).indices[band[0]:sum(band)]
    expected = torch.zeros(1000)
    expected[order] = d[order]
    assert torch.equal(trimmed, expected)


def test_breadcrumbs_drops_top_gamma_and_bottom():
    d = torch.randn(1000)
    upper, lower = methods.rank_cuts(lambda: [d], [10, 10 + 500])
    keep, _ = reference.breadcrumbs_mask(d, upper, lower)
    order = torch.argsort(d.abs(), descending=True)
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[order[10:510]] = True
    assert torch.equal(keep, expected)


def test_dare_mask_density_and_seed():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    m1, m2 = methods.dare_mask(100_000, 0.3, g1), methods.dare_mask(100_000, 0.3, g2)
    assert torch.equal(m1, m2)
    assert abs(m1.float().mean().item() - 0.3) < 0.01


def test_task_arithmetic_formula_and_sign_consensus():
    base = torch.randn(50)
    d1, d2 = torch.randn(50), torch.randn(50)
    out = methods.task_arithmetic(base, [d1, d2], [0.5, 2.0])
    assert torch.allclose(out, base + 0.5 * d1 + 2.0 * d2)
    ties = methods.task_arithmetic(base, [d1, d2], [1.0, 1.0], sign_consensus="sum")
    elected = torch.sign(d1 + d2)
    expected = base + d1 * (torch.sign(d1) == elected) + d2 * (torch.sign(d2) == elected)
    assert torch.allclose(ties, expected)
    norm = methods.task_arithmetic(base, [d1, d2], [1.0, 3.0], normalize=True)
    assert torch.allclose(norm, base + (d1 + 3 * d2) / 4)
