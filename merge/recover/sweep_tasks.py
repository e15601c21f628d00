"""lm-eval tasks in a sweep: the selection and report suites of each side, and scoring a candidate set in place.

A side (general or domain) is scored by its probe files, its tasks, or both. Its number for a candidate is the
mean of its parts: the probe fraction (on bits per byte, as without tasks) and each task's fraction
``(m - start)/(end - start)`` on the task's primary metric (general: start = SFT, end = base; domain: start =
base, end = SFT), leaving out a part that cannot measure anything (a probe set the SFT did not change in the
expected direction, a task whose base and SFT scores do not differ beyond their standard error), with a note.

Selection vs report: ``holdout`` splits every selection task's documents by content hash (selection part
chooses, report part reports); report tasks (``general_report_tasks``/``domain_report_tasks``) are evaluated
whole on the report side instead (a side may have report tasks and no selection tasks: then its tasks only
report). One :class:`~merge.evaluate.cache.TaskEvaluator` (one HFLM) wraps the resident model for the whole
sweep; results are cached by the inputs' fingerprints and the candidate's resolved parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..evaluate.benchmark import SIDES, chat_template_choice, parse_metrics, weights_fingerprint
from ..evaluate.cache import ResultCache, TaskEvaluator, candidate_fingerprint
from ..evaluate.harness import EvalSettings, require_lm_eval
from ..evaluate.tasks import TaskSuite, split_specs

TASK_ONLY_OPTIONS = ("limit", "num_fewshot", "seed", "apply_chat_template", "gen_kwargs", "metrics", "cache_dir")


@dataclass
class SweepTasks:
    """Per side: (suite, part) for selection and for the report; the settings passed to lm-eval."""

    select: dict[str, tuple[TaskSuite, str]]
    report: dict[str, tuple[TaskSuite, str]]
    settings: EvalSettings
    distinct: bool  # the report part differs from the selection part on some side
    cache: ResultCache | None
    holdout: float | None
    chat_note: str = ""
    inputs: dict = field(default_factory=dict)
    evaluator: TaskEvaluator | None = None

    def choose_chat_template(self, tokenizer, apply_chat_template: bool | None) -> str:
        """Decide the chat template from the SFT's tokenizer (default: on when it has one); the note says which."""
        import dataclasses

        flag, self.chat_note = chat_template_choice(apply_chat_template, tokenizer, "SFT's")
        self.settings = dataclasses.replace(self.settings, apply_chat_template=flag)
        return self.chat_note

    def start(self, model, tokenizer, apply_chat_template: bool | None, fingerprints: dict, extra: dict) -> str:
        """Decide the chat template and wrap ``model`` in one HFLM for the sweep; ``fingerprints``: the inputs'
        (:func:`input_fingerprints`), ``extra``: what else determines the scores (evaluation dtype, device)."""
        self.choose_chat_template(tokenizer, apply_chat_template)
        self.inputs = dict(fingerprints) | extra
        self.evaluator = TaskEvaluator(model, tokenizer, self.settings, self.cache)
        return self.chat_note

    def fingerprint(self, recipe) -> str:
        """The candidate's weights: the inputs' fingerprints and its resolved parameters (not the inputs' names)."""
        params = recipe.model_dump(mode="json", exclude_none=True)
        for key in ("base", "sft", "out"):
            params.pop(key, None)
        return candidate_fingerprint(self.inputs, params)

    def evaluate(self, recipe, which: str) -> tuple[dict, int, int, float]:
        """Scores per side and task on the ``which`` ("select"/"report") part; (scores, cached, total, seconds)."""
        fp = self.fingerprint(recipe)
        scores, cached, total, seconds = {}, 0, 0, 0.0
        for side, (suite, part) in (self.select if which == "select" else self.report).items():
            run = self.evaluator.evaluate(suite, fp, part)
            scores[side] = run.scores
            cached += len(run.cached)
            total += len(run.scores)
            seconds += run.seconds
        return scores, cached, total, seconds

    def describe(self, which: str) -> str:
        """Which tasks and part, in words: "general = a, b (selection part of --holdout 0.5); domain = c"."""
        parts = []
        for side, (suite, part) in (self.select if which == "select" else self.report).items():
            where = "all documents" if part == "all" else f"{part if part == 'report' else 'selection'} part of " \
                f"--holdout {suite.holdout:g}"
            parts.append(f"{side} = {', '.join(suite.names())} ({where})")
        return "; ".join(parts)

    def columns(self, which: str) -> list[tuple[str, str, str, bool]]:
        """(side, task, metric, higher_is_better) of every task on that side of the report."""
        return [(side, name, info.metric, info.higher_is_better)
                for side, (suite, _) in (self.select if which == "select" else self.report).items()
                for name, info in suite.tasks.items()]


def input_fingerprints(resolved: dict) -> dict:
    """Each resolved input's weights fingerprint (its files, never its name)."""
    return {k: weights_fingerprint(m.path) for k, m in resolved.items()}


def build_tasks(general_tasks, domain_tasks, general_report_tasks=None, domain_report_tasks=None, *, tasks_path=(),
                metrics=None, holdout: float | None = None, settings: EvalSettings, no_cache: bool = False,
                cache_dir=None) -> SweepTasks | None:
    """Load every task (an unknown one is one line, before any model is loaded); None when no task is given."""
    specs = {"general": split_specs(general_tasks), "domain": split_specs(domain_tasks)}
    report_specs = {"general": split_specs(general_report_tasks), "domain": split_specs(domain_report_tasks)}
    if not any(specs.values()) and not any(report_specs.values()):
        return None
    require_lm_eval()
    choice = parse_metrics(metrics)
    select, report = {}, {}
    for side in SIDES:
        if report_specs[side]:
            if specs[side]:
                select[side] = (TaskSuite(specs[side], tasks_path=tasks_path, metrics=choice, settings=settings,
                                          option=f"--{side}-tasks"), "all")
            report[side] = (TaskSuite(report_specs[side], tasks_path=tasks_path, metrics=choice,
                                      settings=settings, option=f"--{side}-report-tasks"), "all")
        elif specs[side]:
            suite = TaskSuite(specs[side], tasks_path=tasks_path, metrics=choice, holdout=holdout,
                              settings=settings, option=f"--{side}-tasks")
            select[side] = (suite, "all" if holdout is None else "select")
            report[side] = (suite, "all" if holdout is None else "report")
    names = {n for d in (select, report) for suite, _ in d.values() for n in suite.tasks}
    unknown = [t for t in choice if t not in names]
    if unknown:
        raise InputError(f"--metric {unknown[0]}=...: no such task among {', '.join(sorted(names))}")
    distinct = any(report_specs.values()) or (holdout is not None and bool(select))
    return SweepTasks(select, report, settings, distinct, None if no_cache else ResultCache(cache_dir), holdout)


def check_task_options(tasks: SweepTasks | None, given: dict) -> None:
    """Options that only apply to tasks are errors without tasks (they would change nothing)."""
    if tasks is not None:
        return
    for name in (*TASK_ONLY_OPTIONS, "tasks_path", "no_cache", "batch_size"):
        value = given.get(name)
        if value not in (None, False, (), [], 1, "1"):
            flag = "--" + name.replace("_", "-").replace("metrics", "metric")
            raise InputError(f"{flag}: applies to lm-eval tasks; give --general-tasks/--domain-tasks or drop it")
