"""Data layer: rows -> prepared V1 dataset -> multipack sampler -> packed batches with SeqInfo."""

from .dataset import EpochIndex, V1Dataset
from .loader import IGNORE_INDEX, Batch, PackedLoader, assemble_batch, supervised_rows
from .mixture import prepare_mixture
from .prepare import prepare_sft
from .sampler import MultipackSampler, PackPlan, attention_cost
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["V1Dataset", "EpochIndex", "Batch", "PackedLoader", "assemble_batch", "supervised_rows",
           "IGNORE_INDEX", "prepare_sft", "prepare_mixture", "MultipackSampler", "PackPlan",
           "attention_cost", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]
