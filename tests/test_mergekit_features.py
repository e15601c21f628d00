"""mergekit recipe features against the real mergekit-yaml 0.1.5: frankenmerge slices, chat_template,
tokenizer_source (different vocabularies), ``model+lora`` references, and configs of mergekit's examples/.

Every oracle run happens in ONE mergekit process (module fixture). Tolerances: bit-exact where mergekit's
arithmetic is reproduced (linear, task arithmetic, LoRA folding in float32), float32 rounding for slerp
(mergekit computes its coefficients in float32, we in float64), ~1 ulp for float16/bfloat16 configs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizerFast

import merge
from merge.cli import main
from merge.io.views import layered_config, row_sources
from merge.options import Options
from tests.checkpoints import make_model, make_pair
from tests.helpers import load_tensors, ulps
from tests.mergekit_runner import load_folder_tensors, run_mergekit_many

LITERAL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny float32 Llamas (3 layers): a base with two SFTs; a base with 96 tokens and an SFT with 100
    (4 new words, and <unk>/</s> at other ids); a LoRA adapter over the base; float16 copies."""
    root = tmp_path_factory.mktemp("features")
    base, (s0, s1) = make_pair(root / "p32", "llama", torch.float32, sft_count=2)
    vbase, vsft = make_pair(root / "vocab", "llama", torch.float32, added_tokens=4)
    hbase, (h0, h1) = make_pair(root / "p16", "llama", torch.float16, sft_count=2)
    lora = root / "lora"
    model = get_peft_model(make_model("llama", 0, torch.float32),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(lora)
    paths = dict(base=base, s0=s0, s1=s1, vbase=vbase, vsft=vsft, lora=lora, hbase=hbase, h0=h0, h1=h1)
    # mergekit's tests/test_tokenizer.py models: 64 BPE tokens; "padded" adds 4 tokens past its 64 rows;
    # "chatml" (and a second one here) 2 added tokens with 66 rows
    for i, (name, rows, added) in enumerate([("tbase", 64, []), ("tpadded", 64, [f"<UNUSED_{k}>" for k in range(4)]),
                                             ("tchatml", 66, ["<|im_start|>", "<|im_end|>"]),
                                             ("tchatml2", 66, ["<|im_start|>", "<|im_end|>"])]):
        folder = root / name
        make_model("llama", 10 + i, torch.float32, vocab=rows).save_pretrained(folder)
        _bpe_tokenizer(64, added, root / f"{name}-scratch").save_pretrained(folder)
        paths[name] = folder
    return {k: str(v) for k, v in paths.items()}


def _bpe_tokenizer(vocab_size: int, added: list[str], scratch: Path):
    """mergekit's tests' ``make_tokenizer``: ``<unk> <s> </s> _tok_3...`` as a BPE vocabulary, plus added tokens."""
    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size))), "merges": []},
            "added_tokens": []}
    scratch.mkdir(parents=True)
    (scratch / "tokenizer.json").write_text(json.dumps(data))
    tok = LlamaTokenizerFast(tokenizer_file=str(scratch / "tokenizer.json"))
    tok.add_tokens(added)
    return tok


def _src(ref, layers, **params):
    return {"model": ref, "layer_range": layers, **({"parameters": params} if params else {})}


def _m(ref, **params):
    return {"model": ref, "parameters": params} if params else {"model": ref}


def recipes(c: dict) -> dict[str, dict]:
    b, s0 = c["base"], c["s0"]
    return {
        # layers [0,3) then [1,3) again: 5 layers, the gradient restarting in every slice
        "franken_linear": {"merge_method": "linear", "dtype": "float32", "slices": [
            {"sources": [_src(s0, [0, 3], weight=[1.0, 0.0]), _src(b, [0, 3], weight=0.5)]},
            {"sources": [_src(s0, [1, 3], weight=0.3), _src(b, [1, 3], weight=0.7)]}]},
        # reordered, the two sources taking different ranges of the same length
        "franken_slerp": {"merge_method": "slerp", "base_model": b, "parameters": {"t": [0.2, 0.8]}, "slices": [
            {"sources": [_src(b, [2, 3]), _src(s0, [0, 1])]},
            {"sources": [_src(b, [0, 2]), _src(s0, [1, 3])]}]},
        "chat_named": {"merge_method": "linear", "models": [_m(b, weight=0.5), _m(s0, weight=0.5)],
                       "chat_template": "chatml"},
        "chat_literal": {"merge_method": "task_arithmetic", "base_model": b, "models": [_m(s0, weight=0.5)],
                         "chat_template": LITERAL_TEMPLATE},
        "tok_model": {"merge_method": "task_arithmetic", "base_model": c["vbase"], "dtype": "float32",
                      "models": [_m(c["vsft"], weight=0.5)], "tokenizer_source": c["vsft"]},
        "tok_base": {"merge_method": "linear", "base_model": c["vbase"], "tokenizer_source": "base",
                     "models": [_m(c["vsft"], weight=0.3), _m(c["vbase"], weight=0.7)]},
        "lora_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                                 "models": [_m(f"{b}+{c['lora']}", weight=0.7), _m(s0, weight=0.5)]},
        "lora_linear": {"merge_method": "linear",
                        "models": [_m(f"{b}+{c['lora']}", weight=0.6), _m(s0, weight=0.4)]},
        **examples(c),
        **mergekit_tests(c),
    }


def mergekit_tests(c: dict) -> dict[str, dict]:
    """Configs of mergekit's own tests (tests/test_basic_merges.py two_model_config, test_chat_template.py,
    test_tokenizer.py make_config) over the tiny checkpoints."""
    def two(method, base=None, **params):
        return {"merge_method": method, **({"base_model": base} if base else {}),
                "models": [_m(c["s0"], weight=0.6), _m(c["s1"], weight=0.4)], "dtype": "bfloat16",
                **({"parameters": params} if params else {})}

    def tokens(models, source=None):
        return {"merge_method": "linear", "base_model": c["tbase"], "models": [_m(c[m], weight=1.0) for m in models],
                "dtype": "float32", **({"tokenizer_source": source} if source else {})}

    def chat(template):
        return {"merge_method": "linear", "base_model": c["tbase"], "dtype": "bfloat16", "chat_template": template,
                "models": [_m(c["tbase"], weight=0.5), _m(c["tpadded"], weight=0.5)]}

    return {
        "mk_linear": two("linear"),
        "mk_slerp": two("slerp", c["s0"], t=0.35),
        "mk_task_arithmetic": two("task_arithmetic", c["base"]),
        "mk_breadcrumbs": two("breadcrumbs", c["base"]),
        "mk_ties_f32": {**two("ties", c["base"], density=0.3), "dtype": "float32"},  # bf16: ties at the cut, below
        "mk_model_stock": {**two("model_stock", c["base"]), "models": [_m(c["s0"]), _m(c["s1"])]},
        "mk_model_stock_filterwise": {**two("model_stock", c["base"], filter_wise=True),
                                      "models": [_m(c["s0"]), _m(c["s1"])]},
        # test_passthrough_scale and test_gpt2_stack (a model's whole stack twice)
        "mk_passthrough_scale": {"merge_method": "passthrough", "dtype": "bfloat16",
                                 "models": [_m(c["s0"], scale=[{"filter": "o_proj", "value": 0}, {"value": 1}])]},
        "mk_stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                     "slices": [{"sources": [_src(c["s0"], [0, 3])]}] * 2},
        "mk_chat_chatml": chat("chatml"),
        "mk_chat_literal": chat("{{messages[0]['content']}}"),
        "mk_tokenizer_source_base": tokens(["tbase", "tpadded", "tchatml"], "base"),
        "mk_tokenizer_source_model": tokens(["tbase", "tpadded", "tchatml"], c["tchatml"]),
        # <|im_start|> is in two models but not in base_model: the others get the average of those two rows
        "tokenizer_average": tokens(["tbase", "tpadded", "tchatml", "tchatml2"], c["tchatml"]),
    }


def examples(c: dict) -> dict[str, dict]:
    """mergekit's examples/ configs (linear.yml, gradient-slerp.yml, orcamini-platy-44layer.yml, ties.yml) with
    their models mapped to tiny checkpoints (float16 as the examples say) and layer ranges to their 3 layers."""
    b, h0, h1 = c["hbase"], c["h0"], c["h1"]
    return {
        "example_linear": {"models": [_m(h0, weight=1.0), _m(h1, weight=0.5), _m(b, weight=0.3)],
                           "merge_method": "linear", "dtype": "float16"},
        "example_gradient_slerp": {
            "slices": [{"sources": [_src(b, [0, 3]), _src(h0, [0, 3])]}],
            "merge_method": "slerp", "base_model": b,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
            "dtype": "float16"},
        # orcamini-platy-44layer.yml: [0, 24) of one 40-layer model, then [20, 40) of another (a frankenmerge of
        # two models with overlapping ranges), here [0, 2) of h0 and [1, 3) of h1
        "example_orcamini_platy": {"slices": [{"sources": [_src(h0, [0, 2])]}, {"sources": [_src(h1, [1, 3])]}],
                                   "merge_method": "passthrough", "dtype": "float16"},
        # float32 here: in float16 a few elements differ from mergekit (our ties kernel in half precision, noted
        # in docs/mergekit-semantics.md 5.1), which no feature of this file is about
        "example_ties": {"models": [_m(c["s0"], density=[1, 0.7, 0.1], weight=1.0),
                                    _m(c["s1"], density=0.5, weight=[0, 0.3, 0.7, 1])],
                         "merge_method": "ties", "base_model": c["base"],
                         "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"},
    }


PENDING_EXAMPLES = ("bakllama.yml (passthrough; not among the stored mergekit examples)",)


@pytest.fixture(scope="module")
def outputs(ckpt, tmp_path_factory):
    """name -> (mergekit's folder, ours), every oracle run in one mergekit process."""
    configs = recipes(ckpt)
    root = tmp_path_factory.mktemp("feature-runs")
    oracle: dict = {}

    def run_oracle():
        try:
            oracle["run"] = run_mergekit_many(configs, root / "mergekit", copy_tokenizer=True,
                                              lora_merge_cache=str(root / "lora-cache"))
        except BaseException as e:  # re-raised in the fixture's thread
            oracle["run"] = e

    batch = threading.Thread(target=run_oracle)
    batch.start()
    runner = CliRunner()
    for name, config in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = runner.invoke(main, ["run", str(path), "-o", str(root / "ours" / name), "-q"])
        assert result.exit_code == 0, (name, result.output, result.exception)
    batch.join()
    if isinstance(oracle["run"], BaseException):
        raise oracle["run"]
    return {name: (oracle["run"][name], root / "ours" / name) for name in configs}


def _compare(outputs, name, exact=True):
    theirs_dir, ours_dir = outputs[name]
    theirs, ours = load_folder_tensors(theirs_dir), load_tensors(ours_dir)
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        if exact:
            assert torch.equal(ours[k], theirs[k]), (k, (ours[k].float() - theirs[k].float()).abs().max())
        elif theirs[k].dtype == torch.bfloat16:  # within ~1 bf16 ulp where mergekit computes in bf16
            torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=2 ** -7, atol=1e-5, msg=k)
        elif theirs[k].dtype == torch.float16:
            torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=2 ** -10, atol=1e-5, msg=k)
        else:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    return theirs, ours


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# -- frankenmerge slices ---------------------------------------------------------------------------------------
def test_frankenmerge_linear_is_bit_exact_with_five_layers(outputs, ckpt):
    theirs, ours = _compare(outputs, "franken_linear")
    mk, here = outputs["franken_linear"]
    assert _config(here)["num_hidden_layers"] == _config(mk)["num_hidden_layers"] == 5
    # output layer 3 is input layer 1 at the second slice's start: 0.3 * s0 + 0.7 * base, summed in order
    s0, base = load_tensors(Path(ckpt["s0"])), load_tensors(Path(ckpt["base"]))
    name = "model.layers.{}.mlp.up_proj.weight"
    expected = torch.zeros_like(base[name.format(1)])
    expected.addcmul_(s0[name.format(1)], torch.tensor(0.3)).addcmul_(base[name.format(1)], torch.tensor(0.7))
    assert torch.equal(ours[name.format(3)], expected.div_(torch.tensor([0.3, 0.7]).sum()))


def test_frankenmerge_slerp_reorders_each_source_by_its_own_range(outputs):
    _compare(outputs, "franken_slerp", exact=False)
    assert _config(outputs["franken_slerp"][1])["num_hidden_layers"] == 3


def test_frankenmerge_loads_in_transformers_with_finite_logits(outputs):
    model = AutoModelForCausalLM.from_pretrained(outputs["franken_linear"][1])
    assert len(model.model.layers) == 5
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_frankenmerge_bytes_do_not_depend_on_chunks_or_threads(ckpt, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipes(ckpt)["franken_linear"], sort_keys=False))
    merge.run(recipe, tmp_path / "a", options=Options.of(threads=1))
    merge.run(recipe, tmp_path / "b", options=Options.of(threads=3, chunk_elements=1 << 8))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_per_layer_config_lists_follow_the_slices():
    config = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "hidden_size": 8}
    assert layered_config(config, [0, 1, 2, 1, 2]) == {"num_hidden_layers": 5, "hidden_size": 8,
                                                      "layer_types": ["a", "b", "c", "b", "c"]}
    nested = layered_config({"text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"]}}, [2, 0])
    assert nested == {"text_config": {"num_hidden_layers": 2, "layer_types": ["c", "a"]}}


# -- chat_template --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chat_named", "chat_literal"])
def test_chat_template_is_written_as_mergekit_writes_it(outputs, name):
    _compare(outputs, name)
    mk, here = outputs[name]
    assert (here / "chat_template.jinja").read_bytes() == (mk / "chat_template.jinja").read_bytes()
    assert "chat_template" not in json.loads((here / "tokenizer_config.json").read_text())
    theirs, ours = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(here)
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.chat_template != AutoTokenizer.from_pretrained(outputs["franken_linear"][1]).chat_template


# -- tokenizer_source -----------------------------------------------------------------------------------------
def test_tokenizer_source_model_maps_rows_by_token_string(outputs, ckpt):
    theirs, ours = _compare(outputs, "tok_model")
    mk, here = outputs["tok_model"]
    assert _config(here)["vocab_size"] == _config(mk)["vocab_size"] == 100
    assert AutoTokenizer.from_pretrained(here).get_vocab() == AutoTokenizer.from_pretrained(mk).get_vocab()
    base, sft = load_tensors(Path(ckpt["vbase"])), load_tensors(Path(ckpt["vsft"]))
    emb = "model.embed_tokens.weight"
    # </s> is id 95 in the base and 99 in the SFT: the output's row 99 is base row 95 + 0.5 * (sft 99 - base 95)
    assert torch.equal(ours[emb][99], base[emb][95] + 0.5 * (sft[emb][99] - base[emb][95]))
    # w94 exists only in the SFT: every input takes the SFT's row, so the merge gives it back
    assert torch.equal(ours[emb][94], sft[emb][94])


def test_tokenizer_source_base_drops_the_sfts_extra_rows(outputs):
    _compare(outputs, "tok_base")
    mk, here = outputs["tok_base"]
    assert _config(here)["vocab_size"] == _config(mk)["vocab_size"] == 96


def test_tokenizer_source_reads_rows_chunk_by_chunk(ckpt, tmp_path, outputs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipes(ckpt)["tok_model"], sort_keys=False))
    merge.run(recipe, tmp_path / "o", options=Options.of(chunk_elements=100, threads=2))  # chunks end inside rows
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == \
        (outputs["tok_model"][1] / "model.safetensors").read_bytes()


def test_rows_for_missing_tokens_follow_mergekit():
    """Per output row: own row when present; else the only donor, zeros, base_model's row, or the average."""
    perms = {"base": [0, -1, -1, -1, 4], "sft0": [0, 1, -1, 3, -1], "sft1": [0, 5, -1, 2, 6]}
    rows = row_sources(perms, "base")
    assert rows["base"].fill == {1: (("sft0", 1), ("sft1", 5)), 2: (), 3: (("sft0", 3), ("sft1", 2))}
    assert rows["sft0"].fill == {2: (), 4: (("base", 4),)}  # base_model has it: its row, not the average
    assert rows["sft1"].fill == {2: ()}


def test_union_tokenizer_is_a_named_refusal(ckpt, tmp_path):
    config = dict(recipes(ckpt)["tok_base"], tokenizer_source="union")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "tokenizer_source: union" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# -- model+lora -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lora_task_arithmetic", "lora_linear"])
def test_lora_reference_folds_on_read_like_mergekit(outputs, name):
    _compare(outputs, name)


def test_lora_reference_changes_only_the_adapted_tensors(outputs, ckpt, tmp_path):
    config = recipes(ckpt)["lora_task_arithmetic"]
    config["models"][0]["model"] = ckpt["base"]  # the adapter left out: base with weight 0.7 adds nothing
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    merge.run(tmp_path / "r.yaml", tmp_path / "o")
    plain, folded = load_tensors(tmp_path / "o"), load_tensors(outputs["lora_task_arithmetic"][1])
    changed = {k for k in plain if not torch.equal(plain[k], folded[k])}
    assert changed and all(any(m in k for m in ("q_proj", "v_proj", "down_proj")) for k in changed)


# -- mergekit's examples/ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(examples({k: "" for k in ("hbase", "h0", "h1", "base", "s0", "s1")})))
def test_mergekit_examples_agree(outputs, name):
    _compare(outputs, name, exact=False)


@pytest.mark.parametrize("name", sorted(mergekit_tests(dict.fromkeys(
    ("s0", "s1", "base", "tbase", "tpadded", "tchatml", "tchatml2"), ""))))
def test_mergekit_test_configs_agree(outputs, ckpt, name):
    if name.startswith("mk_model_stock"):  # float64 Gram sums vs mergekit's bf16 intermediates: a few ulps
        theirs_dir, ours_dir = outputs[name]
        theirs, ours = load_folder_tensors(theirs_dir), load_tensors(ours_dir)
        inputs = [load_tensors(Path(ckpt[k])) for k in ("s0", "s1", "base")]
        assert set(ours) == set(theirs)
        assert max(ulps(ours[k], theirs[k], [x[k] for x in inputs]) for k in theirs) <= 8
        return
    rounded = ("mk_linear", "mk_slerp", "mk_task", "mk_bread", "mk_ties")
    theirs, ours = _compare(outputs, name, exact=not name.startswith(rounded))
    mk, here = outputs[name]
    assert _config(here).get("vocab_size") == _config(mk).get("vocab_size")
    if name == "mk_stack":
        assert _config(here)["num_hidden_layers"] == _config(mk)["num_hidden_layers"] == 6
    if name == "mk_passthrough_scale":
        assert all(not t.any() for k, t in ours.items() if "o_proj" in k)
    if "chat" in name or "tokenizer" in name:
        assert AutoTokenizer.from_pretrained(here).get_vocab() == AutoTokenizer.from_pretrained(mk).get_vocab()
        assert AutoTokenizer.from_pretrained(here).chat_template == AutoTokenizer.from_pretrained(mk).chat_template


def test_a_token_two_models_share_takes_their_average(outputs, ckpt):
    _, ours = _compare(outputs, "tokenizer_average")
    emb = "model.embed_tokens.weight"
    a, b = load_tensors(Path(ckpt["tchatml"]))[emb][64], load_tensors(Path(ckpt["tchatml2"]))[emb][64]
    average = (torch.zeros_like(a) + a + b) / 2  # what tbase and tpadded take for <|im_start|>
    assert torch.equal(ours[emb][64], ((average + average) + a + b) / 4)


# -- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"chat_template": "chatmlx"}, "chat_template: 'chatmlx' is neither a template name"),
    ({"slices": [{"sources": [_src("A", [0, 2]), _src("B", [0, 3])]}]}, "layer ranges have different lengths"),
    ({"slices": [{"sources": [_src("A", [2, 2])]}]}, "[2, 2) is empty"),
    ({"tokenizer_source": "elsewhere"}, "not one of the recipe's models"),
])
def test_bad_feature_settings_are_one_line_errors(tmp_path, change, message):
    config = {"merge_method": "linear", "models": [_m("A", weight=1.0), _m("B", weight=1.0)], **change}
    if "slices" in change:
        del config["models"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_layer_past_the_model_is_named(ckpt, tmp_path):
    config = {"merge_method": "linear", "slices": [{"sources": [_src(ckpt["s0"], [0, 4], weight=0.5),
                                                                 _src(ckpt["base"], [0, 4], weight=0.5)]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "layer 3" in result.output and "does not exist" in result.output, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, problem", [
    ({"slices": [{"sources": [_src("A", [0, 2]), _src("B", [0, 2])]},
                 {"sources": [_src("A", [1, 2]), _src("B", [1, 2])]}]}, "slices that reorder or repeat layers"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"tokenizer_source": "A"}, "tokenizer_source: A"),
    ({"models": [_m("A+L", weight=0.5), _m("B", weight=0.5)]}, "'A+L' (a LoRA folded over another model"),
])
def test_convert_names_the_features_our_format_lacks(tmp_path, change, problem):
    config = {"merge_method": "linear", "base_model": "B", "models": [_m("A", weight=0.5), _m("B", weight=0.5)],
              **change}
    if "slices" in change:
        del config["models"]
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "mk.yaml")])
    assert result.exit_code == 2 and "cannot express" in result.output and problem in result.output, result.output


def test_the_plan_says_which_layers_and_rows_the_output_reads(ckpt, tmp_path):
    for name, expected in [("franken_linear", "5 layers read its layers 0, 1, 2, 1, 2"),
                           ("tok_model", "100 vocabulary rows in the output tokenizer's order by token string, 4 "
                                         "filled")]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipes(ckpt)[name], sort_keys=False))
        summary = merge.run(tmp_path / f"{name}.yaml", options=Options.of(dry_run=True))
        assert any(expected in note for note in summary.notes), summary.notes


def test_relative_references_reproduce_from_merge_recipe_yaml(ckpt, tmp_path, monkeypatch):
    """The written recipe pins every reference, tokenizer_source and model+adapter included."""
    monkeypatch.chdir(Path(ckpt["base"]).parent.parent)
    for name, config in [("tok", {"merge_method": "task_arithmetic", "base_model": "vocab/base", "dtype": "float32",
                                  "models": [_m("vocab/sft", weight=0.5)], "tokenizer_source": "vocab/sft"}),
                         ("lora", {"merge_method": "linear", "models": [_m("p32/base+lora", weight=0.6),
                                                                          _m("p32/sft0", weight=0.4)]})]:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        merge.run(tmp_path / f"{name}.yaml", tmp_path / name)
        merge.run(tmp_path / name / "merge_recipe.yaml", tmp_path / f"{name}-again")
        assert (tmp_path / name / "model.safetensors").read_bytes() == \
            (tmp_path / f"{name}-again" / "model.safetensors").read_bytes()
