"""A prefixlm tokenizer as files `AutoTokenizer.from_pretrained` loads, with the same ids.

A HuggingFace `tokenizer.json` is written as it is (re-serialized by `tokenizers`). prefixlm's byte
tokenizer becomes a byte-level BPE without merges: each UTF-8 byte is one token whose id is the
byte (0..255), the special and condition tokens follow with the byte tokenizer's ids. In both,
tokenizer_config.json marks the prefix start as bos_token and the end of answer as eos_token (as
HRM-Text's converter does), pad as pad_token and the other markers as extra special tokens, and
`model.hrm_text.tokenizer_info` goes next to them. One difference remains: transformers turns a
special token's text found inside a string into that token, where the byte tokenizer encodes the
text's bytes.
"""

from __future__ import annotations

from pathlib import Path

from ..model.hrm_text import TOKENIZER_INFO_FILE, tokenizer_info
from ..fsutil import write_json

__all__ = ["byte_level_tokenizer", "save_tokenizer"]


def _byte_symbols() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other
    bytes for the code points from 256 up, in byte order. `tokenizers`' ByteLevel pre-tokenizer
    and decoder use the same table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def byte_level_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` equivalent to a prefixlm `ByteTokenizer`."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    out = tokenizers.Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out.decoder = decoders.ByteLevel()
    for token_id in range(256, tokenizer.vocab_size):  # added tokens take the next free id
        out.add_special_tokens([AddedToken(tokenizer.token_name(token_id), special=True,
                                           normalized=False)])
        if out.token_to_id(tokenizer.token_name(token_id)) != token_id:
            raise ValueError(f"special token {tokenizer.token_name(token_id)!r} did not get id "
                             f"{token_id} in the byte-level tokenizer")
    return out


def save_tokenizer(tokenizer, directory, transformers) -> None:
    """tokenizer.json, tokenizer_config.json and tokenizer_info.json of a prefixlm tokenizer."""
    import tokenizers

    if tokenizer.kind == "byte":
        backend = byte_level_tokenizer(tokenizer)
    else:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer.path))
    special = tokenizer.special_tokens
    extra = [t for t in (special["inst_end"], *tokenizer.conditions.values()) if t is not None]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special["inst_begin"], eos_token=special["eoa"],
        pad_token=special["pad"], extra_special_tokens=extra)
    fast.save_pretrained(str(directory))
    write_json(Path(directory) / TOKENIZER_INFO_FILE, tokenizer_info(tokenizer))
