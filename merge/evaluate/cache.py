"""Task results on disk, keyed by what determines them; and the evaluator of one resident model.

A result's key is the SHA-256 of: the caller's weights fingerprint (for a candidate: the inputs' fingerprints
and its resolved parameters; for a written model: its files' fingerprints, never its name), the task's config
and documents (:attr:`TaskInfo.content_hash`), metric, filter, part and holdout, the settings passed to lm-eval
(limit, few-shot, batch size, seeds, chat template, gen_kwargs, bootstrap iterations) and lm-eval's version.
Each entry is one JSON file ``<key>.json`` under the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .harness import EvalSettings, TaskScore, lm_eval_version, make_lm, run_tasks
from .tasks import TaskSuite

FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mergeback/eval`` (``~/.cache/mergeback/eval`` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mergeback" / "eval"


def result_key(fingerprint: str, suite: TaskSuite, task: str, part: str, settings: EvalSettings) -> str:
    """The cache key of one task's result (see the module docstring)."""
    info = suite.tasks[task]
    payload = {"format": FORMAT, "fingerprint": fingerprint, "task": task, "content": info.content_hash,
               "metric": info.metric, "filter": info.filter, "part": part, "holdout": suite.holdout,
               "settings": settings.key(), "lm_eval": lm_eval_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def candidate_fingerprint(inputs: dict, parameters: dict) -> str:
    """The weights fingerprint of an in-place candidate: SHA-256 of the inputs' fingerprints (e.g. each model
    folder's :func:`~merge.evaluate.benchmark.weights_fingerprint`) and its resolved parameters (method, t,
    per-layer schedule, dtype...): everything that determines the weights, nothing that only names them."""
    return hashlib.sha256(json.dumps({"inputs": inputs, "parameters": parameters}, sort_keys=True,
                                     default=str).encode()).hexdigest()


class ResultCache:
    """JSON files of :class:`TaskScore` under ``folder`` (written atomically; unreadable entries are misses)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()

    def get(self, key: str) -> TaskScore | None:
        try:
            return TaskScore.from_dict(json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, score: TaskScore) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(score.to_dict()), encoding="utf-8")
        os.replace(tmp, self.folder / f"{key}.json")


@dataclass
class SuiteRun:
    """One evaluation of a suite: scores per task, which came from the cache, and the seconds spent."""

    scores: dict[str, TaskScore]
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cache_hit(self) -> bool:
        return bool(self.scores) and len(self.cached) == len(self.scores)


class TaskEvaluator:
    """Evaluates one resident model on task suites, through one HFLM for its whole life.

    The model may be changed in place between calls (a sweep sets each candidate's parameters); the caller
    passes a ``fingerprint`` that determines the weights, e.g. the inputs' fingerprints plus the candidate's
    resolved parameters. ``cache=None`` evaluates every time (``--no-cache``).
    """

    def __init__(self, model, tokenizer, settings: EvalSettings, cache: ResultCache | None = None):
        self.settings = settings
        self.cache = cache
        self.lm = make_lm(model, tokenizer, settings.batch_size)

    def evaluate(self, suite: TaskSuite, fingerprint: str, part: str = "all") -> SuiteRun:
        """Scores of every task of ``suite`` on ``part`` ("all", or "select"/"report" with a holdout)."""
        start = time.perf_counter()
        keys = {name: result_key(fingerprint, suite, name, part, self.settings) for name in suite.names()}
        scores: dict[str, TaskScore] = {}
        cached = []
        if self.cache is not None:
            for name, key in keys.items():
                hit = self.cache.get(key)
                if hit is not None:
                    scores[name] = hit
                    cached.append(name)
        todo = [n for n in suite.names() if n not in scores]
        if todo:
            fresh = run_tasks(self.lm, suite, self.settings, part, todo)
            for name, score in fresh.items():
                if self.cache is not None:
                    self.cache.put(keys[name], score)
            scores.update(fresh)
        return SuiteRun({n: scores[n] for n in suite.names()}, cached, time.perf_counter() - start)
