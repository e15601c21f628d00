"""Running one command with wall time and the OS's peak RSS, plus machine facts.

Peak RSS comes from GNU `/usr/bin/time -v` when present (`apt-get install -y time`
on Debian/Ubuntu if missing); otherwise a tiny Python wrapper process runs the command
and reports `getrusage(RUSAGE_CHILDREN)`, which then covers exactly that one command.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

GNU_TIME = Path("/usr/bin/time")
READ_CHUNK = 16 * 1024 * 1024

_RUSAGE_WRAPPER = (
    "import json,resource,subprocess,sys\n"
    "rc=subprocess.call(sys.argv[2:])\n"
    "r=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1],'w').write(json.dumps({'max_rss_kb':r.ru_maxrss,"
    "'user_s':r.ru_utime,'sys_s':r.ru_stime}))\n"
    "sys.exit(rc)\n"
)


def rss_method() -> str:
    return "/usr/bin/time -v" if GNU_TIME.exists() else "getrusage(RUSAGE_CHILDREN) wrapper"


def _parse_gnu_time(text: str) -> dict:
    def number(label: str) -> float | None:
        match = re.search(re.escape(label) + r":\s*([\d.]+)", text)
        return float(match.group(1)) if match else None

    return {
        "max_rss_kb": number("Maximum resident set size (kbytes)"),
        "user_s": number("User time (seconds)"),
        "sys_s": number("System time (seconds)"),
    }


def run_measured(cmd: list[str], log_path: Path, env: dict, cwd: Path) -> dict:
    """Run cmd as a child; returns rc, wall_s, max_rss_mb, user_s, sys_s. Output goes to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("r", suffix=".rusage", delete=False) as stats_file:
        stats_path = stats_file.name
    if GNU_TIME.exists():
        wrapped = [str(GNU_TIME), "-v", "-o", stats_path] + cmd
    else:
        wrapped = [sys.executable, "-c", _RUSAGE_WRAPPER, stats_path] + cmd
    try:
        with open(log_path, "w") as log:
            started = time.perf_counter()
            rc = subprocess.call(wrapped, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            wall = time.perf_counter() - started
        text = Path(stats_path).read_text()
    finally:
        os.unlink(stats_path)
    stats = _parse_gnu_time(text) if GNU_TIME.exists() else json.loads(text or "{}")
    rss_kb = stats.get("max_rss_kb")
    return {
        "rc": rc,
        "wall_s": round(wall, 3),
        "max_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "user_s": stats.get("user_s"),
        "sys_s": stats.get("sys_s"),
    }


def log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def warm_page_cache(model_dirs) -> int:
    """Read every file of the given directories once so timed runs start from a warm cache."""
    buffer = bytearray(READ_CHUNK)
    total = 0
    for model_dir in model_dirs:
        for path in sorted(Path(model_dir).iterdir()):
            if path.is_file():
                with open(path, "rb", buffering=0) as handle:
                    while n := handle.readinto(buffer):
                        total += n
    return total


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit(repo: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def machine_info(repo: Path) -> dict:
    """CPU, cores, RAM, OS and the versions of everything timed."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": _ram_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "transformers": _version("transformers"),
        "mergekit": _version("mergekit"),
        "mergeback": _version("mergeback"),
        "mergeback_commit": _git_commit(repo),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rss_measured_by": rss_method(),
    }
