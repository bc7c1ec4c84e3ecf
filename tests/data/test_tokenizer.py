"""Tokenizers: byte and HuggingFace, rendering of prefix and response, special-token errors."""

import pytest

from datahelpers import train_bpe
from prefixlm.data.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_roundtrip_unicode():
    """Guards byte encoding/decoding of multi-byte UTF-8 (a str/bytes mix-up garbles non-ASCII)."""
    tok = load_tokenizer("byte")
    text = "héllo 数据 🙂 \x00 tab\t"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 260 and max(tok.special_ids().values()) < tok.vocab_size


def test_byte_prefix_and_response_rendering():
    """Guards the documented template: [begin][cond] text [end] / text [eoa]."""
    tok = ByteTokenizer(conditions=["math"])
    cond = tok.condition_ids["math"]
    assert tok.encode_prefix("ab", "math") == [tok.inst_begin_id, cond, 97, 98, tok.inst_end_id]
    assert tok.encode_response("c") == [99, tok.eoa_id]
    assert tok.decode(tok.encode_prefix("ab")) == "<|inst|>ab<|/inst|>"
    with pytest.raises(ValueError, match="unknown condition 'code'"):
        tok.encode_prefix("x", "code")


def test_comma_separated_conditions_are_one_token_each():
    """Guards HRM-Text's multi-tag conditions: its evaluation renders "synth,cot" as two
    condition tokens in that order (data_io writes "cot,noisy" the same way); one token for the
    whole string, a reordering, or a silently dropped unknown tag would change the prompt."""
    tok = ByteTokenizer(conditions=["synth", "cot", "direct"])
    ids = tok.condition_ids
    assert tok.prefix_head("synth,cot") == [tok.inst_begin_id, ids["synth"], ids["cot"]]
    assert tok.prefix_head("cot,synth") == [tok.inst_begin_id, ids["cot"], ids["synth"]]
    # None is the default condition (HRM-Text's `direct`, declared here); "" is none at all.
    assert tok.prefix_head(None) == [tok.inst_begin_id, ids["direct"]]
    assert tok.prefix_head("") == [tok.inst_begin_id]
    with pytest.raises(ValueError, match="unknown tag 'noisy'"):
        tok.prefix_head("synth,noisy")
    with pytest.raises(ValueError, match="an empty tag"):
        tok.prefix_head("synth,,cot")
    with pytest.raises(ValueError, match="unknown tag ' synth'"):
        tok.prefix_head("cot, synth")  # no trimming, as data_io splits


def test_markers_can_be_disabled_but_eoa_cannot():
    """Guards configurable specials: inst markers optional, eoa required (a response needs an end)."""
    tok = ByteTokenizer({"inst_begin": None, "inst_end": None})
    assert tok.encode_prefix("ab") == [97, 98]
    with pytest.raises(ValueError, match="'eoa' is required"):
        ByteTokenizer({"eoa": None})
    with pytest.raises(ValueError, match="unknown special token role 'bos'"):
        ByteTokenizer({"bos": "<s>"})


def test_hf_tokenizer_missing_special_is_named(tmp_path):
    """Guards the error for a tokenizer.json lacking a configured special token: it must name it."""
    path = train_bpe(tmp_path / "tokenizer.json", ["hello world"] * 10,
                     specials=("<|inst|>", "<|/inst|>", "<|pad|>"))
    with pytest.raises(ValueError, match=r"special token eoa '<\|eoa\|>' is not in"):
        load_tokenizer(str(path))
    tok = load_tokenizer(str(path), special_tokens={"eoa": "<|pad|>"})
    assert tok.eoa_id == tok.pad_id
    with pytest.raises(ValueError, match="condition token for 'x'"):
        load_tokenizer(str(path), special_tokens={"eoa": "<|pad|>"}, conditions=["x"])


def test_hf_tokenizer_encodes_without_added_specials(tmp_path):
    """Guards against the post-processor adding BOS/EOS inside encode() (would corrupt the layout)."""
    path = train_bpe(tmp_path / "tokenizer.json", ["hello world, hello there"] * 20)
    tok = load_tokenizer(str(path))
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    assert tok.eoa_id not in ids and tok.inst_begin_id not in ids
    flat, lens = tok.encode_batch(["hello", "", "world"])
    assert lens.tolist()[1] == 0 and len(flat) == lens.sum()


def test_unknown_spec_is_a_clear_error(tmp_path):
    """Guards the message for a tokenizer path that does not exist."""
    with pytest.raises(FileNotFoundError, match="expected 'byte'"):
        load_tokenizer(str(tmp_path / "nope.json"))
