"""The output folder: built in a temporary sibling, then renamed into place, so OUT is never half-written."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import MergeError, OutputExistsError

SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
)
_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing non-empty OUT unless ``force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"output {out} exists and is not empty; pass --force to replace it")


def staging_dir(out: Path) -> Path:
    """The sibling folder a run builds in (stable, so an interrupted run can be found again)."""
    return out.parent / f".{out.name}.mergeback-partial"


def fresh_staging(out: Path) -> Path:
    stage = staging_dir(out)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def lock_path(out: Path) -> Path:
    """The sibling file whose flock marks OUT as being written by a run."""
    return out.parent / f".{out.name}.mergeback-lock"


class OutputLocked(MergeError):
    """Another run is writing the same output folder."""


class DiskFull(MergeError):
    """The disk filled up during a run; the finished shards are kept for ``--resume``."""

    resumable = True


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive ``flock`` on OUT's lock file for the duration, or fail at once if another run has it.

    The lock file is removed on exit while still locked; a run that opened the old file re-checks the inode.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)  # like mergekit and transformers, OUT's parents are created
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLocked(f"another merge{who} is writing {out} (lock {path}); wait for it to finish or "
                               "choose another output folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def commit(stage: Path, out: Path) -> None:
    """Atomically put ``stage`` at ``out``, replacing an old OUT only after the new one is complete."""
    _fsync_dir(stage)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.mergeback-old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(stage, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files, chat template and generation config from the SFT folder (never pickles)."""
    copied = []
    for name in SIDE_FILES:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied


def write_config(config: dict, dst: Path, dtype_name: str | None, untied: bool = False) -> None:
    """The SFT's config.json with its dtype field saying what was written; ``untied``: the output has its own
    lm_head (tied and untied inputs), so ``tie_word_embeddings`` is false."""
    if not config:
        return
    config = dict(config)
    if untied:
        config["tie_word_embeddings"] = False
    if dtype_name:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = _DTYPE_NAMES.get(dtype_name, dtype_name)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
