"""The DiffusionGemma training objective in torch on transformers' model: the cross-check of minidiff's own.

minidiff trains with gradients written by hand (minidiff/train/); this file is the independent reference they
are tested against (tests/test_train_objective.py: same batch, same draws, losses to 1e-9 and every gradient
to 1e-6 in float64). It trained the first embedded default model; that model is now made by minidiff itself
(tools/make_default_model.py), so nothing here is used to build what ships. Needs torch + transformers
(tools/ and tests/ only).

`loss_fn(model, batch, generator)` on `make_tensors(encode_pairs(pairs, folder))`:
  - data: prompt = chat template with add_generation_prompt; response = answer + <turn|>, chunked into
    canvases of 32, the last canvas filled with <eos>; one valid canvas b chosen uniformly per example
  - corruption: t ~ U(1e-3, 1 - 1e-3) per example, each position of canvas b replaced by a uniform
    token of [0, V) with probability t
  - block-causal context: the encoder runs once, causally, over the clean [prompt ; canvases]; the
    decoder's canvas b attends to the prompt and the clean canvases < b only (a per-example 4-D mask over
    the encoder's KV cache; canvases >= b are masked out), at positions P + b*L ...
  - two-pass self-conditioning: pass 1 without SC and without gradient; pass 2 takes pass 1's
    softcapped (untempered) logits as SC for a random half of the batch (`self_conditioning_mask`)
  - losses: unweighted CE over all 32 positions of canvas b (corrupted or not), plus the encoder's
    next-token CE (tied head + softcap on the encoder's last hidden state) over the clean sequence, weight 1
The prompts are left-padded here (minidiff right-pads): the two layouts agreeing is part of the check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # minidiff (tokenizer + chat template, pure Python)
sys.path.insert(0, str(ROOT / "tools"))

import torch
import torch.nn.functional as F

VOCAB, CANVAS, N_CANVAS = 512, 32, 2
PAD, EOS, TURN_END = 0, 1, 106
SLIDING_WINDOW = 128                       # the default model's: a training sequence must stay inside it
DATA = ROOT / "minidiff" / "default_model" / "prompts.json"
T_LO, T_HI, SC_PROB = 1e-3, 1 - 1e-3, 0.5


# ----------------------------------------------------------------------------------------------
# data


def load_pairs(path=DATA) -> list[tuple[str, str]]:
    return [tuple(p) for p in json.loads(Path(path).read_text(encoding="utf-8"))["pairs"]]


def encode_pairs(pairs, folder: Path):
    """-> list of (prompt ids, response ids [n_canvases * L] with <turn|> and the EOS fill, n_canvases):
    minidiff's own `train.trainer.encode_pairs`, plus this model's limits and a tokenizer round trip."""
    from minidiff.tokenizer import Tokenizer
    from minidiff.train.trainer import encode_pairs as encode
    tok = Tokenizer.from_folder(folder)
    out = []
    for (prompt, answer), (p, r, n) in zip(pairs, encode(pairs, folder, CANVAS, N_CANVAS)):
        if len(p) + N_CANVAS * CANVAS > SLIDING_WINDOW - 1:
            raise SystemExit(f"prompt {prompt!r} is too long ({len(p)} tokens) for the sliding window")
        assert tok.decode(tok.encode(answer)) == answer, answer
        out.append((p.tolist(), r.tolist(), n))
    return out


def make_tensors(examples):
    """Left-pad prompts to a common width P so that canvas k starts at column P + k*L for every row."""
    B, L = len(examples), CANVAS
    P = max(len(p) for p, _, _ in examples)
    S = P + N_CANVAS * L
    ids = torch.full((B, S), PAD, dtype=torch.long)
    valid = torch.zeros((B, S), dtype=torch.bool)
    pos = torch.zeros((B, S), dtype=torch.long)
    plen = torch.zeros(B, dtype=torch.long)
    ncan = torch.zeros(B, dtype=torch.long)
    for i, (p, r, n) in enumerate(examples):
        off = P - len(p)
        ids[i, off:P] = torch.tensor(p)
        ids[i, P:P + len(r)] = torch.tensor(r)
        valid[i, off:P + len(r)] = True
        pos[i] = (torch.arange(S) - off).clamp(min=0)
        plen[i], ncan[i] = len(p), n
    return dict(ids=ids, valid=valid, pos=pos, plen=plen, ncan=ncan, P=P, S=S)


# ----------------------------------------------------------------------------------------------
# model


def softcapped(model, hidden):
    cap = model.config.text_config.final_logit_softcapping
    return torch.tanh(model.lm_head(hidden).float() / cap) * cap


def additive(allowed):
    """bool [B, Q, K] -> additive float mask [B, 1, Q, K]."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def loss_fn(model, batch, gen: torch.Generator):
    from transformers import DynamicCache
    ids, valid, pos, P, S = batch["ids"], batch["valid"], batch["pos"], batch["P"], batch["S"]
    B, L, V = ids.shape[0], CANVAS, VOCAB

    # encoder: causal over the clean [prompt ; canvases], pad keys masked (pad query rows see themselves)
    q = torch.arange(S)
    allowed = (q[None, :, None] >= q[None, None, :]) & valid[:, None, :]
    allowed |= torch.eye(S, dtype=torch.bool)[None]
    enc_mask = additive(allowed)
    cache = DynamicCache()                                   # no sliding truncation: sequences < window anyway
    enc = model.model.encoder(input_ids=ids, attention_mask={"full_attention": enc_mask, "sliding_attention": enc_mask},
                              position_ids=pos, past_key_values=cache)
    enc_logits = softcapped(model, enc.last_hidden_state)
    tgt_mask = valid[:, :-1] & valid[:, 1:]
    enc_loss = F.cross_entropy(enc_logits[:, :-1][tgt_mask], ids[:, 1:][tgt_mask])

    # one valid canvas b per example, corrupted with rate t
    b = (torch.rand(B, generator=gen) * batch["ncan"]).long()
    start = P + b * L                                                   # column of canvas b
    cols = start[:, None] + torch.arange(L)[None]
    x0 = ids.gather(1, cols)
    t = T_LO + (T_HI - T_LO) * torch.rand(B, generator=gen)
    cor = torch.rand(B, L, generator=gen) < t[:, None]
    xt = torch.where(cor, torch.randint(0, V, (B, L), generator=gen), x0)
    dpos = (batch["plen"] + b * L)[:, None] + torch.arange(L)[None]

    # decoder mask: cached prompt + clean canvases < b (block-causal), then the whole canvas (bidirectional)
    kv = torch.arange(S)
    cache_ok = valid & (kv[None] < start[:, None])
    dec_allowed = torch.cat([cache_ok, torch.ones(B, L, dtype=torch.bool)], 1)[:, None, :].expand(B, L, S + L)
    dec_mask = additive(dec_allowed)
    masks = {"full_attention": dec_mask, "sliding_attention": dec_mask}

    with torch.no_grad():                                               # pass 1: no SC, no gradient
        h1 = model.model.decoder(decoder_input_ids=xt, past_key_values=cache, decoder_attention_mask=masks,
                                 decoder_position_ids=dpos).last_hidden_state
        sc = softcapped(model, h1)
    use = torch.rand(B, generator=gen) < SC_PROB
    h2 = model.model.decoder(decoder_input_ids=xt, past_key_values=cache, self_conditioning_logits=sc,
                             self_conditioning_mask=use, decoder_attention_mask=masks,
                             decoder_position_ids=dpos).last_hidden_state
    logits = softcapped(model, h2)
    dec_loss = F.cross_entropy(logits.reshape(-1, V), x0.reshape(-1))   # every row has L valid positions
    return dec_loss, enc_loss
