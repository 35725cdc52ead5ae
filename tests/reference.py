"""Run the transformers reference (fp32, eager attention) and minidiff on the same inputs.

`compare(model_torch, folder, prompt, canvas1, canvas2, T)` returns the max |Δ| of every quantity of
issue 2's acceptance list, each with the scale it is judged against. Used by the oracle tests, the
golden-file maker and the broken-variant test.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.ops import rms_norm


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


# ----------------------------------------------------------------------------------------------
# transformers' side of a trace (docs/trace.md): the same names, captured with forward hooks


class _Hooks:
    """Forward hooks on one pass's modules that record the trace's per-layer tensors under `prefix`."""

    def __init__(self, out: dict, prefix: str, stack, with_sc: bool = False):
        self.handles = []
        first = lambda o: o[0] if isinstance(o, tuple) else o                     # noqa: E731
        take = lambda name: lambda m, i, o: out.__setitem__(f"{prefix}.{name}", _np(first(o)))   # noqa: E731
        self.handles.append(stack.embed_tokens.register_forward_hook(take("embeddings")))
        if with_sc:
            sc = stack.self_conditioning
            self.handles.append(sc.down_proj.register_forward_hook(take("self_conditioning")))
            self.handles.append(sc.register_forward_hook(take("input")))
        elif hasattr(stack, "self_conditioning"):
            self.handles.append(stack.self_conditioning.register_forward_hook(take("input")))
        for i, layer in enumerate(stack.layers):
            p = f"layers.{i}"
            self.handles += [
                layer.self_attn.register_forward_hook(take(f"{p}.attention")),
                layer.post_feedforward_layernorm_1.register_forward_hook(take(f"{p}.dense_mlp")),
                layer.router.register_forward_hook(
                    lambda m, i, o, p=p: out.update({f"{prefix}.{p}.router_ids": _np(o[2]).astype(np.int64),
                                                     f"{prefix}.{p}.router_weights": _np(o[1])})),
                layer.post_feedforward_layernorm_2.register_forward_hook(take(f"{p}.experts")),
                layer.register_forward_hook(take(f"{p}.hidden")),
            ]
        self.handles.append(stack.norm.register_forward_hook(take("final_norm")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _np(t):
    a = t.detach().to(torch.float32 if t.is_floating_point() else torch.int64).clone().numpy()
    return a[0] if a.ndim == 3 else a                                             # drop the batch of 1


def _cache(out: dict, prefix: str, cache) -> None:
    for i, layer in enumerate(cache.layers):
        out[f"{prefix}.layers.{i}.keys"] = layer.keys[0].transpose(0, 1).numpy().copy()      # [S, nkv, hd]
        out[f"{prefix}.layers.{i}.values"] = layer.values[0].transpose(0, 1).numpy().copy()


@torch.no_grad()
def reference_trace(ref, prompt, canvas, T=None, next_canvas=None) -> dict:
    """transformers (fp32, eager) computing the trace of docs/trace.md: {name: array}, names as minidiff's."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)[None]              # noqa: E731
    enc, dec = ref.model.encoder.language_model, ref.model.decoder
    out = {"prompt_ids": np.asarray(prompt, np.int64), "canvas_ids": np.asarray(canvas, np.int64)}
    with _Hooks(out, "encoder", enc):
        cache = ref.model.encoder(input_ids=t(prompt), use_cache=True).past_key_values
    _cache(out, "cache.prompt", cache)
    with _Hooks(out, "denoiser", dec):
        logits = ref(decoder_input_ids=t(canvas), past_key_values=cache).logits[0]
    out["denoiser.logits"] = logits.numpy()
    if T is not None:
        with _Hooks(out, "denoiser_sc", dec, with_sc=True):
            logits = ref(decoder_input_ids=t(canvas), past_key_values=cache,
                         self_conditioning_logits=(logits / T)[None]).logits[0]
        out["denoiser_sc.logits"] = logits.numpy()
    committed = logits.argmax(-1).numpy().astype(np.int64)
    out["commit.ids"] = committed
    P, C = len(prompt), len(canvas)
    with _Hooks(out, "commit", enc):
        ref.model.encoder(input_ids=t(committed), past_key_values=cache, position_ids=torch.arange(P, P + C)[None],
                          use_cache=True)
    _cache(out, "cache.commit", cache)
    if next_canvas is not None:
        out["next.canvas_ids"] = np.asarray(next_canvas, np.int64)
        with _Hooks(out, "next", dec):
            out["next.logits"] = ref(decoder_input_ids=t(next_canvas), past_key_values=cache).logits[0].numpy()
    return out
