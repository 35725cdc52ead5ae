"""`minidiff generate` / `minidiff chat` end to end on the embedded default model (offline, ~1 s each)."""

import io
import re
import shutil
import sys

import pytest

import minidiff
from minidiff import cli, sampler


def run_cli(argv, capsys, monkeypatch, stdin=None, tty=False):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty and stdin is None, raising=False)
    try:
        rc = cli.main(argv)
    except SystemExit as e:                     # argparse's own errors (exit status 2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_plain_and_deterministic(capsys, monkeypatch):
    rc, out, err = run_cli(["generate", "Write a haiku about the forest", "--seed", "3", "--steps", "6"], capsys, monkeypatch)
    assert rc == 0 and out.endswith("\n") and "\x1b[" not in out            # not a terminal: plain text
    assert err.count("\n") == 1 and re.match(r"minidiff: (1 canvas|[234] canvases), steps per canvas 6(/6)*, ", err)
    assert "tokens/forward" in err and "tokens/s" in err and "seed 3" in err
    rc2, out2, _ = run_cli(["generate", "Write a haiku about the forest", "--seed", "3", "--steps", "6"], capsys, monkeypatch)
    assert out2 == out
    rc3, out3, _ = run_cli(["generate", "Write a haiku about the forest", "--seed", "4", "--steps", "6"], capsys, monkeypatch)
    assert out3 != out


def test_generate_matches_the_api(capsys, monkeypatch):
    """The CLI's text is the decoded API result of the chat-formatted prompt."""
    from minidiff.chat import ChatTemplate, response_ids
    from minidiff.tokenizer import Tokenizer
    m = minidiff.load(None)
    tok, tpl = Tokenizer.from_folder(m.folder), ChatTemplate.from_folder(m.folder)
    ids = tok.encode(tpl.render([{"role": "user", "content": "Hi there"}]))
    assert ids[:3] == [2, 105, tok.encode("user")[0]]
    res = m.generate(ids, seed=11, max_denoising_steps=4, max_new_tokens=64)
    want = tok.decode(response_ids(res.tokens[0], {1, 106, 50}, 0))
    rc, out, _ = run_cli(["generate", "Hi there", "--seed", "11", "--steps", "4", "--max-new-tokens", "64"],
                         capsys, monkeypatch)
    assert rc == 0 and out == want.strip("\n") + "\n"


def test_prompt_from_stdin(capsys, monkeypatch):
    rc, out, err = run_cli(["generate", "--raw", "--seed", "1", "--steps", "2", "-q"], capsys, monkeypatch,
                           stdin="a prompt\nwith two lines\n")
    assert rc == 0 and out and err == ""


@pytest.mark.parametrize("argv, msg", [
    (["generate", ""], "empty prompt"),
    (["generate", "   "], "empty prompt"),
    (["generate", "hi", "--steps", "-1"], "max_denoising_steps must be an integer in [1, 10000]"),
    (["generate", "hi", "--steps", "0"], "max_denoising_steps"),
    (["generate", "hi", "--t-min", "0.8", "--t-max", "0.8"], "t_max must be greater than t_min"),
    (["generate", "hi", "--t-min", "0.9", "--t-max", "0.2"], "t_max must be greater than t_min"),
    (["generate", "hi", "--entropy-bound", "0"], "entropy_bound must be a number > 0"),
    (["generate", "hi", "--entropy-bound", "-0.5"], "entropy_bound"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "hi", "--confidence-threshold", "0"], "confidence_threshold"),
    (["generate", "hi", "--stability-threshold", "-2"], "stability_threshold"),
    (["generate", "hi", "--seed", "-5"], "seed"),
    (["generate", "hi", "--steps", "many"], "invalid int value"),
    (["generate", "hi", "--device", "tpu"], "invalid choice"),
    (["generate", "hi", "--eos-token-id", "1,x"], "comma-separated"),
    (["generate", "hi", "--bogus"], "unrecognized arguments"),
    (["generate", "a " * 5000], "exceeds the model's context"),
    (["generate", "hi", "--model", "/nonexistent/model"], "/nonexistent/model: no such folder"),
    (["generate", "hi", "--raw", "--think"], "--think need"),
    (["generate", "hi", "--infill", "[[40]]abc", "--max-new-tokens", "4"], "longer than"),
])
def test_bad_input_is_one_line(argv, msg, capsys, monkeypatch):
    rc, out, err = run_cli(argv, capsys, monkeypatch, stdin=None, tty=True) if argv[1] == "" else \
        run_cli(argv, capsys, monkeypatch)
    assert rc != 0 and out == ""
    assert err.startswith("minidiff: error: ") and err.count("\n") == 1 and msg in err, err
    assert "Traceback" not in err


def test_no_prompt_on_a_terminal_is_an_error(capsys, monkeypatch):
    rc, out, err = run_cli(["generate"], capsys, monkeypatch, stdin=None, tty=True)
    assert rc == 2 and err == "minidiff: error: empty prompt: give PROMPT or pipe text on stdin\n"


def test_missing_tokenizer(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(minidiff.loader.DEFAULT_MODEL, folder)
    (folder / "tokenizer.json").unlink()
    rc, out, err = run_cli(["generate", "hi", "--model", str(folder)], capsys, monkeypatch)
    assert rc == 2 and "no tokenizer" in err and err.count("\n") == 1


def test_missing_template_falls_back_to_raw(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(minidiff.loader.DEFAULT_MODEL, folder)
    (folder / "chat_template.jinja").unlink()
    rc, out, err = run_cli(["generate", "hi", "--model", str(folder), "--steps", "2", "--seed", "3", "-q"],
                           capsys, monkeypatch)
    assert rc == 0 and err == ""
    rc2, raw, _ = run_cli(["generate", "hi", "--model", str(folder), "--steps", "2", "--seed", "3", "-q", "--raw"],
                          capsys, monkeypatch)
    assert rc2 == 0 and out == raw                                          # no template: exactly the raw format
    rc, out, err = run_cli(["generate", "hi", "--model", str(folder), "--chat"], capsys, monkeypatch)
    assert rc == 2 and "no chat template" in err


def test_infill_holds_the_text(capsys, monkeypatch):
    # --eos-token-id 9999: the trained default model may write a stop id into the free slots, which would end
    # the printed text before the held tail
    rc, out, err = run_cli(["generate", "x", "--raw", "--seed", "2", "--steps", "3", "--max-new-tokens", "32",
                            "--infill", "The fox[[3]]over the dog", "--eos-token-id", "9999", "-q"], capsys, monkeypatch)
    assert rc == 0 and out.startswith("The fox") and "over the dog" in out


def test_infill_everything_fixed_is_identity():
    from minidiff.tokenizer import Tokenizer
    m = minidiff.load(None)
    tok = Tokenizer.from_folder(m.folder)
    text = tok.encode("abcdefghijklmnopqrstuvwxyz the quick brown fox!")
    fixed = (text * 4)[:32]
    res = m.generate([2, 400], infill=fixed, max_new_tokens=32, seed=0)
    assert res.tokens[0].tolist() == fixed


def test_ctrl_c_prints_committed_and_exits_130(capsys, monkeypatch):
    real = sampler.generate

    def interrupted(model, ids, callback=None, **kw):
        def cb(e):
            callback(e)
            if e.kind == "step" and e.canvas_index == 1 and e.step == 1:
                raise KeyboardInterrupt
        return real(model, ids, callback=cb, **kw)
    monkeypatch.setattr(sampler, "generate", interrupted)
    # --eos-token-id 9999: the trained default model may end its answer in the first canvas (no canvas 2)
    rc, out, err = run_cli(["generate", "Hello", "--raw", "--seed", "5", "--steps", "3", "--eos-token-id", "9999"],
                           capsys, monkeypatch)
    assert rc == 130 and "interrupted" in err
    monkeypatch.setattr(sampler, "generate", real)
    m = minidiff.load(None)
    from minidiff.chat import response_ids
    from minidiff.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(m.folder)
    first = real(m, tok.encode("Hello", add_bos=True), seed=5, max_denoising_steps=3,
                 eos_token_id=[9999]).tokens[0][:32]
    assert out == tok.decode(response_ids(first, {9999}, 0)) + "\n"


def test_live_view(capsys, monkeypatch):
    rc, out, err = run_cli(["generate", "Hello", "--seed", "1", "--steps", "4", "--live", "--max-new-tokens", "64",
                            "--eos-token-id", "9999"],
                           capsys, monkeypatch)
    assert rc == 0
    assert "canvas 1  step 1/4  T 0.80" in out and "canvas 2" in out
    assert "\x1b[32m" in out and "\x1b[2m\x1b[31m" in out                 # accepted / renoised colours
    assert "\x1b[J" in out and "entropy ▁▂▃▄▅▆▇█" in out
    final = out.rsplit("\x1b[J", 1)[1]                                      # the last redraw clears the view
    _, plain, _ = run_cli(["generate", "Hello", "--seed", "1", "--steps", "4", "--max-new-tokens", "64",
                           "--eos-token-id", "9999"],
                          capsys, monkeypatch)
    assert final == plain
    rc, out, _ = run_cli(["generate", "Hello", "--seed", "1", "--steps", "2", "--live", "--no-color"],
                         capsys, monkeypatch)
    assert "\x1b[3" not in out and "accepted" in out


def test_think_and_show_thoughts_flags(capsys, monkeypatch):
    from minidiff import cli_generate
    seen = []
    real = cli_generate.Session.prompt_ids

    def spy(self, messages=None, raw=None, enable_thinking=False):
        ids = real(self, messages, raw, enable_thinking)
        seen.append(self.tok.decode(ids))
        return ids
    monkeypatch.setattr(cli_generate.Session, "prompt_ids", spy)
    run_cli(["generate", "Hi", "--think", "--system", "Be brief.", "--steps", "1", "-q"], capsys, monkeypatch)
    run_cli(["generate", "Hi", "--steps", "1", "-q"], capsys, monkeypatch)
    assert seen[0] == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert seen[1] == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_chat_multi_turn(capsys, monkeypatch):
    from minidiff import cli_generate
    seen = []
    real = cli_generate.Session.prompt_ids

    def spy(self, messages=None, raw=None, enable_thinking=False):
        seen.append([dict(m) for m in messages])
        return real(self, messages, raw, enable_thinking)
    monkeypatch.setattr(cli_generate.Session, "prompt_ids", spy)
    rc, out, err = run_cli(["chat", "--seed", "1", "--steps", "2", "--max-new-tokens", "32"], capsys, monkeypatch,
                           stdin="hello\nand again\n/reset\nfresh\n")
    assert rc == 0 and err.count("minidiff: 1 canvas") == 3
    assert [len(s) for s in seen] == [1, 3, 1]
    assert seen[1][0]["content"] == "hello" and seen[1][1]["role"] == "assistant" and seen[2][0]["content"] == "fresh"


def test_help_says_what_the_default_model_is(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "memorised" in out and "gibberish" in out
