"""The whole block-diffusion sampler for one prompt, in one 26-line function: read this first, then `sampler.py`.

It is the algorithm of docs/sampler.md and nothing else: no batch, no infill, no greedy mode, no
callbacks, no validation. `sampler.generate` does the same with all of those; tests/test_sampler_minimal.py
checks that the two produce the same tokens. `sc` rounds the self-conditioning logits the way the
checkpoint's dtype does (`sampler.round_bf16` for a bf16 checkpoint).
"""

import numpy as np

from .sampler import entropy_bound_accept, eos_fill, sample_inverse_cdf, softmax_entropy, temperature


def generate_minimal(model, prompt_ids, seed, max_new_tokens=256, N=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                     stability=1, confidence=0.005, eos=(1, 106, 50), pad=0, sc=lambda z: z):
    rng = np.random.default_rng(seed)                         # every draw, in the order of docs/randomness.md
    V, C = model.config.vocab_size, model.config.canvas_length
    cache, tokens = model.encode(prompt_ids), []
    for k in range(-(-max_new_tokens // C)):                   # one canvas of C tokens at a time
        canvas = rng.integers(0, V, size=C)                    # start from uniform noise
        self_cond, history = None, []
        for n in range(N, 0, -1):                              # n = steps remaining
            z = model.denoise(canvas, cache, self_cond) / temperature(n, N, t_min, t_max)   # [C, V] tempered
            u, noise = rng.random(C), rng.integers(0, V, size=C)
            p, H = softmax_entropy(z)                          # [C, V], [C] nats
            sampled = sample_inverse_cdf(p, u)                 # one categorical draw per position
            accepted = entropy_bound_accept(H, entropy_bound)  # the most certain positions, within the budget
            canvas = np.where(accepted, sampled, noise)        # keep those, renoise the rest
            self_cond, argmax = sc(z), z.argmax(-1)            # the next step sees these logits
            stable = len(history) >= stability and all((h == argmax).all() for h in history[-stability:])
            history.append(argmax)
            if stable and H.mean() < np.float32(confidence):   # settled: stop early
                break
        committed = eos_fill(argmax[None], list(eos), pad)[0]  # the draft, padded after the first stop id
        tokens.append(committed)
        if np.isin(committed, eos).any():                      # a stop id ends the answer
            break
        cache = model.encode(committed, cache)                 # commit: the canvas joins the context
    return np.concatenate(tokens)
