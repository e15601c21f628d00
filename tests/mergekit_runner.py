"""Run the real `mergekit-yaml` on a recipe so tests can compare its output with ours.

mergekit is a test-only oracle: it is invoked as a subprocess from the same
virtualenv as the running interpreter, never imported by the `merge` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# Flags that keep a run offline, quiet and independent of tokenizer files:
# tiny test checkpoints have no tokenizer, and card generation only stays
# offline when model paths are absolute (see docs/mergekit-semantics.md).
DEFAULT_ARGS = ("--no-copy-tokenizer", "--quiet")


def mergekit_executable() -> Path:
    """Path of `mergekit-yaml` next to the current interpreter."""
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        raise FileNotFoundError(f"mergekit-yaml not found at {exe}")
    return exe


def run_mergekit(config: dict, out_dir: Path, extra_args: Iterable[str] = ()) -> Path:
    """Write `config` as YAML next to `out_dir`, run mergekit-yaml, return `out_dir`.

    Raises RuntimeError carrying mergekit's stderr when the run fails.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = out_dir.parent / f"{out_dir.name}.mergekit.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        str(mergekit_executable()),
        str(config_path),
        str(out_dir),
        *DEFAULT_ARGS,
        *extra_args,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(
            f"mergekit-yaml failed (exit {completed.returncode}): {' '.join(command)}\n"
            f"{completed.stderr[-8000:]}"
        )
    return out_dir


# Runs in a child interpreter: one mergekit import for many recipes. Each recipe goes
# through the same calls as the CLI (`mergekit.merge.run_merge` with `MergeOptions`),
# so results, including seeded DARE masks, equal separate `mergekit-yaml` runs.
_BATCH_SCRIPT = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
jobs, options = json.loads(sys.stdin.read())
options = MergeOptions(**options)
options.apply_global_options()
for config_path, out_path in jobs:
    source = open(config_path, encoding="utf-8").read()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    run_merge(config, out_path, options=options, config_source=source)
"""


def run_mergekit_many(
    configs: Mapping[str, dict], out_root: Path, **options: object
) -> dict[str, Path]:
    """Run several recipes in one mergekit process; return {name: output folder}.

    `options` are MergeOptions fields (e.g. random_seed=42, out_shard_size=10**6);
    tokenizer copying is off by default, as in `run_mergekit`. Saves mergekit's
    ~10 s import per recipe, which matters for test-suite time.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, config in configs.items():
        config_path = out_root / f"{name}.mergekit.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs.append((str(config_path), str(out_root / name)))
    merged_options = {"copy_tokenizer": False, "quiet": True, **options}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", _BATCH_SCRIPT],
        input=json.dumps([jobs, merged_options]),
        capture_output=True,
        text=True,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"mergekit batch failed (exit {completed.returncode}):\n"
            f"{completed.stderr[-8000:]}"
        )
    return {name: out_root / name for name in configs}


def load_folder_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors model folder (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [path / name for name in shard_names]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    return tensors
