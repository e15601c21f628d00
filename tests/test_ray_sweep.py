"""Distributed sweeps on a real two-node Ray cluster (separate raylets on this machine): the same table, choice
and written bytes as the local sweep, for a t sweep, a schedule search and an lm-eval task sweep; a killed actor
replaced and its candidate evaluated again; the task cache shared by every worker and run; one-line errors.

Worker pids come from the actors themselves: with MERGEBACK_TEST_HOLD set, each candidate appends its actor's pid
to ``<hold>/candidate-<n>.pids`` and waits until the test creates ``go-all``, so a kill lands while a candidate is
known to be running (no sleeps, whatever the machine's load).
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import (here and in the raylets' workers)

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import merge
from merge.cli import main
from merge.demo import ASSETS
from tests.helpers import file_bytes
from tests.ray_cluster import two_node_cluster
from tests.test_sweep import _probes

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
WRITTEN = ("config.json", "merge_recipe.yaml", "tokenizer.json")


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster(client_server=True) as c:
        yield c


def _untimed(value):
    """``value`` without the times anywhere in it."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.startswith("seconds")}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _numbers(rows: list[dict]) -> str:
    """Rows of sweep.json without their times, as JSON (NaN compares equal there)."""
    return json.dumps(_untimed(rows), sort_keys=True)


def _rows(result) -> list[str]:
    """Every number of the table and the JSON but the times (and where they were measured)."""
    saved = result.to_dict()
    return [_numbers(saved["rows"]), _numbers([saved["report"], saved["chosen_t"], saved["written"],
                                               saved.get("schedule")])]


def _outputs(folder: Path) -> dict[str, bytes]:
    """The written merge: every file whose bytes must not depend on where the sweep ran (the card and
    sweep.json hold times)."""
    return {**file_bytes(folder), **{n: (folder / n).read_bytes() for n in WRITTEN if (folder / n).exists()}}


def _same(local, distributed) -> None:
    assert distributed.table() == local.table()
    assert _rows(distributed) == _rows(local)
    assert distributed.chosen.label == local.chosen.label and distributed.written.label == local.written.label


def _wait_for(condition, what: str, timeout: float = 180):
    """Poll a condition the test is waiting on (not a timing assumption: it fails only after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    return _probes(tmp_path_factory.mktemp("probes"))


SFT, BASE = str(ASSETS / "sft"), str(ASSETS / "base")  # the demo pair: the SFT forgot, a middle t recovers
PROBES = {"general": ASSETS / "probes" / "general_select.txt", "domain": ASSETS / "probes" / "domain_select.jsonl"}
REPORT = {"general_report": ASSETS / "probes" / "general_report.txt",
          "domain_report": ASSETS / "probes" / "domain_report.jsonl"}
TOKENS = 2000  # scored per probe set: enough to order the candidates, cheap on 2 cores


def test_t_sweep_via_cli_equals_local(cluster, tmp_path):
    local = merge.sweep(SFT, BASE, out=tmp_path / "local", t_values=[0.25, 0.5, 0.75], threads=1, max_tokens=TOKENS,
                        **PROBES)
    assert local.chosen.t not in (0.0, 1.0)  # a real choice
    out = tmp_path / "ray"
    run = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, "--general", str(PROBES["general"]),
                                    "--domain", str(PROBES["domain"]), "--t-values", "0.25,0.5,0.75", "--threads", "1",
                                    "--max-tokens", str(TOKENS), "-o", str(out), "--ray", "--workers", "2", "-v"])
    assert run.exit_code == 0, run.output
    assert local.table() in run.output
    saved = json.loads((out / "sweep.json").read_text())
    assert _numbers(saved["rows"]) == _rows(local)[0]
    assert _outputs(out) == _outputs(tmp_path / "local")
    assert saved["cluster"]["workers"] == 2 and saved["cluster"]["evaluations"] == 5
    assert saved["cluster"]["nodes_used"] == 2  # one actor per 1-CPU node
    assert "ray: 5 evaluation(s) on 2 worker(s) (1 CPU each) on 2 of 2 node(s)" in run.output
    assert "evaluated on a Ray cluster: ray: 5 evaluation(s)" in (out / "README.md").read_text()
    workers = {line.split(":")[0] for line in run.output.splitlines() if line.startswith("worker ")}
    assert len(workers) == 2  # -v: one line per candidate, naming its worker (host and pid)


def _attempts(pids_file: Path) -> list[int]:
    return [int(line.split()[0]) for line in pids_file.read_text().splitlines()]


def test_schedule_search_with_a_killed_actor_equals_local(cluster, tmp_path, monkeypatch):
    """A blocks schedule search on two workers (each pass's next points at once), one actor killed while it
    evaluates a candidate: it is replaced, the candidate evaluated again, and the result is the local sweep's."""
    kw = dict(t_values=[0.3, 0.6], schedule="blocks", budget=6, threads=1, max_tokens=TOKENS, **PROBES, **REPORT)
    local = merge.sweep(SFT, BASE, out=tmp_path / "local", **kw)
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("MERGEBACK_TEST_HOLD", str(hold))
    outcome = {}

    def drive():
        try:
            outcome["result"] = merge.sweep(SFT, BASE, out=tmp_path / "ray", ray="auto", workers=2, **kw)
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        _wait_for(lambda: any(hold.glob("*.pids")), "a running candidate")
        victim = sorted(hold.glob("*.pids"))[0]
        pid = _attempts(victim)[0]
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: len(_attempts(victim)) == 2, "the killed candidate's retry on a restarted actor")
    finally:
        (hold / "go-all").touch()
        driver.join(300)
    assert "error" not in outcome, outcome.get("error")
    again = _attempts(victim)
    assert again[0] == pid and again[1] != pid  # evaluated again, by a new worker process
    distributed = outcome["result"]
    _same(local, distributed)
    assert distributed.schedule.evaluations == local.schedule.evaluations
    assert distributed.schedule.best.label == local.schedule.best.label
    assert distributed.schedule.verdict() == local.schedule.verdict()
    assert [r.label for r in distributed.report] == [r.label for r in local.report]
    # 4 rows + the report rows + the search's points, and the speculative points it dropped
    assert distributed.cluster.evaluations >= 4 + len(local.report) + local.schedule.evaluations
    assert distributed.cluster.restarts == 1
    assert "1 worker(s) died and were replaced" in distributed.summary()
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")


def test_task_sweep_equals_local_and_shares_the_cache(cluster, tmp_path):
    """lm-eval tasks on the demo pair: the first distributed run (two workers) evaluates every candidate once
    (misses, filling the shared cache), equal to a local run without a cache; a second distributed run (another
    worker process) evaluates nothing."""
    tasks = ASSETS / "tasks"
    kw = dict(general_tasks=str(tasks / "demo_general_cloze.yaml"), domain_tasks=str(tasks / "demo_domain_cloze.yaml"),
              t_values=[0.5], threads=1)
    sft, base = SFT, BASE
    local = merge.sweep(sft, base, out=tmp_path / "local", no_cache=True, **kw)
    cache = tmp_path / "shared-cache"
    first = merge.sweep(sft, base, out=tmp_path / "ray", ray="auto", workers=2, cache_dir=cache, **kw)
    _same(local, first)
    assert [c.cached for c in first.rows] == [0, 0, 0] and all(c.task_count == 2 for c in first.rows)
    assert len(list(cache.glob("*.json"))) == 6  # 3 candidates x 2 tasks, each evaluated once
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert first.cluster.to_dict()["nodes_used"] == 2  # both workers wrote to the cache
    second = merge.sweep(sft, base, ray="auto", workers=1, cache_dir=cache, **kw)
    assert [c.cached for c in second.rows] == [2, 2, 2]  # every task result from the shared cache
    assert _numbers(second.to_dict()["rows"]) == _numbers([r | {"cached_tasks": 2} for r in first.to_dict()["rows"]])


DRIVER = """
import sys
from merge.cli import main
main(sys.argv[1:])
"""


def test_ray_client_address(cluster, pairs, probes, tmp_path):
    """A driver in another process connects through Ray Client (ray://) to the head's client server."""
    assert cluster.client_port is not None, "Ray Client needs grpcio: pip install 'mergeback[ray]' (ray[client])"
    base, sft = pairs("llama")
    general, domain = probes
    local = merge.sweep(str(sft), str(base), domain, general, t_values=[0.5], threads=1)
    args = ["sweep", "--sft", str(sft), "--base", str(base), "--general", str(general), "--domain", str(domain),
            "--t-values", "0.5", "--threads", "1", "--ray", f"ray://127.0.0.1:{cluster.client_port}",
            "--workers", "2"]
    run = subprocess.run([sys.executable, "-c", DRIVER, *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert local.table() in run.stdout
    assert f"on 2 worker(s) (1 CPU each) on 2 of 2 node(s) (ray://127.0.0.1:{cluster.client_port})" in run.stdout


def test_more_workers_than_the_cluster_holds_is_one_line(cluster, tmp_path):
    run = CliRunner().invoke(main, ["sweep", "--sft", SFT, "--base", BASE, "--general", str(PROBES["general"]),
                                    "--domain", str(PROBES["domain"]), "-o", str(tmp_path / "out"), "--ray",
                                    "--workers", "3"])
    assert run.exit_code == 2
    assert run.output.strip().splitlines()[-1] == ("error: --workers 3: the cluster's nodes hold 2 worker(s) of 1 "
                                                   "CPU(s); give --workers 2 or fewer (or add nodes)")
    assert not (tmp_path / "out").exists()


def test_ray_options_without_ray_and_ray_without_the_extra_are_one_line(pairs, probes, tmp_path):
    base, sft = pairs("llama")
    general, domain = probes
    common = ["sweep", "--sft", str(sft), "--base", str(base), "--general", str(general), "--domain", str(domain),
              "-o", str(tmp_path / "out")]
    for extra, line in ((["--workers", "2"], "error: --workers needs --ray (a local sweep evaluates on this machine; "
                                             "its CPU threads are --threads)"),
                        (["--gpus-per-worker", "1"], "error: --gpus-per-worker: sizes the Ray workers of a "
                                                     "distributed sweep; give --ray or drop it"),
                        (["-v"], "error: --verbose: prints each Ray worker's candidates; give --ray or drop it"),
                        (["--ray", "--gpus-per-worker", "1", "--device", "cpu"],
                         "error: --gpus-per-worker: the workers would evaluate on the CPU (--device cpu); drop one "
                         "of them"),
                        (["--ray", "--device", "cuda"], "error: --device cuda: with --ray, give --gpus-per-worker "
                                                        "(e.g. 1) so that Ray gives each worker a GPU")):
        run = CliRunner().invoke(main, common + extra)
        assert run.exit_code == 2 and run.output.strip().splitlines() == [line], (extra, run.output)
    blocker = ("import sys\n"
               "class NoRay:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'ray' or name.startswith('ray.'):\n"
               "            raise ImportError('No module named ' + repr(name))\n"
               "sys.meta_path.insert(0, NoRay())\n" + DRIVER)
    run = subprocess.run([sys.executable, "-c", blocker, *common, "--ray"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("error: --ray: Ray is not installed; install it with: pip install "
                                  "'mergeback[ray]' (or pip install ray)")
    assert not (tmp_path / "out").exists()
