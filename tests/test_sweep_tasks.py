"""lm-eval tasks in `merge sweep`: the chosen candidate's numbers against `merge evaluate` and lm-eval's own
simple_evaluate of the written merge, holdout reporting, per-item forgetting, the result cache, probes mixed
with tasks, --candidates, and one-line errors. Offline: the shipped demo pair and its cloze tasks (12 documents
each), plus a second general task (the same documents scored by acc_norm)."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import: every task here is local

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.demo import ASSETS

ROOT = Path(__file__).resolve().parents[1]
SFT, BASE = str(ASSETS / "sft"), str(ASSETS / "base")
GENERAL, DOMAIN = ["demo_general_cloze", "demo_general_norm"], ["demo_domain_cloze"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """The demo cloze tasks, and demo_general_norm: the general documents scored by acc_norm."""
    folder = tmp_path_factory.mktemp("tasks")
    for f in (ASSETS / "tasks").iterdir():
        shutil.copy(f, folder / f.name)
    text = (folder / "demo_general_cloze.yaml").read_text()
    norm = text.replace("task: demo_general_cloze", "task: demo_general_norm").replace("metric: acc\n",
                                                                                          "metric: acc_norm\n")
    assert norm != text and "acc_norm" in norm
    (folder / "demo_general_norm.yaml").write_text(norm)
    return folder


def _specs(tasks: Path, names) -> str:
    return ",".join(str(tasks / f"{n}.yaml") for n in names)


def _sweep(tasks, **kw):
    kw.setdefault("general_tasks", _specs(tasks, GENERAL))
    kw.setdefault("domain_tasks", _specs(tasks, DOMAIN))
    return merge.sweep(SFT, BASE, threads=1, **kw)


@pytest.fixture(scope="module")
def swept(tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("swept")
    result = _sweep(tasks, t_values=[0.4], out=root / "out", cache_dir=root / "cache")
    return result, root


def test_chosen_scores_equal_merge_evaluate_and_lm_eval_of_the_written_merge(swept, tasks, monkeypatch):
    """Two general tasks and one domain task: the in-place scores of the chosen t are the numbers `merge
    evaluate` and lm-eval's simple_evaluate(HFLM(pretrained=<written folder>)) give for the written merge."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    result, root = swept
    chosen = result.chosen
    assert chosen.t == 0.4 and result.written is chosen  # an item is a near tie: evaluated in float32, it flips
    ours = {**chosen.tasks["general"], **chosen.tasks["domain"]}
    assert sorted(ours) == sorted(GENERAL + DOMAIN)
    evaluated = merge.evaluate([str(root / "out")], general_tasks=_specs(tasks, GENERAL),
                               domain_tasks=_specs(tasks, DOMAIN), no_cache=True, threads=1, device="cpu")
    written = {**evaluated.models[0].scores["general"], **evaluated.models[0].scores["domain"]}
    monkeypatch.chdir(tasks)  # lm-eval reads the YAMLs' relative data files from the working directory
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=str(root / "out"), device="cpu", batch_size=1),
                                     tasks=GENERAL + DOMAIN, apply_chat_template=True, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    for name, score in ours.items():
        assert (score.value, score.stderr, score.items) == (written[name].value, written[name].stderr,
                                                            written[name].items), name
        assert score.value == theirs["results"][name][f"{score.metric},none"], name
        assert score.items == {r["doc_hash"]: float(r[score.metric]) for r in theirs["samples"][name]}
    assert 0 < ours["demo_general_cloze"].value < 1
    data = json.loads((root / "out" / "sweep.json").read_text())
    row = next(r for r in data["rows"] if r["t"] == chosen.t)
    assert row["tasks"]["general"]["demo_general_cloze"]["value"] == ours["demo_general_cloze"].value
    assert "demo_general_norm" in (root / "out" / "README.md").read_text()


def test_side_scores_are_the_mean_of_task_fractions(swept):
    """general_recovered = mean over tasks of (G_m - G_sft)/(G_base - G_sft); domain_retained likewise."""
    result, _ = swept
    b, s = result.base, result.sft
    for c in result.rows:
        fr = [(c.tasks["general"][n].value - s.tasks["general"][n].value)
              / (b.tasks["general"][n].value - s.tasks["general"][n].value) for n in GENERAL]
        assert c.recovery.general_recovered == pytest.approx(sum(fr) / len(fr), abs=1e-12)
        d = DOMAIN[0]
        expected = (c.tasks["domain"][d].value - b.tasks["domain"][d].value) / (
            s.tasks["domain"][d].value - b.tasks["domain"][d].value)
        assert c.recovery.domain_retained == pytest.approx(expected, abs=1e-12)
    assert result.sft.recovery.general_recovered == 0 and result.base.recovery.general_recovered == 1


def test_forgetting_counts_match_a_direct_per_item_computation(swept):
    result, root = swept
    b, s = result.base, result.sft
    data = json.loads((root / "out" / "sweep.json").read_text())
    some = False
    for c in result.rows:
        for side, ref in (("general", b), ("domain", s)):
            for name, score in c.tasks[side].items():
                r = ref.tasks[side][name].items
                forgotten = sum(1 for d, v in score.items.items() if r[d] == 1.0 and v == 0.0)
                gained = sum(1 for d, v in score.items.items() if r[d] == 0.0 and v == 1.0)
                f = c.forgetting[side][name]
                assert (f.forgotten, f.gained, f.compared) == (forgotten, gained, 12)
                some = some or forgotten > 0
                row = next(x for x in data["rows"] if x["label"] == c.label)
                assert row["tasks"][side][name]["forgetting"]["forgotten"] == forgotten
    assert some  # the SFT forgot some general items the base knew
    assert f" -{result.sft.forgetting['general']['demo_general_cloze'].forgotten}/+" in result.summary()


def test_a_second_run_with_an_extra_t_evaluates_only_the_new_candidate(swept, tasks):
    result, root = swept
    lines = []
    again = _sweep(tasks, t_values=[0.4, 0.5], cache_dir=root / "cache", echo=lines.append)
    fresh = {c.t: c.cached for c in again.rows}
    assert fresh == {0.0: 3, 0.4: 3, 0.5: 0, 1.0: 3}
    assert all(c.task_count == 3 for c in again.rows)
    old = {c.t: c for c in result.rows}
    for c in again.rows:
        if c.t in old:
            assert {n: s.items for n, s in c.tasks["general"].items()} == \
                {n: s.items for n, s in old[c.t].tasks["general"].items()}
    assert sum("cache hit" in line for line in lines) == 3 and sum("cache miss" in line for line in lines) == 1
    assert all("[set " in line and "eval " in line for line in lines if "t=0." in line)


def test_no_cache_evaluates_everything_and_writes_no_cache(tasks, tmp_path):
    cache = tmp_path / "cache"
    first = _sweep(tasks, t_values=[0.5], cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    again = _sweep(tasks, t_values=[0.5], cache_dir=cache, no_cache=True)
    assert all(c.cached == 0 for c in again.rows) and sorted(p.name for p in cache.iterdir()) == files
    assert [c.recovery for c in again.rows] == [c.recovery for c in first.rows]


def test_holdout_reports_the_report_part_in_card_and_json(tasks, tmp_path):
    out = tmp_path / "out"
    result = _sweep(tasks, t_values=[0.5], holdout=0.5, out=out, no_cache=True)
    data = json.loads((out / "sweep.json").read_text())
    assert data["tasks"]["reported_on"] == "report part only"
    rows = {r["label"]: r for r in data["report"]}
    chosen = rows[f"t={result.chosen.t:g}"]
    parts = {s["part"] for side in chosen["tasks"].values() for s in side.values()}
    assert parts == {"report"}
    selected = {s["part"] for side in data["rows"][1]["tasks"].values() for s in side.values()}
    assert selected == {"select"}
    evaluated = merge.evaluate([str(out)], general_tasks=_specs(tasks, GENERAL), domain_tasks=_specs(tasks, DOMAIN),
                               holdout=0.5, no_cache=True, threads=1, device="cpu")
    for side, per in evaluated.models[0].scores.items():
        for name, s in per.items():
            assert chosen["tasks"][side][name]["value"] == s.value and chosen["tasks"][side][name]["n"] == s.n
            assert s.n < 12
    card = (out / "README.md").read_text()
    assert "report part only" in card and "report part of --holdout 0.5" in card


def test_probes_and_tasks_mix_as_the_mean_of_the_side_parts(tasks):
    """General: a probe file and one task (the side's number is their mean); domain: a task only (no --domain)."""
    probe = ASSETS / "probes" / "general_select.txt"
    result = _sweep(tasks, general=probe, general_tasks=_specs(tasks, GENERAL[:1]), t_values=[0.5], no_cache=True)
    b, s = result.base, result.sft
    assert all(c.domain is None and c.general is not None for c in result.rows)
    for c in result.rows:
        probe_part = (s.general.bpb - c.general.bpb) / (s.general.bpb - b.general.bpb)
        n = GENERAL[0]
        task_part = (c.tasks["general"][n].value - s.tasks["general"][n].value) / (
            b.tasks["general"][n].value - s.tasks["general"][n].value)
        assert c.recovery.general_recovered == pytest.approx((probe_part + task_part) / 2, abs=1e-12)
    assert "general bpb" in result.table() and "domain bpb" not in result.table()


def test_candidates_put_linear_and_slerp_on_one_front(tasks, tmp_path):
    result = _sweep(tasks, t_values=[0.5], candidates="linear,slerp", no_cache=True, plot=tmp_path / "p.png")
    assert [(c.method, c.t) for c in result.rows] == [("linear", 0.0), ("linear", 0.5), ("linear", 1.0),
                                                      ("slerp", 0.5)]
    assert result.rows[1].recipe.method == "linear" and result.rows[3].recipe.method == "slerp"
    assert "slerp 0.5" in result.table() and "pareto" in result.table()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_task_arithmetic_candidates_join_the_front(tasks):
    """ties/dare candidates are set in place with the executor's kernels and scored on the same front."""
    result = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, "--domain-tasks",
                                       _specs(tasks, DOMAIN), "--candidates", "linear,ties@0.3,dare@0.5",
                                       "--t-values", "0.5", "--no-cache", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.strip()[:4] in ("ties", "dare")]
    assert "ties@0.3" in rows and "dare@0.5" in rows, result.output


@pytest.mark.parametrize("candidates, says", [
    ("frobnicate", "--candidates frobnicate: unknown method"),
    ("ties", "--candidates ties: give its value"),
])
def test_bad_candidates_are_one_line(tasks, candidates, says):
    result = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, "--domain-tasks",
                                       _specs(tasks, DOMAIN), "--candidates", candidates, "--no-cache", "--threads",
                                       "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], result.output


def test_unknown_task_is_one_line_before_any_candidate(tasks):
    result = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, "--domain-tasks", "no_such_task_qqq",
                                       "--general-tasks", _specs(tasks, GENERAL)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "error: --domain-tasks no_such_task_qqq: unknown lm-eval task" in errors[0]
    assert "loaded base and SFT" not in result.output and "SFT:" not in result.output  # no candidate evaluated


def test_options_that_need_tasks_or_a_domain_are_errors():
    for args, says in ((["--domain", str(ASSETS / "probes" / "domain_select.jsonl"), "--limit", "5"], "--limit"),
                       ([], "--domain: give domain probes")):
        result = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, *args])
        assert result.exit_code == 2 and says in result.output, result.output


BLOCK_LM_EVAL = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval' (blocked for this test)")
sys.meta_path.insert(0, Block())
from merge.cli import main
sys.argv = ["merge"] + sys.argv[1:]
main()
"""


def test_missing_extra_says_what_to_install(tasks):
    proc = subprocess.run([sys.executable, "-c", BLOCK_LM_EVAL, "sweep", "--sft", SFT, "--base", BASE,
                           "--domain-tasks", _specs(tasks, DOMAIN)], check=False, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "pip install mergeback[eval]" in proc.stderr and proc.stderr.startswith("error: ")
