"""Tiny real checkpoints for tests, built with transformers from random init (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration)

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def tiny_config(arch: str, vocab: int = 96):
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "mixtral":  # MoE: 3 experts per layer and a router (block_sparse_moe.gate)
        return MixtralConfig(**text, num_local_experts=3, num_experts_per_tok=2)
    if arch == "llava":  # CLIP vision tower of 3 layers, projector, Llama decoder of 2 layers
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=8, patch_size=4, projection_dim=16)
        return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=vocab - 1,
                           tie_word_embeddings=False)
    if arch == "qwen2_vl":  # vision blocks (depth 3), merger, Qwen2 decoder of 2 layers
        return Qwen2VLConfig(text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                                              bos_token_id=None, eos_token_id=None),
                             vision_config=dict(depth=3, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                                                patch_size=2, temporal_patch_size=1, spatial_merge_size=2),
                             image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
                             tie_word_embeddings=False)
    raise ValueError(arch)


_MODELS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel,
           "mixtral": MixtralForCausalLM, "llava": LlavaForConditionalGeneration,
           "qwen2_vl": Qwen2VLForConditionalGeneration}


def save_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer whose ids cover ``vocab``, with a chat template, saved like transformers does."""
    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"<unk>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def make_model(arch: str, seed: int, dtype=torch.bfloat16, vocab: int = 96):
    torch.manual_seed(seed)
    return _MODELS[arch](tiny_config(arch, vocab)).to(dtype)


def perturb(model, seed: int, scale: float = 0.02) -> None:
    """The 'fine-tune': add seeded noise to every floating parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def make_pair(root: Path, arch: str = "llama", dtype=torch.bfloat16, *, added_tokens: int = 0,
              shard_size: str | None = None, scale: float = 0.02, seed: int = 0, sft_count: int = 1):
    """``root/base`` and ``root/sft`` (or ``sft0``, ``sft1``... when ``sft_count`` > 1), saved with tokenizers."""
    root = Path(root)
    vocab = 96
    base = make_model(arch, seed, dtype, vocab)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    base.save_pretrained(root / "base", **kwargs)
    save_tokenizer(root / "base", vocab)
    sfts = []
    for i in range(sft_count):
        sft = make_model(arch, seed, dtype, vocab)
        perturb(sft, seed + 100 + i, scale)
        if added_tokens:
            sft.resize_token_embeddings(vocab + added_tokens)
            with torch.no_grad():
                emb = sft.get_input_embeddings().weight
                emb[vocab:] = torch.randn(added_tokens, emb.shape[1]).to(emb.dtype)
        name = "sft" if sft_count == 1 else f"sft{i}"
        sft.save_pretrained(root / name, **kwargs)
        save_tokenizer(root / name, vocab + added_tokens)
        sfts.append(root / name)
    return root / "base", (sfts[0] if sft_count == 1 else sfts)
