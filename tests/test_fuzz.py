"""Fuzzing: mutated safetensors headers and index files never crash, hang or write outside OUT.

Every case ends either in success (the mutation was harmless, and the output verifies) or in exit code 2 with
one ``error:`` line and no OUT. Runs in-process through click's CliRunner; examples are bounded and seeded.
"""

import json
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import merge
from merge.cli import main

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INDEX = "model.safetensors.index.json"
NAMES = ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 300),
                         st.floats(allow_nan=True), st.text(max_size=8),
                         st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "U64", "F12"]))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=6)


@pytest.fixture(scope="module")
def inputs(pairs):
    base, single = pairs("llama", torch.float32)
    _, sharded = pairs("llama", torch.float32, shard_size="40KB")
    return base, single, sharded


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging."""
    def fire(*_):
        raise TimeoutError(f"a fuzz case ran for more than {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def run_case(base: Path, pristine: Path, mutate) -> None:
    """Copy the SFT, ``mutate(folder)`` it, merge, and check the outcome is clean."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sft = root / "sft"
        shutil.copytree(pristine, sft)
        mutate(sft)
        before, base_before = snapshot(root), snapshot(base)
        out = root / "out"
        with time_limit(60):
            result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.5",
                                               "-o", str(out), "-q"])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        if result.exit_code == 0:
            merge.verify(out)
        else:
            assert result.exit_code == 2, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert not out.exists()
        after = snapshot(root)
        assert {k: v for k, v in after.items() if not k.startswith("out")} == before
        assert snapshot(base) == base_before


def _parts(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.none() | st.integers(0, 10**6))
def test_fuzz_header_bytes(inputs, flips, cut):
    base, single, _ = inputs

    def mutate(sft: Path) -> None:
        f = sft / "model.safetensors"
        raw = bytearray(f.read_bytes())
        header_end = 8 + struct.unpack("<Q", raw[:8])[0]
        for pos, value in flips:
            raw[pos % header_end] = value
        if cut is not None:
            raw = raw[: cut % len(raw)]
        f.write_bytes(bytes(raw))

    run_case(base, single, mutate)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(NAMES + ["__metadata__", "extra"]),
                                st.sampled_from(["dtype", "shape", "data_offsets", "whole"]), json_values),
                      min_size=1, max_size=3))
def test_fuzz_header_json(inputs, edits):
    base, single, _ = inputs

    def mutate(sft: Path) -> None:
        f = sft / "model.safetensors"
        header_raw, data = _parts(f)
        header = json.loads(header_raw)
        for name, field, value in edits:
            if field == "whole" or not isinstance(header.get(name), dict):
                header[name] = value
            else:
                header[name][field] = value
        raw = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    run_case(base, single, mutate)


SHARD_PATHS = ["", ".", "..", "../sft/{0}", "/etc/passwd", "missing.safetensors", "{0}", "{1}", "config.json",
               "tokenizer.json", "sub/../{0}", "./{1}", "{0}/"]  # {0}, {1}: the first two real shard names


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(NAMES + ["added.weight"]), st.sampled_from(SHARD_PATHS)), max_size=3),
       junk=st.none() | st.tuples(st.sampled_from(["weight_map", "metadata", NAMES[0]]), json_values))
def test_fuzz_index(inputs, edits, junk):
    base, _, sharded = inputs

    def mutate(sft: Path) -> None:
        index = json.loads((sft / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        for name, path in edits:
            index["weight_map"][name] = path.format(*shards)
        if junk is not None:
            key, value = junk
            (index if key in ("weight_map", "metadata") else index["weight_map"])[key] = value
        (sft / INDEX).write_text(json.dumps(index))

    run_case(base, sharded, mutate)


# -- the recipe parser: random structures, regexes and values never end in anything but a one-line error ----
TENSOR_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight",
                "lm_head.weight"]
RECIPE_KEYS = ["method", "base", "sft", "t", "scale", "sparsify", "sign_consensus", "normalize", "schedule",
               "dtype", "device", "max_shard_size", "out", "match", "value", "model", "density", "gamma", "seed",
               "rescale", "preset", "alpha", "beta", "k", "methd", "filter", "merge_method", "base_model",
               "models", "parameters", "weight", "slices", "sources", "layer_range", "mergeback"]
patterns = st.one_of(st.sampled_from(["embed", "attn", "mlp", "norm", "lm_head", "*", "model.layers.*", "embedd",
                                      "re:(", "re:[a-", "re:(?P<x>", "re:*", "re:a{2,1}", "re:\\", "re:.*mlp"]),
                     st.text(max_size=6).map(lambda s: "re:" + s), st.text(max_size=6))
recipe_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                           st.sampled_from(["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "magnitude",
                                            "random", "breadcrumbs", "lines", "bottom_k", "bfloat16", "float16",
                                            "l1", "sum", "5GB", "1KB", "cpu", "./m", "auto"]), patterns)
recipe_values = st.recursive(recipe_scalars, lambda kids: st.lists(kids, max_size=4)
                             | st.dictionaries(st.sampled_from(RECIPE_KEYS), kids, max_size=4), max_leaves=10)
numbers = st.one_of(st.floats(-2, 2), st.integers(0, 1), st.lists(st.floats(0, 1), min_size=1, max_size=3))
RECIPE_FUZZ = settings(FUZZ, max_examples=300)  # parsing only: cheap, so many more examples
rules = st.lists(st.fixed_dictionaries({"match": patterns, "value": numbers | recipe_values}), min_size=1, max_size=3)


def assert_clean_recipe_outcome(data) -> None:
    """Parse (and, when valid, build every tensor's operation and check the rules) without a stray exception."""
    import yaml

    from merge.errors import MergeError
    from merge.recipes.loading import parse_text
    from merge.recipes.operations import operations_for, unmatched_rules

    text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True)
    try:
        recipe = parse_text(text, "fuzz.yaml")
        unmatched_rules(recipe, TENSOR_NAMES)
        op_for = operations_for(recipe, 2)
        for name in TENSOR_NAMES:
            op_for(name)
    except MergeError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        assert "Traceback" not in message and "pydantic" not in message, message


@RECIPE_FUZZ
@given(data=st.dictionaries(st.sampled_from(RECIPE_KEYS), recipe_values, max_size=7))
def test_fuzz_recipe_structures(data):
    assert_clean_recipe_outcome(data)


@RECIPE_FUZZ
@given(method=st.sampled_from(["linear", "slerp", "task_arithmetic"]), t=st.one_of(rules, numbers, recipe_values),
       scale=st.one_of(st.none(), numbers, recipe_values, rules),
       extra=st.just({}) | st.dictionaries(st.sampled_from(RECIPE_KEYS), recipe_values, max_size=2))
def test_fuzz_our_recipe_rules_and_values(method, t, scale, extra):
    data = {"method": method, "base": "./b", "sft": "./s", **extra}
    data["t" if method != "task_arithmetic" else "scale"] = t
    if scale is not None and method == "task_arithmetic":
        data["sparsify"] = {"method": "magnitude", "density": scale} if not isinstance(scale, list) else scale
    assert_clean_recipe_outcome(data)


@RECIPE_FUZZ
@given(method=st.sampled_from(["linear", "slerp", "ties", "dare_linear", "breadcrumbs", "task_arithmetic"]),
       params=st.dictionaries(st.sampled_from(["t", "weight", "density", "gamma", "normalize", "lambda", "rescale"]),
                              st.one_of(numbers, recipe_values, st.lists(st.fixed_dictionaries(
                                  {"filter": patterns, "value": numbers | recipe_values}), min_size=1, max_size=2)),
                              max_size=3))
def test_fuzz_mergekit_recipes(method, params):
    data = {"merge_method": method, "base_model": "./b", "parameters": params,
            "models": [{"model": "./b"}, {"model": "./s", "parameters": dict(params)}]}
    assert_clean_recipe_outcome(data)


@RECIPE_FUZZ
@given(text=st.text(max_size=80))
def test_fuzz_recipe_text(text):
    assert_clean_recipe_outcome(text)
