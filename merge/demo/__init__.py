"""``merge demo``: the recovery story on a tiny shipped base/SFT pair, offline, in well under a minute.

The shipped pair (``assets/base``, ``assets/sft``: a 3-layer Llama trained on public-domain English, then
fine-tuned on arithmetic-tutor chats until it forgot much of its English) and its probes
(``assets/probes``: selection and report parts of each) are built by ``scripts/make_demo_models.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ..errors import InputError

ASSETS = Path(__file__).with_name("assets")
DEFAULT_OUT = "mergeback-demo"
DEMO_FILES = ("recovered", "tradeoff.png", "sweep.json")  # what a demo folder holds (its marker says so)


def assets() -> dict[str, Path]:
    """Paths of the shipped models and probe files (checked to exist)."""
    probes = ASSETS / "probes"
    paths = {"base": ASSETS / "base", "sft": ASSETS / "sft",
             "general": probes / "general_select.txt", "general_report": probes / "general_report.txt",
             "domain": probes / "domain_select.jsonl", "domain_report": probes / "domain_report.jsonl"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise InputError(f"the demo assets are missing ({missing[0]}); reinstall mergeback, or build them with "
                         "scripts/make_demo_models.py")
    return paths


def demo_tasks() -> dict:
    """The shipped cloze tasks as report tasks of the sweep when lm-eval is installed (else none: the demo runs
    on probes alone)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return {}
    tasks = ASSETS / "tasks"
    return {"general_report_tasks": str(tasks / "demo_general_cloze.yaml"),
            "domain_report_tasks": str(tasks / "demo_domain_cloze.yaml"), "no_cache": True}


def run_demo(out: str | Path = DEFAULT_OUT, force: bool = False, echo: Callable[[str], None] | None = None):
    """Sweep 11 values of t on the shipped pair; write ``out/recovered`` (the chosen merge, with its Recovery
    card), ``out/tradeoff.png`` and ``out/sweep.json``. With lm-eval installed, the shipped cloze tasks (12
    documents each) are report rows too. Returns the :class:`~merge.recover.SweepResult`."""
    from ..io import output
    from ..recover import sweep

    say = echo or (lambda line: None)
    paths = assets()
    out = Path(out).expanduser().resolve()
    output.check_target(out, {"the demo models": ASSETS})
    output.check_output(out, force)
    with output.output_lock(out):
        output.check_output(out, force)
        stage = output.fresh_staging(out)  # built aside; an old demo folder is replaced only once this is done
        output.write_marker(stage, kind="demo", files=DEMO_FILES)
        say(f"mergeback demo: a tiny base model (English), its SFT (arithmetic tutor chats) - the SFT forgot "
            f"English;\nmerging back with t = share of the base, 11 values from 0 (SFT) to 1 (base)\n")
        try:
            result = sweep(str(paths["sft"]), str(paths["base"]), paths["domain"], paths["general"],
                           out=stage / "recovered", general_report=paths["general_report"],
                           domain_report=paths["domain_report"], plot=stage / "tradeoff.png",
                           command=f"merge demo -o {out}", echo=say, max_tokens=None,
                           threads=1, **demo_tasks())  # the model is tiny: one thread beats OpenMP's overhead on its small matrices
            (stage / "sweep.json").write_text((stage / "recovered" / "sweep.json").read_text())
            output.commit(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)  # made by this run, and only by it
            raise
    result.out, result.plot = out / "recovered", out / "tradeoff.png"
    result.json_path = out / "recovered" / "sweep.json"
    return result
