"""The package's shape: no import cycles among merge's modules, and one place per method (the registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import merge
from merge.errors import InputError
from merge.methods import registry
from merge.methods.chunks import chunk_ranges
from merge.methods.task_arithmetic import TieCursor

PACKAGE = Path(merge.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Module -> the merge modules it imports anywhere (top level or inside functions; not the imports under
    ``if TYPE_CHECKING:``, which never run)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("merge",) + path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, path.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        found = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle (as a path a -> ... -> a), found by depth-first search."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycles_among_merge_modules():
    found = cycles(module_imports())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_unknown_method_fails_in_one_line_listing_the_known_ones(tmp_path):
    with pytest.raises(InputError) as e:
        merge.merge("median", sft=str(tmp_path), base=str(tmp_path), t=0.3, out=tmp_path / "o")
    message = str(e.value)
    assert "'median' is not a merge method" in message and "linear, slerp, task_arithmetic" in message
    assert "\n" not in message and not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="known methods"):
        registry.get("median")


def test_every_method_is_registered_once_with_its_mergekit_names():
    assert registry.names()[:3] == ("linear", "slerp", "task_arithmetic")
    assert "spectral" in registry.names()  # ours only: mergekit has no spectral repair
    assert set(registry.mergekit_names()) == {"linear", "slerp", "task_arithmetic", "ties", "dare_linear",
                                              "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
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
        summary = merge.run(recipe, out=tmp_path / "o", chunk_elements=1000)
    finally:
        registry.unregister("midpoint")
    b, s, out = load_tensors(base), load_tensors(sft), load_tensors(tmp_path / "o")
    assert summary.tensors == {"midpoint": len(s)} and "The midpoint" in (tmp_path / "o" / "README.md").read_text()
    for name in s:
        assert torch.equal(out[name], (s[name] + b[name]) * 0.5), name
    assert "midpoint" not in registry.names()
