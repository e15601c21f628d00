"""A merge never deletes or overwrites what it did not create: OUT may not be an input, the working directory, a
home directory or /; --force replaces only an empty folder or an earlier mergeback output; --resume of a
finished output is a no-op; the interrupt hint is a command that really resumes."""

import hashlib
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.cli import _resume_command, main
from merge.errors import MergeError
from merge.io import output
from merge.options import Options
from tests.helpers import file_bytes
from tests.test_resume import _start_and_stop


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root`` with its content digest and mtime: what must stay exactly as it was."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(root))] = (os.readlink(p), 0)
        elif p.is_file():
            found[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            found[str(p.relative_to(root))] = ("dir", 0)
    return found


def linear(sft, base, out, *extra, t="0.5"):
    return run_cli("linear", "--sft", sft, "--base", base, "--t", t, "-o", out, *extra)


@pytest.fixture
def models(pairs, tmp_path):
    """Copies of the tiny pair in tmp_path/models/{base,med}, so a test may put OUT next to or over them."""
    import shutil

    base, sft = pairs("llama")
    root = tmp_path / "models"
    shutil.copytree(base, root / "base")
    shutil.copytree(sft, root / "med")
    return root / "base", root / "med"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_out_dot_is_the_working_directory_and_refused(models, tmp_path, monkeypatch, force):
    base, sft = models
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "data").mkdir()
    (work / "data" / "x.csv").write_text("1,2\n")
    before = snapshot(work)
    monkeypatch.chdir(work)
    assert_refused(linear(sft, base, ".", *force), "working directory")
    assert_refused(linear(sft, base, "..", *force), "above the working directory")
    assert snapshot(work) == before
    assert not [p for p in tmp_path.iterdir() if "mergeback" in p.name]


@pytest.mark.parametrize("where", ["sft", "inside sft", "inside base", "holds both", "symlink to sft"])
def test_out_may_not_be_contain_or_lie_inside_an_input(models, tmp_path, where):
    base, sft = models
    root = base.parent
    out = {"sft": sft, "inside sft": sft / "merged", "inside base": base / "a" / "b", "holds both": root,
           "symlink to sft": tmp_path / "link"}[where]
    if where == "symlink to sft":
        out.symlink_to(sft, target_is_directory=True)
    before = snapshot(tmp_path)
    assert_refused(linear(sft, base, out, "--force"), "write the merge elsewhere")
    assert snapshot(tmp_path) == before  # nothing deleted, nothing created (no staging folder, no lock)


def test_python_api_refuses_out_equal_to_the_sft(models):
    base, sft = models
    before = snapshot(sft)
    with pytest.raises(MergeError, match="is the folder of SFT"):
        merge.merge("linear", sft=sft, base=base, t=0.5, out=sft, options=Options.of(force=True))
    assert snapshot(sft) == before


def test_out_may_not_contain_a_file_an_input_links_to(models, tmp_path):
    """Like a Hub snapshot, whose files link into the cache's blobs/: OUT must not hold the link targets."""
    base, sft = models
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    for p in sft.iterdir():
        (blobs / p.name).write_bytes(p.read_bytes())
        (linked / p.name).symlink_to(blobs / p.name)
    assert_refused(linear(linked, base, blobs, "--force"), "contains", "write the merge elsewhere")
    assert sorted(p.name for p in blobs.iterdir()) == sorted(p.name for p in sft.iterdir())


def test_home_and_root_are_refused(models, tmp_path, monkeypatch):
    base, sft = models
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    assert_refused(linear(sft, base, home, "--force"), "home directory")
    assert_refused(linear(sft, base, "~", "--force"), "home directory")
    assert [p.name for p in home.iterdir()] == [".bashrc"]
    assert_refused(linear(sft, base, "/", "--force"), "root folder")


def test_force_refuses_a_user_folder_and_a_file(models, tmp_path):
    base, sft = models
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_refused(linear(sft, base, out, "--force"), "keep.txt", "did not write")
    assert snapshot(tmp_path) == before
    (tmp_path / "f").write_text("a file")
    with pytest.raises(MergeError, match="is a file"):  # (the CLI's -o already refuses a file)
        merge.merge("linear", sft=sft, base=base, t=0.5, out=tmp_path / "f", options=Options.of(force=True))
    assert (tmp_path / "f").read_text() == "a file"


def test_force_replaces_an_earlier_output_or_an_empty_folder(models, tmp_path):
    base, sft = models
    out = tmp_path / "o"
    out.mkdir()
    assert linear(sft, base, out, t="0.2").exit_code == 0  # an empty folder is fine, even without --force
    assert (out / output.MARKER).is_file()
    first = file_bytes(out)
    assert linear(sft, base, out, "--force", t="0.7").exit_code == 0
    assert file_bytes(out) != first and "t: 0.7" in (out / "merge_recipe.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o"]  # no old/partial sibling left
    (out / "my-notes.txt").write_text("added by the user")  # now it also holds something we did not write
    assert_refused(linear(sft, base, out, "--force"), "my-notes.txt")
    assert (out / "my-notes.txt").read_text() == "added by the user"


@pytest.mark.parametrize("suffix", ["mergeback-partial", "mergeback-old"])
def test_a_user_folder_with_a_staging_name_is_never_deleted(models, tmp_path, suffix):
    base, sft = models
    side = tmp_path / f".o.{suffix}"
    side.mkdir()
    (side / "thesis.tex").write_text("mine")
    out = tmp_path / "o"
    for extra in ([], ["--force"], ["--resume"]):
        assert_refused(linear(sft, base, out, *extra), str(side), "move it away")
    assert [p.name for p in side.iterdir()] == ["thesis.tex"] and not out.exists()


def test_a_user_file_with_the_lock_name_is_never_truncated(models, tmp_path):
    base, sft = models
    lock = output.lock_path(tmp_path / "o")
    lock.write_text("my data\n")
    assert_refused(linear(sft, base, tmp_path / "o"), str(lock))
    assert lock.read_text() == "my data\n"


def test_resume_of_a_finished_output_is_a_no_op(models, tmp_path):
    base, sft = models
    out = tmp_path / "o"
    assert linear(sft, base, out, t="0.3").exit_code == 0
    before = snapshot(out)
    r = linear(sft, base, out, "--resume", t="0.3")
    assert r.exit_code == 0, r.output
    assert "already complete" in r.output and "nothing written" in r.output
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o"]
    summary = merge.merge("linear", sft=sft, base=base, t=0.3, out=out, options=Options.of(resume=True))
    assert summary.already_complete and snapshot(out) == before


def test_resume_of_another_runs_output_is_one_line_error(models, tmp_path):
    base, sft = models
    out = tmp_path / "o"
    assert linear(sft, base, out, t="0.3").exit_code == 0
    before = snapshot(out)
    assert_refused(linear(sft, base, out, "--resume", t="0.4"), "--resume", "another run", "'t'", "--force")
    assert snapshot(out) == before
    r = linear(sft, base, out, "--resume", "--force", t="0.4")  # --force says: replace it
    assert r.exit_code == 0, r.output
    assert "t: 0.4" in (out / "merge_recipe.yaml").read_text()


def test_interrupt_hint_of_merge_run_is_a_command_that_resumes(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nsft: {sft}\nt: 0.3\nmax_shard_size: 16KB\n")
    reference = tmp_path / "reference"
    merge.run(recipe, out=reference)
    out = tmp_path / "out"
    code, lines = _start_and_stop(["run", str(recipe), "-o", str(out)], 3, signal.SIGINT)
    assert code == 130, lines
    hint = lines[-1].split("continue with: ")[1].strip()
    program, *args = shlex.split(hint)
    assert program == "merge" and args[:2] == ["run", str(recipe)] and "--resume" in args, hint
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resuming the interrupted run" in result.output
    assert file_bytes(out) == file_bytes(reference)


def _hint_for(argv: list[str]) -> str | None:
    """The resume hint the CLI would print if ``merge ARGV`` were interrupted, from click's parsed context."""
    with main.make_context("merge", list(argv)) as ctx:
        name, command, rest = main.resolve_command(ctx, ctx._protected_args + ctx.args)
        with command.make_context(name, rest, parent=ctx):
            return _resume_command()


def test_resume_hint_keeps_t_zero_and_only_where_a_command_can_resume(models, tmp_path):
    base, sft = models
    hint = _hint_for(["linear", "--sft", str(sft), "--base", str(base), "--t", "0", "-o", str(tmp_path / "o")])
    args = shlex.split(hint)[1:]
    assert float(args[args.index("--t") + 1]) == 0 and args[-1] == "--resume"
    assert CliRunner().invoke(main, args).exit_code == 0
    assert _hint_for(["inspect", "--sft", str(sft), "--base", str(base)]) is None
    assert _hint_for(["push", str(tmp_path / "o"), "org/name"]) is None
    assert _hint_for(["linear", "--sft", str(sft), "--base", str(base), "--t", "0", "--dry-run"]) is None


def test_sweep_and_demo_refuse_unsafe_outputs(models, tmp_path):
    base, sft = models
    domain = tmp_path / "domain.txt"
    domain.write_text("Two plus two is four.\n")
    before = snapshot(base.parent)
    r = run_cli("sweep", "--sft", sft, "--base", base, "--domain", domain, "-o", sft / "best", "--force")
    assert_refused(r, "lies inside", "write the merge elsewhere")
    assert snapshot(base.parent) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert_refused(run_cli("demo", "-o", mine, "--force"), "keep.txt")
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    from merge.demo import ASSETS

    assert_refused(run_cli("demo", "-o", ASSETS / "base", "--force"), "demo models")


def test_out_inside_a_hub_snapshot_is_refused(hub_server, models, tmp_path):
    from huggingface_hub import HfApi

    from merge.io.resolve import resolve_model

    base, sft = models
    repo = hub_server.new_repo_id("safety-sft")
    api = HfApi(token=hub_server.write_token)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=sft)
    snap = resolve_model(repo, "SFT").path
    cache = snap.parent.parent  # models--org--name: snapshots/ links into its blobs/
    before = {path: digest for path, (digest, _) in snapshot(cache).items()}
    assert_refused(linear(repo, base, snap / "merged", "--force"), "lies inside the folder of SFT", str(snap))
    for out in (cache, cache / "blobs"):  # refused as folders of files mergeback did not write
        assert_refused(linear(repo, base, out, "--force"))
    assert {path: digest for path, (digest, _) in snapshot(cache).items()} == before
