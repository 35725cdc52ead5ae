"""The embedded default model is a trained toy memoriser (trained by minidiff: tools/make_default_model.py, docs/default_model.md).

NumPy only: no torch. The README's prompt must come back as the memorised haiku, the denoising must stop
early (adaptive stop), and the answer must end at a stop id.
"""

import json
import re
import sys
from pathlib import Path

import minidiff
from minidiff import cli
from minidiff.chat import ChatTemplate, format_reply, response_ids
from minidiff.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = dict(tuple(p) for p in json.loads((ROOT / "minidiff" / "default_model" / "prompts.json").read_text())["pairs"])
README_PROMPT = "Write a haiku about the sea"


def _answer(model, tok, tpl, prompt, seed):
    ids = tok.encode(tpl.render([{"role": "user", "content": prompt}]))
    res = model.generate(ids, seed=seed)
    return res, format_reply(tok.decode(response_ids(res.tokens[0], {1, 106, 50}, 0)), False)


def test_readme_prompt_gives_the_memorised_haiku_and_stops_early():
    m = minidiff.load(None)
    tok, tpl = Tokenizer.from_folder(m.folder), ChatTemplate.from_folder(m.folder)
    res, text = _answer(m, tok, tpl, README_PROMPT, seed=0)
    assert text == PAIRS[README_PROMPT]
    assert res.finished[0]                                          # ended by <turn|> / <eos>
    assert res.canvases == 2                                        # the haiku spans two canvases
    assert all(1 <= s < res.config.max_denoising_steps for s in res.steps_per_canvas), res.steps_per_canvas


def test_cli_prints_the_haiku_and_an_early_stop(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    rc = cli.main(["generate", README_PROMPT, "--seed", "0"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == PAIRS[README_PROMPT] + "\n"
    steps = re.search(r"steps per canvas ([\d/]+),", err).group(1)
    assert all(int(s) < 48 for s in steps.split("/")), err


def test_other_memorised_prompts():
    m = minidiff.load(None)
    tok, tpl = Tokenizer.from_folder(m.folder), ChatTemplate.from_folder(m.folder)
    for prompt in ("Say hello", "What is the capital of France?", "Tell me a joke"):
        res, text = _answer(m, tok, tpl, prompt, seed=1)
        assert text == PAIRS[prompt] and res.finished[0]
