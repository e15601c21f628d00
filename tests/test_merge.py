"""End-to-end merges on tiny real checkpoints: exact math, bit identities, loading, sharding, determinism."""

import json

import pytest
import torch

import merge
from merge.methods.reference import slerp as slerp_fn
from merge.options import Options
from tests.helpers import file_bytes, index, load_logits, load_tensors


def _inputs(pair):
    base, sft = pair
    return load_tensors(base), load_tensors(sft)


@pytest.mark.parametrize("method", ["linear", "slerp"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_t0_is_sft_and_t1_is_base_bit_for_bit(pairs, tmp_path, method, arch):
    base, sft = pairs(arch)
    merge.merge(method, sft=sft, base=base, t=0.0, out=tmp_path / "t0")
    merge.merge(method, sft=sft, base=base, t=1.0, out=tmp_path / "t1")
    b, s = _inputs((base, sft))
    t0, t1 = load_tensors(tmp_path / "t0"), load_tensors(tmp_path / "t1")
    assert t0.keys() == s.keys() == t1.keys()
    for name in s:
        assert t0[name].dtype == s[name].dtype and torch.equal(t0[name], s[name]), name
        assert torch.equal(t1[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_equals_direct_torch_computation(pairs, tmp_path, dtype):
    base, sft = pairs("llama", dtype)
    merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "o")
    b, s = _inputs((base, sft))
    out = load_tensors(tmp_path / "o")
    for name in s:
        expected = (s[name].float() * 0.7 + b[name].float() * 0.3).to(dtype)
        assert torch.equal(out[name], expected), name


def test_slerp_equals_per_tensor_slerp_and_reports_branches(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32, scale=0.5)
    summary = merge.merge("slerp", sft=sft, base=base, t=0.4, out=tmp_path / "o")
    b, s = _inputs((base, sft))
    out = load_tensors(tmp_path / "o")
    spherical = 0
    for name in s:
        expected, c = slerp_fn(s[name].double().reshape(-1), b[name].double().reshape(-1), 0.4)
        torch.testing.assert_close(out[name].reshape(-1), expected.float(), rtol=1e-5, atol=1e-6)
        spherical += c.spherical
    assert summary.spherical == spherical > 0
    assert summary.spherical + summary.linear_fallback == len(s)
    assert "took the spherical branch" in summary.report()


def test_small_deltas_fall_back_to_linear(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32, scale=0.0005)
    summary = merge.merge("slerp", sft=sft, base=base, t=0.3, out=tmp_path / "o")
    assert summary.spherical == 0 and summary.linear_fallback > 0


def test_task_arithmetic_with_two_sfts_and_trimming(pairs, tmp_path):
    base, (s0, s1) = pairs("llama", torch.float32, sft_count=2)
    merge.merge("task_arithmetic", sft=[s0, s1], base=base, scale=[0.6, 0.3], out=tmp_path / "ta")
    merge.merge("task_arithmetic", sft=[s0], base=base, scale=0.5, sparsify="magnitude", density=0.25,
                out=tmp_path / "ties")
    b, a0, a1 = load_tensors(base), load_tensors(s0), load_tensors(s1)
    ta, ties = load_tensors(tmp_path / "ta"), load_tensors(tmp_path / "ties")
    for name in b:
        expected = b[name] + 0.6 * (a0[name] - b[name]) + 0.3 * (a1[name] - b[name])
        torch.testing.assert_close(ta[name], expected, rtol=1e-6, atol=1e-6)
        d = (a0[name] - b[name]).reshape(-1)
        k = int(0.25 * d.numel())
        mask = torch.zeros_like(d, dtype=torch.bool)
        if k:
            mask[torch.topk(d.abs(), k).indices] = True
        expected = b[name].reshape(-1) + 0.5 * d * mask
        torch.testing.assert_close(ties[name].reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_scale_one_minus_t_equals_linear(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    merge.merge("task_arithmetic", sft=[sft], base=base, scale=0.7, out=tmp_path / "ta")
    merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "lin")
    for name, x in load_tensors(tmp_path / "ta").items():
        torch.testing.assert_close(x, load_tensors(tmp_path / "lin")[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,kw", [
    ("slerp", {"t": 0.3}),
    ("task_arithmetic", {"scale": 0.8, "sparsify": "random", "density": 0.5, "seed": 7}),
    ("task_arithmetic", {"scale": 0.8, "sparsify": "breadcrumbs", "density": 0.5, "gamma": 0.05}),
    ("task_arithmetic", {"scale": 0.8, "sparsify": "magnitude", "density": 0.3}),
])
def test_deterministic_across_threads_chunks_and_memory_budgets(pairs, tmp_path, method, kw):
    """Whole tensors, many chunks, several workers (largest tensors first) and a budget that forces smaller
    chunks all give the same bytes."""
    base, sft = pairs("llama")
    outs = []
    runs = [(1, 1 << 22, None), (3, 1000, "256MB"), (2, 777, None), (2, 512, "1080KB")]
    for i, (threads, chunk, memory) in enumerate(runs):
        merge.merge(method, sft=sft if method == "slerp" else [sft], base=base, out=tmp_path / f"o{i}", **kw,
                    options=Options.of(threads=threads, chunk_elements=chunk, memory=memory))
        outs.append(file_bytes(tmp_path / f"o{i}"))
    assert outs[0] == outs[1] == outs[2] == outs[3]


def test_dare_drops_and_rescales(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    merge.merge("task_arithmetic", sft=[sft], base=base, scale=1.0, sparsify="random", density=0.5, seed=1,
                out=tmp_path / "o")
    b, s = _inputs((base, sft))
    out = load_tensors(tmp_path / "o")
    name = "model.layers.0.mlp.up_proj.weight"
    d, got = s[name] - b[name], out[name] - b[name]
    kept = got != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(got[kept], 2 * d[kept], rtol=1e-5, atol=1e-6)


def test_outputs_load_in_transformers_with_finite_logits(pairs, tmp_path):
    from transformers import AutoTokenizer

    for arch in ("llama", "qwen2", "gpt2"):
        base, sft = pairs(arch)
        merge.merge("slerp", sft=sft, base=base, t=0.5, out=tmp_path / arch)
        assert torch.isfinite(load_logits(tmp_path / arch)).all()
        assert AutoTokenizer.from_pretrained(tmp_path / arch).chat_template
        assert (tmp_path / arch / "tokenizer.json").read_bytes() == (sft / "tokenizer.json").read_bytes()


def test_gpt2_tied_embeddings_stay_tied(pairs, tmp_path):
    base, sft = pairs("gpt2")
    merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "o")
    assert not any("lm_head" in n for n in load_tensors(tmp_path / "o"))


def test_sharded_inputs_and_outputs(pairs, tmp_path):
    base, sft = pairs("llama", shard_size="20KB")
    merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "o", max_shard_size="30KB")
    idx = index(tmp_path / "o")
    files = {p.name for p in (tmp_path / "o").glob("*.safetensors")}
    assert set(idx["weight_map"].values()) == files and len(files) > 2
    tensors = load_tensors(tmp_path / "o")
    assert set(idx["weight_map"]) == set(tensors)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.isfinite(load_logits(tmp_path / "o")).all()


def test_added_tokens_keep_sft_rows(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32, added_tokens=2)
    summary = merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "o")
    b, s = _inputs((base, sft))
    out = load_tensors(tmp_path / "o")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == s[name].shape == (98, 32)
        torch.testing.assert_close(out[name][:96], 0.5 * s[name][:96] + 0.5 * b[name])
        assert torch.equal(out[name][96:], s[name][96:])
    assert any("2 more vocabulary rows" in n for n in summary.notes)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 98
    assert torch.isfinite(load_logits(tmp_path / "o")).all()


def test_output_folder_contents(pairs, tmp_path):
    base, sft = pairs("llama")
    merge.merge("slerp", sft=sft, base=base, t=0.3, out=tmp_path / "o", dtype="float16")
    files = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "merge_recipe.yaml", "model.safetensors"} <= files
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert all(t.dtype == torch.float16 for t in load_tensors(tmp_path / "o").values())
    card = (tmp_path / "o" / "README.md").read_text()
    assert "base_model_relation: merge" in card and "share of the base" in card and "spherical" in card
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


def test_recipe_reproduces_the_output_byte_for_byte(pairs, tmp_path):
    base, sft = pairs("llama")
    merge.merge("slerp", sft=sft, base=base, t=0.3, out=tmp_path / "a")
    recipe = merge.Recipe.load(tmp_path / "a" / "merge_recipe.yaml")
    merge.run(recipe, out=tmp_path / "b")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "merge_recipe.yaml").read_text() == (tmp_path / "b" / "merge_recipe.yaml").read_text()


def test_extrapolation_warns(pairs, tmp_path):
    base, sft = pairs("llama")
    with pytest.warns(UserWarning, match="outside"):
        summary = merge.merge("linear", sft=sft, base=base, t=-0.5, out=tmp_path / "o")
    assert summary.warnings


def test_bin_checkpoints_load_with_weights_only(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    b = load_tensors(base)
    (tmp_path / "binbase").mkdir()
    torch.save(b, tmp_path / "binbase" / "pytorch_model.bin")
    (tmp_path / "binbase" / "config.json").write_text((base / "config.json").read_text())
    merge.merge("linear", sft=sft, base=tmp_path / "binbase", t=1.0, out=tmp_path / "o")
    assert all(torch.equal(x, b[n]) for n, x in load_tensors(tmp_path / "o").items())


def test_a_memory_budget_too_small_is_a_one_line_error(pairs, tmp_path):
    from click.testing import CliRunner

    from merge.cli import main

    base, sft = pairs("llama")
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["task-arithmetic", "--base", str(base), "--sft", str(sft), "--scale", "0.7",
                                       "--sparsify", "magnitude", "--density", "0.5", "-o", str(out),
                                       "--memory", "100KB"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--memory 100KB is too small" in result.stderr and "give --memory 1.2MB or more" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_tight_memory_budget_uses_fewer_workers_and_smaller_chunks():
    from merge.execute import fit_memory
    from merge.methods import Slerp
    from merge.plan import Plan, TensorJob

    op = Slerp(("sft0", "base"), t=0.3)
    jobs = [TensorJob(f"w{i}", (4096, 1024), torch.bfloat16, op, 4096 * 1024, "sft0") for i in range(4)]
    plan = Plan(jobs=jobs, shards=[], notes=[])
    roomy = fit_memory(plan, 4, 1 << 20, 512 << 20)
    assert (roomy.threads, roomy.chunk) == (4, 1 << 20) and roomy.host_bytes <= 512 << 20
    fewer = fit_memory(plan, 4, 1 << 20, 40 << 20)
    assert fewer.threads < 4 and fewer.chunk == 1 << 20 and fewer.host_bytes <= 40 << 20
    smaller = fit_memory(plan, 4, 1 << 20, 8 << 20)
    assert smaller.threads == 1 and smaller.chunk < 1 << 20 and smaller.host_bytes <= 8 << 20
