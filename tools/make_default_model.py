"""Build minidiff/default_model/: the tiny embedded model that `minidiff generate` uses without --model.

    python tools/make_default_model.py [--out minidiff/default_model]

What it writes (all deterministic, well under 2 MB):
  config.json, model.safetensors   a tiny RANDOM DiffusionGemma (tests/tinyckpt.py: vocab 512, hidden 64,
                                   4 layers, 8 experts, canvas 32), bf16 like the release, saved by
                                   transformers' save_pretrained
  generation_config.json           the release's sampler values (48 steps, bound 0.1, T 0.8 -> 0.4,
                                   stability 1, confidence 0.005, stop ids [1, 106, 50], pad 0), with
                                   max_new_tokens sized for the tiny canvas (4 canvases of 32)
  tokenizer.json                   a SentencePiece-style BPE built with `tokenizers`: the Gemma 4 special
                                   ids (pad 0, eos 1, bos 2, unk 3, mask 4, tool tokens 46-52, <|think|> 98,
                                   <|channel>/<channel|> 100/101, <|turn>/<turn|> 105/106, "\\n" 107),
                                   256 byte-fallback tokens, printable ASCII, and merges learned from a
                                   short embedded text
  chat_template.jinja              the Gemma 4 / DiffusionGemma chat template shipped in the `trl` 1.16.0
                                   wheel (trl/chat_templates/diffusion_gemma.jinja, Apache-2.0)
  README.md

The weights it writes are random. This is step 1 of 2: the committed default model is then trained by
`python tools/train_default_model.py` (step 2), which keeps the tokenizer and template written here and
replaces the weights and config with a model that memorised 30 prompts (docs/default_model.md). Running
this script alone leaves a random, gibberish-writing model in the folder. Needs torch + transformers
(tools/ only).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VOCAB = 512
CANVAS = 32
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            sliding_window=64, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "full_attention"],
            num_experts=8, top_k_experts=2, moe_intermediate_size=24, max_position_embeddings=4096)

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

TEMPLATE_SOURCE = ("trl", "1.16.0", "trl/chat_templates/diffusion_gemma.jinja")


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


def fetch_template(dest: Path) -> None:
    """Copy the chat template out of the trl wheel (downloaded with pip, never imported)."""
    name, version, member = TEMPLATE_SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        f"{name}=={version}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        data = zipfile.ZipFile(wheel).read(member)
    dest.write_bytes(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "minidiff" / "default_model"))
    ap.add_argument("--template", help="use this chat_template.jinja instead of fetching the trl wheel")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import tinyckpt                                              # torch + transformers
    model = tinyckpt.build_model(TEXT, canvas_length=CANVAS, seed=2026, embed_std=1.5, dtype=torch.bfloat16)
    model.generation_config.update(
        max_new_tokens=4 * CANVAS, max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005, eos_token_id=[1, 106, 50], pad_token_id=0, bos_token_id=2)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    model.generation_config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=0.1)
    for cfg in (model.config, model.config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, [1, 106], 0
    with tempfile.TemporaryDirectory() as tmp:
        tinyckpt.save(model, tmp)
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copyfile(Path(tmp) / f, out / f)
            (out / f).chmod(0o644)

    build_tokenizer(out / "tokenizer.json")
    if args.template:
        shutil.copy(args.template, out / "chat_template.jinja")
    else:
        fetch_template(out / "chat_template.jinja")
    (out / "README.md").write_text(README)
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


README = """# minidiff's embedded default model

A **tiny, randomly initialised** DiffusionGemma (vocab 512, hidden 64, 4 layers, 8 experts top-2, canvas 32),
so that `minidiff generate "Hello"` runs offline in a second. **Its weights are random: the text it writes
is gibberish.** It is for trying the command line, the live denoising view and the sampler; for real text
pass `--model google/diffusiongemma-26B-A4B-it` (or a local folder).

Built by `tools/make_default_model.py` (deterministic):
- `config.json`, `model.safetensors`: transformers `save_pretrained` of a perturbed random model in bf16
  (tests/tinyckpt.py).
- `generation_config.json`: the release's sampler values; `max_new_tokens` = 128 (4 canvases of 32).
- `tokenizer.json`: a SentencePiece-style BPE built with `tokenizers`. Special tokens sit at the Gemma 4
  ids (pad 0, eos 1, bos 2, unk 3, mask 4, `<|tool>`..`<|"|>` 46-52, `<|think|>` 98, `<|channel>` 100,
  `<channel|>` 101, `<|turn>` 105, `<turn|>` 106, `"\\n"` 107); then 256 byte-fallback tokens, printable
  ASCII and a few merges. It is not the Gemma 4 tokenizer.
- `chat_template.jinja`: copied from the `trl` 1.16.0 wheel (`trl/chat_templates/diffusion_gemma.jinja`,
  Apache-2.0, (c) the TRL authors / Google), the Gemma 4 chat template of DiffusionGemma.
"""


if __name__ == "__main__":
    sys.exit(main())
