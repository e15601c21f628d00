"""The package's shape: one place per method (the registry); import cycles are tests/test_imports.py's."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import merge
from merge.errors import InputError
from merge.io.writer import format_size
from merge.methods import registry
from merge.methods.chunks import chunk_ranges
from merge.methods.task_arithmetic import TieCursor
from merge.options import Options


def test_unknown_method_fails_in_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(InputError) as e:
        merge.merge("median", sft=str(tmp_path), base=str(tmp_path), t=0.3, out=tmp_path / "o")
    message = str(e.value)
    assert "'median' is not a merge method" in message and "linear, slerp, task_arithmetic" in message
    assert "\n" not in message and not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="known methods"):
        registry.get("median")


def test_every_method_is_registered_once_with_its_mergekit_names():
    assert registry.names() == ("linear", "slerp", "task_arithmetic", "model_stock", "nuslerp", "multislerp",
                                "karcher", "nearswap", "arcee_fusion", "ram", "passthrough", "sce", "spectral")
    assert set(registry.mergekit_names()) == {"linear", "slerp", "task_arithmetic", "ties", "dare_linear",
                                              "dare_ties", "breadcrumbs", "breadcrumbs_ties", "model_stock",
                                              "nuslerp", "multislerp", "karcher", "della", "della_linear", "sce",
                                              "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"}
    from mergekit.merge_methods import registry as mergekit_registry  # the oracle: every method mergekit registers

    assert set(registry.mergekit_names()) == set(mergekit_registry._METHODS)
    for name in registry.mergekit_names():
        spec, variant = registry.for_mergekit(name)
        assert variant.name == name and spec.plan_mergekit is not None
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("linear"))


def test_the_tie_cursor_refuses_chunks_out_of_order():
    cursor = TieCursor()
    for chunk in chunk_ranges(30, 10)[:2]:
        cursor.begin(chunk.index)
        cursor.advance((1, 2))
    assert cursor.ties == (2, 4) and cursor.next_chunk == 2
    with pytest.raises(RuntimeError, match="in order"):
        cursor.begin(0 + 3)
    cursor.begin(0)  # a new pass starts the count again
    assert cursor.ties == (0, 0)


def test_kernels_declare_their_buffers_and_passes():
    from merge.methods import Linear, Slerp, Sparsification, TaskArithmetic

    ties = TaskArithmetic(("base", "sft0"), (1.0,), sparsify=Sparsification("magnitude", (0.5,), (0.0,)))
    dare = TaskArithmetic(("base", "sft0"), (1.0,), sparsify=Sparsification("random", (0.5,), (0.0,)))
    kernel = registry.kernel_for(ties)
    assert kernel.buffer_bytes(ties, 1000) > 0 == kernel.buffer_bytes(dare, 1000)
    assert registry.kernel_for(Slerp(("sft0", "base"), t=0.5)).passes(Slerp(("sft0", "base"))) == 1
    assert registry.kernel_for(Linear(("sft0", "base"), (0.5, 0.5))).passes(Linear(("a",), (1.0,))) == 0


def test_a_new_method_is_one_module_and_its_registration(pairs, tmp_path):
    from .examples import midpoint
    from .helpers import load_tensors

    base, sft = pairs("llama", torch.float32)
    with pytest.raises(ValueError, match="'midpoint' is not a merge method"):
        merge.Recipe.model_validate({"method": "midpoint", "base": str(base), "sft": str(sft)})
    registry.register(midpoint.SPEC)
    try:
        recipe = merge.Recipe.model_validate({"method": "midpoint", "base": str(base), "sft": str(sft)})
        summary = merge.run(recipe, out=tmp_path / "o", options=Options.of(chunk_elements=1000))
    finally:
        registry.unregister("midpoint")
    b, s, out = load_tensors(base), load_tensors(sft), load_tensors(tmp_path / "o")
    assert summary.tensors == {"midpoint": len(s)} and "The midpoint" in (tmp_path / "o" / "README.md").read_text()
    for name in s:
        assert torch.equal(out[name], (s[name] + b[name]) * 0.5), name
    assert "midpoint" not in registry.names()


def test_dry_run_reads_bound_counts_each_kernels_statistics_passes(pairs):
    """linear reads each input tensor once, slerp twice (its norms pass): the bound comes from Kernel.passes."""
    base, sft = pairs("llama", torch.float32)
    with safe_open(base / "model.safetensors", "pt") as b, safe_open(sft / "model.safetensors", "pt") as s:
        once = sum(b.get_tensor(n).nbytes + s.get_tensor(n).nbytes for n in b.keys())
    linear = merge.merge("linear", sft=sft, base=base, t=0.3, options=Options.of(dry_run=True))
    slerp = merge.merge("slerp", sft=sft, base=base, t=0.3, options=Options.of(dry_run=True))
    assert (linear.read_bytes, slerp.read_bytes) == (once, 2 * once)
    assert f"reads at most {format_size(once)} of the inputs" in linear.report()
