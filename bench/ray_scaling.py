"""Time one merge with the local executor and on a local Ray cluster with 1 and 2 workers; check the outputs
are byte-identical. With --sweep: time a CPU sweep (local, then 1 and 2 Ray workers of one CPU each) on a
synthetic ~13M-parameter Llama pair and check that table and choice are the local ones.

    PYTHONPATH=$PWD python bench/ray_scaling.py --pair /work/benchwork/pairs/1b --method slerp --repeats 1
    PYTHONPATH=$PWD python bench/ray_scaling.py --sweep --repeats 3

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
                          max_shard_size=args.max_shard_size, options=merge.Options.of(**extra))
    return time.perf_counter() - started, summary


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def sweep_pair(folder: Path) -> tuple[Path, Path]:
    """A bf16 Llama (hidden 384, 6 layers, the demo tokenizer's 1024 tokens) and an SFT = base + 0.02 * std
    noise, seeded: compute-bound to evaluate, small to hold twice per worker."""
    import shutil as sh

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge.demo import ASSETS

    base, sft = folder / "base", folder / "sft"
    if (sft / "model.safetensors").exists():
        return base, sft
    config = LlamaConfig(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.float().std() * torch.randn(p.shape, generator=generator).to(p.dtype))
    model.save_pretrained(sft)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        for target in (base, sft):
            sh.copy(ASSETS / "sft" / name, target / name)
    return base, sft


def sweep_bench(args) -> None:
    """Median of ``--repeats`` sweeps each: local (1 thread), Ray with 1 and with 2 one-CPU workers."""
    import statistics

    import ray

    from merge.demo import ASSETS

    base, sft = sweep_pair(args.work / "sweep-pair")
    probes = {"general": ASSETS / "probes" / "general_select.txt", "domain": ASSETS / "probes" / "domain_select.jsonl"}
    kw = dict(t_values=[round(i / 10, 1) for i in range(11)], threads=1, max_tokens=args.max_tokens, **probes)
    load = os.getloadavg()
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    startup = time.perf_counter() - started
    runs: dict[str, list] = {}
    try:
        for name, extra in [("local sweep (1 thread)", {}),
                            *[(f"ray, {n} worker(s) x 1 CPU", {"ray": "auto", "workers": n})
                              for n in (int(w) for w in args.workers.split(","))]]:
            for _ in range(args.repeats):
                began = time.perf_counter()
                result = merge.sweep(str(sft), str(base), **kw, **extra)
                seconds = time.perf_counter() - began
                runs.setdefault(name, []).append({"seconds": seconds, "table": result.table(),
                                                  "chosen": result.chosen.label, "load": os.getloadavg()[0],
                                                  "cluster": result.cluster.to_dict() if result.cluster else None})
    finally:
        ray.shutdown()
    reference = runs["local sweep (1 thread)"][0]
    summary = {"pair": "sweep-pair (hidden 384, 6 layers, bf16)", "candidates": 11, "max_tokens": args.max_tokens,
               "cores": os.cpu_count(), "load_before": load, "load_after": os.getloadavg(),
               "ray_startup_seconds": startup, "runs": runs}
    print(json.dumps(summary, indent=1, default=str))
    for name, rs in runs.items():
        times = sorted(r["seconds"] for r in rs)
        same = all(r["table"] == reference["table"] and r["chosen"] == reference["chosen"] for r in rs)
        c = rs[0]["cluster"]
        split = (f"  load {c['seconds']['load']:.1f}s, eval wall {c['seconds']['wall']:.1f}s" if c else "")
        print(f"{name:<26} median {statistics.median(times):6.1f}s ({times[0]:.1f}-{times[-1]:.1f}), load avg "
              f"{statistics.mean(r['load'] for r in rs):.1f}  same table and choice={same}{split}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", type=Path, help="a bench pair folder with base/ and sft/ (merge bench)")
    p.add_argument("--sweep", action="store_true", help="time a CPU sweep instead of a merge")
    p.add_argument("--max-tokens", type=int, default=2000, help="with --sweep: scored tokens per probe set")
    p.add_argument("--method", default="slerp", choices=["linear", "slerp"])
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--max-shard-size", default="5GB", help="5GB: the 1B output is one file, split across workers")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("bench/work/ray"))
    p.add_argument("--no-warmup", action="store_true")
    args = p.parse_args()
    if args.sweep:
        sweep_bench(args)
        return
    if args.pair is None:
        p.error("--pair is required (or --sweep)")
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
