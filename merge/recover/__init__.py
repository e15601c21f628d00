"""Proving the recovery: sweep t (and per-layer schedules) on probe sets with one in-memory model.

``merge.sweep(...)`` -> :class:`SweepResult`; see :mod:`merge.recover.sweep`.
"""

from .result import Candidate, SweepResult
from .sweep import sweep

__all__ = ["Candidate", "SweepResult", "sweep"]
