"""Frankenmerges over different models (mergekit ``passthrough`` with ``slices`` of one source each, the layer
ranges reordering, repeating and overlapping, goliath-style) against the real mergekit-yaml 0.1.5.

Tiny Llamas: A with 3 layers, B with 4 (different random inits), in bfloat16 and in float32. Every oracle run
happens in ONE mergekit process (module fixture); every tensor is compared bit for bit, dtype included.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import merge
from merge.cli import main
from merge.io.views import layered_config
from merge.options import Options
from tests.checkpoints import save_tokenizer, tiny_config
from tests.helpers import load_tensors
from tests.mergekit_runner import load_folder_tensors, run_mergekit_many

ZERO_O_PROJ = [{"filter": "o_proj", "value": 0}, {"value": 0.5}]  # the usual "damp the repeated layers"


def _llama(seed: int, dtype: torch.dtype, layers: int, folder: Path) -> str:
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    save_tokenizer(folder, config.vocab_size)
    return str(folder)


def _src(ref, layers, **params):
    return {"model": ref, "layer_range": layers, **({"parameters": params} if params else {})}


def goliath(a: str, b: str) -> dict:
    """A[0,2) B[1,3) A[1,3) B[3,4): 7 layers; A's layer 1 twice, both models' layers 1-2 overlapping; the third
    slice scaled (o_proj zeroed), the last slice's scale (slice-level) also on the final norm and lm_head."""
    return {"merge_method": "passthrough", "slices": [
        {"sources": [_src(a, [0, 2])]},
        {"sources": [_src(b, [1, 3])]},
        {"sources": [_src(a, [1, 3], scale=ZERO_O_PROJ)]},
        {"sources": [_src(b, [3, 4])], "parameters": {"scale": 0.25}}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("franken")
    return {f"{name}_{tag}": _llama(seed, dtype, layers, root / f"{name}_{tag}")
            for tag, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32))
            for name, seed, layers in (("a", 1, 3), ("b", 2, 4))}


def recipes(c: dict) -> dict[str, dict]:
    return {
        "goliath_bf16": goliath(c["a_bf16"], c["b_bf16"]),
        "goliath_f32": goliath(c["a_f32"], c["b_f32"]),
        # in layer positions, but B has 4 layers and the output 3: B's layer 2 is read through its view
        "tiled_bf16": {"merge_method": "passthrough", "slices": [{"sources": [_src(c["a_bf16"], [0, 2])]},
                                                                 {"sources": [_src(c["b_bf16"], [2, 3])]}]},
        # a bfloat16 model and a float32 one, no dtype: each tensor keeps its model's dtype (the primary's view
        # tells the planner B's float32 for the layers B gives)
        "mixed_dtypes": {"merge_method": "passthrough", "slices": [{"sources": [_src(c["a_bf16"], [0, 2])]},
                                                                   {"sources": [_src(c["b_f32"], [1, 4])]}]},
        # B first: embeddings from B, final norm and lm_head from A, A's stack after B's
        "b_first_f32": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [_src(c["b_f32"], [0, 4], scale=[1.0, 0.5])]},
            {"sources": [_src(c["a_f32"], [2, 3])]},
            {"sources": [_src(c["b_f32"], [3, 4])]},
            {"sources": [_src(c["a_f32"], [0, 3])]}]},
    }


@pytest.fixture(scope="module")
def outputs(ckpt, tmp_path_factory):
    """name -> (mergekit's folder, ours)."""
    configs = recipes(ckpt)
    root = tmp_path_factory.mktemp("franken-runs")
    oracle: dict = {}

    def run_oracle():
        try:
            oracle["run"] = run_mergekit_many(configs, root / "mergekit")
        except BaseException as e:  # re-raised in the fixture's thread
            oracle["run"] = e

    batch = threading.Thread(target=run_oracle)
    batch.start()
    for name, config in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        merge.run(root / f"{name}.yaml", root / "ours" / name, options=Options.of(threads=1))
    batch.join()
    if isinstance(oracle["run"], BaseException):
        raise oracle["run"]
    return {name: (oracle["run"][name], root / "ours" / name) for name in configs}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(recipes(dict.fromkeys(("a_bf16", "b_bf16", "a_f32", "b_f32"), ""))))
def test_frankenmerge_of_different_models_is_bit_exact_with_mergekit(outputs, name):
    theirs_dir, ours_dir = outputs[name]
    theirs, ours = load_folder_tensors(theirs_dir), load_tensors(ours_dir)
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert _config(ours_dir)["num_hidden_layers"] == _config(theirs_dir)["num_hidden_layers"]


def test_each_output_layer_comes_from_its_slice_with_its_scale(outputs, ckpt):
    ours = load_tensors(outputs["goliath_bf16"][1])
    a, b = load_tensors(Path(ckpt["a_bf16"])), load_tensors(Path(ckpt["b_bf16"]))
    up, o_proj = "model.layers.{}.mlp.up_proj.weight", "model.layers.{}.self_attn.o_proj.weight"
    assert _config(outputs["goliath_bf16"][1])["num_hidden_layers"] == 7
    assert torch.equal(ours["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first slice's
    for out, model, layer in [(0, a, 0), (1, a, 1), (2, b, 1), (3, b, 2)]:
        assert torch.equal(ours[up.format(out)], model[up.format(layer)]), out
    assert torch.equal(ours[up.format(4)], a[up.format(1)] * 0.5)  # A's layer 1 again, scaled
    assert torch.equal(ours[up.format(5)], a[up.format(2)] * 0.5)
    assert not ours[o_proj.format(4)].any() and not ours[o_proj.format(5)].any()
    assert torch.equal(ours[up.format(6)], b[up.format(3)] * 0.25)
    for name in ("model.norm.weight", "lm_head.weight"):  # the last slice's model and scale
        assert torch.equal(ours[name], b[name] * 0.25), name


@pytest.mark.parametrize("name, layers", [("goliath_bf16", 7), ("goliath_f32", 7), ("tiled_bf16", 3),
                                          ("mixed_dtypes", 5), ("b_first_f32", 9)])
def test_the_frankenmerge_loads_in_transformers_with_finite_logits(outputs, name, layers):
    model = AutoModelForCausalLM.from_pretrained(outputs[name][1])
    assert len(model.model.layers) == layers
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_frankenmerge_bytes_do_not_depend_on_chunks_or_threads(ckpt, outputs, tmp_path):
    for name in ("goliath_bf16", "b_first_f32"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(recipes(ckpt)[name], sort_keys=False))
        merge.run(recipe, tmp_path / name, options=Options.of(threads=3, chunk_elements=64))
        assert (tmp_path / name / "model.safetensors").read_bytes() == \
            (outputs[name][1] / "model.safetensors").read_bytes(), name


def test_the_written_recipe_reproduces_the_frankenmerge(outputs, tmp_path):
    folder = outputs["goliath_bf16"][1]
    merge.run(folder / "merge_recipe.yaml", tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_the_plan_says_which_output_layers_each_model_gives(ckpt, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipes(ckpt)["goliath_bf16"], sort_keys=False))
    notes = merge.run(tmp_path / "r.yaml", options=Options.of(dry_run=True)).notes
    assert any("output layers 0, 1, 4, 5 (of 7) read its layers 0, 1, 1, 2" in n for n in notes), notes
    assert any("output layers 2, 3, 6 (of 7) read its layers 1, 2, 3" in n for n in notes), notes


@pytest.mark.parametrize("slices, message", [
    ([[0, 2], [2, 5]], "slices.1.sources.0.layer_range: [2, 5) reads layer 4 of"),
    ([[1, 4], [0, 1]], "slices.0.sources.0.layer_range: [1, 4) reads layer 3 of"),  # A has 3 layers
])
def test_a_range_past_a_models_layers_is_a_one_line_error(ckpt, tmp_path, slices, message):
    config = {"merge_method": "passthrough", "slices": [{"sources": [_src(ckpt["a_bf16"], slices[0])]},
                                                        {"sources": [_src(ckpt["b_bf16"], slices[1])]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and "does not exist" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_per_layer_config_lists_come_from_each_layers_model():
    a = {"num_hidden_layers": 2, "layer_types": ["a0", "a1"], "hidden_size": 8}
    b = {"num_hidden_layers": 3, "layer_types": ["b0", "b1", "b2"], "hidden_size": 8}
    assert layered_config(a, [1, 2, 0], [a, b, a]) == {"num_hidden_layers": 3, "hidden_size": 8,
                                                       "layer_types": ["a1", "b2", "a0"]}
    nested = layered_config({"text_config": a}, [0, 2], [{"text_config": a}, {"text_config": b}])
    assert nested == {"text_config": {"num_hidden_layers": 2, "hidden_size": 8, "layer_types": ["a0", "b2"]}}
    # a model without the list (or with one of the wrong length): the list is left as it is
    assert layered_config(a, [0, 1, 2], [a, a, {"num_hidden_layers": 3}])["layer_types"] == ["a0", "a1"]
