"""The PrefixLM decoder, its configuration and generation."""

from .config import PRESETS, ModelConfig, preset_config
from .generate import KVCache, answer, generate
from .model import PrefixLM

__all__ = ["ModelConfig", "PRESETS", "preset_config", "PrefixLM", "KVCache", "generate", "answer"]
