"""A run end to end (run_training): the prepared-data cache and the data a run is given, the
held-out subset, the capacity check, kill -9 mid-save and the leftovers it leaves, contradictory
flags."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from datahelpers import random_rows, train_bpe, write_jsonl
from prefixlm.cli import main
from prefixlm.data import V1Dataset
from prefixlm.train import checkpoint as ckpt
from prefixlm.train.config import load_config
from prefixlm.train.run import RunError, check_capacity_fits, eval_batches_from, prepared_dataset
from trainhelpers import CPU, small_config


def test_cache_key_follows_contents_not_paths(tmp_path):
    """Guards stale prepared data: the cache key was the tokenizer's path and the JSONL's
    size + mtime, so replacing tokenizer.json at the same path, or an edit that keeps size and
    mtime, silently reused the old copy. Content hashes decide; unchanged inputs reuse it."""
    pytest.importorskip("tokenizers")
    rows = random_rows(20)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    train_bpe(tok, [r["instruction"] + r["response"] for r in rows])
    cfg = load_config(None, [f"tokenizer={tok}", "context_size=4097", "capacity=4096"])
    work = tmp_path / "work"
    first = prepared_dataset(src, work, cfg, CPU, "train")
    assert prepared_dataset(src, work, cfg, CPU, "train") == first

    stat = src.stat()
    text = src.read_text()
    src.write_text(text.replace("alpha", "gamma", 1) if "alpha" in text else text.upper())
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    edited = prepared_dataset(src, work, cfg, CPU, "train")
    assert edited != first

    shutil.copy(tok, tmp_path / "old.json")
    train_bpe(tok, [r["response"] for r in rows], vocab_size=280)  # same path, new tokenizer
    retokenized = prepared_dataset(src, work, cfg, CPU, "train")
    assert retokenized not in (first, edited)
    shutil.copy(tmp_path / "old.json", tok)
    assert prepared_dataset(src, work, cfg, CPU, "train") == edited

TINY = ["synthetic_train=200", "synthetic_eval=20", "capacity=512", "model.hidden=32",
        "model.heads=2", "model.layers=1", "model.ffn_hidden=64", "progress=false",
        "tensorboard=false"]


def _samples_and_tokens(batches):
    samples = sum(b.info.num_samples for b in batches)
    tokens = sum(int((b.labels != -100).sum()) for b in batches)
    return samples, tokens


def test_eval_subset_is_exactly_the_first_n_samples(tmp_path, prepared_dir):
    """Guards the held-out subset: max_samples N must evaluate exactly the first N samples
    (cutting a batch at any point, including at a batch boundary), all of them when N is
    larger, and a negative N is refused (it once evaluated an arbitrary subset)."""
    cfg = small_config(tmp_path, "capacity=256")
    dataset = V1Dataset(str(prepared_dir))
    full = eval_batches_from(dataset, cfg, torch.device("cpu"))()
    per_batch = [b.info.num_samples for b in full]
    total = sum(per_batch)
    assert len(full) > 2 and total > 40
    # The labels of the first n samples of the whole pass, in order.
    sample_tokens = [int((b.labels[s:e] != -100).sum()) for b in full
                     for s, e in zip(b.info.cu_seqlens[:-1].tolist()[:b.info.num_samples],
                                     b.info.cu_seqlens[1:].tolist()[:b.info.num_samples])]
    for n in (1, per_batch[0], per_batch[0] + 1, total - 1, total, total + 7):
        batches = eval_batches_from(dataset, cfg, torch.device("cpu"), n)()
        assert _samples_and_tokens(batches) == (min(n, total), sum(sample_tokens[:n])), n
    with pytest.raises(ValueError, match="max_samples must be an int >= 0"):
        eval_batches_from(dataset, cfg, torch.device("cpu"), -1)


def test_capacity_beyond_memory_fails_fast(tmp_path, capsys):
    """Guards `capacity` values that pass the int32 bound but cannot fit any machine: SeqInfo's
    slot arrays alone took 48 GiB before any check; the run now refuses it at once, saying how
    much it needs and what to lower."""
    cfg = small_config(tmp_path, "capacity=2147483647")
    with pytest.raises(RunError, match=r"capacity=2147483647 needs at least .* GiB on cpu"):
        check_capacity_fits(cfg, torch.device("cpu"))
    check_capacity_fits(small_config(tmp_path), torch.device("cpu"))
    assert main(["train", f"run_dir={tmp_path}", *TINY, "capacity=2147483647"]) == 2
    assert "lower capacity" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


KILL_AT_COMMIT = textwrap.dedent("""
    import os, signal, sys
    from prefixlm.train import checkpoint
    real = checkpoint.write_bytes
    def write_bytes(path, data):
        if path.name == "COMMIT" and "step_00000004" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: shards written, no commit
        real(path, data)
    checkpoint.write_bytes = write_bytes
    from prefixlm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_a_save_loses_nothing_and_the_next_run_cleans_up(tmp_path, capsys):
    """Guards what must keep holding when a run is killed mid-save (kill -9 after the shards,
    before the commit): the resumed run starts from the newest complete checkpoint, and the
    temporary folder of the killed save is removed by the next run instead of staying."""
    args = ["train", f"run_dir={tmp_path}", *TINY, "steps=6", "ckpt_every=2"]
    done = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT, *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    # Saving every 3 steps now: no save of step 4 happens to overwrite the leftover.
    assert main([args[0], "--resume", *args[1:], "ckpt_every=3"]) == 0
    assert f"resumed from {root / 'step_00000002'}" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003",
                                                      "step_00000006"]
    assert all(ckpt.verify(p) is None for p in root.iterdir())


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    """Guards `--overwrite --resume` silently deleting the run it was asked to continue."""
    assert main(["train", "--overwrite", "--resume", f"run_dir={tmp_path}", *TINY]) == 2
    assert "pass one of them" in capsys.readouterr().err
