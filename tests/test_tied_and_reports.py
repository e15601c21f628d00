"""Tied/untied mismatches, duplicate inputs, card front matter, and reports that must not look like results."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import merge
from merge.errors import InputError
from merge.methods.reference import slerp as slerp_fn
from merge.options import Options
from tests.checkpoints import perturb, save_tokenizer, tiny_config
from tests.helpers import load_tensors

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _llama(folder: Path, tied: bool, seed: int | None) -> Path:
    """A tiny float32 Llama, tied or with its own (distinct) lm_head; ``seed`` perturbs it (the 'SFT')."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight + 0.05 * torch.randn(model.lm_head.weight.shape))
    if seed is not None:
        perturb(model, seed, scale=0.05)
    model.save_pretrained(folder)
    save_tokenizer(folder, 96)
    return folder


@pytest.fixture(scope="module")
def tie_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return {("base", tied): _llama(root / f"base_{tied}", tied, None) for tied in (True, False)} | {
        ("sft", tied): _llama(root / f"sft_{tied}", tied, 100) for tied in (True, False)}


def _head(tensors: dict) -> torch.Tensor:
    """A model's effective output head: its lm_head, or its input embedding when tied."""
    return tensors.get(HEAD, tensors[EMBED])


def _logits(model) -> torch.Tensor:
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


def _direct_model(folder: Path, tensors: dict, tied: bool):
    """A Llama built from the config's shapes and ``tensors`` with our own tie setting (not the folder's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config)
    model.load_state_dict(tensors, strict=not tied)
    if tied:
        model.tie_weights()
    return model.eval()


METHODS = {
    "linear": {"t": 0.4},
    "slerp": {"t": 0.4},
    "task_arithmetic": {"scale": 0.7},
}


def _expected_head(method: str, sft_head: torch.Tensor, base_head: torch.Tensor) -> torch.Tensor:
    if method == "linear":
        return sft_head * 0.6 + base_head * 0.4
    if method == "task_arithmetic":
        return base_head + 0.7 * (sft_head - base_head)
    return slerp_fn(sft_head.double().reshape(-1), base_head.double().reshape(-1), 0.4)[0].float().reshape(
        sft_head.shape)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("base_tied,sft_tied", [(True, False), (False, True)])
def test_tied_and_untied_inputs_give_an_untied_merge_of_the_heads(tie_models, tmp_path, method, base_tied,
                                                                  sft_tied):
    from transformers import AutoModelForCausalLM

    base, sft = tie_models[("base", base_tied)], tie_models[("sft", sft_tied)]
    out = tmp_path / "o"
    summary = merge.merge(method, sft=sft, base=base, out=out, **METHODS[method])
    b, s, o = load_tensors(base), load_tensors(sft), load_tensors(out)
    assert set(o) == set(s) | set(b)  # the lm_head of whichever side has one
    expected = _expected_head(method, _head(s), _head(b))
    if method == "slerp":
        torch.testing.assert_close(o[HEAD], expected, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(o[HEAD], expected, rtol=0, atol=1e-6)
    assert not torch.equal(o[HEAD], o[EMBED])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tied_label = f"{'base' if base_tied else 'SFT'} {base if base_tied else sft}"
    note = next(n for n in summary.notes if n.startswith("lm_head:"))
    assert f"{tied_label} has tied embeddings" in note and "untied (tie_word_embeddings: false)" in note
    assert note in (out / "README.md").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    direct = _direct_model(out, o, tied=False)
    assert torch.equal(_logits(loaded), _logits(direct))
    assert not torch.allclose(_logits(loaded), _logits(_direct_model(out, o, tied=True)))  # the head matters


def test_both_tied_stays_tied_with_no_lm_head(tie_models, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = merge.merge("linear", sft=tie_models[("sft", True)], base=tie_models[("base", True)], t=0.4,
                          out=tmp_path / "o")
    o = load_tensors(tmp_path / "o")
    assert HEAD not in o
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(n.startswith("lm_head:") for n in summary.notes)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_both_untied_config_bytes_unchanged(tie_models, tmp_path):
    sft = tie_models[("sft", False)]
    summary = merge.merge("linear", sft=sft, base=tie_models[("base", False)], t=0.4, out=tmp_path / "o")
    config = json.loads((sft / "config.json").read_text())
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written == {**config, "dtype": written["dtype"]}
    assert not any(n.startswith("lm_head:") for n in summary.notes)


@pytest.mark.parametrize("base_tied", [True, False])
def test_mergekit_format_tie_mismatch_matches_mergekit_tensors(tie_models, tmp_path, base_tied):
    """mergekit merges the heads the same way (its config keeps base_model's tie setting; ours is untied)."""
    from tests.mergekit_runner import run_mergekit

    base, sft = tie_models[("base", base_tied)], tie_models[("sft", not base_tied)]
    config = {"merge_method": "linear", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(base), "parameters": {"weight": 0.3}},
                         {"model": str(sft), "parameters": {"weight": 0.7}}]}
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(yaml.safe_dump(config))
    summary = merge.run(recipe, out=tmp_path / "ours")
    theirs = load_tensors(run_mergekit(config, tmp_path / "theirs"))
    ours = load_tensors(tmp_path / "ours")
    assert ours.keys() == theirs.keys() and HEAD in ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any(n.startswith("lm_head:") for n in summary.notes)


@pytest.mark.parametrize("base_tied", [True, False])
def test_sweep_candidate_over_tied_and_untied_equals_the_written_merge(tie_models, tmp_path, base_tied):
    """The sweep's in-place model is untied like the written merge, so it evaluates the merged head."""
    from merge import api
    from merge.recover.inplace import InPlaceModel

    base, sft = tie_models[("base", base_tied)], tie_models[("sft", not base_tied)]
    recipe = api.build_recipe({"method": "linear", "base": str(base), "sft": [str(sft)], "t": 0.4})
    resolved, _ = api.resolve_inputs(recipe)
    models = {k: api.open_model(m, k, resolved) for k, m in resolved.items()}
    inplace = InPlaceModel(models, {k: k for k in models}, torch.device("cpu"), recipe)
    inplace.apply(recipe)
    api.run(recipe, out=tmp_path / "o")
    written = load_tensors(tmp_path / "o")
    params = dict(inplace.model.named_parameters())
    assert set(params) == set(written)
    for name, tensor in written.items():
        assert torch.equal(params[name].detach(), tensor), name


# -- duplicate inputs --------------------------------------------------------------------------------------
def test_the_same_model_twice_is_one_line_naming_both(tie_models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from merge.cli import main

    base, sft = tie_models[("base", False)], tie_models[("sft", False)]
    monkeypatch.chdir(sft.parent)
    again = f"./{sft.name}/"  # another spelling of the same folder
    result = CliRunner().invoke(main, ["task-arithmetic", "--base", str(base), "--sft", str(sft), "--sft", again,
                                       "--scale", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: SFT {sft} and SFT {again} are the same model ({sft}); each input must be a different model "
        "(give the SFT and the base it was fine-tuned from, each once)"]
    monkeypatch.chdir(base.parent)
    with pytest.raises(InputError, match=f"^base {base.name} and SFT {base} are the same model"):
        merge.merge("linear", sft=str(base), base=base.name, t=0.5, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_mergekit_recipe_listing_a_model_twice_is_refused(tie_models, tmp_path):
    base, sft = tie_models[("base", False)], tie_models[("sft", False)]
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {sft}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {base}\n    parameters: {{weight: 0.2}}\n"
                      f"  - model: {sft}\n    parameters: {{weight: 0.3}}\n")
    with pytest.raises(InputError) as e:
        merge.run(recipe, out=tmp_path / "o")
    assert str(e.value) == (f"{recipe}:7: models.2.model: '{sft}' is listed twice (also models.0.model); list each "
                            "model once (mergekit refuses duplicate merge inputs)")
    recipe.write_text(f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\n"
                      f"models:\n  - model: {base}\n  - model: {base}/.\n")  # the same folder, spelled twice
    with pytest.raises(InputError, match="are the same model"):
        merge.run(recipe, out=tmp_path / "o")


# -- cards, dry runs and task-arithmetic settings ----------------------------------------------------------
def test_card_lists_only_hub_inputs_as_base_model(tie_models, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    for who in ("base", "sft"):  # local folders spelled like Hub ids: org/name
        shutil.copytree(tie_models[(who, False)], tmp_path / "acme" / who)
    merge.merge("linear", sft="acme/sft", base="acme/base", t=0.3, out=tmp_path / "o")
    card = (tmp_path / "o" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and front["base_model_relation"] == "merge"
    assert f"| base | `{tmp_path / 'acme' / 'base'}` (local folder) |" in card
    assert "not Hub models" in card


def test_dry_run_of_slerp_prints_no_computed_statistics(tie_models):
    summary = merge.merge("slerp", sft=tie_models[("sft", False)], base=tie_models[("base", False)], t=0.3,
                          options=Options.of(dry_run=True))
    text = summary.report()
    assert "took the spherical branch" not in text and "fell back" not in text and " deg" not in text
    assert "slerp: each tensor's angle between the two inputs is computed while merging" in text


def test_task_arithmetic_summary_and_card_state_every_setting(pairs, tmp_path):
    base, (s0, s1) = pairs("llama", torch.float32, sft_count=2)
    summary = merge.merge("task_arithmetic", sft=[s0, s1], base=base, scale=[0.6, 0.3], sparsify="random",
                          density=0.5, seed=7, sign_consensus=True, out=tmp_path / "dare")
    lines = summary.report().splitlines()
    assert f"scales: 0.6 (SFT {s0}), 0.3 (SFT {s1})" in lines
    assert ("sparsify: random (DARE: entries kept at random), density 0.5, seed 7, survivors divided by the "
            "density") in lines
    assert "sign consensus: sum (TIES sign election: the sign of the summed deltas)" in lines
    method = (tmp_path / "dare" / "README.md").read_text().split("## Method")[1].split("## Inputs")[0]
    assert "Sparsify: random" in method and "density 0.5, seed 7" in method and "Sign consensus: sum" in method
    plain = merge.merge("task_arithmetic", sft=[s0], base=base, scale=0.7, sparsify="breadcrumbs", density=0.4,
                        gamma=0.05, options=Options.of(dry_run=True)).report().splitlines()
    assert f"scale: 0.7 (SFT {s0})" in plain and "sign consensus: none" in plain
    assert ("sparsify: breadcrumbs (the largest gamma and the smallest entries dropped), density 0.4, gamma 0.05"
            in plain)
    whole = merge.merge("task_arithmetic", sft=[s0], base=base, scale=0.7,
                        options=Options.of(dry_run=True)).report().splitlines()
    assert "sparsify: none (whole deltas are added)" in whole


# -- sweep reports ------------------------------------------------------------------------------------------
def _candidate(t, general_bpb, domain_bpb, label=None):
    from merge import api
    from merge.evaluate import ProbeScore
    from merge.recover.result import Candidate

    recipe = api.build_recipe({"method": "linear", "base": "b", "sft": ["s"], "t": 0.0 if t is None else t})
    nats = math.log(2) * 1000  # bits per byte = value with 1000 bytes
    return Candidate(label or f"t={t:g}", recipe, ProbeScore(general_bpb * nats, 100, 1000),
                     ProbeScore(domain_bpb * nats, 100, 1000), t)


def _synthetic_sweep(schedule_wins: bool):
    from merge.recover.result import ScheduleOutcome, SweepResult, with_recovery

    rows = [_candidate(0.0, 3.0, 1.0), _candidate(0.4, 1.5, 1.2), _candidate(0.7, 1.9, 1.6),
            _candidate(1.0, 2.0, 3.0)]  # t=0.4 beats the base on the general probes: general_recovered 1.5
    for c in rows:
        with_recovery(c, rows[-1], rows[0])
    best = with_recovery(_candidate(None, 1.7, 1.1, label="blocks(t=0.5/0.3/0.1)"), rows[-1], rows[0])
    probes = {f"{k}_{part}": f"{k}.txt" for k in ("general", "domain") for part in ("select", "report")}
    result = SweepResult(rows, rows[1], "keep-domain", 0.9, probes, schedule=ScheduleOutcome(
        "blocks", best, 5, True, wins=schedule_wins, seconds=2.5))
    result.written = best if schedule_wins else rows[1]
    return result


def test_sweep_explains_general_recovered_above_one():
    result = _synthetic_sweep(schedule_wins=False)
    assert result.rows[1].recovery.general_recovered == pytest.approx(1.5)
    note = ("general_recovered above 1 (up to 1.500, t=0.4): the merge scores better than the base on the general "
            "probes (G_m < G_base)")
    assert result.score_notes()[0].startswith(note)
    assert f"note: {note}" in result.summary()
    assert note in result.card_section()


@pytest.mark.parametrize("schedule_wins", [True, False])
def test_sweep_plot_marks_the_candidate_written(schedule_wins):
    from merge.recover.result import tradeoff_figure

    result = _synthetic_sweep(schedule_wins)
    left, right = tradeoff_figure(result).axes
    labels = right.get_legend_handles_labels()
    stars = {label: line for line, label in zip(*labels) if line.get_marker() == "*"}
    assert len(stars) == 1
    (label, star), = stars.items()
    picked = result.written
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (picked.recovery.general_recovered,
                                                          picked.recovery.domain_retained)
    left_labels = left.get_legend_handles_labels()[1]
    if schedule_wins:
        assert label == "chosen: blocks(t=0.5/0.3/0.1)"
        assert "best global t = 0.4 (a schedule was chosen)" in left_labels
        assert "best global t = 0.4" in labels[1]
    else:
        assert label == "chosen" and "chosen t = 0.4" in left_labels
        assert "blocks schedule (not chosen)" in labels[1]


def test_sweep_time_includes_the_schedule_search(pairs, tmp_path):
    from tests.test_sweep import _probes

    base, sft = pairs("llama")
    general, domain = _probes(tmp_path)
    result = merge.sweep(str(sft), str(base), domain, general, t_values=[0.5], schedule="blocks", budget=3)
    search = result.schedule.seconds
    assert search > 0
    parts = (result.seconds_load + result.seconds_set + result.seconds_eval + result.seconds_report + search
             + result.seconds_write)
    assert parts <= result.seconds_total
    time_line = result.summary().splitlines()[-1]
    assert time_line.startswith("time: ") and f"schedule search {search:.1f}s (" in time_line
    assert result.to_dict()["seconds"]["schedule_search"] == search


# -- the README's plan example ----------------------------------------------------------------------------
def test_readme_plan_example_runs_as_written_and_prints_what_the_readme_shows(monkeypatch):
    """The `$ merge plan ...` block of README.md, run from the repository root, prints exactly that block
    (the memory estimate's number depends on the thread count)."""
    import re
    import shlex

    from click.testing import CliRunner

    from merge.cli import main

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"```\n\$ (merge plan [^\n]+)\n(.*?)```", readme, re.S)
    command, shown = block.group(1), block.group(2)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output

    def number_free(text):
        return re.sub(r"(estimated peak memory of the merge buffers: )[\d.]+ MB", r"\1N MB", text).rstrip()

    assert number_free(result.output) == number_free(shown)
    assert "resolved parameters" in shown and "layer 2" in shown
