"""A sweep's candidates evaluated by Ray actors: one per GPU (``--gpus-per-worker``) or per CPU bundle
(``--cpus-per-worker``), each holding base and SFT once (:class:`~merge.recover.inplace.InPlaceModel`) and
setting the parameters in place per candidate.

The driver plans the sweep as a local one does (probes encoded, tasks loaded, the choice and the written merge
are its own); a batch of independent candidates goes to Ray's :class:`~ray.util.ActorPool`, which hands each
to the next free actor. Actors are created with ``max_restarts``/``max_task_retries``: an actor whose process
dies is restarted (loading the inputs again) and its candidate evaluated again. Task results go through the
evaluation cache, which every actor reads and writes (give ``--cache-dir`` on storage all nodes see), so no
candidate is evaluated twice, across workers or runs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from ..distributed import Cluster, _hold, _host, _node_id, check_options
from ..errors import InputError, MergeError

MAX_RESTARTS = 3  # per actor, for a worker process that died; its running candidate is retried as often


def check_sweep_options(ray: str | None, workers: int | None, gpus_per_worker: float | None,
                        cpus_per_worker: float | None, device: str) -> None:
    """Ray-only options need ``--ray`` (and Ray installed); a GPU worker cannot evaluate with ``--device cpu``."""
    for flag, value in (("--gpus-per-worker", gpus_per_worker), ("--cpus-per-worker", cpus_per_worker)):
        if value is not None and ray is None:
            raise InputError(f"{flag}: sizes the Ray workers of a distributed sweep; give --ray or drop it")
        if value is not None and value <= 0:
            raise InputError(f"{flag} {value:g}: give a positive number")
    if gpus_per_worker is not None and device == "cpu":
        raise InputError("--gpus-per-worker: the workers would evaluate on the CPU (--device cpu); drop one of them")
    if ray is not None and device == "cuda" and gpus_per_worker is None:
        raise InputError("--device cuda: with --ray, give --gpus-per-worker (e.g. 1) so that Ray gives each worker "
                         "a GPU")
    if workers is not None and ray is None:
        raise InputError("--workers needs --ray (a local sweep evaluates on this machine; its CPU threads are "
                         "--threads)")
    check_options(ray, workers, False)


class SweepWorker:
    """The Ray actor: a :class:`~merge.recover.scorer.Scorer` built on its node, measuring one candidate per call.

    Every call carries ``boxed`` ([a reference to the setup, held by the driver]); the first call on a fresh
    (or restarted) actor builds the scorer from it, so the actor has no constructor arguments to lose."""

    def __init__(self):
        self.scorer, self.error, self.load_seconds = None, None, 0.0

    def _ensure(self, boxed: list) -> None:
        import ray
        import torch

        from .scorer import build_scorer

        if self.scorer is None and self.error is None:
            started = time.perf_counter()
            setup = ray.get(boxed[0])
            torch.set_num_threads(setup["threads"])
            try:
                self.scorer = build_scorer(setup)
            except MergeError as e:  # a user error (an input this node cannot see, too little memory): one line
                self.error = e
            self.load_seconds = time.perf_counter() - started
        if self.error is not None:
            raise self.error

    def ready(self, boxed: list) -> dict:
        self._ensure(boxed)
        return {"host": _host(), "pid": os.getpid(), "node": _node_id(), "load_seconds": self.load_seconds}

    def measure(self, boxed: list, number: int, recipe, which: str, label: str):
        self._ensure(boxed)
        _hold(f"candidate-{number}")  # tests only (MERGEBACK_TEST_HOLD)
        m = self.scorer.measure(recipe, which)
        m.worker = {"host": _host(), "pid": os.getpid(), "node": _node_id(), "number": number, "label": label}
        return m


@dataclass
class SweepCluster:
    """What the cluster did, for the summary, the card and sweep.json."""

    address: str
    nodes: int
    workers: int
    resources: str  # per worker, in words
    evaluations: int = 0  # candidates measured on the cluster (selection, report and schedule points)
    wall_seconds: float = 0.0  # the driver waiting on batches of candidates
    load_seconds: float = 0.0  # the slowest actor's start: opening the inputs, holding base and SFT
    set_seconds: float = 0.0  # summed over candidates
    eval_seconds: float = 0.0
    restarts: int = 0  # worker processes that died and were replaced
    node_ids: set = field(default_factory=set)

    def line(self) -> str:
        busy = (self.set_seconds + self.eval_seconds) / max(1e-9, self.wall_seconds * self.workers)
        restarted = f"; {self.restarts} worker(s) died and were replaced" if self.restarts else ""
        return (f"ray: {self.evaluations} evaluation(s) on {self.workers} worker(s) ({self.resources} each) on "
                f"{len(self.node_ids)} of {self.nodes} node(s) ({self.address}); loading base and SFT "
                f"{self.load_seconds:.1f}s (slowest worker), {self.wall_seconds:.1f}s wall evaluating; summed over "
                f"workers: setting parameters {self.set_seconds:.1f}s, evaluating {self.eval_seconds:.1f}s "
                f"({busy:.0%} busy){restarted}")

    def to_dict(self) -> dict:
        return {"address": self.address, "nodes": self.nodes, "nodes_used": len(self.node_ids),
                "workers": self.workers, "per_worker": self.resources, "evaluations": self.evaluations,
                "restarts": self.restarts, "seconds": {"load": self.load_seconds, "wall": self.wall_seconds,
                                                       "set": self.set_seconds, "eval": self.eval_seconds}}


class RayPool:
    """``workers`` :class:`SweepWorker` actors on the cluster at ``address``, fed by an ActorPool."""

    def __init__(self, address: str, workers: int | None, gpus_per_worker: float | None,
                 cpus_per_worker: float | None, setup: dict, progress: bool = False, verbose: bool = False):
        self.cluster = Cluster(address, None)
        self.ray = ray = self.cluster.ray
        try:
            self.gpus, self.cpus = gpus_per_worker or 0, cpus_per_worker or 1
            self.workers = workers or self._default_workers()
            self._check_fits()
            env = {k: v for k, v in os.environ.items() if k.startswith("MERGEBACK_")}
            actor = ray.remote(SweepWorker).options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                **({"runtime_env": {"env_vars": env}} if env else {}))
            setup = {**setup, "device": "cuda" if self.gpus and setup["device"] == "auto" else setup["device"],
                     "threads": setup["threads"] or max(1, int(self.cpus))}
            self.boxed = [ray.put(setup)]  # held by the driver for the actors' (re)starts
            self.actors = [actor.remote() for _ in range(self.workers)]
            resources = " and ".join(x for x in (f"{self.gpus:g} GPU" if self.gpus else "",
                                                 f"{self.cpus:g} CPU") if x)
            self.stats = SweepCluster(address, len(self.cluster.nodes), self.workers, resources)
            started = time.perf_counter()
            ready = self._get([a.ready.remote(self.boxed) for a in self.actors])
            self.stats.load_seconds = max(r["load_seconds"] for r in ready)
            self.stats.wall_seconds += time.perf_counter() - started
            self.pids = {(r["host"], r["pid"]) for r in ready}
            self.pool = ray.util.ActorPool(self.actors)
        except BaseException:
            self.close()
            raise
        self.progress, self.verbose = progress, verbose
        self.number, self.bar = 0, None

    @property
    def width(self) -> int:
        return self.workers

    def _default_workers(self) -> int:
        key, per = ("GPU", self.gpus) if self.gpus else ("CPU", self.cpus)
        have = sum(n["Resources"].get(key, 0) for n in self.cluster.nodes)
        if have < per:
            raise InputError(f"--ray {self.cluster.address}: the cluster has {have:g} {key}(s), a worker needs "
                             f"{per:g}; add nodes or lower --{key.lower()}s-per-worker")
        return int(have // per)

    def _check_fits(self) -> None:
        """Actors that no node can hold would wait forever: refuse up front, naming what to change."""
        def fits(node) -> int:
            r = node["Resources"]
            return int(min(r.get("CPU", 0) // self.cpus, r.get("GPU", 0) // self.gpus if self.gpus else 1 << 30))

        room = sum(fits(n) for n in self.cluster.nodes)
        per = f"{self.cpus:g} CPU(s)" + (f" and {self.gpus:g} GPU(s)" if self.gpus else "")
        if room == 0:
            raise InputError(f"--ray {self.cluster.address}: no node offers {per} for one worker; lower "
                             "--cpus-per-worker/--gpus-per-worker")
        if self.workers > room:
            raise InputError(f"--workers {self.workers}: the cluster's nodes hold {room} worker(s) of {per}; give "
                             f"--workers {room} or fewer (or add nodes)")

    def measure_many(self, items):
        """``(recipe, which, label)`` items on the next free actors; yielded in order, each as soon as it and
        every earlier one are back."""
        items = list(items)
        started = time.perf_counter()
        first = self.number
        self.number += len(items)
        self._bar_add(len(items))
        done: dict[int, object] = {}
        nxt = 0
        try:
            for i, (recipe, which, label) in enumerate(items):
                self.pool.submit(lambda a, v: a.measure.remote(self.boxed, *v), (first + i, recipe, which, label))
            while self.pool.has_next():
                m = self._next()
                i = m.number - first
                done[i] = m.result
                self._account(m.result)
                while nxt in done:
                    self.stats.wall_seconds += time.perf_counter() - started
                    yield done.pop(nxt)
                    started = time.perf_counter()
                    nxt += 1
        finally:
            while self.pool.has_next():  # an error in the driver: drop what is still running
                try:
                    self.pool.get_next_unordered()
                except Exception:  # noqa: BLE001
                    pass

    def _next(self):
        try:
            result = self.pool.get_next_unordered()
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MergeError):
                raise cause from None
            raise MergeError(f"a sweep worker failed: {str(e).strip().splitlines()[-1]}") from None
        except self.ray.exceptions.RayError as e:
            raise MergeError(f"a sweep worker was lost after {MAX_RESTARTS} restarts: "
                             f"{str(e).strip().splitlines()[0]}") from None
        return _Numbered(result.worker.pop("number"), result)

    def _account(self, m) -> None:
        s = self.stats
        s.evaluations += 1
        s.set_seconds += m.seconds_set
        s.eval_seconds += m.seconds_eval
        s.node_ids.add(m.worker["node"])
        self.pids.add((m.worker["host"], m.worker["pid"]))
        s.restarts = len(self.pids) - self.workers
        if self.bar is not None:
            self.bar.update(1)
        if self.verbose:
            line = (f"worker {m.worker['host']} pid {m.worker['pid']}: {m.worker['label']} in "
                    f"{m.seconds_set + m.seconds_eval:.1f}s (set {m.seconds_set:.2f}s, eval {m.seconds_eval:.2f}s)")
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def _bar_add(self, n: int) -> None:
        if not self.progress:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="candidate", desc=f"evaluating on {self.workers} Ray workers", leave=False)
        self.bar.total += n
        self.bar.refresh()

    def say(self, echo, line: str) -> None:
        """``echo(line)`` without tearing the progress bar."""
        if self.bar is None:
            echo(line)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode():
            echo(line)

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MergeError):
                raise cause from None
            text = str(e).strip().splitlines()
            raise MergeError(f"a sweep worker could not start: {text[-1] if text else type(e).__name__}") from None

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        self.cluster.close()


@dataclass
class _Numbered:
    number: int
    result: object
