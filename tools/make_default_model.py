"""Make minidiff/default_model/, the model `minidiff generate` runs without --model, with minidiff alone.

    python tools/make_default_model.py [--out minidiff/default_model] [--run DIR] [--steps 2000]
    python tools/make_default_model.py --resume --run DIR      # a sitting that stopped goes on
    python tools/make_default_model.py --eval-only             # score the model in --out

A toy memoriser, not a language model: it answers the 30 prompts of minidiff/default_model/prompts.json (the
README's "Write a haiku about the sea" among them) and writes nonsense for anything else. Its job is to make
`minidiff generate` show real convergence offline: entropy falling, the adaptive stop firing, EOS ending the
answer, and an answer that spans two canvases. Four steps, no torch (docs/default_model.md):

  1. the folder's text files: tokenizer.json (a small SentencePiece-style BPE with the Gemma 4 special ids,
     learned here from an embedded text), config.json, generation_config.json (the release's sampler values,
     two canvases of 32), and the project's chat template (chat_template.jinja, Gemma 4 turns, written for
     minidiff: kept from --out, where it lives)
  2. `minidiff train --from-scratch` on prompts.json: the release's objective, AdamW 2e-3 with 100 warm-up
     steps and a cosine to 10 %, batches of 30, seed 2026 (about 15 minutes on 2 CPU cores); the run folder
     (--run) holds float32 checkpoints and resumes
  3. the weights cast to bf16 (round to nearest even, like the release) into --out, with README.md
  4. the evaluation: every training prompt with three seeds through `minidiff generate`'s sampler
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEFAULT = ROOT / "minidiff" / "default_model"
VOCAB, CANVAS, SEED = 512, 32, 2026
EOS, TURN_END, TOOL_RESPONSE, PAD = 1, 106, 50, 0
TEXT = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, global_head_dim=48, num_global_key_value_heads=1,
            sliding_window=128, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "full_attention"],
            num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
            rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=2, eos_token_id=[EOS, TURN_END],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                "rope_theta": 1000000.0}})
GENERATION = {"max_new_tokens": 2 * CANVAS, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
              "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [EOS, TURN_END, TOOL_RESPONSE],
              "pad_token_id": PAD, "bos_token_id": 2,
              "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}}

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
           46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
           51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
           105: "<|turn>", 106: "<turn|>"}
NEWLINE_ID = 107
# images/audio/video markers exist in Gemma 4 at high ids; the tiny vocab keeps them in unused low slots
EXTRA = {60: "<|image|>", 61: "<|audio|>", 62: "<|video|>", 63: "<|image>", 64: "<image|>"}

CORPUS = """
The quick brown fox jumps over the lazy dog. Diffusion models start from noise and refine the whole
canvas at once. Each step the model predicts every position, keeps the tokens it is sure about and
throws the rest back into noise. This is a tiny random model: what it writes is not meant to be read.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France
is Paris. def add(a, b): return a + b  # print(add(1, 2)) for i in range(10): print(i)
In the beginning there was the word, and the word was a token, and the token was in the vocabulary.
"""

def learn_merges(text: str, alphabet: list[str], n: int) -> list[tuple[str, str]]:
    """A minimal BPE trainer: repeatedly merge the most frequent adjacent pair (ties: first seen)."""
    words = collections.Counter("▁" + w for w in text.split())
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: kv[1])    # max keeps the first of equal counts
        merges.append((a, b))
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab: dict[str, int] = {}
    for i in range(108):
        vocab[SPECIAL.get(i) or EXTRA.get(i) or ("\n" if i == NEWLINE_ID else f"<unused{i}>")] = i
    for b in range(256):                                          # byte fallback <0x00> ... <0xFF>
        vocab[f"<0x{b:02X}>"] = len(vocab)
    alphabet = ["▁"] + [chr(c) for c in range(33, 127)]           # space is "▁" (SentencePiece style)
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    merges = learn_merges(CORPUS, alphabet, VOCAB - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    assert len(vocab) <= VOCAB, len(vocab)
    for i in range(len(vocab), VOCAB):                            # pad the table to the model's vocab
        vocab[f"<unused{i}>"] = i

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = sorted({**SPECIAL, **EXTRA}.items())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in specials])
    tok.add_tokens([AddedToken(f"<unused{i}>", special=True, normalized=False)
                    for i in range(108) if i not in SPECIAL and i not in EXTRA and i != NEWLINE_ID])
    for i, s in specials:
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    assert tok.token_to_id("\n") == NEWLINE_ID and tok.get_vocab_size() == VOCAB
    tok.save(str(path))


def config(dtype: str) -> dict:
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": CANVAS, "dtype": dtype, "tie_word_embeddings": True,
            "text_config": dict(TEXT, model_type="diffusion_gemma_text", dtype=dtype),
            "bos_token_id": 2, "eos_token_id": [EOS, TURN_END], "pad_token_id": PAD}


def write_start(folder: Path, template: Path) -> None:
    """Step 1: the text files, and float32 weights of the right shapes (train --from-scratch replaces them)."""
    from safetensors.numpy import save_file

    from minidiff.config import parse_config
    from minidiff.weights import expected_tensors
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder / "tokenizer.json")
    shutil.copyfile(template, folder / "chat_template.jinja")
    (folder / "config.json").write_text(json.dumps(config("float32"), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    shapes = expected_tensors(parse_config(config("float32")))
    save_file({n: np.zeros(s, np.float32) for n, s in shapes.items()}, str(folder / "model.safetensors"))


def write_weights_bf16(src: Path, dst: Path) -> int:
    """A float32 model.safetensors -> bf16 (round to nearest even, as torch's .to(bfloat16)). -> parameters"""
    from safetensors.numpy import load_file

    from minidiff.quantize import ShardWriter
    from minidiff.tensors import f32_to_bf16_bits
    weights = load_file(str(src))
    w = ShardWriter(dst, [(n, "BF16", a.shape) for n, a in weights.items()])
    for n, a in weights.items():
        w.write(n, f32_to_bf16_bits(a))
    w.close()
    return sum(a.size for a in weights.values())


def write_bf16_folder(run: Path, out: Path) -> int:
    """A float32 training checkpoint -> a bf16 model folder: its config (dtype bfloat16), tokenizer, chat
    template and generation config, and the weights rounded to bf16. -> parameters"""
    from minidiff.train.trainer import SUPPORT
    out.mkdir(parents=True, exist_ok=True)
    for f in SUPPORT:
        if (run / f).is_file() and (run / f).resolve() != (out / f).resolve():
            shutil.copyfile(run / f, out / f)
    cfg = json.loads((run / "config.json").read_text())
    for d in (cfg, cfg["text_config"]):
        d["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return write_weights_bf16(run / "model.safetensors", out / "model.safetensors")


def write_bf16(run: Path, out: Path, pairs_file: Path, steps: int, seconds: float | None) -> None:
    """Step 3: the trained float32 weights -> bf16 in out/, with the training pairs and README."""
    n_params = write_bf16_folder(run, out)
    if pairs_file.resolve() != (out / "prompts.json").resolve():
        shutil.copyfile(pairs_file, out / "prompts.json")
    took = f", {seconds / 60:.0f} minutes on the machine that ran it" if seconds else ""
    (out / "README.md").write_text(README.format(n=len(json.loads(pairs_file.read_text())["pairs"]), steps=steps,
                                                 params=n_params / 1e6, took=took))


def evaluate(folder: Path, seeds=(0, 1, 2)) -> float:
    """Step 4: every training prompt through minidiff's sampler (release settings) -> exact-match rate."""
    import minidiff
    from minidiff.chat import ChatTemplate, format_reply, response_ids
    from minidiff.tokenizer import Tokenizer
    model = minidiff.load(str(folder))
    tok, tpl = Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder)
    pairs = json.loads((folder / "prompts.json").read_text())["pairs"]
    hits, steps = 0, []
    for prompt, answer in pairs:
        ids = tok.encode(tpl.render([{"role": "user", "content": prompt}]))
        for seed in seeds:
            res = model.generate(ids, seed=seed)
            text = format_reply(tok.decode(response_ids(res.tokens[0], {EOS, TURN_END, TOOL_RESPONSE}, PAD)), False)
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
    from minidiff.train.trainer import Progress, Settings, train
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT), help="the model folder to write (default: the embedded one)")
    ap.add_argument("--run", help="the training run's folder (float32 checkpoints; default: a temporary one)")
    ap.add_argument("--data", default=str(DEFAULT / "prompts.json"))
    ap.add_argument("--template", default=str(DEFAULT / "chat_template.jinja"), help="the chat template to ship")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--resume", action="store_true", help="continue the run in --run")
    ap.add_argument("--eval-only", action="store_true", help="only score the model already in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.eval_only:
        return 0 if evaluate(out) == 1.0 else 1
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run or Path(tmp) / "run")
        start = Path(tmp) / "start"
        t0 = time.perf_counter()
        if args.resume:
            train(None, args.data, run, Settings(), resume=True, progress=Progress())
        else:
            template = Path(tmp) / "chat_template.jinja"
            shutil.copyfile(args.template, template)             # --out may be where it lives: read it first
            write_start(start, template)
            s = Settings(steps=args.steps, batch=30, lr=2e-3, warmup=100, seed=SEED, save_every=100)
            train(start, args.data, run, s, from_scratch=True, progress=Progress())
        write_bf16(run, out, Path(args.data), json.loads((run / "trainer_state.json").read_text())["step"],
                   None if args.resume else time.perf_counter() - t0)
    print(f"wrote {out}")
    return 0 if evaluate(out) == 1.0 else 1


README = """# minidiff's embedded default model

A **tiny trained toy**: a DiffusionGemma (vocab 512, hidden 96, 4 layers, 8 experts top-2, canvas 32,
{params:.2f} M parameters, bf16) trained by minidiff itself, from random weights, to **memorise {n} short
(prompt, answer) pairs** (`prompts.json`), so that `minidiff generate "Write a haiku about the sea"` runs
offline in a second and shows real convergence on them: the canvas is certain after a step or two, the
adaptive stop ends it long before step 48, and `<turn|>` / `<eos>` end the answer (the haiku spans two
canvases).

**It knows nothing but its training prompts.** Ask it anything else (or rephrase a prompt) and it writes
gibberish or a mix of memorised answers. It is for trying the command line, the live denoising view and the
sampler, not a language model; for real text pass `--model google/diffusiongemma-26B-A4B-it` (or a local
folder).

Made by `python tools/make_default_model.py` (deterministic, no torch; see docs/default_model.md):
- `model.safetensors`: `minidiff train --from-scratch`, {steps} AdamW steps of 30 examples on the
  DiffusionGemma training objective{took}, cast to bf16. `config.json`: its shape; the sliding window is 128
  tokens (4 canvases), so no training sequence reaches it.
- `generation_config.json`: the release's sampler values (48 steps, bound 0.1, T 0.8 -> 0.4, stability 1,
  confidence 0.005, stop ids [1, 106, 50], pad 0) with `max_new_tokens` = 64 (2 canvases of 32).
- `tokenizer.json`: a SentencePiece-style BPE built with `tokenizers`. Special tokens sit at the Gemma 4
  ids (pad 0, eos 1, bos 2, unk 3, mask 4, `<|tool>`..`<|"|>` 46-52, `<|think|>` 98, `<|channel>` 100,
  `<channel|>` 101, `<|turn>` 105, `<turn|>` 106, `"\\n"` 107); then 256 byte-fallback tokens, printable
  ASCII and a few merges. It is not the Gemma 4 tokenizer.
- `chat_template.jinja`: minidiff's own chat template in the Gemma 4 turn format (system turn with
  `<|think|>`, user and model turns, earlier thoughts left out); it refuses what this model cannot read
  (images, tools).
"""


if __name__ == "__main__":
    sys.exit(main())
