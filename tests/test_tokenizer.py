"""The tokenizer wrapper and the embedded default model's tokenizer.json."""

import json

import pytest

import minidiff
from minidiff.errors import MinidiffError
from minidiff.tokenizer import Tokenizer

FOLDER = minidiff.loader.DEFAULT_MODEL
GEMMA4_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool>": 46, "<tool|>": 47,
              "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
              "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106, "\n": 107}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(FOLDER)


def test_special_ids_sit_at_gemma4_ids(tok):
    for s, i in GEMMA4_IDS.items():
        assert tok.encode(s) == [i], s
    assert tok.ids["bos"] == 2 and tok.ids["turn_end"] == 106 and tok.ids["channel_start"] == 100
    assert tok.vocab_size == minidiff.load(None).config.vocab_size == 512


@pytest.mark.parametrize("text", ["Hello world", "the capital of France is Paris.\n", "é ü 😀 日本", "a\tb  c",
                                  "<|turn>user\nHi<turn|>\n"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bos_and_specials(tok):
    assert tok.encode("Hi", add_bos=True)[0] == 2
    assert tok.decode([2, 105] + tok.encode("x"), skip_special_tokens=True) == "x"
    assert tok.piece(105) == "<|turn>" and tok.piece(tok.encode(" the")[0]).startswith(" ")
    byte = tok.encode("é")[0]
    assert tok.token(byte) == "<0xC3>" and tok.piece(byte) == "\\xc3"


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(MinidiffError, match="no tokenizer"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(MinidiffError, match="cannot read the tokenizer"):
        Tokenizer.from_folder(tmp_path)


def test_default_model_folder_is_small_and_documented():
    total = sum(f.stat().st_size for f in FOLDER.iterdir())
    assert total < 2_000_000
    readme = (FOLDER / "README.md").read_text()
    assert "random" in readme and "gibberish" in readme and "minidiff train" in readme
    assert "minidiff's own chat template" in readme           # written for the project, not copied
    assert "trl" not in (FOLDER / "chat_template.jinja").read_text().lower()
    gen = json.loads((FOLDER / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106, 50] and gen["sampler_config"]["entropy_bound"] == 0.1
    assert gen["max_denoising_steps"] == 48 and gen["t_min"] == 0.4 and gen["t_max"] == 0.8
