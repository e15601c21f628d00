"""lm-evaluation-harness: settings passed through, and scoring an in-memory model on a :class:`TaskSuite`.

lm_eval is an optional extra (``pip install mergeback[eval]``), imported only here and only when a task is
used. One :class:`~lm_eval.models.huggingface.HFLM` wraps a resident model; HFLM keeps nothing that depends
on the weights between calls (only the detected batch size), so the caller may change the parameters in
place between evaluations.

Each part of a task's documents (:mod:`.tasks`: all, or the selection/report parts of a holdout) is evaluated
on its own by lm-eval (its ``samples`` option), so every metric, mean-type or corpus-level, is aggregated by
lm-eval itself.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from .tasks import TaskInfo, TaskSuite

INSTALL_HINT = "pip install mergeback[eval]"
PARTS = ("all", "select", "report")


def require_lm_eval():
    """The ``lm_eval`` module, or a one-line InputError saying what to install."""
    try:
        import lm_eval
        import lm_eval.evaluator
    except ImportError as e:
        raise InputError(f"lm-eval tasks need lm-evaluation-harness, which is not installed ({e}); "
                         f"run `{INSTALL_HINT}`") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(require_lm_eval(), "__version__", "unknown")


# ---- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """What is passed through to lm-eval. ``seed`` None keeps lm-eval's default seeds (0, 1234, 1234, 1234);
    an integer sets python, numpy, torch and few-shot seeds to it. ``apply_chat_template`` None: decided by
    the caller (``merge.evaluate``: on when the SFT's tokenizer, or the first model's, has a chat template)."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 1
    seed: int | None = None
    apply_chat_template: bool | None = None
    gen_kwargs: str | None = None
    bootstrap_iters: int = 100000

    def __post_init__(self):
        if self.limit is not None and not self.limit > 0:
            raise InputError(f"--limit {self.limit}: give a positive number of documents (or a fraction < 1)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise InputError(f"--num-fewshot {self.num_fewshot}: give 0 or more")
        size = str(self.batch_size)
        if not (size.isdigit() and int(size) > 0) and not (size == "auto" or size.startswith("auto:")):
            raise InputError(f"--batch-size {self.batch_size}: give a positive integer or `auto`")

    def seeds(self) -> dict:
        """Seed arguments of lm-eval's simple_evaluate."""
        if self.seed is None:
            return {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                    "fewshot_random_seed": 1234}
        return {k: self.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                       "fewshot_random_seed")}

    def gen_kwargs_dict(self) -> dict | None:
        if not self.gen_kwargs:
            return None
        from lm_eval.utils import simple_parse_args_string

        try:
            parsed = simple_parse_args_string(self.gen_kwargs)
        except Exception as e:  # lm-eval raises ValueError/AssertionError on malformed strings
            raise InputError(f"--gen-kwargs {self.gen_kwargs!r}: expected key=value,key=value ({e})") from None
        return parsed or None

    def key(self) -> dict:
        """What of the settings determines a result (for the cache key)."""
        return {"limit": self.limit, "num_fewshot": self.num_fewshot, "batch_size": str(self.batch_size),
                "seeds": self.seeds(), "apply_chat_template": bool(self.apply_chat_template),
                "gen_kwargs": self.gen_kwargs_dict(), "bootstrap_iters": self.bootstrap_iters}


# ---- scoring -------------------------------------------------------------------------------------------


@dataclass
class TaskScore:
    """A task's primary metric on one part of its documents, and the per-document values of that metric."""

    task: str
    metric: str
    filter: str
    higher_is_better: bool
    value: float
    stderr: float | None
    n: int
    part: str
    items: dict[str, float | None]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> TaskScore:
        return cls(**data)


def make_lm(model, tokenizer, batch_size: int | str = 1):
    """One HFLM around a model in memory (device and dtype are the model's)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    log = logging.getLogger("lm_eval.models.huggingface")  # it warns that a model object is not a path: intended
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        log.setLevel(level)


def _configure(info: TaskInfo, settings: EvalSettings) -> None:
    """What lm-eval's simple_evaluate does to each task before evaluating (gen_kwargs, few-shot, seed), from the
    task's values as loaded (so one evaluation's settings never leak into the next)."""
    task = info.task
    for key, value in info.defaults.items():
        task.set_config(key=key, value=copy.deepcopy(value))
    if task.get_config("output_type") == "generate_until" and settings.gen_kwargs_dict() is not None:
        task.set_config(key="generation_kwargs", value=settings.gen_kwargs_dict(), update=True)
    if settings.num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=settings.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=settings.seeds()["fewshot_random_seed"])


def _seed(settings: EvalSettings) -> None:
    import numpy as np
    from lm_eval.utils import set_torch_seed

    seeds = settings.seeds()
    random.seed(seeds["random_seed"])
    np.random.seed(seeds["numpy_random_seed"])
    set_torch_seed(seeds["torch_random_seed"])


def run_tasks(lm, suite: TaskSuite, settings: EvalSettings, part: str = "all",
              names: list[str] | None = None) -> dict[str, TaskScore]:
    """Evaluate ``lm`` on ``suite``'s tasks (or ``names`` of them), on one part of their documents.

    Does what ``lm_eval.simple_evaluate`` does (seeds, per-task overrides, then ``lm_eval.evaluator.evaluate``),
    without its environment report (seconds per call, spent collecting pip and GPU details)."""
    from lm_eval.evaluator import evaluate

    if part not in PARTS or (part != "all" and suite.holdout is None):
        raise InputError(f"part {part!r}: expected one of {', '.join(PARTS[:1] if suite.holdout is None else PARTS)}")
    infos = [suite.tasks[n] for n in (names or suite.names())]
    if not infos:
        return {}
    _seed(settings)
    for info in infos:
        _configure(info, settings)
    whole = part == "all" and suite.holdout is None
    samples = None if whole else {i.name: i.parts[part] for i in infos}
    results = evaluate(lm=lm, task_dict={"tasks": {i.name: i.task for i in infos}, "groups": {}},
                       limit=settings.limit if whole else None, samples=samples,
                       bootstrap_iters=settings.bootstrap_iters, log_samples=True,
                       apply_chat_template=bool(settings.apply_chat_template),
                       fewshot_as_multiturn=True)  # simple_evaluate's default; only used with a chat template
    return {i.name: _score(i, results, part) for i in infos}


def _score(info: TaskInfo, results: dict, part: str) -> TaskScore:
    row = results["results"][info.name]
    value = row.get(f"{info.metric},{info.filter}")
    if not isinstance(value, (int, float)):
        raise InputError(f"task {info.name}: lm-eval gave no number for {info.metric},{info.filter} (got {value!r}); "
                         "pick another metric with --metric task=name")
    stderr = row.get(f"{info.metric}_stderr,{info.filter}")
    items = {}
    for record in results["samples"][info.name]:
        if record.get("filter") != info.filter:
            continue
        v = record.get(info.metric)
        items[info.doc_ids[record["doc_id"]]] = float(v) if isinstance(v, (int, float)) else None
    return TaskScore(info.name, info.metric, info.filter, info.higher_is_better, float(value),
                     float(stderr) if isinstance(stderr, (int, float)) else None, len(items), part, items)
