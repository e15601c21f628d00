"""lm-eval task specs -> loaded leaf tasks: primary metric, document ids and holdout parts (:class:`TaskSuite`).

A spec is a task or group name (lm-eval's own tasks, or those under ``--tasks-path`` folders), a task YAML
file, or a folder of them. A task's *primary metric* is the first of its ``metric_list`` with a known
orientation (or ``--metric task=name[,filter]``), on its first filter, oriented by lm-eval's
``higher_is_better``. Every document gets a stable id: lm-eval's own ``doc_hash`` (SHA-256 of the document's
JSON). ``--holdout F`` puts a document in the report part when ``int(id[:16], 16) < F * 2**64``, else in the
selection part.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .harness import EvalSettings, require_lm_eval


@dataclass
class TaskInfo:
    """One leaf task, loaded: its lm-eval Task, primary metric and filter, and its documents' ids."""

    name: str
    task: object
    metric: str
    filter: str
    higher_is_better: bool
    doc_ids: list[str]
    content_hash: str
    parts: dict[str, list[int]] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # config values evaluations override, as loaded


def doc_hash(doc) -> str:
    """lm-eval's ``doc_hash`` of a document: SHA-256 of ``json.dumps(doc, indent=2, ensure_ascii=False)``."""
    from lm_eval.utils import handle_non_serializable

    return hashlib.sha256(json.dumps(doc, indent=2, default=handle_non_serializable,
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


def in_report_part(doc_id: str, holdout: float) -> bool:
    """A document goes to the report part when ``int(id[:16], 16) < holdout * 2**64``."""
    return int(doc_id[:16], 16) < holdout * 2 ** 64


def split_indices(doc_ids: list[str], holdout: float | None, count: int) -> dict[str, list[int]]:
    """Indices of the first ``count`` documents in each part (``all``; with a holdout also select/report)."""
    parts = {"all": list(range(count))}
    if holdout is not None:
        parts["report"] = [i for i in range(count) if in_report_part(doc_ids[i], holdout)]
        parts["select"] = [i for i in range(count) if not in_report_part(doc_ids[i], holdout)]
    return parts


def unique_ids(hashes: list[str]) -> list[str]:
    """Document ids: the hash, with ``~k`` appended to the k-th repeat of identical content."""
    seen: dict[str, int] = {}
    ids = []
    for h in hashes:
        seen[h] = seen.get(h, 0) + 1
        ids.append(h if seen[h] == 1 else f"{h}~{seen[h]}")
    return ids


def _stable(value):
    """JSON fallback for configs: functions by module, name and source hash (never a memory address)."""
    if callable(value):
        try:
            source = hashlib.sha256(inspect.getsource(value).encode()).hexdigest()[:16]
        except (OSError, TypeError):
            source = ""
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}:{source}"
    return str(value)


_MANAGERS: dict = {}  # (paths, with_defaults) -> TaskManager, for the life of the process


def _task_managers(paths: tuple[str, ...], with_defaults: bool):
    """A TaskManager over ``paths`` (and lm-eval's own tasks when ``with_defaults``), built once per process:
    indexing lm-eval's ~10 000 task YAML files takes seconds."""
    from lm_eval.tasks import TaskManager

    key = (paths, with_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=with_defaults)
    return _MANAGERS[key]


def _local_config(yaml_path: Path) -> dict:
    """A task YAML as lm-eval reads it, with relative ``data_files`` resolved against the YAML's folder (lm-eval
    itself resolves them against the working directory; a path that exists there is kept)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")

    def fix(p):
        if isinstance(p, str) and not Path(p).is_absolute() and not Path(p).exists() \
                and (yaml_path.parent / p).exists():
            return str((yaml_path.parent / p).resolve())
        return p

    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v)
                                               for k, v in files.items()}
    elif isinstance(files, (str, list)):
        cfg["dataset_kwargs"]["data_files"] = [fix(x) for x in files] if isinstance(files, list) else fix(files)
    return cfg


def _yaml_files(folder: Path) -> list[Path]:
    """Task YAML files (those naming a ``task``) under a folder, sorted."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found = []
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            cfg = load_yaml(path, resolve_func=False)
        except Exception:  # not a task file (lm-eval's own index skips those too)
            continue
        if isinstance(cfg.get("task"), str):
            found.append(path)
    return found


def split_specs(text) -> list[str]:
    """``"gsm8k,mmlu, ./t.yaml"`` (or a list of such strings) -> the specs."""
    items = [text] if isinstance(text, (str, Path)) else list(text or [])
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def _load(specs: list[str], tasks_path: tuple[str, ...], option: str) -> dict[str, object]:
    """Leaf lm-eval Task objects (name -> Task) for task/group names, YAML files and folders."""
    require_lm_eval()
    paths = tuple(str(Path(p).expanduser().resolve()) for p in tasks_path)
    for p in paths:
        if not Path(p).is_dir():
            raise InputError(f"--tasks-path {p}: no such folder")
    loaded: dict[str, object] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = _yaml_files(path)
            if not files:
                raise InputError(f"{option} {spec}: no task YAML file (with a `task:` name) in this folder")
            items = [(str(f), _local_config(f.resolve())) for f in files]
        elif path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise InputError(f"{option} {spec}: expected a task YAML file (.yaml) or a task name")
            cfg = _local_config(path.resolve())
            items = [(spec, cfg if "task" in cfg else str(path.resolve()))]  # a group file: lm-eval's loader
        else:
            items = [(spec, _named(spec, paths, option))]
        for label, item in items:
            loaded.update(_build(label, item, paths))
    return loaded


def _named(name: str, paths: tuple[str, ...], option: str):
    """A task or group name: a YAML config from ``--tasks-path`` (data paths resolved), else the name itself."""
    if any(c in name for c in "/\\") or name.endswith((".yaml", ".yml")):
        raise InputError(f"{option} {name}: no such file or folder")
    local = _task_managers(paths, False) if paths else None
    entry = local.task_index.get(name) if local else None
    if entry is not None:
        kind = getattr(entry.kind, "name", "")
        return _local_config(Path(entry.yaml_path)) if kind == "TASK" and entry.yaml_path else name
    if not _may_be_lm_eval_task(name) or name not in _task_managers(paths, True).task_index:
        raise InputError(f"{option} {name}: unknown lm-eval task; give a task or group name (`lm-eval ls tasks` "
                         "lists them), a task YAML file or a folder of them (more folders with --tasks-path)")
    return name


def _may_be_lm_eval_task(name: str) -> bool:
    """False when none of lm-eval's own task YAML files contains ``name`` at all, so it names none of them
    (lm-eval's index is built from those files' literal names). Reading the files takes about a second;
    parsing them into lm-eval's index takes ten times longer."""
    import lm_eval.tasks

    needle = name.encode()
    return any(needle in path.read_bytes() for path in Path(lm_eval.tasks.__file__).parent.rglob("*.y*ml"))


def _build(label: str, item, paths: tuple[str, ...]) -> dict[str, object]:
    """Load one spec (a config dict, or a name) into its leaf tasks; a loading failure is one line."""
    local = isinstance(item, dict) or (bool(paths) and item in _task_managers(paths, False).task_index)
    manager = _task_managers(paths, not local)
    try:
        result = manager.load([item])
    except InputError:
        raise
    except Exception as e:  # data missing offline, bad YAML, unknown dataset: lm-eval raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"task {label}: lm-eval cannot load it ({type(e).__name__}: {first}); check the task's "
                         "dataset (with HF_DATASETS_OFFLINE=1 it must be a local file or in the datasets cache)") \
            from None
    return dict(result["tasks"])


def _primary(name: str, task, choice: str | None) -> tuple[str, str, bool]:
    """(metric, filter, higher_is_better) of a task: the user's choice, else the first metric with a known
    orientation, on the task's first filter."""
    hib = {k: v for k, v in (task.higher_is_better() or {}).items() if k != "bypass"}
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    if choice:
        metric, _, filt = choice.partition(",")
        if metric not in hib:
            raise InputError(f"--metric {name}={choice}: task {name} has no metric {metric!r} (it has: "
                             f"{', '.join(hib) or 'none'})")
        if filt and filt not in filters:
            raise InputError(f"--metric {name}={choice}: task {name} has no filter {filt!r} (it has: "
                             f"{', '.join(filters)})")
        if hib[metric] is None:
            raise InputError(f"--metric {name}={choice}: lm-eval does not say whether higher {metric} is better; "
                             "set higher_is_better in the task's metric_list")
        return metric, filt or filters[0], bool(hib[metric])
    usable = [m for m, v in hib.items() if v is not None]
    if not usable:
        raise InputError(f"task {name}: no usable metric (its metric_list is empty or no metric says "
                         "higher_is_better); add `metric_list: [{metric: acc, higher_is_better: true}]` to its "
                         "YAML, or pick one with --metric task=name")
    return usable[0], filters[0], bool(hib[usable[0]])


def _content_hash(task, doc_ids: list[str], num_fewshot: int | None) -> str:
    """SHA-256 of the task's config (functions by source) and its documents (and few-shot pool when used)."""
    config = task.dump_config() if hasattr(task, "dump_config") else {}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=_stable).encode())
    digest.update("\n".join(doc_ids).encode())
    shots = num_fewshot if num_fewshot is not None else (config.get("num_fewshot") or 0)
    if shots:
        for doc in task.fewshot_docs() or []:
            digest.update(doc_hash(doc).encode())
    return digest.hexdigest()


class TaskSuite:
    """The leaf tasks of one side (general or domain), loaded once and reused for every evaluation."""

    def __init__(self, specs, *, tasks_path=(), metrics: dict[str, str] | None = None,
                 holdout: float | None = None, settings: EvalSettings | None = None, option: str = "--tasks"):
        settings = settings or EvalSettings()
        self.specs = split_specs(specs)
        if not self.specs:
            raise InputError(f"{option}: give at least one task")
        if holdout is not None and not 0 < holdout < 1:
            raise InputError(f"--holdout {holdout}: give a fraction between 0 and 1 (exclusive)")
        self.holdout = holdout
        metrics = dict(metrics or {})
        self.tasks: dict[str, TaskInfo] = {}
        for name, task in _load(self.specs, tuple(tasks_path), option).items():
            metric, filt, higher = _primary(name, task, metrics.pop(name, None))
            docs = list(task.eval_docs)
            if not docs:
                raise InputError(f"task {name}: it has no documents in its evaluation split")
            ids = unique_ids([doc_hash(d) for d in docs])
            count = _sample_size(len(docs), settings.limit)
            info = TaskInfo(name, task, metric, filt, higher, ids, _content_hash(task, ids, settings.num_fewshot),
                            split_indices(ids, holdout, count),
                            {k: copy.deepcopy(task.get_config(k)) for k in ("num_fewshot", "generation_kwargs")})
            for part in ("select", "report"):
                if holdout is not None and not info.parts[part]:
                    raise InputError(f"--holdout {holdout}: task {name} has no document in its {part} part "
                                     f"({count} documents); use more documents or another fraction")
            self.tasks[name] = info
        self.unmatched_metrics = sorted(metrics)  # --metric choices for tasks of another suite (or none)

    def names(self) -> list[str]:
        return list(self.tasks)


def _sample_size(n: int, limit) -> int:
    """How many documents lm-eval evaluates with ``limit`` (a count, or a fraction below 1)."""
    if limit is None:
        return n
    return min(n, math.ceil(n * limit) if limit < 1 else int(limit))
