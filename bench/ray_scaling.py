"""Time one merge with the local executor and on a local Ray cluster with 1 and 2 workers; check the outputs
are byte-identical.

    PYTHONPATH=$PWD python bench/ray_scaling.py --pair /work/benchwork/pairs/1b --method slerp --repeats 1

The Ray cluster is started once (its start-up time is reported, not counted); inputs are read from the page
cache after the first run (the first run is a warm-up unless --no-warmup). On one machine the workers share its
disk and cores, so this measures overhead and local parallelism, not the cluster scaling of README's model.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merge


def _merge(args, out: Path, **extra) -> tuple[float, object]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = merge.merge(args.method, sft=str(args.pair / "sft"), base=str(args.pair / "base"), t=args.t, out=out,
                          max_shard_size=args.max_shard_size, **extra)
    return time.perf_counter() - started, summary


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", type=Path, required=True, help="a bench pair folder with base/ and sft/")
    p.add_argument("--method", default="slerp", choices=["linear", "slerp"])
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--max-shard-size", default="5GB", help="5GB: the 1B output is one file, split across workers")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("bench/work/ray"))
    p.add_argument("--no-warmup", action="store_true")
    args = p.parse_args()
    import ray

    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    startup = time.perf_counter() - started
    rows = []
    try:
        ref = args.work / "local"
        if not args.no_warmup:
            _merge(args, ref)
        for _ in range(args.repeats):
            seconds, summary = _merge(args, ref)
            rows.append({"run": "local executor", "seconds": seconds, "bytes": summary.output_bytes})
        for n in [int(w) for w in args.workers.split(",")]:
            out = args.work / f"ray{n}"
            for _ in range(args.repeats):
                seconds, summary = _merge(args, out, ray="auto", workers=n)
                rows.append({"run": f"ray, {n} worker(s)", "seconds": seconds, "bytes": summary.output_bytes,
                             "identical": _same(ref, out), "cluster": summary.cluster.line()})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
    result = {"pair": str(args.pair), "method": args.method, "cores": os.cpu_count(), "load_before": load,
              "load_after": os.getloadavg()[0], "ray_startup_seconds": startup, "runs": rows}
    print(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['run']:<20} {r['seconds']:7.1f}s  {r['bytes'] / 1e9 / r['seconds']:.2f} GB/s written"
              + (f"  identical={r['identical']}" if "identical" in r else ""))


if __name__ == "__main__":
    main()
