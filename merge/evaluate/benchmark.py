"""``merge evaluate``: written models on lm-eval tasks, with recovery scores and per-item forgetting.

Per task (oriented by lm-eval's ``higher_is_better``; the ratios below do not depend on the orientation):

    general_recovered = (G_m - G_sft) / (G_base - G_sft)     domain_retained = (D_m - D_base) / (D_sft - D_base)

averaged over the side's tasks, leaving out (with a note) a task whose base and SFT scores do not differ by
more than their combined standard error ``sqrt(se_base**2 + se_sft**2)``. Per-item forgetting, for tasks whose
per-document values are 0/1: *forgotten* counts documents the reference got right and the model gets wrong,
*gained* the reverse; the reference is the base on the general side and the SFT on the domain side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .harness import EvalSettings, TaskScore
from .tasks import TaskSuite, split_specs

SIDES = ("general", "domain")


# ---- scores --------------------------------------------------------------------------------------------


def differs(a: TaskScore, b: TaskScore) -> bool:
    """Whether two scores differ by more than their combined standard error (a missing stderr counts as 0)."""
    return abs(a.value - b.value) > math.hypot(a.stderr or 0.0, b.stderr or 0.0)


def fraction(m: float, start: float, end: float) -> float:
    """``(m - start) / (end - start)``: 0 at ``start``, 1 at ``end``."""
    return (m - start) / (end - start)


@dataclass
class SideScore:
    """A side's recovery (general) or retention (domain): per task, the mean, and the tasks left out."""

    per_task: dict[str, float]
    left_out: dict[str, str]

    @property
    def mean(self) -> float | None:
        return sum(self.per_task.values()) / len(self.per_task) if self.per_task else None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "per_task": self.per_task, "left_out": self.left_out}


def side_score(model: dict[str, TaskScore], start: dict[str, TaskScore], end: dict[str, TaskScore]) -> SideScore:
    """``fraction(m, start, end)`` per task; tasks where start and end do not differ are left out."""
    per_task, left_out = {}, {}
    for name, m in model.items():
        s, e = start[name], end[name]
        if not differs(s, e):
            left_out[name] = (f"base and SFT do not differ beyond their standard error "
                              f"({s.value:.4g} vs {e.value:.4g})")
            continue
        per_task[name] = fraction(m.value, s.value, e.value)
    return SideScore(per_task, left_out)


def correct(value: float | None, higher_is_better: bool) -> bool | None:
    """A per-document value as right/wrong: 1 is right (0 when lower is better); not 0/1: None."""
    if value not in (0.0, 1.0):
        return None
    return value == (1.0 if higher_is_better else 0.0)


@dataclass
class Forgetting:
    """Per-item changes against a reference on one task: documents forgotten and gained (None: not 0/1)."""

    forgotten: int | None
    gained: int | None
    compared: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def forgetting(model: TaskScore, reference: TaskScore) -> Forgetting:
    """Documents the reference got right and the model gets wrong (forgotten), and the reverse (gained)."""
    common = [d for d in reference.items if d in model.items]
    pairs = [(correct(reference.items[d], reference.higher_is_better), correct(model.items[d], model.higher_is_better))
             for d in common]
    if not pairs or any(r is None or m is None for r, m in pairs):
        return Forgetting(None, None, len(common))
    return Forgetting(sum(r and not m for r, m in pairs), sum(m and not r for r, m in pairs), len(pairs))


# ---- evaluating written models -------------------------------------------------------------------------


@dataclass
class ModelEntry:
    label: str
    ref: str
    path: str
    fingerprint: str
    scores: dict[str, dict[str, TaskScore]] = field(default_factory=dict)  # side -> task -> score
    cached: int = 0
    seconds: float = 0.0


@dataclass
class EvaluationResult:
    """What ``merge.evaluate`` measured: scores per model, side and task; recovery and forgetting."""

    models: list[ModelEntry]
    suites: dict[str, TaskSuite]
    settings: EvalSettings
    chat_template_note: str
    part: str
    base: str | None = None
    sft: str | None = None

    def model(self, label: str) -> ModelEntry:
        return next(m for m in self.models if m.label == label)

    def side_scores(self, side: str) -> dict[str, SideScore]:
        """Per model (not the references): general_recovered or domain_retained; empty without base and SFT."""
        if self.base is None or self.sft is None or side not in self.suites:
            return {}
        base, sft = self.model(self.base).scores[side], self.model(self.sft).scores[side]
        start, end = (sft, base) if side == "general" else (base, sft)
        return {m.label: side_score(m.scores[side], start, end) for m in self.models
                if m.label not in (self.base, self.sft)}

    def forgetting(self, side: str) -> dict[str, dict[str, Forgetting]]:
        """Per model and task: forgotten/gained against the base (general) or the SFT (domain)."""
        ref_label = self.base if side == "general" else self.sft
        if ref_label is None or side not in self.suites:
            return {}
        ref = self.model(ref_label).scores[side]
        return {m.label: {t: forgetting(s, ref[t]) for t, s in m.scores[side].items()}
                for m in self.models if m.label != ref_label}

    def to_dict(self) -> dict:
        return {
            "settings": {**self.settings.key(), "chat_template_note": self.chat_template_note},
            "part": self.part, "holdout": next((s.holdout for s in self.suites.values()), None),
            "base": self.base, "sft": self.sft,
            "models": [{"label": m.label, "ref": m.ref, "path": m.path, "fingerprint": m.fingerprint,
                        "cached_tasks": m.cached, "seconds": round(m.seconds, 3),
                        "scores": {side: {t: {k: v for k, v in s.to_dict().items() if k != "items"}
                                          for t, s in tasks.items()} for side, tasks in m.scores.items()}}
                       for m in self.models],
            "general_recovered": {k: v.to_dict() for k, v in self.side_scores("general").items()},
            "domain_retained": {k: v.to_dict() for k, v in self.side_scores("domain").items()},
            "forgetting": {side: {label: {t: f.to_dict() for t, f in per.items()}
                                  for label, per in self.forgetting(side).items()} for side in self.suites},
        }

    def table(self) -> str:
        """The metrics per task and model, then recovery/retention and forgetting counts."""
        labels = [m.label for m in self.models]
        holdout = next((s.holdout for s in self.suites.values()), None)
        part = {"all": "all documents", "report": f"the report part of --holdout {holdout}"}.get(self.part, self.part)
        lines = [f"lm-eval tasks ({part}; {self.chat_template_note})"]
        rows = [["side", "task", "metric", *labels]]
        for side, suite in self.suites.items():
            for name, info in suite.tasks.items():
                cells = []
                for m in self.models:
                    s = m.scores[side][name]
                    cells.append(f"{s.value:.4f}" + (f" ±{s.stderr:.3f}" if s.stderr is not None else ""))
                arrow = "↑" if info.higher_is_better else "↓"
                rows.append([side, name, f"{info.metric} {arrow}", *cells])
        lines += _align(rows)
        notes = []
        for side, title in (("general", "general_recovered"), ("domain", "domain_retained")):
            scores = self.side_scores(side)
            if not scores:
                continue
            if title == "general_recovered" or not self.side_scores("general"):
                lines.append("")
            lines.append(f"{title} (mean over tasks): " + ", ".join(
                f"{label} {_num(s.mean)}" + (" (" + ", ".join(f"{t} {v:.3f}" for t, v in s.per_task.items()) + ")"
                                             if len(s.per_task) > 1 else "") for label, s in scores.items()))
            first = next(iter(scores.values()))
            notes += [f"{side} task {t} left out: {why}" for t, why in first.left_out.items()]
        for side in self.suites:
            per_model = self.forgetting(side)
            if not per_model:
                continue
            ref = "base" if side == "general" else "SFT"
            lines.append("")
            lines.append(f"{side} per item against the {ref}: forgotten / gained")
            rows = [["task", *per_model]]
            for name in self.suites[side].tasks:
                rows.append([name, *(_counts(per[name]) for per in per_model.values())])
            lines += _align(rows)
        if self.base is None or self.sft is None:
            notes.append("give --base and --sft for general_recovered and domain_retained")
        lines += ["", *(f"note: {n}" for n in notes)] if notes else []
        cache = ", ".join(f"{m.label} {m.cached}/{sum(len(v) for v in m.scores.values())} cached, "
                          f"{m.seconds:.1f}s" for m in self.models)
        lines.append(f"time: {cache}")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _counts(f: Forgetting) -> str:
    return "n/a" if f.forgotten is None else f"{f.forgotten} / {f.gained} of {f.compared}"


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def parse_metrics(items) -> dict[str, str]:
    """``["gsm8k=exact_match,strict-match", "mmlu=acc"]`` (or a dict) -> {task: metric[,filter]}."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in [items] if isinstance(items, str) else list(items or []):
        task, sep, metric = str(item).partition("=")
        if not sep or not task.strip() or not metric.strip():
            raise InputError(f"--metric {item}: expected task=metric (or task=metric,filter)")
        out[task.strip()] = metric.strip()
    return out


def weights_fingerprint(folder: Path) -> str:
    """SHA-256 of a model folder's file fingerprints (size, mtime, head hash of each file; not its name)."""
    from ..io.manifest import folder_fingerprint

    return hashlib.sha256(json.dumps(folder_fingerprint(folder), sort_keys=True).encode()).hexdigest()


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    return device


def load_model(path: Path, label: str, device: str):
    """A written model and its tokenizer, as ``HFLM(pretrained=<folder>)`` loads them (``dtype="auto"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{label} {path}: transformers cannot load it as a causal LM ({first})") from None
    return model.to(device).eval(), tokenizer


def chat_template_choice(flag: bool | None, tokenizer, whose: str) -> tuple[bool, str]:
    """Whether prompts use the chat template, and the sentence saying so: ``flag`` when given, else on
    exactly when ``tokenizer`` has a chat template (``whose``: "SFT's")."""
    if flag is not None:
        return flag, f"chat template {'on' if flag else 'off'} (--{'' if flag else 'no-'}apply-chat-template)"
    has = bool(getattr(tokenizer, "chat_template", None))
    return has, (f"chat template {'on' if has else 'off'}: the {whose} tokenizer "
                 f"{'has a' if has else 'has no'} chat template")


def evaluate(models=(), *, general_tasks=None, domain_tasks=None, base: str | None = None, sft: str | None = None,
             limit=None, num_fewshot: int | None = None, batch_size: int | str = 1, seed: int | None = None,
             apply_chat_template: bool | None = None, gen_kwargs: str | None = None, tasks_path=(),
             metrics=None, holdout: float | None = None, no_cache: bool = False, cache_dir=None,
             device: str = "auto", threads: int | None = None, bootstrap_iters: int = 100000,
             echo=None) -> EvaluationResult:
    """Evaluate written models (folders, Hub ids or aliases) on lm-eval tasks of a general and a domain side.

    ``base``/``sft`` name the references (among ``models`` or in addition). Every model gets the same settings;
    the chat template is on when the SFT's tokenizer (else the first model's) has one, unless
    ``apply_chat_template`` says otherwise. With ``holdout`` the scores are on the report part of each task.
    ``threads``: torch's CPU threads while evaluating (default: torch's own; 1 is fastest for tiny models).
    Returns an :class:`EvaluationResult` (``.table()``, ``.to_dict()``).
    """
    import torch

    from ..io.resolve import resolve_model
    from .cache import ResultCache

    say = echo or (lambda line: None)
    refs = [r for r in [base, sft, *(models or [])] if r]
    if not refs:
        raise InputError("merge evaluate: give at least one MODEL (or --base/--sft)")
    specs = {"general": split_specs(general_tasks), "domain": split_specs(domain_tasks)}
    if not any(specs.values()):
        raise InputError("merge evaluate: give --general-tasks and/or --domain-tasks")
    settings = EvalSettings(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed,
                            gen_kwargs=gen_kwargs, bootstrap_iters=bootstrap_iters)
    metric_choice = parse_metrics(metrics)
    suites = {side: TaskSuite(specs[side], tasks_path=tasks_path, metrics=metric_choice, holdout=holdout,
                              settings=settings, option=f"--{side}-tasks") for side in SIDES if specs[side]}
    unknown = [t for t in metric_choice if not any(t in s.tasks for s in suites.values())]
    if unknown:
        raise InputError(f"--metric {unknown[0]}=...: no such task among "
                         f"{', '.join(n for s in suites.values() for n in s.tasks)}")
    device = _device(device)
    entries: list[ModelEntry] = []
    for ref in refs:
        role = "base" if ref == base else "SFT" if ref == sft else "model"
        resolved = resolve_model(ref, role)
        if any(Path(e.path) == resolved.path for e in entries):
            continue
        label = "base" if ref == base else "sft" if ref == sft else ref
        entries.append(ModelEntry(label, ref, str(resolved.path), weights_fingerprint(resolved.path)))
    part = "report" if holdout is not None else "all"
    cache = None if no_cache else ResultCache(cache_dir)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        settings, note = _evaluate_all(entries, suites, settings, apply_chat_template, part, cache, device, say)
    finally:
        torch.set_num_threads(before)
    return EvaluationResult(entries, suites, settings, note, part, base="base" if base else None,
                            sft="sft" if sft else None)


def _evaluate_all(entries, suites, settings, apply_chat_template, part, cache, device, say):
    """Load each model in turn (the SFT first: its tokenizer decides the chat template) and score its tasks."""
    from .cache import TaskEvaluator

    chat_flag, note = None, ""
    sft_entry = next((e for e in entries if e.label == "sft"), entries[0])
    for entry in [sft_entry, *(e for e in entries if e is not sft_entry)]:
        model, tokenizer = load_model(Path(entry.path), entry.label, device)
        if chat_flag is None:
            whose = "SFT's" if entry.label == "sft" else f"{entry.label}'s"
            chat_flag, note = chat_template_choice(apply_chat_template, tokenizer, whose)
            settings = dataclasses.replace(settings, apply_chat_template=chat_flag)
            say(note)
        evaluator = TaskEvaluator(model, tokenizer, settings, cache)
        for side, suite in suites.items():
            run = evaluator.evaluate(suite, entry.fingerprint, part)
            entry.scores[side] = run.scores
            entry.cached += len(run.cached)
            entry.seconds += run.seconds
        say(f"{entry.label}: {entry.seconds:.1f}s" + (f" ({entry.cached} cached)" if entry.cached else ""))
        del evaluator, model
    return settings, note
