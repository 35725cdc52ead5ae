"""Chat formatting: the checkpoint's chat template rendered in a sandbox, and the thought channel.

The template (`chat_template.jinja` next to the weights, else `tokenizer_config.json["chat_template"]`) is
untrusted code from a model repository, so it runs in jinja2's `ImmutableSandboxedEnvironment` with the
same options and helpers as transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loopcontrols,
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape). It emits BOS itself, so the
rendered prompt is tokenized without adding special tokens.

Gemma 4 turns look like (shared/reference/architecture.md §5):

    <bos><|turn>system\\n<|think|>\\n...<turn|>\\n      system turn: only with thinking, tools or a system message
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n                                   generation prompt; the reply ends with <turn|>

With thinking on, the model writes `<|channel>thought\\n{reasoning}<channel|>` before its answer;
`split_thoughts` separates the two so the CLI can hide or show the reasoning.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import MinidiffError

CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
THOUGHT_HEADER = CHANNEL_START + "thought"


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "<bos>", eos_token: str = "<eos>", origin: str = "template"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise MinidiffError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise MinidiffError(f"{origin}: not a valid jinja2 template ({e})")
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_folder(cls, folder) -> "ChatTemplate":
        """`chat_template.jinja`, else the `chat_template` entry of tokenizer_config.json."""
        folder = Path(folder) if folder is not None else None
        if folder is not None and (folder / "chat_template.jinja").is_file():
            path = folder / "chat_template.jinja"
            return cls(path.read_text(encoding="utf-8"), origin=str(path))
        cfg_path = folder / "tokenizer_config.json" if folder is not None else None
        if cfg_path is not None and cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise MinidiffError(f"{cfg_path}: not valid JSON ({e})")
            t = cfg.get("chat_template")
            if isinstance(t, list):   # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            if isinstance(t, str):
                return cls(t, bos_token=_token_str(cfg.get("bos_token"), "<bos>"),
                           eos_token=_token_str(cfg.get("eos_token"), "<eos>"), origin=str(cfg_path))
        raise MinidiffError(f"no chat template in {folder} (no chat_template.jinja); use --raw for a plain prompt")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False,
               tools: list | None = None, **extra) -> str:
        """messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> the prompt string."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise MinidiffError("chat messages must be objects with a 'role'")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, tools=tools, bos_token=self.bos_token,
                                         eos_token=self.eos_token, **extra)
        except MinidiffError:
            raise
        except Exception as e:  # a template bug or a sandbox violation
            raise MinidiffError(f"{self.origin}: rendering failed ({type(e).__name__}: {e})")


def _token_str(t, default):
    if isinstance(t, dict):
        return t.get("content", default)
    return t if isinstance(t, str) else default


def response_ids(ids, stop_ids, pad_id) -> list[int]:
    """Generated ids up to (not including) the first stop id, without pad."""
    out = []
    for i in ids:
        i = int(i)
        if i in stop_ids:
            break
        if i != pad_id:
            out.append(i)
    return out


def split_thoughts(text: str) -> tuple[str | None, str]:
    """'<|channel>thought\\n…<channel|>answer' -> ('…', 'answer'). No channel: (None, text).

    An unterminated channel (generation stopped while thinking) is all thought and no answer. Any further
    channel blocks are removed from the answer as well.
    """
    start = text.find(THOUGHT_HEADER)
    if start < 0:
        return None, text
    before = text[:start]
    rest = text[start + len(THOUGHT_HEADER):]
    end = rest.find(CHANNEL_END)
    if end < 0:
        return rest.removeprefix("\n"), before
    thought = rest[:end].removeprefix("\n").removesuffix("\n")
    more, answer = split_thoughts(rest[end + len(CHANNEL_END):])
    if more is not None:
        thought = thought + "\n" + more
    return thought, before + answer


def format_reply(text: str, show_thoughts: bool) -> str:
    """The reply as the user sees it: the answer, with the reasoning first (marked) when asked."""
    thought, answer = split_thoughts(text)
    answer = answer.strip("\n")
    if thought is None or not show_thoughts:
        return answer
    return f"[thinking]\n{thought.strip()}\n[/thinking]\n{answer}"
