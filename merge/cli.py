"""The ``merge`` command line: a thin wrapper over the Python API (``merge.merge``, ``merge.run``)."""

from __future__ import annotations

import functools
import shlex
import sys

import click

from . import __version__
from .errors import MergeError

T_CONVENTION = ("t is the share of the BASE model: t=0 keeps the SFT unchanged, t=1 gives the base; "
                "--t 0.3 is roughly 0.7*SFT + 0.3*base. Values outside [0,1] extrapolate (with a warning).")


def _command_line() -> str:
    """The invoked command with its explicitly given options, for the model card."""
    ctx = click.get_current_context()
    parts = ["merge", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if value in (None, False, ()) or source != click.core.ParameterSource.COMMANDLINE:
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            parts.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def _resume_command() -> str:
    """The command that was run, with --resume."""
    try:
        command = _command_line()
    except RuntimeError:  # no click context
        command = "merge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return command if " --resume" in command else command + " --resume"


def user_errors(fn):
    """Turn our errors into one line on stderr and exit code 2; Ctrl-C into a short message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeError as e:
            extra = f"; continue with: {_resume_command()}" if getattr(e, "resumable", False) else ""
            click.echo(f"error: {e}{extra}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: the output folder was not touched; finished shards are kept - continue "
                       f"with: {_resume_command()}", err=True)
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
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
                     help="Output dtype (default: the SFT's)."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, transformers' syntax (5GB, 500MB, 2GiB)."),
        click.option("--force", is_flag=True, help="Replace an existing output folder."),
        click.option("--threads", type=click.IntRange(1, 64), help="Worker threads (default: cores, at most 4)."),
        click.option("--dry-run", is_flag=True, help="Validate and plan without writing anything."),
        click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run into the same OUT, reusing its verified finished shards."),
        click.option("--check-finite", is_flag=True, help="Fail if any output tensor has NaN or Inf."),
        click.option("-v", "--verbose", is_flag=True, help="Print one line per finished tensor on stderr."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _report(summary, quiet: bool) -> None:
    for w in summary.warnings:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        click.echo(summary.report())


def _merge(quiet: bool, **kwargs) -> None:
    import warnings

    from . import api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are part of the summary, printed once below
        summary = api.merge(progress=not quiet and sys.stderr.isatty(), command=_command_line(), **kwargs)
    _report(summary, quiet)


@click.group(help=f"mergeback: recover what fine-tuning forgot by merging the SFT back with its base.\n\n{T_CONVENTION}")
@click.version_option(__version__, prog_name="mergeback")
def main() -> None:
    pass


@main.command(help=f"Linear interpolation: W = (1-t)*W_sft + t*W_base.\n\n{T_CONVENTION}")
@click.option("--sft", required=True, help="Fine-tuned model folder.")
@click.option("--base", required=True, help="Base model folder.")
@click.option("--t", "t", type=float, required=True, help="Share of the base, 0..1.")
@merge_options
@user_errors
def linear(sft, base, t, quiet, **kwargs):
    _merge(quiet, method="linear", sft=sft, base=base, t=t, **kwargs)


@main.command(help="Spherical interpolation per tensor, from the SFT (t=0) to the base (t=1), on the raw "
                   "flattened tensors: W = sin((1-t)θ)/sin θ * W_sft + sin(tθ)/sin θ * W_base, θ the angle "
                   "between them; linear when |cos θ| > 0.9995 (typical for small SFT deltas).\n\n"
                   f"{T_CONVENTION}")
@click.option("--sft", required=True, help="Fine-tuned model folder.")
@click.option("--base", required=True, help="Base model folder.")
@click.option("--t", "t", type=float, required=True, help="Share of the base, 0..1.")
@merge_options
@user_errors
def slerp(sft, base, t, quiet, **kwargs):
    _merge(quiet, method="slerp", sft=sft, base=base, t=t, **kwargs)


@main.command("task-arithmetic", help=(
    "Task arithmetic: W = W_base + sum_i s_i * sparsify(W_sft_i - W_base).\n\n"
    "A single SFT with --scale 1-t equals linear interpolation with t; scale > 1 extrapolates (ExPO). "
    "--sparsify magnitude keeps the largest --density fraction of each delta (TIES trimming); random drops "
    "entries with probability 1-density and rescales survivors (DARE); breadcrumbs drops the largest --gamma "
    "and the smallest entries. --sign-consensus elects signs across several SFTs (TIES)."))
@click.option("--base", required=True, help="Base model folder.")
@click.option("--sft", "sfts", multiple=True, required=True, help="Fine-tuned model folder (repeatable).")
@click.option("--scale", "scales", type=float, multiple=True, required=True,
              help="Scale of each delta: one for all SFTs or one per --sft.")
@click.option("--sparsify", type=click.Choice(["magnitude", "random", "breadcrumbs"]))
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), help="Fraction of each delta kept.")
@click.option("--gamma", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="breadcrumbs: fraction of largest entries dropped.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random dropping.")
@click.option("--sign-consensus", is_flag=True, help="TIES sign election across several SFTs.")
@merge_options
@user_errors
def task_arithmetic(base, sfts, scales, quiet, **kwargs):
    scale = list(scales) if len(scales) > 1 else scales[0]
    _merge(quiet, method="task_arithmetic", sft=list(sfts), base=base, scale=scale, **kwargs)


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
        summary = api.fold(adapter, base, progress=not quiet and sys.stderr.isatty(), command=_command_line(),
                           **kwargs)
    _report(summary, quiet)



@main.command(help="Check a model folder: the index against the shard files, every safetensors header, and that "
                   "sizes add up; --load also loads it with transformers and runs one forward pass.")
@click.argument("folder", type=click.Path())
@click.option("--load", is_flag=True, help="Also load with transformers and run a forward pass.")
@user_errors
def verify(folder, load):
    from .verify import verify as verify_folder

    click.echo(str(verify_folder(folder, load=load)))


if __name__ == "__main__":
    main()
