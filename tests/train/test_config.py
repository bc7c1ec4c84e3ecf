"""Config tests: YAML + overrides, rejection of unknown keys and wrong types."""

import pytest

from prefixlm.train.config import config_from_dict, load_config, parse_overrides


def test_yaml_then_overrides_and_preset(tmp_path):
    """Guards precedence bugs: defaults < YAML < command line; the preset sets sizes that explicit
    model fields then override."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nlr: 0.01\nmodel:\n  preset: B\n  layers: 3\n")
    cfg = load_config(path, ["lr=2e-4", "model.heads=16", "compile=true"])
    assert (cfg.steps, cfg.lr, cfg.compile) == (7, 2e-4, True)
    assert (cfg.model.preset, cfg.model.layers, cfg.model.hidden, cfg.model.heads) == (
        "B", 3, 1024, 16)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, match", [
    (["stepz=3"], "stepz"),
    (["model.hidenn=3"], "model.hidenn"),
    (["steps=3.5"], "steps"),
    (["lr=fast"], "lr"),
    (["compile=maybe"], "compile"),
    (["model.preset=huge"], "preset"),
    (["steps"], "key=value"),
    (["steps=0"], "steps"),
])
def test_bad_overrides_name_the_key(overrides, match):
    """Guards typos training silently with defaults: unknown keys and wrong types are errors that
    name the key."""
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    """Guards a wrong-typed YAML value or unknown YAML key slipping through."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: [1, 2]\n")
    with pytest.raises(ValueError, match="steps"):
        load_config(path)
    path.write_text("model:\n  depth: 3\n")
    with pytest.raises(ValueError, match=r"model\.depth.*run\.yaml"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_parse_overrides_nests_dotted_keys():
    """Guards dotted keys being taken as top-level names."""
    assert parse_overrides(["a=1", "model.hidden=64", "model.arch=hrm"]) == {
        "a": "1", "model": {"hidden": "64", "arch": "hrm"}}


def test_printed_config_loads_back_as_yaml(tmp_path, capsys):
    """Guards `--print-config` output that `--config` cannot read back (the way users start a
    config file)."""
    from prefixlm.cli import main

    assert main(["train", "--print-config", "model.preset=L", "model.arch=hrm", "steps=5"]) == 0
    path = tmp_path / "run.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path) == load_config(None, ["model.preset=L", "model.arch=hrm", "steps=5"])


@pytest.mark.parametrize("override, message", [
    ("lr=inf", r"lr must be finite and > 0, got inf"),
    ("lr=nan", r"lr must be finite and > 0, got nan"),
    ("lr=-1e-3", r"lr must be finite and > 0"),
    ("min_lr_ratio=-5", r"min_lr_ratio must be in \[0, 1\], got -5"),
    ("min_lr_ratio=1.5", r"min_lr_ratio must be in \[0, 1\]"),
    ("weight_decay=-1", r"weight_decay must be finite and >= 0, got -1"),
    ("grad_clip=-1", r"grad_clip must be finite and >= 0 \(0: no clipping\)"),
    ("grad_clip=inf", r"grad_clip must be finite and >= 0"),
    ("beta1=1", r"beta1 must be in \[0, 1\)"),
    ("beta2=-0.1", r"beta2 must be in \[0, 1\)"),
    ("eps=0", r"eps must be finite and > 0"),
    ("ema_decay=1", r"ema_decay must be in \[0, 1\)"),
    ("peak_tflops=-1", r"peak_tflops must be finite and >= 0"),
    ("ckpt_every=-1", r"ckpt_every must be in \[0, 2\*\*62\) \(0: only at the end\), got -1"),
    ("keep_checkpoints=-1", r"keep_checkpoints must be in \[0, 2\*\*31\) \(0: keep all\)"),
    ("eval_max_samples=-1", r"eval_max_samples must be in \[0, 2\*\*62\)"),
    ("warmup_steps=-1", r"warmup_steps must be in \[0, 2\*\*62\)"),
    ("log_every=0", r"log_every must be in \[1, 2\*\*62\)"),
    ("grad_accum=0", r"grad_accum must be in \[1, 2\*\*31\)"),
    ("capacity=2147483648", r"capacity must be in \[1, 2\*\*31\) \(SeqInfo's offsets are int32\)"),
    ("seed=-1", r"seed must be in \[0, 2\*\*63\)"),
    ("synthetic_train=0", r"synthetic_train must be in \[1, 2\*\*31\)"),
    ("synthetic_eval=-1", r"synthetic_eval must be in \[0, 2\*\*31\)"),
    ("max_threads=-1", r"max_threads must be in \[0, 65536\)"),
    ("model.vocab_size=-1", r"model.vocab_size must be >= 0 \(0: the tokenizer's\)"),
    ("model.hidden=-3", r"model.hidden must be > 0"),
])
def test_out_of_range_numbers_name_the_key_and_the_range(override, message):
    """Guards numbers that passed validation and then trained badly or crashed later (lr=inf
    wrote an all-NaN checkpoint; min_lr_ratio=-5 gave a negative learning rate; weight_decay,
    grad_clip and ckpt_every below 0 were taken silently; capacity=2**31 allocated 48 GiB):
    each is refused when the config is read, naming the key and the allowed range."""
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_boundary_values_are_accepted():
    """Guards over-strict ranges: the documented edge values (0 = off/all, ratio 1) load."""
    cfg = load_config(None, ["min_lr_ratio=1", "weight_decay=0", "grad_clip=0",
                             "ckpt_every=0", "keep_checkpoints=0", "eval_max_samples=0",
                             "warmup_steps=0", "beta1=0", "ema_decay=0", "seed=0",
                             "capacity=2147483647", "synthetic_eval=0"])
    assert cfg.capacity == 2**31 - 1 and cfg.min_lr_ratio == 1
