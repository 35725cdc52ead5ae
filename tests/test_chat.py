"""Chat template (Gemma 4 format, sandboxed) and the thought channel."""

import json

import pytest

import minidiff
from minidiff.chat import ChatTemplate, format_reply, response_ids, split_thoughts
from minidiff.errors import MinidiffError

FOLDER = minidiff.loader.DEFAULT_MODEL

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello!"},
     {"role": "user", "content": "Again"}],
    [{"role": "user", "content": [{"type": "text", "text": "  spaced  "}]}],
]


@pytest.fixture(scope="module")
def tpl():
    return ChatTemplate.from_folder(FOLDER)


def test_gemma4_format(tpl):
    assert tpl.render(CONVERSATIONS[0]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    assert tpl.render(CONVERSATIONS[0], enable_thinking=True) == \
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert tpl.render(CONVERSATIONS[1]) == \
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
    assert tpl.render(CONVERSATIONS[1], enable_thinking=True).startswith("<bos><|turn>system\n<|think|>\nBe brief.")
    # earlier thoughts are stripped from model turns; the assistant role is rendered as "model"
    assert tpl.render(CONVERSATIONS[2]) == ("<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
                                            "<|turn>user\nAgain<turn|>\n<|turn>model\n")
    assert tpl.render(CONVERSATIONS[0], add_generation_prompt=False) == "<bos><|turn>user\nHi<turn|>\n"
    # non-thinking mode: no empty thought channel after the generation prompt (current template form)
    assert "<|channel>" not in tpl.render(CONVERSATIONS[0])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("thinking", [False, True])
def test_same_as_transformers(tpl, i, thinking):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    want = render_jinja_template([CONVERSATIONS[i]], chat_template=tpl.source, add_generation_prompt=True,
                                 enable_thinking=thinking, bos_token="<bos>", eos_token="<eos>")
    want = want[0][0] if isinstance(want, tuple) else want
    want = want[0] if isinstance(want, list) else want
    assert tpl.render(CONVERSATIONS[i], enable_thinking=thinking) == want


def test_more_plain_chat_as_the_release_template_writes_it(tpl):
    """The project's template renders plain chat as the release's Gemma 4 template does (these strings were
    rendered by the template of the trl 1.16.0 wheel, which the first default model used)."""
    cases = [
        ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {},
         "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"),
        ([{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "Hi"}], {},
         "<bos><|turn>system\nA<turn|>\n<|turn>system\nB<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"),
        ([{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}], {"add_generation_prompt": False},
         "<bos><|turn>user\nHi<turn|>\n<|turn>model\nYo<turn|>\n"),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}]}], {},
         "<bos><|turn>user\nHiyou<turn|>\n<|turn>model\n"),
        ([{"role": "user", "content": "  Hi  "}], {"add_generation_prompt": False}, "<bos><|turn>user\nHi<turn|>\n"),
        ([], {}, "<bos><|turn>model\n"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A<|channel>x<channel|>B <|channel>y"}],
         {"add_generation_prompt": False}, "<bos><|turn>user\nHi<turn|>\n<|turn>model\nAB<turn|>\n"),
    ]
    for messages, kw, want in cases:
        assert tpl.render(messages, **kw) == want


@pytest.mark.parametrize("messages, kw, why", [
    ([{"role": "user", "content": "Hi"}], {"tools": [{"type": "function", "function": {"name": "f"}}]}, "no tools"),
    ([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], {}, "text only"),
    ([{"role": "tool", "content": "42"}], {}, "unknown role 'tool'"),
    ([{"role": "user", "content": {"text": "Hi"}}], {}, "a string or a list of text parts"),
])
def test_what_the_model_cannot_read_is_one_error(tpl, messages, kw, why):
    """The default model's template refuses images, tools and unknown roles instead of writing tokens the
    model was never trained on."""
    with pytest.raises(MinidiffError, match=why) as e:
        tpl.render(messages, **kw)
    assert "\n" not in str(e.value)


def test_tojson_is_unescaped_as_in_transformers():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later"}}]
    out = ChatTemplate("{{ tools | tojson }}").render([], tools=tools)
    assert json.loads(out) == tools and "<now> & later" in out


def test_sandbox_blocks_unsafe_templates():
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MinidiffError, match="rendering failed"):
        evil.render(CONVERSATIONS[0])
    mutate = ChatTemplate("{% set x = messages.append(1) %}{{ messages|length }}")
    with pytest.raises(MinidiffError, match="rendering failed"):            # immutable sandbox
        mutate.render(CONVERSATIONS[0])
    with pytest.raises(MinidiffError, match="chat template: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render(CONVERSATIONS[0])
    with pytest.raises(MinidiffError, match="not a valid jinja2 template"):
        ChatTemplate("{% if %}")


def test_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}X"}]}))
    assert ChatTemplate.from_folder(tmp_path).render([]) == "<s>X"
    (tmp_path / "empty").mkdir()
    assert ChatTemplate.from_folder(tmp_path / "empty") is None            # no template: raw prompts
    with pytest.raises(MinidiffError, match="no such folder"):
        ChatTemplate.from_folder(tmp_path / "none")


@pytest.mark.parametrize("text, thought, answer", [
    ("<|channel>thought\nLet me think.<channel|>Paris.", "Let me think.", "Paris."),
    ("Paris.", None, "Paris."),
    ("<|channel>thought\nstill thinking", "still thinking", ""),
    ("<|channel>thought\na\n<channel|>x<|channel>thought\nb<channel|>y", "a\nb", "xy"),
])
def test_split_thoughts(text, thought, answer):
    assert split_thoughts(text) == (thought, answer)


def test_format_reply_hides_or_shows():
    text = "<|channel>thought\nLet me think.<channel|>Paris."
    assert format_reply(text, show_thoughts=False) == "Paris."
    assert format_reply(text, show_thoughts=True) == "[thinking]\nLet me think.\n[/thinking]\nParis."


def test_response_ids_cut_at_the_first_stop():
    assert response_ids([5, 6, 0, 7, 106, 8, 1], {1, 106, 50}, 0) == [5, 6, 7]


def test_render_many_equals_render_one_by_one():
    """Training renders thousands of prompts in one sandboxed process; the texts are those of render()."""
    from minidiff.chat import ChatTemplate
    import minidiff
    tpl = ChatTemplate.from_folder(minidiff.load(None).folder)
    convs = [[{"role": "user", "content": f"prompt {i}"}] for i in range(250)]
    many = tpl.render_many(convs)
    assert len(many) == 250 and many[7] == tpl.render(convs[7]) and many[249] == tpl.render(convs[249])
