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
