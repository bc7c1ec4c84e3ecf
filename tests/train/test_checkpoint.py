"""Checkpoints on CPU: exact resume, damaged checkpoints, and the errors when none is usable."""

import shutil

import pytest
import torch

from prefixlm.train import checkpoint as ckpt
from trainhelpers import small_config, trainer_on


def _losses(history):
    return [record["loss"] for record in history]


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, prepared_dir):
    """Guards anything a checkpoint forgets (optimizer moments, EMA, LR step, loader position,
    RNG): 10 steps + resume + 10 steps equals 20 straight steps exactly on CPU."""
    straight = trainer_on(small_config(tmp_path / "a", "steps=20", "ckpt_every=0"), prepared_dir)
    expected = _losses(straight.fit())

    first = trainer_on(small_config(tmp_path / "b", "steps=20", "ckpt_every=10"), prepared_dir)
    got = _losses(first.fit(until=10))
    second = trainer_on(small_config(tmp_path / "b", "steps=20", "ckpt_every=10"), prepared_dir)
    assert second.resume().name == "step_00000010"
    got += _losses(second.fit())
    assert got == expected
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], second.ema.shadow[name]), name


def _corrupt_and_resume(tmp_path, prepared_dir, damage):
    trainer = trainer_on(small_config(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
    trainer.fit()
    newest = tmp_path / "checkpoints" / "step_00000010"
    damage(newest)
    fresh = trainer_on(small_config(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
    return fresh.resume().name


def _truncate(path):
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


def _garbage_metadata(path):
    meta = path / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)


def _no_commit(path):
    (path / ckpt.COMMIT).unlink()


@pytest.mark.parametrize("damage", [_truncate, _garbage_metadata, _no_commit])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, prepared_dir, damage, capsys):
    """Guards resuming from a half-written or corrupted checkpoint (crash mid-save, truncated
    copy, unreadable metadata): resume warns and takes the previous complete one."""
    assert _corrupt_and_resume(tmp_path, prepared_dir, damage) == "step_00000005"
    if damage is not _no_commit:
        assert "skipping checkpoint" in capsys.readouterr().err


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, prepared_dir):
    """Guards a crash deep inside DCP (or a silent fresh start) when every checkpoint is bad; a
    leftover temp directory of an interrupted save is never taken for a checkpoint."""
    trainer = trainer_on(small_config(tmp_path, "steps=5", "ckpt_every=5"), prepared_dir)
    trainer.fit()
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step_00000005", root / ".tmp-step_00000009")
    assert ckpt.latest_checkpoint(root).name == "step_00000005"
    _truncate(root / "step_00000005")
    fresh = trainer_on(small_config(tmp_path, "steps=5"), prepared_dir)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*step_00000005"):
        fresh.resume()
