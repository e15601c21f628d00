"""The streaming executor against the whole-tensor reference implementations (merge.methods.reference): the
reference is the specification, read top to bottom; the streaming path must compute the same, on any chunking."""

from __future__ import annotations

import pytest
import torch

import merge
from merge.methods import reference
from merge.options import Options

from .helpers import load_tensors

TA_CASES = {
    "ties": dict(sparsify="magnitude", density=0.3),
    "breadcrumbs": dict(sparsify="breadcrumbs", density=0.5, gamma=0.05),
    "dare": dict(sparsify="random", density=0.5, seed=3),
    "plain": {},
}


def _pruned(case: str, delta: torch.Tensor, name: str, stream: int, kw: dict) -> torch.Tensor:
    if case == "ties":
        return reference.ties_trim(delta, kw["density"])
    if case == "breadcrumbs":
        return reference.breadcrumbs_trim(delta, kw["density"], kw["gamma"])
    if case == "dare":
        return reference.dare(delta, kw["density"], kw["seed"], name, stream)
    return delta


@pytest.mark.parametrize("chunk", [None, 777])
@pytest.mark.parametrize("case,dtype_name", [(c, "float32") for c in TA_CASES] + [
    ("ties", "bfloat16"), ("breadcrumbs", "bfloat16")])  # bfloat16 deltas: many ties at each cut
def test_task_arithmetic_streams_what_the_reference_computes(pairs, tmp_path, case, dtype_name, chunk):
    dtype = getattr(torch, dtype_name)
    base, (s0, s1) = pairs("llama", dtype, sft_count=2)
    kw = TA_CASES[case]
    sign = case in ("ties", "plain")
    merge.merge("task_arithmetic", sft=[s0, s1], base=base, scale=[0.6, 0.9], sign_consensus=sign,
                out=tmp_path / "o", **kw, options=Options.of(chunk_elements=chunk))
    b, fine, out = load_tensors(base), [load_tensors(s0), load_tensors(s1)], load_tensors(tmp_path / "o")
    for name in b:
        x, fs = b[name].float(), [f[name].float() for f in fine]
        pruned = [_pruned(case, f - x, name, i, kw) for i, f in enumerate(fs)]
        expected = reference.task_arithmetic(x, fs, [0.6, 0.9], pruned=pruned, sign_consensus="sum" if sign else None)
        if dtype == torch.float32:
            torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7, msg=name)
        else:  # one bfloat16 rounding apart at most; an entry kept or dropped wrongly is ~100x that
            torch.testing.assert_close(out[name].float(), expected.to(dtype).float(), rtol=8e-3, atol=2e-4, msg=name)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolations_stream_what_the_reference_computes(pairs, tmp_path, method):
    base, sft = pairs("llama", torch.float32, scale=0.5)
    merge.merge(method, sft=sft, base=base, t=0.4, out=tmp_path / "o", options=Options.of(chunk_elements=1 << 17))
    b, s, out = load_tensors(base), load_tensors(sft), load_tensors(tmp_path / "o")
    for name in s:
        expected = reference.slerp_textbook(s[name], b[name], 0.4) if method == "slerp" else \
            0.6 * s[name].double() + 0.4 * b[name].double()
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_reference_magnitude_keeps_exactly_k_with_ties_by_position():
    d = torch.tensor([0.5, -0.5, 0.1, 0.5, -0.9])
    assert reference.magnitude_keep(d, 3).tolist() == [True, True, False, False, True]
    assert reference.breadcrumbs_trim(d, 0.4, 0.2).tolist() == [0.5, -0.5, 0.0, 0.0, 0.0]
