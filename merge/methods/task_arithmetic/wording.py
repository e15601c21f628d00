"""Task arithmetic's settings in words, for the summary and the model card."""

from __future__ import annotations

from .kernel import (
    Sparsification,
    TaskArithmetic,
)

_SPARSIFY = {"magnitude": "magnitude (TIES trimming: the largest |delta| entries kept)",
             "random": "random (DARE: entries kept at random)",
             "breadcrumbs": "breadcrumbs (the largest gamma and the smallest entries dropped)",
             "della": "della (DELLA: entries kept at random with P_keep = density - epsilon + 2*epsilon*r, r the "
                      "entry's magnitude rank in its row scaled to 0..1)"}
_CONSENSUS = {"sum": "sum (TIES sign election: the sign of the summed deltas)",
              "count": "count (the sign most deltas have)"}


def settings(ops: list[TaskArithmetic], who) -> list[str]:
    """The settings of a plan's task-arithmetic operations, in words (the summary and the card): scales per
    SFT (a range where they vary by tensor; ``who(key)`` names an SFT), lambda, normalize, the sparsify method
    with density (gamma, seed, rescale where they apply), and sign consensus."""
    sfts = ops[0].inputs[1:]
    scales = ", ".join(f"{_spread(op.weights[i] for op in ops)} ({who(k)})" for i, k in enumerate(sfts))
    lines = [f"scale{'s' if len(sfts) > 1 else ''}: {scales}"]
    lams = {float(op.lam) for op in ops}
    if lams != {1.0}:
        lines.append(f"lambda (multiplies the summed deltas): {_spread(lams)}")
    if any(op.normalize for op in ops):
        lines.append("normalize: the sum is divided by the sum of the scales of the deltas kept per entry")
    sparse = [op.sparsify for op in ops if op.sparsify is not None]
    if not sparse:
        lines.append("sparsify: none (whole deltas are added)")
    else:
        method = sparse[0].method
        where = "" if len(sparse) == len(ops) else f" on {len(sparse)} of {len(ops)} tensors (whole deltas elsewhere)"
        parts = [f"sparsify: {_SPARSIFY.get(method, method)}{where}", f"density {_per_sft(sparse, 'density')}"]
        if method == "breadcrumbs":
            parts.append(f"gamma {_per_sft(sparse, 'gamma')}")
        if method == "della":
            parts.append(f"epsilon {_per_sft(sparse, 'epsilon')}")
        if method in ("random", "della"):
            parts.append(f"seed {_spread(sp.seed for sp in sparse)}")
        rescale = {str(sp.rescale) for sp in sparse}
        if method == "random" or rescale != {"True"}:
            words = {"True": "survivors divided by the density", "l1": "each delta's L1 norm restored",
                     "False": "not rescaled"}
            parts.append("; ".join(words.get(r, r) for r in sorted(rescale)))
        lines.append(", ".join(parts))
    consensus = {op.sign_consensus for op in ops}
    lines.append("sign consensus: " + ", ".join(_CONSENSUS.get(c, c) if c else "none" for c in sorted(
        consensus, key=str)))
    return lines


def _spread(values) -> str:
    """One value, or the range a per-tensor value takes."""
    vals = sorted({float(v) for v in values})
    return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}..{vals[-1]:g} across tensors"


def _per_sft(sparse: list[Sparsification], key: str) -> str:
    """A sparsify number per fine-tune, spread over the tensors (one value when all fine-tunes agree)."""
    values = [getattr(sp, key) for sp in sparse]
    if all(isinstance(v, (list, tuple)) for v in values):
        n = len(values[0])
        per = [_spread(v[i] for v in values) for i in range(n)]
        return per[0] if len(set(per)) == 1 else "/".join(per) + " (per model)"
    return _spread(values)


