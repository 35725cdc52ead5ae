"""Training on the GPU (CuPy through the same `xp`) gives what NumPy gives: one batch's losses and every
gradient to float32 noise, and a short run's losses (the draws stay on the host, so both see the same
batches). Skipped without a usable CUDA device."""

import numpy as np

from gpu_only import cupy_with_a_gpu

cupy = cupy_with_a_gpu()

from minidiff.loader import DEFAULT_MODEL  # noqa: E402
from minidiff.train.objective import Batch, load_params, loss_and_grads  # noqa: E402
from minidiff.train.trainer import Settings, train  # noqa: E402


def test_one_batch_gradients_on_the_gpu_equal_numpy():
    cfg, params = load_params(None, "float32")
    rng = np.random.default_rng(0)
    C, examples = cfg.canvas_length, []
    for n, b, sc in ((9, 0, True), (15, 1, False), (4, 1, True)):
        ids = rng.integers(5, 500, n + 2 * C)
        xt = np.where(rng.random(C) < 0.5, rng.integers(0, cfg.vocab_size, C), ids[n + b * C:][:C])
        examples.append((ids, n + b * C, xt, sc))
    d1, e1, g1 = loss_and_grads(np, params, cfg, Batch(np, examples))
    d2, e2, g2 = loss_and_grads(cupy, {k: cupy.asarray(v) for k, v in params.items()}, cfg, Batch(cupy, examples))
    assert abs(d1 - d2) <= 1e-5 * max(1, d1) and abs(e1 - e2) <= 1e-5 * max(1, e1)
    assert set(g1) == set(g2)
    for k, g in g1.items():
        err = float(np.abs(cupy.asnumpy(g2[k]) - g).max())
        assert err <= 1e-4 * max(1e-3, float(np.abs(g).max())), (k, err)


def test_a_short_run_on_the_gpu_has_numpys_losses(tmp_path):
    s = Settings(steps=6, batch=8, lr=2e-3, warmup=2, seed=5)
    data = DEFAULT_MODEL / "prompts.json"
    cpu = train(None, data, tmp_path / "cpu", s, xp=np)["history"]
    gpu = train(None, data, tmp_path / "gpu", s, xp=cupy)["history"]
    for (_, d1, e1), (_, d2, e2) in zip(cpu, gpu):
        assert abs(d1 - d2) <= 1e-3 * max(1, d1) and abs(e1 - e2) <= 1e-3 * max(1, e1), (cpu, gpu)
