"""The I/O floor of a two-model merge: read both inputs fully, write one output, fdatasync.

No parsing and no arithmetic: for every file of BASE it reads that file and the same-named
file of SFT in fixed-size chunks and writes BASE's bytes to OUT, then fdatasyncs each
output file (a merge that claims to be done must have its bytes on disk). A real merge
cannot beat this program's wall time, so `ours / floor` says how much of our time is
spent on anything other than unavoidable I/O.

    python bench/floor.py BASE_DIR SFT_DIR OUT_DIR
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CHUNK_BYTES = 16 * 1024 * 1024


def copy_reading_both(base_file: Path, sft_file: Path, out_file: Path) -> int:
    """Stream base_file to out_file while reading sft_file alongside; returns bytes written."""
    base_buf = bytearray(CHUNK_BYTES)
    sft_buf = bytearray(CHUNK_BYTES)
    written = 0
    with open(base_file, "rb", buffering=0) as fb, open(sft_file, "rb", buffering=0) as fs, \
            open(out_file, "wb", buffering=0) as fo:
        while True:
            n = fb.readinto(base_buf)
            fs.readinto(sft_buf)
            if not n:
                break
            fo.write(memoryview(base_buf)[:n])
            written += n
        while fs.readinto(sft_buf):  # SFT files may be longer (e.g. a different header)
            pass
        os.fdatasync(fo.fileno())
    return written


def run_floor(base: Path, sft: Path, out: Path) -> int:
    """Copy every file of `base` to `out` while reading `sft`; returns total bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(base.iterdir()):
        if not src.is_file():
            continue
        if src.suffix == ".safetensors":
            total += copy_reading_both(src, sft / src.name, out / src.name)
        else:
            shutil.copyfile(src, out / src.name)
    fd = os.open(out, os.O_RDONLY)  # make the new directory entries durable too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_floor(*(Path(a) for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
