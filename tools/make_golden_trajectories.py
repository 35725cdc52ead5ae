"""Pin the sampler without torch: trajectories of the golden bf16 checkpoint, written to a small JSON file.

tests/test_generate_oracle.py checks `generate` token for token against transformers; where torch is not
installed, nothing would notice a sampler change (a rounding dropped, a draw reordered, a count off).
This tool runs minidiff's `generate` on tests/golden/tiny and on the embedded default model (both bf16, so the
default self-conditioning rounds to bf16) over a spread of settings and seeds and stores what came out; tests/test_golden_trajectory.py
reruns them and demands the same tokens, steps, passes and tokens per forward.

Regenerate only after a deliberate, oracle-checked change to the sampler:

    python tools/make_golden_trajectories.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import minidiff  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
PROMPTS = [[2, 105, 7, 19], [2, 44, 91, 12, 300, 5, 6]]


def chat_ids(model, text):
    from minidiff.chat import ChatTemplate
    from minidiff.tokenizer import Tokenizer
    tok, tpl = Tokenizer.from_folder(model.folder), ChatTemplate.from_folder(model.folder)
    return tok.encode(tpl.render([{"role": "user", "content": text}]))


def cases(default):
    """(name, model key, prompt(s), generate keyword arguments). "tiny" is the random golden checkpoint (it
    never settles: every step self-conditions), "default" the embedded memoriser (it settles within a few
    steps and writes its stop id, so early stops, frozen rows and stop-id padding are exercised)."""
    for seed in range(12):                                   # the release's defaults: adaptive stopping
        yield f"tiny-{seed}", "tiny", PROMPTS[seed % 2], dict(seed=seed, max_new_tokens=16, max_denoising_steps=12)
    for seed in range(3):                                    # fixed steps, a larger acceptance budget
        yield f"tiny-fixed-{seed}", "tiny", PROMPTS[0], dict(seed=seed, max_new_tokens=16, max_denoising_steps=6,
                                                             confidence_threshold=None, entropy_bound=0.5)
    yield "tiny-infill", "tiny", PROMPTS[1], dict(seed=3, max_new_tokens=16, max_denoising_steps=8,
                                                  infill=[-1, -1, 17, -1, 200, -1, -1, -1, 5])
    yield "tiny-greedy", "tiny", PROMPTS[0], dict(seed=0, max_new_tokens=16, max_denoising_steps=8, greedy=True)
    yield "tiny-float32-sc", "tiny", PROMPTS[0], dict(seed=5, max_new_tokens=16, max_denoising_steps=12,
                                                      self_conditioning_dtype="float32")
    haiku, hello = chat_ids(default, "Write a haiku about the sea"), chat_ids(default, "Hello")
    odd = chat_ids(default, "Tell me about quantum tomatoes")
    for seed in range(4):                                    # a batch whose rows stop at different steps
        yield f"default-batch-{seed}", "default", [haiku, hello], dict(seed=seed)
    for seed in range(3):                                    # an unknown prompt: several canvases
        yield f"default-odd-{seed}", "default", odd, dict(seed=seed, max_new_tokens=512)
    yield "default-batch-bound", "default", [odd, haiku], dict(seed=9, entropy_bound=0.02, max_new_tokens=512)


def run(model, prompt, kw) -> dict:
    r = model.generate(prompt, **kw)
    tpf = r.tokens_per_forward
    return {"tokens": [t.tolist() for t in r.tokens], "steps_per_canvas": r.steps_per_canvas,
            "passes": r.passes.tolist(), "tokens_per_forward": [float(x) for x in (tpf if hasattr(tpf, "__len__") else [tpf])],
            "finished": r.finished.tolist()}


def models():
    return {"tiny": minidiff.load(GOLDEN / "tiny"), "default": minidiff.load(None)}


def main():
    ms = models()
    out = {"made_by": "tools/make_golden_trajectories.py", "cases": []}
    for name, key, prompt, kw in cases(ms["default"]):
        out["cases"].append({"name": name, "model": key, "prompt": prompt, "kwargs": kw,
                             "result": run(ms[key], prompt, kw)})
    (GOLDEN / "trajectories.json").write_text(json.dumps(out) + "\n")
    print(f"wrote {GOLDEN / 'trajectories.json'} ({len(out['cases'])} cases)")


if __name__ == "__main__":
    main()
