"""One layer's hand-written backward (minidiff/train/layer.py) against torch autograd through transformers'
own DiffusionGemma layers, in float64: the encoder layer (causal, its own keys) and the decoder layer
(bidirectional, reading a cache whose keys and values get gradients), sliding and full, every weight."""

import contextlib
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import tinyckpt  # noqa: E402
from minidiff.train.layer import layer_backward, layer_forward  # noqa: E402


class LC:  # the two LayerConfig fields the layer reads
    def __init__(self, sliding, head_dim):
        self.is_sliding, self.head_dim = sliding, head_dim


@contextlib.contextmanager
def float64_throughout():
    """transformers computes RMSNorm and the router / attention softmaxes in float32 even in a float64 model;
    for a 1e-6 check of the maths, the same formulas run in float64 here."""
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as hf
    F = torch.nn.functional
    softmax, norm_forward = F.softmax, hf.DiffusionGemmaRMSNorm.forward

    def softmax64(x, dim=None, *a, dtype=None, **k):
        return softmax(x, dim, *a, dtype=None if x.dtype == torch.float64 else dtype, **k)

    def norm64(self, h):
        n = self._norm(h)
        return n * self.weight if self.with_scale else n
    F.softmax, torch.softmax, hf.DiffusionGemmaRMSNorm.forward = softmax64, softmax64, norm64
    try:
        yield
    finally:
        F.softmax, torch.softmax, hf.DiffusionGemmaRMSNorm.forward = softmax, softmax, norm_forward


@functools.lru_cache(maxsize=None)
def model(seed):
    m = tinyckpt.build_model(seed=seed)
    m.set_experts_implementation("eager")       # the per-expert loop: torch's grouped_mm has no float64
    return m.double()


def check(got, want, name):
    want = want.detach().numpy()
    err = float(np.abs(got - want).max())
    assert got.shape == want.shape and err <= 1e-6 * max(1.0, float(np.abs(want).max())), (name, err)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**5), i=st.integers(0, 3), mode=st.sampled_from(["encode", "denoise"]),
       T=st.integers(1, 6), past=st.integers(0, 5))
def test_layer_backward_equals_transformers_autograd(seed, i, mode, T, past):
    from transformers import DynamicCache
    ref = model(seed % 4)
    ref.zero_grad(set_to_none=True)             # the model is shared between examples
    stack = ref.model.encoder.language_model if mode == "encode" else ref.model.decoder
    layer, tc = stack.layers[i], ref.config.text_config
    kind = tc.layer_types[i]
    sliding = kind == "sliding_attention"
    hd, nkv = tc.per_layer_config[i].head_dim, tc.per_layer_config[i].num_key_value_heads
    r = np.random.default_rng(seed)
    if mode == "encode":
        past = 0                                        # the encoder writes its own keys: no cache here
    h = r.standard_normal((T, tc.hidden_size))
    pk, pv = r.standard_normal((past, nkv, hd)), r.standard_normal((past, nkv, hd))
    pos = np.arange(past, past + T)
    mask = None if mode == "denoise" else (np.arange(past + T)[None] <= pos[:, None])
    dout = r.standard_normal((T, tc.hidden_size))

    # transformers, float64, autograd
    th = torch.tensor(h, requires_grad=True)
    tpk, tpv = torch.tensor(pk, requires_grad=True), torch.tensor(pv, requires_grad=True)
    cos, sin = stack.rotary_emb(th[None], torch.tensor(pos)[None], kind)
    cache = DynamicCache()
    if mode == "denoise":
        cache.update(tpk.transpose(0, 1)[None], tpv.transpose(0, 1)[None], i)
        for j in range(len(stack.layers)):              # other layers' slots must exist
            if j != i:
                cache.update(torch.zeros(1, 1, 0, 1, dtype=torch.float64), torch.zeros(1, 1, 0, 1, dtype=torch.float64), j)
    amask = None if mask is None else torch.zeros(1, 1, T, past + T, dtype=torch.float64).masked_fill(
        ~torch.tensor(mask), float("-inf"))
    with float64_throughout():
        out = layer(th[None], position_embeddings=(cos, sin), attention_mask=amask,
                    position_ids=torch.tensor(pos)[None], past_key_values=cache if mode == "denoise" else None)
    out = out[0] if isinstance(out, tuple) else out
    out[0].backward(torch.tensor(dout))

    # minidiff, float64, by hand
    P = {n: p.detach().numpy() for n, p in layer.named_parameters()}
    inv = getattr(stack.rotary_emb, f"{kind}_inv_freq").double().numpy()
    scalar = float(layer.layer_scalar)
    y, k, v, saved = layer_forward(np, P, LC(sliding, hd), tc.rms_norm_eps, tc.top_k_experts, h, pos, inv,
                                   pk, pv, mask, scalar)
    check(y, out[0], "output")
    dh, dpk, dpv, grads, _ = layer_backward(np, dout, None, None, saved)
    check(dh, th.grad, "d hidden")
    if past:
        check(dpk, tpk.grad, "d past keys"), check(dpv, tpv.grad, "d past values")
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == set(grads), sorted(names ^ set(grads))
    for n, p in layer.named_parameters():
        check(grads[n], p.grad if p.grad is not None else torch.zeros_like(p), n)
