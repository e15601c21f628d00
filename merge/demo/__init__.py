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


def run_demo(out: str | Path = DEFAULT_OUT, force: bool = False, echo: Callable[[str], None] | None = None):
    """Sweep 11 values of t on the shipped pair; write ``out/recovered`` (the chosen merge, with its Recovery
    card), ``out/tradeoff.png`` and ``out/sweep.json``. Returns the :class:`~merge.recover.SweepResult`."""
    from ..io import output
    from ..recover import sweep

    say = echo or (lambda line: None)
    paths = assets()
    out = Path(out).expanduser().resolve()
    output.check_output(out, force)
    if out.is_dir() and any(out.iterdir()):  # --force: replace the old demo folder, as merges replace OUT
        shutil.rmtree(out)
    elif out.exists() and not out.is_dir():
        out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "recovered"
    say(f"mergeback demo: a tiny base model (English), its SFT (arithmetic tutor chats) - the SFT forgot English;\n"
        f"merging back with t = share of the base, 11 values from 0 (SFT) to 1 (base)\n")
    result = sweep(str(paths["sft"]), str(paths["base"]), paths["domain"], paths["general"], out=model_dir,
                   general_report=paths["general_report"], domain_report=paths["domain_report"], force=True,
                   plot=out / "tradeoff.png", command=f"merge demo -o {out}", echo=say, max_tokens=None,
                   threads=1)  # the model is tiny: one thread beats OpenMP's overhead on its small matrices
    (out / "sweep.json").write_text((model_dir / "sweep.json").read_text())
    return result
