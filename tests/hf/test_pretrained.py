"""`prefixlm.hf.load_pretrained` / `save_pretrained` against transformers' own `hrm_text` (CPU,
fp32): the logits of both libraries on the same weights, in both directions."""

import json
import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import prefixlm.hf as phf
from hfhelpers import hf_per_sample_logits, max_diff_per_sample, packed_inputs, random_hf_model
from prefixlm.model import PrefixLM, generate, hrm_text, preset_config

# (H_cycles, L_cycles, layers per stack, head_dim, vocab): H1/L0 is the transformer; head dims
# other than hidden / heads = 16; vocabularies that are no multiple of anything.
HF_CONFIGS = [(2, 2, 2, 16, 101), (2, 3, 1, 32, 257), (1, 0, 2, 16, 99), (1, 1, 1, 24, 131),
              (3, 1, 1, 8, 77)]
TOLERANCE = 1e-5


@pytest.mark.parametrize("H,L,per_stack,head_dim,vocab", HF_CONFIGS)
def test_loaded_hf_model_gives_transformers_logits_packed(tmp_path, H, L, per_stack, head_dim,
                                                          vocab):
    """Guards the import mapping (config fields, the fused gate|q|k|v order, the L/H loop, the
    stacks' final norms, the embedding scale, z_L_init, the prefix convention): a random HF
    hrm_text model loaded into prefixlm gives, on one packed row, each sample's logits as
    transformers computes them alone with token_type_ids = 1 on its prefix."""
    hf_model = random_hf_model(H, L, per_stack, head_dim, vocab)
    hf_model.save_pretrained(tmp_path)
    model = phf.load_pretrained(tmp_path, backend="sdpa")
    assert not model.training
    assert model.cfg.arch == ("transformer" if (H, L) == (1, 0) else "hrm")
    ids, positions, info, samples = packed_inputs(vocab)
    with torch.no_grad():
        packed = model(ids, positions, info)
        references = hf_per_sample_logits(hf_model, ids, samples)
    assert max_diff_per_sample(packed, references, samples) <= TOLERANCE
    assert max(r.abs().max().item() for r in references) > 3  # not a trivially small model


PREFIXLM_CONFIGS = [dict(arch="hrm", H_cycles=2, L_cycles=3, vocab_size=261),
                    dict(arch="hrm", H_cycles=1, L_cycles=2, layers=4, head_dim=8, vocab_size=97),
                    dict(arch="transformer", layers=3, vocab_size=300, ffn_hidden=200)]


@pytest.mark.parametrize("overrides", PREFIXLM_CONFIGS)
def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    """Guards the export mapping: AutoModelForCausalLM loads what save_pretrained writes with no
    missing, unexpected or resized weight (the transformer's unused L stack included), and its
    per-sample logits equal prefixlm's packed ones; transformers' own save of it loads back into
    prefixlm unchanged (the layout round-trips)."""
    torch.manual_seed(1)
    model = PrefixLM(preset_config("tiny", hidden=64, heads=4, **overrides), backend="sdpa")
    with torch.no_grad():
        model.model.z_L_init.normal_()
    out = phf.save_pretrained(model, tmp_path / "export")
    hf_model, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys",
                                            "mismatched_keys")), loading
    ids, positions, info, samples = packed_inputs(model.cfg.vocab_size, seed=2)
    with torch.no_grad():
        packed = model(ids, positions, info)
        references = hf_per_sample_logits(hf_model.eval(), ids, samples)
    assert max_diff_per_sample(packed, references, samples) <= TOLERANCE
    hf_model.save_pretrained(tmp_path / "resaved")
    again = phf.load_pretrained(tmp_path / "resaved", backend="sdpa")
    assert again.cfg.cycles == model.cfg.cycles and again.cfg.scale == model.cfg.scale
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_gqa_model_is_exported_as_mha_with_equal_logits(tmp_path):
    """Guards the GQA -> MHA expansion (hrm_text has no GQA): repeating every K/V head for its
    query group computes the same attention, so transformers' logits equal prefixlm's; the
    export warns that it changed the weights' shape."""
    torch.manual_seed(2)
    model = PrefixLM(preset_config("tiny", vocab_size=131, hidden=64, heads=4, kv_heads=2,
                                   arch="hrm"), backend="sdpa")
    with pytest.warns(UserWarning, match="K/V heads are repeated"):
        out = phf.save_pretrained(model, tmp_path / "gqa")
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, positions, info, samples = packed_inputs(131, seed=3)
    with torch.no_grad():
        packed = model(ids, positions, info)
        references = hf_per_sample_logits(hf_model, ids, samples)
    assert max_diff_per_sample(packed, references, samples) <= TOLERANCE
    assert phf.load_pretrained(out).cfg.num_kv_heads == 4


@pytest.mark.parametrize("H,L", [(2, 3), (1, 0)])
def test_greedy_generation_equals_transformers_generate(tmp_path, H, L):
    """Guards the KV cache per stack call and layer (entry order = transformers' cache slots):
    prefixlm's cached greedy decoding gives transformers' `generate` tokens when the prompt is
    the bidirectional prefix (token_type_ids = 1), as HRM-Text's engine and vLLM run it."""
    hf_model = random_hf_model(H, L, per_stack=2, vocab=89, seed=4)
    hf_model.save_pretrained(tmp_path)
    model = phf.load_pretrained(tmp_path, backend="sdpa")
    prompt = [5, 17, 3, 44, 8, 61, 2]
    ours = generate(model, prompt, max_new_tokens=10)
    ids = torch.tensor([prompt])
    theirs = hf_model.generate(ids, token_type_ids=torch.ones_like(ids), max_new_tokens=10,
                               min_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()
    assert len(set(ours)) > 1


def test_sharded_weights_round_trip(tmp_path):
    """Guards sharded checkpoints (how large models are stored): a save split into several
    safetensors files with an index loads in transformers and back into prefixlm unchanged."""
    torch.manual_seed(3)
    model = PrefixLM(preset_config("tiny", vocab_size=77, hidden=32, heads=2, arch="hrm"))
    out = phf.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / hrm_text.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / hrm_text.WEIGHTS_FILE).exists()
    again = phf.load_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf_model.lm_head.weight, model.lm_head.weight)


def test_bf16_export_loads_as_bf16(tmp_path):
    """Guards the dtype option: a bf16 export stores bf16 tensors and says so in config.json, so
    transformers' dtype="auto" loads it in bf16; prefixlm reads it back in fp32 (exact)."""
    torch.manual_seed(4)
    model = PrefixLM(preset_config("tiny", vocab_size=77, hidden=32, heads=2))
    out = phf.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).lm_head.weight.dtype == torch.bfloat16
    again = phf.load_pretrained(out)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight.bfloat16().float())


def test_a_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    """Guards half-written exports: a save that fails midway (here: writing the weights) leaves
    neither the target nor a temporary sibling behind, and an existing export is not replaced
    without overwrite."""
    model = PrefixLM(preset_config("tiny", vocab_size=77, hidden=32, heads=2))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hrm_text, "write_weights", fail)
    with pytest.raises(OSError):
        phf.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    phf.save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match="already exists"):
        phf.save_pretrained(model, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phf.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_export_is_readable_by_the_users_umask(tmp_path):
    """Guards exports made in a mkdtemp folder: renamed into place, the directory kept mode 0700,
    so a server running under another account (vLLM, a shared model store) could not read it. The
    folder gets the umask's mode, also when an export is replaced."""
    model = PrefixLM(preset_config("tiny", vocab_size=77, hidden=32, heads=2))
    old = os.umask(0o022)
    try:
        for overwrite in (False, True):
            out = phf.save_pretrained(model, tmp_path / "shared", overwrite=overwrite)
            assert out.stat().st_mode & 0o777 == 0o755, oct(out.stat().st_mode)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]
