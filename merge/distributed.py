"""Merges on a Ray cluster: the plan's output shards, or tensor ranges of one shard, run as Ray tasks.

The driver resolves and plans as a local run does, then hands out *units* of work: a whole shard, or a
contiguous range of a large shard's tensors (so a single-file output still gives every worker work), balanced
by bytes. Each task opens the inputs itself (paths every node sees; Hub models by their pinned commit, fetched
into the node's cache), plans again and checks the plan's fingerprint (same plan = same file layout), writes its
tensors into the shard file the driver preallocated in the staging folder (header in place, full size, so
writers of disjoint ranges never truncate each other), fdatasyncs it and returns the tensors' XXH3-64s. The
driver journals a shard as soon as all its units are back, exactly as the local path does, so finished shards
are never redone: Ray retries a unit whose worker or node died (``max_retries``), and ``--resume`` after the
driver itself died continues from the journal. The output bytes equal the local executor's.

Ray is an optional dependency (``pip install 'mergeback[ray]'``), imported only here and only when used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, MergeError

RAY_MISSING = "--ray: Ray is not installed; install it with: pip install 'mergeback[ray]' (or pip install ray)"
TASK_OVERHEAD = 1 << 30  # per task on top of --memory: Python, torch and the opened inputs' headers
MAX_RETRIES = 3  # per unit, for a worker process or node that died, and for OSErrors (network file systems)
HOLD_ENV = "MERGEBACK_TEST_HOLD"  # tests: a folder; each task records its pid there and waits for a go file
MOUNT_ENV = "MERGEBACK_SIMULATED_MOUNT"  # tests: "FROM=TO" on a node makes its probe see FROM under TO


CLIENT_START_ATTEMPTS = 3


def _init_at(ray, address: str) -> None:
    """``ray.init(address)``. Through Ray Client (``ray://``) the head starts a server process per client, and
    that start can fail transiently ("Initialization failure from server"): then it is asked again, up to
    ``CLIENT_START_ATTEMPTS`` times in all; any other failure is raised at once."""
    import logging

    for attempt in range(1, CLIENT_START_ATTEMPTS + 1):
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            return
        except ConnectionError as e:
            if not address.startswith("ray://") or "Initialization failure from server" not in str(e) \
                    or attempt == CLIENT_START_ATTEMPTS:
                raise
            if ray.is_initialized():
                ray.shutdown()


class ClusterError(MergeError):
    """A unit was lost for good (its retries spent); finished shards are kept for ``--resume``."""

    resumable = True


def require_ray():
    """The ``ray`` module, or the one-line error saying what to install."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def check_options(ray: str | None, workers: int | None, dry_run: bool) -> None:
    """``--workers`` only with ``--ray``; ``--ray`` needs Ray installed and does nothing for a dry run."""
    if workers is not None and ray is None:
        raise InputError("--workers needs --ray (the local executor's parallelism is --threads)")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give 1 or more")
    if ray is None:
        return
    if dry_run:
        raise InputError("--ray has no effect with --dry-run (planning happens on this machine); drop one of them")
    require_ray()


@dataclass(frozen=True)
class Unit:
    """Tensors ``[first, stop)`` of shard ``filename``: one Ray task."""

    filename: str
    first: int
    stop: int
    nbytes: int

    @property
    def id(self) -> str:
        return f"{self.filename}.{self.first}-{self.stop}"


def plan_units(shards, skip_files, workers: int) -> list[Unit]:
    """Units for every shard not in ``skip_files``, largest first: a shard of ``size`` bytes is cut into
    ``round(size / target)`` contiguous tensor ranges of near-equal bytes, ``target = remaining bytes /
    (2 * workers)``, so that work balances by bytes and even a one-file output keeps every worker busy."""
    import bisect
    from itertools import accumulate, pairwise

    todo = [s for s in shards if s.filename not in skip_files]
    target = max(1, sum(s.size for s in todo) / max(1, 2 * workers))
    units = []
    for shard in todo:
        ends = list(accumulate(t.nbytes for t in shard.tensors))  # ends[i]: bytes of tensors [0, i]
        parts = max(1, min(len(ends), round(shard.size / target)))
        cuts = {0, len(ends)}
        for k in range(1, parts):  # the tensor boundary nearest each k/parts of the shard's bytes
            i = bisect.bisect_left(ends, k * ends[-1] / parts)
            nearer = i if i == 0 or ends[i] - k * ends[-1] / parts < k * ends[-1] / parts - ends[i - 1] else i - 1
            cuts.add(min(len(ends) - 1, nearer + 1))
        bounds = sorted(cuts)
        for first, stop in pairwise(bounds):
            units.append(Unit(shard.filename, first, stop, ends[stop - 1] - (ends[first - 1] if first else 0)))
    return sorted(units, key=lambda u: -u.nbytes)


def plan_fingerprint(plan) -> str:
    """sha256 over the shard headers and every job's operation: equal fingerprints mean equal output layout
    and equal computations, so a worker that planned on its own writes what the driver planned."""
    h = hashlib.sha256()
    for s in plan.shards:
        h.update(s.filename.encode() + b"\0" + s.header)
    for j in plan.jobs:
        # operations are frozen dataclasses: their repr names every field, floats exactly
        h.update(json.dumps([j.name, repr(j.op), j.merged_numel, j.primary,
                             dict(j.aliases), str(j.out_dtype)], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def plan_recipe(recipe, models: dict, labels: dict):
    """The plan of ``recipe`` over opened ``models``, as :func:`merge.api.run` makes it."""
    import torch

    from .dtypes import OUTPUT_DTYPES as DTYPES
    from .fp8_output import fp8_output_plan
    from .io.writer import parse_size
    from .plan import make_plan
    from .recipes.operations import operations_for
    from .tensor_names import Structure

    primary = recipe.primary
    n_layers = Structure.of(models[primary].config, models[primary].names())
    fp8_out = recipe.output_dtype == "fp8"  # bfloat16, then the FP8 weights re-quantised
    out_dtype = torch.bfloat16 if fp8_out else DTYPES[recipe.output_dtype] if recipe.output_dtype else None
    plan = make_plan(models, labels, primary, operations_for(recipe, n_layers), out_dtype,
                     parse_size(recipe.max_shard_size))
    return fp8_output_plan(plan, models, primary, parse_size(recipe.max_shard_size)) if fp8_out else plan


# -- on the workers -------------------------------------------------------------------------------------------
def _node_path(path: Path) -> Path:
    """``path`` as this node sees it (the identity, except where a test simulates another mount point)."""
    mount = os.environ.get(MOUNT_ENV)
    if mount and "=" in mount:
        src, dst = mount.split("=", 1)
        if str(path).startswith(src):
            return Path(dst + str(path)[len(src):])
    return path


def probe(probe_file: str, token: str, inputs: list[str]) -> dict:
    """One per node: read the driver's probe file in the staging folder's parent, write this node's own next to
    it, and list the local inputs this node cannot see."""
    path = _node_path(Path(probe_file))
    node = _node_id()
    seen = path.read_text() == token if path.is_file() else False
    if seen:
        Path(f"{path}.{node}").write_text(token)
    return {"node": node, "host": _host(), "sees_stage": seen,
            "missing_inputs": [p for p in inputs if not _node_path(Path(p)).is_dir()]}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _host() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return socket.gethostname()


def _hold(unit_id: str) -> None:
    """Tests only (``MERGEBACK_TEST_HOLD``): record this task's pid and node, then wait for ``go-all`` or
    ``go-<unit>``."""
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    with open(Path(folder) / f"{unit_id}.pids", "a") as f:
        f.write(f"{os.getpid()} {_node_id()}\n")
    while not ((Path(folder) / "go-all").exists() or (Path(folder) / f"go-{unit_id}").exists()):
        time.sleep(0.01)


def _open_inputs(common: dict, stack: ExitStack) -> dict:
    """The inputs as this node reaches them: local folders as given, Hub models fetched at the pinned commit."""
    from .inputs import open_model
    from .io.resolve import resolve_reference

    here = {}
    for key, m in common["inputs"].items():
        role = "base" if key == "base" else "SFT"
        if m.repo_id:
            here[key] = resolve_reference(m.pinned, role, token=common["token"])
        elif not Path(m.path).is_dir():
            raise InputError(f"{common['labels'][key]}: {m.path} is not visible on node {_host()}; put the inputs "
                             "on storage every node mounts at the same path, or use Hub ids")
        else:
            here[key] = m
    return {k: stack.enter_context(open_model(m, common["labels"][k], here, token=common["token"]))
            for k, m in here.items()}


def merge_unit(common: dict, unit: Unit) -> dict:
    """Ray task: write ``unit``'s tensors into their preallocated shard file; return their XXH3-64s."""
    from .execute import Executor, resolve_device
    from .io.manifest import file_checksum
    from .io.writer import ShardWriter
    from .plan import Plan

    _hold(unit.id)
    started = time.perf_counter()
    with ExitStack() as stack:
        from .inputs import input_views

        models = input_views(common["recipe"], _open_inputs(common, stack), common["labels"])
        plan = plan_recipe(common["recipe"], models, common["labels"])
        if plan_fingerprint(plan) != common["fingerprint"]:
            raise MergeError(f"node {_host()} planned a different merge than the driver (other mergeback or torch "
                             "version, or other input files there); install the same versions on every node")
        opened = time.perf_counter()
        shard = next(s for s in plan.shards if s.filename == unit.filename)
        tensors = shard.tensors[unit.first:unit.stop]
        names = {t.name for t in tensors}
        sub = Plan([j for j in plan.jobs if j.name in names], [shard], [])
        stage = Path(common["stage"])
        writer = ShardWriter(stage, [shard], preallocated=True)
        o = common["options"]
        executor = Executor(resolve_device(o["device"]), o["threads"], o["chunk"], check_finite=o["check_finite"],
                            memory=o["memory"], gpu_memory=o["gpu_memory"])
        try:
            stats = executor.run(sub, models, writer)
            writer.sync()
            sums = [writer.tensor_checksum(t.name) or file_checksum(stage / shard.filename, shard.offsets[t.name],
                                                                     t.nbytes) for t in tensors]
        finally:
            writer.close()
    done = time.perf_counter()
    return {"xxh3": sums, "slerp": {n: dataclasses.asdict(c) for n, c in stats.slerp.items()},
            "bytes": unit.nbytes, "open_seconds": opened - started, "merge_seconds": done - opened,
            "host": _host(), "node": _node_id(), "pid": os.getpid()}


# -- on the driver ----------------------------------------------------------------------------------------------
@dataclass
class ClusterStats:
    """What the cluster did, for the summary and the card."""

    address: str
    nodes: int
    workers: int = 0  # distinct worker processes that finished a unit
    units: int = 0
    wall_seconds: float = 0.0
    open_seconds: float = 0.0  # summed over units: opening inputs and planning on the workers
    merge_seconds: float = 0.0  # summed over units: reading, computing and writing
    probe_seconds: float = 0.0
    node_ids: set = field(default_factory=set)  # nodes that finished a unit

    def line(self) -> str:
        return (f"ray: {self.units} task(s) on {self.workers} worker process(es) on {len(self.node_ids)} of "
                f"{self.nodes} node(s) ({self.address}); {self.wall_seconds:.1f}s wall for the tensors; summed "
                f"over tasks: {self.merge_seconds:.1f}s merging, {self.open_seconds:.1f}s opening inputs and "
                f"planning; {self.probe_seconds:.1f}s probing the staging folder from every node")


def _check_reachable(target: str, option: str) -> None:
    """Fail in seconds, in one line, where Ray itself would retry a dead address for minutes."""
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {option}: {target!r} is not an address; give auto, local, HOST:PORT (the head's "
                         "GCS, e.g. 10.0.0.1:6379) or ray://HOST:PORT (Ray Client, e.g. ray://head:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise InputError(f"--ray {option}: nothing answers at {host}:{port} ({e.strerror or e}); start the cluster "
                         "(ray start --head) or fix the address") from None


class Cluster:
    """A connection to a Ray cluster (shut down on exit if this run started it) that runs planned merges."""

    def __init__(self, address: str, workers: int | None, threads: int | None = None, memory: int = 512 << 20):
        """Each task asks Ray for ``threads`` CPUs (default 1, running 2 executor threads) and ``memory``
        (the executor's ``--memory``) plus :data:`TASK_OVERHEAD`."""
        self.ray = require_ray()
        self.cpus, self.task_memory = threads or 1, memory + TASK_OVERHEAD
        self.address = address
        self.started = False
        self.connect()
        self.nodes = [n for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
        if not self.nodes:
            self.close()
            raise InputError(f"--ray {address}: the cluster has no alive node with a CPU to run merge tasks")
        cpus = int(sum(n["Resources"]["CPU"] for n in self.nodes))
        self.workers = workers or max(1, cpus // self.cpus)
        self.stats = ClusterStats(address, len(self.nodes))

    def connect(self) -> None:
        import logging

        ray, address = self.ray, self.address
        if ray.is_initialized():  # already connected (a notebook, a test): use that cluster
            return
        given = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
        if given not in ("", "auto", "local"):
            _check_reachable(given, address)
        try:
            if address == "auto":  # ray.init()'s own rules: RAY_ADDRESS, a running local cluster, or a new one
                ray.init(logging_level=logging.WARNING)
            elif address == "local":
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
            else:
                _init_at(ray, address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"--ray {address}: cannot connect to a Ray cluster there ({str(e).splitlines()[0]}); "
                             "give auto, local, a head address like 10.0.0.1:6379 or ray://head:10001") from None
        self.started = True

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- up-front checks -----------------------------------------------------------------------------------
    def check_visible(self, out: Path, inputs: dict) -> None:
        """Some node must fit a task, and every node must see the folder the output is staged in (and the local
        inputs): one probe task per node, pinned to it, reads a file the driver wrote there and writes one back
        for the driver to read."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._check_fits(self.cpus, self.task_memory)
        started = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        probe_file = out.parent / f".{out.name}.mergeback-probe-{token}"
        probe_file.write_text(token)
        local = [str(m.path) for m in inputs.values() if not m.repo_id]
        task = self.ray.remote(probe)
        try:
            def on(node_id):
                return task.options(num_cpus=0, max_retries=MAX_RETRIES,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))

            refs = {n["NodeID"]: on(n["NodeID"]).remote(str(probe_file), token, local) for n in self.nodes}
            gone = set()
            for node, ref in refs.items():
                try:
                    answer = self._get([ref])[0]
                except ClusterError:  # the node died since the cluster listed it: no task will run there
                    gone.add(node)
                    continue
                host = answer["host"]
                back = Path(f"{probe_file}.{answer['node']}")
                if not answer["sees_stage"] or not back.is_file() or back.read_text() != token:
                    raise InputError(f"--ray: node {host} cannot see {out.parent}, where {out.name} is staged and "
                                     "written; put -o on storage every node mounts at the same path")
                if answer["missing_inputs"]:
                    raise InputError(f"--ray: node {host} cannot see the input {answer['missing_inputs'][0]}; put "
                                     "the inputs on storage every node mounts at the same path, or use Hub ids")
        finally:
            for p in out.parent.glob(f"{probe_file.name}*"):
                p.unlink(missing_ok=True)
        self.nodes = [n for n in self.nodes if n["NodeID"] not in gone]
        self.stats.nodes = len(self.nodes)
        if not self.nodes:
            raise InputError(f"--ray {self.address}: every node of the cluster died before the merge could start")
        self.stats.probe_seconds = time.perf_counter() - started

    # -- running a plan ------------------------------------------------------------------------------------
    def execute(self, plan, recipe, resolved: dict, labels: dict, stage: Path, journal, *, device: str,
                threads, chunk_elements, check_finite: bool, memory: int, gpu_memory: int, progress: bool,
                verbose: bool, token=None):
        """Run every shard the journal lacks as Ray tasks, journaling each shard as its units come back; the
        slerp results of all shards (journaled earlier or now) come back as :class:`ExecutionStats`."""
        from .execute import CHUNK_ELEMENTS, ExecutionStats
        from .io.writer import preallocate, write_index
        from .methods import SlerpCoefficients

        started = time.perf_counter()
        for shard in plan.shards:
            if shard.filename not in journal.complete:
                preallocate(stage, shard)
        units = plan_units(plan.shards, set(journal.complete), self.workers)
        common = {"recipe": recipe, "inputs": resolved, "labels": labels, "fingerprint": plan_fingerprint(plan),
                  "stage": str(stage), "token": token,
                  "options": {"device": device, "threads": threads or 2, "chunk": chunk_elements or CHUNK_ELEMENTS,
                              "check_finite": check_finite, "memory": memory, "gpu_memory": gpu_memory}}
        env = {k: v for k, v in os.environ.items() if k.startswith("MERGEBACK_") and k != MOUNT_ENV}
        task = self.ray.remote(merge_unit).options(
            num_cpus=self.cpus, memory=self.task_memory, max_retries=MAX_RETRIES, retry_exceptions=[OSError],
            **({"runtime_env": {"env_vars": env}} if env else {}))
        common_ref = self.ray.put(common)
        parts: dict[str, dict[int, dict]] = {}
        units_of = {}
        for u in units:
            units_of[u.filename] = units_of.get(u.filename, 0) + 1
        queue, in_flight = list(units), {}
        bar = self._bar(sum(u.nbytes for u in units), len(plan.shards), len(journal.complete)) if progress else None
        pids = set()
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.workers:
                    u = queue.pop(0)
                    in_flight[task.remote(common_ref, u)] = u
                ready, _ = self.ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    u = in_flight.pop(ref)
                    result = self._get([ref])[0]
                    pids.add((result["host"], result["pid"]))
                    self.stats.node_ids.add(result["node"])
                    self.stats.open_seconds += result["open_seconds"]
                    self.stats.merge_seconds += result["merge_seconds"]
                    self.stats.units += 1
                    parts.setdefault(u.filename, {})[u.first] = result
                    if len(parts[u.filename]) == units_of[u.filename]:
                        pieces = [parts[u.filename][k] for k in sorted(parts[u.filename])]
                        journal.record(u.filename, [s for p in pieces for s in p["xxh3"]],
                                       {n: c for p in pieces for n, c in p["slerp"].items()})
                    if verbose:
                        line = (f"worker {result['host']} pid {result['pid']}: {u.filename} tensors "
                                f"{u.first}..{u.stop - 1} ({u.nbytes / 1e6:.1f} MB) in "
                                f"{result['open_seconds'] + result['merge_seconds']:.1f}s")
                        (bar.write if bar else print)(line, file=sys.stderr)
                    if bar:
                        bar.set_postfix_str(f"shards {len(journal.complete)}/{len(plan.shards)}")
                        bar.update(u.nbytes)
        except BaseException:
            for ref in in_flight:
                self.ray.cancel(ref, force=True)
            raise
        finally:
            if bar:
                bar.close()
        self.stats.workers = len(pids)
        self.stats.wall_seconds = time.perf_counter() - started
        stats = ExecutionStats()
        for entry in journal.complete.values():
            for name, c in (entry.get("slerp") or {}).items():
                stats.slerp[name] = SlerpCoefficients(**c)
        stats.bytes_written = sum(u.nbytes for u in units)
        write_index(stage, plan.shards)
        return stats

    def _check_fits(self, cpus: int, memory: int) -> None:
        """A task no node can hold would wait forever: refuse it up front, naming what to change."""
        if any(n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("memory", 0) >= memory
               for n in self.nodes):
            return
        most = max(n["Resources"].get("memory", 0) for n in self.nodes)
        raise InputError(f"--ray: no node offers {cpus} CPU(s) and {memory / 2**30:.1f} GiB of Ray memory for one "
                         f"task (--memory plus {TASK_OVERHEAD / 2**30:.0f} GiB; the largest node has "
                         f"{most / 2**30:.1f} GiB); give a smaller --memory or --threads")

    def _bar(self, total: int, shards: int, done: int):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"merging on {self.workers} Ray workers",
                   leave=False)
        bar.set_postfix_str(f"shards {done}/{shards}")
        return bar

    def _get(self, refs: list):
        """``ray.get``, with our own errors raised as themselves (one line) instead of Ray's wrapper."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (MergeError, OSError)):
                raise cause from None
            raise MergeError(f"a Ray task failed: {str(e).strip().splitlines()[-1]}") from None
        except self.ray.exceptions.RayError as e:  # a unit that exhausted its retries (worker or node lost)
            raise ClusterError(f"a Ray task was lost after {MAX_RETRIES} retries: {str(e).strip().splitlines()[0]}; "
                               "finished shards are kept") from None
