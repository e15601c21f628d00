"""nearswap, arcee_fusion, ram, ramplus_tl and passthrough as streaming methods: `merge run` of a mergekit recipe
against the real `mergekit-yaml` on the same tiny checkpoints (bit-exact, dtypes included: arcee_fusion and
ramplus_tl write float32 for bfloat16 inputs, as mergekit), chunk/thread invariance, our own format and CLI.

All oracle runs happen in ONE mergekit process (module fixture, seeded with --random-seed 0).
"""

from __future__ import annotations

import threading

import pytest
import torch
import yaml
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.methods import arcee_fusion as fusion
from merge.methods import nearswap, ram
from merge.options import Options
from tests.helpers import file_bytes, load_logits, load_tensors
from tests.mergekit_runner import load_folder_tensors, run_mergekit_many


def _m(path, **parameters):
    return {"model": str(path), **({"parameters": parameters} if parameters else {})}


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A tied float32 Llama whose embedding has 1,049,600 > 1e6 entries (arcee_fusion samples its quantiles)
    and a perturbed copy; nothing else of it is above 1e6 entries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.checkpoints import perturb
    root = tmp_path_factory.mktemp("big")
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=16400, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    perturb(model, 7, 0.02)
    model.save_pretrained(root / "sft")
    return root / "base", root / "sft"


def recipes(bf, f32, big) -> dict[str, dict]:
    """name -> mergekit config, run unchanged through `merge run` and `mergekit-yaml`."""
    base, (s0, s1, s2) = bf
    fbase, (f0, f1) = f32
    three, two = [_m(s0), _m(s1), _m(s2)], [_m(f0), _m(f1)]
    gradient_t = [{"filter": "self_attn", "value": [0.002, 0.02]}, {"value": 0.01}]
    return {
        "nearswap": {"merge_method": "nearswap", "base_model": str(base), "models": [_m(s0)],
                     "parameters": {"t": gradient_t}},
        "nearswap_f32": {"merge_method": "nearswap", "base_model": str(fbase), "models": [_m(f0)],
                         "parameters": {"t": 0.01}},
        "fusion": {"merge_method": "arcee_fusion", "base_model": str(base), "models": [_m(s0)]},
        "fusion_out_bf16": {"merge_method": "arcee_fusion", "base_model": str(base), "models": [_m(s1)],
                            "out_dtype": "bfloat16"},
        "fusion_f32": {"merge_method": "arcee_fusion", "base_model": str(fbase), "models": [_m(f0)]},
        "fusion_big": {"merge_method": "arcee_fusion", "base_model": str(big[0]), "models": [_m(big[1])]},
        "ram": {"merge_method": "ram", "base_model": str(base), "models": three,
                "parameters": {"epsilon": [{"filter": "mlp", "value": 0.02}, {"value": [0.01, 0.03]}]}},
        "ram_f32": {"merge_method": "ram", "base_model": str(fbase), "models": two, "parameters": {"epsilon": 0.015}},
        "ramplus": {"merge_method": "ramplus_tl", "base_model": str(base), "models": three,
                    "parameters": {"epsilon": [0.01, 0.02], "r": 0.5, "alpha": [{"filter": "mlp", "value": 0.1},
                                                                              {"value": 0.3}]}},
        "ramplus_out_bf16": {"merge_method": "ramplus_tl", "base_model": str(base), "models": three,
                             "parameters": {"epsilon": 0.015}, "out_dtype": "bfloat16"},
        "ramplus_f32": {"merge_method": "ramplus_tl", "base_model": str(fbase), "models": two,
                        "parameters": {"epsilon": 0.015}},
        "passthrough": {"merge_method": "passthrough",
                        "models": [_m(s0, scale=[{"filter": "o_proj", "value": 0}, {"value": [0.37, 1.5]}])]},
        "passthrough_f32": {"merge_method": "passthrough", "models": [_m(f0, scale=0.3)]},
        # a frankenmerge in layer order: layers 0-1 from s0, layer 2 from s1 (scaled), embeddings from s0,
        # final norm and lm_head from s1 (with the last slice's scale)
        "passthrough_slices": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(s0), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(s1), "layer_range": [2, 3], "parameters": {"scale": 0.5}}]}]},
    }


CHUNKED = ("fusion", "fusion_big", "ramplus", "ram", "nearswap", "passthrough_slices")


@pytest.fixture(scope="module")
def outputs(pairs, big_pair, tmp_path_factory):
    """name -> (mergekit's tensors, our folder, our folder with small chunks and 3 threads or None)."""
    bf = pairs("llama", torch.bfloat16, sft_count=3)
    f32 = pairs("llama", torch.float32, sft_count=2)
    configs = recipes(bf, f32, big_pair)
    root = tmp_path_factory.mktemp("misc")
    oracle: dict = {}

    def batch():
        try:
            oracle["run"] = run_mergekit_many(configs, root / "mergekit", random_seed=0)
        except BaseException as e:  # re-raised below, in the test's thread
            oracle["run"] = e

    thread = threading.Thread(target=batch)
    thread.start()
    ours = {}
    for name, config in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        merge.run(str(path), out=root / "ours" / name, options=Options.of(threads=1))
        chunked = None
        if name in CHUNKED:
            chunked = root / "chunked" / name
            chunk = 64 if name != "fusion_big" else 4096
            merge.run(str(path), out=chunked, options=Options.of(threads=3, chunk_elements=chunk))
        ours[name] = (root / "ours" / name, chunked)
    thread.join()
    if isinstance(oracle["run"], BaseException):
        raise oracle["run"]
    return {name: (load_folder_tensors(oracle["run"][name]), *ours[name]) for name in configs}


NAMES = list(recipes((0, (1, 2, 3)), (0, (1, 2)), (0, 1)))


@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_with_mergekit_yaml(outputs, name):
    theirs, folder, _ = outputs[name]
    ours = load_tensors(folder)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        mine = ours[key]
        assert mine.dtype == value.dtype and mine.shape == value.shape, (key, mine.dtype, value.dtype)
        assert torch.equal(mine, value), (name, key, (mine.double() - value.double()).abs().max().item())


@pytest.mark.parametrize("name", CHUNKED)
def test_bytes_do_not_depend_on_chunks_or_threads(outputs, name):
    _, folder, chunked = outputs[name]
    assert file_bytes(folder) == file_bytes(chunked)


def test_widened_dtypes_are_written_as_mergekit_writes_them(outputs):
    """bf16 inputs: arcee_fusion and ramplus_tl results are float32 (their float32 mask/lambdas), written so
    unless out_dtype is set; nearswap and ram stay bfloat16."""
    def dtypes(name):
        return {t.dtype for t in load_tensors(outputs[name][1]).values()}

    assert dtypes("fusion") == {torch.float32} and dtypes("ramplus") == {torch.float32}
    assert dtypes("fusion_out_bf16") == {torch.bfloat16} and dtypes("ramplus_out_bf16") == {torch.bfloat16}
    assert dtypes("nearswap") == {torch.bfloat16} and dtypes("ram") == {torch.bfloat16}


def test_the_sampled_threshold_is_drawn_from_the_seeded_generator(big_pair):
    """Above 1e6 entries the quantiles come from 1e6 positions drawn by torch.randint after manual_seed(seed):
    the merged tensor equals the whole-tensor function under that global seed, and a different seed moves the
    threshold."""
    base, sft = (load_tensors(p)["model.embed_tokens.weight"] for p in big_pair)
    assert base.numel() > fusion.SAMPLE_SIZE
    importance = fusion.fusion_importance(base, sft)
    torch.manual_seed(0)
    whole = fusion.fusion_threshold(*fusion.order_statistics(importance))
    positions = fusion.sampled_positions(base.numel(), fusion.ArceeFusion(("base", "sft0"), seed=0))
    streamed = fusion.fusion_threshold(*fusion.order_statistics(importance.reshape(-1)[positions], sample_size=None))
    assert torch.equal(whole, streamed)
    other = fusion.sampled_positions(base.numel(), fusion.ArceeFusion(("base", "sft0"), seed=1))
    moved = fusion.fusion_threshold(*fusion.order_statistics(importance.reshape(-1)[other], sample_size=None))
    assert not torch.equal(whole, moved)
    exact = fusion.fusion_threshold(*fusion.order_statistics(importance, sample_size=None))
    assert abs(float(moved) - float(exact)) < 0.05 * float(exact)  # a sample of 1e6 is close to the exact fence


def test_passthrough_slices_take_each_layer_from_its_slice_and_load(outputs, pairs):
    base, (s0, s1, _) = pairs("llama", torch.bfloat16, sft_count=3)
    _, folder, _ = outputs["passthrough_slices"]
    ours, a, b = load_tensors(folder), load_tensors(s0), load_tensors(s1)
    assert torch.equal(ours["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"] * 0.5)
    # tensors after the layers take the last slice's source and parameters (as mergekit: scaled too)
    assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"] * 0.5)
    assert torch.isfinite(load_logits(folder)).all()


def test_float32_results_load_in_transformers(outputs):
    assert torch.isfinite(load_logits(outputs["fusion"][1])).all()
    assert torch.isfinite(load_logits(outputs["ramplus"][1])).all()


# -- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}]}, "exactly one model"),
    ({"merge_method": "passthrough", "base_model": "c", "models": [{"model": "a"}]}, "remove base_model"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]},
                                                             {"model": "b", "layer_range": [0, 1]}]}]},
     "exactly one model"),
    ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}],
      "parameters": {"t": 0.1}}, "exactly two models"),
    ({"merge_method": "arcee_fusion", "models": [{"model": "a"}]}, "needs base_model"),
    ({"merge_method": "ram", "models": [{"model": "a"}]}, "needs base_model"),
    # other methods keep the rule that every slice takes the same models
    ({"merge_method": "ram", "base_model": "b", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}]},
        {"sources": [{"model": "c", "layer_range": [1, 2]}]}]}, "models differ"),
])
def test_mergekit_recipes_out_of_contract_are_one_line_errors(config, message, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


# -- our format and CLI --------------------------------------------------------------------------------------
def test_cli_nearswap_clips_the_delta_to_the_distance(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    result = CliRunner().invoke(main, ["nearswap", "--sft", str(sft), "--base", str(base), "--distance", "0.01",
                                       "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    ours, b, s = load_tensors(tmp_path / "o"), load_tensors(base), load_tensors(sft)
    for key in b:
        assert torch.equal(ours[key], nearswap.nearswap(b[key], s[key], 0.01)), key
        clipped = b[key] + (s[key] - b[key]).clamp(-0.01, 0.01)
        assert torch.allclose(ours[key], clipped, atol=1e-6), key


def test_cli_ram_and_plus_over_several_sfts(pairs, tmp_path):
    base, sfts = pairs("llama", torch.float32, sft_count=2)
    runner = CliRunner()
    args = ["ram", "--base", str(base)] + [a for s in sfts for a in ("--sft", str(s))] + ["--epsilon", "0.015"]
    assert runner.invoke(main, args + ["-o", str(tmp_path / "ram"), "-q"]).exit_code == 0
    result = runner.invoke(main, args + ["--plus", "--r", "0.5", "--alpha", "0.3", "-o", str(tmp_path / "plus"), "-q"])
    assert result.exit_code == 0, result.output
    b, xs = load_tensors(base), [load_tensors(s) for s in sfts]
    plain, plus = load_tensors(tmp_path / "ram"), load_tensors(tmp_path / "plus")
    for key in b:
        assert torch.equal(plain[key], ram.ram(b[key], [x[key] for x in xs], epsilon=0.015)), key
        assert torch.equal(plus[key], ram.ramplus_tl(b[key], [x[key] for x in xs], r=0.5, alpha=0.3,
                                                     epsilon=0.015)), key


def test_cli_fusion_equals_the_whole_tensor_function(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    result = CliRunner().invoke(main, ["fusion", "--sft", str(sft), "--base", str(base), "-o", str(tmp_path / "o"),
                                       "-q"])
    assert result.exit_code == 0, result.output
    ours, b, s = load_tensors(tmp_path / "o"), load_tensors(base), load_tensors(sft)
    for key in b:
        assert torch.equal(ours[key], fusion.arcee_fusion(b[key], s[key])), key


@pytest.mark.parametrize("args, message", [
    (["nearswap", "--distance", "0"], "distance"),
    (["ram", "--r", "0.5"], "only with --plus"),
])
def test_cli_bad_parameters_are_one_line_errors(pairs, tmp_path, args, message):
    base, sft = pairs("llama", torch.float32)
    result = CliRunner().invoke(main, [args[0], "--sft", str(sft), "--base", str(base), *args[1:],
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, params, expected", [
    ("nearswap", {"t": 0.02}, {"method": "nearswap", "distance": 0.02}),
    ("ram", {"epsilon": 0.01}, {"method": "ram", "epsilon": 0.01}),
    ("ramplus_tl", {"r": 0.3}, {"method": "ram", "plus": True, "r": 0.3, "alpha": 0.2}),
    ("arcee_fusion", {}, {"method": "arcee_fusion"}),
])
def test_convert_to_our_format(method, params, expected, tmp_path):
    config = {"merge_method": method, "base_model": "org/base", "models": [{"model": "org/a"}],
              **({"parameters": params} if params else {})}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["convert", str(path)])
    assert result.exit_code == 0, result.output
    ours = yaml.safe_load(result.output)
    assert {k: ours.get(k) for k in expected} == expected
    assert ours["base"] == "org/base" and ours["sft"] in (["org/a"], [{"model": "org/a"}])


def test_convert_refuses_passthrough(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": "org/a"}]}))
    result = CliRunner().invoke(main, ["convert", str(path)])
    assert result.exit_code == 2 and "passthrough" in result.output
