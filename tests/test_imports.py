"""The package's import graph has no cycles, and a local merge imports only what it uses.

The graph is read from the source with ``ast``: an edge ``a -> b`` for every ``from . import``,
``from .x import`` or ``import merge.x`` in module ``a`` naming module ``b``; imports inside a function
(deferred until called) are kept apart from module-level ones, and those under ``if TYPE_CHECKING:``
(never run) are left out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import merge

PACKAGE = Path(merge.__file__).parent
HEAVY = ("transformers", "matplotlib", "huggingface_hub", "lm_eval", "ray", "peft")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports only type checkers see."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(module_level, function_level)``: for each module of the package, the package modules it imports."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    top: dict[str, set[str]] = {m: set() for m in paths}
    deferred: dict[str, set[str]] = {m: set() for m in paths}

    def targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in paths]
        here = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
        return [t for t in found if t in paths and t != module]

    def walk(module: str, is_package: bool, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):  # never runs: no edge (its else branch does run)
                for branch in child.orelse:
                    walk(module, is_package, ast.Module(body=[branch], type_ignores=[]), in_function)
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if inside else top)[module].update(targets(module, is_package, child))
            walk(module, is_package, child, inside)

    for module, path in paths.items():
        walk(module, path.name == "__init__.py", ast.parse(path.read_text()), False)
    return top, deferred


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_known_edges():
    top, deferred = import_graph()
    assert "merge.io.checkpoint" in top["merge.io.quantized"]  # from .checkpoint import Checkpoint
    assert "merge.fp8_output" in deferred["merge.distributed"]  # inside plan_recipe
    assert "merge.evaluate.harness" in top["merge.evaluate.tasks"]
    assert "merge.evaluate.tasks" not in top["merge.evaluate.harness"] | deferred["merge.evaluate.harness"]  # typing


def test_no_module_level_import_cycles():
    top, _ = import_graph()
    assert cycles(top) == []


def test_no_cycles_through_function_level_imports_either():
    top, deferred = import_graph()
    combined = {m: top[m] | deferred[m] for m in top}
    assert cycles(combined) == []


def _modules_after(args: list[str], cwd: Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``merge ARGS`` in-process."""
    runner = ("import json, sys, merge.cli\n"
              "try:\n"
              "    merge.cli.main(sys.argv[1:], standalone_mode=False)\n"
              "finally:\n"
              "    print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", runner, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


LOCAL_COMMANDS = {
    "linear": ["linear", "--sft", "{sft}", "--base", "{base}", "--t", "0.3", "-o", "{out}", "--quiet"],
    "mergekit recipe": ["run", "{recipe}", "-o", "{out}", "--quiet"],
    "inspect": ["inspect", "--sft", "{sft}", "--base", "{base}"],
}
MERGEKIT_RECIPE = ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {sft}\n  - model: {base}\n"
                   "parameters:\n  t: 0.7\ndtype: bfloat16\n")


@pytest.mark.parametrize("command", sorted(LOCAL_COMMANDS))
def test_local_inputs_import_neither_transformers_matplotlib_nor_the_hub_client(pairs, tmp_path, command):
    base, sft = pairs("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MERGEKIT_RECIPE.format(base=base, sft=sft))
    places = {"sft": sft, "base": base, "out": tmp_path / "out", "recipe": recipe}
    loaded = _modules_after([a.format(**places) for a in LOCAL_COMMANDS[command]], tmp_path)
    assert command == "inspect" or any((tmp_path / "out").glob("*.safetensors"))
    assert "torch" in loaded and "merge" in loaded
    assert [m for m in HEAVY if m in loaded] == []


def test_help_imports_neither_torch_nor_pydantic(tmp_path):
    loaded = _modules_after(["--help"], tmp_path)
    assert "click" in loaded
    assert [m for m in ("torch", "pydantic", *HEAVY) if m in loaded] == []
