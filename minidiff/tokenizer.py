"""The checkpoint's tokenizer: `tokenizer.json` read with the `tokenizers` library (no DL framework).

Gemma 4 is SentencePiece-style BPE (space -> "▁", byte fallback). BOS comes from the chat template, so
text is encoded without adding special tokens unless asked (`add_bos=True` for raw prompts).
"""

from __future__ import annotations

from pathlib import Path

from .errors import MinidiffError
from .folder import MAX_TOKENIZER_BYTES, ModelFolder

# ids the sampler and the chat view care about (Gemma 4's special tokens)
SPECIAL_NAMES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>", "turn_start": "<|turn>",
                 "turn_end": "<turn|>", "channel_start": "<|channel>", "channel_end": "<channel|>",
                 "think": "<|think|>", "tool_response": "<|tool_response>"}


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the Gemma special ids resolved once."""

    def __init__(self, tok, path=None):
        self._tok = tok
        self.path = path
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.ids = {name: tok.token_to_id(s) for name, s in SPECIAL_NAMES.items()}   # None when absent
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        return cls.from_folder(path.parent, path.name)

    @classmethod
    def from_folder(cls, folder, name: str = "tokenizer.json") -> "Tokenizer":
        """The folder's tokenizer.json, read through the folder checks (inside it, regular, size-limited)."""
        from tokenizers import Tokenizer as HFTokenizer
        if folder is None:
            raise MinidiffError("no tokenizer: the model has no folder")
        d = ModelFolder(folder)
        if not d.has(name):
            raise MinidiffError(f"no tokenizer: {d.shown / name} does not exist")
        text = d.read_text(name, MAX_TOKENIZER_BYTES)
        try:
            return cls(HFTokenizer.from_str(text), d.shown / name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # malformed JSON, an unknown model type, or a panic in the Rust library
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise MinidiffError(f"{d.shown / name}: cannot read the tokenizer ({msg})")

    @property
    def bos_id(self):
        return self.ids["bos"]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` ("<|turn>") become their single ids."""
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the Rust tokenizer panics on some inputs instead of raising
            raise MinidiffError(f"{self.path}: the tokenizer failed on this text ({type(e).__name__})")
        if add_bos:
            if self.bos_id is None:
                raise MinidiffError("the tokenizer has no <bos> token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        try:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise MinidiffError(f"{self.path}: the tokenizer failed to decode ({type(e).__name__})")

    def token(self, i: int) -> str:
        """The vocabulary string of one id (for the live view); '?' if unknown."""
        s = self._tok.id_to_token(int(i))
        return "?" if s is None else s

    def piece(self, i: int) -> str:
        """How one id reads on its own: specials as their name, "▁" as a space, <0xNN> as the byte's char."""
        i = int(i)
        if i in self.special_ids:
            return self.token(i)
        s = self.token(i)
        if s.startswith("<0x") and s.endswith(">") and len(s) == 6:
            b = int(s[3:5], 16)
            return chr(b) if 32 <= b < 127 else f"\\x{b:02x}"
        return s.replace("▁", " ")
