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
