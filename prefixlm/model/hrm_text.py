"""The `hrm_text` directory (transformers 5.23's HrmTextForCausalLM, vLLM's hrm_text): its
config.json <-> `ModelConfig`, its safetensors weights (sharded or not) and its tokenizer sidecar.

`PrefixLM.state_dict()` keys are the on-disk names, so reading is a checked copy and writing a
copy plus two conversions `hrm_text` needs: K/V heads repeated to MHA (it has no GQA), and for the
transformer an all-zero L stack (H_cycles=1, L_cycles=0 never calls it, but the layout has one).

config.json: `num_layers_per_stack` is the blocks per stack and `num_hidden_layers` the number of
attention calls per forward (transformers' cache slots); a config without `num_layers_per_stack`
is a legacy one whose `num_hidden_layers` is per stack. prefixlm also writes `bp_min_steps`,
`bp_max_steps` and `bp_warmup_ratio` (transformers keeps them and ignores them) so that the bp
warm-up survives a round trip. `token_type_ids == 1` marks the bidirectional prefix.

tokenizer_info.json (next to the tokenizer files) names the prompt's markers with HRM-Text's keys:
`boq` (prefix start), `eoq` (prefix end), `eoa` (end of answer), `condition_mapping`, plus `pad`
and `kind` ("byte": prefixlm's byte tokenizer, rebuilt exactly).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch

from ..extras import require
from .config import ModelConfig

__all__ = ["FormatError", "is_hrm_text_dir", "read_config", "config_from_hf", "config_to_hf",
           "export_state_dict", "read_weights", "write_weights", "load_weights", "load_model",
           "read_tokenizer", "tokenizer_info", "HF_DEFAULTS"]

MODEL_TYPE = "hrm_text"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_INFO_FILE = "tokenizer_info.json"

# HrmTextConfig's defaults in transformers 5.23, for the fields a config.json leaves out
# (tests/model/test_hrm_text.py checks them against transformers itself).
HF_DEFAULTS = {
    "vocab_size": 151808, "hidden_size": 1536, "intermediate_size": 4096,
    "num_hidden_layers": 16, "num_attention_heads": 12, "head_dim": 128, "hidden_act": "silu",
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "H_cycles": 2,
    "L_cycles": 3, "embedding_scale": None, "prefix_lm": True, "rope_theta": 10000.0,
}
BP_KEYS = ("bp_min_steps", "bp_max_steps", "bp_warmup_ratio")


class FormatError(ValueError):
    """A directory or config that is not a usable `hrm_text` model; the message names the file and
    the field or weight."""


def _safetensors():
    return require("safetensors.torch", "hf", "reading and writing hrm_text weights")


def is_hrm_text_dir(path) -> bool:
    """Whether `path` is a directory with an `hrm_text` config.json."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (ValueError, AttributeError):
        return False


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a Hugging Face model "
                                f"directory)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return config


# -- config.json <-> ModelConfig -------------------------------------------------------------------
def _field(config: dict, name: str, kind, source: str):
    value = config.get(name, HF_DEFAULTS.get(name))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def _require(ok: bool, source: str, name: str, value, why: str):
    if not ok:
        raise FormatError(f"{source}: {name} = {value!r} cannot be mapped to prefixlm's model: "
                          f"{why}")


def config_from_hf(config: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """The `ModelConfig` of an `hrm_text` config.json (a dict); FormatError naming the field for
    anything prefixlm's model does not compute."""
    model_type = config.get("model_type")
    _require(model_type == MODEL_TYPE, source, "model_type", model_type, f"expected "
             f"{MODEL_TYPE!r}")
    for name, expected, why in (
            ("hidden_act", "silu", "the MLP is SwiGLU (silu)"),
            ("tie_word_embeddings", False, "the LM head is a separate matrix"),
            ("attention_bias", False, "the projections have no bias"),
            ("mlp_bias", False, "the projections have no bias"),
            ("prefix_lm", True, "the model attends the prefix bidirectionally")):
        value = config.get(name, HF_DEFAULTS[name])
        _require(value == expected, source, name, value, f"only {expected!r} is supported ({why})")
    rope = config.get("rope_parameters") or {}
    _require(isinstance(rope, dict), source, "rope_parameters", rope, "expected a mapping")
    rope_type = rope.get("rope_type", "default")
    _require(rope_type == "default", source, "rope_parameters.rope_type", rope_type,
             "only the default RoPE is supported")
    theta = rope.get("rope_theta", config.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    _require(isinstance(theta, (int, float)) and theta > 0, source, "rope_theta", theta,
             "expected a positive number")
    dropout = config.get("attention_dropout", 0.0) or 0.0
    if dropout:
        warnings.warn(f"{source}: attention_dropout = {dropout} is ignored (prefixlm's model has "
                      f"no dropout; it only applies to training in transformers)", stacklevel=2)

    per_stack = config.get("num_layers_per_stack")
    if per_stack is None:  # a legacy config: num_hidden_layers is the per-stack count
        per_stack = _field(config, "num_hidden_layers", int, source)
    _require(isinstance(per_stack, int) and per_stack > 0, source, "num_layers_per_stack",
             per_stack, "expected an int > 0")
    H, L = _field(config, "H_cycles", int, source), _field(config, "L_cycles", int, source)
    _require(H >= 1, source, "H_cycles", H, "expected >= 1")
    _require(L >= 0, source, "L_cycles", L, "expected >= 0")
    hidden = _field(config, "hidden_size", int, source)
    heads = _field(config, "num_attention_heads", int, source)
    head_dim = _field(config, "head_dim", int, source)
    _require(head_dim > 0 and head_dim % 2 == 0, source, "head_dim", head_dim,
             "RoPE needs an even head_dim > 0")
    scale = config.get("embedding_scale")
    if scale is None:
        scale = 1.0 / _field(config, "initializer_range", float, source)
    _require(isinstance(scale, (int, float)) and scale > 0, source, "embedding_scale", scale,
             "expected a positive number")
    transformer = (H, L) == (1, 0)
    values = dict(
        preset="custom", arch="transformer" if transformer else "hrm",
        vocab_size=_field(config, "vocab_size", int, source),
        layers=per_stack if transformer else 2 * per_stack, half_layers=True,
        hidden=hidden, heads=heads, kv_heads=0, head_dim=head_dim,
        ffn_hidden=_field(config, "intermediate_size", int, source),
        rope_theta=float(theta), norm_eps=_field(config, "rms_norm_eps", float, source),
        embedding_scale=float(scale))
    if not transformer:
        values.update(H_cycles=H, L_cycles=L)
        for name in BP_KEYS:
            if name in config:
                values[name] = config[name]
    try:
        return ModelConfig.from_dict(values).validate()
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{source}: {exc}") from None


def _L_bp_cycles(cfg: ModelConfig) -> list[int] | None:
    """transformers' training-time gradient routing (`L_bp_cycles`) for HRM-Text's bp_max_steps,
    or None where it has none: transformers differentiates every H call, so only a budget that
    covers all H calls (bp_max_steps - 1 >= H_cycles) is representable."""
    H, L = cfg.cycles
    if cfg.arch != "hrm" or cfg.bp_max_steps - 1 < H:
        return None
    remaining, per_cycle = cfg.bp_max_steps - H, []
    for _ in range(H):  # the last L calls first
        per_cycle.insert(0, min(L, remaining))
        remaining -= per_cycle[0]
    return per_cycle


def config_to_hf(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 max_position_embeddings: int = 4096, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The `hrm_text` config.json of `cfg` (K/V heads as MHA: see `export_state_dict`)."""
    H, L = cfg.cycles
    n = cfg.layers_per_stack
    config = {
        "architectures": ["HrmTextForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_dim, "num_layers_per_stack": n,
        "num_hidden_layers": n * H * (L + 1), "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads, "head_dim": cfg.attn_head_dim, "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": 1.0 / math.sqrt(cfg.hidden), "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "H_cycles": H, "L_cycles": L,
        "embedding_scale": cfg.scale, "prefix_lm": True, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    routing = _L_bp_cycles(cfg)
    if routing is not None:
        config["L_bp_cycles"] = routing
    if cfg.arch == "hrm":
        config.update({name: getattr(cfg, name) for name in BP_KEYS})
    return config


# -- weights ---------------------------------------------------------------------------------------
def export_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`model`'s weights in the `hrm_text` layout, contiguous CPU tensors in `dtype` (None: as they
    are). GQA is expanded to MHA (query head h reads K/V head h // group, so repeating every K/V
    head group times computes the same function), with a warning: `hrm_text` has no GQA."""
    cfg = model.cfg
    state = {name: t.detach() for name, t in model.state_dict().items()}
    heads, kv_heads, head_dim = cfg.heads, cfg.num_kv_heads, cfg.attn_head_dim
    if kv_heads != heads:
        warnings.warn(f"exporting to hrm_text (MHA only): the {kv_heads} K/V heads are repeated to "
                      f"{heads}, which computes the same attention with larger gqkv_proj "
                      f"weights", stacklevel=2)
        group = heads // kv_heads
        for name in [n for n in state if n.endswith("attn.gqkv_proj.weight")]:
            gate, q, k, v = state[name].split([heads * head_dim, heads * head_dim,
                                               kv_heads * head_dim, kv_heads * head_dim])
            k, v = (t.reshape(kv_heads, head_dim, -1).repeat_interleave(group, 0)
                    .reshape(heads * head_dim, -1) for t in (k, v))
            state[name] = torch.cat([gate, q, k, v])
    if cfg.arch == "transformer":
        for name in [n for n in state if n.startswith("model.H_module.")]:
            state[name.replace("model.H_module.", "model.L_module.", 1)] = torch.zeros_like(
                state[name])
    return {name: t.to(dtype=dtype or t.dtype, device="cpu").contiguous()
            for name, t in state.items()}


def read_weights(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's `model.safetensors`, or of the shards its
    `model.safetensors.index.json` names."""
    directory = Path(directory)
    load_file = _safetensors().load_file
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{index}: not a safetensors index (no weight_map): {exc}") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            path = directory / shard
            if not path.is_file():
                raise FormatError(f"{index} names the shard {shard}, which is missing")
            state.update(load_file(str(path)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise FormatError(f"{index}: weights {', '.join(missing[:4])} are not in their shards")
        return state
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise FormatError(f"{directory}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    return load_file(str(single))


def write_weights(state: dict[str, torch.Tensor], directory, max_shard_bytes: int = 50 * 2**30
                  ) -> list[str]:
    """`state` as `model.safetensors`, or as shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own) with `model.safetensors.index.json`. Returns the files."""
    save_file = _safetensors().save_file
    directory = Path(directory)
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return [*names, INDEX_FILE]


def load_weights(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` (hrm_text names) into `model`, or FormatError naming the weight and the shape
    the model expects. The transformer ignores the L stack that `hrm_text` stores (never called)."""
    expected = model.state_dict()
    if model.cfg.arch == "transformer":
        state = {k: v for k, v in state.items() if not k.startswith("model.L_module.")}
    missing = [k for k in expected if k not in state]
    if missing:
        shapes = ", ".join(f"{k} {tuple(expected[k].shape)}" for k in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = ""
        stack_layers = model.cfg.layers_per_stack
        if all(".layers." in k for k in missing) and stack_layers % 2 == 0 and all(
                int(k.split(".layers.")[1].split(".")[0]) >= stack_layers // 2 for k in missing):
            hint = (f" (the weights hold {stack_layers // 2} layers per stack: a config whose "
                    f"num_hidden_layers is HRM-Text's total instead of the per-stack count; set "
                    f"num_layers_per_stack to {stack_layers // 2})")
        raise FormatError(f"{source}: missing weights {shapes}{more}{hint}")
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise FormatError(f"{source}: weights {', '.join(unexpected[:3])} do not belong to the "
                          f"model its config describes ({len(unexpected)} in all)")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise FormatError(f"{source}: weight {name} has shape {tuple(state[name].shape)}, the "
                              f"config gives {tuple(tensor.shape)}")
    model.load_state_dict(state)


def load_model(directory, device="cpu", backend: str = "auto",
               dtype: torch.dtype = torch.float32):
    """The PrefixLM (eval mode, parameters in `dtype`) of an `hrm_text` directory."""
    from .model import PrefixLM

    directory = Path(directory)
    cfg = config_from_hf(read_config(directory), str(directory / CONFIG_FILE))
    with torch.device("meta"):
        model = PrefixLM(cfg, backend=backend)
    model = model.to_empty(device="cpu")
    load_weights(model, read_weights(directory), str(directory))
    return model.to(device=device, dtype=dtype).eval()


# -- tokenizer -------------------------------------------------------------------------------------
def tokenizer_info(tokenizer) -> dict:
    """The tokenizer_info.json of a prefixlm tokenizer (HRM-Text's keys, plus pad and kind)."""
    special = tokenizer.special_tokens
    return {"tokenizer_path": ".", "boq": special["inst_begin"], "eoq": special["inst_end"],
            "eoa": special["eoa"], "pad": special["pad"],
            "condition_mapping": dict(tokenizer.conditions), "vocab_size": tokenizer.vocab_size,
            "kind": tokenizer.kind}


def _token(value):
    """A tokenizer_config.json token entry: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(directory):
    """The prefixlm tokenizer of a model directory, or None when it has no tokenizer.json.

    The markers come from tokenizer_info.json; without one, from tokenizer_config.json (bos_token
    starts the prefix and eos_token ends the answer, as HRM-Text's converter sets them) with a
    warning, since nothing there says which token ends the prefix."""
    from ..data.tokenizer import ByteTokenizer, HFTokenizer

    directory = Path(directory)
    tok_file = directory / "tokenizer.json"
    info_file = directory / TOKENIZER_INFO_FILE
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
            specials = {"inst_begin": info["boq"], "inst_end": info["eoq"], "eoa": info["eoa"],
                        "pad": info.get("pad") or info["eoa"]}
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{info_file}: expected boq, eoq and eoa: {exc}") from None
        conditions = info.get("condition_mapping") or {}
        if info.get("kind") == "byte":
            return ByteTokenizer(specials, conditions)
        if not tok_file.is_file():
            raise FormatError(f"{directory}: {TOKENIZER_INFO_FILE} without tokenizer.json")
        return HFTokenizer(tok_file, specials, conditions)
    if not tok_file.is_file():
        return None
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    bos, eos = _token(config.get("bos_token")), _token(config.get("eos_token"))
    if eos is None:
        raise FormatError(f"{directory}: neither {TOKENIZER_INFO_FILE} nor an eos_token in "
                          f"tokenizer_config.json says which token ends an answer")
    pad = _token(config.get("pad_token")) or eos
    print(f"prefixlm: warning: {directory} has no {TOKENIZER_INFO_FILE}: prompts start with "
          f"{bos!r} and answers end with {eos!r} (tokenizer_config.json), and no token ends the "
          f"prefix; write {TOKENIZER_INFO_FILE} with boq, eoq, eoa (and condition_mapping) to "
          f"render prompts as the model was trained", file=sys.stderr)
    return HFTokenizer(tok_file, {"inst_begin": bos, "inst_end": None, "eoa": eos, "pad": pad})
