"""Bytes of the DiffusionGemma 26B-A4B text weights in each storage format, computed from the shapes.

    python tools/size_table.py            # markdown table for docs/quantization.md

The shapes are those of the release (docs/architecture.md §9); the byte counts
follow the on-disk layouts of minidiff/formats.py exactly (packed codes + scales + per-module extras).
The vision tower (0.573 B parameters, 1.15 GB in bf16) is not counted: minidiff never loads it.
"""

from __future__ import annotations

import argparse

REAL = dict(H=2816, L=30, V=262144, I=2112, E=128, Ie=704, nh=16, window=1024, canvas=256,
            sliding=dict(hd=256, kv=8), full=dict(hd=512, kv=2), full_every=6)


def linears(c=REAL):
    """[(kind, out, in, count)] of every Linear weight of the text path (experts per expert)."""
    H, I, E, Ie, nh = c["H"], c["I"], c["E"], c["Ie"], c["nh"]
    out = []
    n_full = c["L"] // c["full_every"]
    for kind, n_layers in (("sliding", c["L"] - n_full), ("full", n_full)):
        hd, kv = c[kind]["hd"], c[kind]["kv"]
        out += [("attn", nh * hd, H, n_layers), ("attn", kv * hd, H, n_layers), ("attn", H, nh * hd, n_layers)]
        if kind == "sliding":
            out.append(("attn", kv * hd, H, n_layers))                 # v_proj (full layers have none)
    L = c["L"]
    out += [("mlp", I, H, 2 * L), ("mlp", H, I, L),
            ("experts", Ie, H, 2 * E * L), ("experts", H, Ie, E * L),
            ("router", E, H, L), ("self_cond", I, H, 2), ("self_cond", H, I, 1)]
    return out


def other_params(c=REAL):
    """Embedding + every non-Linear tensor (norms, scales, scalars)."""
    H, L = c["H"], c["L"]
    n_full = L // c["full_every"]
    per_layer_norms = 7 * H + H + c["E"] + 1          # 7 norms, router.scale, per_expert_scale, layer_scalar
    qk = 2 * (c["sliding"]["hd"] * (L - n_full) + c["full"]["hd"] * n_full)
    return c["V"] * H + H + H + L * per_layer_norms + qk + L   # + final norm, sc pre_norm, encoder scalars


def group_for(n: int, g: int) -> int:
    while n % g:
        g //= 2
    return g


def linear_bytes(out, n, fmt, g=None):
    if fmt == "bf16":
        return 2 * out * n
    if fmt == "int4":          # weight_packed I32 + weight_scale BF16 + weight_shape I64[2]
        g = group_for(n, g)
        return 4 * out * -(-n // 8) + 2 * out * (n // g) + 16
    if fmt == "nvfp4":         # weight U8 + weight_scale F8 + weight_scale_2 F32 + input_scale F32
        return out * n // 2 + out * (n // 16) + 8
    raise ValueError(fmt)


def variant_bytes(scope: str, fmt: str, g=None, c=REAL) -> int:
    quantized = {"experts": {"experts"}, "all-linear": {"experts", "attn", "mlp"}, "none": set()}[scope]
    total = 2 * other_params(c)
    for kind, out, n, count in linears(c):
        total += count * linear_bytes(out, n, fmt if kind in quantized else "bf16", g)
    return total


def kv_bytes(context: int, c=REAL, bytes_per=2) -> int:
    """KV cache for `context` positions: sliding layers keep their last window-1 positions."""
    n_full = c["L"] // c["full_every"]
    sl = (c["L"] - n_full) * 2 * c["sliding"]["kv"] * c["sliding"]["hd"] * min(context, c["window"] - 1)
    fu = n_full * 2 * c["full"]["kv"] * c["full"]["hd"] * context
    return (sl + fu) * bytes_per


def table(budget=18e9, context=32768) -> str:
    params = other_params() + sum(out * n * cnt for _, out, n, cnt in linears())
    rows = [("bf16 (the release)", variant_bytes("none", "bf16")),
            ("int4 g32 experts + bf16 rest", variant_bytes("experts", "int4", 32)),
            ("int4 g128 experts + bf16 rest", variant_bytes("experts", "int4", 128)),
            ("int4 g32 all-linear (minidiff default)", variant_bytes("all-linear", "int4", 32)),
            ("int4 g128 all-linear", variant_bytes("all-linear", "int4", 128)),
            ("NVFP4 experts + bf16 rest", variant_bytes("experts", "nvfp4")),
            ("NVFP4 all-linear", variant_bytes("all-linear", "nvfp4"))]
    kv = kv_bytes(context)
    logits = REAL["canvas"] * REAL["V"] * 4              # one canvas of float32 logits
    lines = [f"Text path: {params / 1e9:.3f} B parameters. Budget {budget / 1e9:.0f} GB; KV cache for "
             f"{context} positions in bf16 = {kv / 1e9:.2f} GB (sliding layers keep {REAL['window'] - 1} "
             f"positions: {kv_bytes(REAL['window'] - 1) / 1e9:.2f} GB; full layers "
             f"{kv_bytes(REAL['window']) - kv_bytes(REAL['window'] - 1)} B per position); one canvas of "
             f"fp32 logits = {logits / 1e9:.2f} GB.", "",
             "| variant | text weights GB | GiB | bits/weight | left of 18 GB after weights | "
             f"after KV({context}) + logits |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, b in rows:
        left = budget - b
        lines.append(f"| {label} | {b / 1e9:.2f} | {b / 2**30:.2f} | {8 * b / params:.2f} | "
                     f"{left / 1e9:+.2f} | {(left - kv - logits) / 1e9:+.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gb", type=float, default=18.0)
    ap.add_argument("--context", type=int, default=32768)
    a = ap.parse_args(argv)
    print(table(a.budget_gb * 1e9, a.context))


if __name__ == "__main__":
    main()
