"""The `hrm_text` directory format (`model.hrm_text`): config mapping, weights and their errors."""

import dataclasses
import json

import pytest
import torch
from transformers import HrmTextConfig

from prefixlm.model import PrefixLM, hrm_text, preset_config
from prefixlm.model.hrm_text import FormatError, config_from_hf, config_to_hf


def _hf_config(**fields):
    config = HrmTextConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, head_dim=16, **fields)
    return config.to_dict()


def test_defaults_for_absent_fields_are_transformers_own():
    """Guards a config.json that leaves fields out (head_dim above all, whose default 128 has
    nothing to do with hidden / heads): prefixlm fills them as HrmTextConfig does."""
    defaults = HrmTextConfig()
    for name, value in hrm_text.HF_DEFAULTS.items():
        # (num_hidden_layers is rewritten to the cache slots; the given value is kept per stack)
        special = {"rope_theta": defaults.rope_parameters["rope_theta"],
                   "num_hidden_layers": defaults.num_layers_per_stack}
        expected = special[name] if name in special else getattr(defaults, name)
        assert expected == value or (name == "embedding_scale" and value is None), name
    assert config_from_hf({"model_type": "hrm_text"}).attn_head_dim == 128


@pytest.mark.parametrize("overrides", [
    dict(arch="hrm", H_cycles=2, L_cycles=3, bp_max_steps=4, bp_warmup_ratio=0.1),
    dict(arch="hrm", H_cycles=3, L_cycles=0, layers=4, head_dim=8, embedding_scale=3.5),
    dict(arch="transformer", layers=5, rope_theta=5e5, norm_eps=1e-5, ffn_hidden=200)])
def test_config_round_trips(overrides):
    """Guards the config mapping both ways: every field prefixlm computes with (per-stack layers
    under half_layers, cycles, head dim, widths, scale, RoPE theta, eps, the bp warm-up) comes
    back equal from the config.json it writes, which transformers reads to the same shapes."""
    cfg = preset_config("tiny", vocab_size=97, **overrides).validate()
    written = config_to_hf(cfg)
    back = config_from_hf(json.loads(json.dumps(written)))
    derived = ("arch", "layers_per_stack", "hidden", "heads", "attn_head_dim", "ffn_dim", "scale",
               "cycles", "rope_theta", "norm_eps", "vocab_size")
    assert {k: getattr(back, k) for k in derived} == {k: getattr(cfg, k) for k in derived}
    if cfg.arch == "hrm":
        assert (back.bp_min_steps, back.bp_max_steps, back.bp_warmup_ratio) == (
            cfg.bp_min_steps, cfg.bp_max_steps, cfg.bp_warmup_ratio)
    theirs = HrmTextConfig(**{k: v for k, v in written.items() if k != "architectures"})
    assert (theirs.num_layers_per_stack, theirs.head_dim, theirs.embedding_scale) == (
        cfg.layers_per_stack, cfg.attn_head_dim, cfg.scale)


def test_legacy_config_counts_layers_per_stack():
    """Guards a config without num_layers_per_stack (what HRM-Text's converter writes): its
    num_hidden_layers is the per-stack count, as transformers reads it."""
    config = _hf_config(H_cycles=2, L_cycles=2)
    del config["num_layers_per_stack"]
    config["num_hidden_layers"] = 3
    assert config_from_hf(config).layers_per_stack == 3
    assert config_from_hf(_hf_config(H_cycles=2, L_cycles=2)).layers_per_stack == 2


def test_bp_routing_written_for_transformers_training():
    """Guards L_bp_cycles: HRM-Text's bp_steps = 5 with H2/L3 is transformers' [0, 3] (every H call
    and the three L calls of the last cycle); a budget that leaves an H call out has no
    transformers equivalent and is not written."""
    cfg = preset_config("tiny", vocab_size=10, arch="hrm")
    assert config_to_hf(cfg)["L_bp_cycles"] == [0, 3]
    assert config_to_hf(dataclasses.replace(cfg, L_cycles=2))["L_bp_cycles"] == [1, 2]
    assert "L_bp_cycles" not in config_to_hf(dataclasses.replace(cfg, bp_max_steps=2))


@pytest.mark.parametrize("field,value", [("model_type", "llama"), ("hidden_act", "gelu"),
                                         ("tie_word_embeddings", True), ("prefix_lm", False),
                                         ("rope_parameters", {"rope_type": "linear"}),
                                         ("head_dim", 15), ("num_attention_heads", "four")])
def test_unmappable_config_is_an_error_naming_the_field(field, value):
    """Guards loading a model prefixlm does not compute (it would give other logits silently)."""
    config = _hf_config()
    config[field] = value
    with pytest.raises(FormatError, match=field.split("_parameters")[0]):
        config_from_hf(config, "dir/config.json")


def _model_dir(tmp_path, **overrides):
    torch.manual_seed(0)
    model = PrefixLM(preset_config("tiny", vocab_size=67, hidden=32, heads=2, arch="hrm",
                                   **overrides))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(model.cfg)))
    hrm_text.write_weights(hrm_text.export_state_dict(model), tmp_path)
    return model


def test_wrong_or_missing_weight_is_an_error_naming_it(tmp_path):
    """Guards a checkpoint that does not fit its config: the error names the weight, its shape
    and the shape the config gives; a config that counts HRM-Text's total layers as per-stack
    gets told which num_layers_per_stack the weights hold."""
    _model_dir(tmp_path, layers=4)
    state = hrm_text.read_weights(tmp_path)
    name = "model.L_module.layers.1.attn.gqkv_proj.weight"
    state[name] = state[name][:-2]
    hrm_text.write_weights(state, tmp_path)
    with pytest.raises(FormatError, match=rf"{name} has shape \(126, 32\), the config gives "
                                          rf"\(128, 32\)"):
        hrm_text.load_model(tmp_path)
    _model_dir(tmp_path)  # 1 layer per stack
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers_per_stack"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"missing weights model.H_module.layers.1.*set "
                                          r"num_layers_per_stack to 1"):
        hrm_text.load_model(tmp_path)


def test_loaded_model_equals_the_saved_one(tmp_path):
    """Guards the weights' copy (every tensor, z_L_init included, in the model's dtype)."""
    model = _model_dir(tmp_path)
    loaded = hrm_text.load_model(tmp_path)
    assert not loaded.training and loaded.lm_head.weight.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
