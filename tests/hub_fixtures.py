"""Pytest wiring for the local Hub test server (`tests/hub_server.py`).

`huggingface_hub` reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import,
and transformers imports it early, so `configure_hub_env()` must run at the very top of
`tests/conftest.py`, before anything imports either. The session-scoped `hub_server` fixture then
starts the server on the port chosen there. Subprocesses (e.g. our CLI) inherit the same settings
through `os.environ`.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

SERVER_SCRIPT = Path(__file__).with_name("hub_server.py")
HUB_USER = "alice"
OTHER_USER = "bob"
# Settings that would point the client at another cache, token or Hub, or keep it offline.
_CLEARED_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                      "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                      "HUGGINGFACE_CO_STAGING")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure_hub_env(tmp_root: Path | None = None) -> int:
    """Point huggingface_hub at a local test Hub and a throw-away cache; return the chosen port.

    Sets HF_ENDPOINT=http://127.0.0.1:PORT, HF_HOME=<tmp_root>/hf_home, HF_HUB_DISABLE_XET=1 (the
    server speaks LFS, not Xet), HF_HUB_DISABLE_TELEMETRY=1, and clears tokens, cache overrides and
    offline flags. Without `tmp_root` a temporary folder is created and removed at exit.
    """
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("configure_hub_env() must run before huggingface_hub (or transformers) is imported")
    if tmp_root is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="mergeback-hub-"))
        atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    port = _free_port()
    for name in _CLEARED_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(Path(tmp_root) / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    })
    return port


@dataclass(frozen=True)
class HubServer:
    """A running test Hub: where it listens, its storage root and tokens for its users."""

    endpoint: str
    root: Path
    write_token: str  # HUB_USER, role "write"
    read_token: str  # HUB_USER, role "read"
    other_token: str  # OTHER_USER, role "write"
    user: str = HUB_USER
    other_user: str = OTHER_USER
    log_path: Path | None = None

    def new_repo_id(self, prefix: str = "repo") -> str:
        """A fresh repo id in HUB_USER's namespace (the server lives for the whole session)."""
        return f"{self.user}/{prefix}-{uuid.uuid4().hex[:8]}"


def start_hub_server(root: Path, port: int, tokens: dict, log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start `hub_server.py`; return the process and its port once it prints READY (no sleeping, no polling)."""
    tokens_path = log_path.with_name("hub_tokens.json")
    tokens_path.write_text(json.dumps(tokens))  # a file keeps the tokens off the command line
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), "--port", str(port), "--root", str(root),
             "--tokens", f"@{tokens_path}"],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    ready = process.stdout.readline().strip()
    if ready != f"READY {port}" and not (port == 0 and ready.startswith("READY ")):
        process.kill()
        process.wait()
        raise RuntimeError(f"hub server did not start (got {ready!r}); log:\n{log_path.read_text()}")
    return process, int(ready.split()[1])


def stop_hub_server(process: subprocess.Popen) -> int:
    """SIGTERM the server, wait for it and return its exit code."""
    process.terminate()
    try:
        return process.wait(timeout=10)
    finally:
        if process.stdout:
            process.stdout.close()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> HubServer:
    """The session's test Hub, on the port chosen by `configure_hub_env()`."""
    endpoint = os.environ.get("HF_ENDPOINT", "")
    from huggingface_hub import constants  # only after the environment is checked by conftest

    if not endpoint.startswith("http://127.0.0.1:") or constants.ENDPOINT != endpoint:
        pytest.fail("call tests.hub_fixtures.configure_hub_env() at the top of tests/conftest.py, "
                    "before anything imports huggingface_hub")
    workdir = tmp_path_factory.mktemp("hub_server")
    write_token, read_token, other_token = (f"hf_test_{secrets.token_hex(12)}" for _ in range(3))
    tokens = {
        write_token: {"user": HUB_USER, "role": "write"},
        read_token: {"user": HUB_USER, "role": "read"},
        other_token: {"user": OTHER_USER, "role": "write"},
    }
    log_path = workdir / "hub_server.log"
    process, _ = start_hub_server(workdir / "repos", urlsplit(endpoint).port, tokens, log_path)
    try:
        yield HubServer(endpoint, workdir / "repos", write_token, read_token, other_token, log_path=log_path)
    finally:
        stop_hub_server(process)
