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
from ..evaluate import encode, load_probes, objective, select
from ..evaluate.harness import EvalSettings
from ..evaluate.probes import ProbeSet
from ..evaluate.tasks import split_specs
from ..inputs import open_inputs
from ..keys import BASE, PRIMARY
from ..methods import registry
from ..options import OutputOptions, ReportOptions
from ..tensor_names import Structure
from .inplace import InPlaceModel
from .result import Candidate, Reported, ScheduleOutcome, SweepResult, plot_tradeoff, with_recovery
from .scorer import Scorer, load_tokenizer, written_dtype
from .search import blocks_recipe, coordinate_search, lines_recipe
from .sweep_tasks import build_tasks, check_task_options, input_fingerprints

__all__ = ["sweep", "load_tokenizer", "parse_candidates"]

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
          candidates: str | Sequence[str] | None = None, ray: str | None = None, workers: int | None = None,
          gpus_per_worker: float | None = None, cpus_per_worker: float | None = None, verbose: bool = False,
          progress: bool = False) -> SweepResult:
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

    ``ray`` (``auto``, ``local`` or an address, as for merges): candidates are evaluated by ``workers`` Ray
    actors (default: as many as the cluster's GPUs or CPUs hold), each with ``gpus_per_worker`` GPUs and
    ``cpus_per_worker`` CPUs (default 1 CPU), holding base and SFT once (see :mod:`merge.recover.sweep_ray`);
    the table, the choice and the written merge equal the local sweep's. ``progress``: a bar of candidates done;
    ``verbose``: one line per candidate and worker on stderr.
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
        cluster = dict(ray=ray, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                       verbose=verbose, progress=progress, threads=threads)
        if any(cluster[k] is not None for k in ("ray", "workers", "gpus_per_worker", "cpus_per_worker")):
            from .sweep_ray import check_sweep_options

            check_sweep_options(ray, workers, gpus_per_worker, cpus_per_worker, device)
        with ExitStack() as cleanup:
            return _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain,
                          general_report, domain_report, holdout, schedule, blocks, budget, max_tokens, device, force,
                          plot, command, echo, token, task_options, candidates, cluster, cleanup)
    finally:
        torch.set_num_threads(before)


def _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain, general_report,
           domain_report, holdout, schedule, blocks, budget, max_tokens, device, force, plot, command, echo,
           token, task_options, candidates, cluster, cleanup) -> SweepResult:
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
    task_build = dict(general_tasks=o["general_tasks"], domain_tasks=o["domain_tasks"],
                      general_report_tasks=o["general_report_tasks"], domain_report_tasks=o["domain_report_tasks"],
                      tasks_path=o["tasks_path"], metrics=o["metrics"], holdout=holdout_used, settings=settings,
                      no_cache=o["no_cache"], cache_dir=o["cache_dir"])
    tasks = build_tasks(**task_build)
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
    distributed = cluster["ray"] is not None
    dev = None if distributed else resolve_device(device)  # the workers resolve --device on their own nodes
    with ExitStack() as stack:
        inputs = open_inputs(template, stack, token=token, out=out_path)
        models, labels, resolved = inputs.models, inputs.labels, inputs.resolved
        tokenizer = load_tokenizer(models[PRIMARY], models[BASE])
        n_layers = Structure.of(models[PRIMARY].config, models[PRIMARY].names())
        encoded = {k: encode(p.documents, tokenizer, max_tokens) for k, p in probes.items() if p is not None}
        for k, docs in encoded.items():
            if sum(d.num_scored for d in docs) == 0:
                raise InputError(f"{probes[k].name}: no tokens to score")
            if sum(d.num_bytes for d in docs) == 0:
                raise InputError(f"{probes[k].name}: the scored text is empty (0 bytes), so bits per byte cannot "
                                 "be computed; give probes with non-empty responses/documents")
        if distributed:
            if tasks is not None:
                say(tasks.choose_chat_template(tokenizer, o["apply_chat_template"]))
        else:
            inplace = InPlaceModel(models, labels, dev, template, written_dtype(models[PRIMARY]) if tasks else None)
            if tasks is not None:
                say(tasks.start(inplace.model, tokenizer, o["apply_chat_template"], input_fingerprints(resolved),
                                {"eval_dtype": str(inplace.model.dtype), "device": dev.type}))
            scorer = Scorer(inplace, encoded, dev, tasks)
    if distributed:
        scorer = _ray_pool(cluster, cleanup, resolved, labels, token, template, device, encoded, tasks, task_build,
                           o["apply_chat_template"])
    seconds_load = time.perf_counter() - started
    on = [f"{sum(d.num_scored for d in encoded[f'{s}_select'])} {s} tokens" for s in ("general", "domain")
          if f"{s}_select" in encoded]
    if tasks is not None and tasks.select:
        on.append(f"tasks {tasks.describe('select')}")
    where = f"{scorer.workers} Ray workers" if distributed else dev
    say(f"loaded base and SFT in {seconds_load:.1f}s on {where}; evaluating {len(t_values)} values of t "
        f"(t = share of the base) on {' and '.join(on)}")
    runner = _Runner(scorer, n_layers, (lambda line: scorer.say(say, line)) if distributed else say, tasks)

    specs = [(label, recipe, None, recipe.method) for label, recipe in extra_recipes]
    for m, ts in _grid_ts(grid, t_values):
        specs += [(f"{m} t={t:g}" if len(grid) > 1 else f"t={t:g}", template.model_copy(update={"t": t, "method": m}),
                   t, m) for t in ts]
    evaluated = runner.candidates(specs)
    others, rows = evaluated[:len(extra_recipes)], evaluated[len(extra_recipes):]
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
        which = list(dict.fromkeys([base_row, sft_row, chosen]))
        reported = dict(zip(map(id, which), runner.reports(
            [(c, "base" if c is base_row else "SFT" if c is sft_row else None) for c in which])))
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
    result.cluster = scorer.stats if distributed else None
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
    """Turns a scorer's measurements (this process's :class:`Scorer`, or a pool of Ray actors) into candidates
    and report rows, one line per candidate."""

    def __init__(self, scorer, n_layers: Structure, say, tasks=None):
        self.scorer, self.n_layers, self.say, self.tasks = scorer, n_layers, say, tasks
        self.seconds_report = 0.0

    def candidates(self, specs: list[tuple]) -> list[Candidate]:
        """``(label, recipe, t, method)`` specs, measured on the selection part (at once where the scorer can)."""
        out = []
        items = [(recipe, "select", label) for label, recipe, _, _ in specs]
        for (label, recipe, t, method), m in zip(specs, self.scorer.measure_many(items)):
            name = "SFT" if t == 0 else "base" if t == 1 else label
            parts = [f"{side} {p.bpb:.4f} bpb (ppl {p.ppl:.2f})" for side, p in (("general", m.general),
                                                                                 ("domain", m.domain)) if p is not None]
            parts += [f"{task} {s.value:.4f}" for per in m.tasks.values() for task, s in per.items()]
            cache = "" if not m.total else (", cache hit" if m.cached == m.total else f", cache {m.cached}/{m.total}"
                                            if m.cached else ", cache miss" if self.tasks.cache else ", no cache")
            self.say(f"  {name:>28}: {', '.join(parts)}  [set {m.seconds_set:.2f}s, eval {m.seconds_eval:.2f}s"
                     f"{cache}]")
            out.append(Candidate(label, recipe, m.general, m.domain, t, m.seconds_set, m.seconds_eval, tasks=m.tasks,
                                 cached=m.cached, task_count=m.total, method=method))
        return out

    def candidate(self, label: str, recipe, t: float | None = None, method: str = "linear") -> Candidate:
        return self.candidates([(label, recipe, t, method)])[0]

    def reports(self, which: list[tuple[Candidate, str | None]]) -> list[Reported]:
        """Each candidate measured on the report part, named ``name`` (base/SFT) or by its label."""
        out = []
        items = [(c.recipe, "report", f"{name or c.label} (report)") for c, name in which]
        for (c, name), m in zip(which, self.scorer.measure_many(items)):
            self.seconds_report += m.seconds_set + m.seconds_eval
            label = name or c.label
            out.append(Reported(label if name is None or c.t is None else f"{label} (t={c.t:g})", m.general,
                                m.domain, None, tasks=m.tasks))
        return out

    def report(self, c: Candidate, name: str | None) -> Reported:
        return self.reports([(c, name)])[0]

    def search_schedule(self, kind: str, template, chosen: Candidate, base_row: Candidate, sft_row: Candidate,
                        blocks: int, budget: int, rule: str, keep_domain: float) -> ScheduleOutcome:
        n_layers = self.n_layers
        lam = 1.0 - chosen.t

        def spec(point: tuple) -> tuple:
            if kind == "lines":
                return (f"lines(alpha={point[0]:g}, beta={point[1] - point[0]:g})", lines_recipe(template, *point),
                        None, "linear")
            return ("blocks(t=" + "/".join(f"{x:g}" for x in point) + ")", blocks_recipe(template, point, n_layers),
                    None, "linear")

        def evaluate_many(points: list[tuple]) -> list[Candidate]:
            return [with_recovery(c, base_row, sft_row) for c in self.candidates([spec(p) for p in points])]

        began = time.perf_counter()
        start = (lam, lam) if kind == "lines" else (chosen.t,) * max(1, min(blocks, n_layers.max_layers))
        self.say(f"searching {kind} schedules from the chosen t = {chosen.t:g} (at most {budget} evaluations)")
        _, best, used = coordinate_search(start, None, lambda c: objective(c.recovery, rule, keep_domain), budget,
                                          evaluate_many=evaluate_many, width=getattr(self.scorer, "width", 1))
        better = objective(best.recovery, rule, keep_domain) > objective(chosen.recovery, rule, keep_domain)
        return ScheduleOutcome(kind, best, used, better, seconds=time.perf_counter() - began)


def _ray_pool(cluster: dict, cleanup: ExitStack, resolved, labels, token, template, device, encoded, tasks,
              task_build: dict, apply_chat_template):
    """The Ray actors of a distributed sweep (closed by ``cleanup``); each rebuilds the tasks from
    ``task_build``, with the cache folder made absolute so that every worker shares it."""
    from ..evaluate.cache import ResultCache
    from .sweep_ray import RayPool

    task_args = None
    if tasks is not None:
        folder = None if task_build["no_cache"] else str(ResultCache(task_build["cache_dir"]).folder.resolve())
        task_args = {"build": {**task_build, "cache_dir": folder}, "apply_chat_template": apply_chat_template,
                     "fingerprints": input_fingerprints(resolved)}
    setup = {"common": {"inputs": resolved, "labels": labels, "token": token}, "template": template,
             "device": device, "encoded": encoded, "tasks": task_args, "threads": cluster["threads"]}
    pool = RayPool(cluster["ray"], cluster["workers"], cluster["gpus_per_worker"], cluster["cpus_per_worker"], setup,
                   progress=cluster["progress"], verbose=cluster["verbose"])
    cleanup.callback(pool.close)
    return pool


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
