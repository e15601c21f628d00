"""Benchmark our `merge` CLI against mergekit-yaml and an I/O floor on synthetic Llama pairs.

    python bench/run.py --sizes 0.1b,1b --methods linear,slerp,ta,ties --repeats 5

Runs are interleaved: each repetition runs every (method, tool) once, in an order rotated
per repetition, so machine drift hits all tools alike. Before every run the inputs are
read once (warm page cache), dirty pages are synced and the previous output removed;
none of that is timed. Results: bench/results/<timestamp>.json, latest.json, latest.md.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import compare
import make_pair
import measure
import report
import tools

FLOORS = ("floor", "floor_direct")
SVD_NOTE = ("svd: the reference is the exact SVD's top-rank part in fp64; ours takes the randomized SVD on the "
            "CPU (q = rank + 10, 4 power iterations). The bench deltas are pure noise (a flat spectrum), so their "
            "top-rank subspace is not determined and the two differ beyond bf16 tolerance while both are near-optimal "
            "rank-r approximations (one 2048 x 768 delta of the 0.1b pair: residual 1.006x the optimal); with "
            "--ours-args='--svd exact' ours follows the reference")
DELLA_NOTE = ("della: our masks come from a different random generator than mergekit's (same distribution), so ours "
              "vs mergekit differs entrywise")
NO_MERGEKIT_NOTE = ("svd, svd_threshold: mergekit has no spectral repair, so these rows have no mergekit run "
                    "(ours vs floor only)")
TIES_NOTE = ("ties: bf16 deltas have many entries tied at the magnitude cut, and any choice among "
             "them is a valid top-k, so 'ours vs mergekit' may differ there; the reference checks "
             "accept either choice for tied entries only")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b", help=f"comma list of {','.join(make_pair.SIZES)}")
    parser.add_argument("--methods", default=",".join(tools.METHODS))
    parser.add_argument("--tools", default=",".join(tools.DEFAULT_TOOLS),
                        help=f"comma list of {','.join(tools.TOOLS)} (before: needs --before-cmd)")
    parser.add_argument("--mergekit-sizes", help="sizes at which mergekit runs (default: all of --sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--t", type=float, default=0.3, help="share of BASE (ta scale = 1 - t)")
    parser.add_argument("--density", type=float, default=0.5, help="TIES and della density")
    parser.add_argument("--rank", type=int, default=64, help="svd: singular components kept per 2-D tensor")
    parser.add_argument("--work", type=Path, default=tools.BENCH_DIR / "work")
    parser.add_argument("--results", type=Path, default=tools.BENCH_DIR / "results")
    parser.add_argument("--ours-cmd", help="our CLI as a command line (default: find `merge`)")
    parser.add_argument("--before-cmd", help="tool `before`: our CLI at an earlier commit, as a command line, e.g. "
                                             "'env PYTHONPATH=/work/old python -m merge.cli'; its outputs must be "
                                             "byte-identical to ours (checked)")
    parser.add_argument("--ours-args", default="",
                        help="extra options appended to each of our merges, e.g. --ours-args=--allow-nonfinite")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    parser.add_argument("--check-tensors", type=int, default=8,
                        help="tensors per output compared with the reference merge")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, commands and disk estimate; run nothing")
    args = parser.parse_args(argv)
    args.sizes = _choices(args.sizes, make_pair.SIZES, "size")
    args.methods = _choices(args.methods, tools.METHODS, "method")
    args.tools = _choices(args.tools, tools.TOOLS, "tool")
    args.mergekit_sizes = args.sizes if args.mergekit_sizes is None else _choices(
        args.mergekit_sizes, make_pair.SIZES, "size")
    args.work = args.work.resolve()
    return args


def _choices(text: str, allowed, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; choose from {list(allowed)}")
    return values


def jobs_for(methods, tools_wanted) -> list[tuple[str, str]]:
    jobs = [(m, t) for m in methods for t in ("ours", "before", "mergekit") if t in tools_wanted]
    return jobs + [("any", f) for f in FLOORS if f in tools_wanted]


def model_bytes(size: str) -> int:
    shapes = make_pair.tensor_shapes(make_pair.SIZES[size])
    return sum(make_pair.numel(d) for _, d in shapes) * make_pair.BF16_BYTES


def disk_needed(size: str, pair_exists: bool) -> int:
    """Pair (unless present) plus up to three outputs alive at once."""
    return model_bytes(size) * ((0 if pair_exists else 2) + 3)


class Bench:
    """State of one benchmark invocation."""

    def __init__(self, args):
        self.args = args
        self.params = tools.MergeParams(t=args.t, density=args.density, rank=args.rank)
        self.env = tools.child_env()
        self.runs: list[dict] = []
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.pairs: dict[str, dict] = {}
        self.commands: dict[str, list[str]] = {}
        self.configs: dict[str, dict] = {}
        self.prefix: dict[str, list[str] | None] = {}
        self.started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.machine: dict = {}

    def note(self, text: str) -> None:
        print(f"NOTE: {text}", flush=True)
        self.notes.append(text)

    def find_tools(self) -> None:
        if "ours" in self.args.tools:
            self.prefix["ours"], why = tools.find_ours(self.args.ours_cmd)
            if why:
                self.note(f"skipping ours: {why}")
        if "mergekit" in self.args.tools:
            self.prefix["mergekit"], why = tools.find_mergekit()
            if why:
                self.note(f"skipping mergekit: {why}")
        if "before" in self.args.tools:
            self.prefix["before"] = shlex.split(self.args.before_cmd) if self.args.before_cmd else None
            if not self.args.before_cmd:
                self.note("skipping before: give --before-cmd")
        self.prefix["floor"] = self.prefix["floor_direct"] = []

    def command(self, size: str, method: str, tool: str, base: Path, sft: Path, out: Path):
        if tool in FLOORS:
            return tools.floor_args(base, sft, out, direct=tool == "floor_direct")
        if self.prefix.get(tool) is None:
            return None
        config = tools.mergekit_config(method, base, sft, self.params)
        path = None
        if config is not None:
            self.configs[f"{size}/{method}"] = config
            path = tools.write_mergekit_config(self.args.work / "configs" / f"{size}-{method}.yml", config)
        if tool in ("ours", "before"):
            return self.prefix[tool] + tools.ours_args(method, base, sft, out, self.params, path) \
                + shlex.split(self.args.ours_args)
        if config is None:
            return None  # mergekit has no equivalent (svd)
        return self.prefix["mergekit"] + [str(path), str(out)] + list(tools.MERGEKIT_FLAGS)

    def ensure_pair(self, size: str) -> Path | None:
        pair_dir = self.args.work / "pairs" / size
        marker = pair_dir / make_pair.MARKER
        free = shutil.disk_usage(self.args.work).free
        needed = disk_needed(size, marker.exists())
        if needed > free:
            self.note(f"skipping {size}: needs ~{needed / 1e9:.1f} GB free in {self.args.work}, "
                      f"has {free / 1e9:.1f} GB")
            return None
        print(f"[{size}] preparing pair in {pair_dir} (reused when already complete)", flush=True)
        sft2 = ["--sft2"] if any(m in tools.NEEDS_SFT2 for m in self.args.methods) else []
        done = subprocess.run([sys.executable, str(tools.BENCH_DIR / "make_pair.py"), "--size", size,
                               "--out", str(pair_dir), "--seed", str(self.args.seed)] + sft2,
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.note(f"skipping {size}: pair generation failed: {done.stderr.strip()[-500:]}")
            return None
        self.pairs[size] = json.loads(done.stdout.strip().splitlines()[-1])
        return pair_dir

    def run_size(self, size: str, pair_dir: Path) -> None:
        base, sft = pair_dir / "base", pair_dir / "sft"
        out_root = self.args.work / "out" / size
        jobs = [j for j in jobs_for(self.args.methods, self.args.tools)
                if self.command(size, *j, base, sft, out_root / "x") is not None
                and (j[1] != "mergekit" or size in self.args.mergekit_sizes)]
        for method in self.args.methods:
            if method in tools.NO_MERGEKIT and "mergekit" in self.args.tools and NO_MERGEKIT_NOTE not in self.notes:
                self.note(NO_MERGEKIT_NOTE)
        if not jobs:
            self.note(f"skipping {size}: none of the requested tools is available")
            return
        last = self.args.repeats - 1
        for rep in range(self.args.repeats):
            shift = rep % len(jobs)
            for method, tool in jobs[shift:] + jobs[:shift]:
                out = out_root / method / tool
                cmd = self.command(size, method, tool, base, sft, out)
                self.commands[f"{size}/{method}/{tool}"] = cmd
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                measure.warm_page_cache([base, sft])
                os.sync()
                log = self.args.work / "logs" / size / f"{method}-{tool}-{rep}.log"
                result = measure.run_measured(cmd, log, self.env, tools.REPO_ROOT)
                result.update(size=size, method=method, tool=tool, rep=rep)
                if result["rc"] != 0:
                    result["log_tail"] = measure.log_tail(log)
                self.runs.append(result)
                print(f"[{size}] rep {rep} {method:6s} {tool:8s} rc={result['rc']} "
                      f"{result['wall_s']:8.2f} s {result['max_rss_mb']} MB", flush=True)
                if rep == last and tool not in FLOORS:
                    self.check_if_ready(size, method, base, sft, out_root / method)
                elif not self.args.keep_outputs:
                    shutil.rmtree(out, ignore_errors=True)
            self.save(complete=False)

    def check_if_ready(self, size: str, method: str, base: Path, sft: Path, method_dir: Path) -> None:
        """Once every tool's final output for a method exists, compare them, then delete them."""
        wanted = [t for t in ("ours", "before", "mergekit") if t in self.args.tools and self.prefix.get(t)
                  and (t != "mergekit" or (size in self.args.mergekit_sizes and method not in tools.NO_MERGEKIT))]
        final = [r for r in self.runs if r["size"] == size and r["method"] == method
                 and r["rep"] == self.args.repeats - 1]
        if {r["tool"] for r in final} != set(wanted):
            return
        ok = [t for t in wanted if any(r["tool"] == t and r["rc"] == 0 for r in final)]
        params = self.params.as_dict()
        for tool in ok if method in compare.REFERENCE_METHODS else ():  # della, model_stock: vs mergekit only
            result = compare.check_against_reference(method, base, sft, method_dir / tool, params,
                                                     self.args.check_tensors)
            self.add_check(size, method, f"{tool} vs reference", result)
        if {"ours", "before"} <= set(ok):
            self.add_check(size, method, "ours vs before (bytes)",
                           compare.compare_bytes(method_dir / "ours", method_dir / "before"))
        if {"ours", "mergekit"} <= set(ok):
            result = compare.compare_dirs(method_dir / "ours", method_dir / "mergekit")
            self.add_check(size, method, "ours vs mergekit", result)
            if method == "ties" and TIES_NOTE not in self.notes:
                self.note(TIES_NOTE)
            if method == "della" and DELLA_NOTE not in self.notes:
                self.note(DELLA_NOTE)
        if method == "svd" and ok and SVD_NOTE not in self.notes:
            self.note(SVD_NOTE)
        if not self.args.keep_outputs:
            shutil.rmtree(method_dir, ignore_errors=True)

    def add_check(self, size: str, method: str, comparison: str, result: dict) -> None:
        result.update(size=size, method=method, comparison=comparison)
        self.checks.append(result)
        print(f"[{size}] check {method:6s} {comparison}: {result['verdict']} "
              f"(differing {result['differing_fraction']:.2e}, max abs {result['max_abs_diff']:.2e})",
              flush=True)

    def save(self, complete: bool) -> str:
        """Write the JSON and markdown results (also mid-run, so a long run is never lost)."""
        result = self.result(complete)
        self.args.results.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2)
        (self.args.results / f"{self.started}.json").write_text(text)
        (self.args.results / "latest.json").write_text(text)
        table = report.markdown(result)
        (self.args.results / "latest.md").write_text(table)
        return table

    def result(self, complete: bool) -> dict:
        return {
            "timestamp": self.started,
            "complete": complete,
            "machine": self.machine,
            "settings": {
                "sizes": self.args.sizes, "methods": self.args.methods, "tools": self.args.tools,
                "repeats": self.args.repeats, "params": self.params.as_dict(),
                "mergekit_flags": list(tools.MERGEKIT_FLAGS), "ours_cmd": self.prefix.get("ours"),
                "mergekit_configs": self.configs, "commands": self.commands,
                "method_semantics": tools.__doc__.strip(),
            },
            "pairs": self.pairs,
            "summary": report.summarize(self.runs),
            "checks": self.checks,
            "runs": self.runs,
            "notes": self.notes,
        }


def dry_run(bench: Bench) -> None:
    """Print what would run, per size, without generating or timing anything."""
    for size in bench.args.sizes:
        pair = bench.args.work / "pairs" / size
        shape = make_pair.SIZES[size]
        shards = make_pair.plan_shards(make_pair.tensor_shapes(shape), shape.shard_bytes)
        print(f"[{size}] {model_bytes(size) / 1e9:.2f} GB per model, {len(shards)} shards, "
              f"needs ~{disk_needed(size, False) / 1e9:.1f} GB free (have "
              f"{shutil.disk_usage(bench.args.work).free / 1e9:.1f} GB)")
        for method, tool in jobs_for(bench.args.methods, bench.args.tools):
            if tool == "mergekit" and size not in bench.args.mergekit_sizes:
                continue
            cmd = bench.command(size, method, tool, pair / "base", pair / "sft",
                                bench.args.work / "out" / size / method / tool)
            print(f"  {method:6s} {tool:8s} {' '.join(cmd) if cmd else '(unavailable)'}")
        for key, config in bench.configs.items():
            if key.startswith(f"{size}/"):
                print(f"  mergekit config {key}: {json.dumps(config)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    bench.find_tools()
    if args.dry_run:
        dry_run(bench)
        return 0
    bench.machine = measure.machine_info(tools.REPO_ROOT)
    for size in args.sizes:
        pair_dir = bench.ensure_pair(size)
        if pair_dir is not None:
            bench.run_size(size, pair_dir)
    table = bench.save(complete=True)
    print()
    print(table)
    print(f"results: {args.results / (bench.started + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
