"""Merges on a real two-node Ray cluster (separate raylets on this machine): byte-identical to the local
executor, surviving a killed worker and a killed driver, and refusing a staging folder some node cannot see.

Worker pids come from the tasks themselves: with MERGEBACK_TEST_HOLD set, each task appends its pid to
``<hold>/<unit>.pids`` (with its node id) and waits until the test creates ``go-all`` or ``go-<unit>``, so kills
land while a task is known to be running (no sleeps, whatever the machine's load).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

import merge
from merge.cli import main
from merge.errors import InputError
from merge.io.manifest import MANIFEST_NAME
from merge.io.output import staging_dir
from merge.options import Options
from tests.checkpoints import make_model
from tests.helpers import file_bytes
from tests.ray_cluster import two_node_cluster

ray = pytest.importorskip("ray")

SHARD = "16KB"  # the tiny float32 llama (~136 KB): 12 shards
KEPT = ("config.json", "merge_recipe.yaml", "model.safetensors.index.json", "tokenizer.json")
MEMORY = "64MB"  # per task, plus merge.distributed.TASK_OVERHEAD
ROOT = Path(__file__).resolve().parents[1]


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file whose bytes must not depend on where the merge ran (the card holds run times)."""
    return {**file_bytes(folder), **{n: (folder / n).read_bytes() for n in KEPT if (folder / n).exists()}}


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster(client_server=False) as c:
        yield c


def _attempts(pids_file: Path) -> list[tuple[int, str]]:
    """(pid, node id) of every attempt of one unit so far."""
    return [(int(pid), node) for pid, node in (line.split() for line in pids_file.read_text().splitlines())]


def _wait_for(condition, what: str, timeout: float = 120):
    """Poll a condition the test is waiting on (not a timing assumption: it fails only after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _local(tmp_path: Path, name: str, **kw) -> dict[str, bytes]:
    out = tmp_path / f"local-{name}"
    merge.merge(out=out, **kw)
    return _outputs(out)


def test_sharded_slerp_via_cli_equals_local(cluster, pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    reference = _local(tmp_path, "slerp", method="slerp", sft=sft, base=base, t=0.3, max_shard_size=SHARD)
    out = tmp_path / "ray"
    result = CliRunner().invoke(main, ["slerp", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out),
                                       "--max-shard-size", SHARD, "--memory", MEMORY, "--ray"])  # --ray alone: auto
    assert result.exit_code == 0, result.output
    assert _outputs(out) == reference
    assert len(file_bytes(out)) == 12
    assert "ray: 12 task(s)" in result.output and "of 2 node(s)" in result.output
    assert "ray: 12 task(s)" in (out / "README.md").read_text()  # the card records the cluster run


def test_single_file_ties_is_split_across_workers(cluster, pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    kw = dict(method="task_arithmetic", sft=sft, base=base, scale=0.7, sparsify="magnitude", density=0.3)
    reference = _local(tmp_path, "ties", **kw)
    out = tmp_path / "ray"
    summary = merge.merge(out=out, **kw, options=Options.of(ray="auto", workers=2, memory=MEMORY))
    assert list(file_bytes(out)) == ["model.safetensors"]
    assert summary.cluster.units == 4  # one file, cut into tensor ranges: 2 per worker
    assert _outputs(out) == reference


def test_lora_sft_equals_local(cluster, pairs, tmp_path):
    base, _ = pairs("llama", torch.float32)
    adapter = tmp_path / "adapter"
    model = get_peft_model(make_model("llama", 0, torch.float32),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter)
    kw = dict(method="linear", sft=adapter, base=base, t=0.25, max_shard_size="40KB")
    reference = _local(tmp_path, "lora", **kw)
    out = tmp_path / "ray"
    merge.merge(out=out, **kw, options=Options.of(ray="auto", memory=MEMORY))
    assert _outputs(out) == reference


def test_killed_worker_is_retried_and_output_identical(cluster, pairs, tmp_path, monkeypatch):
    base, sft = pairs("llama", torch.float32)
    kw = dict(method="slerp", sft=sft, base=base, t=0.6, max_shard_size=SHARD)
    reference = _local(tmp_path, "kill-worker", **kw)
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("MERGEBACK_TEST_HOLD", str(hold))
    out = tmp_path / "ray"
    outcome = {}

    def drive():
        try:
            outcome["summary"] = merge.merge(out=out, **kw, options=Options.of(ray="auto", memory=MEMORY))
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        _wait_for(lambda: any(hold.glob("*.pids")), "a running task")
        victim = next(hold.glob("*.pids"))
        pid = _attempts(victim)[0][0]
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: len(_attempts(victim)) == 2, "the killed unit's retry")
    finally:
        (hold / "go-all").touch()
        driver.join(300)
    assert "error" not in outcome, outcome.get("error")
    retried = [p for p, _ in _attempts(victim)]
    assert retried[0] == pid and retried[1] != pid  # the unit ran again, in another worker process
    assert _outputs(out) == reference


def test_lost_node_its_units_rerun_elsewhere_and_output_identical(cluster, pairs, tmp_path, monkeypatch):
    """A third node holds one of three running units when it is removed (its raylet and workers killed)."""
    base, sft = pairs("llama", torch.float32)
    kw = dict(method="linear", sft=sft, base=base, t=0.4, max_shard_size=SHARD)
    reference = _local(tmp_path, "lose-node", **kw)
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("MERGEBACK_TEST_HOLD", str(hold))
    out = tmp_path / "ray"
    outcome = {}

    def drive():
        try:
            outcome["summary"] = merge.merge(out=out, **kw, options=Options.of(ray="auto", memory=MEMORY))
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    removed = False
    try:
        def running():
            return [(f, a) for f in hold.glob("*.pids") for a in _attempts(f)]

        _wait_for(lambda: len(running()) == 3, "three running units, one per node")
        (victim, _), = [(f, a) for f, a in running() if a[1] == doomed.node_id]
        cluster.remove_node(doomed, allow_graceful=False)
        removed = True  # (the retry needs a CPU that a held unit frees: release them all now)
    finally:
        (hold / "go-all").touch()
        driver.join(300)
        if not removed:
            cluster.remove_node(doomed)
        cluster.wait_for_nodes()
    assert "error" not in outcome, outcome.get("error")
    first, again = _attempts(victim)
    assert first[1] == doomed.node_id and again[1] != doomed.node_id  # it ran again on a surviving node
    assert _outputs(out) == reference


DRIVER = """
import sys
from merge.cli import main
main(sys.argv[1:])
"""


def test_killed_driver_resumes_from_the_journal(cluster, pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    kw = dict(method="linear", sft=sft, base=base, t=0.3, max_shard_size=SHARD)
    reference = _local(tmp_path, "kill-driver", **kw)
    hold = tmp_path / "hold"
    hold.mkdir()
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGEBACK_TEST_HOLD": str(hold)}
    args = ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out), "--max-shard-size",
            SHARD, "--memory", MEMORY, "--ray", cluster.address]
    child = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    manifest = staging_dir(out.resolve()) / MANIFEST_NAME

    def journaled() -> int:
        try:
            return len(json.loads(manifest.read_text())["complete"])
        except (OSError, ValueError, KeyError):
            return 0

    try:
        _wait_for(lambda: any(hold.glob("*.pids")) or child.poll() is not None, "a running task")
        assert child.poll() is None, child.communicate()[1].decode()[-3000:]
        first = next(hold.glob("*.pids")).name.removesuffix(".pids")
        (hold / f"go-{first}").touch()
        _wait_for(lambda: journaled() >= 1, "the first journaled shard")
        child.send_signal(signal.SIGKILL)
        child.wait(60)
    finally:
        (hold / "go-all").touch()  # tasks of the dead driver may still be waiting
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not out.exists() and journaled() == 1
    summary = merge.merge(out=out, **kw, options=Options.of(ray=cluster.address, memory=MEMORY, resume=True))
    assert any("reusing 1 of 12 shard(s)" in w for w in summary.warnings)
    assert summary.cluster.units == 11  # finished shards are never redone
    assert _outputs(out) == reference


def test_staging_invisible_to_a_node_is_one_clear_error(cluster, pairs, tmp_path):
    """A third node whose probe sees ``tmp_path`` mounted elsewhere (MERGEBACK_SIMULATED_MOUNT in that raylet's
    environment, inherited by its workers) stands for a node that does not mount the output's storage."""
    base, sft = pairs("llama", torch.float32)
    blind = cluster.add_node(num_cpus=1, env_vars={"MERGEBACK_SIMULATED_MOUNT": f"{tmp_path}={tmp_path}-elsewhere"})
    cluster.wait_for_nodes()
    out = tmp_path / "ray"
    try:
        with pytest.raises(InputError, match=r"^--ray: node \S+ cannot see .* put -o on storage every node mounts"):
            merge.merge("linear", sft=sft, base=base, t=0.3, out=out, options=Options.of(ray="auto", memory=MEMORY))
    finally:
        cluster.remove_node(blind)
        cluster.wait_for_nodes()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no probe files left


def test_ray_missing_is_one_line(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    blocker = ("import sys\n"
               "class NoRay:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'ray' or name.startswith('ray.'):\n"
               "            raise ImportError('No module named ' + repr(name))\n"
               "sys.meta_path.insert(0, NoRay())\n" + DRIVER)
    out = tmp_path / "out"
    args = ["slerp", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out), "--ray"]
    run = subprocess.run([sys.executable, "-c", blocker, *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("error: --ray: Ray is not installed; install it with: pip install "
                                  "'mergeback[ray]' (or pip install ray)")
    assert not out.exists()


def test_workers_without_ray_and_ray_with_dry_run_are_errors(pairs, tmp_path):
    base, sft = pairs("llama", torch.float32)
    with pytest.raises(InputError, match="^--workers needs --ray"):
        merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "a", options=Options.of(workers=2))
    with pytest.raises(InputError, match="^--ray has no effect with --dry-run"):
        merge.merge("linear", sft=sft, base=base, t=0.3, out=tmp_path / "b",
                    options=Options.of(ray="local", dry_run=True))
    assert not any(tmp_path.iterdir())


def test_units_tile_every_pending_shard_and_balance_by_bytes():
    from merge.distributed import plan_units
    from merge.io.writer import PlannedTensor, layout_shards

    tensors = [PlannedTensor(f"t{i}", torch.float32, (100 + 37 * i,)) for i in range(40)]
    (one,) = layout_shards(tensors, 10**9)
    units = plan_units([one], set(), workers=4)
    spans = sorted((u.first, u.stop) for u in units)
    assert spans[0][0] == 0 and spans[-1][1] == 40 and all(a[1] == b[0] for a, b in pairwise(spans))
    target = one.size // 8
    largest = max(t.nbytes for t in tensors)
    assert len(units) == 8 and all(u.nbytes < target + largest for u in units)
    assert sum(u.nbytes for u in units) == one.size - len(one.header)
    shards = layout_shards(tensors, 20_000)
    units = plan_units(shards, {shards[0].filename}, workers=2)
    assert {u.filename for u in units} == {s.filename for s in shards[1:]}
    assert [u.nbytes for u in units] == sorted((u.nbytes for u in units), reverse=True)  # largest first


def test_hub_inputs_are_fetched_at_the_pinned_commit_by_the_workers(cluster, hub_server, pairs, tmp_path):
    from huggingface_hub import HfApi

    base, sft = pairs("llama", torch.float32)
    api = HfApi(token=hub_server.write_token)
    base_id = hub_server.new_repo_id("ray-base")
    api.create_repo(base_id)
    commit = api.upload_folder(repo_id=base_id, folder_path=base, commit_message="base").oid
    kw = dict(method="slerp", sft=sft, t=0.3, max_shard_size=SHARD)
    reference = tmp_path / "local"
    merge.merge(out=reference, base=base, **kw)
    out = tmp_path / "ray"
    summary = merge.merge(out=out, base=base_id, **kw, options=Options.of(ray="auto", memory=MEMORY))
    assert summary.inputs["base"].revision == commit and summary.cluster.units == 12
    assert file_bytes(out) == file_bytes(reference)


def test_an_address_where_no_cluster_answers_is_one_line(pairs, tmp_path):
    import socket

    base, sft = pairs("llama", torch.float32)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    args = ["linear", "--sft", str(sft), "--base", str(base), "--t", "0.3", "-o", str(out),
            "--ray", f"127.0.0.1:{port}"]
    run = subprocess.run([sys.executable, "-c", DRIVER, *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    expected = (f"error: --ray 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} (Connection refused); start "
                "the cluster (ray start --head) or fix the address")
    assert run.stderr.strip().splitlines() == [expected]
    assert not out.exists()


def test_fp8_inputs_and_output_split_across_workers_equal_local(cluster, pairs, tmp_path):
    from tests.test_quantized import to_fp8

    base, sft = pairs("llama")
    fp8_base, fp8_sft = to_fp8(base, tmp_path / "fp8-base"), to_fp8(sft, tmp_path / "fp8-sft")
    kw = dict(method="slerp", sft=fp8_sft, base=fp8_base, t=0.3, dtype="fp8")
    reference = _local(tmp_path, "fp8", **kw)
    out = tmp_path / "ray"
    summary = merge.merge(out=out, **kw, options=Options.of(ray="auto", workers=2, memory=MEMORY))
    assert list(file_bytes(out)) == ["model.safetensors"] and summary.cluster.units == 4
    assert _outputs(out) == reference


class _FlakyClient:
    """A stand-in for the ``ray`` module whose Ray Client start fails ``failures`` times, as a head's
    per-client server process sometimes does under load."""

    def __init__(self, failures: int, message: str = "Initialization failure from server:\n"):
        self.failures, self.message, self.calls, self.shutdowns = failures, message, 0, 0

    def init(self, address, logging_level):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionAbortedError(self.message)

    def is_initialized(self):
        return False

    def shutdown(self):
        self.shutdowns += 1


def test_a_ray_client_start_that_fails_on_the_server_is_asked_again():
    from merge.distributed import CLIENT_START_ATTEMPTS, _init_at

    flaky = _FlakyClient(failures=CLIENT_START_ATTEMPTS - 1)
    _init_at(flaky, "ray://head:10001")
    assert flaky.calls == CLIENT_START_ATTEMPTS
    with pytest.raises(ConnectionError, match="Initialization failure"):
        _init_at(_FlakyClient(failures=CLIENT_START_ATTEMPTS), "ray://head:10001")
    other = _FlakyClient(failures=1, message="Connection refused")
    with pytest.raises(ConnectionError):
        _init_at(other, "ray://head:10001")
    assert other.calls == 1  # only the server-side start failure is asked again
    head = _FlakyClient(failures=1)
    with pytest.raises(ConnectionError):
        _init_at(head, "10.0.0.1:6379")  # not Ray Client: no retry
    assert head.calls == 1
