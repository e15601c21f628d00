"""Spectral repair as a merge (method ``spectral``; ``merge task-arithmetic --sparsify svd|svd-threshold``):
the streamed merge against the whole-tensor reference, full rank = task arithmetic, the Donoho-Gavish threshold
against a direct computation on planted spectra, transformers loading, thread/chunk invariance, the recipe
format, the memory model and the CLI's refusals. The pure math is tested in tests/test_methods_new.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.methods import reference
from merge.methods.spectral import SpectralKernel
from merge.options import OPTION_FIELDS, Options
from merge.recipes.schema import Recipe
from merge.scheduler import single_threaded_torch
from tests.checkpoints import make_model, save_tokenizer
from tests.helpers import file_bytes, load_logits, load_tensors

SIGNAL = (6.0, 3.0, 1.5)  # planted singular values of every 2-D delta (times 0.02)
NOISE = 0.02 * 0.05  # entrywise noise std of the deltas, times sqrt(n)


def planted(shape, seed: int) -> torch.Tensor:
    """``0.02 * U diag(SIGNAL) V^T + NOISE * N(0, 1/n)`` of ``shape`` (m, n), float64: three components far
    above the noise's singular values (~ NOISE * (1 + sqrt(m/n)))."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(SIGNAL), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(SIGNAL), generator=g, dtype=torch.float64))
    low = (u * (0.02 * torch.tensor(SIGNAL, dtype=torch.float64))) @ v.T
    return low + NOISE * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)


def make_planted_pair(root, dtype):
    """A tiny Llama base and an SFT whose 2-D deltas have the planted spectrum (1-D ones: small noise)."""
    base = make_model("llama", 0, dtype)
    base.save_pretrained(root / "base")
    save_tokenizer(root / "base", 96)
    sft = make_model("llama", 0, dtype)
    with torch.no_grad():
        for i, (_name, p) in enumerate(sorted(sft.named_parameters())):
            if p.dim() == 2:
                p.add_(planted(tuple(p.shape), seed=i).to(dtype))
            else:
                g = torch.Generator().manual_seed(i)
                p.add_((0.01 * torch.randn(p.shape, generator=g)).to(dtype))
    sft.save_pretrained(root / "sft")
    save_tokenizer(root / "sft", 96)
    return root / "base", root / "sft"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def pair(request, tmp_path_factory):
    return make_planted_pair(tmp_path_factory.mktemp("spectral"), request.param)


def spectral_merge(pair, out, sparsify="svd-threshold", **kw):
    """merge.merge with the method's keywords and run options given side by side (split here)."""
    base, sft = pair
    kw.setdefault("scale", 0.7)
    options = Options.of(**{k: kw.pop(k) for k in list(kw) if k in OPTION_FIELDS})
    return merge.merge("task_arithmetic", sft=str(sft), base=str(base), out=out, sparsify=sparsify, options=options,
                       **kw)


@pytest.mark.parametrize("mode", [dict(sparsify="svd-threshold"), dict(sparsify="svd", rank=2, svd="exact"),
                                  dict(sparsify="svd", rank=2, svd="randomized")],
                         ids=["threshold", "rank-exact", "rank-randomized"])
def test_merge_equals_the_whole_tensor_reference(pair, tmp_path, mode):
    summary = spectral_merge(pair, tmp_path / "o", chunk_elements=64, threads=2, **mode)
    out, base, sft = (load_tensors(p) for p in (tmp_path / "o", *pair))
    rank = mode.get("rank")
    reported = summary.reports["spectral"]
    assert len(reported) == sum(t.dim() == 2 for t in base.values())
    for name, w in out.items():
        with single_threaded_torch():  # as the merge's workers run: LAPACK's bits depend on its thread count
            expected, k = reference.spectral(base[name], sft[name], 0.7, rank=rank, svd=mode.get("svd", "exact"))
        assert torch.equal(w, expected.to(w.dtype)), name
        if k is not None:
            assert reported[name].rank == k
    assert {i.method for i in reported.values()} == {"exact" if rank is None else mode["svd"]}
    assert torch.isfinite(load_logits(tmp_path / "o")).all()  # loads in transformers


def test_threshold_matches_a_direct_computation_on_planted_spectra(pair, tmp_path):
    summary = spectral_merge(pair, tmp_path / "o")
    out, base, sft = (load_tensors(p) for p in (tmp_path / "o", *pair))
    for name in [n for n, t in base.items() if t.dim() == 2]:
        d = (sft[name].double() - base[name].double()).numpy()
        m, n = d.shape
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        beta = min(m, n) / max(m, n)
        tau = (0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43) * np.median(s)
        k = int((s > tau).sum())
        assert k == len(SIGNAL), name  # exactly the planted components, whatever the shape
        info = summary.reports["spectral"][name]
        assert info.rank == k and info.tau == pytest.approx(tau, rel=1e-5)
        expected = base[name].double().numpy() + 0.7 * ((u[:, :k] * s[:k]) @ vt[:k])
        ulp = 2.0 ** -7 if out[name].dtype == torch.bfloat16 else 1e-6
        assert np.abs(out[name].double().numpy() - expected).max() <= ulp * np.abs(expected).max(), name
    assert "rank kept 3..3" in summary.report()


def test_full_rank_is_task_arithmetic_bit_for_bit(pair, tmp_path):
    base, sft = pair
    spectral_merge(pair, tmp_path / "svd", sparsify="svd", rank=10 ** 6)
    merge.merge("task_arithmetic", sft=str(sft), base=str(base), out=tmp_path / "ta", scale=0.7)
    assert file_bytes(tmp_path / "svd") == file_bytes(tmp_path / "ta")


def test_bytes_do_not_depend_on_threads_or_chunks(pair, tmp_path):
    outs = []
    for i, (threads, chunk) in enumerate([(1, 1 << 20), (3, 64), (2, 1000)]):
        spectral_merge(pair, tmp_path / f"o{i}", threads=threads, chunk_elements=chunk)
        spectral_merge(pair, tmp_path / f"r{i}", sparsify="svd", rank=2, svd="randomized", threads=threads,
                       chunk_elements=chunk)
        outs.append((file_bytes(tmp_path / f"o{i}"), file_bytes(tmp_path / f"r{i}")))
    assert outs[0] == outs[1] == outs[2]


def test_the_recipe_reproduces_the_merge_and_plan_states_the_rank(pair, tmp_path):
    spectral_merge(pair, tmp_path / "o", sparsify="svd", rank=2)
    text = (tmp_path / "o" / "merge_recipe.yaml").read_text()
    recipe = Recipe.from_yaml(text)
    assert recipe.method == "spectral" and recipe.rank == 2 and recipe.threshold is None
    merge.run(recipe, out=tmp_path / "again")
    assert file_bytes(tmp_path / "again") == file_bytes(tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert "W = W_base + s * D_kept" in card and "top 2 singular components" in card
    planned = merge.run(recipe, out=tmp_path / "dry", options=Options.of(dry_run=True))
    assert "top 2 singular components" in planned.parameter_table
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("fields,needle", [
    (dict(rank=2, threshold="donoho_gavish"), "give exactly one of them"),
    (dict(), "give exactly one of them"),
    (dict(threshold="donoho_gavish", svd="exact"), "svd: the threshold needs every singular value"),
    (dict(rank=0), "rank"),
    (dict(rank=2, sft=["./a", "./b"]), "spectral repairs one SFT's delta"),
    (dict(rank=2, scale=None), "scale: give a scale"),
    (dict(rank=2, sparsify={"method": "magnitude", "density": 0.5}), "sparsify: only for method task_arithmetic"),
])
def test_recipe_refusals_name_the_key(fields, needle):
    data = {"method": "spectral", "base": "./b", "sft": "./s", "scale": 0.7, **fields}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises((ValueError, merge.errors.InputError)) as e:
        merge.api.build_recipe(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_memory_model_counts_the_svd_workspace(pair, tmp_path):
    from merge.methods.spectral import EXACT_WORKSPACE, Spectral

    assert SpectralKernel().granule(Spectral(("base", "sft0")), (96, 32)) == 96 * 32  # whole matrix
    assert SpectralKernel().granule(Spectral(("base", "sft0")), (32,)) == 1
    assert SpectralKernel().buffer_bytes(Spectral(("base", "sft0")), 96 * 32) == EXACT_WORKSPACE * 96 * 32 * 4
    svd = spectral_merge(pair, tmp_path / "a", dry_run=True, threads=1, chunk_elements=64)
    ta = merge.merge("task_arithmetic", sft=str(pair[1]), base=str(pair[0]), out=tmp_path / "b", scale=0.7,
                     options=Options.of(dry_run=True, threads=1, chunk_elements=64))
    largest = 96 * 32  # embed_tokens / lm_head, decomposed whole
    assert svd.peak_bytes >= ta.peak_bytes + EXACT_WORKSPACE * largest * 4
    with pytest.raises(merge.errors.MergeError, match="--memory 20KB is too small: one worker needs"):
        spectral_merge(pair, tmp_path / "c", memory=20_000)
    assert not (tmp_path / "c").exists()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("extra,needle", [
    (["--sparsify", "svd"], "--sparsify svd needs --rank"),
    (["--sparsify", "svd", "--rank", "0"], "'--rank': 0 is not in the range"),
    (["--sparsify", "svd-threshold", "--rank", "3"], "--rank: --sparsify svd-threshold chooses the rank itself"),
    (["--sparsify", "svd-threshold", "--svd", "exact"], "--svd: --sparsify svd-threshold chooses"),
    (["--rank", "3"], "--rank: only for --sparsify svd"),
    (["--sparsify", "magnitude", "--density", "0.5", "--rank", "3"], "use --sparsify svd instead of magnitude"),
    (["--sparsify", "svd", "--rank", "2", "--density", "0.5"], "--density: has no effect with --sparsify svd"),
    (["--sparsify", "svd", "--rank", "2", "--sft", "SFT2"], "spectral repair takes one --sft (got 2)"),
    (["--sparsify", "svd", "--rank", "2", "--scale", "0.5"], "one --scale (got 2)"),
])
def test_cli_refusals_are_one_line(pair, tmp_path, extra, needle):
    base, sft = pair
    extra = [str(sft) if a == "SFT2" else a for a in extra]
    result = run_cli("task-arithmetic", "--base", base, "--sft", sft, "--scale", "0.7", *extra, "-o", tmp_path / "o")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_spectral_merge_and_help_states_the_formula(pair, tmp_path):
    base, sft = pair
    result = run_cli("task-arithmetic", "--base", base, "--sft", sft, "--scale", "0.7", "--sparsify",
                     "svd-threshold", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "method: spectral" in result.output and "rank kept 3..3" in result.output
    assert file_bytes(tmp_path / "o") == file_bytes(spectral_merge(pair, tmp_path / "api").out)
    help_text = " ".join(run_cli("task-arithmetic", "--help").output.split())
    assert "0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43" in help_text and "--rank" in help_text


def test_added_token_rows_are_copied_and_the_shared_rows_decomposed(pairs, tmp_path):
    base, sft = pairs("llama", torch.bfloat16, added_tokens=4)
    merge.merge("task_arithmetic", sft=str(sft), base=str(base), out=tmp_path / "o", scale=0.7, sparsify="svd",
                rank=3, svd="exact")
    out, b, s = (load_tensors(p) for p in (tmp_path / "o", base, sft))
    name = "model.embed_tokens.weight"
    rows = b[name].shape[0]
    with single_threaded_torch():
        expected, k = reference.spectral(b[name], s[name][:rows], 0.7, rank=3)
    assert torch.equal(out[name][:rows], expected.to(torch.bfloat16)) and k == 3
    assert torch.equal(out[name][rows:], s[name][rows:])  # the SFT's added tokens, as they are


def test_a_task_arithmetic_recipe_asking_for_svd_is_pointed_to_method_spectral():
    with pytest.raises(merge.errors.InputError) as e:
        merge.api.build_recipe({"method": "task_arithmetic", "base": "./b", "sft": [{"model": "./s", "scale": 0.5}],
                                "sparsify": {"method": "svd", "density": 0.5}})
    assert str(e.value).startswith("sparsify: svd keeps singular components") and "method: spectral" in str(e.value)


def test_randomized_svds_side_by_side_share_no_random_stream():
    # workers decompose tensors at the same time: each randomized SVD draws from its own seeded generator,
    # so neither other SVDs nor other users of torch's global RNG change its bytes
    from concurrent.futures import ThreadPoolExecutor

    from merge.methods.spectral import truncated_svd

    a = torch.randn(300, 200, generator=torch.Generator().manual_seed(5))
    expected = truncated_svd(a, 8, "randomized")[0]
    stop = []

    def noise():
        while not stop:
            torch.manual_seed(len(stop))
            torch.randn(1000)

    with ThreadPoolExecutor(5) as pool:
        hammer = pool.submit(noise)
        results = list(pool.map(lambda _: truncated_svd(a, 8, "randomized")[0], range(40)))
        stop.append(True)
        hammer.result()
    assert all(torch.equal(r, expected) for r in results)
