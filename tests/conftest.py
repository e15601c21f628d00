# The Hub client reads HF_ENDPOINT/HF_HOME/HF_HUB_DISABLE_XET once at import: point it at the local test
# Hub before anything imports huggingface_hub or transformers.
from tests.hub_fixtures import configure_hub_env, hub_server  # noqa: F401  (hub_server is a fixture)

configure_hub_env()

import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_pair

torch.manual_seed(0)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """Tiny checkpoint pairs built once per session: pairs('llama'), pairs('gpt2', dtype=...)..."""
    cache: dict = {}

    def get(arch: str = "llama", dtype=torch.bfloat16, **kw):
        key = (arch, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}")
            cache[key] = make_pair(root, arch, dtype, **kw)
        return cache[key]

    return get


@pytest.fixture
def clean_copy(tmp_path):
    """Copy a model folder so a test may damage it."""

    def copy(src: Path, name: str = "model") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy
