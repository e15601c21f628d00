"""The local Hub test server against the real huggingface_hub client (push, pull, revisions, errors)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from tests.hub_fixtures import start_hub_server, stop_hub_server

BIG_TEXT_SIZE = 10 * 1024 * 1024 + 123  # above the Hub's 10 MiB LFS threshold, though it is plain text


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its posix path relative to `folder`."""
    return {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def make_model_folder(folder: Path) -> Path:
    """A small regular file, a nested one, a small binary (LFS by content) and a >10 MiB text file (LFS by size)."""
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "sub" / "notes.md").write_text("nested file\n")
    (folder / "model.safetensors").write_bytes(b"\0\1\2\3" * 4096 + os.urandom(1000))
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
    (folder / "big.txt").write_bytes((line * (BIG_TEXT_SIZE // len(line) + 1))[:BIG_TEXT_SIZE])
    return folder


@pytest.fixture(scope="module")
def pushed_repo(hub_server, tmp_path_factory):
    """A public repo with two commits on main: the model folder, then an edited config and a deleted note."""
    api = HfApi(token=hub_server.write_token)
    repo_id = hub_server.new_repo_id("pushed")
    api.create_repo(repo_id)
    source = make_model_folder(tmp_path_factory.mktemp("source"))
    first = api.upload_folder(repo_id=repo_id, folder_path=source, commit_message="add model")
    first_digests = folder_digests(source)
    (source / "config.json").write_text(json.dumps({"hidden_size": 16}))
    (source / "sub" / "notes.md").unlink()
    second = api.upload_folder(repo_id=repo_id, folder_path=source, commit_message="edit config",
                               delete_patterns=["sub/*"])
    return {"repo_id": repo_id, "first": first.oid, "second": second.oid, "first_digests": first_digests,
            "second_digests": folder_digests(source)}


def test_whoami_reports_user_and_role_and_rejects_unknown_token(hub_server):
    api = HfApi()
    assert api.whoami(token=hub_server.write_token)["name"] == "alice"
    assert api.whoami(token=hub_server.read_token)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as error:
        api.whoami(token="hf_not_a_known_token")
    assert error.value.response.status_code == 401


def test_create_repo_conflicts_unless_exist_ok_and_hides_private_repos(hub_server):
    api = HfApi(token=hub_server.write_token)
    public_id, private_id = hub_server.new_repo_id("public"), hub_server.new_repo_id("private")
    assert api.create_repo(public_id).repo_id == public_id
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(public_id)
    assert error.value.response.status_code == 409
    api.create_repo(public_id, exist_ok=True)
    api.create_repo(private_id, private=True)

    assert api.model_info(private_id).private is True
    assert api.model_info(private_id, token=hub_server.read_token).sha == api.model_info(private_id).sha
    assert HfApi(token=False).model_info(public_id).private is False
    for token in (False, hub_server.other_token):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info(private_id)
        assert not HfApi(token=token).repo_exists(private_id)


def test_upload_folder_uses_lfs_for_binary_and_big_files(hub_server, pushed_repo):
    api = HfApi(token=hub_server.read_token)
    entries = {e.path: e for e in api.list_repo_tree(pushed_repo["repo_id"], revision=pushed_repo["first"],
                                                      recursive=True) if isinstance(e, RepoFile)}
    assert set(entries) == {".gitattributes", "config.json", "sub/notes.md", "model.safetensors", "big.txt"}
    assert {path for path, entry in entries.items() if entry.lfs is not None} == {"model.safetensors", "big.txt"}
    assert entries["big.txt"].lfs.sha256 == pushed_repo["first_digests"]["big.txt"]
    assert entries["big.txt"].size == BIG_TEXT_SIZE
    top_level = {e.path for e in api.list_repo_tree(pushed_repo["repo_id"], revision=pushed_repo["first"])}
    assert "sub" in top_level and "sub/notes.md" not in top_level


def test_snapshot_download_round_trips_every_file(hub_server, pushed_repo, tmp_path):
    snapshot = Path(snapshot_download(pushed_repo["repo_id"], cache_dir=tmp_path))
    downloaded = folder_digests(snapshot)
    assert downloaded.pop(".gitattributes")
    assert downloaded == pushed_repo["second_digests"]
    assert snapshot.name == pushed_repo["second"]


def test_pinned_revision_downloads_the_old_commit(hub_server, pushed_repo, tmp_path):
    repo_id, first = pushed_repo["repo_id"], pushed_repo["first"]
    old_config = hf_hub_download(repo_id, "config.json", revision=first, cache_dir=tmp_path)
    new_config = hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)
    assert json.loads(Path(old_config).read_text()) == {"hidden_size": 8}
    assert json.loads(Path(new_config).read_text()) == {"hidden_size": 16}
    old_snapshot = folder_digests(Path(snapshot_download(repo_id, revision=first, cache_dir=tmp_path)))
    old_snapshot.pop(".gitattributes")
    assert old_snapshot == pushed_repo["first_digests"]
    assert [c.commit_id for c in HfApi().list_repo_commits(repo_id)][:2] == [pushed_repo["second"], first]


def test_branch_commits_leave_main_untouched(hub_server, pushed_repo, tmp_path):
    api = HfApi(token=hub_server.write_token)
    repo_id, branch = pushed_repo["repo_id"], "dev"
    api.create_branch(repo_id, branch=branch)
    commit = api.upload_file(path_or_fileobj=b"on a branch\n", path_in_repo="branch.txt", repo_id=repo_id,
                             revision=branch)
    assert api.model_info(repo_id, revision=branch).sha == commit.oid
    assert api.model_info(repo_id).sha == pushed_repo["second"]
    assert Path(hf_hub_download(repo_id, "branch.txt", revision=branch, cache_dir=tmp_path)).read_bytes() == \
        b"on a branch\n"
    assert branch in {ref.name for ref in api.list_repo_refs(repo_id).branches}


def test_write_without_or_with_wrong_token_is_refused(hub_server, pushed_repo):
    upload = {"path_or_fileobj": b"x", "path_in_repo": "x.txt", "repo_id": pushed_repo["repo_id"]}
    for token, status in ((False, 401), ("hf_not_a_known_token", 401), (hub_server.read_token, 403),
                          (hub_server.other_token, 403)):
        with pytest.raises(HfHubHTTPError) as error:
            HfApi(token=token).upload_file(**upload)
        assert error.value.response.status_code == status
        assert not isinstance(error.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=hub_server.other_token).create_repo(hub_server.new_repo_id("not-yours"))
    assert error.value.response.status_code == 403


def test_missing_repo_revision_and_file_map_to_client_errors(hub_server, pushed_repo, tmp_path):
    repo_id = pushed_repo["repo_id"]
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_server.new_repo_id("missing"), "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(repo_id, revision="f" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "no_such_file.json", cache_dir=tmp_path)
    assert not HfApi().file_exists(repo_id, "sub/notes.md")
    assert HfApi().file_exists(repo_id, "sub/notes.md", revision=pushed_repo["first"])


def test_offline_mode_serves_the_warm_cache(hub_server, pushed_repo, tmp_path):
    online = Path(snapshot_download(pushed_repo["repo_id"], cache_dir=tmp_path))
    # HF_HUB_OFFLINE is read at import, hence the subprocess; the dead endpoint proves no request is needed.
    script = textwrap.dedent("""
        import json, sys
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        repo_id, cache_dir, missing = sys.argv[1:4]
        snapshot = snapshot_download(repo_id, cache_dir=cache_dir)
        config = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir)
        try:
            snapshot_download(missing, cache_dir=cache_dir)
            missing_error = None
        except LocalEntryNotFoundError as error:
            missing_error = type(error).__name__
        print(json.dumps({"snapshot": snapshot, "config": config, "missing_error": missing_error}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", script, pushed_repo["repo_id"], str(tmp_path),
                             hub_server.new_repo_id("never-downloaded")],
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["snapshot"]) == online
    assert folder_digests(Path(report["snapshot"])) == folder_digests(online)
    assert json.loads(Path(report["config"]).read_text()) == {"hidden_size": 16}
    assert report["missing_error"] == "LocalEntryNotFoundError"


def test_server_picks_a_free_port_keeps_repos_across_restarts_and_never_logs_tokens(tmp_path):
    token = "hf_secret_value_that_must_not_be_logged"
    tokens = {token: {"user": "carol", "role": "write"}}
    log_path = tmp_path / "server.log"
    process, port = start_hub_server(tmp_path / "repos", 0, tokens, log_path)
    try:
        api = HfApi(endpoint=f"http://127.0.0.1:{port}", token=token)
        assert api.whoami()["name"] == "carol"
        commit = api.upload_file(path_or_fileobj=b"kept", path_in_repo="a.txt",
                                 repo_id=api.create_repo("carol/kept").repo_id)
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=api.endpoint, token="hf_wrong_secret_value").whoami()
    finally:
        assert stop_hub_server(process) == 0
    process, port = start_hub_server(tmp_path / "repos", 0, tokens, log_path)
    try:
        assert HfApi(endpoint=f"http://127.0.0.1:{port}").model_info("carol/kept").sha == commit.oid
    finally:
        assert stop_hub_server(process) == 0
    log = log_path.read_text()
    assert "POST /api/repos/create" in log
    assert token not in log and "hf_wrong_secret_value" not in log
