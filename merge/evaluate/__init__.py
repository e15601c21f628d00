"""Probe evaluation: parse probe files, score models (perplexity, bits per byte), measure recovery; and
lm-evaluation-harness tasks (:mod:`.harness`, :mod:`.cache`, :mod:`.benchmark`; optional extra ``eval``).

``merge.evaluate(...)`` calls :func:`merge.evaluate.benchmark.evaluate` (this package is callable).

The built-in general probe set (``general_probes.txt``: short everyday English paragraphs) is a smoke
signal for "did the merge bring general language modelling back", not a benchmark.
"""

import sys
import types

from .probes import BUILTIN_GENERAL, Document, Encoded, ProbeSet, encode, load_probes
from .scoring import ProbeScore, score
from .selection import RULES, Recovery, objective, recovery, rule_text, select

__all__ = ["BUILTIN_GENERAL", "Document", "Encoded", "ProbeScore", "ProbeSet", "RULES", "Recovery", "encode",
           "load_probes", "objective", "recovery", "rule_text", "score", "select"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``merge.evaluate(models, general_tasks=..., domain_tasks=..., base=..., sft=...)``: see
        :func:`merge.evaluate.benchmark.evaluate`."""
        from .benchmark import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
