"""One candidate measured on the resident model: its parameters set in place, then the probes and tasks scored.

A :class:`Scorer` runs in the sweep's own process, or in each Ray actor of a distributed sweep
(:mod:`merge.recover.sweep_ray`), which builds its own with :func:`build_scorer`.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..evaluate import ProbeScore
from ..evaluate.scoring import score
from .inplace import InPlaceModel


@dataclass
class Measurement:
    """A candidate's scores on one part ("select"/"report"): probes per side, tasks per side, cache counts."""

    general: ProbeScore | None
    domain: ProbeScore | None
    tasks: dict = field(default_factory=dict)
    cached: int = 0
    total: int = 0
    seconds_set: float = 0.0
    seconds_eval: float = 0.0
    worker: dict = field(default_factory=dict)  # host, pid, node of the Ray actor that measured it


class Scorer:
    """Sets a candidate in place and scores it, timing both."""

    def __init__(self, inplace: InPlaceModel, encoded: dict, device: torch.device, tasks=None):
        self.inplace, self.encoded, self.device, self.tasks = inplace, encoded, device, tasks

    def measure(self, recipe, which: str = "select") -> Measurement:
        began = time.perf_counter()
        self.inplace.apply(recipe)
        set_s = time.perf_counter() - began
        model = self.inplace.model
        general, domain = (score(model, self.encoded[f"{side}_{which}"], self.device)
                           if f"{side}_{which}" in self.encoded else None for side in ("general", "domain"))
        tasks, cached, total = {}, 0, 0
        if self.tasks is not None and (self.tasks.select if which == "select" else self.tasks.report):
            tasks, cached, total, _ = self.tasks.evaluate(recipe, which)
        return Measurement(general, domain, tasks, cached, total, set_s, time.perf_counter() - began - set_s)

    width = 1  # candidates measured at once

    def measure_many(self, items):
        """``(recipe, which, label)`` items measured in order, each yielded as soon as it is done."""
        for recipe, which, _ in items:
            yield self.measure(recipe, which)


def build_scorer(setup: dict) -> Scorer:
    """On a Ray worker: open the inputs as this node reaches them, hold base and SFT once in an
    :class:`InPlaceModel`, and score on the driver's encoded probes and (rebuilt here) tasks."""
    from ..distributed import _open_inputs
    from ..execute import resolve_device
    from ..keys import BASE, PRIMARY
    from .sweep_tasks import build_tasks

    task_args = setup["tasks"]
    with ExitStack() as stack:
        models = _open_inputs(setup["common"], stack)
        device = resolve_device(setup["device"])
        inplace = InPlaceModel(models, setup["common"]["labels"], device, setup["template"],
                               written_dtype(models[PRIMARY]) if task_args else None)
        tasks = None
        if task_args:
            tasks = build_tasks(**task_args["build"])
            tasks.start(inplace.model, load_tokenizer(models[PRIMARY], models[BASE]), task_args["apply_chat_template"],
                        task_args["fingerprints"], {"eval_dtype": str(inplace.model.dtype), "device": device.type})
    return Scorer(inplace, setup["encoded"], device, tasks)


def written_dtype(sft) -> torch.dtype | None:
    """The dtype lm-eval (``HFLM(pretrained=<folder>)``, dtype auto) evaluates the written merge in: its
    config's. With tasks the resident model evaluates in it too, so task scores equal those of the written
    merge (without tasks, half precision is evaluated in float32 on the CPU)."""
    config = sft.config if isinstance(sft.config, dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def load_tokenizer(sft, base):
    """The SFT's tokenizer (its folder, or an adapter's), else the base's."""
    import warnings

    from transformers import AutoTokenizer

    last = None
    for model in (sft, base):
        folder = Path(model.side_files_path)
        if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a broken tokenizer file: say which folder
            last = f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})"
    raise InputError(last or f"{sft.path}: no tokenizer files in the SFT or base folder; a sweep needs one to "
                             "tokenize the probes")
