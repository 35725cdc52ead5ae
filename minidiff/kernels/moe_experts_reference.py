"""What moe_experts.cu computes, stated in NumPy: the reference its tests compare the kernels against."""

import numpy as np

from ..ops import gelu_tanh
from ..tensors import bf16_to_f32, f32_to_bf16_bits


def moe_reference(x, idx, weight, gate_up, down):
    """gate_up [E, 2Ie, H] and down [E, H, Ie] float32 weight VALUES (bf16 values, or q · s of int4);
    x [T, H] float32, idx/weight [T, k] -> [T, H]:

        xb  = bf16(x)                                   activations rounded to bf16 (nearest even)
        act = bf16(gelu_tanh(gate · xb) · (up · xb))    float32 products and sums, rounded to bf16
        out = Σ_j weight_j · (down · act_j)             the k experts of each token, in order

    The kernels' sums run in another order (tensor-core blocks of 16), so the results agree to float32
    rounding, except where an `act` value sits at a bf16 rounding boundary: the stated bound of
    tests/test_gpu_kernels.py covers one bf16 step there.
    """
    T, k = idx.shape
    Ie = gate_up.shape[1] // 2
    xb = bf16_to_f32(f32_to_bf16_bits(np.asarray(x, np.float32)))
    out = np.zeros((T, down.shape[1]), np.float32)
    for j in range(k):
        e = idx[:, j]
        gu = np.einsum("tnh,th->tn", gate_up[e], xb)                        # [T, 2Ie]
        act = bf16_to_f32(f32_to_bf16_bits(gelu_tanh(np, gu[:, :Ie].copy()) * gu[:, Ie:]))
        out += weight[:, j:j + 1] * np.einsum("thi,ti->th", down[e], act)
    return out
