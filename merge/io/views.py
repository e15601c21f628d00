"""Read-side views of an input, for mergekit recipe features that reshape what a model offers.

- :class:`LayerMapped` (frankenmerge ``slices``): output layer ``o`` reads the input's layer ``layers[o]``;
  the names, and the config's layer count and per-layer lists, are the output's.
- :class:`VocabMapped` (``tokenizer_source``): vocabulary tensors (embeddings, lm_head) in the output
  tokenizer's token order, each row gathered by token string (mergekit 0.1.5's ``PermutedVocabulary``).

Both are :class:`~merge.plan.TensorSource` s that read lazily, a chunk at a time, from the model they wrap;
the planner and executor see ordinary models. They forward every other attribute to the wrapped model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import InputError
from ..tensor_names import _LAYER, group_of, layer_index
from .safetensors_file import TensorInfo

PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config lists with one entry per layer
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class _View:
    """Forwards everything it does not override to the wrapped model ``inner``."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, attr):
        if attr == "read_into":  # only where the view's names read the wrapped model's bytes unchanged
            return self._read_into()
        if attr == "changes":  # a LoRA adapter's "differs from its base", by the view's names
            return self._changes()
        return getattr(self.inner, attr)

    def _read_into(self):
        raise AttributeError("read_into")

    def _changes(self):
        raise AttributeError("changes")

    @property
    def reads_files(self) -> bool:
        """Whether ``read_into`` works: the view's names read the wrapped model's stored bytes unchanged."""
        try:
            self._read_into()
        except AttributeError:
            return False
        return True

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def rename_layer(name: str, index: int) -> str:
    """``model.layers.7.mlp.up_proj.weight`` with its layer index replaced by ``index``."""
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(index) + name[m.end(1):]


def layered_config(config: dict, layers: Sequence[int], sources: Sequence[dict] | None = None) -> dict:
    """``config`` for a stack of ``len(layers)`` layers, output layer ``o`` being layer ``layers[o]`` of the model
    whose config is ``sources[o]`` (default: ``config``'s own model for every layer): the layer count set,
    per-layer lists (``layer_types``...) taken in that order (in ``text_config`` too). A list is left alone unless
    every source has it, one entry per layer."""
    sources = [config or {}] * len(layers) if sources is None else [s or {} for s in sources]

    def count_key(cfg: dict) -> str | None:
        return next((k for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)), None)

    def adjust(cfg: dict, level: Callable[[dict], dict]) -> dict:
        cfg = dict(cfg)
        count = count_key(cfg)
        if count is not None:
            cfg[count] = len(layers)
            for key in PER_LAYER_KEYS:
                lists = [level(s).get(key) for s in sources]
                counts = [level(s).get(count_key(level(s)) or count) for s in sources]
                if isinstance(cfg.get(key), list) and all(isinstance(v, list) and len(v) == n
                                                         for v, n in zip(lists, counts)):
                    cfg[key] = [v[j] for v, j in zip(lists, layers)]
        return cfg

    config = config or {}
    if isinstance(config.get("text_config"), dict) and not any(isinstance(config.get(k), int)
                                                               for k in LAYER_COUNT_KEYS):
        return dict(config, text_config=adjust(config["text_config"], lambda c: c.get("text_config") or {}))
    return adjust(config, lambda c: c)


class LayerMapped(_View):
    """``inner`` with its layer stack rebuilt: output layer ``o`` is the input's layer ``layers[o]``.

    In a frankenmerge whose slices take different models each model gives only its slices' output layers:
    ``layers[o]`` is None where another model gives layer ``o``, and the view lacks that layer, unless ``lent[o]``
    (the view of the model that gives it) is passed: then the view presents that layer too, read through the
    lender. The primary model's view is built so: its names are the output's, every layer from its slice's model.
    ``tail``: the view of the model the tensors after the layers come from (the last slice's, in mergekit: the
    final norm, lm_head), when it is another model; they are read through it. ``config``: the output stack's
    config (default :func:`layered_config` of ``inner``'s, for views that give every layer themselves).
    """

    def __init__(self, inner, layers: Sequence[int | None], label: str, lent: Mapping[int, LayerMapped] | None = None,
                 tail: LayerMapped | None = None, config: dict | None = None):
        super().__init__(inner)
        self.layers = list(layers)
        self.lent, self.tail = dict(lent or {}), tail
        names = inner.names()
        by_layer = _by_layer(names)
        have = len(by_layer)
        bad = [j for j in self.layers if j is not None and j not in by_layer]
        if bad:
            raise InputError(f"slices: layer {bad[0]} of {label} does not exist (it has {have} layers, 0..{have - 1}); "
                             "fix the layer_range")
        lent_names = {id(v): _by_layer(v.names()) for v in self.lent.values()}
        self._source: dict[str, tuple[object, str]] = {}  # output name -> (the model read, its name there)
        out: list[str] = []
        placed = False
        for n in names:
            if layer_index(n) is None:
                out.append(n)
                after = tail is not None and group_of(n) != "embed" and n in tail
                self._source[n] = (tail, n) if after else (inner, n)
            elif not placed:  # the new stack goes where the old one began
                placed = True
                for o, j in enumerate(self.layers):
                    if j is not None:
                        for src in by_layer[j]:
                            self._source[rename_layer(src, o)] = (inner, src)
                            out.append(rename_layer(src, o))
                    elif o in self.lent:
                        for dst in lent_names[id(self.lent[o])].get(o, []):
                            self._source[dst] = (self.lent[o], dst)
                            out.append(dst)
        self._names = out
        if config is None and None in self.layers:
            raise ValueError("a view that lacks some output layers needs the output stack's config")
        self.config = config if config is not None else layered_config(inner.config, self.layers)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def _where(self, name: str) -> tuple[object, str]:
        try:
            return self._source[name]
        except KeyError:
            raise KeyError(name) from None

    def source(self, name: str) -> str:
        """The name that output tensor ``name`` has in the model it is read from (the wrapped one, or a lender)."""
        return self._where(name)[1]

    def info(self, name: str) -> TensorInfo:
        model, src = self._where(name)
        return model.info(src)

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        model, src = self._where(name)
        return model.view(src, start, stop)

    def view_dtype(self, name: str) -> torch.dtype:
        model, src = self._where(name)
        return model.view_dtype(src)

    def _models(self) -> list:
        others = [*self.lent.values(), *([self.tail] if self.tail is not None else [])]
        return [self.inner, *{id(v): v for v in others}.values()]

    def _read_into(self):
        for model in self._models():
            model.read_into  # noqa: B018  (AttributeError when a model read computes its tensors)

        def read_into(name, start, out):
            model, src = self._where(name)
            return model.read_into(src, start, out)
        return read_into

    def _changes(self):
        for model in self._models():
            model.changes  # noqa: B018  (AttributeError unless every model read is a LoRA adapter)
        return lambda name: self._where(name)[0].changes(self._where(name)[1])

    def release(self, name: str) -> None:
        model, src = self._where(name)
        model.release(src)


def _by_layer(names: Sequence[str]) -> dict[int, list[str]]:
    """Names by layer index, in order (names outside the layers left out)."""
    out: dict[int, list[str]] = {}
    for n in names:
        if (i := layer_index(n)) is not None:
            out.setdefault(i, []).append(n)
    return out


# -- vocabulary -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSources:
    """Where each output row of one model's vocabulary tensors comes from: ``own[r]`` its own row (or -1);
    otherwise ``fill[r]`` = ((model key, row), ...) averaged (one entry: that row; none: zeros)."""

    own: tuple[int, ...]
    fill: Mapping[int, tuple[tuple[str, int], ...]]


def permutation(out_vocab: Mapping[str, int], vocab: Mapping[str, int], vocab_size: int, label: str
                ) -> list[int]:
    """Per output token id, the model's row for that token string (-1 when its tokenizer lacks it)."""
    p = [-1] * len(out_vocab)
    for tok, new in out_vocab.items():
        old = vocab.get(tok)
        if old is None:
            continue
        if old >= vocab_size:
            raise InputError(f"{label}: token {tok!r} has id {old} but the model has {vocab_size} vocabulary rows "
                             "(config vocab_size); its tokenizer does not fit its embeddings")
        p[new] = old
    return p


def row_sources(perms: Mapping[str, list[int]], base: str | None) -> dict[str, RowSources]:
    """mergekit 0.1.5's rows for tokens a model lacks (``PermutedVocabulary``): the row of the only model that
    has the token; zeros when none has it; base_model's row when it has it; else the average over the models
    that have it (in input order)."""
    keys = list(perms)
    n = len(next(iter(perms.values())))
    shared: dict[int, tuple[tuple[str, int], ...]] = {}
    for r in range(n):
        present = [(k, perms[k][r]) for k in keys if perms[k][r] >= 0]
        if len(present) == len(keys):
            continue
        if len(present) > 1 and base in perms and perms[base][r] >= 0:
            present = [(base, perms[base][r])]
        shared[r] = tuple(present)
    return {k: RowSources(tuple(perms[k]), {r: v for r, v in shared.items() if perms[k][r] < 0}) for k in keys}


def vocab_tensor(name: str, shape: tuple[int, ...], vocab_size: int) -> bool:
    """Embedding or lm_head rows indexed by token (not position embeddings): 2-D, ``vocab_size`` rows."""
    return group_of(name) in ("embed", "lm_head") and len(shape) == 2 and shape[0] == vocab_size


class VocabMapped(_View):
    """``inner`` with its vocabulary tensors' rows in the output tokenizer's order (see :func:`row_sources`).

    ``peers`` are the gathered inputs by key (unwrapped) for rows filled from other models; ``working_dtype``
    (mergekit's ``dtype``) is what rows are averaged in, else the peers' promoted dtype for that tensor.
    """

    def __init__(self, inner, key: str, rows: RowSources, peers: Mapping[str, object], vocab_size: int,
                 working_dtype: torch.dtype | None = None):
        super().__init__(inner)
        self.key, self.rows, self.peers, self.working_dtype = key, rows, peers, working_dtype
        self._vocab = {n for n in inner.names()
                       if vocab_tensor(n, tuple(inner.info(n).shape), vocab_size)}
        self.config = dict(inner.config or {}, vocab_size=len(rows.own))

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if name not in self._vocab:
            return info
        return replace(info, shape=(len(self.rows.own), *info.shape[1:]))

    def view_dtype(self, name: str) -> torch.dtype:
        """Gathered rows may be filled in a wider dtype (averages of peers' rows): float32 at least."""
        inner = self.inner.view_dtype(name)
        return torch.promote_types(inner, torch.float32) if name in self._vocab else inner

    def _read_into(self):
        if self._vocab:
            raise AttributeError("read_into")  # vocabulary rows are gathered: the executor asks view()
        return self.inner.read_into

    def _changes(self):
        inner = self.inner.changes
        return lambda name: name in self._vocab or inner(name)

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self._vocab:
            return self.inner.view(name, start, stop)
        width = math.prod(self.inner.info(name).shape[1:])
        total = len(self.rows.own) * width
        stop = total if stop is None else stop
        r0, r1 = start // width, -(-stop // width)
        rows = self._gather(name, r0, r1, width)
        return rows.reshape(-1)[start - r0 * width: stop - r0 * width]

    def _gather(self, name: str, r0: int, r1: int, width: int) -> torch.Tensor:
        """Output rows [r0, r1): contiguous runs of own rows read at once, the others filled."""
        dtype = self.inner.info(name).dtype
        own = self.rows.own[r0:r1]
        fills = {r: self._fill(name, self.rows.fill[r], width) for r in range(r0, r1) if own[r - r0] < 0}
        if fills:
            dtype = torch.promote_types(dtype, next(iter(fills.values())).dtype)
        out = torch.empty((r1 - r0, width), dtype=dtype)
        i = 0
        while i < len(own):
            if own[i] < 0:
                out[i] = fills[r0 + i]
                i += 1
                continue
            j = i
            while j + 1 < len(own) and own[j + 1] == own[j] + 1:
                j += 1
            out[i:j + 1] = self.inner.view(name, own[i] * width, (own[j] + 1) * width).reshape(-1, width)
            i = j + 1
        return out

    def _fill(self, name: str, sources: tuple[tuple[str, int], ...], width: int) -> torch.Tensor:
        """mergekit's default row: one donor's row, zeros, or ``(0 + row_1 + ... + row_k) / k`` in the
        working dtype (else the peers' promoted dtype)."""
        if len(sources) == 1:
            key, row = sources[0]
            return self.peers[key].view(name, row * width, (row + 1) * width)
        dtype = self.working_dtype
        if dtype is None:
            dtype = self.inner.info(name).dtype
            for peer in self.peers.values():
                dtype = torch.promote_types(dtype, peer.info(name).dtype)
        acc = torch.zeros(width, dtype=dtype)
        for key, row in sources:
            acc = acc + self.peers[key].view(name, row * width, (row + 1) * width).to(dtype)
        return acc / len(sources) if sources else acc
