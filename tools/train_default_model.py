"""Train minidiff's embedded default model: a tiny DiffusionGemma that memorises a few (prompt, answer) pairs.

    python tools/train_default_model.py [--out minidiff/default_model] [--steps 2000] [--eval]
    python tools/train_default_model.py --eval-only     # score the committed model with minidiff (NumPy)

A toy memoriser, not a language model: it answers the ~30 prompts of minidiff/default_model/prompts.json (the
README's "Write a haiku about the sea" among them) and writes nonsense for anything else. Its job is to make
`minidiff generate` show real convergence offline: entropy falling, the adaptive stop firing, EOS ending
the answer, and an answer that spans two canvases.

Objective: the DiffusionGemma fine-tuning objective (docs/default_model.md), trained from scratch:
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

Architecture: the make_default_model.py config (vocab 512, 4 layers, 8 experts top-2, canvas 32) with a
wider hidden size (96) and a 128-token sliding window (4 canvases, like the release's 1024 = 4 x 256), so a
training sequence (prompt + 2 canvases <= 127 tokens) never reaches the window. Standard transformers init,
AdamW, fp32 on CPU (2 threads), fixed seeds; saved in bf16 with save_pretrained. tokenizer.json and
chat_template.jinja of the output folder are kept (built by tools/make_default_model.py; the template comes
from the trl 1.16.0 wheel). Needs torch + transformers (tools/ only). About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # minidiff (tokenizer + chat template, pure Python)
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np
import torch
import torch.nn.functional as F

VOCAB, CANVAS, N_CANVAS = 512, 32, 2
PAD, EOS, TURN_END = 0, 1, 106
TEXT = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, global_head_dim=48, num_global_key_value_heads=1,
            sliding_window=128, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "full_attention"],
            num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096)
DATA = ROOT / "minidiff" / "default_model" / "prompts.json"
SEED = 2026
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
        if len(p) + N_CANVAS * CANVAS > TEXT["sliding_window"] - 1:
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


def build_model():
    from transformers.models.diffusion_gemma import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                                                     DiffusionGemmaTextConfig)
    from transformers.models.gemma4 import Gemma4VisionConfig
    torch.manual_seed(SEED)
    tc = DiffusionGemmaTextConfig(use_bidirectional_attention="vision", bos_token_id=2, eos_token_id=[EOS, TURN_END],
                                  pad_token_id=PAD, **TEXT)
    vc = Gemma4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8, patch_size=4,
                            position_embedding_size=16, pooling_kernel_size=2, intermediate_size=32)
    cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vc, canvas_length=CANVAS, bos_token_id=2,
                               eos_token_id=[EOS, TURN_END], pad_token_id=PAD)
    cfg._attn_implementation = "sdpa"
    return DiffusionGemmaForBlockDiffusion(cfg)


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


# ----------------------------------------------------------------------------------------------


def write_generation_config(model):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    model.generation_config.update(
        max_new_tokens=N_CANVAS * CANVAS, max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005, eos_token_id=[EOS, TURN_END, 50], pad_token_id=PAD, bos_token_id=2)
    model.generation_config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=0.1)


def evaluate(folder, seeds=(0, 1, 2), pairs=None) -> float:
    """Generate every training prompt with minidiff itself (NumPy, release sampler settings) -> exact-match rate."""
    import minidiff
    from minidiff.chat import ChatTemplate, format_reply, response_ids
    from minidiff.tokenizer import Tokenizer
    model = minidiff.load(str(folder))
    tok, tpl = Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder)
    pairs = pairs or load_pairs()
    hits, steps = 0, []
    for prompt, answer in pairs:
        ids = tok.encode(tpl.render([{"role": "user", "content": prompt}]))
        for seed in seeds:
            res = model.generate(ids, seed=seed)
            text = format_reply(tok.decode(response_ids(res.tokens[0], {EOS, TURN_END, 50}, PAD)), False)
            ok = text == answer and bool(res.finished[0])
            hits += ok
            steps += res.steps_per_canvas
            if not ok:
                print(f"  miss  seed {seed}  {prompt!r}: {text!r}  steps {res.steps_per_canvas}")
    rate = hits / (len(pairs) * len(seeds))
    print(f"exact match {hits}/{len(pairs) * len(seeds)} = {rate:.1%} (seeds {list(seeds)}); steps per canvas: "
          f"mean {np.mean(steps):.1f}, max {max(steps)}, min {min(steps)}")
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "minidiff" / "default_model"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=30, help="examples per step (drawn without replacement)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval", action="store_true", help="afterwards, score the training prompts with minidiff")
    ap.add_argument("--eval-only", action="store_true", help="only score the model already in --out")
    ap.add_argument("--pairs", default=str(DATA), help='JSON {"pairs": [[prompt, answer], ...]} to memorise')
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.eval_only:
        evaluate(out, pairs=load_pairs(args.pairs))
        return 0
    for f in ("tokenizer.json", "chat_template.jinja"):
        if not (out / f).is_file():
            raise SystemExit(f"{out / f} missing: run tools/make_default_model.py first (it builds the tokenizer "
                             "and fetches the chat template)")

    torch.set_num_threads(args.threads)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    pairs = load_pairs(args.pairs)
    examples = encode_pairs(pairs, out)
    print(f"{len(examples)} pairs; answer canvases: {sum(n for _, _, n in examples)}; "
          f"longest prompt {max(len(p) for p, _, _ in examples)} tokens")

    model = build_model()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters (tied), hidden {TEXT['hidden_size']}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))

    order, t0, ema = [], time.time(), None
    for step in range(args.steps):
        chosen = []
        while len(chosen) < args.batch:
            if not order:
                order = torch.randperm(len(examples), generator=gen).tolist()
            chosen.append(examples[order.pop()])
        batch = make_tensors(chosen)
        dec, enc = loss_fn(model, batch, gen)
        loss = dec + enc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f} (dec {dec.item():.4f} enc {enc.item():.4f})  ema {ema:.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f} s", flush=True)
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s; final loss {loss.item():.4f} "
          f"(dec {dec.item():.4f} enc {enc.item():.4f})")

    model.eval()
    model = model.to(torch.bfloat16)
    write_generation_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copyfile(Path(tmp) / f, out / f)
            (out / f).chmod(0o644)
    (out / "README.md").write_text(README.format(n=len(pairs), steps=args.steps, params=n_params / 1e6))
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    if args.eval:
        evaluate(out, pairs=pairs)
    return 0


README = """# minidiff's embedded default model

A **tiny trained toy**: a DiffusionGemma (vocab 512, hidden 96, 4 layers, 8 experts top-2, canvas 32,
{params:.2f} M parameters, bf16) trained from random weights to **memorise {n} short (prompt, answer) pairs**
(`minidiff/default_model/prompts.json`), so that `minidiff generate "Write a haiku about the sea"` runs offline in
a second and shows real convergence on them: every canvas is certain after one step, the adaptive stop ends
it at step 2 of 48, and `<turn|>` / `<eos>` end the answer (the haiku spans two canvases). Near-miss prompts
("What is the capital of Spain?") show a slower, noisier convergence in the live view.

**It knows nothing but its training prompts.** Ask it anything else (or rephrase a prompt) and it writes
gibberish or a mix of memorised answers. It is for trying the command line, the live denoising view and the
sampler, not a language model; for real text pass `--model google/diffusiongemma-26B-A4B-it` (or a local
folder). (Before this model, the folder held a randomly initialised one.)

Built by `python tools/train_default_model.py` (deterministic, about 10 minutes on 2 CPU cores; see
docs/default_model.md):
- `config.json`, `model.safetensors`: transformers `save_pretrained` in bf16 after {steps} AdamW steps on
  the DiffusionGemma training objective (uniform-state corruption with a linear schedule, one canvas per
  example, block-causal context, two-pass self-conditioning, decoder CE + encoder next-token CE). The
  sliding window is 128 tokens (4 canvases), so the training prompts never reach it.
- `generation_config.json`: the release's sampler values (48 steps, bound 0.1, T 0.8 -> 0.4, stability 1,
  confidence 0.005, stop ids [1, 106, 50], pad 0) with `max_new_tokens` = 64 (2 canvases of 32).
- `tokenizer.json` (from `tools/make_default_model.py`): a SentencePiece-style BPE built with `tokenizers`.
  Special tokens sit at the Gemma 4 ids (pad 0, eos 1, bos 2, unk 3, mask 4, `<|tool>`..`<|"|>` 46-52,
  `<|think|>` 98, `<|channel>` 100, `<channel|>` 101, `<|turn>` 105, `<turn|>` 106, `"\\n"` 107); then 256
  byte-fallback tokens, printable ASCII and a few merges. It is not the Gemma 4 tokenizer.
- `chat_template.jinja`: copied from the `trl` 1.16.0 wheel (`trl/chat_templates/diffusion_gemma.jinja`,
  Apache-2.0, (c) the TRL authors / Google), the Gemma 4 chat template of DiffusionGemma.
"""


if __name__ == "__main__":
    sys.exit(main())
