"""The ``merge`` command line: a thin wrapper over the Python API (``merge.merge``, ``merge.run``)."""

from __future__ import annotations

import functools
import math
import shlex
import sys

import click

from . import __version__
from .errors import MergeError

T_CONVENTION = ("t is the share of the BASE model: t=0 keeps the SFT unchanged, t=1 gives the base; "
                "--t 0.3 is roughly 0.7*SFT + 0.3*base. Values outside [0,1] extrapolate (with a warning).")


MODEL_REF_HELP = "{} (a folder, a Hub id org/name[@revision], or an alias: see `merge aliases`)."
BASE_REF_HELP = MODEL_REF_HELP.format("Base model") + " `auto` reads it from the SFT's metadata."


def _command_line() -> str:
    """The invoked command with its explicitly given options, for the model card."""
    ctx = click.get_current_context()
    parts = ["merge", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if value is None or value is False or value == () or source != click.core.ParameterSource.COMMANDLINE:
            continue  # (not `value in (...)`: 0 == False would drop `--t 0`)
        if isinstance(param, click.Argument):
            parts += [shlex.quote(str(v)) for v in (value if isinstance(value, (list, tuple)) else [value])]
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            parts.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def _resume_command() -> str | None:
    """The command that was run, with --resume; None for a command that cannot resume (or a dry run)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not any(p.name == "resume" for p in ctx.command.params) or ctx.params.get("dry_run"):
        return None
    command = _command_line()
    return command if " --resume" in command else command + " --resume"


def user_errors(fn):
    """Turn our errors into one line on stderr and exit code 2; Ctrl-C into a short message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeError as e:
            resume = _resume_command() if getattr(e, "resumable", False) else None
            click.echo(f"error: {e}" + (f"; continue with: {resume}" if resume else ""), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            resume = _resume_command()
            click.echo("interrupted: the output folder was not touched; finished shards are kept - continue "
                       f"with: {resume}" if resume else "interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)

    return wrapper


def merge_options(fn):
    """Options every merge command shares."""
    options = [
        click.option("-o", "--out", "out", type=click.Path(file_okay=False), help="Output model folder."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where to compute."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64", "fp8"]),
                     help="Output dtype (default: the SFT's; bfloat16 for FP8 inputs). fp8: FP8 block-scaled "
                          "weights with *_scale_inv, as DeepSeek-V3."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, transformers' syntax (5GB, 500MB, 2GiB)."),
        click.option("--force", is_flag=True, help="Replace an earlier mergeback output at OUT (never other files)."),
        click.option("--threads", type=click.IntRange(1, 64), help="Worker threads (default: cores + 1, at most 8)."),
        click.option("--memory", metavar="SIZE",
                     help="Host memory for the workers' buffers (default 512MB; Python and torch "
                          "come on top). Fewer workers and smaller chunks are used to stay within it."),
        click.option("--gpu-memory", metavar="SIZE", help="With --device cuda: GPU memory for the workers "
                                                          "(default 4GB; never the whole model)."),
        click.option("--dry-run", is_flag=True, help="Validate and plan without writing anything."),
        click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run into the same OUT, reusing its verified finished shards."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Write NaN/Inf outputs instead of failing (by default any NaN/Inf fails the run, naming "
                          "the tensor and the input that holds it)."),
        click.option("-v", "--verbose", is_flag=True, help="Print one line per finished tensor on stderr."),
        click.option("--push-to-hub", metavar="REPO",
                     help="Upload OUT to this Hub model repo (created if needed; OUT defaults to ./NAME). Token: "
                          "HF_TOKEN or `hf auth login`."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--revision", metavar="BRANCH",
                     help="With --push-to-hub: push to this branch (created if needed)."),
        click.option("--commit-message", help="With --push-to-hub: the commit message."),
        click.option("--ray", metavar="[ADDRESS]", is_flag=False, flag_value="auto", default=None,
                     help="Run the output shards as tasks on a Ray cluster: --ray alone or auto (ray.init(): "
                          "RAY_ADDRESS or a running cluster), local (start one here), or an address "
                          "(10.0.0.1:6379, ray://head:10001). Needs pip install 'mergeback[ray]'."),
        click.option("--workers", type=click.IntRange(1, 100_000),
                     help="With --ray: tasks running at once (default: the cluster's CPUs)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _report(summary, quiet: bool) -> None:
    for w in summary.warnings:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        click.echo(summary.report())


RECIPE_FIELDS = ("dtype", "device", "max_shard_size")  # merge options that go into the recipe


def _options(quiet: bool, flags: dict):
    """The option objects (:mod:`merge.options`) of a merge command's ``flags``, which it removes from them."""
    from .options import OPTION_FIELDS, Options

    given = {k: flags.pop(k) for k in list(flags) if k in OPTION_FIELDS}
    return Options.of(progress=not quiet and sys.stderr.isatty(), command=_command_line(), **given)


def _merge(quiet: bool, method: str, sft, base, **kwargs) -> None:
    import warnings

    from . import api

    options = _options(quiet, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are part of the summary, printed once below
        summary = api.merge(method, sft, base, options=options, **kwargs)
    _report(summary, quiet)


AS_ADAPTER_HELP = ("With a LoRA adapter as --sft: write the result as an adapter (every lora_B times 1-t, saved "
                   "modules (1-t)*saved + t*base) instead of a full model. Not for DoRA at t != 0.")


def lm_eval_options(fn):
    """The lm-eval settings `merge sweep` and `merge evaluate` share, passed through to lm-eval."""
    options = [
        click.option("--tasks-path", multiple=True, type=click.Path(file_okay=False),
                     help="More task folders (repeatable)."),
        click.option("--limit", type=float, help="Documents per task (the first N; a fraction below 1 is a share)."),
        click.option("--num-fewshot", type=int, help="Few-shot examples (lm-eval's --num_fewshot)."),
        click.option("--batch-size", default="1", show_default=True, help="lm-eval batch size, or `auto` (GPU)."),
        click.option("--seed", type=int,
                     help="Seed for python, numpy, torch and few-shot sampling (default: lm-eval's)."),
        click.option("--apply-chat-template/--no-apply-chat-template", default=None,
                     help="Render task prompts with the chat template (default: on when the SFT's tokenizer has one)."),
        click.option("--gen-kwargs",
                     help="Generation arguments for generate_until tasks, e.g. max_gen_toks=64,temperature=0."),
        click.option("--metric", "metrics", multiple=True, metavar="TASK=METRIC[,FILTER]",
                     help="Use this metric of a task instead of its first (repeatable)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def interpolation_options(fn):
    """--sft, --base and --t, then the shared merge options (linear and slerp)."""
    fn = merge_options(fn)
    fn = click.option("--t", "t", type=float, required=True, help="Share of the base, 0..1.")(fn)
    fn = click.option("--base", required=True, help=BASE_REF_HELP)(fn)
    return click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model"))(fn)


class OneLineErrors(click.Group):
    """Usage mistakes (unknown option, bad value) as one ``error:`` line and exit 2, like every user error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `merge`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors,
             help="mergeback: recover what fine-tuning forgot by merging the SFT back with its base.\n\n"
                  + T_CONVENTION)
@click.version_option(__version__, prog_name="mergeback")
def main() -> None:
    pass


@main.command(help=f"Linear interpolation: W = (1-t)*W_sft + t*W_base.\n\n{T_CONVENTION}")
@interpolation_options
@click.option("--as-adapter", is_flag=True, help=AS_ADAPTER_HELP)
@user_errors
def linear(sft, base, t, quiet, as_adapter, **kwargs):
    if as_adapter:
        return _as_adapter("linear", sft, base, t, quiet, kwargs)
    _merge(quiet, method="linear", sft=sft, base=base, t=t, **kwargs)


@main.command(help="Spherical interpolation per tensor, from the SFT (t=0) to the base (t=1), on the raw "
                   "flattened tensors: W = sin((1-t)θ)/sin θ * W_sft + sin(tθ)/sin θ * W_base, θ the angle "
                   "between them; linear when |cos θ| > 0.9995 (typical for small SFT deltas).\n\n"
                   f"{T_CONVENTION}")
@interpolation_options
@click.option("--as-adapter", is_flag=True, help="Refused: SLERP of a LoRA SFT is not a rescaling of its factors.")
@user_errors
def slerp(sft, base, t, quiet, as_adapter, **kwargs):
    if as_adapter:
        return _as_adapter("slerp", sft, base, t, quiet, kwargs)
    _merge(quiet, method="slerp", sft=sft, base=base, t=t, **kwargs)


@main.command("task-arithmetic", help=(
    "Task arithmetic: W = W_base + sum_i s_i * sparsify(W_sft_i - W_base).\n\n"
    "A single SFT with --scale 1-t equals linear interpolation with t; scale > 1 extrapolates (ExPO). "
    "--sparsify magnitude keeps the largest --density fraction of each delta (TIES trimming); random drops "
    "entries with probability 1-density and rescales survivors (DARE); breadcrumbs drops the largest --gamma "
    "and the smallest entries; della (DELLA) keeps each entry with probability P = density - epsilon + "
    "2*epsilon*r, r its magnitude rank in its row scaled to 0..1, and restores each delta's L1 norm. "
    "--sign-consensus elects signs across several SFTs (TIES).\n\n"
    "Spectral repair (one SFT): per 2-D tensor D = W_sft - W_base = U diag(s) V^T and W = W_base + "
    "scale * U_k diag(s_k) V_k^T; other tensors take the whole delta. --sparsify svd --rank r keeps the top r "
    "components (randomized SVD on the CPU when (r+10)*4 <= min(m, n): q = r+10, 4 power iterations, seed 0; "
    "--svd exact forces the exact SVD); --sparsify svd-threshold keeps those with s_i > omega(beta) * "
    "median(s), the Donoho-Gavish optimal hard threshold for unknown noise, beta = min(m,n)/max(m,n), "
    "omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43 (exact SVD). Each 2-D tensor is decomposed "
    "whole: give --memory room for about 15 float32 copies of the largest one."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable.")
@click.option("--scale", "scales", type=float, multiple=True, required=True,
              help="Scale of each delta: one for all SFTs or one per --sft.")
@click.option("--sparsify", type=click.Choice(["magnitude", "random", "breadcrumbs", "della", "svd", "svd-threshold"]),
              help="How each delta is thinned: entries (magnitude, random, breadcrumbs, della) or singular "
                   "components (svd with --rank, svd-threshold).")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), help="Fraction of each delta kept.")
@click.option("--gamma", type=click.FloatRange(0, 1, max_open=True),
              help="breadcrumbs: fraction of largest entries dropped (default 0.01).")
@click.option("--epsilon", type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              help="della: keep probabilities run from density-epsilon (smallest) to density+epsilon (largest "
                   "entry of a row) (default 0.15).")
@click.option("--seed", type=int, help="--sparsify random or della: seed of random dropping (default 0).")
@click.option("--sign-consensus", is_flag=True, help="TIES sign election across several SFTs.")
@click.option("--rank", type=click.IntRange(min=1), help="--sparsify svd: singular components kept per 2-D delta.")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]),
              help="--sparsify svd: the SVD (default auto: randomized on the CPU when the rank is small).")
@merge_options
@user_errors
def task_arithmetic(base, sfts, scales, quiet, **kwargs):
    scale = list(scales) if len(scales) > 1 else scales[0]
    _merge(quiet, method="task_arithmetic", sft=list(sfts), base=base, scale=scale, **kwargs)


@main.command(help=(
    "NearSwap: W = w*W_sft + (1-w)*W_base per entry, w = clamp(d / |W_sft - W_base|, 0, 1), i.e. the SFT's "
    "change of each entry kept up to the distance d and cut to d beyond (W_base + clamp(delta, -d, d)).\n\n"
    "--distance is mergekit's nearswap t (a distance in weight units, not a share of the base)."))
@click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--distance", type=click.FloatRange(0, min_open=True), required=True,
              help="Largest change of an entry kept (mergekit's t), > 0.")
@merge_options
@user_errors
def nearswap(sft, base, distance, quiet, **kwargs):
    _merge(quiet, "nearswap", [sft], base, distance=distance, **kwargs)


@main.command(help=(
    "RAM (Reinforced Agent Merging) of several SFTs: with d_i = W_sft_i - W_base, c_i = |d_i| > epsilon and "
    "n = sum_i c_i per entry, W = W_base + sum_i c_i*d_i*([n = 1]*lambda_i + [n > 1]/n): the base where no SFT "
    "changed an entry, a change only one SFT made taken whole, shared changes averaged. lambda_i = 1; --plus "
    "(RAM+, tensor-local): lambda_i = 1 + r*clamp(rho_i, 0, alpha), rho_i = SFT i's count of shared over unique "
    "changed entries in the tensor."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable.")
@click.option("--epsilon", type=click.FloatRange(0), default=1e-5, show_default=True,
              help="An entry counts as changed when |W_sft - W_base| > epsilon.")
@click.option("--plus", is_flag=True, help="RAM+ (mergekit's ramplus_tl): lone changes scaled by lambda_i.")
@click.option("--r", "r", type=float, help="--plus: r (default 0.1).")
@click.option("--alpha", type=float, help="--plus: alpha, the cap of rho (default 0.2).")
@merge_options
@user_errors
def ram(base, sfts, epsilon, plus, r, alpha, quiet, **kwargs):
    from .errors import InputError

    if not plus and (r is not None or alpha is not None):
        raise InputError("--r/--alpha: only with --plus (RAM+); add --plus or drop them")
    _merge(quiet, "ram", list(sfts), base, epsilon=epsilon, plus=plus, r=r, alpha=alpha, **kwargs)


@main.command(help=(
    "Arcee Fusion: importance I = |W_sft - W_base| * KL(softmax(W_sft) || softmax(W_base)) (KL per row); "
    "W = W_base + (W_sft - W_base) * [I >= Q2 + 1.5*(Q3 - Q1)] (quartiles of I over the tensor; tensors above "
    "1e6 entries take them from 1e6 entries sampled with seed 0): only the SFT's salient changes are kept."))
@click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@merge_options
@user_errors
def fusion(sft, base, quiet, **kwargs):
    _merge(quiet, "arcee_fusion", [sft], base, **kwargs)


@main.command("model-stock", help=(
    "Model Stock: W = t*mean_i(W_sft_i) + (1-t)*W_base, with t = N*cos/(1+(N-1)*cos) per tensor, cos the mean "
    "pairwise cosine between the deltas W_sft_i - W_base of the N >= 2 SFTs (t = 0, the base, where "
    "1+(N-1)*cos ~ 0). --filter-wise: one t per row (last-dim slice) instead of per tensor. This t is Model "
    "Stock's own ratio (the share of the SFTs' mean, set by the angles; 1-t is the share of the base), not an "
    "option."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable; at least two.")
@click.option("--filter-wise", is_flag=True, help="One ratio per row (last-dim slice) instead of per tensor.")
@merge_options
@user_errors
def model_stock(base, sfts, filter_wise, quiet, **kwargs):
    _merge(quiet, "model_stock", list(sfts), base, filter_wise=filter_wise, **kwargs)


VECTORS_HELP = "Vectors interpolated: whole tensors, rows (last-dim slices) or columns (dim-0 slices)."


@main.command(help=(
    "NuSLERP: spherical interpolation S(v0, v1, t) = (sin((1-t)θ) v0 + sin(tθ) v1) / sin θ per tensor, row or "
    "column (θ the angle between v0 and v1; linear where they are colinear; no 0.9995 fallback). One --sft: "
    "W = S(W_sft, W_base, t), t the share of the base. Two --sft with --weight w1 --weight w2: "
    f"W = W_base + S(W_sft1 - W_base, W_sft2 - W_base, w2/(w1+w2)).\n\n{T_CONVENTION}"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Once (with --t) or twice (with --weight).")
@click.option("--t", "t", type=float, help="One SFT: share of the base, 0..1.")
@click.option("--weight", "weights", type=float, multiple=True, help="Two SFTs: the weight of each (twice).")
@click.option("--vectors", type=click.Choice(["tensor", "row", "column"]), default="tensor", show_default=True,
              help=VECTORS_HELP)
@merge_options
@user_errors
def nuslerp(base, sfts, t, weights, vectors, quiet, **kwargs):
    _merge(quiet, "nuslerp", list(sfts), base, t=t, weights=list(weights) or None, vectors=vectors, **kwargs)


@main.command(help=(
    "Multi-SLERP of two or more SFTs' deltas from the base: W = W_base + (m/|m|) * sum_i w_i |d_i|, "
    "m = sum_i w_i d_i/|d_i|, d_i = W_sft_i - W_base, weights normalised to sum 1 (per tensor)."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable; at least two.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="The weight of each SFT, once per --sft (default: equal).")
@merge_options
@user_errors
def multislerp(base, sfts, weights, quiet, **kwargs):
    _merge(quiet, "multislerp", list(sfts), base, weights=list(weights) or None, **kwargs)


@main.command(help=(
    "Karcher mean of the SFTs and the base on the unit hypersphere, rescaled by their mean norm: "
    "W = (sum_i |W_i|/N) * m, m minimising sum_i angle(m, W_i)^2 over the N inputs (the base included, "
    "weight 1/N each), found by at most --max-iter Riemannian gradient steps (per tensor)."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable.")
@click.option("--max-iter", type=click.IntRange(1), help="Most iterations (default 10).")
@click.option("--tol", type=click.FloatRange(0, min_open=True), help="Convergence tolerance (default 1e-5).")
@merge_options
@user_errors
def karcher(base, sfts, max_iter, tol, quiet, **kwargs):
    _merge(quiet, "karcher", list(sfts), base, max_iter=max_iter, tol=tol, **kwargs)


@main.command(help=(
    "SCE (select, calculate, erase) of several SFTs: d_i = W_sft_i - W_base; select: keep the entries whose "
    "variance across the d_i is among the top --select-topk fraction of the non-zero variances (1: all); "
    "calculate: w_i = mean(d_i^2) / sum_j mean(d_j^2); erase: m_i = [sign(d_i) == sign(sum_j d_j)]; "
    "W = W_base + sum_i w_i m_i d_i / sum_i w_i m_i. No t: the weights come from the deltas."))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--sft", "sfts", multiple=True, required=True,
              help=MODEL_REF_HELP.format("Fine-tuned model") + " Repeatable; at least two.")
@click.option("--select-topk", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Fraction of the entries (by variance across the deltas) kept.")
@merge_options
@user_errors
def sce(base, sfts, select_topk, quiet, **kwargs):
    _merge(quiet, "sce", list(sfts), base, select_topk=select_topk, **kwargs)


@main.command(help="Fold a LoRA/DoRA adapter into its base: W = W_base + s*B@A (s = alpha/r, or alpha/sqrt(r) "
                   "with rsLoRA), streamed tensor by tensor; the same as `merge linear --sft ADAPTER --t 0`. "
                   "Every merge command also accepts an adapter folder wherever it takes an SFT.")
@click.option("--adapter", required=True, help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors).")
@click.option("--base", required=True, help="The base model folder the adapter was trained on.")
@merge_options
@user_errors
def fold(adapter, base, quiet, **kwargs):
    import warnings

    from . import api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = api.fold(adapter, base, options=_options(quiet, kwargs), **kwargs)
    _report(summary, quiet)



RECIPE_HELP = ("RECIPE is a YAML file in mergeback's format (method, base, sft, t/scale, schedule...) or a "
               "mergekit config (merge_method, models/slices, base_model, parameters), which runs with "
               "mergekit's semantics and t convention. Relative model paths resolve against the current "
               "directory.")


def _recipe_with_overrides(path: str, dtype, device, max_shard_size):
    """The recipe in ``path`` with the options given on the command line replacing its own."""
    from .recipes.loading import load_recipe
    from .recipes.mergekit import MergekitRecipe

    recipe = load_recipe(path)
    ctx = click.get_current_context()
    given = {name for name in ("dtype", "device", "max_shard_size")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    values = {"dtype": dtype, "device": device, "max_shard_size": max_shard_size}
    if isinstance(recipe, MergekitRecipe):
        recipe = recipe.with_options(**{k: values[k] for k in given - {"dtype"}})
        if "dtype" in given:
            if dtype == "fp8":
                from .errors import InputError

                raise InputError(f"--dtype fp8: {path} is a mergekit recipe, whose out_dtype has no FP8; convert it "
                                 "with `merge convert` and run that recipe with --dtype fp8")
            recipe = recipe.model_copy(update={"out_dtype": dtype})
        return recipe
    return recipe.model_copy(update={k: values[k] for k in given})


@main.command("run", help="Run a merge recipe: `merge run RECIPE.yaml -o OUT`. OUT may come from the recipe's "
                          "`out:`. Every output holds merge_recipe.yaml; `merge run OUT/merge_recipe.yaml` "
                          "reproduces it byte for byte.\n\n" + RECIPE_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@merge_options
@click.option("--allow-unmatched", is_flag=True,
              help="Warn instead of failing when a recipe rule (match/filter) matches no tensor.")
@user_errors
def run_recipe(recipe, quiet, dtype, device, max_shard_size, **kwargs):
    import warnings

    from . import api

    loaded = _recipe_with_overrides(recipe, dtype, device, max_shard_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = api.run(loaded, out=kwargs.pop("out"), options=_options(quiet, kwargs))
    _report(summary, quiet)


@main.command(help="Validate a recipe without writing anything, then print the resolved parameters per layer and "
                   "tensor group, the output size, shard count and an estimate of peak memory.\n\n" + RECIPE_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), help="Output folder to check (optional).")
@click.option("--threads", type=click.IntRange(1, 64), help="Worker threads the estimate assumes.")
@click.option("--allow-unmatched", is_flag=True,
              help="Warn instead of failing when a recipe rule (match/filter) matches no tensor.")
@user_errors
def plan(recipe, out, threads, allow_unmatched):
    import warnings

    from . import api
    from .options import Options
    from .recipes.loading import load_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = api.run(load_recipe(recipe), out=out, options=Options.of(threads=threads, dry_run=True,
                                                                           allow_unmatched=allow_unmatched))
    _report(summary, False)


@main.command(help="Print a mergekit recipe in mergeback's format (t = share of the base), with comments on what "
                   "differs, or say precisely what cannot be expressed (such recipes still run with `merge run`).")
@click.argument("recipe", type=click.Path(dir_okay=False))
@user_errors
def convert(recipe):
    from .errors import InputError
    from .recipes.convert import convert_text
    from .recipes.loading import load_recipe
    from .recipes.mergekit import MergekitRecipe

    loaded = load_recipe(recipe)
    if not isinstance(loaded, MergekitRecipe):
        raise InputError(f"{recipe}: already in mergeback's format (no merge_method key); nothing to convert")
    click.echo(convert_text(loaded), nl=False)


@main.command(help="Upload a merged model folder to the Hub (creates the repo if needed), e.g. to retry a failed "
                   "--push-to-hub. The token comes from HF_TOKEN or `hf auth login`; it is never printed.")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created if needed).")
@click.option("--commit-message", help="The commit message.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@user_errors
def push(out, repo, private, revision, commit_message, quiet):
    from .hub import push as push_folder

    url = push_folder(out, repo, private=private, revision=revision, commit_message=commit_message,
                      progress=not quiet and sys.stderr.isatty())
    if not quiet:
        click.echo(f"pushed {out} to {url}")


@main.command(help="List model aliases (usable wherever a model is expected): the built-in table plus your own "
                   "from $XDG_CONFIG_HOME/mergeback/aliases.yaml (~/.config/...; MERGEBACK_ALIASES overrides), "
                   "one `alias: org/name[@revision]` per line.")
@user_errors
def aliases():
    from .io.aliases import list_aliases, user_alias_file

    table = list_aliases()
    width = max((len(a.name) for a in table), default=0)
    for a in table:
        click.echo(f"{a.name:<{width}}  {a.target}" + ("" if a.source == "built-in" else f"  ({a.source})"))
    click.echo(f"(your aliases file: {user_alias_file()})")


@main.command(help="Check a model folder: the index against the shard files, every safetensors header, and that "
                   "sizes add up; --load also loads it with transformers and runs one forward pass.")
@click.argument("folder", type=click.Path())
@click.option("--load", is_flag=True, help="Also load with transformers and run a forward pass.")
@user_errors
def verify(folder, load):
    from .integrity import verify as verify_folder

    click.echo(str(verify_folder(folder, load=load)))


def _t_list(ctx, param, value):
    if value is None:
        return None
    try:
        values = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 0,0.1,0.2,...,1") from None
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{value!r}: every t must be a finite number")
    return values


@main.command(help="Evaluate base, SFT and merges at several t on general and domain probes, pick t by a stated "
                   "rule, and write the merged model at that t with the scores in its model card.\n\n"
                   "Probe files: .txt (documents separated by blank lines, every token scored) or .jsonl (Alpaca "
                   "instruction/input/output or ShareGPT conversations: only response tokens scored, rendered "
                   "with the SFT's chat template). Scores use bits per byte: general_recovered = (G_sft - G_m)/"
                   "(G_sft - G_base), domain_retained = (D_base - D_m)/(D_base - D_sft), score = their harmonic "
                   "mean. Choose t on one part of the probes and report on another: --general-report/"
                   "--domain-report files or --holdout.\n\n" + T_CONVENTION)
@click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model (or LoRA adapter folder)"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--domain", type=click.Path(dir_okay=False),
              help="Domain probes (what the SFT is for); optional with --domain-tasks.")
@click.option("--general", type=click.Path(dir_okay=False),
              help="General probes (default: the built-in set, a smoke signal, not a benchmark).")
@click.option("--general-report", type=click.Path(dir_okay=False), help="General probes to report the choice on.")
@click.option("--domain-report", type=click.Path(dir_okay=False), help="Domain probes to report the choice on.")
@click.option("--holdout", type=float, help="Split this fraction of each probe set (by content hash) for reporting.")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), help="Write the chosen merge here.")
@click.option("--force", is_flag=True, help="Replace an earlier mergeback output at OUT (never other files).")
@click.option("--t-values", callback=_t_list, help="Comma-separated t values (default 0,0.1,...,1).")
@click.option("--method", type=click.Choice(["linear", "slerp"]), default="linear", show_default=True)
@click.option("--select", "select_rule", type=click.Choice(["keep-domain", "score"]), default="keep-domain",
              show_default=True, help="keep-domain: largest general_recovered with domain_retained >= --keep-domain "
                                      "(else best score); score: largest harmonic mean.")
@click.option("--keep-domain", type=float, help="Domain gain to keep, 0..1 (default 0.9; keep-domain rule).")
@click.option("--schedule", type=click.Choice(["lines", "blocks"]),
              help="Also search per-layer schedules: LiNeS alpha/beta, or one t per block of layers.")
@click.option("--blocks", type=int, help="Blocks for --schedule blocks (default 3).")
@click.option("--budget", type=int, help="Most evaluations of the schedule search (default 16).")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Scored tokens per probe set, at most.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), help="CPU threads for evaluation (default: torch's).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Trade-off plot PNG (default OUT/tradeoff.png).")
@click.option("--candidates", help="Methods on one front: linear,slerp (the t grid each), linear@0.25 (one t), "
                                   "ties@0.3, dare@0.5, task_arithmetic@0.8 (needs the in-place model to apply it).")
@click.option("--general-tasks", help="lm-eval tasks for the general side (names, YAML files, folders; comma-"
                                      "separated). Without --general, the general side is these tasks only.")
@click.option("--domain-tasks", help="lm-eval tasks for the domain side (what the SFT is for).")
@click.option("--general-report-tasks", help="lm-eval tasks to report the choice on (general side).")
@click.option("--domain-report-tasks", help="lm-eval tasks to report the choice on (domain side).")
@lm_eval_options
@click.option("--no-cache", is_flag=True, help="Evaluate every task again even when a cached result exists.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Task result cache (default $XDG_CACHE_HOME/mergeback/eval).")
@click.option("--ray", metavar="[ADDRESS]", is_flag=False, flag_value="auto", default=None,
              help="Evaluate the candidates on Ray actors, each holding base and SFT once: --ray alone or auto "
                   "(ray.init(): RAY_ADDRESS or a running cluster), local (start one here), or an address "
                   "(10.0.0.1:6379, ray://head:10001). Needs pip install 'mergeback[ray]'.")
@click.option("--workers", type=click.IntRange(1, 100_000),
              help="With --ray: actors (default: the cluster's GPUs / --gpus-per-worker, else CPUs / "
                   "--cpus-per-worker).")
@click.option("--gpus-per-worker", type=float, help="With --ray: GPUs per actor (evaluates on the GPU).")
@click.option("--cpus-per-worker", type=float, help="With --ray: CPUs per actor (default 1; its torch threads).")
@click.option("-v", "--verbose", is_flag=True, help="With --ray: one line per candidate and worker on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the final summary.")
@user_errors
def sweep(quiet, limit, batch_size, **kwargs):
    from .recover import sweep as run_sweep

    if limit is not None and limit >= 1:
        limit = int(limit) if limit == int(limit) else limit
    if kwargs["verbose"] and kwargs["ray"] is None:
        from .errors import InputError

        raise InputError("--verbose: prints each Ray worker's candidates; give --ray or drop it")
    result = run_sweep(command=_command_line(), echo=None if quiet else click.echo, limit=limit,
                       batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                       progress=not quiet and sys.stderr.isatty(), **kwargs)
    click.echo("")
    click.echo(result.summary())


@main.command(help="Show how far the SFT drifted from its base, without writing anything: per-tensor relative "
                   "delta ||D||/||W_base|| and cosine, a per-layer drift table (attention vs MLP), which tensors "
                   "would take SLERP's spherical branch at --t, added tokens, resized or tied embeddings, dtype "
                   "and config differences. Streams tensor by tensor in bounded memory.")
@click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model (or LoRA adapter folder)"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--t", "t", type=float, default=0.5, show_default=True, help="t for the SLERP branch report.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the per-layer drift.")
@click.option("--top", type=int, default=10, show_default=True, help="How many tensors to list.")
@user_errors
def inspect(sft, base, t, plot, top):
    from .diagnostics import inspect as run_inspect

    report = run_inspect(sft, base, t=t, plot=plot)
    click.echo(report.report(top=top))
    if plot:
        click.echo(f"plot -> {plot}")


@main.command(help="The recovery story on a tiny shipped base/SFT pair (offline, under a minute): sweep 11 values "
                   "of t, print the forgetting and recovery table, write the recovered model and a trade-off plot.")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), default="mergeback-demo", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing demo folder.")
@user_errors
def demo(out, force):
    from .demo import run_demo

    result = run_demo(out, force=force, echo=click.echo)
    click.echo("")
    click.echo(result.summary())
    click.echo(f"\neverything is in {result.out.parent}: recovered/ (the model; its README.md has the Recovery "
               "table), tradeoff.png, sweep.json")



@main.command("evaluate", help="Evaluate written models (folders, Hub ids, aliases; e.g. a mergekit output) on "
                               "lm-evaluation-harness tasks and print each task's primary metric, "
                               "general_recovered = (G_m - G_sft)/(G_base - G_sft) and domain_retained = "
                               "(D_m - D_base)/(D_sft - D_base) when --base and --sft are given, and per-item "
                               "forgetting (general: against the base; domain: against the SFT). Tasks: "
                               "comma-separated task or group names, task YAML files or folders. Needs "
                               "`pip install mergeback[eval]`.")
@click.argument("models", nargs=-1)
@click.option("--general-tasks", help="General tasks (what the SFT may have forgotten), comma-separated.")
@click.option("--domain-tasks", help="Domain tasks (what the SFT is for), comma-separated.")
@click.option("--base", help=MODEL_REF_HELP.format("The base model (reference; also evaluated)"))
@click.option("--sft", help=MODEL_REF_HELP.format("The SFT model (reference; also evaluated)"))
@lm_eval_options
@click.option("--holdout", type=float, help="Score only the report part of each task: the documents whose "
                                            "content hash puts them in this fraction (as `merge sweep`).")
@click.option("--no-cache", is_flag=True, help="Evaluate again even when a cached result exists.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Result cache (default $XDG_CACHE_HOME/mergeback/eval).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), help="CPU threads for evaluation (default: torch's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
@user_errors
def evaluate(models, limit, batch_size, json_out, **kwargs):
    import json
    from pathlib import Path

    import merge

    if limit is not None and limit >= 1:
        limit = int(limit) if limit == int(limit) else limit
    result = merge.evaluate(models, limit=limit, batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                            echo=click.echo, **kwargs)
    click.echo("")
    click.echo(result.table())
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_dict(), indent=2))


def _as_adapter(method, sft, base, t, quiet, options) -> None:
    """``--as-adapter`` on linear/slerp: the merge options other than -o/--force have no effect there."""
    from .adapters import interpolate_adapter
    from .errors import InputError

    ctx = click.get_current_context()
    given = [k for k in options if k not in ("out", "force")
             and ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} has no effect with --as-adapter (it writes only the "
                         "adapter files); drop it")
    summary = interpolate_adapter(sft, base, t, options.get("out"), method=method, force=options.get("force"))
    _report(summary, quiet)


@main.command("extract-lora", help=(
    "Write a PEFT LoRA adapter approximating the SFT's delta D = W_sft - W_base: per targeted 2-D weight the "
    "rank-r truncated SVD, (lora_alpha/r) * B@A = U_r diag(s_r) V_r^T; changed biases of targeted modules as "
    "lora_B.bias (exact); changed embeddings, lm_head and norms saved whole (modules_to_save). Anything else "
    "that changed is refused by name unless --allow-uncaptured. Streamed one tensor at a time; the summary "
    "gives each tensor's captured share ||D_r||/||D|| and the error per tensor kind."))
@click.option("--sft", required=True, help=MODEL_REF_HELP.format("Fine-tuned model (or LoRA adapter folder)"))
@click.option("--base", required=True, help=BASE_REF_HELP)
@click.option("--rank", "-r", type=int, required=True, help="LoRA rank r (>= 1).")
@click.option("--alpha", type=float, help="lora_alpha (default: r, so the scale alpha/r is 1).")
@click.option("--target-modules", help="Comma-separated module names to factor (default: every 2-D attention, MLP "
                                       "and router weight in the layer stack), e.g. q_proj,v_proj.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
              help="dtype of the adapter tensors (default: the SFT's).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="SVD algorithm: auto picks randomized when r is small against the matrix.")
@click.option("--allow-uncaptured", is_flag=True, help="Write the adapter even if some changed tensors cannot be "
                                                      "in it (listed in the summary with their error).")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output adapter folder.")
@click.option("--force", is_flag=True, help="Replace an earlier mergeback output at OUT (never other files).")
@click.option("-v", "--verbose", is_flag=True, help="Print the captured share of every tensor.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@user_errors
def extract_lora(sft, base, rank, alpha, target_modules, dtype, svd, allow_uncaptured, out, force, verbose, quiet):
    from .adapters import extract_lora as run_extract

    targets = [m for m in target_modules.split(",") if m.strip()] if target_modules is not None else None
    if targets == []:
        from .errors import InputError

        raise InputError("--target-modules: give at least one module name, e.g. q_proj,v_proj")
    summary = run_extract(sft, base, out, rank=rank, alpha=alpha, target_modules=targets, dtype=dtype, svd=svd,
                          allow_uncaptured=allow_uncaptured, force=force)
    if not quiet:
        click.echo(summary.report(verbose=verbose))


if __name__ == "__main__":
    main()
