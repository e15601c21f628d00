"""How a mergekit recipe reads its inputs and writes its tokenizer: frankenmerge slices, ``tokenizer_source``
and ``chat_template`` with mergekit 0.1.5's semantics (see docs/mergekit-semantics.md).

:func:`views` wraps the open models (:mod:`merge.io.views`) before planning; :func:`finish_tokenizer` writes the
output's tokenizer files after the weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..dtypes import OUTPUT_DTYPES as DTYPES
from ..errors import InputError
from ..io.output import SIDE_FILES
from ..io.views import LayerMapped, VocabMapped, layered_config, permutation, row_sources
from ..tensor_names import Structure, num_layers
from .mergekit import MergekitRecipe, named_chat_template, output_layers, output_ranges

TOKENIZER_FILES = tuple(n for n in SIDE_FILES if n not in ("generation_config.json", "preprocessor_config.json"))


def views(recipe: MergekitRecipe, models: dict, labels: dict) -> dict:
    """``models`` (by key) as the recipe reads them: vocabulary rows in the output tokenizer's order when
    ``tokenizer_source`` is set, the layer stack rebuilt when slices reorder, repeat or drop layers (other
    recipes: ``models`` as they are)."""
    if not isinstance(recipe, MergekitRecipe):
        return models
    if recipe.chat_template is not None or recipe.tokenizer_source not in (None, "base"):
        if _tokenizer_folder(recipe, models) is None:
            option = "chat_template" if recipe.tokenizer_source in (None, "base") else "tokenizer_source"
            raise InputError(f"{option}: the output would have no tokenizer (the tokenizer's model has no "
                             "tokenizer_config.json, tokenizer.json or tokenizer.model); add its tokenizer files or "
                             f"remove {option}")
    out = dict(models)
    if recipe.tokenizer_source is not None:
        out = _vocab_views(recipe, out, labels)
    given = output_layers(recipe)
    if given is not None:
        out = _layer_views(recipe, out, labels, given)
    return out


def _layer_views(recipe: MergekitRecipe, models: dict, labels: dict, given: dict[str, dict[int, int]]) -> dict:
    """The slices' layer stack (``given``: per model reference, output layer -> its input layer). Each model is
    read through a :class:`LayerMapped` giving the output layers its slices take from it; the primary's view
    presents every output layer (another model's through that model's view), and the tensors after the layers
    as the last slice's model has them, so that the planner, which takes the output's names, shapes and dtypes
    from the primary, plans the whole stack as mergekit does. No views where the slices tile the layers in
    order with every model in each."""
    keys, primary = recipe.keys(), recipe.primary
    structure = Structure.of(models[primary].config, models[primary].names())
    if len(structure.layered) > 1:
        raise InputError("slices: the models have several layer stacks (" + ", ".join(
            f"{s} {structure.counts[s]} layers" for s in structure.layered) + "); mergekit refuses slices there "
            "too: use models:")
    counts = {k: num_layers(m.config or {}, m.names()) for k, m in models.items()}
    _check_ranges(recipe, counts, labels)
    by_key = {keys[ref]: layers for ref, layers in given.items()}
    total = output_ranges(recipe)[-1][1]
    in_place = {o: o for o in range(total)}
    if all(layers == in_place for layers in by_key.values()) and set(counts.values()) == {total}:
        return models  # slices that tile the layers in order, every model in each: the models as they are
    for k in models:
        if k not in by_key:
            raise InputError(f"slices: {labels[k]} is not a source of the slices, so it has no layers for the "
                             "output's rebuilt stack; list it in the slices")
    giver = {}  # output layer -> a model that gives it
    for k, layers in by_key.items():
        for o in layers:
            giver.setdefault(o, k)

    def stack_config(k: str) -> dict:
        """The output stack's config as model ``k`` sees it: per-layer lists from each layer's model."""
        takes = [k if o in by_key[k] else giver[o] for o in range(total)]
        return layered_config(models[k].config, [by_key[t][o] for o, t in enumerate(takes)],
                              [models[t].config for t in takes])

    out = dict(models)
    for k in models:
        if k != primary:
            out[k] = LayerMapped(models[k], [by_key[k].get(o) for o in range(total)], labels[k],
                                 config=stack_config(k))
    lent = {o: out[giver[o]] for o in range(total) if o not in by_key[primary]}
    last = [keys[src.model] for src in recipe.slices[-1].sources]  # the final norm and lm_head come from these
    tail = out[last[0]] if primary not in last else None
    out[primary] = LayerMapped(models[primary], [by_key[primary].get(o) for o in range(total)], labels[primary],
                               lent=lent, tail=tail, config=stack_config(primary))
    return out


def _check_ranges(recipe: MergekitRecipe, counts: dict[str, int], labels: dict) -> None:
    """Every source's layer_range within its model's layers."""
    keys = recipe.keys()
    for i, s in enumerate(recipe.slices):
        for j, src in enumerate(s.sources):
            start, stop = src.layer_range
            have = counts[keys[src.model]]
            if stop > have:
                raise InputError(f"slices.{i}.sources.{j}.layer_range: [{start}, {stop}) reads layer {stop - 1} of "
                                 f"{labels[keys[src.model]]}, which does not exist (it has {have} layers, "
                                 f"0..{have - 1}); fix the layer_range")


def view_notes(models: dict, labels: dict) -> list[str]:
    """Summary lines saying how the views reshape the inputs (layer stacks, vocabulary rows)."""
    notes = []
    for k, m in models.items():
        if isinstance(m, LayerMapped):
            own = [(o, j) for o, j in enumerate(m.layers) if j is not None]
            if len(own) == len(m.layers):
                notes.append(f"slices: {labels[k]}: the output's {len(m.layers)} layers read its layers "
                             f"{', '.join(map(str, m.layers))}")
            else:
                notes.append(f"slices: {labels[k]}: output layers {', '.join(str(o) for o, _ in own)} (of "
                             f"{len(m.layers)}) read its layers {', '.join(str(j) for _, j in own)}")
        inner = m.inner if isinstance(m, LayerMapped) else m
        if isinstance(inner, VocabMapped):
            filled = sum(r < 0 for r in inner.rows.own)
            notes.append(f"tokenizer_source: {labels[k]}: {len(inner.rows.own)} vocabulary rows in the output "
                         f"tokenizer's order by token string, {filled} filled as mergekit does (tokens it lacks)")
    return notes


# -- vocabulary -----------------------------------------------------------------------------------------------
def _vocab_of(folder: Path, label: str) -> dict[str, int] | None:
    """Token string -> id of the tokenizer in ``folder`` (as transformers loads it), None without one."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as e:  # noqa: BLE001  (any tokenizer that does not load)
        raise InputError(f"{label}: its tokenizer in {folder} does not load ({type(e).__name__}: {e})") from None


def _vocab_size(config: dict) -> int | None:
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


def _folder(model) -> Path:
    return Path(model.side_files_path)


def _vocab_views(recipe: MergekitRecipe, models: dict, labels: dict) -> dict:
    """mergekit's ``BuildTokenizer`` + ``PermutedVocabulary`` for ``tokenizer_source: base | MODEL``."""
    keys = recipe.keys()
    primary = recipe.primary
    sizes = {k: _vocab_size(m.config) for k, m in models.items()}
    vocabs = {k: _vocab_of(_folder(m), labels[k]) for k, m in models.items()}
    if vocabs[primary] is None:
        raise InputError(f"tokenizer_source: {labels[primary]} has no tokenizer files; mergekit needs its tokenizer")
    for k in models:
        if sizes[k] is None:
            raise InputError(f"tokenizer_source: {labels[k]} config.json has no vocab_size")
    # base_model (else the first model) is "stripped" to its vocab_size; a model without a tokenizer is assumed
    # to share the base's, as mergekit does
    base_vocab = {t: i for t, i in vocabs[primary].items() if i < sizes[primary]}
    if recipe.tokenizer_source == "base" and len(base_vocab) != len(vocabs[primary]):
        raise InputError(f"tokenizer_source: base: the tokenizer of {labels[primary]} has ids past its vocab_size "
                         f"{sizes[primary]}; mergekit would rewrite it, mergeback does not (use a model whose "
                         "tokenizer fits its embeddings)")
    source = primary if recipe.tokenizer_source == "base" else keys[recipe.tokenizer_source]
    out_vocab = base_vocab if source == primary else vocabs[source]
    gathered = [keys[r] for r in (recipe.model_refs() if recipe.models is not None else recipe.source_refs())]
    perms = {}
    for k in gathered:
        vocab = base_vocab if k == primary else (vocabs[k] if vocabs[k] is not None else base_vocab)
        perms[k] = permutation(out_vocab, vocab, sizes[k], labels[k])
    if all(p == list(range(len(out_vocab))) and sizes[k] == len(out_vocab) for k, p in perms.items()):
        return models  # every input already in the output tokenizer's order: nothing to map
    rows = row_sources(perms, "base" if "base" in perms else None)
    working = DTYPES[recipe.working_dtype] if recipe.working_dtype else None
    out = dict(models)
    for k in gathered:
        out[k] = VocabMapped(models[k], k, rows[k], {g: models[g] for g in gathered}, sizes[k], working)
    return out


# -- tokenizer files ------------------------------------------------------------------------------------------
def _tokenizer_folder(recipe: MergekitRecipe, models: dict) -> Path | None:
    """Where the output's tokenizer comes from: tokenizer_source's model, else the primary (None: no files)."""
    key = recipe.keys()[recipe.tokenizer_source] if recipe.tokenizer_source not in (None, "base") else recipe.primary
    folder = _folder(models[key])
    has = any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
    return folder if has else None


def chat_template_text(recipe: MergekitRecipe, models: dict) -> str | None:
    """The template mergekit writes: a shipped name's text, the literal jinja, or for ``auto`` the most common
    template among the inputs (None: no input has one; the tokenizer keeps its own)."""
    value = recipe.chat_template
    if value is None:
        return None
    if value != "auto":
        return named_chat_template(value) or value
    found = [t.strip() for t in (_template_of(_folder(m)) for m in models.values()) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def _template_of(folder: Path) -> str | None:
    """A folder's chat template as transformers reads it: chat_template.jinja, else tokenizer_config.json's
    ``chat_template`` (a named list: its ``default``)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(value, list):
        value = next((e.get("template") for e in value if e.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def finish_tokenizer(recipe: MergekitRecipe, stage: Path, models: dict) -> None:
    """The output's tokenizer files: tokenizer_source's model's (else the copied primary's), and the chat
    template written as transformers 5 saves it (``chat_template.jinja``; none left in tokenizer_config.json).
    Other recipes: nothing (the primary's copied files stay)."""
    if not isinstance(recipe, MergekitRecipe):
        return
    folder = _tokenizer_folder(recipe, models)
    if folder is None:
        return
    if recipe.tokenizer_source not in (None, "base"):
        for name in TOKENIZER_FILES:
            (stage / name).unlink(missing_ok=True)
            if (folder / name).is_file():
                (stage / name).write_bytes((folder / name).read_bytes())
    template = chat_template_text(recipe, models)
    if template is None:
        return
    config = stage / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (stage / "chat_template.json").unlink(missing_ok=True)
    (stage / "chat_template.jinja").write_text(template, encoding="utf-8")
