"""Recipes: our format (presets, gradients, rules), errors with key and line, mergekit files, `merge convert`,
`merge plan`, the shipped examples in recipes/, and byte-for-byte reproduction from merge_recipe.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.errors import InputError
from merge.execute import estimate_peak_bytes
from merge.options import Options
from merge.recipes.loading import parse_text
from merge.recipes.mergekit import MergekitRecipe
from merge.recipes.operations import operations_for
from tests.helpers import file_bytes, load_tensors

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NAMES = {  # a 4-layer model's tensors, one per group
    "embed": "model.embed_tokens.weight",
    "attn0": "model.layers.0.self_attn.q_proj.weight", "mlp0": "model.layers.0.mlp.up_proj.weight",
    "norm1": "model.layers.1.input_layernorm.weight", "attn3": "model.layers.3.self_attn.o_proj.weight",
    "mlp3": "model.layers.3.mlp.down_proj.weight", "final": "model.norm.weight", "head": "lm_head.weight",
}


def resolved(text: str, n_layers: int = 4, what: str = "t") -> dict[str, float]:
    """The value each tensor of NAMES gets: t for linear/slerp, the first weight for task arithmetic."""
    op_for = operations_for(parse_text(text), n_layers)
    out = {}
    for key, name in NAMES.items():
        op = op_for(name)
        if op.kind == "copy":
            out[key] = 0.0
        elif op.kind == "slerp":
            out[key] = op.t
        elif op.kind == "linear":
            out[key] = op.weights[1]
        else:
            out[key] = op.weights[0]
    return {k: round(v, 6) for k, v in out.items()}


# -- our format: values per tensor ---------------------------------------------------------------------------
def test_lines_preset_expands_per_layer_with_embeddings_at_layer_1_and_head_at_layer_L():
    got = resolved("method: linear\nbase: b\nsft: s\nschedule: {preset: lines, alpha: 0.2, beta: 0.6}\n")
    # lam(l) = 0.2 + 0.6*(l-1)/3 for l = 1..4; t = 1 - lam
    assert got == {"embed": 0.8, "attn0": 0.8, "mlp0": 0.8, "norm1": 0.6, "attn3": 0.2, "mlp3": 0.2,
                   "final": 0.2, "head": 0.2}


def test_lines_rules_override_and_task_arithmetic_scales_by_lam():
    text = ("method: slerp\nbase: b\nsft: s\nschedule: {preset: lines, alpha: 0.0, beta: 1.0}\n"
            "t:\n  - {match: embed, value: 0}\n  - {match: lm_head, value: 0}\n")
    got = resolved(text)
    assert got["embed"] == got["head"] == 0.0 and got["attn0"] == 1.0 and got["final"] == 0.0
    assert got["norm1"] == round(1 - 1 / 3, 6)
    ta = resolved("method: task_arithmetic\nbase: b\nsft: [{model: s, scale: 0.5}]\n"
                  "schedule: {preset: lines, alpha: 0.2, beta: 0.8}\n")
    assert ta["attn0"] == 0.1 and ta["attn3"] == 0.5 and ta["embed"] == 0.1 and ta["head"] == 0.5


def test_bottom_k_takes_the_first_layers_from_the_base_and_the_rest_per_t():
    got = resolved("method: linear\nbase: b\nsft: s\nt: [0.4, 0.1]\nschedule: {preset: bottom_k, k: 2}\n")
    assert got["attn0"] == got["mlp0"] == got["norm1"] == 1.0
    assert got["attn3"] == got["mlp3"] == 0.1
    assert got["embed"] == 0.4 and got["final"] == got["head"] == 0.1  # embeddings at depth 0, head at 1


def test_gradients_and_rules_resolve_per_group():
    text = ("method: linear\nbase: b\nsft: s\nt:\n  - {match: attn, value: [0.6, 0.0]}\n"
            "  - {match: 're:mlp\\.down', value: 0.9}\n  - {value: 0.3}\n")
    got = resolved(text)
    assert got["attn0"] == 0.6 and got["attn3"] == 0.0 and got["mlp3"] == 0.9 and got["mlp0"] == 0.3


# -- errors: key and line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("method: linear\nbase: b\nsft: s\nt: 0.3\nwieght: 2\n", "recipe.yaml:5: wieght: unknown key"),
    ("method: linear\nbase: b\nsft: s\nt: abc\n", "recipe.yaml:4: t:"),
    ("method: task_arithmetic\nbase: b\nsft:\n  - {model: s, scale: 1}\nsparsify:\n  method: magnitude\n"
     "  density: 1.5\n", "recipe.yaml:7: sparsify.density: Input should be less than or equal to 1"),
    ("method: linear\nbase: b\nsft: s\nschedule:\n  preset: lines\n  alpha: 0.1\n",
     "recipe.yaml:4: schedule.beta: Field required"),
    ("method: linear\nbase: b\nsft: s\nschedule: {preset: top_k, k: 2}\nt: 0.2\n", "recipe.yaml:4: schedule:"),
    ("method: slerp\nbase: b\nsft: s\n", "recipe.yaml:1: t: required for method slerp"),
    ("method: linear\nbase: b\nsft: s\nt: [0.3\n", "recipe.yaml:5: not valid YAML"),
    ("- method: linear\n", "recipe.yaml: a recipe is a YAML mapping"),
    ("merge_method: task_adapter\nbase_model: b\nmodels: [{model: s}]\n", "recipe.yaml:1: merge_method: "
     "'task_adapter' is a mergekit method mergeback does not implement"),
    ("merge_method: linear\nmodels: [{model: a}, {model: b}]\ntokenizer_source: union\n",
     "recipe.yaml:3: tokenizer_source: union (a tokenizer built from every model's vocabulary) is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: s+lora+x\n", "recipe.yaml:4: models.0.model: "
                                                                           "'s+lora+x' is not MODEL or MODEL+LORA"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n"
     "      - {model: b, layer_range: [2, 5]}\n", "recipe.yaml:3: slices.0.sources: the layer ranges have different"),
    ("merge_method: linear\nmodules: {text: {models: [{model: a}]}}\n", "recipe.yaml:2: modules: multi-module"),
])
def test_bad_recipes_name_the_key_and_line(text, expected):
    with pytest.raises(InputError) as e:
        parse_text(text, "recipe.yaml")
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_cli_reports_a_bad_recipe_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("method: linear\nbase: b\nsft: s\nt: 0.3\nsparsfy: {}\n")
    result = CliRunner().invoke(main, ["run", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert f"{bad}:5: sparsfy: unknown key" in result.output and not (tmp_path / "o").exists()


def test_mergekit_slices_that_drop_layers_make_a_shorter_model(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\nslices:\n"
                      f"  - sources: [{{model: {sft}, layer_range: [0, 2]}}, {{model: {base}, layer_range: [0, 2]}}]\n")
    merge.run(recipe, out=tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 2
    assert not any(".layers.2." in name for name in load_tensors(tmp_path / "o"))


@pytest.mark.parametrize("body, expected", [
    ("parameters: {{weight: 1}}\nmodels:\n  - model: {sft}\n    parameters: {{weight: heavy}}\n  - model: {base}\n",
     r"^\S*/r\.yaml:5: models\.0\.parameters: weight must be a number, got 'heavy'"),
    ("slices:\n  - sources:\n      - {{model: {sft}, layer_range: [0, 3]}}\n"
     "      - {{model: {base}, layer_range: [0, 3]}}\n    parameters: {{weight: heavy}}\n",
     r"^\S*/r\.yaml:6: slices\.0\.parameters: weight must be a number"),
])
def test_mergekit_errors_found_while_planning_name_the_recipe_line(pairs, tmp_path, body, expected):
    base, sft = pairs("llama", torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\n" + body.format(sft=sft, base=base))
    with pytest.raises(InputError, match=expected):
        merge.run(recipe, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -- plan, convert, reproduction -----------------------------------------------------------------------------
def test_plan_prints_the_table_size_shards_and_peak_estimate(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nsft: {sft}\nschedule: {{preset: lines, alpha: 0.5, beta: 0.5}}\n")
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split() == ["layer", "0", "0.5", "0.5", "0.5"] for line in lines), result.output
    assert any(line.split() == ["layer", "2", "0", "0", "0"] for line in lines)
    assert any(line.split() == ["lm_head", "0"] for line in lines)
    assert "would write" in result.output and "1 shard(s)" in result.output
    assert "estimated peak memory" in result.output and not list(tmp_path.glob("o*"))


def test_peak_estimate_reflects_threads_and_chunks(pairs):
    base, sft = pairs("llama", torch.float32)
    summary = merge.merge("task_arithmetic", sft=[sft], base=base, scale=0.5, sparsify="magnitude", density=0.5,
                          options=Options.of(dry_run=True))
    assert summary.peak_bytes > 2 * (1 << 16) * 8
    plan = _plan(base, sft)
    one, two = estimate_peak_bytes(plan, 1, 1 << 10), estimate_peak_bytes(plan, 2, 1 << 10)
    assert two == 2 * one and estimate_peak_bytes(plan, 1, 1 << 8) < one


def _plan(base, sft):
    from merge.io.checkpoint import Checkpoint
    from merge.methods import Linear
    from merge.plan import make_plan

    models = {"sft0": Checkpoint(sft, "SFT"), "base": Checkpoint(base, "base")}
    return make_plan(models, {"sft0": "SFT", "base": "base"}, "sft0",
                     lambda n: Linear(("sft0", "base"), (0.5, 0.5)), None, 1 << 30)


def test_convert_slerp_flips_t_and_keeps_non_layer_tensors_at_the_first_value(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32, scale=0.5)
    mk = tmp_path / "mk.yaml"
    mk.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {sft}}}]\n"
                  "parameters:\n  t:\n    - {filter: mlp, value: [0.2, 0.8]}\n    - {value: 0.3}\ndtype: float32\n")
    result = CliRunner().invoke(main, ["convert", str(mk)])
    assert result.exit_code == 0, result.output
    ours = tmp_path / "ours.yaml"
    ours.write_text(result.output)
    assert "method: slerp" in result.output and "# " in result.output
    merge.run(mk, out=tmp_path / "a")
    merge.run(ours, out=tmp_path / "b")
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_convert_says_precisely_what_cannot_be_expressed(tmp_path):
    mk = tmp_path / "mk.yaml"
    mk.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - {model: x, parameters: {weight: 1, density: 0.3}}\n"
                  "  - {model: y, parameters: {weight: 1, density: 0.5}}\n")
    result = CliRunner().invoke(main, ["convert", str(mk)])
    assert result.exit_code == 2
    assert "cannot express" in result.output and "densities" in result.output


def test_mergekit_recipe_reproduces_byte_for_byte_from_merge_recipe_yaml(pairs, tmp_path):
    base, (s0, s1) = pairs("llama", torch.float32, sft_count=2)
    mk = tmp_path / "mk.yaml"
    mk.write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                  f"  - {{model: {s0}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                  f"  - {{model: {s1}, parameters: {{weight: 0.5, density: 0.7}}}}\n")
    merge.run(mk, out=tmp_path / "a")
    written = (tmp_path / "a" / "merge_recipe.yaml").read_text()
    assert isinstance(parse_text(written), MergekitRecipe) and str(s0) in written
    merge.run(tmp_path / "a" / "merge_recipe.yaml", out=tmp_path / "b")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert (tmp_path / "b" / "merge_recipe.yaml").read_text() == written


# -- the shipped examples --------------------------------------------------------------------------------------
@pytest.fixture
def example_models(pairs, tmp_path, monkeypatch):
    """A folder holding ./base, ./med and ./code (tiny Llamas), and ./merge for the demo assets
    (recipes/demo-lines.yaml), as the current directory."""
    base, (s0, s1) = pairs("llama", torch.bfloat16, sft_count=2)
    for name, target in (("base", base), ("med", s0), ("code", s1), ("merge", RECIPES.parent / "merge")):
        os.symlink(target, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_runs_and_reproduces(example_models, recipe):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(RECIPES / recipe), "-o", "out", "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["run", "out/merge_recipe.yaml", "-o", "again", "-q"])
    assert result.exit_code == 0, result.output
    assert file_bytes(example_models / "out") == file_bytes(example_models / "again")
    recipe = "merge_recipe.yaml"
    assert (example_models / "out" / recipe).read_text() == (example_models / "again" / recipe).read_text()
