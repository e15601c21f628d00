"""Crash safety: real merge processes killed at seeded-random tensor boundaries resume to byte-identical
output; changed recipes/inputs are refused; full disks, Ctrl-C, concurrent runs and NaNs end cleanly."""

import errno
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from merge.cli import main
from merge.io import output
from merge.io.manifest import MANIFEST_NAME
from merge.options import Options
from tests.helpers import file_bytes

SHARD = "16KB"  # the tiny float32 llama (~136 KB) becomes 12 shards of a few tensors each
KEPT = ("config.json", "merge_recipe.yaml", "model.safetensors.index.json", "tokenizer.json")


def _args(base, sft, out, *extra):
    return ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out),
            "--max-shard-size", SHARD, *extra]


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file whose bytes must not depend on interruptions (the card holds the run time)."""
    return {**file_bytes(folder), **{n: (folder / n).read_bytes() for n in KEPT}}


@pytest.fixture(scope="module")
def pair_and_reference(pairs, tmp_path_factory):
    base, sft = pairs("llama", torch.float32)
    ref = tmp_path_factory.mktemp("reference") / "out"
    merge.merge("linear", sft=sft, base=base, t=0.3, out=ref, max_shard_size=SHARD)
    return base, sft, _outputs(ref)


# The CLI in a real process whose terminal stalls (the child blocks writing stderr) once PAUSE_AFTER tensors
# are reported, so the test's signal lands at that exact tensor boundary whatever the machine's load.
CHILD = """
import os, sys
from merge.cli import main

class StallingTerminal:
    def __init__(self, stream, after):
        self.stream, self.after, self.reported, self.line = stream, after, 0, ""

    def write(self, text):
        written = self.stream.write(text)
        self.line += text
        while "\\n" in self.line:
            line, self.line = self.line.split("\\n", 1)
            self.reported += line.startswith("merged ")
            if line.startswith("merged ") and self.reported == self.after:
                self.stream.flush()
                os.read(0, 1)  # the test never writes: only its signal (or closing the pipe) ends the wait
        return written

    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stderr = StallingTerminal(sys.stderr, int(os.environ["PAUSE_AFTER"]))
sys.argv[0] = "merge"
main()
"""


def _start_and_stop(args, after: int, sig: int) -> tuple[int, list[str]]:
    """Run the ``merge`` CLI in a real process; send ``sig`` once it has reported ``after`` finished tensors."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args, "-v", "--threads", "1"],
                            env={**os.environ, "PAUSE_AFTER": str(after)}, stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines, sent = [], False
    for line in proc.stderr:
        lines.append(line)
        if not sent and sum(x.startswith("merged ") for x in lines) >= after:
            proc.send_signal(sig)
            proc.stdin.close()
            sent = True
    assert proc.wait(timeout=120) is not None
    assert sent, "".join(lines)
    return proc.returncode, lines


def _complete_tensors(stage: Path) -> int:
    manifest = json.loads((stage / MANIFEST_NAME).read_text())
    return sum(len(manifest["shards"][f]["tensors"]) for f in manifest["complete"])


def test_killed_runs_resume_byte_identical(pair_and_reference, tmp_path):
    base, sft, reference = pair_and_reference
    out = tmp_path / "out"
    stage = output.staging_dir(out)
    total = 30
    rng = random.Random(7)
    for attempt, sig in enumerate([signal.SIGKILL, signal.SIGKILL, signal.SIGINT]):
        extra = ["--resume"] if attempt else []
        done_before = _complete_tensors(stage) if attempt else 0
        after = min(rng.randint(1, 8), total - done_before - 1)
        code, lines = _start_and_stop(_args(base, sft, out, *extra), after, sig)
        assert sum(x.startswith("merged ") for x in lines) == after  # stopped exactly there
        assert not out.exists() and stage.is_dir()
        if sig == signal.SIGINT:
            assert code == 130
            message = lines[-1]
            assert message.startswith("interrupted:") and "--resume" in message, lines
            assert "Traceback" not in "".join(lines)
        else:
            assert code == -signal.SIGKILL
    assert _complete_tensors(stage) > 0
    result = CliRunner().invoke(main, _args(base, sft, out, "--resume", "-q"))
    assert result.exit_code == 0, result.output
    assert _outputs(out) == reference
    assert not stage.exists() and not output.lock_path(out).exists()
    assert not (out / MANIFEST_NAME).exists()


def test_resume_rewrites_a_damaged_shard_and_reuses_the_rest(pair_and_reference, tmp_path, monkeypatch):
    base, sft, reference = pair_and_reference
    out = tmp_path / "out"
    _fail_writes_after(monkeypatch, 25)
    result = CliRunner().invoke(main, _args(base, sft, out, "--threads", "1"))
    assert result.exit_code == 2 and "no space left" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    monkeypatch.undo()
    stage = output.staging_dir(out)
    manifest = json.loads((stage / MANIFEST_NAME).read_text())
    done = sorted(manifest["complete"])
    assert len(done) >= 2 and not out.exists()
    damaged = stage / done[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"reusing {len(done) - 1} of 12 shard.*rewriting 1"):
        merge.merge("linear", sft=sft, base=base, t=0.3, out=out, max_shard_size=SHARD, options=Options.of(resume=True))
    assert _outputs(out) == reference


def _fail_writes_after(monkeypatch, calls: int) -> None:
    """The OS refusing writes with ENOSPC after ``calls`` positional writes: a disk filling up mid-run."""
    real = os.pwrite
    count = [0]

    def pwrite(fd, data, offset):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("change", ["recipe", "input"])
def test_resume_refuses_a_changed_recipe_or_input(pair_and_reference, tmp_path, clean_copy, monkeypatch, change):
    base, sft, _ = pair_and_reference
    sft = clean_copy(sft, "sft")
    out = tmp_path / "out"
    _fail_writes_after(monkeypatch, 25)
    assert CliRunner().invoke(main, _args(base, sft, out, "--threads", "1")).exit_code == 2
    monkeypatch.undo()
    args = _args(base, sft, out, "--resume")
    if change == "recipe":
        args[args.index("0.3")] = "0.4"
    else:
        os.utime(sft / "model.safetensors", ns=(1, 1))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: --resume: cannot continue") and "without --resume" in line and "\n" not in line
    assert ("'t'" in line) if change == "recipe" else ("model.safetensors" in line)
    assert output.staging_dir(out).is_dir() and not out.exists()  # still resumable with the old recipe


def test_without_resume_a_partial_folder_is_replaced_and_said_so(pair_and_reference, tmp_path, monkeypatch):
    base, sft, reference = pair_and_reference
    out = tmp_path / "out"
    _fail_writes_after(monkeypatch, 25)
    assert CliRunner().invoke(main, _args(base, sft, out)).exit_code == 2
    monkeypatch.undo()
    result = CliRunner().invoke(main, _args(base, sft, out, "-q"))
    assert result.exit_code == 0
    assert "replaced the partial output of an interrupted run" in result.stderr
    assert _outputs(out) == reference


def test_a_second_run_on_the_same_output_is_refused(pair_and_reference, tmp_path):
    base, sft, _ = pair_and_reference
    out = tmp_path / "out"
    with open(output.lock_path(out), "w") as held:  # what a running merge holds
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, _args(base, sft, out))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: another merge") and "is writing" in result.stderr
    assert not out.exists() and not output.staging_dir(out).exists()


def test_nonfinite_input_is_named_and_allow_nonfinite_writes_it(pair_and_reference, tmp_path, clean_copy):
    base, sft, _ = pair_and_reference
    sft = clean_copy(sft, "sft")
    tensors = load_file(sft / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, sft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(base, sft, out))  # checked by default
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'model.layers.1.mlp.up_proj.weight' has NaN/Inf (first at flat element 101)" in result.stderr
    assert f"its input SFT {sft} tensor 'model.layers.1.mlp.up_proj.weight' already holds NaN/Inf" in result.stderr
    assert not out.exists() and not output.staging_dir(out).exists()
    assert CliRunner().invoke(main, _args(base, sft, out, "-q", "--allow-nonfinite")).exit_code == 0
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert written["model.layers.1.mlp.up_proj.weight"].isnan().sum() == 1
