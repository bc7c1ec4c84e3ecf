"""The user's path end to end: prefixlm train -> generate -> eval -> export (hrm_text), on a tiny
run."""

import json

import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.cli import main

TINY = ["steps=6", "synthetic_train=300", "synthetic_eval=40", "capacity=512", "model.hidden=32",
        "model.heads=2", "model.layers=1", "model.ffn_hidden=64", "progress=false",
        "ckpt_every=3", "log_every=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    assert main(["train", f"run_dir={path}", *TINY]) == 0
    return path


def test_train_writes_config_logs_and_a_self_contained_checkpoint(run_dir, capsys):
    """Guards a run that leaves no usable artefacts: resolved config, JSONL metrics with the
    promised fields, a committed checkpoint carrying its config and tokenizer."""
    step = run_dir / "checkpoints" / "step_00000006"
    assert (step / "COMMIT").is_file() and (step / "config.yaml").is_file()
    assert (step / "tokenizer" / "tokenizer.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "token_acc", "exact_acc", "grad_norm", "lr", "supervised_tokens",
                "tokens_per_s"):
        assert key in train[-1], key
    assert records[-1]["kind"] == "eval" and 0 <= records[-1]["exact_match"] <= 1


def test_existing_run_needs_resume_and_resume_continues(run_dir, capsys):
    """Guards silently overwriting a run, --resume restarting from 0, and a resume with another
    `steps` silently moving the learning-rate schedule under the steps left (refused, unless
    --new-schedule asks for it)."""
    assert main(["train", f"run_dir={run_dir}", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", f"run_dir={run_dir}", *TINY, "steps=8"]) == 2
    err = capsys.readouterr().err
    assert "steps=6 -> 8" in err and "--new-schedule" in err and err.count("\n") == 1
    assert not (run_dir / "checkpoints" / "step_00000007").exists()
    assert main(["train", "--resume", "--new-schedule", f"run_dir={run_dir}", *TINY,
                 "steps=8"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 6" in out and "steps=6 -> 8" in out
    assert "step_00000008" in out


def test_unknown_key_is_a_user_error(tmp_path, capsys):
    """Guards a traceback (or a silent default) for a typo on the command line."""
    assert main(["train", f"run_dir={tmp_path}", "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_generate_with_and_without_cache_agree(run_dir, capsys):
    """Guards the CLI's cached decoding drifting from full recomputation."""
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "reverse abc",
            "--prompt", "sum 123", "--max-new-tokens", "8"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert cached.count("\n") == 2


def test_eval_reports_exact_match(run_dir, capsys):
    """Guards eval not finding the run's held-out split or miscounting samples (all of them, or
    exactly --max-samples)."""
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 40 and 0 <= result["exact_match"] <= 1
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--max-samples", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 7


def test_export_writes_an_hrm_text_directory_transformers_loads(run_dir, tmp_path, capsys):
    """Guards the export a user hands to transformers or vLLM: `prefixlm export` writes an
    hrm_text directory whose model (the checkpoint's EMA weights) gives in transformers the
    checkpoint's logits for a held-out sample with token_type_ids = 1 on its prompt, whose
    tokenizer transformers loads with the prompt markers, and --verify reports the difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixlm.train.checkpoint import load_trained

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: transformers vs prefixlm on 8 samples" in printed
    assert float(printed.split("max |logit difference| ")[1].split()[0]) <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hrm_text" and config["max_position_embeddings"] == 255
    trained, _, tok, _ = load_trained(run_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.encode_prefix("sort 321")
    assert hf_tok("<|inst|>sort 321<|/inst|>", add_special_tokens=False).input_ids == prompt
    ids = prompt + tok.encode_response("123")[:-1]
    info = SeqInfo.from_lengths([len(prompt)], [len(ids) - len(prompt)])
    token_types = torch.tensor([[1] * len(prompt) + [0] * (len(ids) - len(prompt))])
    with torch.no_grad():
        ours = trained(torch.tensor(ids), torch.arange(len(ids)), info)
        theirs = hf_model(input_ids=torch.tensor([ids]), token_type_ids=token_types).logits[0]
    assert (ours - theirs).abs().max() <= 1e-5
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generate_and_eval_read_an_hf_directory(run_dir, tmp_path, capsys):
    """Guards `--checkpoint HF_DIR`: generate and eval on an exported directory give the run's
    own answers and scores."""
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["--prompt", "reverse abc", "--max-new-tokens", "8"]
    assert main(["generate", "--checkpoint", str(run_dir), *args]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), *args]) == 0
    assert capsys.readouterr().out == expected
    heldout = next((run_dir / "data").glob("synthetic-heldout-*.jsonl"))
    scores = []
    for checkpoint in (run_dir, out):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(heldout),
                     "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        scores.append((result["samples"], result["loss"], result["exact_match"]))
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert "pass --data" in capsys.readouterr().err


def test_overrides_on_both_sides_of_an_option(tmp_path, capsys):
    """Guards `train a=1 --print-config b=2` failing in argparse (a positional list stops at the
    first option): both overrides must reach the config; a stray non-override is still an error."""
    assert main(["train", "steps=7", "--print-config", "model.hidden=48"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "hidden: 48" in out
    with pytest.raises(SystemExit):
        main(["train", "steps=7", "--print-config", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_a_run_trained_with_triton_generates_on_the_cpu(tmp_path, capsys):
    """Guards the attention backend being model state: a run pinned to `triton` (here under the
    Triton interpreter) must leave a checkpoint that records no backend and generates on a plain
    CPU with `auto`, while asking for triton there is a one-line error."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    run = tmp_path / "run"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    args = ["train", f"run_dir={run}", "attention_backend=triton", "device=cpu", "steps=2",
            "synthetic_train=60", "synthetic_eval=4", "capacity=256", "context_size=64",
            "model.hidden=64", "model.heads=2", "model.layers=1", "model.ffn_hidden=64",
            "progress=false", "tensorboard=false"]
    done = subprocess.run([sys.executable, "-m", "prefixlm", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = (run / "checkpoints" / "step_00000002" / "config.yaml").read_text()
    assert "attention_backend" not in saved
    assert "attention_backend: triton" in (run / "config.yaml").read_text()  # the run's record
    assert main(["generate", "--checkpoint", str(run), "--prompt", "reverse abc",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x",
                 "--attention-backend", "triton"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


FOREIGN = ["steps=2", "capacity=4096", "model.hidden=32", "model.heads=2", "model.layers=1",
           "model.ffn_hidden=64", "progress=false", "tensorboard=false", "ckpt_every=0",
           "attention_backend=sdpa"]


@pytest.mark.parametrize("which", ["sampled", "sft"])
def test_train_on_foreign_folders_as_they_are(hrm_fixtures, tmp_path, capsys, which):
    """Guards `prefixlm train data=DIR` on HRM-Text's and data_io's output: it stopped with
    `special token inst_begin '<|inst|>' is not in the tokenizer's vocabulary` (and data_io's was
    refused for its total_length). It must train with the dataset's tokenizer, markers and
    conditions, say how many samples the loader skips per epoch, and leave a checkpoint that
    generates with HRM-Text's default condition. Held-out JSONL must be tokenized with the
    dataset's tokenizer and markers, not the byte tokenizer."""
    run = tmp_path / "run"
    held_out = f"eval_data={hrm_fixtures['sft_input']}"  # JSONL: tokenized as the dataset was
    assert main(["train", f"data={hrm_fixtures[which]}", f"run_dir={run}", held_out,
                 *FOREIGN]) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "of 3 samples" in out
    from prefixlm.data import V1Dataset
    (held_out_dir,) = (run / "data").glob("heldout-*")
    assert V1Dataset(held_out_dir).tokenizer().eoa_id == V1Dataset(hrm_fixtures[which]) \
        .tokenizer().eoa_id
    skipped = "2 (epoch 0: 1, epoch 1: 1)" if which == "sampled" else "none"
    assert f"fewer than min_causal=1 causal tokens: {skipped}" in out
    assert "conditions direct, cot, noisy, synth" in out
    ckpt = run / "checkpoints" / "step_00000002"
    from prefixlm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(ckpt / "tokenizer"))
    assert tok.vocab_size == 400 and tok.default_condition == "direct"
    assert tok.encode_prefix("hi")[:2] == [tok.inst_begin_id, tok.condition_ids["direct"]]
    assert main(["generate", "--checkpoint", str(run), "--prompt", "What is two plus two?",
                 "--max-new-tokens", "2"]) == 0


def _one_error_line(err: str, command: str) -> str:
    """The single `prefixlm COMMAND: error: ...` line that is all of `err`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prefixlm {command}: error: "), err
    return lines[0]


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    """Guards a confusing error about a data/ subfolder when run_dir names a file: the line says
    run_dir is a file, and the file is left alone."""
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert main(["train", f"run_dir={path}", *TINY]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"run_dir {path} is a file, not a directory" in line
    assert path.read_text() == "keep me"


def _make_read_only(path):
    import os
    import subprocess

    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    # root ignores modes: the immutable attribute stops it.
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a directory read-only as root here: {done.stderr!r}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_run_dir_is_one_line(tmp_path, capsys):
    """Guards a traceback when run_dir cannot be written: one line naming the path inside it,
    exit 2."""
    run = tmp_path / "run"
    run.mkdir()
    undo = _make_read_only(run)
    try:
        assert main(["train", f"run_dir={run}", *TINY]) == 2
    finally:
        undo()
    line = _one_error_line(capsys.readouterr().err, "train")
    assert str(run) in line and ("not permitted" in line or "denied" in line), line


def _no_space(*args, **kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["shard", "rank file", "commit"])
def test_disk_full_during_a_checkpoint_save_is_one_line(tmp_path, capsys, monkeypatch, where):
    """Guards a DCP CheckpointException traceback (a BaseException no handler catches) when the
    disk fills during a save: one line naming the checkpoint being written and what to do, exit
    2, the half-written folder removed (it holds the space) and the previous checkpoint intact."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from prefixlm.train import checkpoint as ckpt

    args = ["train", f"run_dir={tmp_path}", *TINY, "steps=6", "ckpt_every=3"]
    if where == "shard":
        real = dcp_fs._write_item
        monkeypatch.setattr(dcp_fs, "_write_item", lambda *a, **k: (
            _no_space() if "step_00000006" in str(a[1].name) else real(*a, **k)))
    else:
        real_write = ckpt.write_bytes
        name = "COMMIT" if where == "commit" else "rank00000.pt"

        def write_bytes(path, data):
            if "step_00000006" in str(path) and path.name == name:
                _no_space()
            real_write(path, data)

        monkeypatch.setattr(ckpt, "write_bytes", write_bytes)
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    root = tmp_path / "checkpoints"
    assert f"No space left on device: {root / '.tmp-step_00000006'}" in line, line
    assert "free some space" in line
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert ckpt.verify(root / "step_00000003") is None


@pytest.mark.parametrize("flag, value, match", [
    ("--temperature", "nan", "temperature must be finite and >= 0"),
    ("--temperature", "-1", "temperature must be finite and >= 0"),
    ("--temperature", "inf", "temperature must be finite and >= 0"),
    ("--top-p", "0", r"top_p must be in \(0, 1\]"),
    ("--top-p", "1.5", r"top_p must be in \(0, 1\]"),
    ("--top-p", "nan", r"top_p must be in \(0, 1\]"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
])
def test_out_of_range_generation_arguments_are_one_line(run_dir, capsys, flag, value, match):
    """Guards torch's RuntimeError tracebacks from sampling with NaN temperature or top_p 0 (an
    empty nucleus), and silent empty output for --max-new-tokens 0."""
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "sum 12", "--temperature",
            "0.7", flag, value]
    assert main(args) == 2
    import re

    assert re.search(match, _one_error_line(capsys.readouterr().err, "generate"))


def test_export_to_a_file_is_refused(run_dir, tmp_path, capsys):
    """Guards export writing into (or failing deep inside) a path that is a file, with or
    without --overwrite: one line saying so, the file untouched."""
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(target), *extra]) == 2
        line = _one_error_line(capsys.readouterr().err, "export")
        assert f"output {target} is a file" in line
    assert target.read_text() == "keep me"


def test_export_overwrite_replaces_only_an_earlier_export(run_dir, tmp_path, capsys):
    """Guards `export --overwrite` deleting whatever folder --out names (a project folder, say):
    only an earlier hrm_text export is replaced; any other non-empty folder is refused, kept."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(project),
                 "--overwrite"]) == 2
    assert "is not an hrm_text export" in _one_error_line(capsys.readouterr().err, "export")
    assert (project / "notes.txt").read_text() == "keep me"
    out = tmp_path / "export"
    for _ in range(2):  # the second replaces the first
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(out),
                     "--overwrite"]) == 0
    assert (out / "config.json").is_file()


def test_eval_max_samples_negative_is_refused(run_dir, capsys):
    """Guards `--max-samples -1` evaluating an arbitrary subset (26 of 50 samples) and reporting
    it as the result."""
    assert main(["eval", "--checkpoint", str(run_dir), "--max-samples", "-1"]) == 2
    assert "--max-samples must be >= 0 (0: every sample), got -1" in _one_error_line(
        capsys.readouterr().err, "eval")


def test_corrupt_config_in_a_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    """Guards a YAML traceback from eval/generate/export on a checkpoint whose config.yaml is
    damaged: one line naming the checkpoint and the file."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    step = sorted((copy / "checkpoints").glob("step_*"))[-1]
    (step / "config.yaml").write_text("{{{ not yaml")
    for command in (["eval"], ["generate", "--prompt", "x"], ["export", "--out",
                                                              str(tmp_path / "out")]):
        assert main([command[0], "--checkpoint", str(copy), *command[1:]]) == 2
        line = _one_error_line(capsys.readouterr().err, command[0])
        assert f"checkpoint {step} is not usable: file config.yaml" in line, line
