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
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import InputError
from ..evaluate import ProbeScore, encode, load_probes, objective, recovery, select
from ..evaluate.probes import ProbeSet
from ..evaluate.scoring import score
from ..methods import registry
from .inplace import InPlaceModel
from .result import Candidate, Reported, ScheduleOutcome, SweepResult, plot_tradeoff, with_recovery
from .search import blocks_recipe, coordinate_search, lines_recipe

DEFAULT_T = tuple(round(i / 10, 1) for i in range(11))
DEFAULT_MAX_TOKENS = 20_000
DEFAULT_KEEP_DOMAIN, DEFAULT_BLOCKS, DEFAULT_BUDGET = 0.9, 3, 16
SCHEDULE_HOLDOUT = 0.5


def sweep(sft: str, base: str, domain: str | Path, general: str | Path | None = None, out: str | Path | None = None,
          *, t_values: Sequence[float] | None = None, method: str = "linear", select_rule: str = "keep-domain",
          keep_domain: float | None = None, general_report: str | Path | None = None,
          domain_report: str | Path | None = None, holdout: float | None = None, schedule: str | None = None,
          blocks: int | None = None, budget: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
          device: str = "auto",
          force: bool = False, plot: str | Path | None = None, command: str | None = None,
          echo: Callable[[str], None] | None = None, token: str | None = None,
          threads: int | None = None) -> SweepResult:
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
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain, general_report,
                      domain_report, holdout, schedule, blocks, budget, max_tokens, device, force, plot, command,
                      echo, token)
    finally:
        torch.set_num_threads(before)


def _sweep(sft, base, domain, general, out, t_values, method, select_rule, keep_domain, general_report,
           domain_report, holdout, schedule, blocks, budget, max_tokens, device, force, plot, command, echo,
           token) -> SweepResult:
    from .. import api
    from ..execute import resolve_device
    from ..io import output

    started = time.perf_counter()
    say = echo or (lambda line: None)
    _check_options(method, select_rule, keep_domain, holdout, schedule, blocks, budget, max_tokens)
    _check_no_op_options(t_values, select_rule, keep_domain, holdout, general_report, domain_report, schedule,
                         blocks, budget, force, out)
    keep_domain = DEFAULT_KEEP_DOMAIN if keep_domain is None else keep_domain
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    budget = DEFAULT_BUDGET if budget is None else budget
    t_values = sorted(set(float(t) for t in (t_values if t_values is not None else DEFAULT_T)) | {0.0, 1.0})
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if out_path is not None:
        output.check_target(out_path, output.local_inputs({f"SFT {sft}": sft, f"base {base}": base}))
        output.check_output(out_path, force)
    notes: list[str] = []
    probes = _probe_sets(general, domain, general_report, domain_report, holdout, schedule, notes)
    template = api.build_recipe({"method": method, "base": str(base), "sft": [str(sft)], "t": 0.0,
                                 "device": device})
    resolved, _ = api.resolve_inputs(template, token=token)
    labels = {k: f"{'base' if k == 'base' else 'SFT'} {m.ref}" for k, m in resolved.items()}
    if out_path is not None:
        output.check_target(out_path, {labels[k]: m.path for k, m in resolved.items()})
    dev = resolve_device(device)
    with ExitStack() as stack:
        models = {k: stack.enter_context(api.open_model(m, labels[k], resolved)) for k, m in resolved.items()}
        tokenizer = load_tokenizer(models["sft0"], models["base"])
        encoded = {k: encode(p.documents, tokenizer, max_tokens) for k, p in probes.items()}
        for k, docs in encoded.items():
            if sum(d.num_scored for d in docs) == 0:
                raise InputError(f"{probes[k].name}: no tokens to score")
            if sum(d.num_bytes for d in docs) == 0:
                raise InputError(f"{probes[k].name}: the scored text is empty (0 bytes), so bits per byte cannot "
                                 "be computed; give probes with non-empty responses/documents")
        inplace = InPlaceModel(models, labels, dev, template)
    seconds_load = time.perf_counter() - started
    say(f"loaded base and SFT in {seconds_load:.1f}s on {dev}; evaluating {len(t_values)} values of t "
        f"(t = share of the base) on {sum(d.num_scored for d in encoded['general_select'])} general and "
        f"{sum(d.num_scored for d in encoded['domain_select'])} domain tokens")
    runner = _Runner(inplace, encoded, dev, say)

    rows = [runner.candidate(f"t={t:g}", template.model_copy(update={"t": t}), t) for t in t_values]
    by_t = {c.t: c for c in rows}
    base_row, sft_row = by_t[1.0], by_t[0.0]
    for c in rows:
        with_recovery(c, base_row, sft_row)
    _forgetting_notes(base_row, sft_row, notes)
    chosen = select(_finite_candidates(rows, base_row, sft_row, notes), lambda c: c.recovery, select_rule,
                    keep_domain)
    result = SweepResult(rows, chosen, select_rule, keep_domain, {k: p.name for k, p in probes.items()}, notes=notes,
                         seconds_load=seconds_load)
    separate = probes["general_report"] is not probes["general_select"] or \
        probes["domain_report"] is not probes["domain_select"]
    written = chosen
    if separate:
        reported = {id(c): runner.report(c, "base" if c is base_row else "SFT" if c is sft_row else None)
                    for c in dict.fromkeys([base_row, sft_row, chosen])}
        rb, rs = reported[id(base_row)], reported[id(sft_row)]
        for r in reported.values():
            r.recovery = recovery(rb.general.bpb, rs.general.bpb, r.general.bpb, rb.domain.bpb, rs.domain.bpb,
                                  r.domain.bpb)
        result.report = list(reported.values())
    if schedule:
        result.schedule = runner.search_schedule(schedule, template, chosen, base_row, sft_row, blocks, budget,
                                                 select_rule, keep_domain)
        outcome = result.schedule
        if outcome.beats_on_selection and separate:
            outcome.global_report = reported[id(chosen)]
            outcome.report = runner.report(outcome.best, None)
            outcome.report.recovery = recovery(rb.general.bpb, rs.general.bpb, outcome.report.general.bpb,
                                               rb.domain.bpb, rs.domain.bpb, outcome.report.domain.bpb)
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

    def __init__(self, inplace: InPlaceModel, encoded: dict, device: torch.device, say):
        self.inplace, self.encoded, self.device, self.say = inplace, encoded, device, say
        self.seconds_report = 0.0

    def _score(self, part: str) -> tuple[ProbeScore, ProbeScore]:
        model = self.inplace.model
        return (score(model, self.encoded[f"general_{part}"], self.device),
                score(model, self.encoded[f"domain_{part}"], self.device))

    def candidate(self, label: str, recipe, t: float | None = None) -> Candidate:
        began = time.perf_counter()
        self.inplace.apply(recipe)
        set_s = time.perf_counter() - began
        general, domain = self._score("select")
        eval_s = time.perf_counter() - began - set_s
        name = "SFT" if t == 0 else "base" if t == 1 else label
        self.say(f"  {name:>28}: general {general.bpb:.4f} bpb (ppl {general.ppl:.2f}), domain {domain.bpb:.4f} "
                 f"bpb (ppl {domain.ppl:.2f})  [set {set_s:.2f}s, eval {eval_s:.2f}s]")
        return Candidate(label, recipe, general, domain, t, set_s, eval_s)

    def report(self, c: Candidate, name: str | None) -> Reported:
        began = time.perf_counter()
        self.inplace.apply(c.recipe)
        general, domain = self._score("report")
        self.seconds_report += time.perf_counter() - began
        label = name or c.label
        return Reported(label if name is None else f"{label} (t={c.t:g})", general, domain, None)

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

    api.run(written.recipe, out=out_path, force=force, command=command, card_sections=[result.card_section()])
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


def load_tokenizer(sft, base):
    """The SFT's tokenizer (its folder, or an adapter's), else the base's."""
    import warnings

    from transformers import AutoTokenizer

    last = None
    for model in (sft, base):
        folder = Path(getattr(model, "side_files_path", model.path))
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


def _probe_sets(general, domain, general_report, domain_report, holdout, schedule, notes) -> dict[str, ProbeSet]:
    g, d = load_probes(general), load_probes(domain)
    if general is None:
        notes.append("general probes: the built-in set (short everyday English paragraphs) - a smoke signal, "
                     "not a benchmark; pass --general for your own")
    gr = load_probes(general_report) if general_report is not None else None
    dr = load_probes(domain_report) if domain_report is not None else None
    if holdout is None and schedule and (gr is None or dr is None):
        holdout = SCHEDULE_HOLDOUT
        notes.append(f"a schedule may only claim a win on held-out probes: split {holdout:g} of each probe set "
                     "(by content hash) for reporting")
    if holdout is not None:
        if gr is None:
            g, gr = g.split(holdout)
        if dr is None:
            d, dr = d.split(holdout)
    if gr is None and dr is None:
        notes.append("t was chosen and is reported on the same probes (optimistic); pass --general-report/"
                     "--domain-report or --holdout 0.5 to measure the choice on probes it was not chosen on")
    return {"general_select": g, "domain_select": d, "general_report": gr or g, "domain_report": dr or d}


def _forgetting_notes(base_row: Candidate, sft_row: Candidate, notes: list[str]) -> None:
    if sft_row.general.bpb <= base_row.general.bpb:
        notes.append("the SFT scores no worse than the base on the general probes: nothing measurable to recover "
                     "(general_recovered is n/a)")
    if sft_row.domain.bpb >= base_row.domain.bpb:
        notes.append("the SFT does not beat the base on the domain probes: no domain gain to keep "
                     "(domain_retained is n/a); are these the right domain probes?")


def _scores_finite(c: Candidate) -> bool:
    return all(math.isfinite(x) for x in (c.general.bpb, c.domain.bpb))


def _finite_candidates(rows: list[Candidate], base_row: Candidate, sft_row: Candidate, notes: list[str]
                       ) -> list[Candidate]:
    """The rows a choice may take: those with finite scores. A non-finite base or SFT score is an error (every
    recovery number is measured against them); other non-finite candidates are left out with a note."""
    for name, row in (("base (t=1)", base_row), ("SFT (t=0)", sft_row)):
        if not _scores_finite(row):
            raise InputError(f"sweep: the {name} scores are not finite (general {row.general.bpb:g}, domain "
                             f"{row.domain.bpb:g} bits/byte); check that model and the probes")
    left_out = [c for c in rows if not _scores_finite(c)]
    if left_out:
        notes.append("left out of the choice, scores not finite: " + ", ".join(c.label for c in left_out))
    return [c for c in rows if _scores_finite(c)]


def _check_no_op_options(t_values, rule, keep_domain, holdout, general_report, domain_report, schedule, blocks,
                         budget, force=False, out=None) -> None:
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
    if holdout is not None and general_report is not None and domain_report is not None:
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
