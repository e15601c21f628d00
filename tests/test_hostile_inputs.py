"""Hostile and broken inputs, end to end through the CLI: one line on stderr, exit 2, nothing written."""

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from merge.cli import main
from merge.options import Options
from tests.helpers import load_tensors

INDEX = "model.safetensors.index.json"


def read_parts(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_parts(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, change) -> None:
    header, data = read_parts(path)
    change(header)
    write_parts(path, header, data)


def first_shard(folder: Path) -> Path:
    return folder / sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[0]


def set_index_entry(folder: Path, value) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = value
    (folder / INDEX).write_text(json.dumps(index))


class Evil:
    """Pickled code: unpickling runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# Each case damages a copy of the SFT folder (single file "model.safetensors", or sharded).
def _truncated(sft, tmp):
    f = sft / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _header_longer_than_file(sft, tmp):
    f = sft / "model.safetensors"
    f.write_bytes(struct.pack("<Q", f.stat().st_size * 4) + f.read_bytes()[8:])


def _header_not_json(sft, tmp):
    _, data = read_parts(sft / "model.safetensors")
    write_parts(sft / "model.safetensors", b"{'dtype': F32, oops" + b" " * 5, data)


def _overlapping_offsets(sft, tmp):
    def change(h):
        h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = \
            h["model.layers.0.input_layernorm.weight"]["data_offsets"]
    edit_header(sft / "model.safetensors", change)


def _offsets_out_of_range(sft, tmp):
    def change(h):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]
    edit_header(sft / "model.safetensors", change)


def _unknown_dtype(sft, tmp):
    edit_header(sft / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F12"))


def _index_names_missing_shard(sft, tmp):
    first_shard(sft).unlink()


def _index_dotdot(sft, tmp):
    shutil.copy(first_shard(sft), tmp / "outside.safetensors")
    set_index_entry(sft, "../outside.safetensors")


def _index_absolute(sft, tmp):
    shutil.copy(first_shard(sft), tmp / "outside.safetensors")
    set_index_entry(sft, str(tmp / "outside.safetensors"))


def _index_symlink_out(sft, tmp):
    shard = first_shard(sft)
    shutil.move(shard, tmp / "outside.safetensors")
    shard.symlink_to(tmp / "outside.safetensors")


def _index_lists_absent_tensor(sft, tmp):
    index = json.loads((sft / INDEX).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_shard(sft).name
    (sft / INDEX).write_text(json.dumps(index))


def _bin_with_pickled_code(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": Evil(tmp / "pwned")}, sft / "pytorch_model.bin")


def _bin_raw_pickle(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()
    with open(sft / "pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(tmp / "pwned"), f)


def _empty_folder(sft, tmp):
    shutil.rmtree(sft)
    sft.mkdir()


def _config_but_no_weights(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()


CASES = {
    "truncated": (_truncated, False, "outside the data section"),
    "header_longer_than_file": (_header_longer_than_file, False, "exceeds the file size"),
    "header_not_json": (_header_not_json, False, "header is not valid JSON"),
    "overlapping_offsets": (_overlapping_offsets, False, "overlap"),
    "offsets_out_of_range": (_offsets_out_of_range, False, "outside the data section"),
    "unknown_dtype": (_unknown_dtype, False, "unknown dtype 'F12'"),
    "index_names_missing_shard": (_index_names_missing_shard, True, "which is missing"),
    "index_dotdot": (_index_dotdot, True, "points outside the model folder"),
    "index_absolute_path": (_index_absolute, True, "must be file names inside the model folder"),
    "index_symlink_out": (_index_symlink_out, True, "outside the model folder"),
    "index_lists_absent_tensor": (_index_lists_absent_tensor, True, "that shard does not hold it"),
    "bin_with_pickled_code": (_bin_with_pickled_code, False, "refused to load"),
    "bin_raw_pickle": (_bin_raw_pickle, False, "refused to load"),
    "empty_folder": (_empty_folder, False, "holds no model weights"),
    "config_but_no_weights": (_config_but_no_weights, False, "has a config.json but no weights"),
}


def assert_clean_refusal(result, root: Path, out: Path, expected: str) -> None:
    """Exit 2, exactly one 'error:' line naming the problem, no traceback, nothing written next to the inputs."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p.name for p in root.iterdir() if "mergeback" in p.name]  # no staging folder, no lock


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_sft_is_refused_cleanly(pairs, tmp_path, case):
    damage, sharded, expected = CASES[case]
    base, pristine = pairs("llama", torch.float32, shard_size="40KB") if sharded else pairs("llama", torch.float32)
    sft = tmp_path / "sft"
    shutil.copytree(pristine, sft)
    damage(sft, tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.5", "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, expected)
    assert not (tmp_path / "pwned").exists()


def test_safetensors_preferred_over_a_malicious_bin(pairs, tmp_path):
    base, pristine = pairs("llama", torch.float32)
    sft = tmp_path / "sft"
    shutil.copytree(pristine, sft)
    torch.save({"model.embed_tokens.weight": Evil(tmp_path / "pwned")}, sft / "pytorch_model.bin")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "pwned").exists()
    assert load_tensors(out).keys() == load_tensors(pristine).keys()


def test_sft_of_another_architecture_is_refused(pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    _, gpt2 = pairs("gpt2", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["slerp", "--sft", str(gpt2), "--base", str(base), "--t", "0.5", "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "same architecture")


@pytest.mark.parametrize("t", ["nan", "inf", "-inf"])
def test_non_finite_t_is_refused(pairs, tmp_path, t):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", t, "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "finite")


def test_non_finite_t_is_refused_in_python(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    with pytest.raises(merge.MergeError, match="finite"):
        merge.merge("linear", sft=sft, base=base, t=float("nan"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_floating_tensors_are_copied_from_the_sft_never_interpolated(pairs, tmp_path):
    base0, sft0 = pairs("llama", torch.float32)
    base, sft = tmp_path / "base", tmp_path / "sft"
    for src, dst, value in ((base0, base, 7), (sft0, sft, 3)):
        shutil.copytree(src, dst)
        tensors = load_file(dst / "model.safetensors")
        tensors["model.position_ids"] = torch.arange(16, dtype=torch.int64) * value
        tensors["model.mask"] = torch.arange(16) % value == 0
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    assert out["model.position_ids"].dtype == torch.int64
    assert torch.equal(out["model.position_ids"], torch.arange(16) * 3)
    assert torch.equal(out["model.mask"], torch.arange(16) % 3 == 0)


@pytest.mark.parametrize("text", ["method: [linear\n  base: {oops", "- just\n- a list\n", "\x00\x01binary", ""])
def test_a_recipe_that_is_not_yaml_is_refused(tmp_path, text):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "recipe.yaml")


# -- issue 15: never a wrong model without a word ------------------------------------------------------------
def _merge_cli(base, sft, out, *args):
    return CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "-o", str(out), *args])


def test_an_overflowing_t_is_refused_naming_a_tensor(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = _merge_cli(base, sft, out, "--t", "1e308")
    assert_clean_refusal(result, tmp_path, out, "output tensor '")
    assert "from finite inputs: the merge overflowed float32" in result.stderr and "--allow-nonfinite" in result.stderr


def test_a_float16_overflow_of_the_cast_is_refused(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = _merge_cli(base, sft, out, "--t", "1e9", "--dtype", "float16", "-q")
    assert_clean_refusal(result, tmp_path, out, "the merge overflowed float16")
    # the same values are finite in float32: only the cast overflows
    assert _merge_cli(base, sft, out, "--t", "1e9", "--dtype", "float32", "-q").exit_code == 0


def test_a_non_finite_input_copied_unchanged_is_named_as_the_cause(pairs, tmp_path):
    base, pristine = pairs("llama", torch.float32)
    sft = tmp_path / "sft"
    shutil.copytree(pristine, sft)
    tensors = load_file(sft / "model.safetensors")
    tensors["model.norm.weight"][7] = float("inf")
    save_file(tensors, sft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = _merge_cli(base, sft, out, "--t", "0")  # t=0 copies the SFT
    assert_clean_refusal(result, tmp_path, out, f"SFT {sft}: tensor 'model.norm.weight' already holds NaN/Inf "
                                                "(first at flat element 7)")
    assert _merge_cli(base, sft, out, "--t", "0", "--allow-nonfinite", "-q").exit_code == 0
    assert torch.isinf(load_tensors(out)["model.norm.weight"][7])


def test_python_api_refuses_non_finite_outputs_unless_allowed(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    with pytest.raises(merge.MergeError, match="has NaN/Inf"):
        merge.merge("linear", sft=sft, base=base, t=1e308, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning):
        merge.merge("linear", sft=sft, base=base, t=1e308, out=tmp_path / "out",
                    options=Options.of(allow_nonfinite=True))
    assert not torch.isfinite(load_tensors(tmp_path / "out")["model.norm.weight"]).all()


NO_EFFECT = {
    "density without sparsify": (["task-arithmetic", "--scale", "0.5", "--density", "0.3"],
                                 "--density: has no effect without --sparsify"),
    "gamma without sparsify": (["task-arithmetic", "--scale", "0.5", "--gamma", "0.1"], "--gamma: has no effect"),
    "seed without sparsify": (["task-arithmetic", "--scale", "0.5", "--seed", "3"], "--seed: has no effect"),
    "gamma with magnitude": (["task-arithmetic", "--scale", "0.5", "--sparsify", "magnitude", "--density", "0.5",
                              "--gamma", "0.1"], "--sparsify magnitude has no gamma"),
    "seed with magnitude": (["task-arithmetic", "--scale", "0.5", "--sparsify", "magnitude", "--density", "0.5",
                             "--seed", "1"], "--seed: only --sparsify random"),
    "sign consensus with one SFT": (["task-arithmetic", "--scale", "0.5", "--sign-consensus"],
                                    "--sign-consensus: elects signs across several SFTs"),
    "private without push": (["linear", "--t", "0.3", "--private"], "--private: only applies with --push-to-hub"),
    "revision without push": (["linear", "--t", "0.3", "--revision", "b"], "--revision: only applies"),
    "resume with dry run": (["linear", "--t", "0.3", "--dry-run", "--resume"],
                            "--resume: has no effect with --dry-run"),
    "force with dry run": (["linear", "--t", "0.3", "--dry-run", "--force"], "--force: has no effect with --dry-run"),
    "gpu memory on the cpu": (["linear", "--t", "0.3", "--device", "cpu", "--gpu-memory", "1GB"],
                              "--gpu-memory: has no effect with --device cpu"),
}


@pytest.mark.parametrize("case", sorted(NO_EFFECT))
def test_an_option_without_effect_is_an_error(pairs, tmp_path, case):
    args, expected = NO_EFFECT[case]
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [args[0], "--sft", str(sft), "--base", str(base), "-o", str(out), *args[1:]])
    assert_clean_refusal(result, tmp_path, out, expected)


def test_python_options_without_effect_are_errors(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    for kwargs, expected in (({"method": "linear", "t": 0.3, "sparsify": "magnitude"}, "--sparsify: only for"),
                             ({"method": "slerp", "t": 0.3, "scale": 0.5}, "--scale: only for task-arithmetic"),
                             ({"method": "task_arithmetic", "t": 0.3, "scale": 0.5}, "--t: task-arithmetic uses"),
                             ({"method": "linear", "t": True}, "a boolean is not a number")):
        with pytest.raises(merge.MergeError, match=expected):
            merge.merge(sft=sft, base=base, out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _ours(base, sft, t: str) -> str:
    return f"method: linear\nbase: {base}\nsft: {sft}\nt: {t}\n"


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_rule_that_matches_no_tensor_is_an_error_naming_it_and_its_line(pairs, tmp_path, command):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, _ours(base, sft, "\n  - {match: attn, value: 0.2}\n  - {match: embedd, value: 0}\n"
                                                "  - {value: 0.3}"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [command, str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, f"{recipe}:6: t.1.match: 'embedd' matches no tensor of the model")
    assert "--allow-unmatched" in result.stderr


def test_allow_unmatched_turns_the_error_into_a_warning(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, _ours(base, sft, "\n  - {match: embedd, value: 0}\n  - {value: 0.3}"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--allow-unmatched", "-q"])
    assert result.exit_code == 0 and "warning:" in result.stderr and "'embedd' matches no tensor" in result.stderr
    with pytest.warns(UserWarning, match="embedd"):
        merge.run(recipe, out=tmp_path / "py", options=Options.of(allow_unmatched=True))
    with pytest.raises(merge.MergeError, match="embedd"):
        merge.run(recipe, out=tmp_path / "py2")


def test_a_mergekit_filter_that_matches_nothing_is_an_error(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                               f"  - model: {sft}\nparameters:\n  t:\n    - filter: self_atn\n      value: 0.2\n"
                               "    - value: 0.5\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, f"{recipe}:8: parameters.t.0.filter: 'self_atn' matches no tensor")


@pytest.mark.parametrize("t, expected", [
    ("true", ":4: t: Input should be a valid number (got true: a boolean is not a number)"),
    ("[0.1, false]", ":4: t.1: Input should be a valid number (got false"),
    ("\n  - {match: 're:(', value: 0}\n  - {value: 0.3}", ":5: t.0.match: 're:(' is not a valid regular expression"),
    ("\n  - {match: 're:[a-', value: 0}", ":5: t.0.match: 're:[a-' is not a valid regular expression"),
    ("\n  - {mach: embed, value: 0}", ":5: t.0.mach: unknown key (did you mean 'match'?)"),
])
def test_recipe_values_are_checked_in_the_users_words(pairs, tmp_path, t, expected):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, _ours(base, sft, t))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, f"{recipe}{expected}")


def test_a_misspelt_key_is_named_with_a_suggestion(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, f"methd: linear\nbase: {base}\nsft: {sft}\nt: 0.3\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, f"{recipe}:1: methd: unknown key (did you mean 'method'?)")
    recipe.write_text(f"method: task_arithmetic\nbase: {base}\nsft: {sft}\nscale: 0.5\n"
                      "sparsify: {method: magnitude, densty: 0.5}\n")
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, ":5: sparsify.densty: unknown key (did you mean 'density'?)")


def test_a_mergekit_boolean_is_not_a_number(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                               f"  - model: {sft}\nparameters:\n  t: true\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "t must be a number, got true (a boolean is not a number)")


@pytest.mark.parametrize("params, expected", [
    ("{weight: 0.5, density: 0.5, gamma: 0.8}", "parameters density/gamma: breadcrumbs needs gamma + density <= 1"),
    ("{weight: 0.5, density: -0.5}", "parameters density: Input should be greater than 0 (got -0.5)"),
])
def test_convert_says_each_problem_on_one_line(pairs, tmp_path, params, expected):
    base, sft = pairs("llama", torch.float32)
    method = "breadcrumbs" if "gamma" in params else "dare_linear"
    recipe = _recipe(tmp_path, f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {sft}\n"
                               f"    parameters: {params}\n")
    result = CliRunner().invoke(main, ["convert", str(recipe)])
    assert_clean_refusal(result, tmp_path, tmp_path / "none", expected)
    assert "pydantic" not in result.stderr and "validation error" not in result.stderr


def test_a_mergekit_t_outside_the_range_is_reported_in_mergekits_convention(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                               f"  - model: {sft}\nparameters:\n  t: 2\n")
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 0
    assert "warning: t: 2 (mergekit's t, 0 = base_model) is outside [0, 1]" in result.stderr
    assert "t=-1" not in result.stderr


def test_a_tiny_memory_budget_is_said_in_readable_units(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = _merge_cli(base, sft, out, "--t", "0.3", "--memory", "1KB")
    assert_clean_refusal(result, tmp_path, out, "--memory 1KB is too small: one worker needs ")
    assert "0.0MiB" not in result.stderr


def _sweep_cli(base, sft, tmp_path, *args, domain=None, general=None):
    from tests.test_sweep import _probes

    g, d = _probes(tmp_path)
    return CliRunner().invoke(main, ["sweep", "--sft", str(sft), "--base", str(base), "--general",
                                     str(general or g), "--domain", str(domain or d), "-o", str(tmp_path / "out"),
                                     *args])


@pytest.mark.parametrize("args, expected", [
    (["--t-values", ","], "--t-values: no value of t given"),
    (["--blocks", "2"], "--blocks: only applies with --schedule blocks"),
    (["--schedule", "lines", "--blocks", "2"], "--blocks: only applies with --schedule blocks"),
    (["--budget", "4"], "--budget: bounds the schedule search"),
    (["--select", "score", "--keep-domain", "0.8"], "--keep-domain: has no effect with --select score"),
    (["--holdout", "0.5", "--general-report", "{g}", "--domain-report", "{d}"], "--holdout: has no effect"),
])
def test_sweep_options_without_effect_are_errors(pairs, tmp_path, args, expected):
    from tests.test_sweep import _probes

    base, sft = pairs("llama")
    general, domain = _probes(tmp_path)
    result = _sweep_cli(base, sft, tmp_path, *(a.format(g=general, d=domain) for a in args))
    assert_clean_refusal(result, tmp_path, tmp_path / "out", expected)


def test_a_probe_set_with_nothing_to_score_is_refused(pairs, tmp_path):
    base, sft = pairs("llama")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"instruction": "w1 w2", "output": ""}) + "\n" for _ in range(3)))
    result = _sweep_cli(base, sft, tmp_path, domain=empty)
    assert_clean_refusal(result, tmp_path, tmp_path / "out", str(empty))


def test_a_sweep_never_chooses_a_candidate_with_a_nan_score():
    from merge.evaluate import ProbeScore
    from merge.recover.result import Candidate
    from merge.recover.sweep import _finite_candidates

    def row(label, g, d, t):
        return Candidate(label, None, ProbeScore(g, 10, 10), ProbeScore(d, 10, 10), t, 0.0, 0.0)

    base, sft, bad, good = row("base", 1, 9, 1.0), row("SFT", 9, 1, 0.0), row("t=0.5", float("nan"), 1, 0.5), \
        row("t=0.3", 5, 2, 0.3)
    notes: list[str] = []
    assert _finite_candidates([sft, bad, good, base], base, sft, notes) == [sft, good, base]
    assert notes == ["left out of the choice, scores not finite: t=0.5"]
    with pytest.raises(merge.MergeError, match=r"the SFT \(t=0\) scores are not finite"):
        _finite_candidates([row("SFT", float("nan"), 1, 0.0), base], base, row("SFT", float("nan"), 1, 0.0), [])


def test_a_sweep_refuses_a_non_finite_candidate(pairs, tmp_path):
    base, sft = pairs("llama")
    result = _sweep_cli(base, sft, tmp_path, "--t-values", "0.5,1e308")
    assert_clean_refusal(result, tmp_path, tmp_path / "out", "sweep: candidate tensor '")
    assert "the merge overflowed" in result.stderr


@pytest.mark.parametrize("repo_id", ["a--b/med", "me/med..v2", "me/med.git", "-me/med", "med", "me/med/v2"])
def test_a_push_target_that_is_not_a_hub_repo_id_is_refused(pairs, tmp_path, repo_id):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out),
                                       "--push-to-hub", repo_id])
    assert_clean_refusal(result, tmp_path, out, f"--push-to-hub {repo_id!r}: not a Hub repo id")


def test_repo_ids_follow_the_hub_clients_rules():
    from merge.hub import is_repo_id

    assert all(is_repo_id(r) for r in ("me/med-recovered", "Qwen/Qwen2.5-0.5B", "org_1/name.v2"))
    assert not any(is_repo_id(r) for r in ("gpt2", "a/b/c", "a--b/c", "a/b..c", "a/b.git", "a/b.", ".a/b", "a/-b"))
