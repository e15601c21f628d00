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


MARKER = ".mergeback-output.json"  # in every folder mergeback commits: the files it wrote (and the run)
_OUR_HIDDEN = (".mergeback",)  # names of our own bookkeeping files start so (marker, journal)


def check_output(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse an OUT mergeback may not write: a file, a folder holding anything mergeback did not write
    (``--force`` or not), or an earlier mergeback output unless ``force`` (or ``resume``, which compares it
    later); also refuse staging/old siblings that are not ours."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"output {out} is a file, not a folder; mergeback replaces only folders it "
                                "wrote: choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        foreign = foreign_entries(out)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputExistsError(
                f"output {out} holds files mergeback did not write ({foreign[0]}{more}); --force replaces only an "
                "empty folder or an earlier mergeback output: choose another output folder")
        if not force and not resume:
            raise OutputExistsError(f"output {out} exists and is not empty; pass --force to replace it")
    for side in (staging_dir(out), old_dir(out)):
        check_ours(side)


def check_target(out: Path, inputs: dict | None = None) -> None:
    """Refuse an OUT that is ``/``, a home directory, the working directory or above it, or that is, lies
    inside or contains an input folder or any file an input folder links to (real paths, symlinks resolved)."""
    from ..errors import InputError

    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(Path.cwd()))
    if real == Path(real.anchor):
        raise InputError(f"output {out}: is the root folder; give a new folder, e.g. -o ./merged")
    if real == cwd or real in cwd.parents:
        where = "the working directory" if real == cwd else f"a folder above the working directory {cwd}"
        raise InputError(f"output {out}: is {where}; give a new folder, e.g. -o ./merged")
    if real in _home_dirs():
        raise InputError(f"output {out}: is a home directory; give a new folder, e.g. -o ~/merged")
    for label, folder in (inputs or {}).items():
        src = Path(os.path.realpath(folder))
        if real == src or src in real.parents:
            raise InputError(f"output {out}: {'is' if real == src else 'lies inside'} the folder of {label} "
                             f"({src}); write the merge elsewhere")
        for target in [src, *_link_targets(src)]:
            if real in target.parents:
                raise InputError(f"output {out}: contains {target}, read by {label}; write the merge elsewhere")


def local_inputs(refs: dict) -> dict[str, Path]:
    """Those of ``refs`` (label -> reference) that name existing local folders: checkable before any download."""
    return {label: Path(str(ref)).expanduser() for label, ref in refs.items() if Path(str(ref)).expanduser().is_dir()}


def _home_dirs() -> set[Path]:
    homes = {os.path.expanduser("~")}
    try:
        import pwd

        homes |= {entry.pw_dir for entry in pwd.getpwall()}
    except (ImportError, OSError):
        pass
    return {Path(os.path.realpath(h)) for h in homes if h}


def _link_targets(folder: Path) -> list[Path]:
    """Where the symlinked files directly in ``folder`` really live (a Hub snapshot links into blobs/)."""
    if not folder.is_dir():
        return []
    return [Path(os.path.realpath(p)) for p in folder.iterdir() if p.is_symlink()]


def read_marker(folder: Path) -> dict | None:
    """The marker mergeback wrote into ``folder``, or None."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == "mergeback" and isinstance(data.get("files"), list)
    return data if ok else None


def write_marker(folder: Path, identity: dict | None = None, kind: str = "merge", files=None) -> None:
    """Record in ``folder`` the names mergeback wrote there (default: all but its bookkeeping) and the run."""
    if files is None:
        files = [p.name for p in folder.iterdir() if not p.name.startswith(_OUR_HIDDEN)]
    data = {"written_by": "mergeback", "kind": kind, "files": sorted(files)}
    if identity is not None:
        data["identity"] = identity
    (folder / MARKER).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def add_to_marker(folder: Path, names) -> None:
    """Files written into a committed output after the merge (sweep results) become part of it."""
    data = read_marker(folder)
    if data is not None:
        data["files"] = sorted(set(data["files"]) | set(names))
        (folder / MARKER).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that mergeback did not write there: all of them without a marker."""
    marker = read_marker(folder)
    ours = {MARKER, *marker["files"]} if marker else set()
    return sorted(p.name for p in folder.iterdir() if p.name not in ours)


def check_ours(path: Path) -> None:
    """Refuse unless ``path`` is absent or a folder mergeback made (empty, journaled, or marked and unchanged)."""
    from .manifest import MANIFEST_NAME

    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        names = [p.name for p in path.iterdir()]
        if all(n.startswith(MANIFEST_NAME) for n in names) or MANIFEST_NAME in names or \
                (read_marker(path) is not None and not foreign_entries(path)):
            return  # empty, a journal (or its first write), or a marked output nobody added to
    raise OutputExistsError(f"{path} exists and mergeback did not write it; move it away (mergeback uses that "
                            "name next to the output folder)")


def staging_dir(out: Path) -> Path:
    """The sibling folder a run builds in (stable, so an interrupted run can be found again)."""
    return out.parent / f".{out.name}.mergeback-partial"


def old_dir(out: Path) -> Path:
    """The sibling an old OUT is renamed to until the new one is in place."""
    return out.parent / f".{out.name}.mergeback-old"


def fresh_staging(out: Path) -> Path:
    """An empty staging folder for ``out`` (an earlier one is removed only if mergeback made it)."""
    stage = staging_dir(out)
    check_ours(stage)
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
    _check_lock_file(path)
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


def _check_lock_file(path: Path) -> None:
    """A file at the lock's name must be a lock of ours (empty or a pid): it is truncated and removed."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        ours = path.is_file() and not path.is_symlink() and path.stat().st_size <= 32 and \
            (path.read_bytes().strip().isdigit() or not path.read_bytes().strip())
    except OSError:
        ours = False
    if not ours:
        raise OutputExistsError(f"{path} exists and mergeback did not write it; move it away (mergeback locks "
                                "the output folder with that file)")


def commit(stage: Path, out: Path) -> None:
    """Atomically put ``stage`` at ``out``, replacing an old OUT only after the new one is complete, and only
    if it is empty or an earlier mergeback output (checked again here: it may have changed during the run)."""
    _fsync_dir(stage)
    old = None
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir() or foreign_entries(out):
            check_output(out, force=True)  # raises, naming what is in the way
        old = old_dir(out)
        check_ours(old)
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
