"""Run configuration: a dataclass read from one YAML file plus `key=value` overrides.

Unknown keys and values of the wrong type are rejected with the key named, so a typo never trains
silently with a default. Model fields live under `model.` (e.g. `model.hidden=256`); `model.preset`
picks the base sizes that the other model fields then override.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..model.config import PRESETS, ModelConfig, preset_config

__all__ = ["TrainConfig", "load_config", "parse_overrides", "save_config", "config_from_dict",
           "RUNTIME_KEYS"]

RUNTIME_KEYS = ("attention_backend", "activation_checkpointing")

# The SeqInfo offsets the kernels read are int32.
MAX_CAPACITY = 2**31
# (key, lowest allowed, first not allowed)
_INT_RANGES = (
    ("capacity", 1, MAX_CAPACITY), ("grad_accum", 1, 2**31), ("steps", 1, 2**62),
    ("context_size", 1, MAX_CAPACITY), ("warmup_steps", 0, 2**62), ("log_every", 1, 2**62),
    ("ckpt_every", 0, 2**62), ("keep_checkpoints", 0, 2**31), ("eval_max_samples", 0, 2**62),
    ("synthetic_train", 1, 2**31), ("synthetic_eval", 0, 2**31), ("seed", 0, 2**63),
    ("max_threads", 0, 2**16), ("fsdp_blocks_per_unit", 1, 2**31), ("min_causal", 0, 2**31),
    ("eval_every", 0, 2**62), ("eval_task_limit", 0, 2**62), ("eval_task_max_new_tokens", 0, 2**31),
    ("eval_task_batch_size", 1, 2**31),
)
# key: (allowed, test). `v < math.inf` rejects inf, and NaN fails every comparison.
_FLOAT_RULES = {
    "lr": ("finite and > 0", lambda v: 0 < v < math.inf),
    "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "weight_decay": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "eps": ("finite and > 0", lambda v: 0 < v < math.inf),
    "grad_clip": ("finite and >= 0", lambda v: 0 <= v < math.inf),
    "ema_decay": ("in [0, 1)", lambda v: 0 <= v < 1),
    "peak_tflops": ("finite and >= 0", lambda v: 0 <= v < math.inf),
}
_MEANING = {
    "ckpt_every": " (0: only at the end)", "keep_checkpoints": " (0: keep all)",
    "eval_max_samples": " (0: the whole held-out split)", "max_threads": " (0: automatic)",
    "grad_clip": " (0: no clipping)", "ema_decay": " (0: no EMA)",
    "peak_tflops": " (0: known GPUs only)", "capacity": " (SeqInfo's offsets are int32)",
    "eval_every": " (0: once, at the end)", "eval_task_limit": " (0: all rows)",
    "eval_task_max_new_tokens": " (0: the presets' budgets)",
}


def _bound(value: int) -> str:
    """2**31 rather than 2147483648 in messages."""
    exponent = value.bit_length() - 1
    return f"2**{exponent}" if value == 2**exponent and exponent > 16 else str(value)


@dataclass
class TrainConfig:
    """Everything one training run reads. Defaults are the CPU quick start (`prefixlm train`)."""

    model: ModelConfig = field(default_factory=lambda: preset_config("tiny"))
    run_dir: str = "runs/default"
    # Which attention backend the layers call: a run-time choice, not saved with the weights
    # (`prefixlm.attention.backend_names()`; generate/eval/export pick their own).
    attention_backend: str = "auto"
    # Data: "" trains on the built-in synthetic task; else a JSONL file or a prepared dataset dir
    # (ours, HRM-Text's SFT output or data_io's sampled output).
    data: str = ""
    eval_data: str = ""          # JSONL or prepared dir; "" with synthetic data: its held-out split
    # "": byte for JSONL data (with init_from: its tokenizer), the dataset's own for a prepared dir
    # (as its tokenizer_info names it). Else "byte", a tokenizer.json or a tokenizer folder; for a
    # prepared dir it replaces the tokenizer file only (markers and conditions are the dataset's).
    tokenizer: str = ""
    # Start from these weights (an hrm_text directory or a prefixlm run/checkpoint): weights only,
    # a fresh optimizer; the configured model must have their shapes.
    init_from: str = ""
    context_size: int = 256      # longest sample prepare_sft keeps (inst_len + resp_len)
    min_causal: int = 1          # the loader skips samples with fewer causal tokens (and says so)
    synthetic_train: int = 20000
    synthetic_eval: int = 500
    capacity: int = 2048         # tokens per micro-batch per rank
    grad_accum: int = 1
    steps: int = 900
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.99      # 0 disables the EMA
    use_ema: bool = True         # eval / export read the EMA weights when there are any
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda
    dtype: str = "auto"          # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    log_every: int = 1           # JSONL/TensorBoard record every N steps (rates over the window)
    ckpt_every: int = 100        # 0: only at the end
    keep_checkpoints: int = 3
    eval_max_samples: int = 0    # 0: the whole held-out split
    progress: bool = True
    tensorboard: bool = True     # when the tensorboard package is installed
    peak_tflops: float = 0.0     # per device, for MFU; 0: known GPUs only
    # CPU threads per process. 0: one thread for small models on CPU (their matmuls are too small to
    # split, and spinning OpenMP threads slow down badly on a busy machine), else torch's default.
    max_threads: int = 0
    # FSDP2 (torchrun): consecutive blocks per sharding unit. Each unit costs the host a pre-forward
    # hook and collective launches, so units of one block leave a multi-GPU forward waiting on the
    # host (BENCHMARKS.md, "Training, 2 GPUs", measures the unit size).
    fsdp_blocks_per_unit: int = 6
    # Evaluation during training: every `eval_every` steps (0: once, at the end) the held-out
    # loss, token accuracy and exact match, and the `eval_tasks` (as `prefixlm eval --tasks`,
    # comma-separated: PRESET=FILE or TASK.yaml) scored with generated answers.
    eval_every: int = 0
    eval_tasks: str = ""
    eval_task_limit: int = 0           # rows per task (0: all)
    eval_task_max_new_tokens: int = 0  # a cap on the presets' budgets (0: HRM-Text's, up to
                                       # max_context; one token for MCQ)
    eval_task_condition: str = "preset"  # condition tokens for every task, "none", or "preset"
    eval_task_batch_size: int = 32     # prompts decoded together
    # Keep the checkpoint with the best evaluation in checkpoints/best (never rotated away):
    # eval/loss, eval/exact_match, eval/TASK/METRIC, ...; mode auto: min for losses, else max.
    best_metric: str = ""
    best_mode: str = "auto"
    # Weights & Biases (rank 0; pip install 'prefixlm[wandb]'). mode "": wandb's default
    # (WANDB_MODE, else online); offline writes run files under run_dir/wandb for `wandb sync`.
    wandb: bool = False
    wandb_project: str = "prefixlm"
    wandb_name: str = ""               # "": the run directory's name
    wandb_entity: str = ""
    wandb_mode: str = ""
    # Recompute activations in the backward instead of keeping them: none | blocks (every block
    # call) | cycles (every differentiated HRM cycle). A run-time choice, not saved with weights.
    activation_checkpointing: str = "none"

    def validate(self) -> "TrainConfig":
        """Every numeric key within its range (the error names the key and the range), the
        choices among their names, and the model's own checks, before any work starts."""
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if not low <= value < high:
                meaning = _MEANING.get(name, "")
                raise ValueError(f"{name} must be in [{low}, {_bound(high)}){meaning}, got {value}")
        for name, (allowed, ok) in _FLOAT_RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {allowed}{_MEANING.get(name, '')}, got {value}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        from ..attention import backend_names  # here: reading a config needs no torch or triton

        if self.attention_backend not in backend_names():
            raise ValueError(f"attention_backend must be one of {', '.join(backend_names())}, "
                             f"got {self.attention_backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.best_mode not in ("auto", "min", "max"):
            raise ValueError(f"best_mode must be auto, min or max, got {self.best_mode!r}")
        if self.best_metric and not self.best_metric.startswith("eval/"):
            raise ValueError(f"best_metric names an evaluation metric, eval/KEY (eval/loss, "
                             f"eval/TASK/acc, ...), got {self.best_metric!r}")
        if self.wandb_mode not in ("", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be online, offline or disabled, got "
                             f"{self.wandb_mode!r}")
        if self.activation_checkpointing not in ("none", "blocks", "cycles"):
            raise ValueError(f"activation_checkpointing must be none, blocks or cycles, got "
                             f"{self.activation_checkpointing!r}")
        if self.activation_checkpointing == "cycles" and self.model.arch != "hrm":
            raise ValueError("activation_checkpointing=cycles checkpoints HRM's recurrence "
                             "steps: it needs model.arch=hrm (use blocks)")
        # A sample of n tokens feeds n - 1 (the last is only predicted): context 4097 at
        # capacity 4096 is HRM-Text's own setting. A prepared dataset brings its own lengths
        # (the loader checks each sample against the capacity).
        if self.context_size - 1 > self.capacity and not (self.data and Path(self.data).is_dir()):
            raise ValueError(f"context_size - 1 ({self.context_size - 1}, the tokens a longest "
                             f"sample feeds) must fit in capacity ({self.capacity})")
        if self.model.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0: the tokenizer's), got "
                             f"{self.model.vocab_size}")
        # The model's checks now rather than after the data is prepared (vocab_size 0 is filled
        # in from the tokenizer later).
        dataclasses.replace(self.model, vocab_size=self.model.vocab_size or 1).validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_saved_dict(self) -> dict:
        """What a checkpoint records: every key but the run-time choices (RUNTIME_KEYS), which
        whoever loads the weights makes again."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}


def _convert(key: str, value, kind):
    """`value` as `kind` (bool, int, float, str), or ValueError naming `key`."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{key}: expected a bool (true/false), got {value!r}")
        try:
            return kind(text)  # int("3.5") and float("fast") fail, as they should
        except ValueError:
            raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(target, values: dict, prefix: str, source: str):
    types = _field_types(type(target))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in types:
            raise ValueError(f"unknown config key {name!r} in {source}; known keys: "
                             f"{', '.join(prefix + k for k in types)}")
        kind = types[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping in {source}, got {value!r}")
            _apply(getattr(target, key), value, f"{name}.", source)
        else:
            setattr(target, key, _convert(name, value, kind))


def parse_overrides(items: list[str]) -> dict:
    """['a=1', 'model.hidden=64'] -> {'a': '1', 'model': {'hidden': '64'}} (values stay text)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None
                ) -> TrainConfig:
    """Defaults <- YAML file <- overrides. The model preset is resolved first, then its fields."""
    from_file: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}

    preset = "tiny"
    for source in (from_file, overrides):
        model = source.get("model")
        if isinstance(model, dict) and "preset" in model:
            preset = str(model["preset"])
    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; choose one of "
                         f"{sorted(PRESETS)}")
    cfg = TrainConfig(model=preset_config(preset))
    _apply(cfg, from_file, "", str(path))
    _apply(cfg, overrides, "", "the command line")
    return cfg.validate()


def save_config(cfg: TrainConfig, path: str | Path, runtime: bool = True):
    """The config as YAML; `runtime=False` leaves out RUNTIME_KEYS (checkpoints)."""
    values = cfg.to_dict() if runtime else cfg.to_saved_dict()
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def config_from_dict(values: dict) -> TrainConfig:
    """The config saved next to a checkpoint, read back exactly (no preset re-resolution)."""
    values = dict(values)
    model = ModelConfig.from_dict(values.pop("model"))
    cfg = TrainConfig(model=model)
    _apply(cfg, values, "", "the saved config")
    return cfg
