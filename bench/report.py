"""Turning raw benchmark runs into a summary and a markdown report."""

from __future__ import annotations

import statistics

FLOOR_METHOD = "any"  # the floor does the same I/O for every method


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (size, method, tool): wall-time and peak-RSS statistics over successful runs."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["size"], run["method"], run["tool"]), []).append(run)
    rows = []
    for (size, method, tool), group in groups.items():
        ok = [r for r in group if r["rc"] == 0]
        walls = [r["wall_s"] for r in ok]
        rss = [r["max_rss_mb"] for r in ok if r["max_rss_mb"] is not None]
        row = {"size": size, "method": method, "tool": tool, "runs": len(group), "ok": len(ok)}
        if walls:
            row.update(median_s=round(statistics.median(walls), 3), min_s=min(walls), max_s=max(walls))
        if rss:
            row.update(median_rss_mb=round(statistics.median(rss), 1), peak_rss_mb=max(rss))
        rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    index = {(r["size"], r["method"], r["tool"]): r for r in rows}
    for row in rows:
        for tool, key in (("floor", "time_vs_floor"), ("floor_direct", "time_vs_floor_direct")):
            floor = index.get((row["size"], FLOOR_METHOD, tool), {})
            if not row["tool"].startswith("floor") and "median_s" in row and floor.get("median_s"):
                row[key] = round(row["median_s"] / floor["median_s"], 2)
        if row["tool"] != "ours":
            continue
        before = index.get((row["size"], row["method"], "before"), {})
        if "median_s" in row and before.get("median_s"):
            row["time_ours_over_before"] = round(row["median_s"] / before["median_s"], 3)
        theirs = index.get((row["size"], row["method"], "mergekit"), {})
        if "median_s" in row and theirs.get("median_s"):
            row["time_ours_over_mergekit"] = round(row["median_s"] / theirs["median_s"], 2)
        if "peak_rss_mb" in row and theirs.get("peak_rss_mb"):
            row["rss_ours_over_mergekit"] = round(row["peak_rss_mb"] / theirs["peak_rss_mb"], 2)


def _cell(value, fmt="{}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    """The human-readable report: machine, settings, timing table, equivalence checks."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"# Merge benchmark {result['timestamp']}"
        + ("" if result.get("complete", True) else " (partial: run still in progress or interrupted)"),
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable / {m['logical_cores']} logical cores, "
        f"{m['ram_gb']} GB RAM, {m['os']}; Python {m['python']}, torch {m['torch']}, "
        f"mergekit {m['mergekit']}, mergeback {m['mergeback']} ({m['mergeback_commit']}). "
        f"Load average at start: {m['load_average_at_start']}.",
        "",
        f"Settings: {s['repeats']} interleaved repetitions, params {s['params']}, "
        f"peak RSS by {m['rss_measured_by']}, mergekit flags `{' '.join(s['mergekit_flags'])}`. "
        "Wall time includes process start-up; inputs are in the page cache before every run.",
        "",
        "| size | method | tool | ok/runs | median s | min s | max s | peak RSS MB "
        "| x floor | x direct floor | ours/mergekit time | ours/mergekit RSS | ours/before time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"ours": 0, "before": 1, "mergekit": 2, "floor": 3, "floor_direct": 4}
    for r in sorted(result["summary"], key=lambda r: (r["size"], r["method"], order.get(r["tool"], 9))):
        lines.append(
            f"| {r['size']} | {r['method']} | {r['tool']} | {r['ok']}/{r['runs']} "
            f"| {_cell(r.get('median_s'), '{:.2f}')} | {_cell(r.get('min_s'), '{:.2f}')} "
            f"| {_cell(r.get('max_s'), '{:.2f}')} | {_cell(r.get('peak_rss_mb'), '{:.0f}')} "
            f"| {_cell(r.get('time_vs_floor'))} | {_cell(r.get('time_vs_floor_direct'))} "
            f"| {_cell(r.get('time_ours_over_mergekit'))} "
            f"| {_cell(r.get('rss_ours_over_mergekit'))} | {_cell(r.get('time_ours_over_before'))} |"
        )
    if result["checks"]:
        lines += [
            "",
            "Equivalence checks (bf16 tolerance rtol 1.6e-2, atol 1e-5; `reference` = sampled "
            "tensors recomputed from the inputs with t = share of BASE):",
            "",
            "| size | method | comparison | verdict | differing fraction | max abs diff |",
            "|---|---|---|---|---|---|",
        ]
        for c in result["checks"]:
            lines.append(
                f"| {c['size']} | {c['method']} | {c['comparison']} | {c['verdict']} "
                f"| {_cell(c.get('differing_fraction'), '{:.2e}')} "
                f"| {_cell(c.get('max_abs_diff'), '{:.2e}')} |"
            )
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"
