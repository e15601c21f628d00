"""The journal of a run, so an interrupted merge (Ctrl-C, full disk, SIGKILL, power loss) can be resumed.

Before any tensor is written, the staging folder gets ``.mergeback-manifest.json``: the run's identity (engine
version, recipe, cheap input fingerprints, the planned shard headers) and one entry per planned shard. When
every tensor of a shard is written, the shard is fdatasync'ed and marked complete, with a checksum of each
tensor's bytes (an XXH3-64 kept by the writer as it writes, so nothing is read back), by an atomic rewrite of the
manifest (temp file + rename). A resumed run with the same identity re-checks the shards marked complete
against those checksums, keeps those that still match, and writes only the rest, so its result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import xxhash

from ..errors import InputError

MANIFEST_NAME = ".mergeback-manifest.json"
FORMAT = 3  # 3: XXH3-64 tensor checksums (2 had CRC-32)
HEAD_BYTES = 1 << 20  # fingerprints hash this much of each input file: safetensors headers live there


def file_fingerprint(path: Path) -> list:
    """``[size, mtime_ns, sha256 of the first HEAD_BYTES]``: cheap, and changes when a file is replaced."""
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return [st.st_size, st.st_mtime_ns, head]


def folder_fingerprint(folder: Path) -> dict[str, list]:
    """Fingerprints of the visible regular files directly inside a model folder."""
    folder = Path(folder)
    return {p.name: file_fingerprint(p) for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and p.is_file()}


def file_checksum(path: Path, start: int, length: int, block: int = 1 << 24) -> str:
    """XXH3-64 (hex) of ``length`` bytes of ``path`` from ``start`` (a short file gives one that will not match)."""
    digest = xxhash.xxh3_64()
    buf = bytearray(min(block, max(length, 1)))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0:
            n = f.readinto(memoryview(buf)[:min(length, len(buf))])
            if not n:
                break
            digest.update(memoryview(buf)[:n])
            length -= n
    return digest.hexdigest()


def shard_checksums(path: Path, shard) -> dict:
    """What the journal records for a shard file: the sha256 of its header and an XXH3-64 per tensor."""
    with open(path, "rb") as f:
        head = f.read(len(shard.header))
    return {"header": hashlib.sha256(head).hexdigest(),
            "xxh3": [file_checksum(path, shard.offsets[t.name], t.nbytes) for t in shard.tensors]}


def shard_intact(path: Path, shard, recorded: dict) -> bool:
    """Whether a shard on disk still holds exactly what the journal recorded (same size, header, tensors)."""
    if not path.is_file() or path.stat().st_size != shard.size:
        return False
    wanted = {"header": recorded.get("header"), "xxh3": recorded.get("xxh3")}
    return shard_checksums(path, shard) == wanted


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never a torn one, even after a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fdatasync(f.fileno())
    os.replace(tmp, path)


def run_identity(version: str, recipe: dict, inputs: Mapping[str, Path], shards) -> dict:
    """Everything the output bytes depend on; resuming is allowed only when it is unchanged."""
    return {
        "engine": version,
        "recipe": recipe,
        "inputs": {key: {"path": str(path), "files": folder_fingerprint(path)} for key, path in inputs.items()},
        "plan": {s.filename: hashlib.sha256(s.header).hexdigest() for s in shards},
    }


def identity_difference(old: dict, new: dict) -> str:
    """A short phrase saying what changed between two run identities (:func:`run_identity`): the engine
    version, else the first recipe field, else the first input that differs."""
    if old.get("engine") != new["engine"]:
        return f"mergeback version {old.get('engine')} made it, this is {new['engine']}"
    old_recipe = old.get("recipe") or {}
    for key in sorted(set(old_recipe) | set(new["recipe"])):
        if old_recipe.get(key) != new["recipe"].get(key):
            return f"recipe field {key!r} was {old_recipe.get(key)!r}, now {new['recipe'].get(key)!r}"
    old_inputs = old.get("inputs") or {}
    for key, now in new["inputs"].items():
        before = old_inputs.get(key) or {}
        if before.get("path") != now["path"]:
            return f"input {key} was {before.get('path')}, now {now['path']}"
        changed = sorted(n for n in set(before.get("files", {})) | set(now["files"])
                         if before.get("files", {}).get(n) != now["files"].get(n))
        if changed:
            return f"input {now['path']} changed since then ({', '.join(changed[:3])})"
    return "the planned output differs"


class Journal:
    """The manifest of one staging folder, updated as shards complete (thread-safe)."""

    def __init__(self, stage: Path, shards, identity: dict, complete: dict[str, dict] | None = None):
        self.stage = Path(stage)
        self.shards = {s.filename: s for s in shards}
        self.identity = identity
        self.complete: dict[str, dict] = dict(complete or {})
        self._lock = threading.Lock()
        self._remaining: dict[str, int] = {}
        self._shard_of: dict[str, str] = {}
        self._writer = None
        self._stats = None

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, stage: Path, shards, identity: dict, resume: bool) -> tuple[Journal, str | None]:
        """Prepare ``stage`` and its manifest; returns the journal and a message for the user (or None).

        With ``resume``, shards the previous attempt completed are kept if their sha256 still matches;
        a different identity is refused. Without it, an earlier partial folder is replaced.
        """
        stage = Path(stage)
        journal_shards = {s.filename: s for s in shards}
        old = _load(stage / MANIFEST_NAME) if stage.is_dir() else None
        message = None
        complete: dict[str, dict] = {}
        if resume and old is not None:
            if old.get("identity") != identity:
                raise InputError(
                    f"--resume: cannot continue the interrupted run in {stage}: "
                    f"{identity_difference(old.get('identity') or {}, identity)}; "
                    "run again without --resume to start over")
            recorded = {k: v for k, v in (old.get("complete") or {}).items() if k in identity["plan"]}
            complete = {name: entry for name, entry in recorded.items()
                        if shard_intact(stage / name, journal_shards[name], entry)}
            bad = len(recorded) - len(complete)
            message = (f"resuming the interrupted run: reusing {len(complete)} of {len(shards)} shard(s)"
                       + (f", rewriting {bad} that no longer match their checksum" if bad else ""))
        elif resume and stage.exists():
            message = f"--resume: {stage} holds no resumable run; starting over"
        elif stage.exists():
            message = (f"replaced the partial output of an interrupted run in {stage} "
                       "(pass --resume to continue such a run instead)")
        _clear(stage, keep=set(complete))
        journal = cls(stage, shards, identity, complete)
        journal.save()
        return journal, message

    # -- during the run -------------------------------------------------------------------------------------
    @property
    def skip_files(self) -> set[str]:
        return set(self.complete)

    @property
    def skip_tensors(self) -> set[str]:
        return {t.name for f in self.complete for t in self.shards[f].tensors}

    def attach(self, writer, stats) -> None:
        """Track ``writer``'s shards; ``stats`` (ExecutionStats) gets the recorded slerp results back and
        gives new ones to record."""
        from ..methods import SlerpCoefficients

        self._writer, self._stats = writer, stats
        for entry in self.complete.values():
            for name, c in (entry.get("slerp") or {}).items():
                stats.slerp[name] = SlerpCoefficients(**c)
        for filename, shard in self.shards.items():
            if filename in self.complete:
                continue
            self._remaining[filename] = len(shard.tensors)
            for t in shard.tensors:
                self._shard_of[t.name] = filename
        for filename, n in list(self._remaining.items()):
            if n == 0:
                self._finish(filename)

    def on_done(self, job) -> None:
        """Executor hook: a tensor is fully written; the last one of a shard makes the shard durable."""
        filename = self._shard_of.get(job.name)
        if filename is None:
            return
        with self._lock:
            self._remaining[filename] -= 1
            last = self._remaining[filename] == 0
        if last:
            self._finish(filename)

    def _finish(self, filename: str) -> None:
        shard = self.shards[filename]
        self._writer.sync(filename)
        sums = [self._writer.tensor_checksum(t.name) for t in shard.tensors]
        if None in sums:  # some tensor was not written in one ordered pass: read it back
            sums = shard_checksums(self.stage / filename, shard)["xxh3"]
        slerp = {t.name: dataclasses.asdict(self._stats.slerp[t.name]) for t in shard.tensors
                 if t.name in self._stats.slerp}
        self.record(filename, sums, slerp)

    def record(self, filename: str, sums: list[str], slerp: dict) -> None:
        """Mark a durable shard complete with its tensors' XXH3-64s and slerp results (also used by a driver
        whose shards were written by other processes)."""
        shard = self.shards[filename]
        with self._lock:
            self.complete[filename] = {"header": hashlib.sha256(shard.header).hexdigest(), "xxh3": sums,
                                       "slerp": slerp}
            self.save()

    def save(self) -> None:
        write_json_atomic(self.stage / MANIFEST_NAME, {
            "format": FORMAT,
            "identity": self.identity,
            "shards": {f: {"size": s.size, "tensors": [t.name for t in s.tensors]} for f, s in self.shards.items()},
            "complete": self.complete,
        })

    def remove(self) -> None:
        """Drop the manifest once the folder is complete (it is not part of the model)."""
        for name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):
            try:
                os.unlink(self.stage / name)
            except FileNotFoundError:
                pass


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _clear(stage: Path, keep: set[str]) -> None:
    """An empty staging folder, except the completed shards being reused."""
    if stage.is_dir() and not stage.is_symlink():
        for p in stage.iterdir():
            if p.name in keep and p.is_file() and not p.is_symlink():
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    else:
        if stage.is_symlink() or stage.exists():
            stage.unlink()
        stage.mkdir(parents=True)

