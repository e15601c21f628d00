"""Generate a synthetic Llama-shaped (base, SFT) checkpoint pair for benchmarking.

The base is seeded random bf16 weights; the SFT is ``base + delta_scale * std * noise``,
seeded per tensor name, so any tensor can be regenerated independently and two runs
with the same arguments produce byte-identical files.

Generation streams: each shard's safetensors header is computed up front from the
planned shapes, then tensors are generated and appended one at a time to the base and
SFT shard files, so memory stays at a few tensors even for the 3B pair.

    python bench/make_pair.py --size 0.1b --out bench/work/pairs/0.1b
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BF16_BYTES = 2
INIT_STD = 0.02
MARKER = "bench_pair.json"


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that decide a Llama checkpoint's tensor shapes."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    shard_bytes: int  # upper bound on one shard file, like save_pretrained's max_shard_size


SIZES = {
    # ~0.12B: GPT-2-small widths with a Llama block.
    "0.1b": LlamaShape(768, 12, 2048, 12, 4, 32000, shard_bytes=100_000_000),
    # ~1.1B: TinyLlama-1.1B shapes.
    "1b": LlamaShape(2048, 22, 5632, 32, 4, 32000, shard_bytes=1_000_000_000),
    # ~3.4B: OpenLLaMA-3B shapes.
    "3b": LlamaShape(3200, 26, 8640, 32, 32, 32000, shard_bytes=2_000_000_000),
}


def tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face Llama tensor names and shapes, in model order."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def plan_shards(shapes, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards no larger than shard_bytes (unless one tensor is)."""
    shards: list[list] = [[]]
    used = 0
    for name, dims in shapes:
        size = numel(dims) * BF16_BYTES
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, dims))
        used += size
    return shards


def safetensors_header(tensors) -> bytes:
    """The length prefix plus JSON header of a bf16 safetensors file holding `tensors` in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        size = numel(dims) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def seeded_normal(dims, key: str) -> torch.Tensor:
    """Standard-normal fp32 tensor whose values depend only on `key`."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.empty(dims, dtype=torch.float32).normal_(generator=gen)


def make_tensors(name: str, dims, seed: int, delta_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, sft) bf16 tensors for one weight name."""
    is_norm = len(dims) == 1
    base = seeded_normal(dims, f"{seed}:base:{name}").mul_(INIT_STD)
    if is_norm:
        base.add_(1.0)  # trained RMSNorm gains sit around 1
    scale = 1.0 if is_norm else INIT_STD
    sft = seeded_normal(dims, f"{seed}:delta:{name}").mul_(delta_scale * scale)
    sft.add_(base)
    return base.to(torch.bfloat16), sft.to(torch.bfloat16)


def write_bytes(handle, tensor: torch.Tensor) -> None:
    handle.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))


def llama_config(shape: LlamaShape) -> dict:
    """config.json in the layout of a released Llama checkpoint (LlamaConfig fields).

    Written by hand because importing transformers costs more than generating 0.1B weights.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def write_pair(size: str, out: Path, seed: int = 0, delta_scale: float = 0.01) -> dict:
    """Write out/base and out/sft; skip if a matching pair is already complete. Returns the marker."""
    shape = SIZES[size]
    marker = {"size": size, "seed": seed, "delta_scale": delta_scale, "shape": asdict(shape)}
    marker_path = out / MARKER
    if marker_path.exists() and json.loads(marker_path.read_text()).get("spec") == marker:
        return json.loads(marker_path.read_text())

    started = time.perf_counter()
    shapes = tensor_shapes(shape)
    shards = plan_shards(shapes, shape.shard_bytes)
    n = len(shards)
    config = llama_config(shape)
    weight_map = {}
    total = sum(numel(d) for _, d in shapes) * BF16_BYTES
    dirs = {kind: out / kind for kind in ("base", "sft")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.safetensors"):
            stale.unlink()
    for index, tensors in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{n:05d}.safetensors"
        header = safetensors_header(tensors)
        with open(dirs["base"] / filename, "wb") as fb, open(dirs["sft"] / filename, "wb") as fs:
            fb.write(header)
            fs.write(header)
            for name, dims in tensors:
                base, sft = make_tensors(name, dims, seed, delta_scale)
                write_bytes(fb, base)
                write_bytes(fs, sft)
                weight_map[name] = filename
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in dirs.values():
        (d / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        (d / "config.json").write_text(json.dumps(config, indent=2))
    result = {
        "spec": marker,
        "parameters": total // BF16_BYTES,
        "bytes_per_model": total,
        "shards": n,
        "generate_seconds": round(time.perf_counter() - started, 2),
    }
    marker_path.write_text(json.dumps(result, indent=2))
    return result


def write_second_sft(size: str, out: Path, seed: int = 0, delta_scale: float = 0.01) -> dict:
    """out/sft2: a second fine-tune of the same base (its own delta noise), for methods that need two
    (model_stock). Skipped when complete; returns its marker."""
    shape = SIZES[size]
    marker = {"size": size, "seed": seed, "delta_scale": delta_scale, "shape": asdict(shape), "second": True}
    folder = out / "sft2"
    marker_path = folder / MARKER
    if marker_path.exists() and json.loads(marker_path.read_text()).get("spec") == marker:
        return json.loads(marker_path.read_text())
    started = time.perf_counter()
    shards = plan_shards(tensor_shapes(shape), shape.shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    for index, tensors in enumerate(shards, start=1):
        with open(folder / f"model-{index:05d}-of-{len(shards):05d}.safetensors", "wb") as f:
            f.write(safetensors_header(tensors))
            for name, dims in tensors:
                base, _ = make_tensors(name, dims, seed, delta_scale)
                scale = 1.0 if len(dims) == 1 else INIT_STD
                delta = seeded_normal(dims, f"{seed}:delta2:{name}").mul_(delta_scale * scale)
                write_bytes(f, delta.add_(base.float()).to(torch.bfloat16))
    for name in ("model.safetensors.index.json", "config.json"):
        (folder / name).write_bytes((out / "sft" / name).read_bytes())
    result = {"spec": marker, "generate_seconds": round(time.perf_counter() - started, 2)}
    marker_path.write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/base and OUT/sft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta-scale", type=float, default=0.01,
                        help="SFT delta std as a fraction of the init std (default 0.01)")
    parser.add_argument("--sft2", action="store_true", help="also write OUT/sft2, a second fine-tune (model_stock)")
    args = parser.parse_args(argv)
    info = write_pair(args.size, args.out, args.seed, args.delta_scale)
    if args.sft2:
        info["sft2"] = write_second_sft(args.size, args.out, args.seed, args.delta_scale)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
