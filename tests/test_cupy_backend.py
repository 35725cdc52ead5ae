"""The CuPy backend runs the same model code: golden outputs on the GPU (skipped without one)."""

from pathlib import Path

import numpy as np

from gpu_only import cupy_with_a_gpu

cupy = cupy_with_a_gpu()

import minidiff  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def test_golden_on_gpu():
    exp = load_file(str(GOLDEN / "trace.safetensors"))
    model = minidiff.load(GOLDEN / "tiny", device="cuda")
    cache = model.encode(exp["prompt_ids"])
    logits = model.denoise(exp["canvas_ids"], cache)
    assert isinstance(logits, cupy.ndarray)
    tol = 1e-4 * max(1.0, float(np.abs(exp["denoiser.logits"]).max()))
    assert float(np.abs(cupy.asnumpy(logits) - exp["denoiser.logits"]).max()) <= tol
