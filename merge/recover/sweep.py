"""``merge.sweep``: evaluate base, SFT and merges at several t on general and domain probes, pick t by a
stated rule, optionally search per-layer schedules, and write the chosen merge with its scores in the card.

The model is loaded once; each candidate's parameters are set in place (:class:`InPlaceModel`), so no model
is written per t. Selection uses the selection probes; the report probes (``general_report``/
``domain_report`` files, or a deterministic ``holdout`` split) measure the choice, and a schedule is only
said to win when it wins there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import InputError
from ..evaluate import ProbeScore, encode, load_probes, objective, select
from ..evaluate.harness import EvalSettings
from ..evaluate.probes import ProbeSet
from ..evaluate.scoring import score
from ..evaluate.tasks import split_specs
from ..inputs import open_inputs
from ..keys import BASE, PRIMARY
from ..methods import registry
from ..options import OutputOptions, ReportOptions
from .inplace import InPlaceModel
from .result import Candidate, Reported, ScheduleOutcome, SweepResult, plot_tradeoff, with_recovery
from .search import blocks_recipe, coordinate_search, lines_recipe
from .sweep_tasks import build_tasks, check_task_options

DEFAULT_T = tuple(round(i / 10, 1) for i in range(11))
DEFAULT_MAX_TOKENS = 20_000
DEFAULT_KEEP_DOMAIN, DEFAULT_BLOCKS, DEFAULT_BUDGET = 0.9, 3, 16
SCHEDULE_HOLDOUT = 0.5


def sweep(sft: str, base: str, domain: str | Path | None = None, general: str | Path | None = None,
          out: str | Path | None = None,
          *, t_values: Sequence[float] | None = None, method: str = "linear", select_rule: str = "keep-domain",
          keep_domain: float | None = None, general_report: str | Path | None = None,
          domain_report: str | Path | None = None, holdout: float | None = None, schedule: str | None = None,
          blocks: int | None = None, budget: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
          device: str = "auto",
          force: bool = False, plot: str | Path | None = None, command: str | None = None,
          echo: Callable[[str], None] | None = None, token: str | None = None,
          threads: int | None = None, general_tasks=None, domain_tasks=None, general_report_tasks=None,
          domain_report_tasks=None, tasks_path=(), limit: int | float | None = None, num_fewshot: int | None = None,
          batch_size: int | str = 1, seed: int | None = None, apply_chat_template: bool | None = None,
          gen_kwargs: str | None = None, metrics=None, no_cache: bool = False, cache_dir: str | Path | None = None,
          candidates: str | Sequence[str] | None = None) -> SweepResult:
    """Sweep t (share of the base: 0 = SFT, 1 = base) and return a :class:`SweepResult`.

    ``general=None`` uses the built-in general probes (a smoke signal, not a benchmark). ``select_rule``:
    ``keep-domain`` (largest general_recovered with domain_retained >= ``keep_domain``, else best score) or
    ``score`` (harmonic mean). ``schedule``: ``lines`` or ``blocks`` also searches per-layer schedules (at most
    ``budget`` evaluations, default 16; ``blocks`` layer blocks, default 3). Options that would have no effect
    (``blocks`` without ``schedule="blocks"``, ``budget`` without a schedule, ``keep_domain`` with
    ``select_rule="score"``, an empty ``t_values``) are errors. Candidates whose scores are not finite are left
    out of the choice, with a note. With ``out``, writes the chosen merge there (card with a Recovery section,
    ``tradeoff.png``, ``sweep.json``; ``schedule_recipe.yaml`` after a schedule search). ``threads``: torch's
    CPU threads while evaluating (default: torch's own; 1 is fastest for tiny models).

    lm-eval tasks (``general_tasks``/``domain_tasks``: task or group names, YAML files or folders; report-only
    ``general_report_tasks``/``domain_report_tasks``) score a side with or instead of its probe files (see
    :mod:`merge.recover.sweep_tasks` for how the parts combine); ``limit``, ``num_fewshot``, ``batch_size``,
    ``seed``, ``apply_chat_template`` (default: on when the SFT has a chat template), ``gen_kwargs``,
    ``metrics`` (``task=metric``), ``tasks_path`` are passed to lm-eval; results are cached in ``cache_dir``
    (default ``~/.cache/mergeback/eval``) unless ``no_cache``. ``candidates``: ``"linear,slerp"`` sweeps the t
    grid with each method; ``method@value`` adds one candidate (``linear@0.3``: t; ``ties@0.3``: density,
    ``task_arithmetic@0.5``: scale), set in place by the registry's sweepable methods.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        task_options = dict(general_tasks=general_tasks, domain_tasks=domain_tasks,
                            general_report_tasks=general_report_tasks, domain_report_tasks=domain_report_tasks,
                            tasks_path=tuple(tasks_path or ()), limit=limit, num_fewshot=num_fewshot,
                            batch_size=batch_size, seed=seed, apply_chat_template=apply_chat_template,
                            gen_kwargs=gen_kwargs, metrics=metrics, no_cache=no_cache, cache_dir=cache_dir)
        return _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain, general_report,
                      domain_report, holdout, schedule, blocks, budget, max_tokens, device, force, plot, command,
                      echo, token, task_options, candidates)
    finally:
        torch.set_num_threads(before)


def _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain, general_report,
           domain_report, holdout, schedule, blocks, budget, max_tokens, device, force, plot, command, echo,
           token, task_options, candidates) -> SweepResult:
    from .. import api
    from ..execute import resolve_device
    from ..io import output

    started = time.perf_counter()
    say = echo or (lambda line: None)
    _check_options(method, select_rule, keep_domain, holdout, schedule, blocks, budget, max_tokens)
    o = task_options
    tasks_split = any(split_specs(o[f"{side}_tasks"]) and not split_specs(o[f"{side}_report_tasks"])
                      for side in ("general", "domain"))
    _check_no_op_options(t_values, select_rule, keep_domain, holdout, general_report, domain_report, schedule,
                         blocks, budget, force, out, tasks_split)
    if domain is None and not split_specs(o["domain_tasks"]):
        raise InputError("--domain: give domain probes (--domain FILE) and/or domain tasks (--domain-tasks)")
    if general is None and general_report is not None and split_specs(o["general_tasks"]):
        raise InputError("--general-report: reports on the general probes; with --general-tasks give --general FILE "
                         "too (or report on tasks: --general-report-tasks)")
    if domain is None and domain_report is not None:
        raise InputError("--domain-report: reports on the domain probes; give --domain FILE too")
    grid = parse_candidates(candidates, method)
    keep_domain = DEFAULT_KEEP_DOMAIN if keep_domain is None else keep_domain
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    budget = DEFAULT_BUDGET if budget is None else budget
    t_values = sorted(set(float(t) for t in (t_values if t_values is not None else DEFAULT_T)) | {0.0, 1.0})
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if out_path is not None:
        output.check_target(out_path, output.local_inputs({f"SFT {sft}": sft, f"base {base}": base}))
        output.check_output(out_path, force)
    notes: list[str] = []
    no_general_probes = general is None and bool(split_specs(o["general_tasks"]))
    probes, holdout_used = _probe_sets(None if no_general_probes else general, domain, general_report,
                                       domain_report, holdout, schedule, notes, builtin=not no_general_probes)
    if holdout_used is None and schedule and tasks_split:
        holdout_used = SCHEDULE_HOLDOUT
        notes.append(f"a schedule may only claim a win on held-out documents: split {holdout_used:g} of each "
                     "task's documents (by content hash) for reporting")
    settings = EvalSettings(limit=o["limit"], num_fewshot=o["num_fewshot"], batch_size=o["batch_size"],
                            seed=o["seed"], gen_kwargs=o["gen_kwargs"])
    tasks = build_tasks(o["general_tasks"], o["domain_tasks"], o["general_report_tasks"], o["domain_report_tasks"],
                        tasks_path=o["tasks_path"], metrics=o["metrics"], holdout=holdout_used,
                        settings=settings, no_cache=o["no_cache"], cache_dir=o["cache_dir"])
    check_task_options(tasks, o)
    separate = any(probes[f"{s}_report"] is not probes[f"{s}_select"] for s in ("general", "domain")) or \
        bool(tasks and tasks.distinct)
    if not separate and tasks is None:
        notes.append("t was chosen and is reported on the same probes (optimistic); pass --general-report/"
                     "--domain-report or --holdout 0.5 to measure the choice on probes it was not chosen on")
    elif not separate:
        notes.append("t was chosen and is reported on the same probes and tasks (optimistic); pass --general-report/"
                     "--domain-report (--general-report-tasks/--domain-report-tasks) or --holdout 0.5 to measure the "
                     "choice on data it was not chosen on")
    method = grid[0][0]
    template = api.build_recipe({"method": method, "base": str(base), "sft": [str(sft)], "t": 0.0,
                                 "device": device})
    extra_recipes = [(label, _candidate_recipe(label, fields, base, sft, device))
                     for label, fields in grid if isinstance(fields, dict)]
    dev = resolve_device(device)
    with ExitStack() as stack:
        inputs = open_inputs(template, stack, token=token, out=out_path)
        models, labels, resolved = inputs.models, inputs.labels, inputs.resolved
        tokenizer = load_tokenizer(models[PRIMARY], models[BASE])
        encoded = {k: encode(p.documents, tokenizer, max_tokens) for k, p in probes.items() if p is not None}
        for k, docs in encoded.items():
            if sum(d.num_scored for d in docs) == 0:
                raise InputError(f"{probes[k].name}: no tokens to score")
            if sum(d.num_bytes for d in docs) == 0:
                raise InputError(f"{probes[k].name}: the scored text is empty (0 bytes), so bits per byte cannot "
                                 "be computed; give probes with non-empty responses/documents")
        inplace = InPlaceModel(models, labels, dev, template, _written_dtype(models[PRIMARY]) if tasks else None)
        if tasks is not None:
            say(tasks.start(inplace.model, tokenizer, o["apply_chat_template"], resolved,
                            {"eval_dtype": str(inplace.model.dtype), "device": dev.type}))
    seconds_load = time.perf_counter() - started
    on = [f"{sum(d.num_scored for d in encoded[f'{s}_select'])} {s} tokens" for s in ("general", "domain")
          if f"{s}_select" in encoded]
    if tasks is not None and tasks.select:
        on.append(f"tasks {tasks.describe('select')}")
    say(f"loaded base and SFT in {seconds_load:.1f}s on {dev}; evaluating {len(t_values)} values of t "
        f"(t = share of the base) on {' and '.join(on)}")
    runner = _Runner(inplace, encoded, dev, say, tasks)

    others = [runner.candidate(label, recipe, None, recipe.method) for label, recipe in extra_recipes]
    rows = []
    for m, ts in _grid_ts(grid, t_values):
        rows += [runner.candidate(f"{m} t={t:g}" if len(grid) > 1 else f"t={t:g}",
                                  template.model_copy(update={"t": t, "method": m}), t, m) for t in ts]
    base_row = next(c for c in rows if c.t == 1.0)
    sft_row = next(c for c in rows if c.t == 0.0)
    rows += others
    for c in rows:
        with_recovery(c, base_row, sft_row)
    _forgetting_notes(base_row, sft_row, notes)
    _left_out_notes(base_row, notes)
    chosen = select(_finite_candidates(rows, base_row, sft_row, notes), lambda c: c.recovery, select_rule,
                    keep_domain)
    result = SweepResult(rows, chosen, select_rule, keep_domain, {k: p.name if p else None for k, p in probes.items()},
                         notes=notes, seconds_load=seconds_load)
    if tasks is not None:
        result.task_text = {"select": tasks.describe("select"), "report": tasks.describe("report"),
                            "chat_template": tasks.chat_note}
        result.task_columns = {"select": tasks.columns("select"), "report": tasks.columns("report")}
    written = chosen
    if separate:
        reported = {id(c): runner.report(c, "base" if c is base_row else "SFT" if c is sft_row else None)
                    for c in dict.fromkeys([base_row, sft_row, chosen])}
        rb, rs = reported[id(base_row)], reported[id(sft_row)]
        for r in reported.values():
            with_recovery(r, rb, rs)
        result.report = list(reported.values())
        for side, scores in rb.sides.items():
            notes += [f"report part: {side} task {t} left out of the {side} score: {why}"
                      for t, why in scores.left_out.items()]
    if schedule:
        start = chosen if chosen.t is not None else select([c for c in rows if c.t is not None and
                                                            _scores_finite(c)], lambda c: c.recovery, select_rule,
                                                           keep_domain)  # a schedule starts from a global t
        result.schedule = runner.search_schedule(schedule, template, start, base_row, sft_row, blocks, budget,
                                                 select_rule, keep_domain)
        outcome = result.schedule
        if outcome.beats_on_selection and separate:
            outcome.global_report = reported[id(chosen)]
            outcome.report = with_recovery(runner.report(outcome.best, None), rb, rs)
            result.report.append(outcome.report)
            outcome.wins = (objective(outcome.report.recovery, select_rule, keep_domain)
                            > objective(outcome.global_report.recovery, select_rule, keep_domain))
            if outcome.wins:
                written = outcome.best
        say(outcome.verdict())
    result.seconds_report = runner.seconds_report
    writing = time.perf_counter()
    result.written = written
    if out_path is not None:
        _write(result, written, out_path, force, command, plot)
    elif plot is not None:
        result.plot = plot_tradeoff(result, Path(plot))
    result.seconds_write = time.perf_counter() - writing
    result.seconds_total = time.perf_counter() - started
    return result


class _Runner:
    """Sets a candidate in place and scores it, timing both."""

    def __init__(self, inplace: InPlaceModel, encoded: dict, device: torch.device, say, tasks=None):
        self.inplace, self.encoded, self.device, self.say, self.tasks = inplace, encoded, device, say, tasks
        self.seconds_report = 0.0

    def _score(self, part: str) -> tuple[ProbeScore | None, ProbeScore | None]:
        model = self.inplace.model
        return tuple(score(model, self.encoded[f"{side}_{part}"], self.device) if f"{side}_{part}" in self.encoded
                     else None for side in ("general", "domain"))

    def _tasks(self, recipe, which: str) -> tuple[dict, int, int]:
        if self.tasks is None or not (self.tasks.select if which == "select" else self.tasks.report):
            return {}, 0, 0
        scores, cached, total, _ = self.tasks.evaluate(recipe, which)
        return scores, cached, total

    def candidate(self, label: str, recipe, t: float | None = None, method: str = "linear") -> Candidate:
        began = time.perf_counter()
        self.inplace.apply(recipe)
        set_s = time.perf_counter() - began
        general, domain = self._score("select")
        tasks, cached, total = self._tasks(recipe, "select")
        eval_s = time.perf_counter() - began - set_s
        name = "SFT" if t == 0 else "base" if t == 1 else label
        parts = [f"{side} {p.bpb:.4f} bpb (ppl {p.ppl:.2f})" for side, p in (("general", general), ("domain", domain))
                 if p is not None]
        parts += [f"{task} {s.value:.4f}" for per in tasks.values() for task, s in per.items()]
        cache = "" if not total else (", cache hit" if cached == total else f", cache {cached}/{total}"
                                      if cached else ", cache miss" if self.tasks.cache else ", no cache")
        self.say(f"  {name:>28}: {', '.join(parts)}  [set {set_s:.2f}s, eval {eval_s:.2f}s{cache}]")
        return Candidate(label, recipe, general, domain, t, set_s, eval_s, tasks=tasks, cached=cached,
                         task_count=total, method=method)

    def report(self, c: Candidate, name: str | None) -> Reported:
        began = time.perf_counter()
        self.inplace.apply(c.recipe)
        general, domain = self._score("report")
        tasks, _, _ = self._tasks(c.recipe, "report")
        self.seconds_report += time.perf_counter() - began
        label = name or c.label
        return Reported(label if name is None or c.t is None else f"{label} (t={c.t:g})", general, domain, None,
                        tasks=tasks)

    def search_schedule(self, kind: str, template, chosen: Candidate, base_row: Candidate, sft_row: Candidate,
                        blocks: int, budget: int, rule: str, keep_domain: float) -> ScheduleOutcome:
        n_layers = self.inplace.n_layers
        lam = 1.0 - chosen.t

        def evaluate(point: tuple) -> Candidate:
            if kind == "lines":
                recipe = lines_recipe(template, *point)
                label = f"lines(alpha={point[0]:g}, beta={point[1] - point[0]:g})"
            else:
                recipe = blocks_recipe(template, point, n_layers)
                label = "blocks(t=" + "/".join(f"{x:g}" for x in point) + ")"
            return with_recovery(self.candidate(label, recipe), base_row, sft_row)

        began = time.perf_counter()
        start = (lam, lam) if kind == "lines" else (chosen.t,) * max(1, min(blocks, n_layers.max_layers))
        self.say(f"searching {kind} schedules from the chosen t = {chosen.t:g} (at most {budget} evaluations)")
        _, best, used = coordinate_search(start, evaluate, lambda c: objective(c.recovery, rule, keep_domain),
                                          budget)
        better = objective(best.recovery, rule, keep_domain) > objective(chosen.recovery, rule, keep_domain)
        return ScheduleOutcome(kind, best, used, better, seconds=time.perf_counter() - began)


def _write(result: SweepResult, written: Candidate, out_path: Path, force: bool, command, plot) -> None:
    import json

    from .. import api
    from ..io import output

    api.run(written.recipe, out=out_path, output=OutputOptions(force=force, card_sections=(result.card_section(),)),
            report=ReportOptions(command=command))
    result.out = out_path
    result.plot = plot_tradeoff(result, Path(plot) if plot else out_path / "tradeoff.png")
    if result.schedule and result.schedule.beats_on_selection:
        result.recipe_path = out_path / "schedule_recipe.yaml"
        text = result.schedule.best.recipe.to_yaml()
        result.recipe_path.write_text(f"# {result.schedule.verdict()}\n{text}")
    result.json_path = out_path / "sweep.json"
    result.json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    written_here = [p for p in (result.plot, result.recipe_path, result.json_path) if p is not None]
    output.add_to_marker(out_path, [Path(p).name for p in written_here if Path(p).resolve().parent == out_path])


def _written_dtype(sft) -> torch.dtype | None:
    """The dtype lm-eval (``HFLM(pretrained=<folder>)``, dtype auto) evaluates the written merge in: its
    config's. With tasks the resident model evaluates in it too, so task scores equal those of the written
    merge (without tasks, half precision is evaluated in float32 on the CPU)."""
    config = sft.config if isinstance(sft.config, dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def load_tokenizer(sft, base):
    """The SFT's tokenizer (its folder, or an adapter's), else the base's."""
    import warnings

    from transformers import AutoTokenizer

    last = None
    for model in (sft, base):
        folder = Path(model.side_files_path)
        if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a broken tokenizer file: say which folder
            last = f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})"
    raise InputError(last or f"{sft.path}: no tokenizer files in the SFT or base folder; a sweep needs one to "
                             "tokenize the probes")


def _probe_sets(general, domain, general_report, domain_report, holdout, schedule, notes, builtin: bool = True
                ) -> tuple[dict[str, ProbeSet | None], float | None]:
    """The selection and report probe sets (None for a side without probes) and the holdout used."""
    g = load_probes(general) if general is not None or builtin else None
    d = load_probes(domain) if domain is not None else None
    if general is None and builtin:
        notes.append("general probes: the built-in set (short everyday English paragraphs) - a smoke signal, "
                     "not a benchmark; pass --general for your own")
    gr = load_probes(general_report) if general_report is not None else None
    dr = load_probes(domain_report) if domain_report is not None else None
    if holdout is None and schedule and ((g is not None and gr is None) or (d is not None and dr is None)):
        holdout = SCHEDULE_HOLDOUT
        notes.append(f"a schedule may only claim a win on held-out probes: split {holdout:g} of each probe set "
                     "(by content hash) for reporting")
    if holdout is not None:
        if gr is None and g is not None:
            g, gr = g.split(holdout)
        if dr is None and d is not None:
            d, dr = d.split(holdout)
    return {"general_select": g, "domain_select": d, "general_report": gr or g, "domain_report": dr or d}, holdout


def _left_out_notes(base_row: Candidate, notes: list[str]) -> None:
    """Tasks left out of a side's mean (base and SFT within their standard error)."""
    for side, scores in base_row.sides.items():
        notes += [f"{side} task {t} left out of the {side} score: {why}" for t, why in scores.left_out.items()]


def _forgetting_notes(base_row: Candidate, sft_row: Candidate, notes: list[str]) -> None:
    if sft_row.general is not None and sft_row.general.bpb <= base_row.general.bpb:
        notes.append("the SFT scores no worse than the base on the general probes: nothing measurable to recover "
                     "(general_recovered is n/a)")
    if sft_row.domain is not None and sft_row.domain.bpb >= base_row.domain.bpb:
        notes.append("the SFT does not beat the base on the domain probes: no domain gain to keep "
                     "(domain_retained is n/a); are these the right domain probes?")


def _scores_finite(c: Candidate) -> bool:
    return all(math.isfinite(x.bpb) for x in (c.general, c.domain) if x is not None) and \
        all(math.isfinite(s.value) for per in c.tasks.values() for s in per.values())


def _finite_candidates(rows: list[Candidate], base_row: Candidate, sft_row: Candidate, notes: list[str]
                       ) -> list[Candidate]:
    """The rows a choice may take: those with finite scores. A non-finite base or SFT score is an error (every
    recovery number is measured against them); other non-finite candidates are left out with a note."""
    for name, row in (("base (t=1)", base_row), ("SFT (t=0)", sft_row)):
        if not _scores_finite(row):
            raise InputError(f"sweep: the {name} scores are not finite ({_row_scores(row)}); check that model, "
                             "the probes and the tasks")
    left_out = [c for c in rows if not _scores_finite(c)]
    if left_out:
        notes.append("left out of the choice, scores not finite: " + ", ".join(c.label for c in left_out))
    return [c for c in rows if _scores_finite(c)]


def _row_scores(row: Candidate) -> str:
    parts = [f"{side} {p.bpb:g} bits/byte" for side, p in (("general", row.general), ("domain", row.domain)) if p]
    return ", ".join(parts + [f"{t} {s.value:g}" for per in row.tasks.values() for t, s in per.items()])


def _check_no_op_options(t_values, rule, keep_domain, holdout, general_report, domain_report, schedule, blocks,
                         budget, force=False, out=None, tasks_split=False) -> None:
    """Refuse sweep options that would change nothing (one line naming the option)."""
    if force and out is None:
        raise InputError("--force: replaces an existing output folder; it has no effect without -o OUT")
    if t_values is not None and len(t_values) == 0:
        raise InputError("--t-values: no value of t given; list at least one, e.g. 0.1,0.2,0.3 (base and SFT "
                         "are always evaluated)")
    if t_values is not None and not all(math.isfinite(float(t)) for t in t_values):
        raise InputError(f"--t-values: every t must be a finite number, got {list(t_values)}")
    if keep_domain is not None and rule == "score":
        raise InputError("--keep-domain: has no effect with --select score (it is the keep-domain rule's bar)")
    if holdout is not None and general_report is not None and domain_report is not None and not tasks_split:
        raise InputError("--holdout: has no effect when both --general-report and --domain-report are given")
    if blocks is not None and schedule != "blocks":
        raise InputError("--blocks: only applies with --schedule blocks")
    if budget is not None and schedule is None:
        raise InputError("--budget: bounds the schedule search; give --schedule lines|blocks or drop --budget")


def _check_options(method, rule, keep_domain, holdout, schedule, blocks, budget, max_tokens) -> None:
    if method not in registry.sweepable():
        raise InputError(f"--method {method}: a sweep evaluates {' or '.join(registry.sweepable())} merges")
    if rule not in ("keep-domain", "score"):
        raise InputError(f"--select {rule}: use keep-domain or score")
    if keep_domain is not None and not 0 < keep_domain <= 1:
        raise InputError(f"--keep-domain {keep_domain:g}: give a fraction in (0, 1]")
    if holdout is not None and not 0 < holdout < 1:
        raise InputError(f"--holdout {holdout:g}: give the report fraction in (0, 1), e.g. 0.5")
    if schedule not in (None, "lines", "blocks"):
        raise InputError(f"--schedule {schedule}: use lines or blocks")
    if (blocks is not None and blocks < 1) or (budget is not None and budget < 1):
        raise InputError("--blocks and --budget must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise InputError("--max-tokens must be at least 1")


LINEAR_T = ("linear", "slerp")
OTHER_METHODS = {  # name -> recipe fields at value v (one SFT: TIES' sign election is trivial, so no consensus)
    "task_arithmetic": lambda v: {"method": "task_arithmetic", "scale": v},
    "ties": lambda v: {"method": "task_arithmetic", "scale": 1.0, "sparsify": {"method": "magnitude", "density": v}},
    "dare": lambda v: {"method": "task_arithmetic", "scale": 1.0, "sparsify": {"method": "random", "density": v}},
    "breadcrumbs": lambda v: {"method": "task_arithmetic", "scale": 1.0,
                              "sparsify": {"method": "breadcrumbs", "density": v}},
}


def _candidate_recipe(label: str, fields: dict, base, sft, device: str):
    """The recipe of a ``method@value`` candidate; a recipe error names the candidate."""
    from .. import api

    try:
        return api.build_recipe({**fields, "base": str(base), "sft": [str(sft)], "device": device})
    except InputError as e:
        raise InputError(f"--candidates {label}: {e}") from None


def parse_candidates(text, method: str = "linear") -> list[tuple[str, object]]:
    """``"linear,slerp,linear@0.25,ties@0.3"`` -> [(method, t values or None for the grid)..., (label, recipe
    fields)...]: linear/slerp without a value sweep the t grid, with ``@t`` add that t (when neither is named:
    the linear t grid); another method at ``@value`` is one candidate (ties/dare/breadcrumbs: density;
    task_arithmetic: scale). ``text`` None: ``method`` over the t grid."""
    if text is None:
        return [(method, None)]
    if method != "linear":
        raise InputError("--method: has no effect with --candidates; name the methods there (e.g. linear,slerp)")
    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    if not items:
        raise InputError("--candidates: give at least one method, e.g. linear,slerp,ties@0.3")
    grid: dict[str, list | None] = {}
    others = []
    for item in items:
        name, at, value = item.partition("@")
        number = None
        if at:
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"--candidates {item}: expected method[@number], e.g. ties@0.3") from None
            if not math.isfinite(number):
                raise InputError(f"--candidates {item}: the value must be a finite number")
        if name in LINEAR_T:
            if number is None:
                grid[name] = None
            elif grid.get(name, []) is not None:
                grid.setdefault(name, []).append(number)
        elif name in OTHER_METHODS:
            if number is None:
                raise InputError(f"--candidates {name}: give its value, e.g. {name}@0.3")
            others.append((item, OTHER_METHODS[name](number)))
        else:
            raise InputError(f"--candidates {name}: unknown method; use linear, slerp (the t grid, or @t) or "
                             f"{', '.join(OTHER_METHODS)} @value")
    if not grid:
        grid = {"linear": None}  # the t grid as without --candidates
    return [*grid.items(), *others]


def _grid_ts(grid, t_values: list[float]) -> list[tuple[str, list[float]]]:
    """Per linear/slerp method, the t values to evaluate; base (t=1) and SFT (t=0) once, with the first."""
    out, seen_ends = [], False
    for name, ts in grid:
        if isinstance(ts, dict):
            continue
        values = sorted(set(t_values if ts is None else ts) | ({0.0, 1.0} if not seen_ends else set()))
        if seen_ends:
            values = [t for t in values if t not in (0.0, 1.0)]
        seen_ends = True
        out.append((name, values))
    return out
