"""The model configuration: `config.json` of the release (root + `text_config`), validated.

Everything the forward pass needs is resolved here once, per layer where the two attention types
differ (head dim, KV heads, RoPE). See docs/architecture.md (§1, §9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MinidiffError
from .folder import ModelFolder, _show

SLIDING, FULL = "sliding_attention", "full_attention"
DEC, ENC = "model.decoder", "model.encoder.language_model"   # the checkpoint's two prefixes (§9)
FINAL_LOGIT_SOFTCAP = 30.0  # a class attribute in the reference: saved configs omit it; read it when present


@dataclass
class LayerConfig:
    """What differs between a sliding and a full attention layer."""
    kind: str            # SLIDING or FULL
    head_dim: int        # 256 sliding / 512 full in the release
    num_kv_heads: int    # 8 sliding / 2 full in the release
    inv_freq: np.ndarray  # [head_dim // 2] float32 RoPE inverse frequencies (zeros = dims that do not rotate)

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # dense MLP width (also the self-conditioning MLP)
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int      # per-expert width
    sliding_window: int             # W: an encoder query sees W keys including itself
    rms_norm_eps: float
    canvas_length: int              # C: tokens denoised together (256 in the release)
    max_position_embeddings: int
    layers: list[LayerConfig]
    bos_token_id: int = 2
    pad_token_id: int = 0
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    final_logit_softcapping: float = FINAL_LOGIT_SOFTCAP
    quantization_config: dict | None = None
    checkpoint_dtype: str | None = None   # the dtype the checkpoint was saved in ("bfloat16"; None: not stated)

    @property
    def layer_types(self) -> list[str]:
        return [layer.kind for layer in self.layers]


# ----------------------------------------------------------------------------------------------
# RoPE inverse frequencies


def rope_inv_freq(params: dict, head_dim: int, where: str) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] for one layer type.

    default:      inv_freq[i] = theta^(-2i/head_dim), every pair rotates.
    proportional: the first n_rot = int(factor * head_dim // 2) pairs use theta^(-2i/head_dim) (the
                  denominator is the FULL head dim), the remaining pairs get 0 and pass through.
    """
    rope_type = params.get("rope_type", "default")
    theta = _num(params, "rope_theta", where, lo=1.0, hi=1e12)
    i = np.arange(0, head_dim, 2, dtype=np.float32)                      # [hd/2] even dim indices 2i
    if rope_type == "default":
        factor = float(_num(params, "partial_rotary_factor", where, lo=0.0, hi=1.0, default=1.0))
        dim = int(head_dim * factor)
        j = np.arange(0, dim, 2, dtype=np.float32)
        inv = (1.0 / (theta ** (j / dim))).astype(np.float32)
        return np.concatenate([inv, np.zeros(head_dim // 2 - inv.size, np.float32)])
    if rope_type == "proportional":
        factor = _num(params, "partial_rotary_factor", where, lo=0.0, hi=1.0)
        n_rot = int(factor * head_dim // 2)
        inv = (1.0 / (theta ** (i / head_dim))).astype(np.float32)
        inv[n_rot:] = 0.0
        return inv
    raise MinidiffError(f"config.json: {where}.rope_type: unsupported value {_show(rope_type)} "
                        "(expected 'default' or 'proportional')")


# ----------------------------------------------------------------------------------------------
# parsing and validation


def _get(d: dict, key: str, where: str):
    if not isinstance(d, dict):
        raise MinidiffError(f"config.json: field {where} must be an object")
    if key not in d or d[key] is None:
        raise MinidiffError(f"config.json: missing field {where}.{key}")
    return d[key]


def _num(d: dict, key: str, where: str, lo=None, hi=None, integer=False, default=None, above=None):
    """A number field: the right type (bool is not a number), finite, in [lo, hi] (and > above)."""
    if default is not None and isinstance(d, dict) and d.get(key) is None:
        return default
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        kind = "an integer" if integer else "a number"
        raise MinidiffError(f"config.json: field {where}.{key} must be {kind}, got {_show(v)}")
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and not v > above):
        lo_s = f"({above}" if above is not None else f"[{lo}"
        raise MinidiffError(f"config.json: field {where}.{key} = {_show(v)} is out of range {lo_s}, {hi}]")
    return v


def _int(d, key, where, lo=1, hi=None, default=None):
    return _num(d, key, where, lo=lo, hi=hi, integer=True, default=default)


# Upper bounds far above the release (and any plausible DiffusionGemma): a config.json claiming more is
# refused before anything is sized by it. The tensors are then checked against the config one by one.
LIMITS = dict(layers=1024, hidden=65536, width=1 << 20, heads=1024, head_dim=8192, experts=4096,
              vocab=1 << 24, positions=1 << 24, canvas=1 << 16)


def parse_config(root: dict) -> ModelConfig:
    """Validate a parsed config.json (root dict) and resolve it into a `ModelConfig`."""
    if not isinstance(root, dict):
        raise MinidiffError("config.json: top level must be a JSON object")
    mt = root.get("model_type")
    if mt is not None and mt not in ("diffusion_gemma", "diffusion_gemma_text"):
        raise MinidiffError(f"config.json: model_type {mt!r} is not 'diffusion_gemma'")
    tc = root.get("text_config", root if mt == "diffusion_gemma_text" else None)
    if not isinstance(tc, dict):
        raise MinidiffError("config.json: missing field text_config")
    w = "text_config"

    L = LIMITS
    n_layers = _int(tc, "num_hidden_layers", w, hi=L["layers"])
    hidden = _int(tc, "hidden_size", w, hi=L["hidden"])
    n_heads = _int(tc, "num_attention_heads", w, hi=L["heads"])
    head_dim = _int(tc, "head_dim", w, hi=L["head_dim"])
    n_kv = _int(tc, "num_key_value_heads", w, hi=L["heads"])
    if n_heads % n_kv:
        raise MinidiffError(f"config.json: {w}.num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv})")
    if tc.get("use_bidirectional_attention") == "all":
        raise MinidiffError("config.json: use_bidirectional_attention='all' is not supported (the release uses 'vision')")
    act = tc.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise MinidiffError(f"config.json: {w}.hidden_activation {act!r} is not supported (expected 'gelu_pytorch_tanh')")
    if tc.get("attention_bias"):
        raise MinidiffError(f"config.json: {w}.attention_bias=true is not supported")

    layer_types = tc.get("layer_types")
    if layer_types is None:  # the reference's default pattern: every 6th layer is full
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or any(t not in (SLIDING, FULL) for t in layer_types):
        raise MinidiffError(f"config.json: {w}.layer_types must list {n_layers} entries of "
                            f"'{SLIDING}' / '{FULL}'")
    layer_types = list(layer_types)
    layer_types[-1] = FULL  # the reference forces the last layer to full attention

    # Per-layer overrides: a saved HF config has `per_layer_config` {idx: {head_dim, num_key_value_heads}};
    # the release's config.json names them `global_head_dim` / `num_global_key_value_heads`.
    per_layer = tc.get("per_layer_config")
    if per_layer is None:
        g = {"head_dim": _int(tc, "global_head_dim", w, hi=L["head_dim"], default=512)}
        if tc.get("num_global_key_value_heads") is not None:
            g["num_key_value_heads"] = _int(tc, "num_global_key_value_heads", w, hi=L["heads"])
        per_layer = {str(i): g for i, t in enumerate(layer_types) if t == FULL}
    if not isinstance(per_layer, dict):
        raise MinidiffError(f"config.json: {w}.per_layer_config must be an object")

    rope = _get(tc, "rope_parameters", w)
    layers = []
    for i, kind in enumerate(layer_types):
        o = per_layer.get(str(i)) or {}
        lw = f"{w}.per_layer_config.{i}"
        hd = _int(o, "head_dim", lw, hi=L["head_dim"], default=head_dim)
        kv = _int(o, "num_key_value_heads", lw, hi=L["heads"], default=n_kv)
        if hd % 2 or n_heads % kv:
            raise MinidiffError(f"config.json: layer {i}: head_dim {hd} must be even and num_attention_heads "
                                f"({n_heads}) a multiple of num_key_value_heads ({kv})")
        rp = rope.get(kind) if isinstance(rope, dict) else None
        if not isinstance(rp, dict):
            raise MinidiffError(f"config.json: missing field {w}.rope_parameters.{kind}")
        layers.append(LayerConfig(kind, hd, kv, rope_inv_freq(rp, hd, f"{w}.rope_parameters.{kind}")))

    eos = root.get("eos_token_id", tc.get("eos_token_id", 1))
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is None:
        eos = []
    if not isinstance(eos, list) or len(eos) > 1024:
        raise MinidiffError(f"config.json: eos_token_id must be a token id or a list of at most 1024 ids")
    vocab = _int(tc, "vocab_size", w, hi=L["vocab"])
    for tok in eos:
        if type(tok) is not int or not 0 <= tok < vocab:
            raise MinidiffError(f"config.json: eos_token_id {tok!r} is outside the vocabulary [0, {vocab})")
    num_experts = _int(tc, "num_experts", w, hi=L["experts"])
    max_pos = _int(tc, "max_position_embeddings", w, hi=L["positions"], default=131072)  # the reference's default
    qc = root.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise MinidiffError("config.json: quantization_config must be an object")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(tc, "intermediate_size", w, hi=L["width"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_experts=num_experts,
        top_k_experts=_int(tc, "top_k_experts", w, hi=num_experts),
        moe_intermediate_size=_int(tc, "moe_intermediate_size", w, hi=L["width"]),
        sliding_window=_int(tc, "sliding_window", w, lo=2, hi=L["positions"]),
        rms_norm_eps=float(_num(tc, "rms_norm_eps", w, hi=1.0, above=0.0, default=1e-6)),
        canvas_length=_int(root, "canvas_length", "root", hi=min(L["canvas"], max_pos), default=256),
        max_position_embeddings=max_pos,
        layers=layers,
        bos_token_id=_int(tc, "bos_token_id", w, lo=0, hi=vocab - 1, default=2),
        pad_token_id=_int(tc, "pad_token_id", w, lo=0, hi=vocab - 1, default=0),
        eos_token_ids=eos,
        final_logit_softcapping=float(_num(tc, "final_logit_softcapping", w, lo=1e-3, hi=1e6, default=FINAL_LOGIT_SOFTCAP)),
        quantization_config=qc,
        checkpoint_dtype=next((d for d in (root.get("dtype"), root.get("torch_dtype"), tc.get("dtype"),
                                           tc.get("torch_dtype")) if isinstance(d, str)), None),
    )


def read_config_json(folder) -> dict:
    """`folder/config.json` as a dict, or a one-line error."""
    d = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    if not d.has("config.json"):
        raise MinidiffError(f"{d.shown}: no config.json (is this a DiffusionGemma model folder?)")
    root = d.read_json("config.json")
    if not isinstance(root, dict):
        raise MinidiffError(f"{d.shown / 'config.json'}: top level must be a JSON object")
    return root


def load_config(folder) -> ModelConfig:
    """Read and validate `folder/config.json`."""
    return parse_config(read_config_json(folder))
