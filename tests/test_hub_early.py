"""Hub inputs are checked from config files and safetensors headers before any weight is downloaded.

Real HTTP through the official client to the local test Hub (tests/hub_server.py), whose request log says
what was fetched: a weight file read whole is a GET answered 200, a header read is a ranged GET (206).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import merge
from merge.cli import main
from merge.hub import HEADER_PROBE_BYTES, read_headers
from merge.io.safetensors_file import read_header
from merge.options import Options
from tests.checkpoints import perturb, save_tokenizer

MERGE_EXE = Path(sys.executable).with_name("merge")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a dead endpoint: no request may go out
LINE = re.compile(r"^\[hub_server\] (\w+) (\S+) (\d+)(?: range=(\S+))?$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    range: str | None


def requests_for(hub_server, repo_id: str) -> list[Request]:
    """The requests the test Hub logged for ``repo_id`` (repo ids are unique per test)."""
    found = []
    for line in hub_server.log_path.read_text().splitlines():
        m = LINE.match(line)
        if m and f"/{repo_id}/" in m[2] + "/":
            found.append(Request(m[1], m[2], int(m[3]), m[4]))
    return found


def weight_reads(hub_server, repo_id: str) -> list[Request]:
    return [r for r in requests_for(hub_server, repo_id)
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(".safetensors")]


def assert_no_weights_downloaded(hub_server, repo_id: str, folder: Path) -> None:
    """Only ranged header reads of the weights on the wire, and no blob of a weight file's size in the cache."""
    reads = weight_reads(hub_server, repo_id)
    assert reads, f"no header of {repo_id} was read"
    for r in reads:
        assert r.status == 206 and r.range == f"bytes=0-{HEADER_PROBE_BYTES - 1}", r
    sizes = {p.stat().st_size for p in folder.glob("*.safetensors")}
    assert min(sizes) > HEADER_PROBE_BYTES  # so a header read is not the whole file
    blobs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    assert not [p for p in blobs.glob("*") if p.stat().st_size in sizes]


def save_llama(folder: Path, seed: int = 0, fine_tune: int | None = None, shard: str | None = None, **changes):
    """A small Llama (weights well above HEADER_PROBE_BYTES) with a tokenizer; ``fine_tune`` seeds a perturbation."""
    fields = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    fields.update(changes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16)
    if fine_tune is not None:
        perturb(model, fine_tune)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    save_tokenizer(folder, fields["vocab_size"])
    return folder


@pytest.fixture
def upload(hub_server):
    """Put a folder on the test Hub as a fresh repo; returns its id."""
    api = HfApi(token=hub_server.write_token)

    def put(folder: Path, prefix: str) -> str:
        repo_id = hub_server.new_repo_id(prefix)
        api.create_repo(repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=folder)
        return repo_id

    return put


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    return {
        "base": save_llama(root / "base"),
        "sft": save_llama(root / "sft", fine_tune=7),
        "layers": save_llama(root / "layers", fine_tune=7, num_hidden_layers=2),
        "vocab": save_llama(root / "vocab", fine_tune=7, vocab_size=80),
        "width": save_llama(root / "width", fine_tune=7, intermediate_size=192),
        "sharded_base": save_llama(root / "sharded_base", shard="400KB"),
        "sharded_sft": save_llama(root / "sharded_sft", fine_tune=7, shard="400KB"),
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(output: str, *needles: str) -> str:
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind, message", [
    ("layers", "config.json: num_hidden_layers is 3 in base"),
    ("vocab", "tensor 'lm_head.weight': shape [96, 128] in base"),
    ("width", "tensor 'model.layers.0.mlp.down_proj.weight': shape [128, 256] in base"),
])
def test_a_mismatched_hub_sft_fails_from_headers_before_any_weight_download(hub_server, folders, upload, tmp_path,
                                                                           kind, message):
    base_id, sft_id = upload(folders["base"], "base"), upload(folders[kind], kind)
    r = CliRunner().invoke(main, ["linear", "--sft", sft_id, "--base", base_id, "--t", "0.5", "-o",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2
    one_line_error(r.output, message, sft_id, base_id)
    assert not (tmp_path / "o").exists()
    assert_no_weights_downloaded(hub_server, base_id, folders["base"])
    assert_no_weights_downloaded(hub_server, sft_id, folders[kind])


def test_dry_run_and_merge_plan_read_headers_only(hub_server, folders, upload, tmp_path):
    base_id, sft_id = upload(folders["base"], "base"), upload(folders["sft"], "sft")
    local = merge.merge("linear", sft=str(folders["sft"]), base=str(folders["base"]), t=0.5,
                        options=Options.of(dry_run=True))
    summary = merge.merge("linear", sft=sft_id, base=base_id, t=0.5, options=Options.of(dry_run=True))
    assert (summary.tensors, summary.output_bytes, summary.shards) == (local.tensors, local.output_bytes, local.shards)
    assert summary.peak_bytes == local.peak_bytes
    assert summary.parameter_table == local.parameter_table
    snapshot = summary.inputs["base"].path
    assert (snapshot / "config.json").is_file() and not (snapshot / "model.safetensors").exists()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: slerp\nbase: {base_id}\nsft: {sft_id}\nt: 0.3\n")
    r = CliRunner().invoke(main, ["plan", str(recipe)])
    assert r.exit_code == 0, r.output
    for repo_id, kind in ((base_id, "base"), (sft_id, "sft")):
        assert_no_weights_downloaded(hub_server, repo_id, folders[kind])

    # Offline, a cache warmed by a dry run has no weights to merge: one line saying so.
    r = run_merge_exe("linear", "--sft", sft_id, "--base", base_id, "--t", "0.5", "-o", tmp_path / "o", **OFFLINE)
    assert r.returncode == 2
    one_line_error(r.stderr, "holds no weights", "HF_HUB_OFFLINE", "run the merge once with network access")
    assert not (tmp_path / "o").exists()


def run_merge_exe(*args, **env):
    """The installed `merge` console script in a fresh process (HF_* settings are read at import)."""
    return subprocess.run([str(MERGE_EXE), *map(str, args)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_a_valid_sharded_hub_merge_checks_headers_then_downloads_once(hub_server, folders, upload, tmp_path):
    base_id, sft_id = upload(folders["sharded_base"], "base"), upload(folders["sharded_sft"], "sft")
    merge.merge("linear", sft=str(folders["sharded_sft"]), base=str(folders["sharded_base"]), t=0.5,
                out=tmp_path / "local", max_shard_size="400KB")
    summary = merge.merge("linear", sft=sft_id, base=base_id, t=0.5, out=tmp_path / "hub", max_shard_size="400KB")
    digests = {p.name: sha256_of(p) for p in (tmp_path / "local").glob("*.safetensors")}
    assert len(digests) > 1  # sharded output
    assert {p.name: sha256_of(p) for p in (tmp_path / "hub").glob("*.safetensors")} == digests
    assert summary.inputs["base"].pending == ()

    for repo_id, folder in ((base_id, folders["sharded_base"]), (sft_id, folders["sharded_sft"])):
        reads = weight_reads(hub_server, repo_id)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        assert len(shards) > 1
        headers = [r for r in reads if r.status == 206]
        whole = [r for r in reads if r.status == 200]
        assert sorted(r.path.rsplit("/", 1)[1] for r in headers) == shards  # one header read per shard ...
        assert sorted(r.path.rsplit("/", 1)[1] for r in whole) == shards  # ... and one download
        assert reads.index(whole[0]) > max(reads.index(r) for r in headers)  # every check before any download

    # The warm cache merges offline, byte-identical, and so does a dry run.
    r = run_merge_exe("linear", "--sft", sft_id, "--base", base_id, "--t", "0.5", "-o", tmp_path / "offline",
                      "--max-shard-size", "400KB", "-q", **OFFLINE)
    assert r.returncode == 0, r.stderr
    assert {p.name: sha256_of(p) for p in (tmp_path / "offline").glob("*.safetensors")} == digests
    r = run_merge_exe("linear", "--sft", sft_id, "--base", base_id, "--t", "0.5", "--dry-run", **OFFLINE)
    assert r.returncode == 0, r.stderr


def test_a_local_lora_adapter_over_a_hub_base_is_planned_from_headers(hub_server, folders, upload, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig.from_pretrained(folders["base"])
    model = get_peft_model(LlamaForCausalLM.from_pretrained(folders["base"], dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    assert config.num_hidden_layers == 3
    model.save_pretrained(tmp_path / "adapter")
    base_id = upload(folders["base"], "base")
    merge.merge("linear", sft=str(tmp_path / "adapter"), base=str(folders["base"]), t=0.0, out=tmp_path / "local")
    merge.merge("linear", sft=str(tmp_path / "adapter"), base=base_id, t=0.0, options=Options.of(dry_run=True))
    assert_no_weights_downloaded(hub_server, base_id, folders["base"])
    assert len(weight_reads(hub_server, base_id)) == 1  # the adapter and the run share one header read
    merge.merge("linear", sft=str(tmp_path / "adapter"), base=base_id, t=0.0, out=tmp_path / "hub")
    assert sha256_of(tmp_path / "hub" / "model.safetensors") == sha256_of(tmp_path / "local" / "model.safetensors")


def test_a_header_larger_than_the_first_read_takes_a_second_range(hub_server, folders, upload, tmp_path):
    folder = tmp_path / "padded"
    folder.mkdir()
    save_file(load_file(folders["base"] / "model.safetensors"), folder / "model.safetensors",
              metadata={"format": "pt", "padding": "x" * (2 * HEADER_PROBE_BYTES)})
    repo_id = upload(folder, "padded")
    commit = HfApi().model_info(repo_id).sha
    assert read_headers(repo_id, commit, ["model.safetensors"], "test") == {
        "model.safetensors": read_header(folder / "model.safetensors")}
    header_len = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert [(r.status, r.range) for r in weight_reads(hub_server, repo_id)] == [
        (206, f"bytes=0-{HEADER_PROBE_BYTES - 1}"), (206, f"bytes={HEADER_PROBE_BYTES}-{header_len + 7}")]


def test_a_hub_models_config_is_read_before_its_weights(hub_server, folders, upload, tmp_path):
    """What the quantisation rules look at (config.json's quantization_config) is there before any download."""
    import json
    import shutil

    from merge import api
    from merge.io.remote import HeaderCheckpoint
    from merge.io.resolve import resolve_model

    folder = tmp_path / "fp8"
    shutil.copytree(folders["sft"], folder)
    config = json.loads((folder / "config.json").read_text())
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    repo_id = upload(folder, "fp8")
    resolved = resolve_model(repo_id, "SFT", weights=False)
    assert resolved.pending == ("model.safetensors",)
    from merge.errors import InputError

    # an fp8 config whose headers hold no scale tensors: refused by the quantisation rules from headers alone
    with pytest.raises(InputError, match="fp8"):
        api.open_model(resolved, f"SFT {repo_id}", {"sft0": resolved})
    from merge.hub import read_headers

    headers = read_headers(resolved.repo_id, resolved.revision, resolved.pending, "SFT")
    with HeaderCheckpoint(resolved.path, headers, role="SFT") as model:
        assert model.config["quantization_config"] == quant
        assert model.info("lm_head.weight").shape == (96, 128)
        with pytest.raises(RuntimeError, match="only its header was read"):
            model.view("lm_head.weight")
    assert_no_weights_downloaded(hub_server, repo_id, folder)
