"""``merge verify``: a complete folder passes (and loads), every kind of damage is named in one line."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.cli import main

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def merged(pairs, tmp_path_factory):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path_factory.mktemp("verify") / "out"
    merge.merge("linear", sft=sft, base=base, t=0.3, out=out, max_shard_size="40KB")
    return out


def test_a_merged_folder_verifies_and_loads(merged):
    result = CliRunner().invoke(main, ["verify", str(merged), "--load"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "30 tensors" in result.stdout and "forward pass" in result.stdout
    report = merge.verify(merged)
    weight_map = json.loads((merged / INDEX).read_text())["weight_map"]
    assert report.tensors == 30 and report.shards == len(set(weight_map.values()))


def _drop_a_shard(folder):
    sorted(folder.glob("model-*.safetensors"))[0].unlink()


def _stray_shard(folder):
    shutil.copy(sorted(folder.glob("model-*.safetensors"))[0], folder / "model-00009-of-00009.safetensors")


def _truncate(folder):
    f = sorted(folder.glob("model-*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:-4])


def _pad(folder):
    f = sorted(folder.glob("model-*.safetensors"))[-1]
    f.write_bytes(f.read_bytes() + b"\0" * 8)


def _wrong_total(folder):
    index = json.loads((folder / INDEX).read_text())
    index["metadata"]["total_size"] += 2
    (folder / INDEX).write_text(json.dumps(index))


def _unlisted_tensor(folder):
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("damage, expected", [
    (_drop_a_shard, "which is missing"), (_stray_shard, "the index does not name"),
    (_truncate, "outside the data section"), (_pad, "cover"), (_wrong_total, "total_size"),
    (_unlisted_tensor, "which the index does not list"),
])
def test_damage_is_named(merged, tmp_path, damage, expected):
    folder = tmp_path / "copy"
    shutil.copytree(merged, folder)
    damage(folder)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    with pytest.raises(merge.MergeError, match=expected):
        merge.verify(folder)
