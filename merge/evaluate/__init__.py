"""Probe evaluation: parse probe files, score models (perplexity, bits per byte), measure recovery.

The built-in general probe set (``general_probes.txt``: short everyday English paragraphs) is a smoke
signal for "did the merge bring general language modelling back", not a benchmark.
"""

from .probes import BUILTIN_GENERAL, Document, Encoded, ProbeSet, encode, load_probes
from .scoring import ProbeScore, score
from .selection import RULES, Recovery, objective, recovery, rule_text, select

__all__ = ["BUILTIN_GENERAL", "Document", "Encoded", "ProbeScore", "ProbeSet", "RULES", "Recovery", "encode",
           "load_probes", "objective", "recovery", "rule_text", "score", "select"]
