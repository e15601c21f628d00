"""The compute-dtype policy, decided by the planner per tensor from its inputs' stored dtypes.

Our formats compute in float32 (float64 when any input is float64). mergekit recipes carry a working dtype
(its ``dtype``; ``inputs``: the inputs' promoted dtype): inputs are rounded to it, results are rounded to it
before the output cast, and operations that compute in it (task arithmetic) do their math in it; the others
upcast to float32 (float64 for a float64 working dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def working_dtype(name: str | None, input_dtypes: Sequence[torch.dtype]) -> torch.dtype | None:
    """An operation's working dtype: None, a dtype name, or ``inputs`` (the inputs' promoted dtype)."""
    if name is None:
        return None
    if name == "inputs":
        working = input_dtypes[0]
        for d in input_dtypes[1:]:
            working = torch.promote_types(working, d)
        return working
    return getattr(torch, name)


def compute_dtypes(op, input_dtypes: Sequence[torch.dtype]) -> tuple[torch.dtype, torch.dtype | None]:
    """(the dtype ``op``'s chunks are computed in, the dtype inputs and results are rounded to or None)."""
    compute = torch.float64 if any(d == torch.float64 for d in input_dtypes) else torch.float32
    working = working_dtype(getattr(op, "working_dtype", None), input_dtypes)
    if working is not None:
        compute = working if op.computes_in_working_dtype else (
            torch.float64 if working == torch.float64 else torch.float32)
    return compute, working
