"""Hostile and broken inputs, end to end through the CLI: one line on stderr, exit 2, nothing written."""

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from merge.cli import main
from tests.helpers import load_tensors

INDEX = "model.safetensors.index.json"


def read_parts(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_parts(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, change) -> None:
    header, data = read_parts(path)
    change(header)
    write_parts(path, header, data)


def first_shard(folder: Path) -> Path:
    return folder / sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[0]


def set_index_entry(folder: Path, value) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = value
    (folder / INDEX).write_text(json.dumps(index))


class Evil:
    """Pickled code: unpickling runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# Each case damages a copy of the SFT folder (single file "model.safetensors", or sharded).
def _truncated(sft, tmp):
    f = sft / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _header_longer_than_file(sft, tmp):
    f = sft / "model.safetensors"
    f.write_bytes(struct.pack("<Q", f.stat().st_size * 4) + f.read_bytes()[8:])


def _header_not_json(sft, tmp):
    _, data = read_parts(sft / "model.safetensors")
    write_parts(sft / "model.safetensors", b"{'dtype': F32, oops" + b" " * 5, data)


def _overlapping_offsets(sft, tmp):
    def change(h):
        h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = \
            h["model.layers.0.input_layernorm.weight"]["data_offsets"]
    edit_header(sft / "model.safetensors", change)


def _offsets_out_of_range(sft, tmp):
    def change(h):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]
    edit_header(sft / "model.safetensors", change)


def _unknown_dtype(sft, tmp):
    edit_header(sft / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F12"))


def _index_names_missing_shard(sft, tmp):
    first_shard(sft).unlink()


def _index_dotdot(sft, tmp):
    shutil.copy(first_shard(sft), tmp / "outside.safetensors")
    set_index_entry(sft, "../outside.safetensors")


def _index_absolute(sft, tmp):
    shutil.copy(first_shard(sft), tmp / "outside.safetensors")
    set_index_entry(sft, str(tmp / "outside.safetensors"))


def _index_symlink_out(sft, tmp):
    shard = first_shard(sft)
    shutil.move(shard, tmp / "outside.safetensors")
    shard.symlink_to(tmp / "outside.safetensors")


def _index_lists_absent_tensor(sft, tmp):
    index = json.loads((sft / INDEX).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_shard(sft).name
    (sft / INDEX).write_text(json.dumps(index))


def _bin_with_pickled_code(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": Evil(tmp / "pwned")}, sft / "pytorch_model.bin")


def _bin_raw_pickle(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()
    with open(sft / "pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(tmp / "pwned"), f)


def _empty_folder(sft, tmp):
    shutil.rmtree(sft)
    sft.mkdir()


def _config_but_no_weights(sft, tmp):
    for f in sft.glob("*.safetensors"):
        f.unlink()


CASES = {
    "truncated": (_truncated, False, "outside the data section"),
    "header_longer_than_file": (_header_longer_than_file, False, "exceeds the file size"),
    "header_not_json": (_header_not_json, False, "header is not valid JSON"),
    "overlapping_offsets": (_overlapping_offsets, False, "overlap"),
    "offsets_out_of_range": (_offsets_out_of_range, False, "outside the data section"),
    "unknown_dtype": (_unknown_dtype, False, "unknown dtype 'F12'"),
    "index_names_missing_shard": (_index_names_missing_shard, True, "which is missing"),
    "index_dotdot": (_index_dotdot, True, "points outside the model folder"),
    "index_absolute_path": (_index_absolute, True, "must be file names inside the model folder"),
    "index_symlink_out": (_index_symlink_out, True, "outside the model folder"),
    "index_lists_absent_tensor": (_index_lists_absent_tensor, True, "that shard does not hold it"),
    "bin_with_pickled_code": (_bin_with_pickled_code, False, "refused to load"),
    "bin_raw_pickle": (_bin_raw_pickle, False, "refused to load"),
    "empty_folder": (_empty_folder, False, "holds no model weights"),
    "config_but_no_weights": (_config_but_no_weights, False, "has a config.json but no weights"),
}


def assert_clean_refusal(result, root: Path, out: Path, expected: str) -> None:
    """Exit 2, exactly one 'error:' line naming the problem, no traceback, nothing written next to the inputs."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p.name for p in root.iterdir() if "mergeback" in p.name]  # no staging folder, no lock


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_sft_is_refused_cleanly(pairs, tmp_path, case):
    damage, sharded, expected = CASES[case]
    base, pristine = pairs("llama", torch.float32, shard_size="40KB") if sharded else pairs("llama", torch.float32)
    sft = tmp_path / "sft"
    shutil.copytree(pristine, sft)
    damage(sft, tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.5", "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, expected)
    assert not (tmp_path / "pwned").exists()


def test_safetensors_preferred_over_a_malicious_bin(pairs, tmp_path):
    base, pristine = pairs("llama", torch.float32)
    sft = tmp_path / "sft"
    shutil.copytree(pristine, sft)
    torch.save({"model.embed_tokens.weight": Evil(tmp_path / "pwned")}, sft / "pytorch_model.bin")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "pwned").exists()
    assert load_tensors(out).keys() == load_tensors(pristine).keys()


def test_sft_of_another_architecture_is_refused(pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    _, gpt2 = pairs("gpt2", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["slerp", "--sft", str(gpt2), "--base", str(base), "--t", "0.5", "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "same architecture")


@pytest.mark.parametrize("t", ["nan", "inf", "-inf"])
def test_non_finite_t_is_refused(pairs, tmp_path, t):
    base, sft = pairs("llama", torch.float32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["linear", "--sft", str(sft), "--base", str(base), "--t", t, "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "finite")


def test_non_finite_t_is_refused_in_python(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    with pytest.raises(merge.MergeError, match="finite"):
        merge.merge("linear", sft=sft, base=base, t=float("nan"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_floating_tensors_are_copied_from_the_sft_never_interpolated(pairs, tmp_path):
    base0, sft0 = pairs("llama", torch.float32)
    base, sft = tmp_path / "base", tmp_path / "sft"
    for src, dst, value in ((base0, base, 7), (sft0, sft, 3)):
        shutil.copytree(src, dst)
        tensors = load_file(dst / "model.safetensors")
        tensors["model.position_ids"] = torch.arange(16, dtype=torch.int64) * value
        tensors["model.mask"] = torch.arange(16) % value == 0
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    assert out["model.position_ids"].dtype == torch.int64
    assert torch.equal(out["model.position_ids"], torch.arange(16) * 3)
    assert torch.equal(out["model.mask"], torch.arange(16) % 3 == 0)


@pytest.mark.parametrize("text", ["method: [linear\n  base: {oops", "- just\n- a list\n", "\x00\x01binary", ""])
def test_a_recipe_that_is_not_yaml_is_refused(tmp_path, text):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out)])
    assert_clean_refusal(result, tmp_path, out, "recipe.yaml")
