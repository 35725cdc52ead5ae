"""Run the transformers reference (fp32, eager attention) and minidiff on the same inputs.

`compare(model_torch, folder, prompt, canvas1, canvas2, T)` returns the max |Δ| of every quantity of
issue 2's acceptance list, each with the scale it is judged against. Used by the oracle tests, the
golden-file maker and the broken-variant test.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.model import rms_norm


@torch.no_grad()
def reference_outputs(ref, prompt, canvas1, canvas2, T):
    """transformers: encoder hidden states, denoiser logits (plain, self-conditioned), commit, 2nd canvas."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)[None]
    enc = ref.model.encoder(input_ids=t(prompt), output_hidden_states=True, use_cache=True)
    cache = enc.past_key_values
    out = {"hidden": torch.stack(enc.hidden_states[1:])[:, 0].numpy()}   # layers 1..L-1 raw, L after final norm
    logits = ref(decoder_input_ids=t(canvas1), past_key_values=cache).logits[0]
    out["logits"] = logits.numpy()
    out["sc_logits"] = ref(decoder_input_ids=t(canvas1), past_key_values=cache,
                           self_conditioning_logits=(logits / T)[None]).logits[0].numpy()
    P = len(prompt)
    pos = torch.arange(P, P + len(canvas1))[None]
    ref.model.encoder(input_ids=t(canvas1), past_key_values=cache, position_ids=pos, use_cache=True)
    out["logits2"] = ref(decoder_input_ids=t(canvas2), past_key_values=cache).logits[0].numpy()
    return out


def minidiff_outputs(model, prompt, canvas1, canvas2, T):
    cache, hidden = model.encode(prompt, return_hidden=True)
    hidden = hidden.copy()
    hidden[-1] = rms_norm(np, hidden[-1], model.final_norm, model.config.rms_norm_eps)  # transformers' convention
    logits = model.denoise(canvas1, cache)
    out = {"hidden": hidden, "logits": logits,
           "sc_logits": model.denoise(canvas1, cache, logits / np.float32(T))}
    cache = model.encode(canvas1, cache)
    out["logits2"] = model.denoise(canvas2, cache)
    return out


def errors(a: dict, b: dict) -> dict:
    """name -> (max |Δ|, tolerance) with tolerance = 1e-4 · max(1, max |reference|)."""
    return {k: (float(np.abs(a[k] - b[k]).max()), 1e-4 * max(1.0, float(np.abs(a[k]).max()))) for k in a}


def compare(ref, model, prompt, canvas1, canvas2, T=0.8) -> dict:
    return errors(reference_outputs(ref, prompt, canvas1, canvas2, T),
                  minidiff_outputs(model, prompt, canvas1, canvas2, T))
