"""What a tensor's name says about it, across architectures: its stack, its layer index and its group.

No per-architecture tables: names are matched by the conventions transformers models share
(``model.layers.N.``, ``transformer.h.N.``, ``...blocks.N.``; ``embed_tokens``/``wte``; ``lm_head``; ...).

A model has one or more *stacks*, each with its own depth axis: ``text`` (the decoder: everything that is not
in another stack), ``vision`` (a vision tower: ``vision_tower.``, ``vision_model.``, ``visual.``...) and
``projector`` (the layers between them: ``multi_modal_projector.``, Qwen2-VL's ``visual.merger.``...; no layers
of its own, it sits at depth 0 like the text embeddings it feeds). :meth:`Structure.position` maps a name to
(stack, layer index in that stack, that stack's layer count).
"""

from __future__ import annotations

import re
from typing import NamedTuple

GROUPS = ("embed", "lm_head", "norm", "attn", "mlp", "router", "projector")
STACKS = ("vision", "text")

# The start of a layer of a stack (``layers.``, ``h.``...): the index follows. Every layer pattern derives from it.
LAYER_PREFIX = r"(?:^|\.)(?:layers|layer|h|blocks|block)\."
_LAYER = re.compile(LAYER_PREFIX + r"(\d+)(?:\.|$)")
# A regex (for recipe rules) matching the names outside every layer stack: embeddings, final norm, lm_head.
OUTSIDE_LAYERS = r"^(?!.*" + LAYER_PREFIX + r"\d+(?:\.|$))"
PROJECTOR = re.compile(r"(?:^|\.)(?:multi_modal_projector|mm_projector|connector|visual\.merger)(?:\.|$)")
VISION = re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder)(?:\.|$)")
_BEFORE_VISION_LAYERS = re.compile(r"(?:^|\.)pre_\w*(?:\.|$)")  # CLIP's pre_layrnorm sits before the layers
_PATTERNS = [  # checked in order: a layer norm named after attention is a norm, not attention
    ("lm_head", re.compile(r"(?:^|\.)(?:lm_head|embed_out)(?:\.|$)")),
    ("projector", PROJECTOR),
    ("embed", re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|embed_in|"
                         r"tok_embeddings|embed_positions|embeddings|patch_embed)(?:\.|$)")),
    ("norm", re.compile(r"(?:norm|(?:^|\.)ln_\w*|(?:^|\.)ln\d*(?:\.|$))", re.IGNORECASE)),
    ("attn", re.compile(r"(?:attn|attention|(?:^|\.)(?:q|k|v|o|qkv)_proj(?:\.|$))")),
    # MoE routers: a Linear ``gate`` (not ``gate_proj``) of the MoE block, Qwen2-MoE's shared_expert_gate,
    # DeepSeek's gate with its e_score_correction_bias, ``router`` modules
    ("router", re.compile(r"(?:^|\.)(?:block_sparse_moe|mlp|moe|feed_forward)\.(?:gate|shared_expert_gate)(?:\.|$)"
                          r"|(?:^|\.)(?:router|shared_expert_gate)(?:\.|$)")),
    ("mlp", re.compile(r"(?:mlp|feed_forward|ffn|(?:^|\.)(?:gate|up|down)_proj(?:\.|$)|(?:^|\.)experts(?:\.|$))")),
]


def layer_index(name: str) -> int | None:
    """``model.layers.12.mlp.up_proj.weight`` -> 12; None for tensors outside the layer stack."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str | None:
    """One of ``embed``, ``lm_head``, ``projector``, ``norm``, ``attn``, ``router``, ``mlp``, or None."""
    for group, pattern in _PATTERNS:
        if pattern.search(name):
            return group
    return None


def stack_of(name: str) -> str:
    """``projector`` (checked first: Qwen2-VL's merger lives under ``visual.``), ``vision``, else ``text``."""
    if PROJECTOR.search(name):
        return "projector"
    return "vision" if VISION.search(name) else "text"


def num_layers(config: dict, names: list[str]) -> int:
    """Layer count from the config (``num_hidden_layers``/``n_layer``/``num_layers``), else from the names."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if value is None and isinstance(config.get("text_config"), dict):
            value = config["text_config"].get(key)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def _vision_layers(config: dict, names: list[str]) -> int:
    """``vision_config``'s ``num_hidden_layers``/``depth``/``num_layers``, else the vision names' top index + 1."""
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        for key in ("num_hidden_layers", "depth", "num_layers"):
            if isinstance(vision.get(key), int) and vision[key] > 0:
                return vision[key]
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


class Position(NamedTuple):
    """Where a tensor sits: its ``stack``, its ``layer`` in it (None outside the layers), the stack's ``count``
    of layers, and ``before`` (a tensor outside the layers that comes before them: embeddings)."""

    stack: str
    layer: int | None
    count: int
    before: bool

    @property
    def depth(self) -> float:
        """In [0, 1]: layer l of L is ``l / (L - 1)`` (0 when L = 1); before the layers 0, after them 1."""
        if self.layer is None:
            return 0.0 if self.before else 1.0
        return self.layer / (self.count - 1) if self.count > 1 else 0.0


class Structure:
    """The stacks of a model and their layer counts; a single-stack model is ``{"text": L}``."""

    def __init__(self, counts: dict[str, int]):
        self.counts = dict(counts)

    @classmethod
    def of(cls, config: dict, names: list[str]) -> Structure:
        """The stacks ``names`` show; the text stack's count is :func:`num_layers` (as for any model)."""
        config = config or {}
        by_stack: dict[str, list[str]] = {}
        for n in names:
            by_stack.setdefault(stack_of(n), []).append(n)
        if set(by_stack) <= {"text"}:
            return cls({"text": num_layers(config, names)})
        counts = {}
        if "vision" in by_stack:
            counts["vision"] = _vision_layers(config, by_stack["vision"])
        if "projector" in by_stack:
            counts["projector"] = 0
        counts["text"] = num_layers(config, by_stack.get("text", []))
        return cls(counts)

    @classmethod
    def coerce(cls, value: Structure | int) -> Structure:
        """A :class:`Structure` as is; a layer count as a single-stack model with that many layers."""
        return value if isinstance(value, Structure) else cls({"text": int(value)})

    @property
    def multi(self) -> bool:
        return len(self.counts) > 1

    @property
    def layered(self) -> list[str]:
        """The stacks with layers, in depth order (vision before text)."""
        return [s for s in ("vision", "text") if self.counts.get(s)]

    @property
    def max_layers(self) -> int:
        return max(self.counts.values(), default=0)

    def position(self, name: str) -> Position:
        """(stack, layer index in it, its layer count, before its layers). Single-stack: everything is text."""
        stack = stack_of(name) if self.multi else "text"
        if stack not in self.counts:
            stack = "text"
        group = group_of(name)
        if stack == "projector":
            return Position(stack, None, 0, True)
        layer = layer_index(name)
        before = group == "embed" or (stack == "vision" and layer is None and bool(_BEFORE_VISION_LAYERS.search(name)))
        return Position(stack, layer, self.counts.get(stack, 0), before)
