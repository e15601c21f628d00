"""What a tensor's name says about it, across architectures: its layer index and its group.

No per-architecture tables: names are matched by the conventions transformers models share
(``model.layers.N.``, ``transformer.h.N.``, ``...blocks.N.``; ``embed_tokens``/``wte``; ``lm_head``; ...).
"""

from __future__ import annotations

import re

GROUPS = ("embed", "lm_head", "norm", "attn", "mlp")

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_PATTERNS = [  # checked in order: a layer norm named after attention is a norm, not attention
    ("lm_head", re.compile(r"(?:^|\.)(?:lm_head|embed_out)(?:\.|$)")),
    ("embed", re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|embed_in|"
                         r"tok_embeddings|embed_positions|embeddings)(?:\.|$)")),
    ("norm", re.compile(r"(?:norm|(?:^|\.)ln_\w*|(?:^|\.)ln\d*(?:\.|$))", re.IGNORECASE)),
    ("attn", re.compile(r"(?:attn|attention|(?:^|\.)(?:q|k|v|o|qkv)_proj(?:\.|$))")),
    ("mlp", re.compile(r"(?:mlp|feed_forward|ffn|(?:^|\.)(?:gate|up|down)_proj(?:\.|$)|(?:^|\.)experts(?:\.|$))")),
]


def layer_index(name: str) -> int | None:
    """``model.layers.12.mlp.up_proj.weight`` -> 12; None for tensors outside the layer stack."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str | None:
    """One of ``embed``, ``lm_head``, ``norm``, ``attn``, ``mlp``, or None."""
    for group, pattern in _PATTERNS:
        if pattern.search(name):
            return group
    return None


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
