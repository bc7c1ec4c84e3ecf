"""The PrefixLM decoder, its configuration and generation."""

from .config import PRESETS, ModelConfig, preset_config
from .generate import BatchKVCache, GenConfig, GenResult, answer, answers, generate, generate_batch
from .model import PrefixLM

__all__ = ["ModelConfig", "PRESETS", "preset_config", "PrefixLM", "BatchKVCache", "GenConfig",
           "GenResult", "generate", "generate_batch", "answer", "answers"]
