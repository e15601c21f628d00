"""What a sweep measured, as values: candidates, the choice, and its table, card section, JSON and plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate import ProbeScore, Recovery, recovery
from ..evaluate.benchmark import SideScore
from ..recipes.schema import Recipe


@dataclass(eq=False)
class Candidate:
    """One evaluated merge: ``t`` (share of the base) for a global t, else a schedule ``label``."""

    label: str
    recipe: Recipe
    general: ProbeScore | None  # None: that side has no probe files (tasks only)
    domain: ProbeScore | None
    t: float | None = None
    seconds_set: float = 0.0
    seconds_eval: float = 0.0
    recovery: Recovery | None = None
    tasks: dict = field(default_factory=dict)  # side -> task -> TaskScore (selection part)
    sides: dict = field(default_factory=dict)  # side -> SideScore of its tasks
    forgetting: dict = field(default_factory=dict)  # side -> task -> Forgetting (general: vs base; domain: vs SFT)
    cached: int = 0  # tasks answered from the cache
    task_count: int = 0
    method: str = "linear"


@dataclass
class Reported:
    """A candidate measured on the report probes."""

    label: str
    general: ProbeScore | None
    domain: ProbeScore | None
    recovery: Recovery | None
    tasks: dict = field(default_factory=dict)  # side -> task -> TaskScore (report part)
    sides: dict = field(default_factory=dict)
    forgetting: dict = field(default_factory=dict)


@dataclass
class ScheduleOutcome:
    kind: str  # lines | blocks
    best: Candidate
    evaluations: int
    beats_on_selection: bool
    report: Reported | None = None
    global_report: Reported | None = None
    wins: bool = False  # measured on the report probes only
    seconds: float = 0.0  # the whole search: setting and evaluating every schedule tried

    def verdict(self) -> str:
        if not self.beats_on_selection:
            return (f"schedule search ({self.kind}, {self.evaluations} evaluations) found nothing better than the "
                    "best global t on the selection probes")
        if self.report is None or self.global_report is None:
            return f"schedule {self.best.label} beat the best global t on the selection probes only"
        r, g = self.report.recovery, self.global_report.recovery
        words = "beats" if self.wins else "does not beat"
        return (f"schedule {self.best.label} {words} the best global t on the report probes: general_recovered "
                f"{_f(r.general_recovered)} vs {_f(g.general_recovered)}, domain_retained {_f(r.domain_retained)} "
                f"vs {_f(g.domain_retained)}, score {_f(r.score)} vs {_f(g.score)}")


@dataclass
class SweepResult:
    """``rows``: the global-t candidates on the selection probes (t ascending); ``chosen``: the rule's pick
    among them; ``report``: base, SFT, the chosen t (and a schedule) on the report probes; ``written``: the
    candidate finally picked (a schedule that won on the report probes, else ``chosen``), what ``out`` holds."""

    rows: list[Candidate]
    chosen: Candidate
    rule: str
    keep_domain: float
    probes: dict[str, str]
    report: list[Reported] = field(default_factory=list)
    schedule: ScheduleOutcome | None = None
    written: Candidate | None = None
    out: Path | None = None
    plot: Path | None = None
    recipe_path: Path | None = None
    json_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    seconds_load: float = 0.0
    seconds_report: float = 0.0  # evaluating on the report probes
    seconds_write: float = 0.0  # writing the chosen model, plot and JSON
    seconds_total: float = 0.0
    task_text: dict = field(default_factory=dict)  # select/report: which tasks and part; chat_template: the note
    task_columns: dict = field(default_factory=dict)  # select/report: [(side, task, metric, higher_is_better)]
    cluster: object | None = None  # a distributed sweep's SweepCluster (merge.recover.sweep_ray): workers and time

    @property
    def base(self) -> Candidate:
        return next(r for r in self.rows if r.t == 1.0)

    @property
    def sft(self) -> Candidate:
        return next(r for r in self.rows if r.t == 0.0)

    @property
    def chosen_t(self) -> float | None:
        return self.chosen.t

    @property
    def seconds_set(self) -> float:
        """Setting the global-t candidates' parameters (the schedule search is timed on its own)."""
        return sum(c.seconds_set for c in self.rows)

    @property
    def seconds_eval(self) -> float:
        """Evaluating the global-t candidates on the selection probes."""
        return sum(c.seconds_eval for c in self.rows)

    def time_line(self) -> str:
        """Where the time went; the parts add up to the total but for bookkeeping."""
        search = (f", schedule search {self.schedule.seconds:.1f}s ({self.schedule.evaluations} evaluations)"
                  if self.schedule else "")
        counted = sum(c.task_count for c in self.rows)
        cache = (f" ({sum(c.cached for c in self.rows)} of {counted} task results from the cache)"
                 if counted else "")
        return (f"time: loading {self.seconds_load:.1f}s, setting parameters {self.seconds_set:.1f}s, "
                f"evaluating {self.seconds_eval + self.seconds_report:.1f}s{cache}{search}, writing "
                f"{self.seconds_write:.1f}s, total {self.seconds_total:.1f}s")

    def score_notes(self) -> list[str]:
        """What scores outside [0, 1] mean, when some candidate has one."""
        out = []
        for what, key, meaning in (
                ("general_recovered", "general_recovered",
                 "the merge scores better than the base on the general probes (G_m < G_base)"),
                ("domain_retained", "domain_retained",
                 "the merge scores better than the SFT on the domain probes (D_m < D_sft)")):
            high = [(getattr(c.recovery, key), c.label) for c in self.rows + [r for r in self.report]
                    if c.recovery is not None and math.isfinite(getattr(c.recovery, key))
                    and getattr(c.recovery, key) > 1]
            if high:
                top, label = max(high)
                out.append(f"{what} above 1 (up to {top:.3f}, {label}): {meaning}; the ratio divides by the gap "
                           "between base and SFT, so a small gap makes it large")
        return out

    # -- text ----------------------------------------------------------------------------------------------
    def forgetting_line(self) -> str:
        b, s = self.base, self.sft
        parts = []
        if b.general is not None:
            ratio = s.general.ppl / b.general.ppl
            parts.append(f"general probes {b.general.bpb:.4f} -> {s.general.bpb:.4f} bits/byte, perplexity "
                         f"{b.general.ppl:.2f} -> {s.general.ppl:.2f} ({ratio:.2f}x) from base to SFT")
        if b.domain is not None:
            parts.append(f"domain {b.domain.bpb:.4f} -> {s.domain.bpb:.4f} bits/byte (the gain to keep)")
        for side, per in b.tasks.items():
            parts.append(", ".join(f"{side} task {t} {v.value:.4f} -> {s.tasks[side][t].value:.4f}"
                                   for t, v in per.items()) + " from base to SFT")
        return "forgetting: " + "; ".join(parts)

    def pareto(self) -> set[int]:
        """ids of the candidates no other candidate dominates on (general_recovered, domain_retained)."""
        def point(c):
            return (c.recovery.general_recovered, c.recovery.domain_retained)
        finite = [c for c in self.rows if all(math.isfinite(x) for x in point(c))]
        return {id(c) for c in finite if not any(
            all(a >= b for a, b in zip(point(o), point(c))) and point(o) != point(c) for o in finite)}

    def row_name(self, c: Candidate) -> str:
        if c.t is None:
            return c.label
        if c.t in (0, 1):
            return "SFT" if c.t == 0 else "base"
        return f"{c.method} {c.t:g}" if len({r.method for r in self.rows if r.t is not None}) > 1 else f"{c.t:g}"

    def task_table(self, which: str = "select") -> str:
        """Per candidate (selection) or reported model: each task's metric and, against its reference (general:
        the base, domain: the SFT), items forgotten/gained as ``-f/+g``."""
        columns = self.task_columns.get(which) or []
        items = self.rows if which == "select" else self.report
        head = ["", *(f"{side}:{task} {metric} {'↑' if hib else '↓'}" for side, task, metric, hib in columns)]
        table = [head]
        for c in items:
            name = self.row_name(c) if which == "select" else c.label
            cells = []
            for side, task, _, _ in columns:
                score = c.tasks[side][task]
                f = c.forgetting.get(side, {}).get(task)
                is_base = c.t == 1 if which == "select" else c.label.startswith("base")
                is_sft = c.t == 0 if which == "select" else c.label.startswith("SFT")
                ref_is_self = (is_base and side == "general") or (is_sft and side == "domain")
                counts = "" if f is None or f.forgotten is None or ref_is_self else f" -{f.forgotten}/+{f.gained}"
                cells.append(f"{score.value:.4f}{counts}")
            table.append([("* " if c is self.chosen else "  ") + name, *cells])
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)

    def table(self) -> str:
        """The selection-probe table, one row per t, the chosen one marked with ``*``."""
        width = max([5] + [len(self.row_name(c)) for c in self.rows])
        several = len(self.rows) > len([c for c in self.rows if c.t is not None and c.method == self.base.method])
        front = self.pareto() if several else set()
        g, d = self.base.general is not None, self.base.domain is not None
        head = (f"{'':1} {'t':>{width}}  " + (f"{'general bpb':>11} {'ppl':>8}  " if g else "")
                + (f"{'domain bpb':>10} {'ppl':>7}  " if d else "")
                + f"{'gen_recovered':>13} {'dom_retained':>12} {'score':>6}" + ("  pareto" if several else ""))
        lines = [head]
        for c in self.rows:
            mark = "*" if c is self.chosen else " "
            name = self.row_name(c)
            lines.append(f"{mark} {name:>{width}}  " + (f"{_bpb(c.general, 11)} {_ppl(c.general, 8)}  " if g else "")
                         + (f"{_bpb(c.domain, 10)} {_ppl(c.domain, 7)}  " if d else "")
                         + f"{_f(c.recovery.general_recovered):>13} "
                         f"{_f(c.recovery.domain_retained):>12} {_f(c.recovery.score):>6}"
                         + (("  yes" if id(c) in front else "") if several else ""))
        return "\n".join(lines)

    def _has_report_probes(self) -> bool:
        return bool(self.probes.get("general_report") or self.probes.get("domain_report"))

    def report_table(self, probes: bool = True) -> str:
        width = max([12] + [len(r.label) for r in self.report])
        lines = [f"{'':{width}} " + (f"{'general bpb':>11} {'domain bpb':>10}  " if probes else "")
                 + f"{'gen_recovered':>13} {'dom_retained':>12} {'score':>6}"]
        for r in self.report:
            lines.append(f"{r.label:{width}} " + (f"{_bpb(r.general, 11)} {_bpb(r.domain, 10)}  " if probes else "")
                         +
                         f"{_f(r.recovery.general_recovered):>13} {_f(r.recovery.domain_retained):>12} "
                         f"{_f(r.recovery.score):>6}")
        return "\n".join(lines)

    def summary(self) -> str:
        from ..evaluate import rule_text

        c = self.chosen
        lines = [self.forgetting_line(), "", "selection probes: " + self._probe_names("select"), self.table()]
        if self.task_columns.get("select"):
            lines += ["", f"selection tasks: {self.task_text['select']} ({self.task_text['chat_template']}); per "
                      "item -forgotten/+gained (general: against the base, domain: against the SFT)",
                      self.task_table("select")]
        lines += ["", f"rule: {rule_text(self.rule, self.keep_domain)}",
                  f"chosen: {_what(c)} (general_recovered {_f(c.recovery.general_recovered)}, domain_retained "
                  f"{_f(c.recovery.domain_retained)}, score {_f(c.recovery.score)})"]
        if self.report:
            if self._has_report_probes():
                lines += ["", "report probes: " + self._probe_names("report"), self.report_table()]
            else:
                lines += ["", "report (tasks only):", self.report_table(probes=False)]
            if self.task_columns.get("report"):
                lines += ["", f"report tasks: {self.task_text['report']}", self.task_table("report")]
            lines.append("the chosen model is reported on the report part only (data it was not chosen on)")
        if self.schedule:
            lines += ["", self.schedule.verdict()]
        lines += [f"note: {n}" for n in self.notes + self.score_notes()]
        lines.append(self.time_line())
        if self.cluster is not None:
            lines.append(self.cluster.line())
        if self.out:
            what = _what(self.written) if self.written else ""
            lines.append(f"wrote the merged model ({what}) -> {self.out}")
        if self.plot:
            lines.append(f"plot -> {self.plot}")
        if self.recipe_path:
            lines.append(f"schedule recipe -> {self.recipe_path}")
        return "\n".join(lines)

    def _probe_names(self, part: str) -> str:
        names = [f"{side} = {self.probes[f'{side}_{part}']}" for side in ("general", "domain")
                 if self.probes.get(f"{side}_{part}")]
        return "; ".join(names) or "none (tasks only)"

    def card_section(self) -> str:
        """The model card's "Recovery" section (markdown)."""
        from ..evaluate import rule_text

        w = self.written or self.chosen
        lines = ["## Recovery", "",
                 "Scored with `merge sweep` on probe sets (bits per byte, lower is better; perplexity per token). "
                 "`general_recovered = (G_sft - G_m)/(G_sft - G_base)`, `domain_retained = (D_base - D_m)/"
                 "(D_base - D_sft)`, score = their harmonic mean. These are small probe sets: a smoke signal, "
                 "not a benchmark.", ""]
        if self.task_columns:
            lines[-1:] = ["", "With lm-eval tasks, each side's number is the mean of its parts: the probe fraction "
                          "(when probe files are given) and each task's `(m - start)/(end - start)` on its primary "
                          "metric (tasks where base and SFT do not differ beyond their standard error are left out).",
                          ""]
        lines += [
                 f"- {self.forgetting_line()}",
                 f"- selection probes: {self._probe_names('select')}",
                 f"- rule: {rule_text(self.rule, self.keep_domain)}",
                 f"- this model: {_what(w)}",
                 *([f"- evaluated on a Ray cluster: {self.cluster.line()}"] if self.cluster is not None else []), "",
                 "| t | general bpb | general ppl | domain bpb | domain ppl | general_recovered | domain_retained "
                 "| score |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in self.rows:
            name = "0 (SFT)" if c.t == 0 else ("1 (base)" if c.t == 1 else self.row_name(c))
            name = f"**{name}**" if c is self.chosen else name
            lines.append(f"| {name} | {_bpb(c.general)} | {_ppl(c.general)} | {_bpb(c.domain)} | "
                         f"{_ppl(c.domain)} | {_f(c.recovery.general_recovered)} | "
                         f"{_f(c.recovery.domain_retained)} | {_f(c.recovery.score)} |")
        if self.task_columns.get("select"):
            lines += ["", f"Selection tasks ({self.task_text['select']}; {self.task_text['chat_template']}); per item "
                      "-forgotten/+gained (general: against the base, domain: against the SFT):", "", "```",
                      self.task_table("select"), "```"]
        if self.report:
            lines += ["", f"Report probes ({self._probe_names('report')}):", "",
                      "| model | general bpb | domain bpb | general_recovered | domain_retained | score |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r.label} | {_bpb(r.general)} | {_bpb(r.domain)} | {_f(r.recovery.general_recovered)} "
                      f"| {_f(r.recovery.domain_retained)} | {_f(r.recovery.score)} |" for r in self.report]
            if self.task_columns.get("report"):
                lines += ["", f"Report tasks ({self.task_text['report']}):", "", "```", self.task_table("report"),
                          "```"]
            lines += ["", "This model's numbers above are on the report part only (data it was not chosen on)."]
        if self.schedule:
            lines += ["", self.schedule.verdict() + "."]
        notes = self.score_notes()
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def cand(c: Candidate) -> dict:
            out = {"label": c.label, "t": c.t, "general_bpb": _get(c.general, "bpb"),
                   "general_ppl": _get(c.general, "ppl"), "domain_bpb": _get(c.domain, "bpb"),
                   "domain_ppl": _get(c.domain, "ppl"),
                   "general_recovered": c.recovery.general_recovered,
                   "domain_retained": c.recovery.domain_retained, "score": c.recovery.score,
                   "seconds_set": c.seconds_set, "seconds_eval": c.seconds_eval,
                   "recipe": c.recipe.model_dump(mode="json", exclude_none=True)}
            if c.tasks:
                out.update(_task_dict(c), method=c.method, cached_tasks=c.cached)
            return out

        out = {"rule": self.rule, "keep_domain": self.keep_domain, "probes": self.probes,
               "rows": [cand(c) for c in self.rows], "chosen_t": self.chosen.t,
               "report": [{"label": r.label, "general_bpb": _get(r.general, "bpb"),
                           "domain_bpb": _get(r.domain, "bpb"),
                           "general_recovered": r.recovery.general_recovered,
                           "domain_retained": r.recovery.domain_retained, "score": r.recovery.score,
                           **(_task_dict(r) if r.tasks else {})}
                          for r in self.report], "notes": self.notes + self.score_notes(),
               "written": (self.written or self.chosen).label,
               "seconds": {"load": self.seconds_load, "set": self.seconds_set, "eval": self.seconds_eval,
                           "report": self.seconds_report, "schedule_search": self.schedule.seconds if self.schedule
                           else 0.0, "write": self.seconds_write, "total": self.seconds_total}}
        if self.cluster is not None:
            out["cluster"] = self.cluster.to_dict()
        if self.task_columns:
            out["tasks"] = {**self.task_text, "reported_on": "report part only" if self.report else
                            "the selection data (no separate report part)"}
            out["chosen"] = cand(self.chosen)["label"]
        if self.schedule:
            out["schedule"] = {"kind": self.schedule.kind, "best": cand(self.schedule.best),
                               "evaluations": self.schedule.evaluations, "wins_on_report": self.schedule.wins,
                               "verdict": self.schedule.verdict(), "seconds": self.schedule.seconds}
        return out

    def __str__(self) -> str:
        return self.summary()


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


def _what(c: Candidate) -> str:
    return f"t = {c.t:g}" if c.t is not None and not c.label.startswith(f"{c.method} ") else c.label


def _get(p: ProbeScore | None, key: str):
    return None if p is None else getattr(p, key)


def _bpb(p: ProbeScore | None, width: int = 0) -> str:
    return f"{p.bpb:{width}.4f}" if p is not None else f"{'-':>{width}}"


def _ppl(p: ProbeScore | None, width: int = 0) -> str:
    return f"{p.ppl:{width}.2f}" if p is not None else f"{'-':>{width}}"


def _task_dict(c) -> dict:
    """Per side and task: the score (without per-item values), its fraction, and per-item forgetting."""
    return {"tasks": {side: {t: {**{k: v for k, v in s.to_dict().items() if k != "items"},
                                 "fraction": c.sides[side].per_task.get(t) if side in c.sides else None,
                                 "forgetting": c.forgetting[side][t].to_dict() if side in c.forgetting else None}
                             for t, s in per.items()} for side, per in c.tasks.items()}}


def probe_fraction(side: str, c, base, sft) -> float | None:
    """The probe part of a side on bits per byte (None without probe files): general ``(G_sft - G_m)/(G_sft -
    G_base)``, domain ``(D_base - D_m)/(D_base - D_sft)``; NaN when the SFT did not move that way."""
    m, b, s = getattr(c, side), getattr(base, side), getattr(sft, side)
    if m is None:
        return None
    r = recovery(b.bpb, s.bpb, m.bpb, b.bpb, s.bpb, m.bpb)
    return r.general_recovered if side == "general" else r.domain_retained


def side_value(probe: float | None, tasks: SideScore | None) -> float:
    """A side's number: the mean of its probe fraction and its tasks' fractions, leaving out parts that
    measure nothing (a NaN probe fraction, tasks left out); NaN when nothing is left. Probes only: exactly the
    probe fraction."""
    parts = [probe] if probe is not None and math.isfinite(probe) else []
    parts += list(tasks.per_task.values()) if tasks is not None else []
    if not parts:
        return float("nan") if probe is None else probe
    return parts[0] if len(parts) == 1 else sum(parts) / len(parts)


def with_recovery(c, base, sft):
    """Set ``c.recovery`` (each side: :func:`side_value`), ``c.sides`` (tasks' fractions) and ``c.forgetting``
    (per item: general against the base, domain against the SFT); ``c`` is a Candidate or a Reported."""
    from ..evaluate.benchmark import forgetting, side_score

    values = {}
    for side in ("general", "domain"):
        start, end = (sft, base) if side == "general" else (base, sft)
        tasks = c.tasks.get(side)
        if tasks:
            c.sides[side] = side_score(tasks, start.tasks[side], end.tasks[side])
            ref = (base if side == "general" else sft).tasks[side]
            c.forgetting[side] = {name: forgetting(score, ref[name]) for name, score in tasks.items()}
        values[side] = side_value(probe_fraction(side, c, base, sft), c.sides.get(side))
    c.recovery = Recovery(values["general"], values["domain"])
    return c


def plot_tradeoff(result: SweepResult, path: Path) -> Path:
    """Save :func:`tradeoff_figure` to ``path`` (PNG)."""
    fig = tradeoff_figure(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def tradeoff_figure(result: SweepResult):
    """Two panels: bits per byte against t (base and SFT levels dashed); domain_retained against
    general_recovered (the trade-off curve). The candidate picked in the end (``written``: a schedule that won,
    else the chosen t) is the red star labelled "chosen"; a schedule that lost, or the global t a schedule
    beat, is marked as such."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    picked = result.written or result.chosen
    schedule_won = picked is not result.chosen
    ends = [result.sft, result.base]
    lines_of = {}  # method -> its t candidates (with SFT and base), t ascending
    for c in result.rows:
        if c.t is not None and c.t not in (0, 1):
            lines_of.setdefault(c.method, []).append(c)
    lines_of = {m: sorted(cs + ends, key=lambda c: c.t) for m, cs in lines_of.items()} or {result.base.method: ends}
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    styles = {"linear": "-", "slerp": "--"}
    for method, rows in lines_of.items():
        ts = [c.t for c in rows]
        suffix = f" ({method})" if len(lines_of) > 1 else ""
        if result.base.general is not None:
            left.plot(ts, [c.general.bpb for c in rows], "o" + styles.get(method, "-"), color="tab:blue",
                      label="general probes" + suffix)
        if result.base.domain is not None:
            left.plot(ts, [c.domain.bpb for c in rows], "s" + styles.get(method, "-"), color="tab:orange",
                      label="domain probes" + suffix)
        if result.base.general is None and result.base.domain is None:
            left.plot(ts, [c.recovery.general_recovered for c in rows], "o" + styles.get(method, "-"),
                      color="tab:blue", label="general_recovered (tasks)" + suffix)
            left.plot(ts, [c.recovery.domain_retained for c in rows], "s" + styles.get(method, "-"),
                      color="tab:orange", label="domain_retained (tasks)" + suffix)
    if result.chosen.t is not None:
        global_label = (f"best global t = {result.chosen.t:g} (a schedule was chosen)" if schedule_won
                        else f"chosen t = {result.chosen.t:g}")
        left.axvline(result.chosen.t, color="gray", linestyle=":", label=global_label)
    left.set_xlabel("t (share of the base: 0 = SFT, 1 = base)")
    left.set_ylabel("bits per byte (lower is better)" if result.base.general is not None
                    or result.base.domain is not None else "fraction (tasks)")
    left.set_title("Probe loss along the interpolation")
    left.legend(fontsize=8)
    for method, rows in lines_of.items():
        gr = [c.recovery.general_recovered for c in rows]
        dr = [c.recovery.domain_retained for c in rows]
        right.plot(gr, dr, "o" + styles.get(method, "-"), color="tab:green",
                   label=method if len(lines_of) > 1 else None)
        for c, x, y in zip(rows, gr, dr):
            right.annotate(f"{c.t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for c in result.rows:
        if c.t is None:
            right.plot([c.recovery.general_recovered], [c.recovery.domain_retained], "^", color="tab:gray")
            right.annotate(c.label, (c.recovery.general_recovered, c.recovery.domain_retained),
                           textcoords="offset points", xytext=(4, 4), fontsize=7)
    if schedule_won:
        right.plot([result.chosen.recovery.general_recovered], [result.chosen.recovery.domain_retained], "o",
                   markersize=12, markerfacecolor="none", color="tab:red",
                   label=f"best global {_what(result.chosen)}")
    elif result.schedule and result.schedule.beats_on_selection:
        s = result.schedule.best.recovery
        right.plot([s.general_recovered], [s.domain_retained], "D", color="tab:purple",
                   label=f"{result.schedule.kind} schedule (not chosen)")
    right.plot([picked.recovery.general_recovered], [picked.recovery.domain_retained], "*", markersize=16,
               color="tab:red", label=f"chosen: {picked.label}" if schedule_won else "chosen")
    if result.rule == "keep-domain":
        right.axhline(result.keep_domain, color="gray", linestyle="--", linewidth=0.8,
                      label=f"domain_retained = {result.keep_domain:g}")
    right.set_xlabel("general_recovered (1 = back to base)")
    right.set_ylabel("domain_retained (1 = all of the SFT's gain)")
    right.set_title("Trade-off (labels: t)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
