"""Make the golden files that keep exactness checked where torch is not installed.

Builds a tiny perturbed DiffusionGemma with transformers (5 sliding + 1 full layer, window shorter than
the prompt, distinct encoder/decoder layer scalars), saves it as BF16 safetensors in
tests/golden/tiny/ (so the BF16 widening path is covered too) and writes the reference outputs
computed by transformers in fp32 on those same bf16-rounded weights to tests/golden/expected.safetensors.

    python tools/make_golden.py        # needs the oracle extra: pip install -e '.[oracle]'
"""

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tinyckpt  # noqa: E402
from reference import reference_outputs  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
TEXT = dict(vocab_size=320, hidden_size=64, num_hidden_layers=6, sliding_window=5,
            layer_types=["sliding_attention"] * 5 + ["full_attention"])
PROMPT = [2, 105, 7, 19, 250, 3, 44, 44, 91, 12, 300, 5, 6]   # 13 tokens > window 5
CANVAS1 = [17, 0, 1, 106, 200, 201, 9, 310]
CANVAS2 = [5, 5, 5, 120, 64, 33, 2, 8]
T = 0.7


def main():
    ref = tinyckpt.build_model(TEXT, canvas_length=8, seed=1234)
    with torch.no_grad():  # round the weights (not the RoPE / embed-scale buffers) to bf16 values
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            if name.endswith(("weight", "layer_scalar", "scale", "proj")):
                t.copy_(t.to(torch.bfloat16).to(torch.float32))
    out = reference_outputs(ref, PROMPT, CANVAS1, CANVAS2, T)
    (GOLDEN / "tiny").mkdir(parents=True, exist_ok=True)
    ref.to(torch.bfloat16).save_pretrained(str(GOLDEN / "tiny"))   # (.to converts in place: after the run)
    (GOLDEN / "tiny" / "generation_config.json").unlink(missing_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    tensors.update(prompt=np.array(PROMPT, np.int64), canvas1=np.array(CANVAS1, np.int64),
                   canvas2=np.array(CANVAS2, np.int64), temperature=np.array([T], np.float32))
    save_file(tensors, str(GOLDEN / "expected.safetensors"),
              metadata={"made_by": "tools/make_golden.py", "reference": "transformers 5.23.0, fp32, eager"})
    size = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"wrote {GOLDEN} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
