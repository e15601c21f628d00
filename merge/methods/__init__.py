"""Merge math: small pure functions on tensors, one concern each, composable (prune -> elect -> combine),
and one module per method binding them to the rest of the package (see :mod:`.registry`).

Functions that take ``out=`` may write their result into a caller-owned buffer, which is how the executor
reuses memory; called without it they allocate and leave their inputs untouched. Whole-tensor reference
implementations (the tests' oracle) are in :mod:`.reference`, not exported here.
"""

from .base import Copy, MethodSpec, Operation
from .linear import Linear, linear, linear_sum_then_divide
from .selection import RankCut, rank_cut, rank_cuts
from .slerp import Slerp, SlerpCoefficients, slerp_coefficients, slerp_partial_sums, slerp_statistics
from .sparsify import dare_keep, dare_mask, trim_
from .task_arithmetic import (
                              Sparsification,
                              TaskArithmetic,
                              elect_signs_mergekit,
                              sign_consensus_mask,
                              task_arithmetic,
                              task_arithmetic_mergekit,
)

__all__ = [
    "Copy",
    "Linear",
    "MethodSpec",
    "Operation",
    "RankCut",
    "Slerp",
    "SlerpCoefficients",
    "Sparsification",
    "TaskArithmetic",
    "dare_keep",
    "dare_mask",
    "elect_signs_mergekit",
    "linear",
    "linear_sum_then_divide",
    "rank_cut",
    "rank_cuts",
    "sign_consensus_mask",
    "slerp_coefficients",
    "slerp_partial_sums",
    "slerp_statistics",
    "task_arithmetic",
    "task_arithmetic_mergekit",
    "trim_",
]
