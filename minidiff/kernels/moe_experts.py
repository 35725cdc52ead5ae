"""The launcher of moe_experts.cu: the routed experts of one layer in two grouped kernel launches.

    expert_rows   the T·k assignments sorted by expert (ops.group_by_expert) as the kernels read them
    moe_experts   gate|up (GELU fused) then down (routing weight fused) over every expert at once
    combine       the sorted rows back to tokens, each token's k rows summed in a fixed order

moe_experts_reference.py states what the launches compute; moe_experts_emulator.py replays them lane
by lane on the CPU. `gpu.DeviceExperts.moe` calls `moe_experts` in precision "bf16".
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import MinidiffError
from ..ops import group_by_expert
from ..tensors import f32_to_bf16_bits

SOURCE = Path(__file__).with_name("moe_experts.cu")
BLOCK_FEATURES, BLOCK_THREADS = 64, 128      # moe_experts.cu: 4 warps × 16 features per block


@lru_cache(maxsize=None)
def module():
    """moe_experts.cu compiled by CuPy (NVRTC), once per process."""
    import cupy
    if not SOURCE.is_file():
        raise MinidiffError(f"{SOURCE}: missing (the CUDA kernels ship inside the minidiff package)")
    return cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++14",))


class ExpertRows:
    """The T·k assignments sorted by expert: expert e owns sorted rows offsets[e] .. offsets[e+1] - 1;
    sorted row r is assignment order[r], of token row_token[r], with weight route_weight[r]."""

    def __init__(self, order, row_token, route_weight, offsets):
        self.order, self.row_token, self.route_weight, self.offsets = order, row_token, route_weight, offsets
        self.A = int(order.shape[0])


def expert_rows(xp, idx, weight, E: int) -> ExpertRows:
    k = idx.shape[1]
    order, counts, _ = group_by_expert(xp, idx, E)
    offsets = xp.concatenate([xp.zeros(1, dtype=counts.dtype), xp.cumsum(counts)]).astype(xp.int32)
    return ExpertRows(order, (order // k).astype(xp.int32), weight.reshape(-1)[order].astype(xp.float32), offsets)


def combine(xp, rows, sorted_rows: ExpertRows, T: int, k: int):
    """rows [A, H] in sorted order -> [T, H]: back to assignment order (t·k + j), then each token's k rows
    summed in order j = 0 .. k-1 (a fixed order: the same bits every run)."""
    y = xp.empty_like(rows)
    y[sorted_rows.order] = rows
    y = y.reshape(T, k, -1)
    out = y[:, 0].copy()
    for j in range(1, k):
        out += y[:, j]
    return out


def check_shapes(gate_up_shape, group) -> None:
    """The kernels' requirements: H, Ie multiples of 16; int4 groups multiples of 16 dividing K."""
    E, N, H = gate_up_shape
    Ie = N // 2
    if H % 16 or Ie % 16 or (group is not None and (group % 16 or H % group or Ie % group)):
        raise MinidiffError(f"the MoE kernels need hidden size and expert width divisible by 16 (and by the "
                            f"int4 group size); got H={H}, Ie={Ie}, group={group}: use precision 'fp32'")


def moe_experts(gate_up, down, x, idx, weight):
    """ops.experts on the grouped kernels: gate_up/down `gpu.DeviceExperts` (both bf16 or both int4),
    x [T, H] float32, idx/weight [T, k] -> [T, H] float32. Activations are rounded to bf16 for the tensor
    cores (moe_reference states it)."""
    xp = gate_up.xp
    T, k = idx.shape
    E, N, H = gate_up.shape
    Ie = N // 2
    check_shapes(gate_up.shape, gate_up.group if gate_up.fmt == "int4" else None)
    rows_of = expert_rows(xp, idx, weight, E)
    xb = f32_to_bf16_bits(x)                                          # [T, H] bf16 words
    act = xp.empty((rows_of.A, Ie), dtype=xp.uint16)
    rows = xp.empty((rows_of.A, H), dtype=xp.float32)
    mod, i32 = module(), np.int32
    grid_gate_up, grid_down = (math.ceil(Ie / BLOCK_FEATURES), E), (math.ceil(H / BLOCK_FEATURES), E)
    if gate_up.fmt == "bf16":
        mod.get_function("moe_gate_up_bf16")(grid_gate_up, (BLOCK_THREADS,), (
            gate_up.data, xb, rows_of.row_token, rows_of.offsets, i32(H), i32(Ie), act))
        mod.get_function("moe_down_bf16")(grid_down, (BLOCK_THREADS,), (
            down.data, act, rows_of.route_weight, rows_of.offsets, i32(H), i32(Ie), rows))
    else:
        mod.get_function("moe_gate_up_int4")(grid_gate_up, (BLOCK_THREADS,), (
            gate_up.data, gate_up.scales, xb, rows_of.row_token, rows_of.offsets, i32(H), i32(Ie),
            i32(gate_up.group), act))
        mod.get_function("moe_down_int4")(grid_down, (BLOCK_THREADS,), (
            down.data, down.scales, act, rows_of.route_weight, rows_of.offsets, i32(H), i32(Ie), i32(down.group),
            rows))
    return combine(xp, rows, rows_of, T, k)
