"""Chat formatting: the checkpoint's chat template rendered in a sandbox, and the thought channel.

The template (`chat_template.jinja` next to the weights, else `tokenizer_config.json["chat_template"]`) is
untrusted code from a model repository, so it runs in jinja2's `ImmutableSandboxedEnvironment` with the
same options and helpers as transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loopcontrols,
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape). It emits BOS itself, so the
rendered prompt is tokenized without adding special tokens.

Gemma 4 turns look like this (the release's template writes them):

    <bos><|turn>system\\n<|think|>\\n...<turn|>\\n      system turn: only with thinking, tools or a system message
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n                                   generation prompt; the reply ends with <turn|>

With thinking on, the model writes `<|channel>thought\\n{reasoning}<channel|>` before its answer;
`split_thoughts` separates the two so the CLI can hide or show the reasoning.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import datetime

from .errors import MinidiffError
from .folder import ModelFolder

CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
THOUGHT_HEADER = CHANNEL_START + "thought"


RENDER_SECONDS = 5            # wall-clock limit of one rendering
RENDER_MEMORY = 1 << 30       # address-space limit of the rendering process
RENDER_CHARS = 4 << 20        # default cap on the rendered prompt (callers pass one scaled to the context)


def _environment():
    """The sandboxed jinja2 environment, with transformers' options and helpers."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise MinidiffError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A checkpoint's chat template. It is untrusted code, so besides jinja2's sandbox (no attribute
    access to internals, no mutation of the inputs) each rendering runs in a separate process with a time
    limit, a memory limit and a cap on the output: `{% for i in range(99999) %}{% for j in range(99999) %}`,
    `"x" * 10**10` or a 100 MB prompt end in one error line, not a hang or an exhausted machine."""

    def __init__(self, source: str, bos_token: str = "<bos>", eos_token: str = "<eos>", origin: str = "template"):
        import jinja2
        if not isinstance(source, str):
            raise MinidiffError(f"{origin}: the chat template must be a string")
        try:
            _environment().parse(source)                   # syntax errors now, at load
        except jinja2.TemplateError as e:
            raise MinidiffError(f"{origin}: not a valid jinja2 template ({str(e).splitlines()[0][:200]})")
        except (RecursionError, MemoryError):
            raise MinidiffError(f"{origin}: not a valid jinja2 template (nested too deeply)")
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = str(bos_token), str(eos_token)

    @classmethod
    def from_folder(cls, folder) -> "ChatTemplate | None":
        """`chat_template.jinja`, else the `chat_template` entry of tokenizer_config.json; None if the folder
        has neither (a template that is there but broken is an error)."""
        if folder is None:
            return None
        d = ModelFolder(folder)
        if d.has("chat_template.jinja"):
            return cls(d.read_text("chat_template.jinja"), origin=str(d.shown / "chat_template.jinja"))
        if not d.has("tokenizer_config.json"):
            return None
        cfg = d.read_json("tokenizer_config.json")
        where = str(d.shown / "tokenizer_config.json")
        t = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(t, list):   # [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if t is None:
            return None
        if not isinstance(t, str):
            raise MinidiffError(f"{where}: chat_template must be a string")
        return cls(t, bos_token=_token_str(cfg.get("bos_token"), "<bos>"),
                   eos_token=_token_str(cfg.get("eos_token"), "<eos>"), origin=where)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False,
               tools: list | None = None, max_chars: int = RENDER_CHARS, **extra) -> str:
        """messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> the prompt string."""
        return self.render_many([messages], add_generation_prompt, enable_thinking, tools, max_chars, **extra)[0]

    def render_many(self, conversations: list, add_generation_prompt: bool = True, enable_thinking: bool = False,
                    tools: list | None = None, max_chars: int = RENDER_CHARS, **extra) -> list[str]:
        """Several conversations rendered in one sandboxed process (training data: thousands of prompts).
        The limits: RENDER_SECONDS of time per 100 conversations, the memory cap, max_chars each."""
        for messages in conversations:
            for m in messages:
                if not isinstance(m, dict) or "role" not in m:
                    raise MinidiffError("chat messages must be objects with a 'role'")
        seconds = RENDER_SECONDS * max(1, -(-len(conversations) // 100))
        job = dict(source=self.source, max_chars=int(max_chars), seconds=seconds,
                   kwargs=[dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking, tools=tools, bos_token=self.bos_token,
                                eos_token=self.eos_token, **extra) for messages in conversations])
        try:
            job_text = json.dumps(job, ensure_ascii=True)
        except (TypeError, ValueError) as e:
            raise MinidiffError(f"chat messages must be JSON data ({e})")
        try:
            p = subprocess.run([sys.executable, "-m", "minidiff.chat"], input=job_text, capture_output=True,
                               text=True, encoding="utf-8", errors="replace", timeout=seconds)
        except subprocess.TimeoutExpired:
            raise MinidiffError(f"{self.origin}: rendering took longer than {seconds} s (stopped)")
        if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not p.stdout:   # its CPU-time limit
            raise MinidiffError(f"{self.origin}: rendering took longer than {seconds} s (stopped)")
        try:
            reply = json.loads(p.stdout)
        except ValueError:
            reply = {"error": "rendering failed (the rendering process ran out of memory or crashed)"}
        if "error" in reply:
            raise MinidiffError(f"{self.origin}: {reply['error']}")
        return reply["texts"]


def _render_in_child() -> None:
    """The rendering process (`python -m minidiff.chat`): a job as JSON on stdin (written by the parent, not
    by the model folder), {"texts": [...]} or {"error"} on stdout."""
    job = json.loads(sys.stdin.read())
    seconds = int(job.get("seconds", RENDER_SECONDS))
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
        # a backstop behind the parent's wall-clock timeout, which normally fires first
        resource.setrlimit(resource.RLIMIT_CPU, (seconds + 1, seconds + 2))
    except (ImportError, ValueError, OSError):
        pass                                          # not on this platform: the parent's timeout remains
    out = {}
    try:
        limit = job["max_chars"]
        template = _environment().from_string(job["source"])
        texts = []
        for kwargs in job["kwargs"]:
            parts, n = [], 0
            for piece in template.generate(**kwargs):
                n += len(piece)
                if n > limit:
                    raise MinidiffError(f"rendered prompt is longer than {limit} characters (stopped)")
                parts.append(piece)
            texts.append("".join(parts))
        out["texts"] = texts
    except MinidiffError as e:
        out["error"] = str(e)
    except MemoryError:
        out["error"] = "rendering needs more memory than allowed (stopped)"
    except RecursionError:
        out["error"] = "rendering recursed too deeply (stopped)"
    except Exception as e:                            # a template bug or a sandbox violation
        out["error"] = f"rendering failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    sys.stdout.write(json.dumps(out, ensure_ascii=True))


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


if __name__ == "__main__":
    _render_in_child()
