"""model_stock, nuslerp, multislerp and karcher as streaming methods: ``merge run`` of a mergekit recipe against
the real ``mergekit-yaml`` on the same tiny checkpoints, chunk/thread invariance, our own format and CLI.

mergekit computes these in the inputs' dtype over whole tensors; we stream them (float64 statistics summed
over chunks, float32 arithmetic, one rounding to the working dtype at the end). Agreement is therefore within
rounding, measured in units in the last place (ulp) of the output dtype at the magnitude of the inputs (and
the output) at each entry: ``MAX_ULPS`` below. (Relative to the output alone the count is meaningless where
the output nearly cancels: mergekit's rounding of each term is an ulp of the terms, not of their sum.)
"""

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.methods import karcher, model_stock, multislerp, nuslerp
from merge.options import Options
from tests.helpers import file_bytes, load_logits, load_tensors, ulps

pytest.importorskip("mergekit")

# Largest difference from mergekit-yaml, in ulps (see ``ulps``), measured on these checkpoints: at most 6
# (bfloat16) and 8 (float32); see docs/mergekit-semantics.md section 7. bfloat16: mergekit rounds every
# intermediate (deltas, unit vectors, iterates) to bfloat16, we round once; float32: float64 statistics
# summed over chunks instead of float32 norms of the whole tensor.
MAX_ULPS = {torch.bfloat16: 8, torch.float32: 12}


def m(path, **parameters):
    return {"model": str(path), **({"parameters": parameters} if parameters else {})}


def recipes(base, s0, s1, s2):
    """name -> mergekit config over the tiny base and three fine-tunes."""
    base = str(base)
    grad = [0.2, 0.9]  # a gradient over depth on a weight
    filt = [{"filter": "mlp", "value": 0.7}, {"value": 0.35}]  # a filter on a weight
    out = {
        "model_stock_2": {"merge_method": "model_stock", "base_model": base, "models": [m(s0), m(s1)]},
        "model_stock_3": {"merge_method": "model_stock", "base_model": base, "models": [m(s0), m(s1), m(s2)]},
        "model_stock_fw_2": {"merge_method": "model_stock", "base_model": base, "models": [m(s0), m(s1)],
                             "parameters": {"filter_wise": True}},
        "model_stock_fw_3": {"merge_method": "model_stock", "base_model": base, "models": [m(s0), m(s1), m(s2)],
                             "parameters": {"filter_wise": True}},
        "model_stock_fw_filter": {"merge_method": "model_stock", "base_model": base, "models": [m(s0), m(s1), m(s2)],
                                  "parameters": {"filter_wise": [{"filter": "mlp", "value": True},
                                                                 {"value": False}]}},
        "multislerp_2": {"merge_method": "multislerp", "models": [m(s0, weight=0.3), m(s1, weight=0.7)]},
        "multislerp_3_base": {"merge_method": "multislerp", "base_model": base,
                              "models": [m(s0, weight=grad), m(s1, weight=filt), m(s2, weight=0.5)]},
        "multislerp_3_raw": {"merge_method": "multislerp", "base_model": base,
                             "parameters": {"normalize_weights": False},
                             "models": [m(s0, weight=0.5), m(s1, weight=0.2), m(s2, weight=0.3)]},
        "karcher_base": {"merge_method": "karcher", "base_model": base, "models": [m(s0), m(s1)]},
        "karcher_3": {"merge_method": "karcher", "models": [m(s0), m(s1), m(s2)], "parameters": {"max_iter": 20}},
    }
    for mode, flags in {"flat": {}, "row": {"nuslerp_flatten": False},
                        "column": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}.items():
        for with_base in (True, False):
            config = {"merge_method": "nuslerp", "models": [m(s0, weight=grad), m(s1, weight=filt)]}
            if with_base:
                config["base_model"] = base
            if flags:
                config["parameters"] = flags
            out[f"nuslerp_{mode}_{'base' if with_base else 'nobase'}"] = config
    return out


NAMES = list(recipes("b", "s0", "s1", "s2"))
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def run_ours(config: dict, out: Path, **kw) -> Path:
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    merge.run(path, out=out, options=Options.of(**kw))
    return out


@pytest.fixture(scope="module")
def conformance(pairs, tmp_path_factory):
    """(dtype key, name) -> (mergekit-yaml's tensors, ours); every mergekit recipe of a dtype in one process."""
    from tests.mergekit_runner import load_folder_tensors, run_mergekit_many

    results = {}
    for key, dtype in DTYPES.items():
        base, sfts = pairs("llama", dtype, sft_count=3)
        configs = recipes(base, *sfts)
        root = tmp_path_factory.mktemp(f"spherical_{key}")
        folders = run_mergekit_many(configs, root / "mergekit")
        for name, config in configs.items():
            ours = run_ours(config, root / f"ours_{name}")
            results[key, name] = (load_folder_tensors(folders[name]), load_tensors(ours))
        results[key] = [load_tensors(p) for p in (base, *sfts)]
    return results


@pytest.mark.parametrize("key", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_merge_run_agrees_with_mergekit_yaml(conformance, key, name):
    theirs, ours = conformance[key, name]
    assert set(ours) == set(theirs)
    worst = 0.0
    for tensor, value in theirs.items():
        mine = ours[tensor]
        assert mine.dtype == value.dtype and mine.shape == value.shape, tensor
        worst = max(worst, ulps(mine, value, [x[tensor] for x in conformance[key]]))
    assert worst <= MAX_ULPS[DTYPES[key]], (name, key, worst)


def test_mergekit_disagreement_is_rounding_not_a_different_formula(conformance, pairs):
    """The ulp bound is tight enough to catch a wrong formula: t swapped in nuslerp, or the base left out of
    karcher, are far outside it."""
    base, (s0, s1, _) = pairs("llama", torch.float32, sft_count=3)
    b, x0, x1 = (load_tensors(p) for p in (base, s0, s1))
    theirs, _ = conformance["f32", "nuslerp_flat_base"]
    name = "model.layers.1.self_attn.q_proj.weight"
    t = 1 - nuslerp.nuslerp_t(0.2 + 0.7 * 0.5, 0.35)  # swapped
    wrong = nuslerp.nuslerp_merge(x0[name], x1[name], (1 - t, t), b[name])
    inputs = [b[name], x0[name], x1[name]]
    assert ulps(wrong, theirs[name], inputs) > 100 * MAX_ULPS[torch.float32]
    theirs, _ = conformance["f32", "karcher_base"]
    wrong = karcher.karcher_mean([x0[name], x1[name]])
    assert ulps(wrong, theirs[name], inputs) > 100 * MAX_ULPS[torch.float32]


@pytest.mark.parametrize("name", ["model_stock_3", "model_stock_fw_3", "nuslerp_flat_base", "nuslerp_row_nobase",
                                  "nuslerp_column_base", "multislerp_3_base", "karcher_base"])
@pytest.mark.parametrize("key", list(DTYPES))
def test_bytes_do_not_depend_on_threads_or_chunk_size(pairs, tmp_path, name, key):
    base, sfts = pairs("llama", DTYPES[key], sft_count=3)
    config = recipes(base, *sfts)[name]
    outs = [file_bytes(run_ours(config, tmp_path / f"o{i}", threads=threads, chunk_elements=chunk))
            for i, (threads, chunk) in enumerate([(1, 1 << 22), (3, 100), (2, 777)])]
    assert outs[0] == outs[1] == outs[2]


def test_several_chunks_match_the_whole_tensor_functions(pairs, tmp_path):
    """Chunked statistics (chunks of 64 elements: every tensor spans many) against the pure whole-tensor
    functions, float32 inputs."""
    base, sfts = pairs("llama", torch.float32, sft_count=3)
    configs = recipes(base, *sfts)
    b, xs = load_tensors(base), [load_tensors(p) for p in sfts]
    expected = {
        "model_stock_fw_3": lambda n: model_stock.model_stock(b[n], [x[n] for x in xs], filter_wise=True),
        "model_stock_3": lambda n: model_stock.model_stock(b[n], [x[n] for x in xs]),
        "nuslerp_column_nobase": None,
        "multislerp_3_raw": lambda n: multislerp.multislerp([x[n] for x in xs], [0.5, 0.2, 0.3], b[n],
                                                            normalize_weights=False),
        "karcher_3": lambda n: karcher.karcher_mean([x[n] for x in xs], max_iter=20),
    }
    for name, fn in expected.items():
        if fn is None:
            continue
        out = load_tensors(run_ours(configs[name], tmp_path / name, chunk_elements=64))
        for tensor, value in out.items():
            torch.testing.assert_close(value, fn(tensor), rtol=2e-6, atol=2e-7, msg=f"{name} {tensor}")


def test_outputs_load_in_transformers_with_finite_logits(pairs, tmp_path):
    base, sfts = pairs("llama", torch.bfloat16, sft_count=3)
    configs = recipes(base, *sfts)
    for name in ("model_stock_fw_3", "nuslerp_column_base", "multislerp_3_base", "karcher_base"):
        assert torch.isfinite(load_logits(run_ours(configs[name], tmp_path / name))).all(), name


# ---------------------------------------------------------------- edge cases

def test_model_stock_with_one_fine_tune_is_a_one_line_error(pairs, tmp_path):
    base, sfts = pairs("llama", torch.bfloat16, sft_count=3)
    config = {"merge_method": "model_stock", "base_model": str(base), "models": [m(sfts[0])]}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert "model_stock needs at least two fine-tuned models" in line
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["model-stock", "--base", str(base), "--sft", str(sfts[0]),
                                       "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "at least two" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_model_stock_of_identical_deltas_is_their_average(pairs, tmp_path):
    """Two copies of one fine-tune: cos = 1, t = 1, so W = the fine-tune itself (its average with itself)."""
    base, sfts = pairs("llama", torch.float32, sft_count=3)
    config = {"merge_method": "model_stock", "base_model": str(base), "models": [m(sfts[0]), m(sfts[0])]}
    with pytest.raises(merge.errors.InputError, match="listed twice"):
        run_ours(config, tmp_path / "dup")
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(sfts[0], copy)
    for filter_wise in (False, True):
        out = tmp_path / f"o{filter_wise}"
        merge.merge("model_stock", sft=[sfts[0], copy], base=base, filter_wise=filter_wise, out=out)
        for name, value in load_tensors(out).items():
            torch.testing.assert_close(value, load_tensors(sfts[0])[name], rtol=1e-6, atol=1e-7)


def test_model_stock_of_the_base_itself_is_the_base(pairs, tmp_path):
    """Zero deltas: cos = 0, t = 0: the base, bit for bit."""
    base, _ = pairs("llama", torch.bfloat16, sft_count=3)
    import shutil
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    merge.merge("model_stock", sft=[a, b], base=base, out=tmp_path / "o")
    assert load_tensors(tmp_path / "o").keys() == load_tensors(base).keys()
    for name, value in load_tensors(tmp_path / "o").items():
        assert torch.equal(value, load_tensors(base)[name]), name


# ---------------------------------------------------------------- our format, CLI and merge convert

def same_tensors(a: Path, b: Path) -> None:
    x, y = load_tensors(a), load_tensors(b)
    assert x.keys() == y.keys()
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("name,args", [
    ("model_stock_3", ["model-stock", "--sft", "{s0}", "--sft", "{s1}", "--sft", "{s2}"]),
    ("model_stock_fw_2", ["model-stock", "--sft", "{s0}", "--sft", "{s1}", "--filter-wise"]),
    ("multislerp_3_plain", ["multislerp", "--sft", "{s0}", "--sft", "{s1}", "--sft", "{s2}", "--weight", "0.5",
                            "--weight", "0.2", "--weight", "0.3"]),
    ("nuslerp_column_plain", ["nuslerp", "--sft", "{s0}", "--sft", "{s1}", "--weight", "0.6", "--weight", "0.4",
                              "--vectors", "column"]),
    ("karcher_base", ["karcher", "--sft", "{s0}", "--sft", "{s1}"]),
])
def test_cli_and_converted_recipe_equal_the_mergekit_recipe(pairs, tmp_path, name, args):
    """`merge model-stock` (etc.) and `merge convert` of the mergekit recipe give the tensors `merge run` of the
    mergekit recipe gives."""
    base, (s0, s1, s2) = pairs("llama", torch.bfloat16, sft_count=3)
    configs = recipes(base, s0, s1, s2)
    configs["multislerp_3_plain"] = {"merge_method": "multislerp", "base_model": str(base),
                                     "models": [m(s0, weight=0.5), m(s1, weight=0.2), m(s2, weight=0.3)]}
    configs["nuslerp_column_plain"] = {"merge_method": "nuslerp", "base_model": str(base),
                                       "models": [m(s0, weight=0.6), m(s1, weight=0.4)],
                                       "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}
    reference = run_ours(configs[name], tmp_path / "mergekit_format")
    argv = [a.format(s0=s0, s1=s1, s2=s2) for a in args] + ["--base", str(base), "-o", str(tmp_path / "cli"), "-q"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    same_tensors(reference, tmp_path / "cli")
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(configs[name]))
    result = CliRunner().invoke(main, ["convert", str(path)])
    assert result.exit_code == 0, result.output
    (tmp_path / "ours.yml").write_text(result.output)
    merge.run(tmp_path / "ours.yml", out=tmp_path / "converted")
    same_tensors(reference, tmp_path / "converted")


def test_nuslerp_of_one_sft_interpolates_towards_the_base(pairs, tmp_path):
    """One SFT: W = S(W_sft, W_base, t) with t the share of the base; t=0 is the SFT bit for bit."""
    base, sft = pairs("llama", torch.float32)
    b, s = load_tensors(base), load_tensors(sft)
    for vectors, (row_wise, flatten) in {"tensor": (False, True), "row": (False, False),
                                         "column": (True, False)}.items():
        out = tmp_path / vectors
        merge.merge("nuslerp", sft=sft, base=base, t=0.4, out=out, vectors=vectors,
                    options=Options.of(chunk_elements=64))
        for name, value in load_tensors(out).items():
            expected = nuslerp.nuslerp(s[name], b[name], 0.4, row_wise, flatten)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"{vectors} {name}")
    merge.merge("nuslerp", sft=sft, base=base, t=0.0, out=tmp_path / "t0")
    assert file_bytes(tmp_path / "t0")["model.safetensors"] == file_bytes(sft)["model.safetensors"]


@pytest.mark.parametrize("args,message", [
    (["model-stock", "--sft", "{s0}"], "model_stock needs at least two fine-tuned models"),
    (["nuslerp", "--sft", "{s0}"], "t: required for nuslerp with one SFT"),
    (["nuslerp", "--sft", "{s0}", "--sft", "{s1}", "--t", "0.3"], "give weights: [w_1, w_2] instead of t"),
    (["nuslerp", "--sft", "{s0}", "--sft", "{s1}", "--weight", "1"], "needs weights: [w_1, w_2], one per SFT"),
    (["nuslerp", "--sft", "{s0}", "--t", "0.3", "--weight", "1"], "weights are for two SFTs"),
    (["multislerp", "--sft", "{s0}"], "multislerp needs at least two SFTs"),
    (["multislerp", "--sft", "{s0}", "--sft", "{s1}", "--weight", "1"], "give one weight per SFT (2), got 1"),
    (["multislerp", "--sft", "{s0}", "--sft", "{s1}", "--weight", "1", "--weight", "-1"], "they sum to 0"),
    (["karcher", "--sft", "{s0}", "--max-iter", "0"], "--max-iter"),
])
def test_bad_parameters_are_one_line_errors(pairs, tmp_path, args, message):
    base, (s0, s1, _) = pairs("llama", torch.bfloat16, sft_count=3)
    argv = [a.format(s0=s0, s1=s1) for a in args] + ["--base", str(base), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_convert_refuses_what_our_format_cannot_say(tmp_path):
    from merge.recipes.convert import convert
    from merge.recipes.loading import parse_text

    cases = {
        "nuslerp without base_model": {"merge_method": "nuslerp", "models": [m("a", weight=1), m("b", weight=1)]},
        "per-tensor weights": {"merge_method": "nuslerp", "base_model": "c",
                               "models": [m("a", weight=[0, 1]), m("b", weight=1)]},
        "normalize_weights: false": {"merge_method": "multislerp", "base_model": "c",
                                     "parameters": {"normalize_weights": False},
                                     "models": [m("a", weight=1), m("b", weight=1)]},
        "karcher without base_model": {"merge_method": "karcher", "models": [m("a"), m("b")]},
    }
    for message, config in cases.items():
        with pytest.raises(merge.errors.InputError, match=message):
            convert(parse_text(yaml.safe_dump(config), "r.yml"))


def test_gram_sums_over_blocks_and_chunks():
    """Float64 Gram sums of deltas over several 2**17 blocks: equal to a direct float64 computation, and the same
    bits for the whole tensor and for chunks that are multiples of the block."""
    from merge.methods.gram import BLOCK, gram_partial_sums

    g = torch.Generator().manual_seed(3)
    n = 3 * BLOCK + 1234
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(3)]
    whole = gram_partial_sums(xs, base)
    d = torch.stack([x.double() - base.double() for x in xs])
    torch.testing.assert_close(whole, d @ d.T, rtol=1e-12, atol=0)
    acc = None
    for start in range(0, n, 2 * BLOCK):
        acc = gram_partial_sums([x[start:start + 2 * BLOCK] for x in xs], base[start:start + 2 * BLOCK], acc)
    assert torch.equal(acc, whole)
    assert torch.equal(whole, whole.T)
