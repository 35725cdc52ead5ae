"""moe_experts.cu replayed lane by lane in NumPy: its index arithmetic checked without a GPU.

The kernel's risk is not its arithmetic (an MMA is a matrix product) but its bookkeeping: which weight
word, token row and scale each of a warp's 32 lanes loads, and which output element each lane writes.
This file transcribes that bookkeeping line for line (same names: e, f, g, t, r0, k1, k0, i, j) and
replaces only the tensor-core instruction by what PTX defines it to do, built from the fragment tables of
the PTX ISA ("Matrix Fragments for mma.m16n8k16"), not from the kernel's comments:

    A 16×16: lane 4g+t holds A[g][2t,2t+1], A[g+8][2t,2t+1], A[g][2t+8,2t+9], A[g+8][2t+8,2t+9]
    B 16×8:  lane 4g+t holds B[2t,2t+1][g], B[2t+8,2t+9][g]
    C 16×8:  lane 4g+t holds C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]

On its first GPU run (H200, 2026-11-26) the kernel was wrong by up to 150 % of the output (every lane
group loaded the warp's first weight row); this replay, given the same inputs, reproduced the same errors
to three digits, and agrees with `moe_reference` after the fix. It is slow (Python loops over blocks,
warps and lanes): tiny shapes only. It is a hand transcription, so it must change with the kernel: change
the index arithmetic here first, check it on the CPU (tests/test_kernel_emulator.py, whose cases are the
GPU test's: tests/moe_cases.py), then on a GPU (tests/test_gpu_kernels.py).

"""

from __future__ import annotations

import numpy as np

from ..ops import gelu_tanh
from ..tensors import bf16_to_f32, f32_to_bf16_bits
from .moe_experts import combine, expert_rows

TILES, WARPS, LANES = 8, 4, 32       # as in the kernel: 8 tiles of 8 rows, 4 warps of 16 features


# ---- the loads: one lane's view -------------------------------------------------------------------------

def load_a(fmt, W, f, K, k0, g, t):
    """The A fragment of lane (g, t): 4 pairs of weight values. W is the expert's words, flat
    (bf16: uint16 [N·K]; int4: uint32 [N·K/8])."""
    f += g
    if fmt == "bf16":
        w = W.view(np.uint32)                                       # two bf16 a word, low half first
        row0, row8 = (f * K + k0) // 2 + t, ((f + 8) * K + k0) // 2 + t
        words = [w[row0], w[row8], w[row0 + 4], w[row8 + 4]]
        return [tuple(bf16_to_f32(np.array([x & 0xFFFF, x >> 16], np.uint16))) for x in map(int, words)]
    n = K // 8
    q0, q8 = f * n + k0 // 8, (f + 8) * n + k0 // 8
    return [int4_pair(W[q0], 2 * t), int4_pair(W[q8], 2 * t), int4_pair(W[q0 + 1], 2 * t),
            int4_pair(W[q8 + 1], 2 * t)]


def int4_pair(word, i):
    """Nibbles i, i+1 of a word as q = code - 8."""
    word = int(word)
    return (float(((word >> 4 * i) & 15) - 8), float(((word >> (4 * i + 4)) & 15) - 8))


def load_b(X, row, K, k0, t, valid):
    """The B fragment of lane (g, t): 2 pairs of token row `row` of X (bf16 words, flat [rows·K])."""
    if not valid:
        return [(0.0, 0.0), (0.0, 0.0)]
    x = bf16_to_f32(X[row * K + k0:][:16].copy())
    return [(x[2 * t], x[2 * t + 1]), (x[2 * t + 8], x[2 * t + 9])]


# ---- the instruction: what PTX defines mma.m16n8k16 to do, across the warp ------------------------------

def mma(acc, a, b):
    """acc [32 lanes][4] += the warp's A (from a [32][4 pairs]) @ B (from b [32][2 pairs]), float32."""
    A, B = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
    for lane in range(LANES):
        g, t = divmod(lane, 4)
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b[lane][0], b[lane][1]
    C = A @ B
    for lane in range(LANES):
        g, t = divmod(lane, 4)
        acc[lane] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


# ---- the kernels: gate_up_kernel and down_kernel of moe_experts.cu, one warp at a time ------------------

def run(kind, fmt, W, scales, X, row_token, offsets, H, Ie, G, out, route_weight=None):
    """One launch of moe_gate_up_<fmt> (kind "gate_up": out = act, bf16 words [A·Ie]) or moe_down_<fmt>
    (kind "down": out float32 [A·H]) over grid (ceil(features / 64), E), block 4 warps."""
    E = len(offsets) - 1
    N, K = (2 * Ie, H) if kind == "gate_up" else (H, Ie)           # weight rows, inputs
    features = Ie if kind == "gate_up" else H
    step = G if fmt == "int4" else K                                 # k per scale group
    for e in range(E):
        begin, rows = int(offsets[e]), int(offsets[e + 1] - offsets[e])
        We = W[e * N * K:][:N * K] if fmt == "bf16" else W[e * N * (K // 8):][:N * (K // 8)]
        Se = scales[e * N * (K // G):] if fmt == "int4" else None
        for bx in range(-(-features // (16 * WARPS))):
            for warp in range(WARPS):
                f = bx * 16 * WARPS + warp * 16
                if f >= features:
                    continue
                bases = (f, Ie + f) if kind == "gate_up" else (f,)  # gate and up rows, or down rows
                for r0 in range(0, rows, 8 * TILES):
                    total = np.zeros((len(bases), TILES, LANES, 4), np.float32)
                    for k1 in range(0, K, step):
                        part = np.zeros_like(total)
                        for k0 in range(k1, k1 + step, 16):
                            a = [[load_a(fmt, We, base, K, k0, *divmod(lane, 4)) for lane in range(LANES)]
                                 for base in bases]
                            for i in range(TILES):
                                if r0 + 8 * i >= rows:
                                    break
                                b = []
                                for lane in range(LANES):
                                    g, t = divmod(lane, 4)
                                    r = r0 + 8 * i + g
                                    row = (int(row_token[begin + r]) if r < rows else 0) if kind == "gate_up" \
                                        else begin + r
                                    b.append(load_b(X, row, K, k0, t, r < rows))
                                for m in range(len(bases)):
                                    mma(part[m, i], a[m], b)
                        for m, base in enumerate(bases):
                            for lane in range(LANES):
                                g = lane // 4
                                s0 = s8 = np.float32(1)
                                if fmt == "int4":
                                    s0 = Se[(base + g) * (K // G) + k1 // G]
                                    s8 = Se[(base + g + 8) * (K // G) + k1 // G]
                                total[m, :, lane] += part[m, :, lane] * np.array([s0, s0, s8, s8], np.float32)
                    for i in range(TILES):                          # the epilogue
                        for lane in range(LANES):
                            g, t = divmod(lane, 4)
                            for j in range(4):
                                r, feature = r0 + 8 * i + 2 * t + (j & 1), f + g + (8 if j >= 2 else 0)
                                if r >= rows:
                                    continue
                                if kind == "gate_up":
                                    v = gelu_tanh(np, total[0, i, lane, j:j + 1].copy()) * total[1, i, lane, j]
                                    out[(begin + r) * Ie + feature] = f32_to_bf16_bits(v.astype(np.float32))[0]
                                else:
                                    out[(begin + r) * H + feature] = route_weight[begin + r] * total[0, i, lane, j]


def moe(fmt, gate_up, gate_up_scales, down, down_scales, x, idx, weight, H, Ie, G):
    """moe_experts.moe_experts with both launches replayed: x [T, H] float32, idx/weight [T, k] -> [T, H]; the
    experts as random_experts gives them (bf16 bits [E, N, K], or int4 words [E, N, K/8] + scales [E, N, K/G])."""
    T, k = idx.shape
    E = gate_up.shape[0]
    flat = [None if a is None else a.reshape(-1) for a in (gate_up, gate_up_scales, down, down_scales)]
    gate_up, gate_up_scales, down, down_scales = flat                  # the kernels index them flat
    sorted_rows = expert_rows(np, idx, weight, E)
    A = sorted_rows.A
    act = np.full(A * Ie, 0x7FC0, np.uint16)                        # poisoned (NaN) as in the GPU test
    rows = np.full(A * H, np.nan, np.float32)
    run("gate_up", fmt, gate_up, gate_up_scales, f32_to_bf16_bits(x).reshape(-1), sorted_rows.row_token,
        sorted_rows.offsets, H, Ie, G, act)
    run("down", fmt, down, down_scales, act, None, sorted_rows.offsets, H, Ie, G, rows, sorted_rows.route_weight)
    return combine(np, rows.reshape(A, H), sorted_rows, T, k)
