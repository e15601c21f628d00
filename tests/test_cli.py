"""The `merge` command line: help texts, one-line errors with exit code 2, and an untouched OUT on failure."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merge.cli import main
from tests.helpers import load_tensors


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_help_states_formula_and_t_convention():
    out = run_cli("--help").output
    assert "share of the BASE" in out
    assert "(1-t)*W_sft + t*W_base" in run_cli("linear", "--help").output
    assert "t=0 keeps the SFT" in run_cli("slerp", "--help").output
    assert "sparsify(W_sft_i - W_base)" in run_cli("task-arithmetic", "--help").output


def test_console_script_version():
    exe = Path(sys.executable).with_name("merge")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert "mergeback" in out and "0.1.0" in out


def test_cli_merge_prints_summary(pairs, tmp_path):
    base, sft = pairs("llama")
    r = run_cli("slerp", "--sft", sft, "--base", base, "--t", "0.3", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "took the spherical branch" in r.output and str(tmp_path / "o") in r.output
    assert "merge slerp" in (tmp_path / "o" / "README.md").read_text()


def test_existing_output_refused_unless_force(pairs, tmp_path):
    base, sft = pairs("llama")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what mergeback wrote: a folder with the user's own files stays as it is
    assert_user_error(run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", out, "--force"),
                      "keep.txt", "did not write")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run_cli("linear", "--sft", sft, "--base", base, "--t", "0.3", "-o", out, "-q").exit_code == 0
    assert_user_error(run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", out), "--force")
    r = run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", out, "--force", "-q")
    assert r.exit_code == 0 and r.output == ""
    assert "t: 0.5" in (out / "merge_recipe.yaml").read_text() and (out / "model.safetensors").exists()


def test_failed_run_leaves_existing_output_untouched(pairs, tmp_path, clean_copy):
    base, sft = pairs("llama")
    bad = clean_copy(sft, "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    assert run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_cli("linear", "--sft", bad, "--base", base, "--t", "0.5", "-o", out, "--force")
    assert_user_error(r, "model.layers.0.mlp.up_proj.weight", "[3, 3]", "[64, 32]")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "o"]


def test_missing_input_folder(pairs, tmp_path):
    base, _ = pairs("llama")
    assert_user_error(run_cli("slerp", "--sft", tmp_path / "nope", "--base", base, "--t", "0.3", "-o", tmp_path / "o"),
                      "nope", "no such folder")
    assert not (tmp_path / "o").exists()


def test_folder_without_weights(pairs, tmp_path):
    base, _ = pairs("llama")
    (tmp_path / "cfg").mkdir()
    shutil.copy(base / "config.json", tmp_path / "cfg")
    assert_user_error(run_cli("slerp", "--sft", tmp_path / "cfg", "--base", base, "--t", "0.3", "-o", tmp_path / "o"),
                      "config.json but no weights")


def test_missing_tensors_are_listed(pairs, tmp_path, clean_copy):
    base, sft = pairs("llama")
    partial = clean_copy(sft, "partial")
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.2.self_attn.q_proj.weight"]
    save_file(tensors, partial / "model.safetensors")
    r = run_cli("linear", "--sft", base, "--base", partial, "--t", "0.5", "-o", tmp_path / "o")
    assert_user_error(r, "lacks 1 tensor", "model.layers.2.self_attn.q_proj.weight")


def test_architecture_mismatch(pairs, tmp_path):
    base, _ = pairs("llama")
    _, gpt = pairs("gpt2")
    r = run_cli("linear", "--sft", gpt, "--base", base, "--t", "0.5", "-o", tmp_path / "o")
    assert_user_error(r, "config.json", "same architecture")


def test_layer_count_mismatch(pairs, tmp_path, clean_copy):
    base, sft = pairs("llama")
    other = clean_copy(sft, "other")
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (other / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("linear", "--sft", other, "--base", base, "--t", "0.5", "-o", tmp_path / "o"),
                      "num_hidden_layers")


@pytest.mark.parametrize("t", ["nan", "inf", "-inf"])
def test_non_finite_t(pairs, tmp_path, t):
    base, sft = pairs("llama")
    assert_user_error(run_cli("slerp", "--sft", sft, "--base", base, "--t", t, "-o", tmp_path / "o"), "t")
    assert not (tmp_path / "o").exists()


def test_extrapolation_warns_but_runs(pairs, tmp_path):
    base, sft = pairs("llama")
    r = run_cli("linear", "--sft", sft, "--base", base, "--t", "1.5", "-o", tmp_path / "o")
    assert r.exit_code == 0 and "warning: t=1.5 is outside [0, 1]" in r.output


def test_dry_run_writes_nothing(pairs, tmp_path):
    base, sft = pairs("llama")
    r = run_cli("slerp", "--sft", sft, "--base", base, "--t", "0.3", "-o", tmp_path / "o", "--dry-run")
    assert r.exit_code == 0 and "would write" in r.output
    assert list(tmp_path.iterdir()) == []


def test_task_arithmetic_scale_count_must_match(pairs, tmp_path):
    base, sfts = pairs("llama", sft_count=2)
    r = run_cli("task-arithmetic", "--base", base, "--sft", sfts[0], "--sft", sfts[1],
                "--scale", "0.5", "--scale", "0.5", "--scale", "0.5", "-o", tmp_path / "o")
    assert_user_error(r, "--scale")
    r = run_cli("task-arithmetic", "--base", base, "--sft", sfts[0], "--scale", "0.5", "--sparsify", "magnitude",
                "-o", tmp_path / "o")
    assert_user_error(r, "--density")


def test_task_arithmetic_cli_two_sfts(pairs, tmp_path):
    base, sfts = pairs("llama", torch.float32, sft_count=2)
    r = run_cli("task-arithmetic", "--base", base, "--sft", sfts[0], "--sft", sfts[1], "--scale", "0.5",
                "--scale", "0.25", "--sparsify", "magnitude", "--density", "0.5", "--sign-consensus",
                "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    b, out = load_tensors(base), load_tensors(tmp_path / "o")
    s0, s1 = load_tensors(sfts[0]), load_tensors(sfts[1])
    name = "model.layers.1.mlp.down_proj.weight"
    deltas = []
    for s in (s0, s1):
        d = (s[name] - b[name]).reshape(-1)
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask[torch.topk(d.abs(), d.numel() // 2).indices] = True
        deltas.append(d * mask)
    w = [0.5 * deltas[0], 0.25 * deltas[1]]
    elected = torch.where(w[0] + w[1] >= 0, 1.0, -1.0)
    expected = b[name].reshape(-1) + sum(x * (torch.sign(x) == elected) for x in w)
    torch.testing.assert_close(out[name].reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_output_parents_are_created(pairs, tmp_path):
    base, sft = pairs("llama")
    r = run_cli("linear", "--sft", sft, "--base", base, "--t", "0.5", "-o", tmp_path / "a" / "b" / "c", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "b" / "c" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["c"]


def test_usage_mistakes_are_one_line_exit_2():
    """An unknown option or a bad value is one ``error:`` line naming it, like every other user error."""
    for args, words in ((["linear", "--sft", "a", "--base", "b", "--t", "0.3", "--density", "0.3", "-o", "o"],
                         "--density"),
                        (["linear", "--sft", "a", "--base", "b", "--t", "x", "-o", "o"], "--t"),
                        (["sweep", "--sft", "a", "--base", "b", "--domain", "d.jsonl", "--t-values", "nan"],
                         "--t-values")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
