"""prefixlm: train language models on packed PrefixLM sequences."""

from .attention import SeqInfo, prefixlm_attention

__version__ = "0.1.0"
__all__ = ["SeqInfo", "prefixlm_attention", "__version__"]
