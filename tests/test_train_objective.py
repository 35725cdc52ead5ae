"""The whole training loss and its gradient, by hand (minidiff/train/objective.py), against the torch
reference of the objective (tools/torch_reference_objective.py: loss_fn), on the same
batch and the same random draws: the losses equal, and every weight's gradient within 1e-6 relative in
float64 (float32 noise otherwise)."""

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import torch_reference_objective as ref_train  # noqa: E402
from minidiff.train.objective import Batch, load_params, loss_and_grads  # noqa: E402
from test_train_layer import float64_throughout  # noqa: E402

DEFAULT = ROOT / "minidiff" / "default_model"


@contextlib.contextmanager
def tensor_softmax64():
    """Tensor.softmax(dtype=float32) (the self-conditioning probabilities) in float64 too."""
    method = torch.Tensor.softmax

    def softmax64(self, dim=None, dtype=None):
        return method(self, dim, dtype=None if self.dtype == torch.float64 else dtype)
    torch.Tensor.softmax = softmax64
    try:
        yield
    finally:
        torch.Tensor.softmax = method


def reference(dtype, pairs, seed):
    """transformers' loss_fn on a batch of `pairs`: (dec, enc, grads by minidiff name, the draws)."""
    from transformers.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(str(DEFAULT), dtype=dtype)
    m.set_experts_implementation("eager")      # torch's grouped_mm has no float64
    m.set_attn_implementation("eager")         # (sdpa with these float masks gives garbage in float64)
    examples = ref_train.encode_pairs(pairs, DEFAULT)
    batch = ref_train.make_tensors(examples)
    gen = torch.Generator().manual_seed(seed)
    state = gen.get_state()
    softcapped = ref_train.softcapped                     # its head casts to float32: keep the dtype here
    ref_train.softcapped = lambda model, h: torch.tanh(model.lm_head(h) / 30.0) * 30.0
    try:
        with float64_throughout(), tensor_softmax64():
            dec, enc = ref_train.loss_fn(m, batch, gen)
    finally:
        ref_train.softcapped = softcapped
    (dec + enc).backward()
    grads = {n.replace("model.encoder.language_model.", "model.decoder."): p.grad.double().numpy()
             for n, p in m.named_parameters() if p.grad is not None}
    gen.set_state(state)                                     # replay loss_fn's draws, in its order
    B, L, V = len(examples), ref_train.CANVAS, ref_train.VOCAB
    b = (torch.rand(B, generator=gen) * batch["ncan"]).long()
    t = ref_train.T_LO + (ref_train.T_HI - ref_train.T_LO) * torch.rand(B, generator=gen)
    cor = torch.rand(B, L, generator=gen) < t[:, None]
    noise = torch.randint(0, V, (B, L), generator=gen)
    use = torch.rand(B, generator=gen) < ref_train.SC_PROB
    draws = []
    for i, (p, r, n) in enumerate(examples):
        ids = np.array(p + r, dtype=np.int64)
        x0 = ids[len(p) + int(b[i]) * L:][:L]
        draws.append((ids, int(b[i]), np.where(cor[i].numpy(), noise[i].numpy(), x0), bool(use[i]), len(p)))
    return float(dec.detach()), float(enc.detach()), grads, draws


def minidiff_batch(dtype, draws):
    cfg, params = load_params(DEFAULT, dtype)
    C = cfg.canvas_length
    batch = Batch(np, [(ids, plen + b * C, xt, use) for ids, b, xt, use, plen in draws])
    return loss_and_grads(np, params, cfg, batch)


@pytest.mark.parametrize("seed", [0, 3])
def test_loss_and_every_gradient_equal_the_torch_reference_float64(seed):
    pairs = ref_train.load_pairs()[seed:seed + 3]
    dec, enc, ref_grads, draws = reference(torch.float64, pairs, seed)
    assert {d[3] for d in draws} == {True, False} or seed == 3             # both self-conditioning cases
    mdec, menc, grads = minidiff_batch("float64", draws)
    assert abs(mdec - dec) <= 1e-9 * max(1, dec) and abs(menc - enc) <= 1e-9 * max(1, enc), (mdec, dec, menc, enc)
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    for name, g in ref_grads.items():
        err = float(np.abs(grads[name] - g).max())
        assert err <= 1e-6 * max(1.0, float(np.abs(g).max())), (name, err, float(np.abs(g).max()))


def test_loss_equals_the_torch_reference_float32():
    pairs = ref_train.load_pairs()[5:9]
    dec, enc, _, draws = reference(torch.float32, pairs, 1)
    mdec, menc, _ = minidiff_batch("float32", draws)
    assert abs(mdec - dec) <= 1e-5 * max(1, dec) and abs(menc - enc) <= 1e-5 * max(1, enc)
