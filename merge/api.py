"""The Python API. Data flows one way: resolve -> plan -> execute -> write -> card.

``merge.merge(...)`` and ``merge.run(recipe)`` do everything the CLI does; the CLI only wraps them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from .card import render_card
from .dtypes import OUTPUT_DTYPES
from .errors import InputError, MergeError
from .execute import CHUNK_ELEMENTS, DEFAULT_GPU_MEMORY, DEFAULT_MEMORY, ExecutionStats, Executor, resolve_device
from .fp8_output import fp8_output_plan
from .inputs import download_weights, input_views, open_inputs, open_model, resolve_inputs  # noqa: F401
from .io import output as outdir
from .io.lora import adapter_notes, is_adapter
from .io.quantized import fp8_config, quantisation_notes
from .io.writer import ShardWriter, parse_size, write_index
from .keys import input_label
from .methods import registry
from .options import ExecutionOptions, HubOptions, Options, OutputOptions, ReportOptions, misplaced
from .plan import Plan, make_plan
from .recipes.mergekit_inputs import finish_tokenizer, view_notes
from .recipes.operations import operations_for, unmatched_rules
from .recipes.schema import Recipe
from .recipes.yaml_source import locate_after
from .summary import MergeSummary, settings_of
from .tensor_names import Structure

DTYPES = OUTPUT_DTYPES  # kept for callers of merge.api


def merge(method: str, sft: str | Sequence[str], base: str, t=None, out: str | Path | None = None, *,
          dtype: str | None = None, device: str = "auto", max_shard_size: str = "5GB",
          options: Options | None = None, execution: ExecutionOptions | None = None,
          output: OutputOptions | None = None, hub: HubOptions | None = None, report: ReportOptions | None = None,
          **params) -> MergeSummary:
    """Merge an SFT checkpoint back with its base and write a Hugging Face model folder to ``out``.

    ``t`` is the share of the base (0 = SFT unchanged, 1 = base). ``method`` is a registered method
    (:func:`merge.methods.registry.names`); ``params`` are its parameters, as its CLI command takes them
    (task arithmetic: ``scale`` per SFT, ``sparsify`` = magnitude|random|breadcrumbs with ``density``...).
    Models are folders, Hub ids (``org/name@rev``) or aliases; ``base="auto"`` reads the SFT's metadata.
    ``dtype``, ``device`` and ``max_shard_size`` go into the recipe; how the merge runs, writes, pushes and
    reports is given by the option objects of :mod:`merge.options` (see :func:`run`).
    """
    spec = registry.get(method.replace("-", "_"))
    for name in params:
        line = misplaced(name)
        if line is not None:
            raise TypeError(f"merge(): {line}")
    sfts = [str(s) for s in ([sft] if isinstance(sft, (str, Path)) else sft)]
    params = {"t": t, **params}
    registry.check_python_params(spec, params)
    fields: dict = {"method": spec.name, "base": str(base), "dtype": dtype, "device": device,
                    "max_shard_size": str(max_shard_size), "out": str(out) if out is not None else None}
    fields.update(spec.recipe_fields(sfts, {k: v for k, v in params.items() if k in spec.python_params}))
    recipe = build_recipe(fields)
    return run(recipe, out=out, options=Options.gather(options, execution=execution, output=output, hub=hub,
                                                       report=report))


def fold(adapter: str | Path, base: str | Path, out: str | Path | None = None, **options) -> MergeSummary:
    """Write the plain merged model ``W_base + s*B@A`` of a LoRA/DoRA adapter, streamed tensor by tensor.

    The same as ``merge("linear", sft=adapter, base=base, t=0, out=out, **options)``; ``options`` are merge's.
    """
    if not is_adapter(adapter):
        raise InputError(f"--adapter {adapter}: no adapter_config.json there; give a PEFT LoRA adapter folder")
    return merge("linear", sft=adapter, base=base, t=0.0, out=out, **options)


def build_recipe(fields: dict) -> Recipe:
    """A validated :class:`Recipe`, with pydantic's complaint turned into one line naming the field."""
    from pydantic import ValidationError

    from .recipes.loading import error_text, first_error, user_path

    try:
        return Recipe.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = first_error(e)
        where = ".".join(str(p) for p in user_path(err["loc"])) or "recipe"
        raise InputError(f"{where}: {error_text(err)}") from None


def run(recipe: Recipe | str | Path, out: str | Path | None = None, *, options: Options | None = None,
        execution: ExecutionOptions | None = None, output: OutputOptions | None = None, hub: HubOptions | None = None,
        report: ReportOptions | None = None) -> MergeSummary:
    """Run a recipe: resolve its models, plan, execute in bounded memory, and write ``out`` atomically.

    ``execution`` (:class:`~merge.options.ExecutionOptions`): ``memory`` (default 512MB) bounds the workers'
    buffers in host memory, ``gpu_memory`` (default 4GB) their buffers on a CUDA device (sizes like ``"2GB"``);
    fewer workers and smaller chunks are used when a budget is tight, and the process itself (Python, torch)
    comes on top. ``chunk_elements`` (advanced) is how many elements of a tensor are processed at once; results
    do not depend on ``threads`` or the budgets, nor on chunks that are multiples of 2**17. ``ray``
    (``"auto"``, ``"local"`` or an address) runs the output shards as tasks on a Ray cluster, at most
    ``workers`` at a time (default: the cluster's CPUs), byte-identical to a local run (:mod:`merge.distributed`).

    ``output`` (:class:`~merge.options.OutputOptions`): an interrupted run (Ctrl-C, full disk, kill) keeps its
    finished shards in ``merge.io.output.staging_dir(out)``; ``resume=True`` continues it, byte-identical to an
    uninterrupted run. A NaN/Inf in any output tensor fails the run, naming the tensor and, when an input already
    holds it, that input (``allow_nonfinite=True`` writes it anyway). A ``match`` rule (mergekit: ``filter``)
    that matches no tensor is an error naming it and its line (``allow_unmatched=True``: a warning).
    ``card_sections`` are markdown sections added to the model card (e.g. ``merge sweep``'s Recovery table).

    ``hub`` (:class:`~merge.options.HubOptions`): ``push_to_hub="org/name"`` then uploads ``out`` (default
    ``./name``) with :func:`merge.hub.push`; ``token`` (default: HF_TOKEN or the cached login) is used for
    private inputs and the push. A failed push keeps ``out`` and says how to retry.

    ``report`` (:class:`~merge.options.ReportOptions`): progress bars, one line per finished tensor on stderr
    (``verbose``), the command the card records.
    """
    options = Options.gather(options, execution=execution, output=output, hub=hub, report=report)
    ex, wo, hb, rp = options.execution, options.output, options.hub, options.report
    if isinstance(recipe, (str, Path)):
        from .recipes.loading import load_recipe

        recipe = load_recipe(recipe)
    options.check(recipe.device)
    push_to_hub, dry_run, token, progress = hb.push_to_hub, wo.dry_run, hb.token, rp.progress
    primary = recipe.primary
    from .distributed import check_options

    check_options(ex.ray, ex.workers, dry_run)
    if push_to_hub is not None:
        from .hub import check_repo_id

        check_repo_id(push_to_hub, "--push-to-hub")
        if out is None and not recipe.out:
            out = push_to_hub.split("/")[-1]
    out_path = Path(out if out is not None else (recipe.out or "")).expanduser() if (out or recipe.out) else None
    if out_path is None and not dry_run:
        raise InputError("no output folder: pass -o OUT (or set out: in the recipe)")
    if out_path is not None:
        out_path = out_path.resolve()
        if not dry_run:
            refs = {input_label(k, ref): ref for k, ref in recipe.input_refs().items()}
            outdir.check_target(out_path, outdir.local_inputs(refs))
            outdir.check_output(out_path, wo.force, wo.resume)
    started = time.perf_counter()
    # Hub weights stay on the Hub until every check has passed on their headers (and for dry runs, for good).
    with ExitStack() as stack:
        inputs = open_inputs(recipe, stack, token=token, progress=progress, weights=False,
                             out=None if dry_run else out_path)
        resolved, labels, raw, resolve_notes = inputs.resolved, inputs.labels, inputs.models, inputs.notes
        models = input_views(recipe, raw, labels)
        n_layers = Structure.of(models[primary].config, models[primary].names())
        fp8_out = recipe.output_dtype == "fp8"  # bfloat16, then the FP8 weights re-quantised
        out_dtype = torch.bfloat16 if fp8_out else DTYPES[recipe.output_dtype] if recipe.output_dtype else None
        try:  # per-tensor parameters are resolved while planning: their errors name the recipe's line
            op_for = operations_for(recipe, n_layers)
            plan = make_plan(models, labels, primary, op_for, out_dtype, parse_size(recipe.max_shard_size))
        except InputError as e:
            raise InputError(locate_after(recipe, str(e))) from None
        t_values = op_for.t_values
        unmatched = unmatched_rules(recipe, [j.name for j in plan.jobs])
        if unmatched and not wo.allow_unmatched:
            raise InputError(f"{unmatched[0]}; fix the rule or pass --allow-unmatched (allow_unmatched=True)")
        if fp8_out:
            plan = fp8_output_plan(plan, models, primary, parse_size(recipe.max_shard_size))
        notes = (resolve_notes + list(plan.notes) + view_notes(models, labels) + adapter_notes(recipe.method, raw)
                 + quantisation_notes(models, recipe.output_dtype))
        summary = MergeSummary(recipe.method, resolved, out_path, plan.counts(), notes=notes,
                               shards=len(plan.shards), output_bytes=plan.output_bytes, dry_run=dry_run,
                               settings=settings_of(plan.jobs, resolved))
        for msg in unmatched:
            summary.warnings.append(msg)
            warnings.warn(msg, stacklevel=2)
        if t_values:
            summary.t_range = (min(t_values), max(t_values))
            outside = sorted({v for v in t_values if not 0 <= v <= 1})
            if outside:
                msg = _outside_message(recipe, outside[0])
                summary.warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
        if dry_run:
            from .execute import estimate_peak_bytes
            from .recipes.table import parameter_table
            from .scheduler import read_bytes_at_most

            summary.parameter_table = parameter_table(plan, op_for, n_layers)
            summary.read_bytes = read_bytes_at_most(plan, models)
            summary.peak_bytes = estimate_peak_bytes(plan, ex.threads or default_threads(),
                                                     ex.chunk_elements or CHUNK_ELEMENTS,
                                                     _size(ex.memory, DEFAULT_MEMORY))
            return summary
        resolved, raw = download_weights(resolved, raw, labels, stack, token=token, progress=progress)
        models = input_views(recipe, raw, labels)
        summary.inputs = resolved
        cluster = None
        if ex.ray is not None:
            from .distributed import Cluster

            cluster = stack.enter_context(Cluster(ex.ray, ex.workers, ex.threads, _size(ex.memory, DEFAULT_MEMORY)))
            cluster.check_visible(out_path, resolved)
        with outdir.output_lock(out_path):
            outdir.check_output(out_path, wo.force, wo.resume)  # again: a run that held the lock may have finished
            if not (wo.resume and _already_complete(recipe, out_path, summary, resolved, plan, wo.force)):
                execute_and_commit(recipe, out_path, summary, resolved, models, plan, started, options,
                                   cluster=cluster, labels=labels)
    if push_to_hub is not None:
        from .hub import push

        summary.pushed_to = push(out_path, push_to_hub, private=hb.private, revision=hb.revision,
                                 commit_message=hb.commit_message, token=token, progress=progress)
    return summary


def _outside_message(recipe, t: float) -> str:
    """The warning for a t (share of the base) outside [0, 1], in the recipe's own convention: a mergekit
    slerp's t counts from base_model (its t = 1 - ours)."""
    if not isinstance(recipe, Recipe) and getattr(recipe, "merge_method", None) == "slerp":
        mk = 1.0 - t
        return (f"t: {mk:g} (mergekit's t, 0 = base_model) is outside [0, 1]: extrapolating "
                f"{'past the other model' if mk > 1 else 'away from the other model, past base_model'}")
    return (f"t={t:g} is outside [0, 1]: extrapolating "
            f"{'past the base' if t > 1 else 'away from the base, past the SFT'}")


def _identity(recipe: Recipe, summary: MergeSummary, resolved: dict, plan: Plan) -> dict:
    """What the output bytes depend on (:func:`merge.io.manifest.run_identity`), for resuming."""
    from . import __version__
    from .io.manifest import run_identity

    inputs = {k: Path(m.path) for k, m in resolved.items()}
    return run_identity(__version__, _pinned(recipe, summary).model_dump(mode="json"), inputs, plan.shards)


def _already_complete(recipe: Recipe, out_path: Path, summary: MergeSummary, resolved: dict, plan: Plan,
                      force: bool) -> bool:
    """``resume`` onto a committed output: True (nothing to do) when it records this very run; another run's
    output is refused unless ``force`` replaces it."""
    from .io.manifest import identity_difference

    marker = outdir.read_marker(out_path) if out_path.is_dir() else None
    if marker is None:
        return False
    identity = _identity(recipe, summary, resolved, plan)
    if marker.get("identity") == identity:
        summary.already_complete = True
        return True
    if force:
        return False
    why = identity_difference(marker["identity"], identity) if isinstance(marker.get("identity"), dict) else \
        "it records no recipe"
    raise InputError(f"--resume: {out_path} already holds a complete merge of another run ({why}); pass --force "
                     "to replace it, or choose another output folder")


def execute_and_commit(recipe: Recipe, out_path: Path, summary: MergeSummary, resolved: dict, models: dict,
                       plan: Plan, started: float, options: Options, cluster=None, labels: dict | None = None) -> None:
    """Stage (journaled, resumable), execute, finish, verify and atomically commit one planned merge.

    The staging folder survives interrupts, full disks and crashes for ``resume``; it is removed when a
    MergeError during execution (a problem resuming would not fix, e.g. a NaN output) ends the run.
    """
    import errno
    import shutil

    from .integrity import VerifyError, check_files
    from .io.manifest import Journal

    stage = outdir.staging_dir(out_path)
    identity = _identity(recipe, summary, resolved, plan)
    ex, wo, rp = options.execution, options.output, options.report
    check_finite = not wo.allow_nonfinite
    keep, journal = True, None
    try:
        journal, message = Journal.start(stage, plan.shards, identity, wo.resume)
        if cluster is None:
            stats = execute(plan, models, stage, recipe.device, ex, rp, journal=journal, check_finite=check_finite)
        else:  # the same shards, written by Ray tasks and journaled here as they finish
            stats = cluster.execute(plan, recipe, resolved, labels, stage, journal, device=recipe.device,
                                    threads=ex.threads, chunk_elements=ex.chunk_elements, check_finite=check_finite,
                                    memory=_size(ex.memory, DEFAULT_MEMORY),
                                    gpu_memory=_size(ex.gpu_memory, DEFAULT_GPU_MEMORY), progress=rp.progress,
                                    verbose=rp.verbose, token=options.hub.token)
            summary.cluster = cluster.stats
        summary.spherical, summary.linear_fallback = stats.spherical, stats.linear_fallback
        summary.max_angle = stats.max_angle
        summary.reports = stats.reports
        summary.seconds = time.perf_counter() - started
        finish_folder(stage, summary, recipe, models, plan, rp.command, wo.card_sections)
        if message:  # after the card is written: it is about this run, not about the model
            summary.warnings.append(message)
            warnings.warn(message, stacklevel=3)
        outdir.write_marker(stage, identity)  # what makes this folder ours (replaceable with --force)
        journal.remove()
        try:
            check_files(stage)
        except MergeError as e:
            raise VerifyError(f"the merged folder failed verification before it was committed: {e}") from None
        outdir.commit(stage, out_path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise outdir.DiskFull(
                f"no space left on the device of {stage.parent} ({plan.output_bytes / 1e9:.2f} GB of weights "
                f"planned); {out_path} was not touched and finished shards are kept - free space and rerun "
                "with --resume (resume=True)") from None
        raise
    except MergeError as e:
        keep = journal is None or getattr(e, "resumable", False)  # a refused --resume leaves the run as it was
        raise
    finally:
        if not keep:
            shutil.rmtree(stage, ignore_errors=True)


def _pinned(recipe: Recipe, summary: MergeSummary) -> Recipe:
    """The recipe with inputs named by their resolved location (what the card records) and no ``out``."""
    return recipe.pinned({k: m.pinned for k, m in summary.inputs.items()})


def execute(plan: Plan, models: dict, stage: Path, device: str, execution: ExecutionOptions | None = None,
            report: ReportOptions | None = None, journal=None, check_finite: bool = True):
    """Write every planned tensor into the shard files under ``stage`` (those ``journal`` has not already
    recorded as complete), recording each shard in the journal as it completes."""
    skip_files = journal.skip_files if journal else set()
    writer = ShardWriter(stage, plan.shards, skip=skip_files)
    ex, report = execution or ExecutionOptions(), report or ReportOptions()
    executor = Executor(resolve_device(device), ex.threads or default_threads(), ex.chunk_elements or CHUNK_ELEMENTS,
                        check_finite=check_finite, memory=_size(ex.memory, DEFAULT_MEMORY),
                        gpu_memory=_size(ex.gpu_memory, DEFAULT_GPU_MEMORY))
    stats = ExecutionStats()
    if journal:
        journal.attach(writer, stats)
    on_done = _tensor_hook(journal, report.verbose, len(plan.jobs) - len(journal.skip_tensors if journal else ()))
    bar = None
    if report.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merging", leave=False)
    try:
        stats = executor.run(plan, models, writer, skip=journal.skip_tensors if journal else frozenset(),
                             on_done=on_done, progress=bar.update if bar else None, stats=stats)
        writer.sync()
    finally:
        writer.close()
        if bar:
            bar.close()
    write_index(stage, plan.shards)
    return stats


def _tensor_hook(journal, verbose: bool, total: int):
    """The executor's per-tensor callback: record shard completion, then (verbose) one line on stderr."""
    if not verbose:
        return journal.on_done if journal else None
    import sys
    import threading

    lock = threading.Lock()
    count = [0]

    def done(job) -> None:
        if journal:
            journal.on_done(job)
        with lock:
            count[0] += 1
            print(f"merged {job.name} ({count[0]}/{total})", file=sys.stderr, flush=True)

    return done


def _size(value: str | int | None, default: int) -> int:
    """A memory budget: bytes, or transformers-style text ("512MB", "2GiB")."""
    return default if value is None else parse_size(value)


def default_threads() -> int:
    """One worker per usable core plus one (a worker waiting on a direct write leaves its core idle), at most 8."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores + 1))


def finish_folder(stage: Path, summary: MergeSummary, recipe: Recipe, models: dict, plan: Plan,
                  command: str | None, card_sections: Sequence[str] = ()) -> None:
    """Config, tokenizer files, the reproducible recipe and the card, next to the weights."""
    primary = models[recipe.primary]
    dtype_name = recipe.output_dtype or _dominant_dtype(plan)
    config = primary.config
    if dtype_name == "fp8":
        dtype_name, config = "bfloat16", fp8_config(models, recipe.primary)
    outdir.write_config(config, stage, dtype_name, untied=plan.untied)
    outdir.copy_side_files(Path(primary.side_files_path), stage)
    finish_tokenizer(recipe, stage, models)  # a mergekit recipe's tokenizer_source and chat_template
    recipe_yaml = _pinned(recipe, summary).to_yaml()
    (stage / "merge_recipe.yaml").write_text(recipe_yaml)
    command = command or f"merge run {summary.out}/merge_recipe.yaml -o OUT"
    (stage / "README.md").write_text(render_card(summary, recipe_yaml, command, list(card_sections)))


def _dominant_dtype(plan: Plan) -> str | None:
    sizes: dict[torch.dtype, int] = {}
    for j in plan.jobs:
        if j.out_dtype.is_floating_point:
            sizes[j.out_dtype] = sizes.get(j.out_dtype, 0) + j.numel
    if not sizes:
        return None
    best = max(sizes, key=sizes.get)
    return str(best).removeprefix("torch.")
