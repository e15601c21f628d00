"""What a sweep measured, as values: candidates, the choice, and its table, card section, JSON and plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate import ProbeScore, Recovery, recovery
from ..recipes.schema import Recipe


@dataclass(eq=False)
class Candidate:
    """One evaluated merge: ``t`` (share of the base) for a global t, else a schedule ``label``."""

    label: str
    recipe: Recipe
    general: ProbeScore
    domain: ProbeScore
    t: float | None = None
    seconds_set: float = 0.0
    seconds_eval: float = 0.0
    recovery: Recovery | None = None


@dataclass
class Reported:
    """A candidate measured on the report probes."""

    label: str
    general: ProbeScore
    domain: ProbeScore
    recovery: Recovery


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
        return (f"time: loading {self.seconds_load:.1f}s, setting parameters {self.seconds_set:.1f}s, "
                f"evaluating {self.seconds_eval + self.seconds_report:.1f}s{search}, writing "
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
        ratio = s.general.ppl / b.general.ppl
        return (f"forgetting: general probes {b.general.bpb:.4f} -> {s.general.bpb:.4f} bits/byte, perplexity "
                f"{b.general.ppl:.2f} -> {s.general.ppl:.2f} ({ratio:.2f}x) from base to SFT; domain "
                f"{b.domain.bpb:.4f} -> {s.domain.bpb:.4f} bits/byte (the gain to keep)")

    def table(self) -> str:
        """The selection-probe table, one row per t, the chosen one marked with ``*``."""
        head = (f"{'':1} {'t':>5}  {'general bpb':>11} {'ppl':>8}  {'domain bpb':>10} {'ppl':>7}  "
                f"{'gen_recovered':>13} {'dom_retained':>12} {'score':>6}")
        lines = [head]
        for c in self.rows:
            mark = "*" if c is self.chosen else " "
            name = "SFT" if c.t == 0 else ("base" if c.t == 1 else f"{c.t:g}")
            lines.append(f"{mark} {name:>5}  {c.general.bpb:11.4f} {c.general.ppl:8.2f}  {c.domain.bpb:10.4f} "
                         f"{c.domain.ppl:7.2f}  {_f(c.recovery.general_recovered):>13} "
                         f"{_f(c.recovery.domain_retained):>12} {_f(c.recovery.score):>6}")
        return "\n".join(lines)

    def report_table(self) -> str:
        width = max([12] + [len(r.label) for r in self.report])
        lines = [f"{'':{width}} {'general bpb':>11} {'domain bpb':>10}  {'gen_recovered':>13} {'dom_retained':>12} "
                 f"{'score':>6}"]
        for r in self.report:
            lines.append(f"{r.label:{width}} {r.general.bpb:11.4f} {r.domain.bpb:10.4f}  "
                         f"{_f(r.recovery.general_recovered):>13} {_f(r.recovery.domain_retained):>12} "
                         f"{_f(r.recovery.score):>6}")
        return "\n".join(lines)

    def summary(self) -> str:
        from ..evaluate import rule_text

        c = self.chosen
        lines = [self.forgetting_line(), "", "selection probes: " + self._probe_names("select"), self.table(), "",
                 f"rule: {rule_text(self.rule, self.keep_domain)}",
                 f"chosen: t = {c.t:g} (general_recovered {_f(c.recovery.general_recovered)}, domain_retained "
                 f"{_f(c.recovery.domain_retained)}, score {_f(c.recovery.score)})"]
        if self.report:
            lines += ["", "report probes: " + self._probe_names("report"), self.report_table()]
        if self.schedule:
            lines += ["", self.schedule.verdict()]
        lines += [f"note: {n}" for n in self.notes + self.score_notes()]
        lines.append(self.time_line())
        if self.out:
            what = f"t = {self.written.t:g}" if self.written and self.written.t is not None else (
                self.written.label if self.written else "")
            lines.append(f"wrote the merged model ({what}) -> {self.out}")
        if self.plot:
            lines.append(f"plot -> {self.plot}")
        if self.recipe_path:
            lines.append(f"schedule recipe -> {self.recipe_path}")
        return "\n".join(lines)

    def _probe_names(self, part: str) -> str:
        return f"general = {self.probes[f'general_{part}']}; domain = {self.probes[f'domain_{part}']}"

    def card_section(self) -> str:
        """The model card's "Recovery" section (markdown)."""
        from ..evaluate import rule_text

        w = self.written or self.chosen
        lines = ["## Recovery", "",
                 "Scored with `merge sweep` on probe sets (bits per byte, lower is better; perplexity per token). "
                 "`general_recovered = (G_sft - G_m)/(G_sft - G_base)`, `domain_retained = (D_base - D_m)/"
                 "(D_base - D_sft)`, score = their harmonic mean. These are small probe sets: a smoke signal, "
                 "not a benchmark.", "",
                 f"- {self.forgetting_line()}",
                 f"- selection probes: {self._probe_names('select')}",
                 f"- rule: {rule_text(self.rule, self.keep_domain)}",
                 f"- this model: {'t = %g' % w.t if w.t is not None else w.label}", "",
                 "| t | general bpb | general ppl | domain bpb | domain ppl | general_recovered | domain_retained "
                 "| score |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in self.rows:
            name = "0 (SFT)" if c.t == 0 else ("1 (base)" if c.t == 1 else f"{c.t:g}")
            name = f"**{name}**" if c is self.chosen else name
            lines.append(f"| {name} | {c.general.bpb:.4f} | {c.general.ppl:.2f} | {c.domain.bpb:.4f} | "
                         f"{c.domain.ppl:.2f} | {_f(c.recovery.general_recovered)} | "
                         f"{_f(c.recovery.domain_retained)} | {_f(c.recovery.score)} |")
        if self.report:
            lines += ["", f"Report probes ({self._probe_names('report')}):", "",
                      "| model | general bpb | domain bpb | general_recovered | domain_retained | score |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r.label} | {r.general.bpb:.4f} | {r.domain.bpb:.4f} | {_f(r.recovery.general_recovered)} "
                      f"| {_f(r.recovery.domain_retained)} | {_f(r.recovery.score)} |" for r in self.report]
        if self.schedule:
            lines += ["", self.schedule.verdict() + "."]
        notes = self.score_notes()
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def cand(c: Candidate) -> dict:
            return {"label": c.label, "t": c.t, "general_bpb": c.general.bpb, "general_ppl": c.general.ppl,
                    "domain_bpb": c.domain.bpb, "domain_ppl": c.domain.ppl,
                    "general_recovered": c.recovery.general_recovered,
                    "domain_retained": c.recovery.domain_retained, "score": c.recovery.score,
                    "seconds_set": c.seconds_set, "seconds_eval": c.seconds_eval,
                    "recipe": c.recipe.model_dump(mode="json", exclude_none=True)}

        out = {"rule": self.rule, "keep_domain": self.keep_domain, "probes": self.probes,
               "rows": [cand(c) for c in self.rows], "chosen_t": self.chosen.t,
               "report": [{"label": r.label, "general_bpb": r.general.bpb, "domain_bpb": r.domain.bpb,
                           "general_recovered": r.recovery.general_recovered,
                           "domain_retained": r.recovery.domain_retained, "score": r.recovery.score}
                          for r in self.report], "notes": self.notes + self.score_notes(),
               "written": (self.written or self.chosen).label,
               "seconds": {"load": self.seconds_load, "set": self.seconds_set, "eval": self.seconds_eval,
                           "report": self.seconds_report, "schedule_search": self.schedule.seconds if self.schedule
                           else 0.0, "write": self.seconds_write, "total": self.seconds_total}}
        if self.schedule:
            out["schedule"] = {"kind": self.schedule.kind, "best": cand(self.schedule.best),
                               "evaluations": self.schedule.evaluations, "wins_on_report": self.schedule.wins,
                               "verdict": self.schedule.verdict(), "seconds": self.schedule.seconds}
        return out

    def __str__(self) -> str:
        return self.summary()


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


def with_recovery(c: Candidate, base: Candidate, sft: Candidate) -> Candidate:
    c.recovery = recovery(base.general.bpb, sft.general.bpb, c.general.bpb, base.domain.bpb, sft.domain.bpb,
                          c.domain.bpb)
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

    rows = result.rows
    picked = result.written or result.chosen
    schedule_won = picked is not result.chosen
    ts = [c.t for c in rows]
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    left.plot(ts, [c.general.bpb for c in rows], "o-", color="tab:blue", label="general probes")
    left.plot(ts, [c.domain.bpb for c in rows], "s-", color="tab:orange", label="domain probes")
    global_label = (f"best global t = {result.chosen.t:g} (a schedule was chosen)" if schedule_won
                    else f"chosen t = {result.chosen.t:g}")
    left.axvline(result.chosen.t, color="gray", linestyle=":", label=global_label)
    left.set_xlabel("t (share of the base: 0 = SFT, 1 = base)")
    left.set_ylabel("bits per byte (lower is better)")
    left.set_title("Probe loss along the interpolation")
    left.legend(fontsize=8)
    gr = [c.recovery.general_recovered for c in rows]
    dr = [c.recovery.domain_retained for c in rows]
    right.plot(gr, dr, "o-", color="tab:green")
    for c, x, y in zip(rows, gr, dr):
        right.annotate(f"{c.t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if schedule_won:
        right.plot([result.chosen.recovery.general_recovered], [result.chosen.recovery.domain_retained], "o",
                   markersize=12, markerfacecolor="none", color="tab:red", label=f"best global t = {result.chosen.t:g}")
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
