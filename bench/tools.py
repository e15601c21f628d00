"""The commands the benchmark times: our `merge` CLI, `mergekit-yaml`, and the I/O floor.

Every method runs with the same semantics in both tools (t = share of BASE):
  linear  W = (1-t)*sft + t*base
  slerp   from SFT (t=0) to BASE (t=1); mergekit's slerp t=0 is its base_model, so it
          gets base_model BASE and t_mergekit = 1 - t
  ta      W = base + scale*(sft - base), computed in fp32 (mergekit: dtype float32)
  ties    ta with the delta magnitude-trimmed to `density`; mergekit's ties would divide
          by the summed weight (normalize: true), so normalize: false keeps the 0.7 scale
  svd     spectral repair: W = base + scale * (top-`rank` SVD of sft - base) per 2-D tensor
          (`merge task-arithmetic --sparsify svd --rank R`; randomized SVD on the CPU for small
          R); svd_threshold keeps the singular values above the Donoho-Gavish threshold (exact
          SVD). mergekit has no equivalent: these rows have no mergekit run
  della   mergekit's della (magnitude-ranked drop probabilities, density, epsilon, rescaled),
          one SFT, normalize: false like ties; ours runs the same mergekit recipe through
          `merge run` (its masks come from another RNG, so ours vs mergekit differs entrywise)
  model_stock  mergekit's model_stock of SFT and a second fine-tune SFT2 of the same base
          (make_pair.py --sft2); ours runs the same recipe through `merge run`
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
METHODS = ("linear", "slerp", "ta", "ties", "svd", "svd_threshold", "della", "model_stock")
MERGEKIT_RECIPE_METHODS = ("della", "model_stock")  # ours runs mergekit's recipe (`merge run`)
NO_MERGEKIT = ("svd", "svd_threshold")  # mergekit has no spectral repair
NEEDS_SFT2 = ("model_stock",)
SVD_MEMORY = "4GB"  # --memory of the svd rows (one 32000 x 768 embedding needs ~1.4 GB of buffers)
TOOLS = ("ours", "mergekit", "floor", "floor_direct", "before")
DEFAULT_TOOLS = TOOLS[:4]  # "before": our CLI at another commit (--before-cmd), for before/after comparisons
# The pairs ship no tokenizer, so mergekit's default tokenizer copy would only log a
# traceback; everything else stays at mergekit's defaults (5B-parameter output shards,
# no lazy unpickle, torch's default thread count) because that is what users run.
MERGEKIT_FLAGS = ("--no-copy-tokenizer", "--quiet")


@dataclass(frozen=True)
class MergeParams:
    """Method parameters in our convention."""

    t: float = 0.3
    density: float = 0.5
    rank: int = 64
    epsilon: float = 0.1

    @property
    def scale(self) -> float:
        """Task-arithmetic scale matching linear at the same t."""
        return round(1.0 - self.t, 10)

    def as_dict(self) -> dict:
        return {"t": self.t, "scale": self.scale, "density": self.density, "rank": self.rank,
                "epsilon": self.epsilon}


def child_env() -> dict:
    """Environment for every timed command: offline, our package importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _works(cmd: list[str]) -> bool:
    try:
        done = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120,
                              env=child_env(), cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "linear" in done.stdout


def find_ours(override: str | None) -> tuple[list[str] | None, str]:
    """Our CLI as an argv prefix, or None with the reason it is unavailable."""
    if override:
        cmd = shlex.split(override)
        return (cmd, "") if _works(cmd) else (None, f"--ours-cmd {override!r} failed `--help`")
    candidates = [[str(Path(sys.executable).parent / "merge")], [sys.executable, "-m", "merge.cli"]]
    on_path = shutil.which("merge")
    if on_path:
        candidates.insert(1, [on_path])
    for cmd in candidates:
        if (Path(cmd[0]).exists() or cmd[0] == sys.executable) and _works(cmd):
            return cmd, ""
    return None, ("our `merge` command was not found or `merge --help` failed "
                  f"(tried {', '.join(' '.join(c) for c in candidates)}); "
                  "install it with `pip install -e .` or pass --ours-cmd")


def find_mergekit() -> tuple[list[str] | None, str]:
    """mergekit-yaml as an argv prefix, or None with the reason it is unavailable."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    found = str(beside) if beside.exists() else shutil.which("mergekit-yaml")
    if found:
        return [found], ""
    return None, "mergekit-yaml not found (pip install mergekit)"


def ours_args(method: str, base: Path, sft: Path, out: Path, p: MergeParams, recipe: Path | None = None
              ) -> list[str]:
    """Arguments after our CLI's name for one merge (``recipe``: the mergekit recipe della/model_stock run)."""
    common = ["-o", str(out), "--force", "-q"]
    if method in MERGEKIT_RECIPE_METHODS:
        return ["run", str(recipe)] + common
    if method in ("linear", "slerp"):
        return [method, "--sft", str(sft), "--base", str(base), "--t", str(p.t)] + common
    args = ["task-arithmetic", "--base", str(base), "--sft", str(sft), "--scale", str(p.scale)]
    if method == "ties":
        args += ["--sparsify", "magnitude", "--density", str(p.density)]
    if method == "svd":
        args += ["--sparsify", "svd", "--rank", str(p.rank)]
    if method == "svd_threshold":
        args += ["--sparsify", "svd-threshold"]
    if method in ("svd", "svd_threshold"):  # whole-matrix SVDs: the default 512MB holds no worker's buffers
        args += ["--memory", SVD_MEMORY]
    return args + common


def mergekit_config(method: str, base: Path, sft: Path, p: MergeParams) -> dict | None:
    """A mergekit recipe equivalent to `ours_args` for the same method (None: mergekit has none)."""
    if method in NO_MERGEKIT:
        return None
    if method == "della":
        return {"merge_method": "della", "base_model": str(base),
                "models": [{"model": str(sft), "parameters": {"weight": p.scale, "density": p.density,
                                                              "epsilon": p.epsilon}}],
                "parameters": {"normalize": False, "lambda": 1.0},
                "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": str(base),
                "models": [{"model": str(sft)}, {"model": str(sft.parent / "sft2")}],
                "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": str(sft), "parameters": {"weight": p.scale}},
                {"model": str(base), "parameters": {"weight": p.t}},
            ],
            "dtype": "bfloat16",
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(sft)}],
            "parameters": {"t": round(1.0 - p.t, 10)},
            "dtype": "bfloat16",
        }
    params = {"weight": p.scale}
    config = {"merge_method": "task_arithmetic", "base_model": str(base),
              "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "ties":
        params["density"] = p.density
        config["merge_method"] = "ties"
        config["parameters"] = {"normalize": False}
    config["models"] = [{"model": str(sft), "parameters": params}]
    return config


def write_mergekit_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def floor_args(base: Path, sft: Path, out: Path, direct: bool = False) -> list[str]:
    return [sys.executable, str(BENCH_DIR / "floor.py")] + (["--direct"] if direct else []) + [
        str(base), str(sft), str(out)]
