"""The CLIP tokenizer against transformers.CLIPTokenizer built from the same vocabulary, plus goldens."""
import json
import logging
import os

import pytest
import torch

from composer.tokenizer import BOS, EOS, CLIPTokenizer

AWKWARD = [
    "a photo of a cat",
    "Hello,   World!!  ",
    "it's 2024; pi=3.14159, e≈2.718 — ok?",
    "café naïve résumé 東京 🙂 Ünïcödé",
    "<potter1> <potter2> in hogwarts school uniform",
    "a  \t b\nc\r\n  d",
    "don't stop, we'll see; they've I'm you'd",
    "MiXeD CaSe ALLCAPS",
    "",
    "   ",
    "a&b <b>html</b> &amp; x__y--z",
    "word " * 90,  # > 75 tokens: truncated
    "1234567890" * 10,  # every digit its own token
]


@pytest.fixture(scope="module")
def tok(bpe_path):
    return CLIPTokenizer.from_file(bpe_path)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import CLIPTokenizer as HF
    return HF(os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt"))


def test_vocab_size_and_specials(tok):
    assert len(tok) == 49408
    assert tok.tok.token_to_id("<|startoftext|>") == BOS == 49406
    assert tok.tok.token_to_id("<|endoftext|>") == EOS == 49407
    assert tok.tok.token_to_id("!") == 0


def test_golden_ids(tok):
    # SD1.5 ids, well known from the openai/clip-vit-large-patch14 vocabulary
    ids = tok(["a photo of a cat"])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 49407).all() and ids.shape == (77,)
    assert tok.encode_raw("123") == tok.encode_raw("1") + tok.encode_raw("2") + tok.encode_raw("3")


@pytest.mark.parametrize("prompt", AWKWARD)
def test_matches_transformers(tok, hf_tok, prompt):
    ours = tok([prompt], warn=False)[0]
    ref = hf_tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
    assert ours.tolist() == ref.tolist()


def test_all_sources_agree(bpe_path, tokenizer_dir, tmp_path, hf_tok):
    a = CLIPTokenizer.from_file(bpe_path)
    b = CLIPTokenizer.from_file(tokenizer_dir)
    hf_tok.save_pretrained(str(tmp_path))  # writes tokenizer.json (fast) beside vocab/merges
    tj = tmp_path / "tokenizer.json"
    assert tj.exists()
    c = CLIPTokenizer.from_file(str(tj))
    for t in (b, c):
        assert torch.equal(a(AWKWARD, warn=False), t(AWKWARD, warn=False))


def test_truncation_warns_with_count(tok, caplog):
    with caplog.at_level(logging.WARNING):
        ids = tok(["word " * 80])
    assert ids[0, 76] == EOS and ids[0, 75] != EOS
    assert "the last 5 tokens were dropped" in caplog.text


def test_pseudo_words_stay_whole(bpe_path):
    t = CLIPTokenizer.from_file(bpe_path)
    before = t.encode_raw("a <potter1> <potter2>")
    assert len(before) > 3  # split into <, potter, 1, > ...
    ids = t.add_tokens(["<potter1>", "<potter2>"])
    assert ids == [49408, 49409]
    assert t.encode_raw("a <potter1> <potter2>, hi") == [320, 49408, 49409] + t.encode_raw(", hi")


def test_empty_list_and_bad_types(tok):
    with pytest.raises(ValueError, match="empty prompt list"):
        tok([])
    with pytest.raises(TypeError, match="prompt 1"):
        tok(["ok", 3])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_file(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        CLIPTokenizer.from_file(str(tmp_path))
    (tmp_path / "t.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="not a BPE"):
        CLIPTokenizer.from_file(str(tmp_path / "t.json"))
