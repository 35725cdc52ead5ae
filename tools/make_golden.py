"""Make the golden trace that keeps exactness checked where torch is not installed.

tests/golden/tiny/ is a tiny perturbed DiffusionGemma (5 sliding + 1 full layer, a window shorter than the
prompt, distinct encoder/decoder layer scalars) stored in BF16, so the BF16 widening path is covered too.
tests/golden/trace.safetensors is the trace of one input (docs/trace.md, schema version 2: every layer of
the encoder, two denoising steps, the commit, both KV caches, a second canvas) computed by transformers in
fp32 (eager) on those bf16 weights, captured with forward hooks (tests/reference.py).

    python tools/make_golden.py              # the trace, from the committed checkpoint
    python tools/make_golden.py --rebuild    # also a new checkpoint (changes every golden file)
Needs the oracle extra: pip install -e '.[oracle]'.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import tinyckpt  # noqa: E402
from reference import reference_trace  # noqa: E402
from minidiff.trace import SCHEMA_VERSION, save_tensors  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
TEXT = dict(vocab_size=320, hidden_size=64, num_hidden_layers=6, sliding_window=5,
            layer_types=["sliding_attention"] * 5 + ["full_attention"])
PROMPT = [2, 105, 7, 19, 250, 3, 44, 44, 91, 12, 300, 5, 6]   # 13 tokens > window 5
CANVAS = [17, 0, 1, 106, 200, 201, 9, 310]
NEXT_CANVAS = [5, 5, 5, 120, 64, 33, 2, 8]
T = 0.7


def build_checkpoint():
    ref = tinyckpt.build_model(TEXT, canvas_length=8, seed=1234)
    (GOLDEN / "tiny").mkdir(parents=True, exist_ok=True)
    ref.to(torch.bfloat16).save_pretrained(str(GOLDEN / "tiny"))
    (GOLDEN / "tiny" / "generation_config.json").unlink(missing_ok=True)


def main():
    if "--rebuild" in sys.argv or not (GOLDEN / "tiny" / "config.json").exists():
        build_checkpoint()
    from transformers.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(str(GOLDEN / "tiny"), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    tensors = reference_trace(ref, PROMPT, CANVAS, T, NEXT_CANVAS)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_tensors(GOLDEN / "trace.safetensors", tensors, {
        "schema": "minidiff-trace", "schema_version": str(SCHEMA_VERSION), "model": "tests/golden/tiny",
        "self_conditioning_temperature": repr(T), "order": json.dumps(list(tensors)),
        "made_by": "tools/make_golden.py", "reference": "transformers 5.23.0, fp32, eager"})
    size = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"wrote {GOLDEN / 'trace.safetensors'} ({len(tensors)} tensors; tests/golden {size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
