"""A recipe's inputs, from references to open tensor sources: resolve every model (folders, Hub ids, aliases,
``base: auto``), then open each lazily (FP8 dequantised, LoRA adapters computed over the base, Hub weights
still pending read from their headers). Merge, inspect and sweep all start here (:func:`open_inputs`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .io import output
from .io.lora import LoraAdapter, is_adapter
from .io.quantized import open_checkpoint
from .io.resolve import ResolvedModel, resolve_model
from .keys import BASE, input_label, sft_key
from .recipes.schema import Recipe


@dataclass
class Inputs:
    """The resolved inputs of a recipe by key (``base`` first, then ``sft0``...), how messages name them,
    their open tensor sources, and notes on what was inferred (``base: auto``)."""

    resolved: dict[str, ResolvedModel]
    labels: dict[str, str]
    models: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def open_inputs(recipe, stack: ExitStack, *, token=None, progress: bool = False, weights: bool = True,
                out: Path | None = None) -> Inputs:
    """Resolve and open every input of ``recipe`` (ours or mergekit's); ``stack`` closes them.

    ``out`` (the output folder about to be written) must not be, or lie inside, any resolved input; it is
    checked before anything is opened. ``weights=False`` leaves Hub weights pending (see
    :func:`download_weights`).
    """
    resolved, notes = resolve_inputs(recipe, token=token, progress=progress, weights=weights)
    labels = {k: input_label(k, m.ref) for k, m in resolved.items()}
    if out is not None:
        output.check_target(out, {labels[k]: m.path for k, m in resolved.items()})
    models = {k: stack.enter_context(open_model(m, labels[k], resolved, token=token)) for k, m in resolved.items()}
    return Inputs(resolved, labels, models, notes)


def resolve_inputs(recipe: Recipe, *, token=None, progress: bool = False, weights: bool = True
                   ) -> tuple[dict, list[str]]:
    """Every input of ``recipe`` as a :class:`ResolvedModel` (base first), and notes on what was inferred.

    ``base: auto`` takes the base each SFT names in its metadata (:func:`infer_base`); they must agree.
    ``weights=False`` leaves Hub weights pending (:func:`open_model` reads their headers, :func:`download_weights`
    fetches them).
    """
    from .io.resolve import check_distinct, infer_base

    if not isinstance(recipe, Recipe):  # a mergekit recipe: its models by key, nothing inferred
        from .io.resolve import resolve_reference

        refs = recipe.input_refs()
        resolved = {k: resolve_reference(ref, "base_model" if k == BASE else "model", token=token, progress=progress,
                                         weights=weights)
                    for k, ref in refs.items()}
        check_distinct(resolved)
        return resolved, [f"mergekit ignores {k} (so does this run)" for k in recipe.unknown_keys()]
    sfts = {sft_key(i): resolve_model(s.model, "SFT", token=token, progress=progress, weights=weights)
            for i, s in enumerate(recipe.sft)}
    notes = []
    base_ref = recipe.base
    if base_ref.strip().lower() == "auto":
        found = {sft.ref: infer_base(sft) for sft in sfts.values()}
        names = {ref for ref, _ in found.values()}
        if len(names) > 1:
            listing = ", ".join(f"{sft} -> {ref}" for sft, (ref, _) in found.items())
            raise InputError(f"--base auto: the SFTs name different bases ({listing}); pass --base")
        base_ref, source = next(iter(found.values()))
        notes.append(f"base: auto chose {base_ref} (from the SFT's {source})")
    base = resolve_model(base_ref, "base", token=token, progress=progress, weights=weights)
    check_distinct({BASE: base, **sfts})
    return {BASE: base, **sfts}, notes


def open_model(resolved: ResolvedModel, label: str, all_resolved: dict, *, token=None):
    """A lazily-read tensor source for one input; a LoRA adapter folder is computed over the recipe's base.

    A Hub model whose weights are still pending opens from their headers alone (for planning, not reading).
    """
    if resolved.lora is not None:  # mergekit's model+adapter: the adapter folded over its own model
        from dataclasses import replace

        model = replace(resolved, lora=None)
        return LoraAdapter(resolved.lora.path, _checkpoint(model, label, token) if model.pending else model.path,
                           role=label)
    base = all_resolved.get(BASE)
    if resolved is not base and is_adapter(resolved.path):
        if base is None:
            raise InputError(f"{label}: is a LoRA adapter folder; give the model it was trained on as the base")
        return LoraAdapter(resolved.path, _checkpoint(base, "base", token) if base.pending else base.path,
                           role=label)
    return _checkpoint(resolved, label, token)


def _checkpoint(resolved: ResolvedModel, label: str, token):
    """The input's checkpoint (FP8 dequantised, other quantised formats refused); with weights pending on the
    Hub, a view of their headers (read remotely)."""
    if not resolved.pending:
        return open_checkpoint(resolved.path, role=label)
    from .hub import read_headers
    from .io.remote import HeaderCheckpoint

    headers = read_headers(resolved.repo_id, resolved.revision, resolved.pending, label, token=token)
    return open_checkpoint(resolved.path, role=label,
                           checkpoint=HeaderCheckpoint(resolved.path, headers, role=label))


def input_views(recipe, models: dict, labels: dict) -> dict:
    """The models as the recipe reads them: a mergekit recipe's frankenmerge slices and ``tokenizer_source``
    reshape its inputs (:func:`merge.recipes.mergekit_inputs.views`); other recipes read them as they are."""
    from .recipes.mergekit_inputs import views

    return views(recipe, models, labels)


def download_weights(resolved: dict, models: dict, labels: dict, stack: ExitStack, *, token=None,
                     progress: bool = False) -> tuple[dict, dict]:
    """Download the pending Hub weights of a planned merge and reopen the models planned from their headers.

    Each reopened model must hold the tensors its headers announced, so the plan stays valid.
    """
    from .io.remote import same_tensors
    from .io.resolve import fetch_pending

    if not any(m.pending for m in resolved.values()):
        return resolved, models
    fetched = {k: fetch_pending(m, labels[k], token=token, progress=progress) for k, m in resolved.items()}
    reopened = dict(models)
    for k, m in resolved.items():
        base_pending = isinstance(models[k], LoraAdapter) and BASE in resolved and bool(resolved[BASE].pending)
        if m.pending or base_pending:
            reopened[k] = stack.enter_context(open_model(fetched[k], labels[k], fetched))
            same_tensors(models[k], reopened[k], labels[k])
    return fetched, reopened
