"""Model references -> local folders. A reference is a local folder, a Hub repo id with an optional
``@revision`` (branch, tag or commit), or an alias from :mod:`merge.io.aliases` (``llama3``).

A folder that exists wins over a Hub id of the same spelling. Hub models are fetched into the standard
Hugging Face cache (:func:`merge.hub.fetch`) and pinned as ``repo@commit``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import InputError


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference led: the local folder, and for Hub models the repo id and exact commit."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    # Weight files of the pinned commit not downloaded yet (``resolve_model(weights=False)``): the model is
    # opened from their headers (:class:`merge.io.remote.HeaderCheckpoint`) until :func:`fetch_pending`.
    pending: tuple[str, ...] = ()
    lora: ResolvedModel | None = None  # mergekit's ``model+adapter``: this LoRA adapter folded over the model

    @property
    def pinned(self) -> str:
        """How the card and the recipe name this input: repo@commit for Hub models, else the absolute path
        (``model+adapter`` with both pinned for a mergekit LoRA reference)."""
        own = (f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id) if self.repo_id else str(self.path)
        return f"{own}+{self.lora.pinned}" if self.lora is not None else own


def resolve_model(ref: str, role: str, *, token=None, progress: bool = False, weights: bool = True) -> ResolvedModel:
    """The local folder for ``ref`` (downloading Hub models); ``role`` names it in errors ("base", "SFT").

    ``token`` is for private Hub repos (default: HF_TOKEN or the cached login); ``progress`` shows download bars.
    ``weights=False`` pins a Hub model and downloads its config, index and tokenizer files only; its
    safetensors weights stay ``pending`` (see :func:`fetch_pending`).
    """
    from .. import hub
    from .aliases import load_aliases

    ref = str(ref).strip()
    label = f"{role} {ref}"
    if not ref:
        raise InputError(f"{role}: empty model reference; give a folder, a Hub repo id or an alias")
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(ref, path.resolve())
    if path.exists():
        if path.suffix == ".gguf":
            from .quantized import refuse_unsupported

            refuse_unsupported(path, role, {})
        raise InputError(f"{label}: expected a model folder, got a file")
    if ref.startswith(("/", "./", "../", "~", ".")) or ref.count("/") > 1:
        raise InputError(f"{label}: no such folder")
    name, revision = hub.split_revision(ref, label)
    alias = load_aliases().get(name)
    if alias is not None:
        target = Path(alias.target).expanduser()
        if target.is_dir() and revision is None:
            return ResolvedModel(ref, target.resolve())
        name, alias_revision = hub.split_revision(alias.target, f"{label} (alias {alias.name}, {alias.source})")
        revision = revision or alias_revision
        if not hub.is_repo_id(name):
            raise InputError(f"{label}: alias {alias.name!r} ({alias.source}) points to {alias.target!r}, which is "
                             "neither a folder nor a Hub repo id; fix the alias file")
        label = f"{label} (alias of {name})"
    elif not hub.is_repo_id(name):
        raise InputError(f"{label}: no such folder, alias or Hub repo id; give a model folder, a Hub id like "
                         "org/name[@revision], or an alias (`merge aliases` lists them)")
    folder, commit, pending = hub.fetch(name, revision, label, token=token, progress=progress, weights=weights)
    return ResolvedModel(ref, folder, name, commit, pending)


def resolve_reference(ref: str, role: str, *, token=None, progress: bool = False, weights: bool = True
                      ) -> ResolvedModel:
    """:func:`resolve_model`, and for mergekit's ``MODEL+LORA`` references the adapter folder too (``lora``)."""
    from dataclasses import replace

    from .lora import is_adapter

    if "+" not in str(ref):
        return resolve_model(ref, role, token=token, progress=progress, weights=weights)
    model_ref, adapter_ref = str(ref).split("+", 1)
    model = resolve_model(model_ref, role, token=token, progress=progress, weights=weights)
    adapter = resolve_model(adapter_ref, f"{role} LoRA", token=token, progress=progress)
    if not is_adapter(adapter.path):
        raise InputError(f"{role} {ref}: {adapter_ref} is not a LoRA adapter folder (no adapter_config.json); "
                         "write MODEL+ADAPTER_FOLDER")
    return replace(model, ref=str(ref), lora=adapter)


def fetch_pending(model: ResolvedModel, label: str, *, token=None, progress: bool = False) -> ResolvedModel:
    """``model`` with its pending weight files downloaded (from the pinned commit) into its snapshot folder."""
    from dataclasses import replace

    from .. import hub

    if not model.pending:
        return model
    hub.fetch_files(model.repo_id, model.revision, model.pending, label, token=token, progress=progress)
    return replace(model, pending=())


def check_distinct(resolved: dict[str, ResolvedModel]) -> None:
    """Every input is a different model: two references that lead to the same folder are an error naming both."""
    seen: dict = {}
    for key, model in resolved.items():
        where = Path(model.path).resolve()
        if model.lora is not None:
            where = (where, Path(model.lora.path).resolve())
        if where in seen:
            first = seen[where]

            def name(k):
                return f"{'base' if k == 'base' else 'SFT'} {resolved[k].ref}"

            raise InputError(f"{name(first)} and {name(key)} are the same model ({where}); each input must be a "
                             "different model (give the SFT and the base it was fine-tuned from, each once)")
        seen[where] = key


# ---- --base auto ---------------------------------------------------------------------------------------


def infer_base(sft: ResolvedModel) -> tuple[str, str]:
    """The base an SFT folder says it came from, and where it says so.

    Looks, in order, at ``adapter_config.json`` ``base_model_name_or_path`` (PEFT), the model card's
    ``base_model`` (one entry), and ``config.json`` ``_name_or_path``; a candidate must be an existing
    folder or a Hub repo id, and not the SFT itself.
    """
    folder = sft.path
    candidates = [
        (_json_field(folder / "adapter_config.json", "base_model_name_or_path"),
         "adapter_config.json base_model_name_or_path"),
        (_card_base_model(folder / "README.md"), "README.md base_model"),
        (_json_field(folder / "config.json", "_name_or_path"), "config.json _name_or_path"),
    ]
    for value, source in candidates:
        if _usable_base(value, sft):
            return value.strip(), source
    raise InputError(f"--base auto: cannot tell the base of SFT {sft.ref} (no usable base_model_name_or_path in "
                     "adapter_config.json, base_model in README.md or _name_or_path in config.json); pass --base")


def _usable_base(value, sft: ResolvedModel) -> bool:
    from ..hub import is_repo_id

    if not isinstance(value, str) or not value.strip():
        return False
    value = value.strip()
    if value in (sft.ref, sft.repo_id, str(sft.path)):
        return False
    path = Path(value).expanduser()
    if path.is_dir():
        return path.resolve() != sft.path.resolve()
    return is_repo_id(value.partition("@")[0])


def _json_field(path: Path, key: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _card_base_model(path: Path):
    """``base_model`` of a model card's YAML front matter when it names exactly one model."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    front, sep, _ = text[3:].partition("\n---")
    if not sep:
        return None
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return None
    value = meta.get("base_model") if isinstance(meta, dict) else None
    if isinstance(value, list):
        return value[0] if len(value) == 1 else None
    return value
