"""Adapters out: `merge extract-lora` and `merge linear --as-adapter`, checked by loading the result with PEFT."""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import merge
from merge.cli import main
from tests.checkpoints import make_model, make_pair
from tests.helpers import load_tensors
from tests.test_hub import hub_models  # noqa: F401  (a fixture: base and SFT repos on the local test Hub)

PREFIX = "base_model.model."


def _cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _peft_merged(base, adapter, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """PEFT's own view of the adapter: the base loaded with transformers, the adapter applied and merged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _rank_r(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation, straight from torch's exact SVD."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _targeted(name: str) -> bool:
    return name.endswith(".weight") and any(k in name for k in ("_proj", "c_attn", "c_fc", "c_proj"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_r_adapter_merges_to_the_rank_r_reconstruction(pairs, tmp_path, arch):
    base, sft = pairs(arch, torch.float32)
    summary = merge.extract_lora(sft, base, tmp_path / "ad", rank=3, alpha=6, svd="exact")
    merged, b, s = _peft_merged(base, tmp_path / "ad"), load_tensors(base), load_tensors(sft)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 3, 6, "CAUSAL_LM")
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["base_model_name_or_path"] == str(base)
    factored = 0
    for name, w in b.items():
        if _targeted(name):
            conv1d = arch == "gpt2"
            delta = (s[name] - w).T if conv1d else s[name] - w
            approx = _rank_r(delta, 3)
            expected = w.double() + (approx.T if conv1d else approx)
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=2e-6, msg=name)
            assert not torch.allclose(merged[name], s[name], atol=1e-4), name  # rank 3 is not the whole delta
            factored += 1
        else:  # norms, embeddings, biases: exactly the SFT's (saved whole, or lora_bias)
            torch.testing.assert_close(merged[name], s[name], rtol=0, atol=1e-7, msg=name)
    assert factored == len(summary.tensors) - len([c for c in summary.tensors if c.how != "lora"]) > 0
    share = {c.name: c.captured for c in summary.tensors if c.how == "lora"}
    some = next(iter(share))
    delta = s[some] - b[some]
    sv = torch.linalg.svdvals(delta.double())
    assert share[some] == pytest.approx(float(sv[:3].norm() / sv.norm()), rel=1e-5)
    assert "captured share" in summary.report() and "every changed tensor is in the adapter" in summary.report()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_adapter_is_the_sft(pairs, tmp_path, arch):
    base, sft = pairs(arch, torch.float32)
    result = _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 32, "-o", tmp_path / "ad")
    assert result.exit_code == 0, result.output
    merged, s = _peft_merged(base, tmp_path / "ad"), load_tensors(sft)
    for name, w in s.items():
        torch.testing.assert_close(merged[name], w, rtol=1e-5, atol=1e-6, msg=name)
    if arch == "gpt2":  # tied: the output layer follows the SFT's embeddings
        torch.testing.assert_close(merged["lm_head.weight"], s["transformer.wte.weight"], rtol=0, atol=0)
    assert "min 1.0000" in result.output
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        ".mergeback-output.json", "adapter_config.json", "adapter_model.safetensors"]


def test_bfloat16_pair_within_bfloat16_rounding(pairs, tmp_path):
    base, sft = pairs("llama", torch.bfloat16)
    merge.extract_lora(sft, base, tmp_path / "ad", rank=32)
    weights = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    merged, s = _peft_merged(base, tmp_path / "ad"), load_tensors(sft)
    for name, w in s.items():  # factors rounded to bfloat16: error ~ 2^-8 of the delta (entries ~0.02)
        torch.testing.assert_close(merged[name], w.float(), rtol=0, atol=1e-3, msg=name)


def test_modules_to_save_round_trip_with_peft_key_names(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    summary = merge.extract_lora(sft, base, tmp_path / "ad", rank=2, target_modules=["q_proj", "v_proj"])
    weights, s = load_file(tmp_path / "ad" / "adapter_model.safetensors"), load_tensors(sft)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert {"lm_head", "embed_tokens"} <= set(config["modules_to_save"])
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(weights[PREFIX + name], s[name]), name
    assert weights[PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert weights[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    assert not any("k_proj" in k for k in weights)
    # what the chosen targets leave out is reported (error 1 for those kinds' untargeted tensors), not refused
    missed = {c.name for c in summary.uncaptured}
    assert "model.layers.0.self_attn.k_proj.weight" in missed and "model.layers.0.mlp.up_proj.weight" in missed
    assert summary.kind_errors()["mlp"] == pytest.approx(1.0)
    assert "NOT captured" in summary.report()
    merged = _peft_merged(base, tmp_path / "ad")
    assert torch.equal(merged["lm_head.weight"], s["lm_head.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], load_tensors(base)[
        "model.layers.0.self_attn.k_proj.weight"])


def test_changed_tensors_the_adapter_cannot_hold_are_refused_by_name(tmp_path):
    # Qwen2: q/k/v have biases, o_proj has none, so PEFT's lora_bias (one switch for all targets) is impossible
    base, sft = make_pair(tmp_path, "qwen2", torch.float32)
    result = _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 2, "-o", tmp_path / "ad")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "q_proj.bias" in result.output and "--allow-uncaptured" in result.output
    assert not (tmp_path / "ad").exists()
    summary = merge.extract_lora(sft, base, tmp_path / "ad", rank=2, allow_uncaptured=True)
    assert summary.kind_errors()["bias"] == pytest.approx(1.0)
    assert {c.name for c in summary.uncaptured} == {f"model.layers.{i}.self_attn.{p}_proj.bias"
                                                    for i in range(2) for p in "qkv"}
    _peft_merged(base, tmp_path / "ad")  # loads


def test_gpt2_biases_go_into_lora_bias(pairs, tmp_path):
    base, sft = pairs("gpt2", torch.float32)
    merge.extract_lora(sft, base, tmp_path / "ad", rank=1, alpha=4)
    weights, b, s = load_file(tmp_path / "ad" / "adapter_model.safetensors"), load_tensors(base), load_tensors(sft)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_bias"] is True
    name = "transformer.h.0.attn.c_attn"
    torch.testing.assert_close(weights[f"{PREFIX}{name}.lora_B.bias"] * (4 / 1),
                               s[f"{name}.bias"] - b[f"{name}.bias"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args, words", [
    (["--rank", 0], "--rank 0"),
    (["--rank", -3], "--rank -3"),
    (["--rank", 2, "--alpha", 0], "--alpha"),
    (["--rank", 2, "--target-modules", "input_layernorm"], "not 2-D"),
    (["--rank", 2, "--target-modules", "embed_tokens"], "modules_to_save"),
    (["--rank", 2, "--target-modules", "no_such_proj"], "no module"),
])
def test_bad_options_are_one_line_exit_2(pairs, tmp_path, args, words):
    base, sft = pairs("llama", torch.float32)
    result = _cli("extract-lora", "--sft", sft, "--base", base, *args, "-o", tmp_path / "ad")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("error:") and words in result.output
    assert not (tmp_path / "ad").exists() and list(tmp_path.iterdir()) == []


def test_output_folder_follows_the_merge_safety_rules(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for out in (foreign, sft, sft / "inner"):
        result = _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 2, "-o", out)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (sft / "inner").exists()
    assert _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 2, "-o", tmp_path / "ad").exit_code == 0
    again = _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 2, "-o", tmp_path / "ad")
    assert again.exit_code == 2 and "--force" in again.output
    assert _cli("extract-lora", "--sft", sft, "--base", base, "--rank", 1, "-o", tmp_path / "ad",
                "--force").exit_code == 0
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 1


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    """A float32 Llama base and a trained-looking rsLoRA adapter with a rank pattern, an embedding LoRA and a
    saved lm_head."""
    root = tmp_path_factory.mktemp("as-adapter")
    base, _ = make_pair(root, "llama", torch.float32)
    model = get_peft_model(make_model("llama", 0, torch.float32), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2},
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def test_as_adapter_equals_merge_linear(lora_sft, tmp_path):
    base, adapter = lora_sft
    full = _cli("linear", "--sft", adapter, "--base", base, "--t", 0.3, "-o", tmp_path / "full")
    small = _cli("linear", "--sft", adapter, "--base", base, "--t", 0.3, "--as-adapter", "-o", tmp_path / "small")
    assert full.exit_code == 0 and small.exit_code == 0, full.output + small.output
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == [
        ".mergeback-output.json", "adapter_config.json", "adapter_model.safetensors"]
    expected, merged = load_tensors(tmp_path / "full"), _peft_merged(base, tmp_path / "small")
    assert expected.keys() == merged.keys()
    for name, w in expected.items():
        torch.testing.assert_close(merged[name], w, rtol=1e-5, atol=2e-6, msg=name)
    # not a no-op: it differs from the adapter itself (t=0)
    original = _peft_merged(base, adapter)
    assert not torch.allclose(original["lm_head.weight"], merged["lm_head.weight"])
    assert not torch.allclose(original["model.layers.0.self_attn.q_proj.weight"],
                              merged["model.layers.0.self_attn.q_proj.weight"])
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"layers.1.self_attn.q_proj": 2} and config["use_rslora"] is True
    small_bytes = (tmp_path / "small" / "adapter_model.safetensors").stat().st_size
    assert small_bytes < (tmp_path / "full" / "model.safetensors").stat().st_size


def test_as_adapter_refusals_are_one_line_exit_2(lora_sft, pairs, tmp_path):
    base, adapter = lora_sft
    _, full_sft = pairs("llama", torch.float32)
    cases = [
        (["slerp", "--sft", adapter, "--base", base, "--t", 0.3, "--as-adapter"], "not a rescaling"),
        (["linear", "--sft", adapter, "--base", base, "--t", 0.3, "--as-adapter", "--dtype", "bfloat16"],
         "--dtype has no effect"),
        (["linear", "--sft", full_sft, "--base", base, "--t", 0.3, "--as-adapter"], "not a LoRA adapter"),
    ]
    for args, words in cases:
        result = _cli(*args, "-o", tmp_path / "o")
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert words in result.output, result.output
        assert not (tmp_path / "o").exists()


def test_as_adapter_refuses_dora_unless_t_is_0(pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    model = get_peft_model(make_model("llama", 0, torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "dora")
    result = _cli("linear", "--sft", tmp_path / "dora", "--base", base, "--t", 0.5, "--as-adapter", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "DoRA" in result.output and not (tmp_path / "o").exists()
    assert _cli("linear", "--sft", tmp_path / "dora", "--base", base, "--t", 0, "--as-adapter",
                "-o", tmp_path / "o").exit_code == 0
    assert torch.equal(load_file(tmp_path / "o" / "adapter_model.safetensors")[
        PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
        load_file(tmp_path / "dora" / "adapter_model.safetensors")[
        PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector"])


def test_extracting_a_lora_sft_at_its_rank_reproduces_it(lora_sft, tmp_path):
    base, adapter = lora_sft  # LoRA SFT read through merge.io.lora: its deltas have rank <= 4
    summary = merge.extract_lora(adapter, base, tmp_path / "ad", rank=4, svd="exact")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"lm_head", "embed_tokens"}  # unchanged norms are not saved
    weights = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert not any("norm" in k for k in weights)
    untouched = weights[PREFIX + "model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert torch.count_nonzero(untouched) == 0  # no delta: zero factors
    expected, merged = _peft_merged(base, adapter), _peft_merged(base, tmp_path / "ad")
    for name, w in expected.items():
        torch.testing.assert_close(merged[name], w, rtol=1e-5, atol=2e-6, msg=name)
    assert min(c.captured for c in summary.tensors) == pytest.approx(1.0, abs=1e-5)


def test_a_hub_base_is_recorded_by_its_id_and_revision(hub_models, tmp_path):  # noqa: F811
    merge.extract_lora(hub_models.sft, f"{hub_models.base_id}@v1", tmp_path / "ad", rank=2)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (hub_models.base_id, hub_models.first)


def test_a_non_finite_input_is_named(pairs, clean_copy, tmp_path):
    from safetensors.torch import save_file

    base, sft = pairs("llama", torch.float32)
    bad = clean_copy(sft, "bad-sft")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    result = _cli("extract-lora", "--sft", bad, "--base", base, "--rank", 2, "-o", tmp_path / "ad")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "model.layers.1.mlp.up_proj.weight holds NaN" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-sft"]  # no adapter, staging or lock left
