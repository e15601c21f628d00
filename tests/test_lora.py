"""LoRA/DoRA adapters as the SFT side: checked tensor by tensor against PEFT's own merge_and_unload."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import merge
from merge.cli import main
from merge.io.lora import LoraAdapter
from merge.methods.reference import slerp as slerp_fn
from merge.options import Options
from tests.checkpoints import make_model
from tests.helpers import load_logits, load_tensors

ARCH = {"plain": "llama", "rslora": "llama", "dora": "llama", "gpt2": "gpt2", "bias": "qwen2"}
CONFIGS = {
    "plain": dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "rslora": dict(target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True,
                   rank_pattern={"layers.1.self_attn.q_proj": 2}),
    "dora": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "bias": dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
}


def _train(peft_model, seed: int) -> None:
    """Stand-in for training: random non-zero B (init_lora_weights=False) plus nudged DoRA magnitudes,
    lora biases and saved modules, so that every part of the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("lora_magnitude_vector", "modules_to_save", "lora_B.default.bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="session")
def adapters(pairs, tmp_path_factory):
    """kind -> (base folder, adapter folder, PEFT's merged state dict, PEFT's merged model)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            arch = ARCH[kind]
            base, _ = pairs(arch, torch.float32)
            folder = tmp_path_factory.mktemp(f"lora-{kind}")
            model = get_peft_model(make_model(arch, 0, torch.float32),
                                   LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CONFIGS[kind]))
            _train(model, 1)
            model.save_pretrained(folder)
            merged = PeftModel.from_pretrained(make_model(arch, 0, torch.float32), folder).merge_and_unload()
            cache[kind] = (base, folder, merged.state_dict(), merged)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fold_equals_peft_merge_and_unload(adapters, tmp_path, kind):
    base, folder, reference, _ = adapters(kind)
    summary = merge.fold(folder, base, tmp_path / "o")
    out, base_tensors = load_tensors(tmp_path / "o"), load_tensors(base)
    assert out.keys() == base_tensors.keys()
    changed = 0
    for name, tensor in out.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=2e-6, msg=name)
        changed += not torch.equal(tensor, base_tensors[name])
    adapter = LoraAdapter(folder, base)
    assert changed == sum(adapter.changes(n) for n in out) > 0
    assert "adapter" in summary.report()


@pytest.mark.parametrize("kind", ["plain", "gpt2", "dora"])
def test_folded_model_loads_with_peft_merged_logits(adapters, tmp_path, kind):
    base, folder, _, merged = adapters(kind)
    merge.fold(folder, base, tmp_path / "o")
    with torch.no_grad():
        expected = merged(torch.arange(8).unsqueeze(0)).logits
    torch.testing.assert_close(load_logits(tmp_path / "o"), expected, rtol=1e-4, atol=1e-5)


def test_linear_task_arithmetic_and_slerp_follow_the_formulas(adapters, tmp_path):
    base, folder, reference, _ = adapters("plain")
    lin = merge.merge("linear", sft=folder, base=base, t=0.3, out=tmp_path / "lin")
    merge.merge("task_arithmetic", sft=folder, base=base, scale=1.5, out=tmp_path / "ta")
    merge.merge("slerp", sft=folder, base=base, t=0.4, out=tmp_path / "sl")
    b = load_tensors(base)
    outs = {k: load_tensors(tmp_path / k) for k in ("lin", "ta", "sl")}
    for name, w in b.items():
        delta = reference[name] - w  # = s * B@A for targeted tensors, the saved module minus base for lm_head
        torch.testing.assert_close(outs["lin"][name], w + 0.7 * delta, rtol=1e-5, atol=2e-6, msg=name)
        torch.testing.assert_close(outs["ta"][name], w + 1.5 * delta, rtol=1e-5, atol=3e-6, msg=name)
        expected, _ = slerp_fn(reference[name].double().reshape(-1), w.double().reshape(-1), 0.4)
        torch.testing.assert_close(outs["sl"][name].reshape(-1), expected.float(), rtol=1e-5, atol=2e-6, msg=name)
        if not torch.equal(reference[name], w):
            continue
        for out in outs.values():  # untargeted: the base's own bytes, copied without arithmetic
            assert torch.equal(out[name], w), name
    assert lin.tensors["copy"] == sum(torch.equal(reference[n], w) for n, w in b.items())
    assert any("exactly W_base + (1-t)*s*B@A" in n for n in lin.notes)


def test_output_is_independent_of_chunking_and_threads(adapters, tmp_path):
    base, folder, _, _ = adapters("dora")
    merge.merge("linear", sft=folder, base=base, t=0.25, out=tmp_path / "a", options=Options.of(threads=1))
    merge.merge("linear", sft=folder, base=base, t=0.25, out=tmp_path / "b",
                options=Options.of(threads=3, chunk_elements=100))
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_adapter_properties(adapters):
    base, folder, _, _ = adapters("rslora")
    adapter = LoraAdapter(folder, base)
    assert (adapter.r, adapter.lora_alpha, adapter.use_rslora) == (4, 8, True)
    assert adapter.scale == 4.0  # alpha / sqrt(r)
    assert adapter.targets["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2 ** 0.5)
    assert adapter.base_model_name_or_path is None and adapter.modules_to_save == []
    adapter.close()


def _cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_adapter_that_does_not_fit_the_base_is_one_line_exit_2(pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    get_peft_model(other, LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "ad")
    result = _cli("linear", "--sft", tmp_path / "ad", "--base", base, "--t", 0.3, "-o", tmp_path / "o")
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "down_proj" in message and "does not fit" in message, message
    assert not (tmp_path / "o").exists()


def test_unsupported_adapter_types_are_named(pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    model = get_peft_model(make_model("llama", 0, torch.float32),
                           IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    result = _cli("fold", "--adapter", tmp_path / "ia3", "--base", base, "-o", tmp_path / "o")
    assert result.exit_code == 2 and "peft_type IA3 is not supported" in result.output
    result = _cli("fold", "--adapter", base, "--base", base, "-o", tmp_path / "o")
    assert result.exit_code == 2 and "no adapter_config.json" in result.output
    assert not (tmp_path / "o").exists()


def test_fold_cli_writes_the_merged_model(adapters, tmp_path):
    base, folder, reference, _ = adapters("bias")
    result = _cli("fold", "--adapter", folder, "--base", base, "-o", tmp_path / "o", "-q")
    assert result.exit_code == 0, result.output
    out = load_tensors(tmp_path / "o")
    bias = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(out[bias], reference[bias], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_type"] == "qwen2"
    assert (tmp_path / "o" / "tokenizer.json").is_file()  # the base's, since the adapter has none
