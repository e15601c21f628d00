"""``merge inspect``: its numbers against a direct computation, and what it says about vocab, ties and configs."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import merge
from merge import methods
from merge.cli import main
from tests.helpers import load_tensors


def test_per_tensor_and_per_layer_numbers_match_a_direct_computation(pairs):
    base, sft = pairs("llama")
    report = merge.inspect(str(sft), str(base), t=0.5, chunk_elements=100)  # many chunks per tensor
    b, s = load_tensors(base), load_tensors(sft)
    assert {d.name for d in report.tensors} == set(s)
    for d in report.tensors:
        x, y = s[d.name].double().reshape(-1), b[d.name].double().reshape(-1)
        assert d.rel_delta == pytest.approx(float((x - y).norm() / y.norm()), rel=1e-9)
        assert d.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), rel=1e-9)
        direct = methods.slerp_coefficients(float(x @ y), float(x @ x), float(y @ y), 0.5)
        assert d.slerp.spherical == direct.spherical
    layer1 = next(ld for ld in report.layers if ld.layer == 1)
    attn = [n for n in s if n.startswith("model.layers.1.self_attn.")]
    num = sum(float((s[n].double() - b[n].double()).pow(2).sum()) for n in attn)
    den = sum(float(b[n].double().pow(2).sum()) for n in attn)
    assert layer1.attn == pytest.approx(math.sqrt(num / den), rel=1e-9)
    assert [ld.layer for ld in report.layers] == [0, 1, 2]


def test_small_deltas_take_slerps_linear_branch(pairs):
    base, sft = pairs("llama", scale=0.0005)
    report = merge.inspect(str(sft), str(base), t=0.3)
    assert report.spherical == [] and "0 tensor(s) would take the spherical branch" in report.report()


def test_added_tokens_resized_embeddings_and_config_differences(pairs, tmp_path):
    base, sft = pairs("llama", added_tokens=3)
    report = merge.inspect(str(sft), str(base), plot=tmp_path / "drift.png")
    embed = report.tensor("model.embed_tokens.weight")
    assert embed.compared_rows == 96 and any("model.embed_tokens.weight [96, 32]" in r for r in report.resized)
    assert len(report.added_tokens) == 3
    assert report.config_diff == {"vocab_size": (99, 96)}
    assert report.tied == {"SFT": False, "base": False}
    assert report.dtypes == {"SFT": "bfloat16", "base": "bfloat16"}
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_tied_embeddings_are_reported(pairs):
    base, sft = pairs("gpt2", dtype=torch.float32)
    report = merge.inspect(str(sft), str(base))
    assert report.tied == {"SFT": True, "base": True}
    assert "tied embeddings: SFT yes, base yes" in report.report()


def test_cli_inspect_prints_the_table_and_writes_nothing_else(pairs, tmp_path):
    base, sft = pairs("llama")
    before = sorted(p.name for p in sft.iterdir())
    result = CliRunner().invoke(main, ["inspect", "--sft", str(sft), "--base", str(base), "--t", "0.3"])
    assert result.exit_code == 0, result.output
    assert "per-layer drift" in result.output and "slerp at t=0.3" in result.output
    assert sorted(p.name for p in sft.iterdir()) == before
    missing = CliRunner().invoke(main, ["inspect", "--sft", str(tmp_path / "nope"), "--base", str(base)])
    assert missing.exit_code == 2 and missing.output.startswith("error: ") and "nope" in missing.output


def test_inspect_predicts_exactly_the_branch_and_angle_the_merge_takes(tmp_path):
    """inspect computes SLERP statistics with the merge's kernel function, on one intra-op thread like the
    executor's workers, so its prediction is the merge's to the bit, also near the |cos| threshold (a tensor
    of several 2**17-element blocks, |cos| = 0.99955 against the threshold 0.9995)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(600, 1000, generator=g)
    for name, w in (("base", base), ("sft", base + 0.03 * torch.randn(600, 1000, generator=g))):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": w}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    predicted = merge.inspect(str(tmp_path / "sft"), str(tmp_path / "base"), t=0.3).tensors[0].slerp
    summary = merge.merge("slerp", sft=tmp_path / "sft", base=tmp_path / "base", t=0.3, out=tmp_path / "o")
    assert abs(math.cos(math.radians(predicted.angle)) - 0.9995) < 1e-4
    assert (summary.spherical, summary.max_angle) == (int(predicted.spherical), predicted.angle)
