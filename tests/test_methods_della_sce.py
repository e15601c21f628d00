"""della, della_linear and sce through `merge run` (mergekit recipes), our CLI and recipe format.

mergekit conformance: every recipe runs through the real mergekit-yaml 0.1.5 (one process, module fixture) and
`merge run`. sce: float32 agrees within float32 rounding (the means are summed in chunks); bfloat16 agrees
within one ulp except where entries of equal variance straddle the selection cut (topk orders ties its own way:
the test proves every other difference is such a tie). della: NOT bit-exact with mergekit-yaml. mergekit draws
each mask from torch's global RNG, model after model, tensor after tensor in its executor's order; we draw from
generators seeded per fixed block by (seed, tensor, input, block), so masks are the same for any thread count and
chunk size but are other masks than mergekit's. Tensors whose densities are all 1 (a filter here) are
deterministic and bit-exact; the pruned ones are compared by structure (kept entries are ``s * delta`` with one
L1 factor per tensor) and by keep rates per magnitude-rank band, for mergekit's output and ours alike; our own
result is checked bit-exact against a whole-tensor computation with our masks.
"""

from __future__ import annotations

import threading

import pytest
import torch
import yaml
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.methods import reference, sce
from merge.methods.della import della_granule, della_keep_chunk, della_keep_probabilities
from merge.methods.sparsify import l1_rescale_factor
from merge.methods.task_arithmetic import task_arithmetic
from merge.options import Options
from tests.helpers import load_tensors
from tests.mergekit_runner import load_folder_tensors, run_mergekit_many

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def ckpt(pairs):
    base, sfts = pairs("llama", torch.float32, sft_count=3)
    bf_base, bfs = pairs("llama", torch.bfloat16, sft_count=2)
    one_base, one = pairs("llama", torch.float32, scale=0.5)
    paths = dict(base=base, s0=sfts[0], s1=sfts[1], s2=sfts[2], bf_base=bf_base, b0=bfs[0], b1=bfs[1],
                 one_base=one_base, one=one)
    return {k: str(v) for k, v in paths.items()}


def recipes(c: dict) -> dict[str, dict]:
    def m(ref, **params):
        return {"model": c[ref], "parameters": params} if params else {"model": c[ref]}

    return {
        # three SFTs, a weight gradient, densities 1 on attention (deterministic there) by filter
        "della_three": {"merge_method": "della", "base_model": c["base"],
                        "models": [m("s0", weight=[0.3, 1.0]), m("s1", weight=0.6, epsilon=0.1), m("s2", weight=0.4)],
                        "parameters": {"density": [{"filter": "self_attn", "value": 1.0}, {"value": 0.5}]}},
        "della_linear_bf16": {"merge_method": "della_linear", "base_model": c["bf_base"],
                              "models": [m("b0", weight=0.7, density=0.4), m("b1", weight=[0.2, 0.9], density=0.6)],
                              "parameters": {"lambda": 0.8, "epsilon": 0.2}},
        "della_one": {"merge_method": "della", "base_model": c["one_base"],
                      "models": [m("one", weight=0.8, density=0.5)]},
        "della_linear_one": {"merge_method": "della_linear", "base_model": c["one_base"],
                             "models": [m("one", weight=0.8, density=0.4, epsilon=0.3)]},
        "sce_three": {"merge_method": "sce", "base_model": c["base"],
                      "models": [m("s0"), m("s1"), m("s2")],
                      "parameters": {"select_topk": [{"filter": "mlp", "value": 0.5}, {"value": [0.2, 0.8]}]},
                      "dtype": "float32"},
        "sce_bf16": {"merge_method": "sce", "base_model": c["bf_base"], "models": [m("b0"), m("b1")],
                     "parameters": {"select_topk": 0.3}},
        "sce_cli": {"merge_method": "sce", "base_model": c["base"], "models": [m("s0"), m("s1")],
                    "parameters": {"select_topk": 0.4}},
    }


@pytest.fixture(scope="module")
def outputs(ckpt, tmp_path_factory):
    """name -> (mergekit's tensors, ours); sce_cli's ours is `merge sce` (our CLI)."""
    configs = recipes(ckpt)
    root = tmp_path_factory.mktemp("della_sce")
    oracle: dict = {}

    def run_oracle():
        try:
            oracle["run"] = run_mergekit_many(configs, root / "mergekit", random_seed=0)
        except BaseException as e:  # re-raised below
            oracle["run"] = e

    batch = threading.Thread(target=run_oracle)
    batch.start()
    runner = CliRunner()
    for name, config in configs.items():
        ours = root / "ours" / name
        if name == "sce_cli":
            args = ["sce", "--base", ckpt["base"], "--sft", ckpt["s0"], "--sft", ckpt["s1"], "--select-topk", "0.4"]
        else:
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            args = ["run", str(path)]
        result = runner.invoke(main, args + ["-o", str(ours), "-q"])
        assert result.exit_code == 0, (name, result.output, result.exception)
    batch.join()
    if isinstance(oracle["run"], BaseException):
        raise oracle["run"]
    return {name: (load_folder_tensors(oracle["run"][name]), load_tensors(root / "ours" / name)) for name in configs}


def _inputs(ckpt, *keys):
    return [load_tensors(ckpt[k]) for k in keys]


# ---------------------------------------------------------------------------------------------- sce
def test_sce_float32_agrees_with_mergekit_within_rounding(outputs):
    for name in ("sce_three", "sce_cli"):
        theirs, ours = outputs[name]
        assert set(ours) == set(theirs)
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype == torch.float32, k
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def _sce_by_position(base, tensors, select_topk):
    """sce with ties on the selection cut kept by flat position (our rule; mergekit's topk has its own)."""
    deltas = torch.stack([x - base for x in tensors])
    var = sce.sce_variance(deltas).float().reshape(-1)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    mask[torch.argsort(-var, stable=True)[:k]] = 1
    deltas = deltas * mask.to(deltas.dtype).view(deltas.shape[1:])
    return sce.sce_combine(base, deltas, sce.sce_weights(deltas)), mask


def test_sce_bf16_is_mergekit_with_ties_on_the_cut_kept_by_position(outputs, ckpt):
    """bf16 variances tie often at the cut: mergekit's topk keeps some of the tied entries, we keep the first
    ones. Ours is exactly the sce formula with that rule, mergekit's exactly the same formula with topk's
    choice, and the two selections differ only among the tied entries. (The choice also moves the mean
    squares, so the weights and many outputs differ by a bf16 ulp.)"""
    theirs, ours = outputs["sce_bf16"]
    base, a, b = _inputs(ckpt, "bf_base", "b0", "b1")
    equal = total = ties = 0
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype == torch.bfloat16, k
        expected, ours_mask = _sce_by_position(base[k], [a[k], b[k]], 0.3)
        assert torch.equal(ours[k], expected), k
        deltas = torch.stack([a[k] - base[k], b[k] - base[k]])
        their_mask = sce.sce_variance_mask(deltas, 0.3).reshape(-1).float()  # mergekit's own topk call
        var = sce.sce_variance(deltas).float().reshape(-1)
        chosen = their_mask != ours_mask
        if chosen.any():  # only among the ties on the cut
            assert torch.all(var[chosen] == var[ours_mask.bool()].min()), k
        assert torch.equal(theirs[k], sce.sce_merge(base[k], [a[k], b[k]], 0.3)), k  # the same math, topk's ties
        x, y = ours[k].float().reshape(-1), theirs[k].float().reshape(-1)
        equal += int((x == y).sum())
        total += x.numel()
        ties += int(chosen.sum())
    assert equal / total > 0.95 and 0 < ties < 0.01 * total


def test_sce_of_our_recipe_and_python_api_equals_the_cli(outputs, ckpt, tmp_path):
    recipe = merge.Recipe.model_validate({"method": "sce", "base": ckpt["base"], "sft": [ckpt["s0"], ckpt["s1"]],
                                          "select_topk": 0.4})
    merge.run(recipe, out=tmp_path / "a", options=Options.of(chunk_elements=96, threads=3))
    merge.merge("sce", sft=[ckpt["s0"], ckpt["s1"]], base=ckpt["base"], select_topk=0.4, out=tmp_path / "b",
                options=Options.of(chunk_elements=1 << 20, threads=1))
    _, cli = outputs["sce_cli"]
    for folder in ("a", "b"):
        got = load_tensors(tmp_path / folder)
        assert all(torch.equal(got[k], cli[k]) for k in cli), folder  # chunking and threads change no byte
    card = (tmp_path / "a" / "README.md").read_text()
    assert "SCE" in card and "select_topk: 0.4" in card
    from transformers import AutoModelForCausalLM

    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "a")(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_sce_streamed_equals_the_whole_tensor_function_without_selection(ckpt, tmp_path):
    merge.merge("sce", sft=[ckpt["s0"], ckpt["s1"], ckpt["s2"]], base=ckpt["base"], out=tmp_path / "o",
                options=Options.of(chunk_elements=64))
    base, s0, s1, s2 = _inputs(ckpt, "base", "s0", "s1", "s2")
    out = load_tensors(tmp_path / "o")
    for k in base:
        expected = sce.sce_merge(base[k], [s0[k], s1[k], s2[k]], 1.0)
        torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=1e-7, msg=k)


def test_sce_refuses_one_sft_and_bad_select_topk(ckpt, tmp_path):
    runner = CliRunner()
    one = runner.invoke(main, ["sce", "--base", ckpt["base"], "--sft", ckpt["s0"], "-o", str(tmp_path / "o")])
    assert one.exit_code == 2 and "at least two" in one.output and not (tmp_path / "o").exists()
    bad = runner.invoke(main, ["sce", "--base", ckpt["base"], "--sft", ckpt["s0"], "--sft", ckpt["s1"],
                               "--select-topk", "1.5", "-o", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "--select-topk" in bad.output
    for extra, message in (({"schedule": {"preset": "bottom_k", "k": 1}}, "schedule: sce has no t or scale"),
                           ({"sft": [{"model": ckpt["s0"], "scale": 2.0}, ckpt["s1"]]}, "sft.0.scale: sce weighs")):
        fields = {"method": "sce", "base": ckpt["base"], "sft": [ckpt["s0"], ckpt["s1"]], **extra}
        with pytest.raises(merge.errors.InputError, match=message):
            merge.api.build_recipe(fields)
    with pytest.raises(merge.errors.InputError, match="^--select-topk: only for sce; linear has no effect of it"):
        merge.merge("linear", sft=ckpt["s0"], base=ckpt["base"], t=0.3, select_topk=0.5, out=tmp_path / "o")


# ---------------------------------------------------------------------------------------------- della
def test_della_densities_of_one_are_bit_exact_with_mergekit(outputs):
    theirs, ours = outputs["della_three"]
    assert set(ours) == set(theirs)
    checked = 0
    for k in theirs:
        if "self_attn" in k:
            assert torch.equal(ours[k], theirs[k]), k
            checked += 1
    assert checked


def _mergekit_formula_with_our_masks(ckpt, keys, name, weights, density, epsilons, **combine):
    """mergekit's della on one tensor with our pruning: mask from della_keep_chunk (seed 0), L1 factor in the
    inputs' dtype, then mergekit's generalized task arithmetic."""
    from merge.methods.task_arithmetic import task_arithmetic_mergekit

    base, *sfts = _inputs(ckpt, *keys)
    b = base[name]
    deltas = []
    for i, (s, p, eps) in enumerate(zip(sfts, density, epsilons)):
        d = (s[name] - b).reshape(-1)
        if p < 1:
            pruned = d * della_keep_chunk(d, tuple(b.shape), 0, p, eps, 0, name, i)
            factor = l1_rescale_factor(float(d.abs().double().sum()), float(pruned.abs().double().sum()), b.dtype)
            d = pruned if factor is None else pruned * factor
        deltas.append(d)
    return task_arithmetic_mergekit(b.reshape(-1), deltas, weights, **combine).reshape(b.shape)


def _mergekit_t(name: str) -> float:
    from merge.tensor_names import Structure

    position = Structure.coerce(3).position(name)
    return position.depth if position.layer is not None else 0.0


def test_della_three_sfts_is_mergekits_formula_with_our_masks(outputs, ckpt):
    """Every tensor of the three-SFT della recipe (gradient, filter) is mergekit's generalized task arithmetic
    (sign election, normalize) applied to our pruned deltas."""
    from merge.recipes.mergekit import evaluate_setting

    _, ours = outputs["della_three"]
    for k in ours:
        density = 1.0 if "self_attn" in k else 0.5
        expected = _mergekit_formula_with_our_masks(
            ckpt, ("base", "s0", "s1", "s2"), k, [evaluate_setting([0.3, 1.0], k, _mergekit_t(k)), 0.6, 0.4],
            [density] * 3, (0.15, 0.1, 0.15), consensus="sum", normalize=True)
        assert torch.equal(ours[k], expected), k


def test_della_linear_bf16_is_mergekits_formula_with_our_masks_in_bf16(outputs, ckpt):
    """bfloat16: ranks, probabilities, masks, the L1 factor and the combination all in bf16, as mergekit;
    and about the expected share of entries changes, in mergekit's output and ours."""
    from merge.recipes.mergekit import evaluate_setting

    theirs, ours = outputs["della_linear_bf16"]
    assert set(ours) == set(theirs)
    base = load_tensors(ckpt["bf_base"])
    for k in ours:
        assert ours[k].dtype == torch.bfloat16, k
        expected = _mergekit_formula_with_our_masks(
            ckpt, ("bf_base", "b0", "b1"), k, [0.7, evaluate_setting([0.2, 0.9], k, _mergekit_t(k))], [0.4, 0.6],
            (0.2, 0.2), consensus=None, normalize=False, lam=0.8)
        assert torch.equal(ours[k], expected), k
    for out in (theirs, ours):
        changed = sum(int((out[k] != base[k]).sum()) for k in base if base[k].numel() >= 64)
        total = sum(base[k].numel() for k in base if base[k].numel() >= 64)
        # kept by either of two SFTs kept at 0.4 and 0.6: 1 - 0.6*0.4 = 0.76 (bf16 can round a tiny sum to base)
        assert 0.68 < changed / total < 0.80


def _rank_bands(d: torch.Tensor, bands: int = 4) -> torch.Tensor:
    """Each entry's magnitude-rank band (0 = smallest) within its dim-1 row, as mergekit ranks."""
    rows = d if d.dim() >= 2 else d.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True).double()
    return (ranks / rows.shape[1] * bands).floor().clamp(max=bands - 1).long().reshape(d.shape)


def _della_one_structure(out, base, sft, weight, density, epsilon, normalize):
    """Kept entries are ``c * s * d`` with one L1 factor s per tensor (c = 1 with normalize, else weight);
    keep rates per rank band follow ``P = p - e + 2e*u``. Returns the keep rates and their expectations."""
    kept_n = torch.zeros(4, dtype=torch.float64)
    seen = torch.zeros(4, dtype=torch.float64)
    expected = torch.zeros(4, dtype=torch.float64)
    for k in base:
        d = sft[k].double() - base[k].double()
        got = (out[k].double() - base[k].double()) / (1.0 if normalize else weight)
        kept = got != 0
        if d.numel() < 64 or not kept.any():
            continue
        s = d.abs().sum() / d[kept].abs().sum()
        torch.testing.assert_close(got[kept], d[kept] * s, rtol=1e-4, atol=1e-7)
        bands = _rank_bands(d).reshape(-1)
        p = della_keep_probabilities(d.float(), density, epsilon).double().reshape(-1)
        for band in range(4):
            here = bands == band
            kept_n[band] += kept.reshape(-1)[here].sum()
            seen[band] += here.sum()
            expected[band] += p[here].sum()
    return kept_n / seen, expected / seen, seen


@pytest.mark.parametrize("name,weight,density,epsilon,normalize",
                         [("della_one", 0.8, 0.5, 0.15, True), ("della_linear_one", 0.8, 0.4, 0.3, False)])
def test_della_structure_and_keep_rates_per_rank_band_as_mergekit(outputs, ckpt, name, weight, density, epsilon,
                                                                  normalize):
    theirs, ours = outputs[name]
    assert set(ours) == set(theirs)
    base, sft = _inputs(ckpt, "one_base", "one")
    for out in (theirs, ours):  # the same holds for both; the masks differ (different generators)
        rate, expected, n = _della_one_structure(out, base, sft, weight, density, epsilon, normalize)
        sd = (expected * (1 - expected) / n).sqrt()
        assert torch.all((rate - expected).abs() < 4.5 * sd), (rate, expected)
        assert rate[3] - rate[0] > epsilon  # larger entries are kept more often


def _ours_della_reference(ckpt, scales, density, epsilon, seed, consensus):
    """Our della with our masks, whole tensors at once: prune (mask from della_keep_chunk), L1 factor, then
    task arithmetic with sign consensus."""
    base, *sfts = _inputs(ckpt, "base", "s0", "s1", "s2")
    expected = {}
    for k, b in base.items():
        deltas = []
        for i, s in enumerate(sfts):
            d = (s[k] - b).reshape(-1)
            mask = della_keep_chunk(d, tuple(b.shape), 0, density, epsilon, seed, k, i)
            pruned = d * mask
            factor = l1_rescale_factor(float(d.abs().double().sum()), float(pruned.abs().double().sum()),
                                       torch.float32)
            deltas.append(pruned if factor is None else pruned * factor)
        expected[k] = task_arithmetic(b.reshape(-1), deltas, scales, sign_consensus=consensus).reshape(b.shape)
    return expected


def test_our_della_is_exactly_the_whole_tensor_computation_with_our_masks(ckpt, tmp_path):
    sfts = [ckpt["s0"], ckpt["s1"], ckpt["s2"]]
    merge.merge("task_arithmetic", sft=sfts, base=ckpt["base"], scale=[0.5, 0.7, 0.3], sparsify="della",
                density=0.5, epsilon=0.2, seed=3, sign_consensus=True, out=tmp_path / "o",
                options=Options.of(chunk_elements=128))
    out = load_tensors(tmp_path / "o")
    expected = _ours_della_reference(ckpt, [0.5, 0.7, 0.3], 0.5, 0.2, 3, "sum")
    for k in expected:
        assert torch.equal(out[k], expected[k]), k


def test_della_same_seed_same_bytes_across_threads_and_chunks_other_seed_other_masks(ckpt, tmp_path):
    def run(folder, seed, **kw):
        merge.merge("task_arithmetic", sft=[ckpt["s0"], ckpt["s1"]], base=ckpt["base"], scale=0.5,
                    sparsify="della", density=0.4, seed=seed, out=tmp_path / folder, options=Options.of(**kw))
        return load_tensors(tmp_path / folder)

    a = run("a", 7, threads=1, chunk_elements=1 << 20)
    b = run("b", 7, threads=3, chunk_elements=64)
    c = run("c", 7, threads=2, chunk_elements=200)  # rounded down to whole rows
    other = run("d", 8, threads=1)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert sum(not torch.equal(a[k], other[k]) for k in a) > len(a) // 2


def test_della_keep_chunk_is_per_row_and_follows_the_rank_probabilities():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 500, generator=g)
    shape = tuple(delta.shape)
    whole = della_keep_chunk(delta.reshape(-1), shape, 0, 0.5, 0.2, 11, "w", 0)
    rows = [della_keep_chunk(delta[i:i + 5].reshape(-1), shape, i * 500, 0.5, 0.2, 11, "w", 0)
            for i in range(0, 64, 5)]
    assert della_granule(shape) == 500 and torch.equal(torch.cat(rows), whole)  # any whole-row chunking
    bands = _rank_bands(delta).reshape(-1)
    p = della_keep_probabilities(delta, 0.5, 0.2).reshape(-1).double()
    for band in range(4):
        here = bands == band
        rate, expected = float(whole[here].mean()), float(p[here].mean())
        assert abs(rate - expected) < 4.5 * (expected * (1 - expected) / int(here.sum())) ** 0.5, band
    assert not torch.equal(whole, della_keep_chunk(delta.reshape(-1), shape, 0, 0.5, 0.2, 12, "w", 0))


def test_della_cli_loads_in_transformers_with_finite_logits(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    result = CliRunner().invoke(main, ["task-arithmetic", "--base", ckpt["base"], "--sft", ckpt["s0"], "--sft",
                                       ckpt["s1"], "--scale", "0.6", "--sparsify", "della", "--density", "0.5",
                                       "--epsilon", "0.1", "--seed", "2", "--sign-consensus", "-o",
                                       str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "della" in result.output and "epsilon 0.1" in result.output
    recipe = yaml.safe_load((tmp_path / "o" / "merge_recipe.yaml").read_text())
    assert recipe["sparsify"] == {"method": "della", "density": 0.5, "epsilon": 0.1, "seed": 2}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    again = CliRunner().invoke(main, ["run", str(tmp_path / "o" / "merge_recipe.yaml"), "-o", str(tmp_path / "r"),
                                      "-q"])
    assert again.exit_code == 0, again.output
    first, second = load_tensors(tmp_path / "o"), load_tensors(tmp_path / "r")
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("args,message", [
    (["--sparsify", "magnitude", "--density", "0.5", "--epsilon", "0.1"], "--epsilon: only --sparsify della"),
    (["--epsilon", "0.1"], "--epsilon: has no effect without --sparsify"),
    (["--sparsify", "della", "--density", "0.9", "--epsilon", "0.2"], "density + epsilon < 1"),
    (["--sparsify", "breadcrumbs", "--density", "0.5", "--seed", "1"], "--seed: only --sparsify random and della"),
])
def test_della_cli_refuses_options_without_effect_in_one_line(ckpt, tmp_path, args, message):
    result = CliRunner().invoke(main, ["task-arithmetic", "--base", ckpt["base"], "--sft", ckpt["s0"], "--scale",
                                       "0.5", *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_della_mergekit_density_epsilon_outside_unit_interval_is_one_line(ckpt, tmp_path):
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "della", "base_model": ckpt["base"],
                                    "models": [{"model": ckpt["s0"], "parameters": {"weight": 1.0, "density": 0.9,
                                                                                    "epsilon": 0.2}}]}))
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "epsilon" in result.output and "density" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_convert_della_and_sce_recipes(ckpt, tmp_path):
    def convert(config):
        path = tmp_path / "mk.yaml"
        path.write_text(yaml.safe_dump(config))
        return CliRunner().invoke(main, ["convert", str(path)])

    m = [{"model": ckpt["s0"], "parameters": {"weight": 0.5}}, {"model": ckpt["s1"], "parameters": {"weight": 0.3}}]
    della = convert({"merge_method": "della_linear", "base_model": ckpt["base"], "models": m,
                     "parameters": {"density": 0.4, "epsilon": 0.1, "lambda": 2.0}})
    assert della.exit_code == 0, della.output
    ours = yaml.safe_load("\n".join(line for line in della.output.splitlines() if not line.startswith("#")))
    assert ours["method"] == "task_arithmetic" and [s["scale"] for s in ours["sft"]] == [1.0, 0.6]
    assert ours["sparsify"] == {"method": "della", "density": 0.4, "epsilon": 0.1}  # seed 0, rescale: defaults
    assert "different random generator" in della.output
    sce_out = convert({"merge_method": "sce", "base_model": ckpt["base"], "models": m,
                       "parameters": {"select_topk": 0.3}})
    assert sce_out.exit_code == 0, sce_out.output
    ours = yaml.safe_load("\n".join(line for line in sce_out.output.splitlines() if not line.startswith("#")))
    assert ours["method"] == "sce" and ours["select_topk"] == 0.3 and ours["sft"] == [ckpt["s0"], ckpt["s1"]]
    per_tensor = convert({"merge_method": "sce", "base_model": ckpt["base"], "models": m,
                          "parameters": {"select_topk": [0.2, 0.5]}})
    assert per_tensor.exit_code == 2 and "select_topk" in per_tensor.output


def test_della_reference_is_mergekit_under_the_same_seed_for_the_pure_function():
    """The whole-tensor form (moved to reference.py) still matches mergekit's kernel bit for bit."""
    from mergekit.sparsify import RescaleNorm, della_magprune

    d = torch.randn(12, 40, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9)
    theirs = della_magprune(d, 0.5, 0.1, RescaleNorm.l1)
    torch.manual_seed(9)
    base = torch.zeros_like(d)
    ours = reference.della_merge(base, [d], [1.0], [0.5], [0.1], consensus=None, normalize=False)
    assert torch.equal(ours, theirs)
