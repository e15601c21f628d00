"""Quantised inputs: FP8 block-scaled checkpoints are dequantised on read and merged in float32; every other
quantised format is refused with one line before any tensor is read."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from merge.cli import main
from merge.options import Options
from tests.helpers import load_logits, load_tensors

BLOCK = [12, 12]  # tiny Llama shapes (32, 16, 64) are not multiples of it: partial blocks at the edges


def fp8_quantise(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantisation: scale_inv = amax(|block|)/448, code = W/scale_inv as float8_e4m3fn."""
    b0, b1 = block
    rows, cols = w.shape
    r, c = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(r * b0, c * b1)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(r, b0, c, b1)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    codes = (blocks / scale[:, None, :, None]).reshape(r * b0, c * b1)[:rows, :cols]
    return codes.to(torch.float8_e4m3fn).contiguous(), scale


def fp8_dequantise(codes: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """Reference dequantisation through padded blocks: W[i, j] = code[i, j] * scale_inv[i // b0, j // b1]."""
    b0, b1 = block
    rows, cols = codes.shape
    r, c = scale.shape
    padded = torch.zeros(r * b0, c * b1)
    padded[:rows, :cols] = codes.float()
    return (padded.reshape(r, b0, c, b1) * scale[:, None, :, None]).reshape(r * b0, c * b1)[:rows, :cols]


def quantisable(name: str, w: torch.Tensor) -> bool:
    return w.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name


def to_fp8(src: Path, dst: Path, block=BLOCK) -> Path:
    """``src`` saved as an FP8 block-scaled checkpoint (DeepSeek-V3 layout) with its quantization_config."""
    dst.mkdir(parents=True)
    out = {}
    for name, w in load_file(src / "model.safetensors").items():
        if quantisable(name, w):
            out[name], out[f"{name}_scale_inv"] = fp8_quantise(w, block)
        else:
            out[name] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def float_view(folder: Path, block=BLOCK) -> dict[str, torch.Tensor]:
    """What an FP8 folder stands for, in float32 (other tensors as float32 too)."""
    raw = load_file(folder / "model.safetensors")
    return {n: (fp8_dequantise(w, raw[f"{n}_scale_inv"], block) if f"{n}_scale_inv" in raw else w.float())
            for n, w in raw.items() if not n.endswith("_scale_inv")}


@pytest.fixture(scope="module")
def fp8(pairs, tmp_path_factory):
    base, sft = pairs("llama")
    root = tmp_path_factory.mktemp("fp8")
    return {"base": base, "sft": sft, "fp8_base": to_fp8(base, root / "base"), "fp8_sft": to_fp8(sft, root / "sft"),
            "fp8_base_16x24": to_fp8(base, root / "base16x24", [16, 24])}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_dequantising_view_of_any_range_equals_the_reference(fp8):
    from merge.io.quantized import DequantisedCheckpoint, open_checkpoint

    ref = float_view(fp8["fp8_base_16x24"], [16, 24])
    with open_checkpoint(fp8["fp8_base_16x24"], "base") as model:
        assert isinstance(model, DequantisedCheckpoint) and model.quantisation.block == (16, 24)
        assert not any(n.endswith("_scale_inv") for n in model.names()) and "quantization_config" not in model.config
        name = "model.layers.0.mlp.down_proj.weight"  # [32, 64]: 2 x 3 blocks, the last column block partial
        assert model.info(name).dtype == torch.bfloat16
        flat = ref[name].reshape(-1)
        for start, stop in [(0, None), (5, 70), (63, 65), (500, 1500), (1000, 2048), (2047, 2048)]:
            got = model.view(name, start, stop)
            assert got.dtype == torch.float32 and torch.equal(got, flat[start:stop]), (start, stop)


@pytest.mark.parametrize("sides", ["base", "both"])
@pytest.mark.parametrize("t, chunk", [(0.0, None), (0.3, None), (0.3, 100), (0.7, 777), (1.0, None)])
def test_linear_dequantises_fp8_and_merges_in_float32(fp8, tmp_path, sides, t, chunk):
    base = fp8["fp8_base"]
    sft = fp8["fp8_sft"] if sides == "both" else fp8["sft"]
    summary = merge.merge("linear", sft=sft, base=base, t=t, out=tmp_path / "o",
                          options=Options.of(chunk_elements=chunk))
    b = float_view(base)
    s = float_view(sft) if sides == "both" else {n: w.float() for n, w in load_file(sft / "model.safetensors").items()}
    out = load_tensors(tmp_path / "o")
    assert set(out) == set(s) and not any(n.endswith("_scale_inv") for n in out)
    quantised = 0
    for name in s:
        expected = (s[name] * (1 - t) + b[name] * t).to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected), name
        quantised += name in load_file(base / "model.safetensors") and f"{name}_scale_inv" in load_file(
            base / "model.safetensors")
    assert quantised > 0
    assert any("FP8 block-scaled (12x12)" in n and "dequantised on read" in n for n in summary.notes)
    assert any("without quantization_config" in n for n in summary.notes)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype" if "dtype" in config else "torch_dtype"] == "bfloat16"


def test_fp8_merge_matches_the_raw_codes_bug_fails(fp8, tmp_path):
    """The reported bug: interpolating codes and scales separately is far off; dequantising first is exact."""
    merge.merge("linear", sft=fp8["fp8_sft"], base=fp8["fp8_base"], t=0.5, out=tmp_path / "o")
    out = load_tensors(tmp_path / "o")
    b, s = float_view(fp8["fp8_base"]), float_view(fp8["fp8_sft"])
    name = "model.layers.0.mlp.down_proj.weight"
    expected = (s[name] * 0.5 + b[name] * 0.5)
    rel = (out[name].float() - expected).norm() / expected.norm()
    assert rel < 0.01


@pytest.mark.parametrize("method, kwargs", [("slerp", {"t": 0.15}), ("slerp", {"t": 0.8}),
                                            ("task_arithmetic", {"scale": 0.6}), ("task_arithmetic", {"scale": 1.5}),
                                            ("task_arithmetic", {"scale": 0.5, "sparsify": "magnitude",
                                                                 "density": 0.3})])
@pytest.mark.parametrize("sides", ["base", "both"])
def test_methods_on_fp8_equal_the_same_merge_of_dequantised_float32_files(fp8, tmp_path, method, kwargs, sides):
    """Dequantising on read gives byte for byte the merge of checkpoints holding the dequantised floats."""
    def float32_copy(folder, name):
        dst = tmp_path / name
        dst.mkdir()
        save_file({n: w.contiguous() for n, w in float_view(folder).items()}, dst / "model.safetensors",
                  metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(config))
        return dst

    base = fp8["fp8_base"]
    sft = fp8["fp8_sft"] if sides == "both" else fp8["sft"]
    ref_base = float32_copy(base, "ref_base")
    ref_sft = float32_copy(sft, "ref_sft") if sides == "both" else sft
    merge.merge(method, sft=sft, base=base, out=tmp_path / "q", dtype="bfloat16", **kwargs)
    merge.merge(method, sft=ref_sft, base=ref_base, out=tmp_path / "r", dtype="bfloat16", **kwargs)
    q, r = load_tensors(tmp_path / "q"), load_tensors(tmp_path / "r")
    assert set(q) == set(r)
    for name in r:
        assert torch.equal(q[name], r[name]), name


def test_task_arithmetic_on_fp8_base_equals_direct_computation(fp8, tmp_path):
    merge.merge("task_arithmetic", sft=[fp8["sft"]], base=fp8["fp8_base_16x24"], scale=0.6, out=tmp_path / "o")
    b = float_view(fp8["fp8_base_16x24"], [16, 24])
    s = {n: w.float() for n, w in load_file(fp8["sft"] / "model.safetensors").items()}
    out = load_tensors(tmp_path / "o")
    for name in s:
        assert torch.equal(out[name], torch.add(b[name], s[name] - b[name], alpha=0.6).to(torch.bfloat16)), name


def test_output_of_fp8_inputs_loads_in_transformers(fp8, tmp_path):
    result = run_cli("slerp", "--sft", fp8["fp8_sft"], "--base", fp8["fp8_base"], "--t", "0.3", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "dequantised on read" in result.output
    logits = load_logits(tmp_path / "o")
    assert torch.isfinite(logits).all()


def test_inspect_reports_fp8_quantisation(fp8):
    report = merge.inspect(fp8["sft"], fp8["fp8_base"], t=0.5)
    text = report.report()
    assert "base: FP8 block-scaled (12x12), dequantised on read" in text
    assert "SFT: FP8" not in text
    result = run_cli("inspect", "--sft", fp8["fp8_sft"], "--base", fp8["base"])
    assert result.exit_code == 0, result.output
    assert "SFT: FP8 block-scaled (12x12), dequantised on read" in result.output


def test_lora_adapter_over_fp8_base_uses_the_dequantised_base(fp8, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp8["base"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    merge.merge("linear", sft=tmp_path / "adapter", base=fp8["fp8_base"], t=0.25, out=tmp_path / "o")
    out = load_tensors(tmp_path / "o")
    b = float_view(fp8["fp8_base"])
    name = "model.layers.1.self_attn.q_proj.weight"
    key = "base_model.model." + name.replace(".weight", "")
    delta = adapter[f"{key}.lora_B.weight"].float() @ adapter[f"{key}.lora_A.weight"].float() * 2.0
    expected = (b[name] + delta) * 0.75 + b[name] * 0.25
    torch.testing.assert_close(out[name].float(), expected, rtol=1e-2, atol=1e-3)
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())


def _with_config(src: Path, dst: Path, qc: dict | None) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    if qc is not None:
        config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _with_tensor(src: Path, dst: Path, name: str, tensor: torch.Tensor) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensor
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("qc, needle", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
    ({"quant_method": "awq", "bits": 4}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"load_in_8bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ({"quant_method": "hqq"}, "HQQ"),
    ({"quant_method": "somethingnew"}, "somethingnew"),
])
@pytest.mark.parametrize("side", ["--sft", "--base"])
def test_other_quantisation_methods_are_refused_by_config(pairs, tmp_path, qc, needle, side):
    base, sft = pairs("llama")
    bad = _with_config(sft if side == "--sft" else base, tmp_path / "bad", qc)
    good = base if side == "--sft" else sft
    other = "--base" if side == "--sft" else "--sft"
    result = run_cli("linear", side, bad, other, good, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, needle, str(bad), "dequantise")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tensor, needle", [
    ("model.layers.0.self_attn.q_proj.qweight", "GPTQ/AWQ"),
    ("model.layers.0.self_attn.q_proj.g_idx", "GPTQ"),
    ("model.layers.0.mlp.up_proj.weight.absmax", "bitsandbytes"),
    ("model.layers.0.mlp.up_proj.weight.quant_map", "bitsandbytes"),
    ("model.layers.0.mlp.up_proj.weight_packed", "compressed-tensors"),
])
def test_quantised_tensor_names_are_refused(pairs, tmp_path, tensor, needle):
    base, sft = pairs("llama")
    bad = _with_tensor(sft, tmp_path / "bad", tensor, torch.zeros(4, dtype=torch.int32))
    result = run_cli("slerp", "--sft", bad, "--base", base, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, needle, tensor, "dequantise")
    assert not (tmp_path / "o").exists()


def test_gguf_is_refused(pairs, tmp_path):
    base, _ = pairs("llama")
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    result = run_cli("linear", "--sft", folder, "--base", base, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, "GGUF", "safetensors")
    result = run_cli("linear", "--sft", folder / "model-Q4_K_M.gguf", "--base", base, "--t", "0.5",
                     "-o", tmp_path / "o")
    assert_one_line_error(result, "GGUF")
    assert not (tmp_path / "o").exists()


def test_inconsistent_fp8_checkpoints_are_refused(fp8, tmp_path):
    no_block = _with_config(fp8["fp8_base"], tmp_path / "noblock", {"quant_method": "fp8"})
    result = run_cli("linear", "--sft", fp8["sft"], "--base", no_block, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, "weight_block_size")
    wrong_block = _with_config(fp8["fp8_base"], tmp_path / "wrong", {"quant_method": "fp8",
                                                                      "weight_block_size": [8, 8]})
    result = run_cli("linear", "--sft", fp8["sft"], "--base", wrong_block, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, "_scale_inv", "weight_block_size [8, 8]")
    no_scales = _with_config(fp8["base"], tmp_path / "noscales", {"quant_method": "fp8",
                                                                  "weight_block_size": [12, 12]})
    result = run_cli("linear", "--sft", fp8["sft"], "--base", no_scales, "--t", "0.5", "-o", tmp_path / "o")
    assert_one_line_error(result, "quantization_config", "_scale_inv")
    assert not (tmp_path / "o").exists()


def _reference_fp8(w: torch.Tensor, block):
    """The brief's re-quantisation of a float32 merge: scale_inv = amax/448 per block, code = W/scale_inv."""
    b0, b1 = block
    rows, cols = w.shape
    r, c = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(r * b0, c * b1)
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(r, b0, c, b1).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    per = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    return (w / per).clamp(-448, 448).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("sides, chunk", [("base", None), ("base", 100), ("both", 333)])
def test_dtype_fp8_writes_block_scaled_fp8_back(fp8, tmp_path, sides, chunk):
    from merge.io.quantized import DequantisedCheckpoint, open_checkpoint

    base = fp8["fp8_base"]
    sft = fp8["fp8_sft"] if sides == "both" else fp8["sft"]
    summary = merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "o", dtype="fp8",
                          options=Options.of(chunk_elements=chunk))
    assert any("--dtype fp8" in n and "FP8 block-scaled (12x12)" in n for n in summary.notes)
    b = float_view(base)
    s = float_view(sft) if sides == "both" else {n: w.float() for n, w in load_file(sft / "model.safetensors").items()}
    raw_in = load_file(base / "model.safetensors")
    out = load_tensors(tmp_path / "o")
    assert set(out) == set(raw_in)  # the same layout: codes and their scales, nothing else
    for name in s:
        merged = s[name] * 0.7 + b[name] * 0.3
        if f"{name}_scale_inv" not in raw_in:
            assert torch.equal(out[name], merged.to(torch.bfloat16)), name
            continue
        codes, scale = _reference_fp8(merged, BLOCK)
        assert out[name].dtype == torch.float8_e4m3fn and out[f"{name}_scale_inv"].dtype == torch.float32
        assert out[f"{name}_scale_inv"].shape == raw_in[f"{name}_scale_inv"].shape
        assert torch.equal(out[f"{name}_scale_inv"], scale), name
        assert torch.equal(out[name].view(torch.uint8), codes.view(torch.uint8)), name
        again = fp8_dequantise(out[name], out[f"{name}_scale_inv"], BLOCK)
        per = scale.repeat_interleave(12, 0).repeat_interleave(12, 1)[:merged.shape[0], :merged.shape[1]]
        assert torch.all((again - merged).abs() <= merged.abs() / 16 + per * 2.0 ** -9), name
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == BLOCK
    with open_checkpoint(tmp_path / "o", "out") as model:
        assert isinstance(model, DequantisedCheckpoint)
        assert set(model.quantisation.scales) == {n for n in raw_in if f"{n}_scale_inv" in raw_in}


def test_dtype_fp8_bytes_do_not_depend_on_chunks_threads_or_shards(fp8, tmp_path):
    args = dict(sft=fp8["sft"], base=fp8["fp8_base_16x24"], t=0.4, dtype="fp8")
    merge.merge("slerp", out=tmp_path / "a", **args,
                options=Options.of(threads=1))
    merge.merge("slerp", out=tmp_path / "b", max_shard_size="8KB", **args,
                options=Options.of(threads=3, chunk_elements=250))
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 2
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    assert any(n.endswith("_scale_inv") and a[n].shape == (2, 3) for n in a)  # [32, 64] in 16x24 blocks


def test_dtype_fp8_of_float_inputs_uses_128_blocks(pairs, tmp_path):
    base, sft = pairs("llama")
    result = run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "--dtype", "fp8", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    out = load_tensors(tmp_path / "o")
    src = load_file(sft / "model.safetensors")
    quantised = {n for n in out if n.endswith("_scale_inv")}
    assert quantised == {f"{n}_scale_inv" for n, w in src.items() if quantisable(n, w)}
    assert all(out[n].shape == (1, 1) for n in quantised)  # tiny shapes fit in one 128x128 block
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]


def test_dtype_fp8_on_a_mergekit_recipe_is_refused(pairs, tmp_path):
    base, sft = pairs("llama")
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: "
                      f"{{weight: 0.5}}\n  - model: {sft}\n    parameters: {{weight: 0.5}}\n")
    result = run_cli("run", recipe, "--dtype", "fp8", "-o", tmp_path / "o")
    assert_one_line_error(result, "--dtype fp8", "merge convert")
    assert not (tmp_path / "o").exists()


def test_dtype_fp8_output_loads_in_transformers(fp8, tmp_path):
    """transformers reads our FP8 output (dequantising on CPU, which needs shapes divisible by the block)."""
    from transformers import AutoModelForCausalLM

    base16 = to_fp8(fp8["base"], tmp_path / "base16", [16, 16])
    merge.merge("linear", sft=fp8["sft"], base=base16, t=0.3, out=tmp_path / "o", dtype="fp8")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    out = load_tensors(tmp_path / "o")
    name = "model.layers.1.mlp.down_proj.weight"
    ours = fp8_dequantise(out[name], out[f"{name}_scale_inv"], [16, 16])
    torch.testing.assert_close(model.get_parameter(name).float(), ours, rtol=1e-2, atol=1e-4)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()


def test_sweep_over_an_fp8_base(fp8, tmp_path):
    from tests.test_sweep import _probes

    general, domain = _probes(tmp_path)
    result = merge.sweep(str(fp8["sft"]), str(fp8["fp8_base"]), domain, general, out=tmp_path / "o", t_values=[0.5])
    assert [c.t for c in result.rows] == [0.0, 0.5, 1.0]
    assert all(0 < c.general.bpb < 100 for c in result.rows)
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())
