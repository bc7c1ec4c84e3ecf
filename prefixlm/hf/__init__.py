"""Interoperability with Hugging Face transformers' `hrm_text` (HRM-Text's published models).

Importing this package registers `attn_implementation="prefixlm"` with transformers: packed
PrefixLM batches for `HrmTextForCausalLM` (`packed_batch`, `shift_labels`, `attention`).
`load_pretrained` / `save_pretrained` read and write the `hrm_text` directory (`pretrained`;
the format itself is `prefixlm.model.hrm_text`), `verify_export` compares an exported directory
in transformers against prefixlm.
"""

from __future__ import annotations

from ..extras import require


def _transformers():
    return require("transformers", "hf", "prefixlm.hf (Hugging Face interop)")


from . import attention  # noqa: E402
from .attention import NAME as ATTENTION_NAME  # noqa: E402
from .batch import packed_batch, shift_labels  # noqa: E402
from .pretrained import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from .verify import verify_export  # noqa: E402

attention.register(_transformers())

__all__ = ["ATTENTION_NAME", "load_pretrained", "load_tokenizer", "save_pretrained",
           "packed_batch", "shift_labels", "verify_export"]
