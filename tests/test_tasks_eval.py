"""lm-eval tasks: our engine against lm-eval's own simple_evaluate, holdout parts, the result cache, per-item
forgetting against a direct computation, `merge evaluate`, and one-line errors. Offline, tiny models, local
tasks in tests/tasks (multiple_choice, loglikelihood, generate_until over words of the test tokenizer)."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import: every task here is local

import hashlib
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
from merge.errors import InputError
from merge.evaluate.benchmark import forgetting, load_model
from merge.evaluate.cache import ResultCache, TaskEvaluator, candidate_fingerprint
from merge.evaluate.harness import EvalSettings
from merge.evaluate.tasks import TaskSuite
from merge.options import Options

TASKS = Path(__file__).with_name("tasks")
NAMES = ["tiny_gen", "tiny_ll", "tiny_mc"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the models are tiny, and OpenMP's overhead would dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_model(pairs):
    _, sft = pairs("llama")
    return load_model(sft, "sft", "cpu")


def test_scores_equal_lm_eval_simple_evaluate_of_the_folder(pairs, sft_model, monkeypatch):
    """Our engine on the model in memory gives lm-eval's own numbers for the same model read from disk by
    HFLM(pretrained=<folder>), per task and per document, with limit, few-shot, seed and chat template."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, sft = pairs("llama")
    settings = EvalSettings(limit=6, num_fewshot=1, seed=3, apply_chat_template=True)
    suite = TaskSuite(str(TASKS), settings=settings)
    ours = TaskEvaluator(*sft_model, settings).evaluate(suite, "fingerprint").scores
    monkeypatch.chdir(TASKS)  # lm-eval itself reads the YAMLs' relative data files from the working directory
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(sft), device="cpu", batch_size=1), tasks=NAMES,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), limit=6, num_fewshot=1,
        apply_chat_template=True, random_seed=3, numpy_random_seed=3, torch_random_seed=3, fewshot_random_seed=3,
        log_samples=True)
    assert sorted(ours) == NAMES
    assert {n: s.metric for n, s in ours.items()} == {"tiny_gen": "exact_match", "tiny_ll": "acc", "tiny_mc": "acc"}
    for name, score in ours.items():
        row = theirs["results"][name]
        assert score.value == row[f"{score.metric},none"]
        assert score.stderr == row[f"{score.metric}_stderr,none"]
        assert score.higher_is_better is theirs["higher_is_better"][name][score.metric]
        assert score.items == {r["doc_hash"]: float(r[score.metric]) for r in theirs["samples"][name]}
        assert score.n == 6
    assert 0 < ours["tiny_mc"].value < 1  # the comparison is not between two constant columns


def test_in_place_changes_are_seen_by_the_same_wrapper(pairs, sft_model):
    """The HFLM wrapper keeps nothing weight-dependent: set the base's weights into the resident SFT model in
    place, and the same evaluator scores exactly what a fresh one on the base model scores."""
    base_dir, sft_dir = pairs("llama")
    settings = EvalSettings(apply_chat_template=False)
    suite = TaskSuite(str(TASKS / "tiny_mc.yaml"), settings=settings)
    model, tok = load_model(sft_dir, "sft", "cpu")
    evaluator = TaskEvaluator(model, tok, settings)
    before = evaluator.evaluate(suite, "sft").scores["tiny_mc"]
    base_model, base_tok = load_model(base_dir, "base", "cpu")
    with torch.no_grad():
        for p, q in zip(model.parameters(), base_model.parameters()):
            p.copy_(q)
    after = evaluator.evaluate(suite, "base").scores["tiny_mc"]
    fresh = TaskEvaluator(base_model, base_tok, settings).evaluate(suite, "base").scores["tiny_mc"]
    assert after == fresh
    assert after.items != before.items


def _content_hash(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, indent=2, ensure_ascii=False).encode()).hexdigest()


def test_holdout_parts_are_deterministic_disjoint_and_by_content(sft_model):
    settings = EvalSettings(apply_chat_template=False)
    one, two = (TaskSuite(str(TASKS), holdout=0.5, settings=settings) for _ in range(2))
    for name, info in one.tasks.items():
        select, report = info.parts["select"], info.parts["report"]
        assert (select, report) == (two.tasks[name].parts["select"], two.tasks[name].parts["report"])
        assert select and report and not set(select) & set(report)
        assert sorted(select + report) == list(range(len(info.doc_ids)))
        docs = [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]
        assert report == [i for i, d in enumerate(docs) if int(_content_hash(d)[:16], 16) < 0.5 * 2 ** 64]
    limited = TaskSuite(str(TASKS), holdout=0.5, settings=EvalSettings(limit=6))  # --limit first, then the split
    for name, info in limited.tasks.items():
        assert info.parts["report"] == [i for i in one.tasks[name].parts["report"] if i < 6]
    # each part is evaluated on its own documents; for a mean metric its value is the mean over the part
    evaluator = TaskEvaluator(*sft_model, settings)
    whole = evaluator.evaluate(TaskSuite(str(TASKS), settings=settings), "fp").scores
    parts = {p: evaluator.evaluate(one, "fp", p).scores for p in ("select", "report")}
    for name, score in whole.items():
        sel, rep = parts["select"][name].items, parts["report"][name].items
        assert not set(sel) & set(rep) and {**sel, **rep} == score.items
        assert parts["select"][name].value == pytest.approx(sum(sel.values()) / len(sel), abs=1e-12)
        assert parts["select"][name].n == len(one.tasks[name].parts["select"])


def test_cache_returns_the_same_numbers_and_is_invalidated(sft_model, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    settings = EvalSettings(limit=8, apply_chat_template=False)
    cache = ResultCache(tmp_path / "cache")
    evaluator = TaskEvaluator(*sft_model, settings, cache)
    suite = TaskSuite(str(tasks / "tiny_mc.yaml"), settings=settings)
    first = evaluator.evaluate(suite, "weights-a")
    assert first.cached == []
    again = evaluator.evaluate(suite, "weights-a")
    assert again.cache_hit and again.scores == first.scores
    assert evaluator.evaluate(suite, "weights-b").cached == []  # other weights
    other = EvalSettings(limit=8, num_fewshot=1, apply_chat_template=False)  # another parameter
    assert TaskEvaluator(*sft_model, other, cache).evaluate(TaskSuite(str(tasks / "tiny_mc.yaml"), settings=other),
                                                            "weights-a").cached == []
    chat = EvalSettings(limit=8, apply_chat_template=True)
    assert TaskEvaluator(*sft_model, chat, cache).evaluate(suite, "weights-a").cached == []
    lines = (tasks / "tiny_mc.jsonl").read_text().splitlines()
    doc = json.loads(lines[0])
    doc["label"] = (doc["label"] + 1) % 3  # the task's data changes
    (tasks / "tiny_mc.jsonl").write_text("\n".join([json.dumps(doc), *lines[1:]]) + "\n")
    assert evaluator.evaluate(TaskSuite(str(tasks / "tiny_mc.yaml"), settings=settings), "weights-a").cached == []
    yaml_text = (tasks / "tiny_mc.yaml").read_text()
    (tasks / "tiny_mc.yaml").write_text(yaml_text.replace('doc_to_text: "{{text}}"', 'doc_to_text: "{{text}} w1"'))
    assert evaluator.evaluate(TaskSuite(str(tasks / "tiny_mc.yaml"), settings=settings), "weights-a").cached == []
    assert TaskEvaluator(*sft_model, settings, None).evaluate(suite, "weights-a").cached == []  # --no-cache


def _direct_mc_correct(folder: Path) -> dict[str, bool]:
    """Per document of tiny_mc: is the labelled choice the one with the highest log-likelihood after the text
    (computed here with torch; the word-level tokenizer adds no special tokens)."""
    model, tok = load_model(folder, "model", "cpu")
    out = {}
    for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = tok(doc["text"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            ids = tok(doc["text"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        out[_content_hash(doc)] = max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return out


def test_merge_evaluate_forgetting_and_recovery(pairs, tmp_path):
    base, sft = pairs("llama")
    mid = tmp_path / "mid"
    merge.merge("linear", sft=str(sft), base=str(base), t=0.5, out=str(mid))
    result = merge.evaluate([str(mid)], base=str(base), sft=str(sft), general_tasks=f"{TASKS}/tiny_mc.yaml",
                            domain_tasks=f"{TASKS}/tiny_ll.yaml,{TASKS}/tiny_gen.yaml", apply_chat_template=False,
                            cache_dir=tmp_path / "cache", threads=1)
    direct = {label: _direct_mc_correct(path) for label, path in (("base", base), ("mid", mid), ("sft", sft))}
    assert {d: v == 1.0 for d, v in result.model("base").scores["general"]["tiny_mc"].items.items()} == direct["base"]
    for label in ("sft", str(mid)):
        counts = result.forgetting("general")[label]["tiny_mc"]
        model = direct["sft" if label == "sft" else "mid"]
        assert counts.forgotten == sum(direct["base"][d] and not model[d] for d in model)
        assert counts.gained == sum(model[d] and not direct["base"][d] for d in model)
        assert counts.compared == 10
    # domain side: against the SFT; general_recovered from the metric values, or left out with a note
    assert set(result.forgetting("domain")) == {"base", str(mid)}
    g = {label: result.model(label).scores["general"]["tiny_mc"] for label in ("base", "sft", str(mid))}
    recovered = result.side_scores("general")[str(mid)]
    if "tiny_mc" in recovered.per_task:
        gained, possible = g[str(mid)].value - g["sft"].value, g["base"].value - g["sft"].value
        assert recovered.per_task["tiny_mc"] == gained / possible
    else:
        assert abs(g["base"].value - g["sft"].value) <= (g["base"].stderr ** 2 + g["sft"].stderr ** 2) ** 0.5
    table = result.table()
    assert "tiny_mc" in table and "forgotten / gained" in table and "chat template off" in table
    data = result.to_dict()
    assert data["forgetting"]["general"][str(mid)]["tiny_mc"]["forgotten"] == \
        result.forgetting("general")[str(mid)]["tiny_mc"].forgotten
    again = merge.evaluate([str(mid)], base=str(base), sft=str(sft), general_tasks=f"{TASKS}/tiny_mc.yaml",
                           domain_tasks=f"{TASKS}/tiny_ll.yaml,{TASKS}/tiny_gen.yaml", apply_chat_template=False,
                           cache_dir=tmp_path / "cache", threads=1)
    assert [m.cached for m in again.models] == [3, 3, 3]
    assert again.to_dict()["models"][2]["scores"] == data["models"][2]["scores"]
    merge.merge("linear", sft=str(sft), base=str(base), t=0.2, out=str(mid),
                options=Options.of(force=True))  # same name, new weights
    changed = merge.evaluate([str(mid)], base=str(base), sft=str(sft), general_tasks=f"{TASKS}/tiny_mc.yaml",
                             apply_chat_template=False, cache_dir=tmp_path / "cache", threads=1)
    assert [m.cached for m in changed.models] == [1, 1, 0]


def test_candidate_fingerprint_depends_on_inputs_and_parameters():
    one = candidate_fingerprint({"sft": "a", "base": "b"}, {"method": "linear", "t": 0.3})
    assert one == candidate_fingerprint({"base": "b", "sft": "a"}, {"t": 0.3, "method": "linear"})
    assert one != candidate_fingerprint({"sft": "a", "base": "c"}, {"method": "linear", "t": 0.3})
    assert one != candidate_fingerprint({"sft": "a", "base": "b"}, {"method": "linear", "t": 0.4})


def test_demo_cloze_tasks_show_forgetting_and_domain_gain():
    from merge.demo import ASSETS

    tasks = ASSETS / "tasks"
    result = merge.evaluate([], base=str(ASSETS / "base"), sft=str(ASSETS / "sft"),
                            general_tasks=str(tasks / "demo_general_cloze.yaml"),
                            domain_tasks=str(tasks / "demo_domain_cloze.yaml"), no_cache=True, threads=1)
    assert "chat template on: the SFT's tokenizer has a chat template" in result.table()
    base, sft = result.model("base").scores, result.model("sft").scores
    from merge.evaluate.benchmark import differs

    assert base["general"]["demo_general_cloze"].value > sft["general"]["demo_general_cloze"].value
    assert sft["domain"]["demo_domain_cloze"].value > base["domain"]["demo_domain_cloze"].value
    assert differs(base["general"]["demo_general_cloze"], sft["general"]["demo_general_cloze"])
    assert differs(base["domain"]["demo_domain_cloze"], sft["domain"]["demo_domain_cloze"])
    assert forgetting(sft["general"]["demo_general_cloze"], base["general"]["demo_general_cloze"]).forgotten > 0


# ---- one-line errors through the real CLI --------------------------------------------------------------


def _cli(args, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", *args, "--cache-dir", str(tmp_path / "cache")])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result.exit_code, lines


def test_errors_are_one_line_exit_2(pairs, tmp_path):
    base, _ = pairs("llama")
    no_metric = tmp_path / "no_metric.yaml"
    text = (TASKS / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: no_metric")
    no_metric.write_text(text[:text.index("metric_list:")] + "metric_list:\n  - metric: bypass\n")
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(text.replace("no_metric", "no_data").replace("test: tiny_mc.jsonl", "test: missing.jsonl"))
    hub_only = tmp_path / "hub_only.yaml"
    hub_only.write_text(text.replace("no_metric", "hub_only").replace("dataset_path: json", "dataset_path: org/ds")
                        .replace("dataset_kwargs:\n  data_files:\n    test: tiny_mc.jsonl\n", ""))
    shutil.copy(TASKS / "tiny_mc.jsonl", tmp_path / "tiny_mc.jsonl")
    cases = {
        "no_such_task_xyz": "unknown lm-eval task",
        str(no_metric): "no usable metric",
        str(no_data): "cannot load it (FileNotFoundError",
        str(hub_only): "OfflineModeIsEnabled",
    }
    for spec, message in cases.items():
        code, lines = _cli([str(base), "--general-tasks", spec], tmp_path)
        assert code == 2 and len(lines) == 1 and message in lines[0], (spec, lines)
    code, lines = _cli([str(base), "--general-tasks", str(TASKS / "tiny_mc.yaml"), "--metric", "tiny_mc=f1"],
                       tmp_path)
    assert code == 2 and "has no metric 'f1' (it has: acc, acc_norm)" in lines[0]
    with pytest.raises(InputError, match="--holdout 1.5"):
        TaskSuite(str(TASKS), holdout=1.5)


def test_task_names_from_tasks_path_and_metric_choice(tmp_path, monkeypatch):
    """A name from a --tasks-path folder loads its YAML with data next to it (from any working directory);
    --metric picks another metric of the task."""
    monkeypatch.chdir(tmp_path)
    suite = TaskSuite("tiny_mc,tiny_gen", tasks_path=[str(TASKS)], metrics={"tiny_mc": "acc_norm", "other": "acc"})
    assert suite.names() == ["tiny_mc", "tiny_gen"]
    assert suite.tasks["tiny_mc"].metric == "acc_norm" and suite.tasks["tiny_gen"].metric == "exact_match"
    assert suite.unmatched_metrics == ["other"] and len(suite.tasks["tiny_mc"].doc_ids) == 10


BLOCK_LM_EVAL = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval' (blocked for this test)")
sys.meta_path.insert(0, Block())
import merge, merge.recover, merge.evaluate.probes  # the probe path needs no lm_eval
assert "lm_eval" not in sys.modules
from merge.cli import main
sys.argv = ["merge"] + sys.argv[1:]
main()
"""


def test_missing_extra_says_what_to_install(pairs):
    base, _ = pairs("llama")
    proc = subprocess.run([sys.executable, "-c", BLOCK_LM_EVAL, "evaluate", str(base), "--general-tasks",
                           str(TASKS / "tiny_mc.yaml")], check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "pip install mergeback[eval]" in proc.stderr and proc.stderr.startswith("error: ")


def test_settings_do_not_leak_between_evaluations(sft_model):
    """Few-shot and gen_kwargs of one evaluation are not left in the shared task objects for the next."""
    plain = EvalSettings(apply_chat_template=False)
    shared = TaskSuite(f"{TASKS}/tiny_mc.yaml,{TASKS}/tiny_gen.yaml", settings=plain)
    other = EvalSettings(num_fewshot=1, gen_kwargs="max_gen_toks=1", apply_chat_template=False)
    TaskEvaluator(*sft_model, other).evaluate(shared, "fp")
    after = TaskEvaluator(*sft_model, plain).evaluate(shared, "fp").scores
    fresh = TaskEvaluator(*sft_model, plain).evaluate(
        TaskSuite(f"{TASKS}/tiny_mc.yaml,{TASKS}/tiny_gen.yaml", settings=plain), "fp").scores
    assert after == fresh
