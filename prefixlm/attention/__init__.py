"""PrefixLM attention over packed varlen batches: metadata, the mask, backends and the public op."""

from .api import decode_attention, prefixlm_attention, prepare_attention
from .reference import reference_attention
from .registry import AUTO_ORDER, AttentionInputs, backend_names, resolve_backend
from .seqinfo import BatchMeta, SeqInfo

__all__ = ["SeqInfo", "BatchMeta", "AttentionInputs", "prefixlm_attention", "prepare_attention",
           "decode_attention", "reference_attention", "backend_names", "resolve_backend",
           "AUTO_ORDER"]
