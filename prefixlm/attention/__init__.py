"""PrefixLM attention over packed varlen batches: metadata, backends and the public op."""

from .api import prefixlm_attention, prepare_attention
from .reference import reference_attention
from .registry import AUTO_ORDER, backend_names, resolve_backend
from .seqinfo import BatchMeta, SeqInfo

__all__ = ["SeqInfo", "BatchMeta", "prefixlm_attention", "prepare_attention",
           "reference_attention", "backend_names", "resolve_backend", "AUTO_ORDER"]
