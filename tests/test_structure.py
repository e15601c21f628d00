"""Structure-aware depth: a vision tower and a text decoder each count their own layers (gradients, LiNeS,
bottom_k, blocks, `merge plan`, `merge inspect`); stacks and the MoE router are rule groups; `merge verify
--load` loads vision-language models with their own class."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

import merge
from merge import api
from merge.cli import main
from merge.errors import InputError
from merge.recipes.loading import parse_text
from merge.recipes.operations import operations_for
from merge.recover.search import blocks_recipe
from merge.tensor_names import Structure, group_of
from tests.helpers import load_tensors

VISION_LAYERS = {"llava": 3, "qwen2_vl": 3}  # tests/checkpoints.py: vision depth 3, text 2 layers
TEXT_LAYERS = 2


def expected_depth(arch: str, name: str) -> float:
    """The per-stack depth written out by hand for the tiny Llava / Qwen2-VL names (not via merge's code)."""
    vision = re.search(r"(?:vision_tower\.encoder\.layers|visual\.blocks)\.(\d+)\.", name)
    if vision:
        return int(vision.group(1)) / (VISION_LAYERS[arch] - 1)
    text = re.search(r"model\.layers\.(\d+)\.", name)
    if text:
        return int(text.group(1)) / (TEXT_LAYERS - 1)
    if "post_layernorm" in name or name.endswith("model.norm.weight") or "lm_head" in name:
        return 1.0
    return 0.0  # text and vision embeddings, CLIP's pre_layrnorm, the projector


def _inputs(pair):
    base, sft = pair
    return load_tensors(base), load_tensors(sft)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_gradient_positions_are_counted_per_stack(pairs, tmp_path, arch):
    pair = pairs(arch)
    recipe = api.build_recipe({"method": "linear", "base": str(pair[0]), "sft": [str(pair[1])], "t": [0.2, 0.8]})
    api.run(recipe, out=tmp_path / "o")
    b, s = _inputs(pair)
    out = load_tensors(tmp_path / "o")
    assert any(k.startswith(("vision_tower.", "visual.")) for k in out)
    for name in s:
        t = 0.2 + (0.8 - 0.2) * expected_depth(arch, name)
        expected = (s[name].float() * (1.0 - t) + b[name].float() * t).to(s[name].dtype)
        assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_lines_schedule_is_counted_per_stack(pairs, tmp_path, arch):
    pair = pairs(arch)
    recipe = api.build_recipe({"method": "linear", "base": str(pair[0]), "sft": [str(pair[1])],
                               "schedule": {"preset": "lines", "alpha": 0.2, "beta": 0.6}})
    api.run(recipe, out=tmp_path / "o")
    b, s = _inputs(pair)
    out = load_tensors(tmp_path / "o")
    for name in s:
        t = 1.0 - (0.2 + 0.6 * expected_depth(arch, name))
        expected = (s[name].float() * (1.0 - t) + b[name].float() * t).to(s[name].dtype)
        assert torch.equal(out[name], expected), name


def test_bottom_k_and_blocks_take_layers_of_each_stack(pairs):
    base, sft = pairs("llava")
    names = list(load_tensors(sft))
    structure = Structure({"vision": VISION_LAYERS["llava"], "projector": 0, "text": TEXT_LAYERS})
    bottom = operations_for(parse_text(f"base: {base}\nsft: [{sft}]\nt: 0.5\nmethod: linear\n"
                                       "schedule: {preset: bottom_k, k: 1}\n"), structure)
    for name in names:
        layer0 = ".layers.0." in name
        assert bottom.describe(name) == ("1" if layer0 else "0.5"), name
    template = parse_text(f"base: {base}\nsft: [{sft}]\nt: 0.5\nmethod: linear\n")
    blocks = operations_for(blocks_recipe(template, (0.6, 0.3, 0.1), structure), structure)
    vision = [blocks.describe(f"vision_tower.encoder.layers.{i}.mlp.fc1.weight") for i in range(3)]
    text = [blocks.describe(f"language_model.model.layers.{i}.mlp.up_proj.weight") for i in range(2)]
    assert vision == ["0.6", "0.3", "0.1"] and text == ["0.6", "0.1"]  # 2 layers in 3 blocks: runs of 0, 1, 1
    assert blocks.describe("vision_tower.pre_layrnorm.weight") == "0.6"
    assert blocks.describe("vision_tower.post_layernorm.weight") == "0.1"
    assert blocks.describe("multi_modal_projector.linear_1.weight") == "0.6"
    assert blocks.describe("language_model.lm_head.weight") == "0.1"
    qwen = Structure({"vision": 3, "projector": 0, "text": 2})
    blocks = operations_for(blocks_recipe(template, (0.6, 0.3, 0.1), qwen), qwen)
    assert [blocks.describe(f"visual.blocks.{i}.attn.qkv.weight") for i in range(3)] == ["0.6", "0.3", "0.1"]
    assert [blocks.describe(f"model.layers.{i}.mlp.up_proj.weight") for i in range(2)] == ["0.6", "0.1"]
    assert blocks.describe("visual.merger.mlp.0.weight") == blocks.describe("visual.patch_embed.proj.weight") == "0.6"


def test_plan_shows_rows_per_stack(pairs, tmp_path):
    base, sft = pairs("llava")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nsft: [{sft}]\nt: [0.0, 1.0]\n")
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("resolved parameters"):]
    rows = [line.split("  ")[0] for line in table.splitlines()[2:] if line.strip()]
    assert rows[:11] == ["vision embed", "vision layer 0", "vision layer 1", "vision layer 2", "vision final norm",
                         "projector", "text embed", "text layer 0", "text layer 1", "text final norm",
                         "text lm_head"]
    assert re.search(r"vision layer 1 +0\.5 ", table) and re.search(r"text layer 1 +1 ", table)


def test_rules_name_the_vision_and_text_stacks(pairs, tmp_path):
    pair = pairs("llava")
    recipe = api.build_recipe({"method": "linear", "base": str(pair[0]), "sft": [str(pair[1])],
                               "t": [{"match": "vision", "value": 1.0}, {"match": "projector", "value": 0.5},
                                     {"match": "text", "value": 0.0}]})
    api.run(recipe, out=tmp_path / "o")
    b, s = _inputs(pair)
    out = load_tensors(tmp_path / "o")
    for name in s:
        if name.startswith("vision_tower."):
            assert torch.equal(out[name], b[name]), name
        elif name.startswith("multi_modal_projector."):
            assert torch.equal(out[name], (s[name].float() * 0.5 + b[name].float() * 0.5).to(s[name].dtype))
        else:
            assert torch.equal(out[name], s[name]), name


def test_router_is_a_group_and_a_rule_changes_exactly_the_routers(pairs, tmp_path):
    pair = pairs("mixtral")
    recipe = api.build_recipe({"method": "linear", "base": str(pair[0]), "sft": [str(pair[1])],
                               "t": [{"match": "router", "value": 1.0}, {"value": 0.0}]})
    api.run(recipe, out=tmp_path / "o")
    b, s = _inputs(pair)
    out = load_tensors(tmp_path / "o")
    routers = [n for n in s if torch.equal(out[n], b[n]) and not torch.equal(s[n], b[n])]
    assert routers == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(TEXT_LAYERS)]
    assert all(torch.equal(out[n], s[n]) for n in s if n not in routers)
    assert all(group_of(n) == "mlp" for n in s if ".experts." in n)


@pytest.mark.parametrize("name, group", [
    ("model.layers.3.block_sparse_moe.gate.weight", "router"),
    ("model.layers.3.mlp.gate.weight", "router"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "router"),
    ("model.layers.3.mlp.shared_expert_gate.weight", "router"),
    ("model.layers.3.mlp.gate_proj.weight", "mlp"),
    ("model.layers.3.mlp.experts.0.gate_proj.weight", "mlp"),
    ("model.layers.3.mlp.shared_expert.gate_proj.weight", "mlp"),
    ("model.layers.3.block_sparse_moe.experts.1.w1.weight", "mlp"),
    ("model.multi_modal_projector.linear_1.weight", "projector"),
    ("model.visual.merger.ln_q.weight", "projector"),
    ("model.visual.patch_embed.proj.weight", "embed"),
])
def test_groups_of_moe_and_vision_language_names(name, group):
    assert group_of(name) == group


def test_positions_from_names_and_configs():
    names = ["model.vision_tower.vision_model.encoder.layers.5.mlp.fc1.weight",
             "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
             "model.multi_modal_projector.linear_1.weight", "model.language_model.layers.3.mlp.up_proj.weight",
             "model.language_model.embed_tokens.weight", "model.language_model.norm.weight", "lm_head.weight"]
    config = {"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 6}}
    structure = Structure.of(config, names)
    assert structure.counts == {"vision": 6, "projector": 0, "text": 4}
    got = [tuple(structure.position(n))[:3] + (structure.position(n).depth,) for n in names]
    assert got == [("vision", 5, 6, 1.0), ("vision", None, 6, 0.0), ("projector", None, 0, 0.0),
                   ("text", 3, 4, 1.0), ("text", None, 4, 0.0), ("text", None, 4, 1.0), ("text", None, 4, 1.0)]
    qwen = Structure.of({"num_hidden_layers": 28, "vision_config": {"depth": 32}},
                        ["visual.blocks.31.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight"])
    assert qwen.counts == {"vision": 32, "text": 28}
    mllama = Structure.of({}, ["vision_model.encoder.layers.7.mlp.fc1.weight", "model.layers.2.mlp.up_proj.weight"])
    assert mllama.counts == {"vision": 8, "text": 3}  # no config: the names' top index + 1
    single = Structure.of({"num_hidden_layers": 3}, ["model.layers.0.mlp.up_proj.weight"])
    assert single.counts == {"text": 3} and not single.multi


def test_mergekit_gradients_run_over_each_modules_layers(pairs):
    base, sft = pairs("llava")
    structure = Structure({"vision": 3, "projector": 0, "text": 2})
    recipe = parse_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {sft}\n"
                        "parameters:\n  t: [0.0, 1.0]\n")
    op_for = operations_for(recipe, structure)
    t = {n: op_for(n).t for n in ("vision_tower.encoder.layers.1.mlp.fc1.weight",
                                             "vision_tower.encoder.layers.2.mlp.fc1.weight",
                                             "language_model.model.layers.1.mlp.up_proj.weight",
                                             "multi_modal_projector.linear_1.weight", "language_model.lm_head.weight")}
    assert list(t.values()) == [0.5, 1.0, 1.0, 0.0, 0.0]  # mergekit: per module i/(L-1); outside layers t=0
    sliced = parse_text(f"merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n"
                        f"      - model: {base}\n        layer_range: [0, 2]\n      - model: {sft}\n"
                        "        layer_range: [0, 2]\nparameters:\n  t: 0.5\n")
    with pytest.raises(InputError, match="several layer stacks"):
        operations_for(sliced, structure)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_verify_load_passes_on_vision_language_outputs(pairs, tmp_path, arch):
    base, sft = pairs(arch)
    merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "o")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "o"), "--load"])
    assert result.exit_code == 0, result.output
    from merge.integrity import model_class

    class_name = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}[arch]
    cls = model_class({"architectures": [class_name]})
    assert cls.__name__ == class_name
    assert model_class({"architectures": ["NoSuchForConditionalGeneration"]}).__name__ == "AutoModelForImageTextToText"
    assert model_class({}).__name__ == "AutoModelForCausalLM"
    model = cls.from_pretrained(tmp_path / "o")
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8).unsqueeze(0)).logits
    assert logits.shape[-1] == 96 and bool(torch.isfinite(logits).all())


def test_inspect_layer_table_per_stack(pairs):
    base, sft = pairs("llava")
    report = merge.inspect(str(sft), str(base))
    assert [(ld.stack, ld.layer) for ld in report.layers] == [("vision", 0), ("vision", 1), ("vision", 2),
                                                               ("text", 0), ("text", 1)]
    assert "vision 2" in report.report() and "   text 1" in report.report()
