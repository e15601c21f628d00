"""Merge math: small pure functions on tensors, one concern each, composable (sparsify -> combine).

No I/O here. Functions that take ``out=`` may write their result into a caller-owned buffer, which is how
the executor reuses memory; called without it they allocate and leave their inputs untouched.
"""

from .linear import lerp, linear, linear_sum_then_divide
from .slerp import SlerpCoefficients, slerp, slerp_coefficients, slerp_partial_sums
from .sparsify import RankCut, breadcrumbs_mask, dare_mask, kth_largest, magnitude_mask, rank_cut, rank_cuts, top_k_mask, trim_
from .task_arithmetic import sign_consensus_mask, task_arithmetic, task_arithmetic_mergekit

__all__ = [
    "RankCut",
    "rank_cut",
    "rank_cuts",
    "top_k_mask",
    "trim_",
    "SlerpCoefficients",
    "breadcrumbs_mask",
    "dare_mask",
    "kth_largest",
    "lerp",
    "linear",
    "linear_sum_then_divide",
    "magnitude_mask",
    "sign_consensus_mask",
    "slerp",
    "slerp_coefficients",
    "slerp_partial_sums",
    "task_arithmetic",
    "task_arithmetic_mergekit",
]
