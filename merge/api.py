"""The Python API. Data flows one way: resolve -> plan -> execute -> write -> card.

``merge.merge(...)`` and ``merge.run(recipe)`` do everything the CLI does; the CLI only wraps them.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from .card import render_card
from .errors import InputError, MergeError
from .execute import CHUNK_ELEMENTS, Executor, resolve_device
from .io import output
from .io.checkpoint import Checkpoint
from .io.resolve import ResolvedModel, resolve_model
from .io.writer import ShardWriter, parse_size, write_index
from .plan import Operation, Plan, make_plan
from .recipes.schema import Recipe
from .recipes.values import value_for
from .summary import MergeSummary
from .tensor_names import num_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PRIMARY = "sft0"


def merge(method: str, sft: Union[str, Sequence[str]], base: str, t=None, out: str | Path | None = None, *,
          scale=None, sparsify: str | None = None, density: float | None = None, gamma: float = 0.01,
          seed: int = 0, sign_consensus: bool = False, dtype: str | None = None, device: str = "auto",
          max_shard_size: str = "5GB", threads: int | None = None, force: bool = False,
          dry_run: bool = False, progress: bool = False, command: str | None = None,
          chunk_elements: int | None = None) -> MergeSummary:
    """Merge an SFT checkpoint back with its base and write a Hugging Face model folder to ``out``.

    ``t`` is the share of the base (0 = SFT unchanged, 1 = base). ``method`` is ``linear``, ``slerp`` or
    ``task_arithmetic`` (with ``scale`` per SFT, and optional ``sparsify`` = magnitude|random|breadcrumbs).
    """
    method = method.replace("-", "_")
    sfts = [sft] if isinstance(sft, (str, Path)) else list(sft)
    fields: dict = {"method": method, "base": str(base), "dtype": dtype, "device": device,
                    "max_shard_size": str(max_shard_size), "out": str(out) if out is not None else None}
    if method == "task_arithmetic":
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(sfts)
        if len(scales) != len(sfts):
            raise InputError(f"--scale: give one scale for all SFTs or one per SFT ({len(sfts)}), got {len(scales)}")
        fields["sft"] = [{"model": str(s), "scale": sc} for s, sc in zip(sfts, scales)]
        if sparsify:
            if density is None:
                raise InputError("--sparsify needs --density (the fraction of each delta kept, 0..1]")
            fields["sparsify"] = {"method": sparsify, "density": density, "gamma": gamma, "seed": seed}
        fields["sign_consensus"] = sign_consensus
    else:
        fields["sft"] = [str(s) for s in sfts]
        fields["t"] = t
    recipe = build_recipe(fields)
    return run(recipe, out=out, force=force, threads=threads, dry_run=dry_run, progress=progress, command=command,
               chunk_elements=chunk_elements)


def build_recipe(fields: dict) -> Recipe:
    """A validated :class:`Recipe`, with pydantic's complaint turned into one line naming the field."""
    from pydantic import ValidationError

    try:
        return Recipe.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        raise InputError(f"{where}: {err['msg']}") from None


def run(recipe: Recipe, out: str | Path | None = None, *, force: bool = False, threads: int | None = None,
        dry_run: bool = False, progress: bool = False, command: str | None = None,
        chunk_elements: int | None = None) -> MergeSummary:
    """Run a recipe: resolve its models, plan, execute in bounded memory, and write ``out`` atomically.

    ``chunk_elements`` (advanced) is how many elements of a tensor are processed at once; results do not
    depend on it or on ``threads``.
    """
    out_path = Path(out if out is not None else (recipe.out or "")).expanduser() if (out or recipe.out) else None
    if out_path is None and not dry_run:
        raise InputError("no output folder: pass -o OUT (or set out: in the recipe)")
    if out_path is not None:
        out_path = out_path.resolve()
        if not dry_run:
            output.check_output(out_path, force)
    started = time.perf_counter()
    resolved = {"base": resolve_model(recipe.base, "base")}
    for i, s in enumerate(recipe.sft):
        resolved[f"sft{i}"] = resolve_model(s.model, "SFT")
    labels = {k: f"{'base' if k == 'base' else 'SFT'} {m.ref}" for k, m in resolved.items()}
    with ExitStack() as stack:
        models = {k: stack.enter_context(open_model(m, labels[k], resolved)) for k, m in resolved.items()}
        n_layers = num_layers(models[PRIMARY].config, models[PRIMARY].names())
        op_for, t_values = operations_for(recipe, n_layers)
        out_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
        plan = make_plan(models, labels, PRIMARY, op_for, out_dtype, parse_size(recipe.max_shard_size))
        summary = MergeSummary(recipe.method, resolved, out_path, plan.counts(), notes=list(plan.notes),
                               shards=len(plan.shards), output_bytes=plan.output_bytes, dry_run=dry_run)
        if t_values:
            summary.t_range = (min(t_values), max(t_values))
            outside = sorted({v for v in t_values if not 0 <= v <= 1})
            if outside:
                msg = (f"t={outside[0]:g} is outside [0, 1]: extrapolating "
                       f"{'past the base' if outside[0] > 1 else 'away from the base, past the SFT'}")
                summary.warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
        if dry_run:
            return summary
        stage = output.fresh_staging(out_path)
        try:
            stats = execute(plan, models, stage, recipe.device, threads, progress, chunk_elements)
            summary.spherical, summary.linear_fallback = stats.spherical, stats.linear_fallback
            summary.max_angle = stats.max_angle
            summary.seconds = time.perf_counter() - started
            finish_folder(stage, summary, recipe, models, plan, command)
            output.commit(stage, out_path)
        except BaseException:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise
    return summary


def open_model(resolved: ResolvedModel, label: str, all_resolved: dict):
    """A lazily-read tensor source for one input."""
    return Checkpoint(resolved.path, role=label)


def operations_for(recipe: Recipe, n_layers: int) -> tuple[Callable[[str], Operation], list[float]]:
    """Per-tensor operations of our recipe format (t = share of base), and the t values handed out."""
    t_values: list[float] = []
    sft_keys = tuple(f"sft{i}" for i in range(len(recipe.sft)))

    def number(value, what: str, name: str) -> float:
        v = value_for(value, name, n_layers)
        if v is None:
            raise InputError(f"{what}: no rule matches tensor {name!r}; add a default rule without match")
        if not math.isfinite(v):
            raise InputError(f"{what}: value for {name!r} is {v}; give a finite number")
        return v

    def op_for(name: str) -> Operation:
        if recipe.method in ("linear", "slerp"):
            t = number(recipe.t, "t", name)
            t_values.append(t)
            if t == 0:
                return Operation("copy", (PRIMARY,))
            if recipe.method == "linear":
                return Operation("linear", (PRIMARY, "base"), {"weights": (1.0 - t, t)})
            return Operation("slerp", (PRIMARY, "base"), {"t": t})
        weights = tuple(number(recipe.scale_of(i), f"sft[{i}].scale", name) for i in range(len(recipe.sft)))
        params = {"weights": weights, "sign_consensus": _consensus(recipe.sign_consensus),
                  "sparsify": recipe.sparsify.model_dump() if recipe.sparsify else None}
        return Operation("task_arithmetic", ("base",) + sft_keys, params)

    return op_for, t_values


def _consensus(value) -> str | None:
    if value is True:
        return "sum"
    return value or None


def execute(plan: Plan, models: dict, stage: Path, device: str, threads: int | None, progress: bool,
            chunk_elements: int | None = None):
    """Write every planned tensor into the shard files under ``stage``."""
    writer = ShardWriter(stage, plan.shards)
    executor = Executor(resolve_device(device), threads or default_threads(), chunk_elements or CHUNK_ELEMENTS)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merging", leave=False)
    try:
        stats = executor.run(plan, models, writer, progress=bar.update if bar else None)
        writer.sync()
    finally:
        writer.close()
        if bar:
            bar.close()
    write_index(stage, plan.shards)
    return stats


def default_threads() -> int:
    import os

    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def finish_folder(stage: Path, summary: MergeSummary, recipe: Recipe, models: dict, plan: Plan,
                  command: str | None) -> None:
    """Config, tokenizer files, the reproducible recipe and the card, next to the weights."""
    primary = models[PRIMARY]
    dtype_name = recipe.dtype or _dominant_dtype(plan)
    output.write_config(primary.config, stage, dtype_name)
    output.copy_side_files(Path(primary.path), stage)
    pinned = recipe.model_copy(update={
        "base": summary.inputs["base"].pinned,
        "sft": [s.model_copy(update={"model": summary.inputs[f"sft{i}"].pinned}) for i, s in enumerate(recipe.sft)],
        "out": None,
    })
    recipe_yaml = pinned.to_yaml()
    (stage / "merge_recipe.yaml").write_text(recipe_yaml)
    command = command or f"merge run {summary.out}/merge_recipe.yaml -o OUT"
    (stage / "README.md").write_text(render_card(summary, recipe_yaml, command))


def _dominant_dtype(plan: Plan) -> str | None:
    sizes: dict[torch.dtype, int] = {}
    for j in plan.jobs:
        if j.out_dtype.is_floating_point:
            sizes[j.out_dtype] = sizes.get(j.out_dtype, 0) + j.numel
    if not sizes:
        return None
    best = max(sizes, key=sizes.get)
    return str(best).removeprefix("torch.")
