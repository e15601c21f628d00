"""Reading merge outputs back for assertions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards), through the safetensors library."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(folder).glob("*.safetensors"))}


def load_logits(folder: Path, vocab_probe: int = 8) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.arange(vocab_probe).unsqueeze(0)).logits


def index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model.safetensors.index.json").read_text())


def ulps(ours: torch.Tensor, theirs: torch.Tensor, inputs=()) -> float:
    """The largest ``|ours - theirs|`` in units in the last place of ``theirs``'s dtype at the magnitude
    ``max(|ours|, |theirs|, |input_i|)`` of each entry."""
    bits = {torch.bfloat16: 8, torch.float32: 24, torch.float16: 11}[theirs.dtype]
    a, b = ours.double(), theirs.double()
    scale = torch.stack([a.abs(), b.abs(), *(x.double().abs() for x in inputs)]).amax(0)
    _, exponent = torch.frexp(scale.clamp(min=2.0 ** -120))
    return float(((a - b).abs() / torch.ldexp(torch.ones_like(a), exponent - bits)).max())
