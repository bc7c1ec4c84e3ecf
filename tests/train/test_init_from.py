"""`init_from=`: a run's first weights from an hrm_text directory or a prefixlm checkpoint, and
checkpoints of the previous architecture failing clearly."""

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

import prefixlm.hf as phf
from hfhelpers import random_hf_model
from prefixlm.data.tokenizer import ByteTokenizer
from prefixlm.model import PrefixLM
from prefixlm.train import checkpoint as ckpt
from prefixlm.train.run import run_training
from prefixlm.train.trainer import Trainer
from trainhelpers import CPU, ListLoader, small_config, trainer_on

# The HF source below: hrm, H2/L2, 1 layer per stack of hidden 64 (4 heads of 16, ffn 96).
HF_MODEL = ["model.arch=hrm", "model.layers=2", "model.hidden=64", "model.heads=4",
            "model.H_cycles=2", "model.L_cycles=2", "model.ffn_hidden=96", "model.head_dim=16",
            "model.vocab_size=0", "model.embedding_scale=20.0"]


def _hf_source(tmp_path):
    """An hrm_text directory with a byte tokenizer that has a condition (vocab 261)."""
    hf_model = random_hf_model(2, 2, per_stack=1, vocab=261)
    hf_model.save_pretrained(tmp_path / "hf")
    source = phf.load_pretrained(tmp_path / "hf")
    return source, phf.save_pretrained(source, tmp_path / "export",
                                       ByteTokenizer(conditions=["cot"]))


def test_init_from_an_hf_directory_starts_from_its_weights(tmp_path):
    """Guards init_from with a Hugging Face directory: the trainer's model starts with the
    directory's weights (z_L_init included) and its optimizer is fresh."""
    source, export = _hf_source(tmp_path)
    cfg = small_config(tmp_path / "run", "steps=1", f"init_from={export}", *HF_MODEL)
    cfg.model.vocab_size = 261
    trainer = Trainer(cfg, CPU, ListLoader([], 256))
    for name, tensor in source.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    assert trainer.step == 0 and not trainer.optimizer.state


def test_init_from_shape_mismatch_names_the_settings(tmp_path):
    """Guards a configured model the source's weights do not fit: the error lists what differs
    and the model.* settings that match the source, before any data is prepared."""
    _, export = _hf_source(tmp_path)
    cfg = small_config(tmp_path / "run", "steps=1", f"init_from={export}", "model.arch=hrm",
                       "model.layers=2")
    with pytest.raises(ValueError, match=r"hidden \(32 vs 64\).*set model\.hidden=64 "
                                         r"model\.heads=4"):
        run_training(cfg)
    assert not (tmp_path / "run" / "data").exists()


def test_train_from_an_hf_directory_uses_its_tokenizer(tmp_path, capsys):
    """Guards the run side of init_from: data is tokenized with the directory's tokenizer (its
    condition token and ids), the checkpoint carries that tokenizer with its markers, and the
    run trains from the directory's weights."""
    _, export = _hf_source(tmp_path)
    cfg = small_config(tmp_path / "run", "steps=2", "ckpt_every=0", "synthetic_train=200",
                       "synthetic_eval=10", f"init_from={export}", *HF_MODEL)
    result = run_training(cfg)
    assert "initialized from" in capsys.readouterr().out
    info = json.loads((result["checkpoint"] / "tokenizer" / "tokenizer_info.json").read_text())
    assert info["condition_mapping"] == {"cot": "<|cond:cot|>"} and info["vocab_size"] == 261
    _, _, tokenizer, _ = ckpt.load_trained(tmp_path / "run")
    assert tokenizer.condition_ids == {"cot": 260}


def test_init_from_a_checkpoint_takes_its_ema_weights(tmp_path, prepared_dir):
    """Guards init_from with a prefixlm run: the new run's model starts from the run's EMA
    weights (weights only: step 0, empty optimizer state)."""
    first = trainer_on(small_config(tmp_path / "a", "steps=3", "ckpt_every=0"), prepared_dir)
    first.fit()
    second = trainer_on(small_config(tmp_path / "b", "steps=3", f"init_from={tmp_path / 'a'}"),
                        prepared_dir)
    for name, param in second.model.named_parameters():
        assert torch.equal(param, first.ema.shadow[name]), name
    assert second.step == 0 and not second.optimizer.state


def _old_architecture_checkpoint(path):
    """A committed checkpoint as the architecture before the HRM-Text model wrote it."""
    with warnings.catch_warnings():  # "assuming ... a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": {"embed.weight": torch.zeros(260, 32),
                            "blocks.0.attn.qkvg.weight": torch.zeros(136, 32)},
                  "step": torch.tensor(5)}, checkpoint_id=str(path), no_dist=True)
    model = {"preset": "tiny", "arch": "transformer", "vocab_size": 260, "layers": 1,
             "hidden": 32, "heads": 2, "kv_heads": 0, "ffn_hidden": 64, "rope_theta": 10000.0,
             "norm_eps": 1e-5, "tie_embeddings": False, "init_std": 0.02, "H_layers": 0,
             "L_layers": 0, "H_cycles": 2, "L_cycles": 2, "grad_cycles": 1}
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "steps": 5}))
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    (path / ckpt.COMMIT).write_text(json.dumps({"step": 5, "world_size": 1, "files": files}))


def test_checkpoint_of_the_previous_architecture_fails_clearly(tmp_path):
    """Guards a size-mismatch traceback deep in DCP for checkpoints written before the HRM-Text
    model: loading one (for generate/eval/export, or its weights into a model) says why."""
    path = tmp_path / "checkpoints" / "step_00000005"
    path.mkdir(parents=True)
    _old_architecture_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="before the HRM-Text model"):
        ckpt.load_trained(tmp_path)
    model = PrefixLM(small_config(tmp_path, "model.vocab_size=260").model)
    with pytest.raises(ckpt.CheckpointError, match="before the HRM-Text model"):
        ckpt.load_model_weights(path, model)
