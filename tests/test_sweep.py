"""The sweep: in-place candidates equal written merges bit for bit; schedules; the CLI's errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from merge import api
from merge.cli import main
from merge.evaluate import encode, load_probes, score
from merge.recipes.operations import operations_for
from merge.recover.inplace import InPlaceModel, estimate_bytes
from merge.recover.search import block_ranges, blocks_recipe, coordinate_search, lines_recipe
from merge.recover.sweep import load_tokenizer
from tests.helpers import load_tensors


def _probes(folder: Path) -> tuple[Path, Path]:
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(90)}" for _ in range(n))

    general = folder / "general.txt"
    general.write_text("\n\n".join(words(25) for _ in range(12)) + "\n")
    domain = folder / "domain.jsonl"
    domain.write_text("".join(json.dumps({"instruction": words(4), "input": words(2), "output": words(6)}) + "\n"
                              for _ in range(12)))
    return general, domain


def _open(sft, base, method="linear"):
    recipe = api.build_recipe({"method": method, "base": str(base), "sft": [str(sft)], "t": 0.0})
    resolved, _ = api.resolve_inputs(recipe)
    labels = {k: k for k in resolved}
    models = {k: api.open_model(m, labels[k], resolved) for k, m in resolved.items()}
    return recipe, models, labels


def _loaded(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _assert_in_place_equals_written(inplace, candidate, tmp_path: Path) -> Path:
    """Every parameter the in-place model holds for ``candidate`` equals what ``merge run`` writes, bit for bit."""
    out = tmp_path / "written"
    api.run(candidate, out=out)
    written = load_tensors(out)
    params = dict(inplace.model.named_parameters())
    assert set(written) == set(params)
    for name, tensor in written.items():
        assert torch.equal(params[name].detach(), tensor.float()), name
    return out


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_in_place_candidate_equals_the_written_merge(pairs, tmp_path, method):
    base, sft = pairs("llama", added_tokens=3)  # added vocabulary rows take the SFT's values
    general, domain = _probes(tmp_path)
    recipe, models, labels = _open(sft, base, method)
    inplace = InPlaceModel(models, labels, torch.device("cpu"), recipe)
    tokenizer = load_tokenizer(models["sft0"], models["base"])
    docs = encode(load_probes(general).documents + load_probes(domain).documents, tokenizer)
    candidate = recipe.model_copy(update={"t": 0.3})
    inplace.apply(candidate)
    in_place_score = score(inplace.model, docs)
    out = _assert_in_place_equals_written(inplace, candidate, tmp_path)
    assert score(_loaded(out), docs) == in_place_score  # the same bits per byte, exactly


def test_sweep_writes_the_chosen_t_with_its_scores(pairs, tmp_path):
    base, sft = pairs("llama")
    general, domain = _probes(tmp_path)
    out = tmp_path / "recovered"
    result = merge.sweep(str(sft), str(base), domain, general, out=out, t_values=[0.25, 0.5])
    assert [c.t for c in result.rows] == [0.0, 0.25, 0.5, 1.0]
    assert result.written is result.chosen
    models = _open(sft, base)[1]
    tokenizer = load_tokenizer(models["sft0"], models["base"])
    written = _loaded(out)
    assert score(written, encode(load_probes(general).documents, tokenizer, 20_000)) == result.chosen.general
    card = (out / "README.md").read_text()
    assert "## Recovery" in card and f"{result.chosen.general.bpb:.4f}" in card
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["chosen_t"] == result.chosen.t and len(saved["rows"]) == 4
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert any("same probes" in n for n in result.notes)  # no report split: says the numbers are optimistic


def test_lines_and_blocks_schedules_resolve_to_the_intended_t_per_layer(pairs, tmp_path):
    base, sft = pairs("llama")  # 3 layers
    recipe, models, labels = _open(sft, base)
    lines = lines_recipe(recipe, 0.2, 1.0)  # lam(l) = 0.2 + 0.8*(l-1)/(L-1): t = 0.8, 0.4, 0.0
    op_for = operations_for(lines, 3)
    ts = [op_for.describe(f"model.layers.{i}.mlp.up_proj.weight") for i in range(3)]
    assert ts == ["0.8", "0.4", "0"]
    assert lines.schedule.preset == "lines" and lines.t is None
    blocks = blocks_recipe(recipe, (0.6, 0.3, 0.1), 3)
    op_for = operations_for(blocks, 3)
    assert [op_for.describe(f"model.layers.{i}.self_attn.q_proj.weight") for i in range(3)] == ["0.6", "0.3", "0.1"]
    assert op_for.describe("model.embed_tokens.weight") == "0.6" and op_for.describe("lm_head.weight") == "0.1"
    assert [list(r) for r in block_ranges(10, 3)] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    inplace = InPlaceModel(models, labels, torch.device("cpu"), recipe)
    inplace.apply(lines)
    api.run(lines, out=tmp_path / "lines")
    written = load_tensors(tmp_path / "lines")
    params = dict(inplace.model.named_parameters())
    assert all(torch.equal(params[n].detach(), t.float()) for n, t in written.items())


def test_coordinate_search_is_bounded_and_only_moves_uphill():
    calls = []

    def height(point):
        return -((point[0] - 0.3) ** 2 + (point[1] - 0.9) ** 2)

    def evaluate(point):
        calls.append(point)
        return height(point)

    best, value, used = coordinate_search((0.5, 0.5), evaluate, key=lambda v: (v,), budget=12)
    assert used == len(calls) <= 12
    assert value == height(best) == max(height(p) for p in calls)
    assert abs(best[0] - 0.3) <= 0.1 and abs(best[1] - 0.9) <= 0.1


def _search_both_ways(rng: random.Random, width: int) -> None:
    n = rng.choice([1, 2, 3])
    target = [rng.random() for _ in range(n)]
    bumps = {}

    def height(point):
        bumps.setdefault(point, rng.random() * 0.02)  # ties and plateaus as real scores have
        return -sum((a - b) ** 2 for a, b in zip(point, target)) + bumps[point]

    start, budget = [rng.random() for _ in range(n)], rng.randint(1, 16)
    asked, batches = [], []
    sequential = coordinate_search(start, lambda p: asked.append(p) or height(p), key=lambda v: (v,), budget=budget)
    batched = coordinate_search(start, None, key=lambda v: (v,), budget=budget, width=width,
                                evaluate_many=lambda points: batches.append(points) or [height(p) for p in points])
    assert batched == sequential
    assert all(len(b) <= width for b in batches)
    evaluated = [p for b in batches for p in b]
    assert len(set(evaluated)) == len(evaluated) and set(asked) <= set(evaluated)
    assert len(batches) <= len(asked)


@pytest.mark.parametrize("width", [2, 3, 6])
def test_coordinate_search_evaluating_points_at_once_takes_the_sequential_path(width):
    """With ``width`` points evaluated at once (a distributed sweep's workers), the search returns the same best
    point, result and count as one point at a time, evaluating no point twice."""
    rng = random.Random(width)
    for _ in range(60):
        _search_both_ways(rng, width)


def test_schedule_search_reports_on_held_out_probes(pairs, tmp_path):
    base, sft = pairs("llama")
    general, domain = _probes(tmp_path)
    result = merge.sweep(str(sft), str(base), domain, general, t_values=[0.5], schedule="blocks", budget=3)
    assert result.schedule is not None and result.schedule.evaluations <= 3
    assert any("held-out" in n for n in result.notes)  # split automatically: a win must be measured there
    assert {r.label for r in result.report} >= {"base (t=1)", "SFT (t=0)"}
    assert "report probes" in result.summary()


def test_memory_estimate_counts_inputs_parameters_and_work_space(pairs):
    base, sft = pairs("llama")
    recipe, models, labels = _open(sft, base)
    from merge.plan import make_plan
    from merge.recover.inplace import NO_SHARDING

    plan = make_plan(models, labels, "sft0", operations_for(recipe, 3), None, NO_SHARDING)
    numel = sum(j.numel for j in plan.jobs)
    largest = max(j.numel for j in plan.jobs)
    assert estimate_bytes(plan, models) == numel * (2 + 2 + 4) + 3 * largest * 8  # bf16 base + SFT, fp32 model


def test_cli_bad_probe_file_is_one_line_naming_file_and_line(pairs, tmp_path):
    base, sft = pairs("llama")
    general, _ = _probes(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "w1", "output": "w2"}\n{"instruction": 3}\n')
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["sweep", "--sft", str(sft), "--base", str(base), "--general", str(general),
                                       "--domain", str(bad), "-o", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {bad}:2: Alpaca record needs a string 'instruction'"]
    assert not out.exists()


def test_cli_refuses_an_existing_output_before_evaluating(pairs, tmp_path):
    base, sft = pairs("llama")
    general, domain = _probes(tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["sweep", "--sft", str(sft), "--base", str(base), "--general", str(general),
                                       "--domain", str(domain), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_lora_adapter_sweeps_like_a_full_checkpoint(pairs, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.checkpoints import make_model

    base, _ = pairs("llama", torch.float32)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(make_model("llama", 0, torch.float32),
                                LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    general, domain = _probes(tmp_path)
    result = merge.sweep(str(adapter), str(base), domain, general, t_values=[0.5], out=tmp_path / "out")
    api.merge("linear", sft=str(adapter), base=str(base), t=result.chosen.t, out=tmp_path / "direct")
    assert load_tensors(tmp_path / "out").keys() == load_tensors(tmp_path / "direct").keys()
    models = _open(adapter, base)[1]
    tokenizer = load_tokenizer(models["sft0"], models["base"])
    docs = encode(load_probes(general).documents, tokenizer, 20_000)
    assert score(_loaded(tmp_path / "direct"), docs) == result.chosen.general


@pytest.mark.parametrize("sparsify", [None, {"method": "magnitude", "density": 0.4},
                                      {"method": "random", "density": 0.5, "seed": 3},
                                      {"method": "breadcrumbs", "density": 0.5, "gamma": 0.05}])
def test_in_place_task_arithmetic_candidate_equals_the_written_merge(pairs, tmp_path, sparsify):
    """ties/dare/breadcrumbs candidates of `merge sweep --candidates` are set with the executor's kernels."""
    base, sft = pairs("llama", added_tokens=3)
    recipe, models, labels = _open(sft, base)
    inplace = InPlaceModel(models, labels, torch.device("cpu"), recipe)
    fields = {"method": "task_arithmetic", "base": str(base), "sft": [{"model": str(sft), "scale": 0.7}]}
    if sparsify:
        fields["sparsify"] = sparsify
    candidate = api.build_recipe(fields)
    inplace.apply(candidate)
    _assert_in_place_equals_written(inplace, candidate, tmp_path)
