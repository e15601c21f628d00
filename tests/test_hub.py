"""Models by name (Hub ids, revisions, aliases, --base auto, offline cache) and pushing results to the Hub.

Real HTTP through the official client to the local test Hub (tests/hub_server.py); nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, snapshot_download

import merge
from merge.cli import main
from merge.errors import InputError
from merge.hub import PushError
from merge.io.resolve import ResolvedModel, infer_base
from merge.options import Options
from tests.checkpoints import make_pair

MERGE_EXE = Path(sys.executable).with_name("merge")
WEIGHTS = "model.safetensors"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """Every file's sha256, but mergeback's own hidden marker (a push leaves out hidden files)."""
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".mergeback")}


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n")[0][4:])


def one_line_error(output: str, *needles: str) -> str:
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def run_merge_exe(*args, **env):
    """The installed `merge` console script in a fresh process (HF_* settings are read at import)."""
    full_env = {**os.environ, **env}
    return subprocess.run([str(MERGE_EXE), *map(str, args)], env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="session")
def hub_models(hub_server, tmp_path_factory):
    """On the test Hub: a base repo whose first commit (also branch `v1`) holds base A plus files a merge must
    not fetch, and whose second commit (main) holds base B; a public and a private SFT repo."""
    root = tmp_path_factory.mktemp("hub_models")
    base, sft = make_pair(root / "a")
    base2, _ = make_pair(root / "b", seed=1)
    first_tree = root / "first"
    shutil.copytree(base, first_tree)
    (first_tree / "pytorch_model.bin").write_bytes(b"never fetched: the safetensors copy is preferred")
    (first_tree / "original").mkdir()
    (first_tree / "original" / "consolidated.safetensors").write_bytes(b"not a merge input")
    (first_tree / "notes.txt").write_text("not needed for a merge\n")

    api = HfApi(token=hub_server.write_token)
    base_id, sft_id, private_id = (hub_server.new_repo_id(p) for p in ("base", "sft", "private-sft"))
    api.create_repo(base_id)
    first = api.upload_folder(repo_id=base_id, folder_path=first_tree, commit_message="base A").oid
    api.create_branch(base_id, branch="v1", revision=first)
    second = api.upload_folder(repo_id=base_id, folder_path=base2, commit_message="base B").oid
    api.create_repo(sft_id)
    api.upload_folder(repo_id=sft_id, folder_path=sft)
    api.create_repo(private_id, private=True)
    api.upload_folder(repo_id=private_id, folder_path=sft)
    return SimpleNamespace(base=base, base2=base2, sft=sft, base_id=base_id, sft_id=sft_id, private_id=private_id,
                           first=first, second=second)


@pytest.fixture(scope="session")
def local_merges(hub_models, tmp_path_factory):
    """Reference outputs from local folders: linear t=0.5 of the SFT with base A and with base B."""
    root = tmp_path_factory.mktemp("local_merges")
    for name, base in (("a", hub_models.base), ("b", hub_models.base2)):
        merge.merge("linear", sft=str(hub_models.sft), base=str(base), t=0.5, out=root / name)
    return SimpleNamespace(a=sha256_of(root / "a" / WEIGHTS), b=sha256_of(root / "b" / WEIGHTS))


def test_hub_ids_are_fetched_selectively_and_pinned_in_card_and_recipe(hub_models, local_merges, tmp_path):
    out = tmp_path / "hub"
    summary = merge.merge("linear", sft=hub_models.sft_id, base=hub_models.base_id, t=0.5, out=out)
    assert sha256_of(out / WEIGHTS) == local_merges.b  # main = second commit = base B

    base_in = summary.inputs["base"]
    assert (base_in.repo_id, base_in.revision) == (hub_models.base_id, hub_models.second)
    assert sorted(os.listdir(base_in.path)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    sft_pin = f"{hub_models.sft_id}@{summary.inputs['sft0'].revision}"
    recipe = merge.Recipe.load(out / "merge_recipe.yaml")
    assert recipe.base == f"{hub_models.base_id}@{hub_models.second}" and recipe.sft[0].model == sft_pin
    front = front_matter(out / "README.md")
    assert front["base_model"] == [hub_models.base_id, hub_models.sft_id]
    assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
    assert "merge" in front["tags"] and f"`{hub_models.base_id}@{hub_models.second}`" in (out / "README.md").read_text()

    r = cli("run", out / "merge_recipe.yaml", "-o", tmp_path / "again", "-q")  # resolves repo@sha again
    assert r.exit_code == 0, r.output
    assert sha256_of(tmp_path / "again" / WEIGHTS) == local_merges.b


def test_pinned_revision_by_commit_and_by_branch(hub_models, local_merges, tmp_path):
    for i, revision in enumerate((hub_models.first, "v1")):
        out = tmp_path / f"o{i}"
        summary = merge.merge("linear", sft=str(hub_models.sft), base=f"{hub_models.base_id}@{revision}", t=0.5,
                              out=out)
        assert sha256_of(out / WEIGHTS) == local_merges.a
        assert summary.inputs["base"].revision == hub_models.first
        assert merge.Recipe.load(out / "merge_recipe.yaml").base == f"{hub_models.base_id}@{hub_models.first}"


def test_missing_repo_revision_and_private_repo_are_one_line_errors(hub_server, hub_models, tmp_path):
    common = ["linear", "--sft", hub_models.sft, "--t", "0.5", "-o", tmp_path / "o"]
    missing = hub_server.new_repo_id("missing")
    one_line_error(cli(*common, "--base", missing).output, "no local folder, alias or Hub repo")
    r = cli(*common, "--base", f"{hub_models.base_id}@no-such-branch")
    assert r.exit_code == 2
    one_line_error(r.output, "has no revision 'no-such-branch'")
    r = cli("linear", "--sft", hub_models.private_id, "--base", hub_models.base_id, "--t", "0.5", "-o", tmp_path / "o")
    assert r.exit_code == 2
    one_line_error(r.output, "hf auth login", hub_models.private_id)
    one_line_error(cli(*common, "--base", "not-an-alias").output, "merge aliases")
    assert not (tmp_path / "o").exists()
    # The Python API takes a token for private inputs.
    summary = merge.merge("linear", sft=hub_models.private_id, base=hub_models.base_id, t=0.5, out=tmp_path / "p",
                          options=Options.of(token=hub_server.read_token))
    assert summary.inputs["sft0"].repo_id == hub_models.private_id


def test_aliases_from_user_file_and_xdg_config(hub_models, local_merges, tmp_path, monkeypatch):
    alias_file = tmp_path / "aliases.yaml"
    alias_file.write_text(f"tiny-base: {hub_models.base_id}@v1\n")
    monkeypatch.setenv("MERGEBACK_ALIASES", str(alias_file))
    listing = cli("aliases").output
    assert "llama3 " in listing and "meta-llama/Meta-Llama-3-8B" in listing
    rows = {line.split()[0]: line.split()[1:] for line in listing.splitlines()}
    assert rows["tiny-base"] == [f"{hub_models.base_id}@v1", f"({alias_file})"]

    r = cli("linear", "--sft", hub_models.sft, "--base", "tiny-base", "--t", "0.5", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert sha256_of(tmp_path / "o" / WEIGHTS) == local_merges.a
    assert merge.Recipe.load(tmp_path / "o" / "merge_recipe.yaml").base == f"{hub_models.base_id}@{hub_models.first}"

    alias_file.write_text("tiny-base: [unclosed\n")
    one_line_error(cli("aliases").output, str(alias_file), "not valid YAML")

    monkeypatch.delenv("MERGEBACK_ALIASES")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "mergeback").mkdir(parents=True)
    (tmp_path / "xdg" / "mergeback" / "aliases.yaml").write_text("llama3: me/my-llama\n")
    assert {a.name: a.target for a in merge.list_aliases()}["llama3"] == "me/my-llama"  # the user's entry wins


def test_base_auto_from_config_then_card_else_asks_for_base(hub_models, local_merges, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(hub_models.sft, sft)
    config = json.loads((sft / "config.json").read_text())
    (sft / "config.json").write_text(json.dumps({**config, "_name_or_path": f"{hub_models.base_id}@v1"}))
    summary = merge.merge("linear", sft=str(sft), base="auto", t=0.5, out=tmp_path / "o1")
    assert sha256_of(tmp_path / "o1" / WEIGHTS) == local_merges.a
    assert f"base: auto chose {hub_models.base_id}@v1 (from the SFT's config.json _name_or_path)" in summary.notes
    assert "auto chose" in summary.report()

    # The card's base_model outranks a training-machine path in config.json.
    (sft / "config.json").write_text(json.dumps({**config, "_name_or_path": "/scratch/run7/checkpoint-500"}))
    (sft / "README.md").write_text(f"---\nbase_model: {hub_models.base_id}\nlicense: mit\n---\n# med\n")
    summary = merge.merge("linear", sft=str(sft), base="auto", t=0.5, out=tmp_path / "o2")
    assert sha256_of(tmp_path / "o2" / WEIGHTS) == local_merges.b
    assert any("README.md base_model" in n for n in summary.notes)

    (sft / "README.md").unlink()
    r = cli("linear", "--sft", sft, "--base", "auto", "--t", "0.5", "-o", tmp_path / "o3")
    assert r.exit_code == 2
    one_line_error(r.output, "--base auto", "pass --base")
    assert not (tmp_path / "o3").exists()


def test_base_auto_prefers_the_adapter_config(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    (adapter / "config.json").write_text(json.dumps({"_name_or_path": "someone/else"}))
    assert infer_base(ResolvedModel("adapter", adapter)) == ("meta-llama/Llama-3.1-8B",
                                                             "adapter_config.json base_model_name_or_path")
    with pytest.raises(InputError, match="pass --base"):
        infer_base(ResolvedModel("x", tmp_path))


def test_offline_merge_uses_the_warm_cache(hub_server, hub_models, local_merges, tmp_path):
    # Warms the cache (a dry run would not: it reads only the weights' headers).
    merge.merge("linear", sft=hub_models.sft_id, base=hub_models.base_id, t=0.5, out=tmp_path / "warm")
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a dead endpoint: no request may go out
    r = run_merge_exe("linear", "--sft", hub_models.sft_id, "--base", hub_models.base_id, "--t", "0.5",
                      "-o", tmp_path / "o", "-q", **offline)
    assert r.returncode == 0, r.stderr
    assert sha256_of(tmp_path / "o" / WEIGHTS) == local_merges.b
    assert merge.Recipe.load(tmp_path / "o" / "merge_recipe.yaml").base == f"{hub_models.base_id}@{hub_models.second}"

    r = run_merge_exe("linear", "--sft", hub_models.sft_id, "--base", hub_server.new_repo_id("never-fetched"),
                      "--t", "0.5", "-o", tmp_path / "o2", **offline)
    assert r.returncode == 2
    one_line_error(r.stderr, "not in the local cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "o2").exists()


def test_push_public_round_trip_private_and_branch(hub_server, hub_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    repo = hub_server.new_repo_id("recovered")
    summary = merge.merge("slerp", sft=str(hub_models.sft), base=hub_models.base_id, t=0.3,
                          options=Options.of(push_to_hub=repo, token=hub_server.write_token))
    out = tmp_path / repo.split("/")[1]  # no out given: ./NAME
    assert summary.out == out and summary.pushed_to == f"{hub_server.endpoint}/{repo}"
    assert f"pushed to {hub_server.endpoint}/{repo}" in summary.report()

    snapshot = Path(snapshot_download(repo, cache_dir=tmp_path / "cache"))  # public: no token needed
    pulled = folder_digests(snapshot)
    assert pulled.pop(".gitattributes")
    assert pulled == folder_digests(out)
    front = front_matter(snapshot / "README.md")
    assert front["base_model"] == [hub_models.base_id] and front["base_model_relation"] == "merge"

    private = hub_server.new_repo_id("private-out")
    url = merge.push(out, private, private=True, commit_message="first push", token=hub_server.write_token)
    assert url == f"{hub_server.endpoint}/{private}"
    assert not HfApi(token=False).repo_exists(private)
    owner = HfApi(token=hub_server.write_token)
    assert owner.model_info(private).private is True
    assert owner.list_repo_commits(private)[0].title == "first push"

    url = merge.push(out, repo, revision="dev", token=hub_server.write_token)
    assert url == f"{hub_server.endpoint}/{repo}/tree/dev"
    assert "dev" in {b.name for b in HfApi().list_repo_refs(repo).branches}

    with pytest.raises(PushError, match="HTTP 403.*intact - retry with: merge push"):
        merge.push(out, repo, token=hub_server.read_token)
    with pytest.raises(PushError, match="no Hub token found"):
        merge.push(out, repo)  # conftest clears HF_TOKEN and HF_HOME holds no login


def test_failed_push_keeps_output_and_merge_push_retries(hub_server, hub_models, tmp_path):
    repo, out = hub_server.new_repo_id("retry"), tmp_path / "o"
    bad = "hf_bad_token_that_must_never_be_printed"
    # Local inputs: the Hub refuses an invalid token even for public downloads.
    r = run_merge_exe("linear", "--sft", hub_models.sft, "--base", hub_models.base, "--t", "0.3", "-o", out,
                      "--push-to-hub", repo, HF_TOKEN=bad)
    assert r.returncode == 2
    line = one_line_error(r.stderr, "HTTP 401", "intact", f"merge push {out} {repo}")
    assert bad not in r.stdout + r.stderr and "Traceback" not in r.stderr
    merge.verify(out)  # the local output is complete
    local = folder_digests(out)

    program, *args = shlex.split(line.split("retry with: ")[1])
    assert program == "merge"
    r = run_merge_exe(*args, HF_TOKEN=hub_server.write_token)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pushed {out} to {hub_server.endpoint}/{repo}"
    assert hub_server.write_token not in r.stdout + r.stderr
    pulled = folder_digests(Path(snapshot_download(repo, cache_dir=tmp_path / "cache")))
    pulled.pop(".gitattributes")
    assert pulled == local
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert hub_server.write_token.encode() not in data and bad.encode() not in data
