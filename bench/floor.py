"""The I/O floor of a two-model merge: read both inputs fully, write one output, fdatasync.

No parsing and no arithmetic: for every file of BASE it reads that file and the same-named
file of SFT in fixed-size chunks and writes BASE's bytes to OUT, then fdatasyncs each
output file (a merge that claims to be done must have its bytes on disk). This is what
`cp` plus `sync` costs, so `ours / floor` says how much of our time is spent on anything
other than moving the bytes the ordinary way.

`--direct` writes the whole aligned part of each file with O_DIRECT (the tail buffered),
as our writer does: the floor for our own I/O strategy, reported beside the plain one.

    python bench/floor.py [--direct] BASE_DIR SFT_DIR OUT_DIR
"""

from __future__ import annotations

import mmap
import os
import shutil
import sys
from pathlib import Path

CHUNK_BYTES = 16 * 1024 * 1024


def copy_reading_both(base_file: Path, sft_file: Path, out_file: Path, direct: bool = False) -> int:
    """Stream base_file to out_file while reading sft_file alongside; returns bytes written."""
    base_buf = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT needs
    sft_buf = bytearray(CHUNK_BYTES)
    written = 0
    with open(base_file, "rb", buffering=0) as fb, open(sft_file, "rb", buffering=0) as fs, \
            open(out_file, "wb", buffering=0) as fo:
        dfd = os.open(out_file, os.O_WRONLY | os.O_DIRECT) if direct else None
        try:
            while True:
                n = fb.readinto(base_buf)
                fs.readinto(sft_buf)
                if not n:
                    break
                if dfd is not None and n == CHUNK_BYTES:
                    os.pwrite(dfd, base_buf, written)
                else:
                    os.pwrite(fo.fileno(), memoryview(base_buf)[:n], written)
                written += n
        finally:
            if dfd is not None:
                os.close(dfd)
        while fs.readinto(sft_buf):  # SFT files may be longer (e.g. a different header)
            pass
        os.fdatasync(fo.fileno())
    return written


def run_floor(base: Path, sft: Path, out: Path, direct: bool = False) -> int:
    """Copy every file of `base` to `out` while reading `sft`; returns total bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(base.iterdir()):
        if not src.is_file():
            continue
        if src.suffix == ".safetensors":
            total += copy_reading_both(src, sft / src.name, out / src.name, direct)
        else:
            shutil.copyfile(src, out / src.name)
    fd = os.open(out, os.O_RDONLY)  # make the new directory entries durable too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    direct = "--direct" in args
    args = [a for a in args if a != "--direct"]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_floor(*(Path(a) for a in args), direct=direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
