"""Build tiny random DiffusionGemma checkpoints with transformers (the oracle) for tests and tools.

Every norm weight, router scale, per-expert scale and `layer_scalar` is moved away from 1.0 (a fresh
model has them at exactly 1.0, which hides bugs in how they are applied), the encoder and decoder
`layer_scalar`s differ, and the tied embedding is scaled up so the model is confident (near-uniform
random models are chaotic under self-conditioning).

Only tests/ and tools/ import this module: it needs torch and transformers.
"""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
)
from transformers.models.gemma4 import Gemma4VisionConfig

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=24,
)

SMALL = dict(  # the "small" benchmark config of issue 2
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=2,
    sliding_window=128,
    layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
    num_experts=32,
    top_k_experts=4,
    moe_intermediate_size=256,
)


def build_model(text_kwargs: dict | None = None, canvas_length: int = 8, seed: int = 0,
                embed_std: float = 1.5, dtype=torch.float32, attn_implementation: str = "eager"):
    """Return a perturbed `DiffusionGemmaForBlockDiffusion` (eval mode) for the given text config."""
    kw = dict(TINY)
    kw.update(text_kwargs or {})
    kw.setdefault("use_bidirectional_attention", "vision")
    torch.manual_seed(seed)
    tc = DiffusionGemmaTextConfig(**kw)
    vc = Gemma4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                            patch_size=4, position_embedding_size=16, pooling_kernel_size=2,
                            intermediate_size=32)
    cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vc, canvas_length=canvas_length)
    cfg._attn_implementation = attn_implementation
    model = DiffusionGemmaForBlockDiffusion(cfg)
    model.config._attn_implementation = attn_implementation
    for sub in model.modules():
        if hasattr(sub, "config"):
            try:
                sub.config._attn_implementation = attn_implementation
            except Exception:
                pass
    perturb(model, seed=seed, embed_std=embed_std)
    return model.to(dtype).eval()


@torch.no_grad()
def perturb(model, seed: int = 0, embed_std: float = 1.5):
    """Move every scale-like parameter away from 1.0 and make the embedding confident."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if "vision" in name or "embed_vision" in name:
            continue
        if name.endswith(("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight",
                          "router.scale", "router.per_expert_scale")):
            p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
        elif name.endswith("layer_scalar"):
            # encoder scalars in [0.5, 0.9], decoder scalars in [1.1, 1.5]: never equal
            lo = 0.5 if ".encoder." in name else 1.1
            p.copy_(lo + 0.4 * torch.rand(p.shape, generator=g))
    emb = model.model.decoder.embed_tokens.weight
    emb.copy_(torch.randn(emb.shape, generator=g) * embed_std)


def save(model, path) -> str:
    """`save_pretrained` into `path` (safetensors) and return it as a string."""
    model.save_pretrained(str(path))
    return str(path)
