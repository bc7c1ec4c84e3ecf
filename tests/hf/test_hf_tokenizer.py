"""Tokenizers in an exported directory: `AutoTokenizer` gets prefixlm's ids and markers, and
prefixlm reads the markers back."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

import prefixlm.hf as phf
from prefixlm.data.tokenizer import ByteTokenizer, HFTokenizer
from prefixlm.model import PrefixLM, preset_config

TEXTS = ["hello world", "  two  spaces ", "héllo ✓ 日本語 🙂", "\n\ttabs\r\n", "", "\x00\x7f\xff"]


def _export(tmp_path, tokenizer):
    model = PrefixLM(preset_config("tiny", vocab_size=tokenizer.vocab_size, hidden=32, heads=2))
    return phf.save_pretrained(model, tmp_path / "export", tokenizer)


def test_byte_tokenizer_export_encodes_and_decodes_as_prefixlm(tmp_path):
    """Guards the byte tokenizer's transformers twin: ids 0..255 are the UTF-8 bytes, the special
    and condition tokens keep their ids, text (unicode, controls, NUL) encodes to the same ids,
    any id sequence (invalid UTF-8 included) decodes to the same string, and a prompt written as
    text with its markers gives encode_prefix's ids."""
    ours = ByteTokenizer(conditions=["cot", "direct"])
    theirs = AutoTokenizer.from_pretrained(_export(tmp_path, ours))
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text), text
    rendered = ours.encode_prefix("reverse abc", "direct") + ours.encode_response("cba")
    for ids in (rendered, [0xE6, 0x97, 65, 0xFF, 66, 0xC3], list(range(256)), [258, 0x80, 256]):
        assert theirs.decode(ids) == ours.decode(ids)
    prompt = "<|inst|><|cond:direct|>reverse abc<|/inst|>"
    assert theirs(prompt, add_special_tokens=False).input_ids == ours.encode_prefix(
        "reverse abc", "direct")
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.inst_begin_id, ours.eoa_id, ours.pad_id)
    assert len(theirs) == ours.vocab_size


def test_exported_tokenizer_reads_back_with_its_markers(tmp_path):
    """Guards the markers' sidecar (tokenizer_info.json): prefixlm reads an export's tokenizer
    with the same special tokens, conditions and ids (byte and HF tokenizers alike)."""
    byte = ByteTokenizer({"inst_end": "<|end|>"}, conditions={"cot": "<|c|>"})
    back = phf.load_tokenizer(_export(tmp_path / "b", byte))
    assert back.info() == byte.info()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<|eoa|>": 3, "<|cot|>": 4, "a": 5, "b": 6,
             "[UNK]": 7}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    hf_tok = HFTokenizer(tmp_path / "tokenizer.json",
                         {"inst_begin": "<s>", "inst_end": "</s>", "eoa": "<|eoa|>",
                          "pad": "<pad>"}, conditions={"cot": "<|cot|>"})
    out = _export(tmp_path / "h", hf_tok)
    back = phf.load_tokenizer(out)
    assert back.info() == hf_tok.info()
    assert back.encode_prefix("a b", "cot") == hf_tok.encode_prefix("a b", "cot") == [0, 4, 5, 6, 1]
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs("<s> <|cot|> a b </s>", add_special_tokens=False).input_ids == [0, 4, 5, 6, 1]
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 3, 2)


def test_directory_without_markers_uses_bos_and_eos_with_a_warning(tmp_path, capsys):
    """Guards a downloaded HF directory (no tokenizer_info.json): its bos_token starts prompts and
    its eos_token ends answers, as HRM-Text's converter sets them, and the user is told that no
    token ends the prefix and how to say which one does."""
    out = _export(tmp_path, ByteTokenizer())
    (out / "tokenizer_info.json").unlink()
    tok = phf.load_tokenizer(out)
    assert "no tokenizer_info.json" in capsys.readouterr().err
    assert tok.inst_begin_id == 257 and tok.eoa_id == 259 and tok.inst_end_id is None
    with pytest.raises(ValueError, match="eos_token"):
        (out / "tokenizer_config.json").write_text("{}")
        phf.load_tokenizer(out)
