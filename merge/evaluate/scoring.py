"""Scoring a causal LM on encoded probes: total negative log-likelihood, perplexity and bits per byte.

``perplexity = exp(NLL / scored tokens)``; ``bits per byte = NLL / ln 2 / UTF-8 bytes of the scored text``.
Documents longer than the window are cut into windows that overlap by one token, so every scored token is
predicted exactly once, from up to ``window - 1`` tokens of its own document. Batches are formed the same way
for any model, so two models with equal parameters get bit-identical scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .probes import Encoded

MAX_WINDOW = 4096  # caps the logits' memory for long-context models


@dataclass(frozen=True)
class ProbeScore:
    """NLL (nats) summed over ``tokens`` scored tokens whose text is ``num_bytes`` UTF-8 bytes."""

    nll: float
    tokens: int
    num_bytes: int

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.num_bytes if self.num_bytes else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def context_length(config) -> int:
    """The model's context (``max_position_embeddings``/``n_positions``...), capped at :data:`MAX_WINDOW`."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return min(value, MAX_WINDOW)
    return 2048


def windows(docs: Sequence[Encoded], window: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, label ids with -100 where not scored): label ``j`` is the target predicted at position ``j``."""
    out = []
    for doc in docs:
        n = len(doc.ids)
        start = 0
        while start < n - 1:
            stop = min(start + window, n)
            ids = list(doc.ids[start:stop])
            labels = [doc.ids[i + 1] if doc.scored[i + 1] else -100 for i in range(start, stop - 1)] + [-100]
            if any(x != -100 for x in labels):
                out.append((ids, labels))
            start = stop - 1
    return out


@torch.no_grad()
def score(model, docs: Sequence[Encoded], device: torch.device | str = "cpu", batch_tokens: int = 2048,
          window: int | None = None) -> ProbeScore:
    """Sum the NLL of every scored token of ``docs`` under ``model`` (in eval mode), in float64. Batches hold
    about ``batch_tokens`` tokens, which bounds the logits (batch_tokens x vocab floats)."""
    window = window or context_length(model.config)
    pieces = sorted(windows(docs, window), key=lambda p: -len(p[0]))
    total = 0.0
    i = 0
    while i < len(pieces):
        width = len(pieces[i][0])
        rows = max(1, batch_tokens // width)
        batch = pieces[i:i + rows]
        i += rows
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (x, y) in enumerate(batch):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        keep = labels.to(device) != -100
        picked = logits[keep].float()
        nll = torch.nn.functional.cross_entropy(picked, labels.to(device)[keep], reduction="none")
        total += float(nll.double().sum())
    return ProbeScore(total, sum(d.num_scored for d in docs), sum(d.num_bytes for d in docs))
