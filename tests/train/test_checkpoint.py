"""Checkpoints on CPU: exact resume, damaged checkpoints, and the errors when none is usable."""

import json
import shutil

import pytest
import torch

from prefixlm.train import checkpoint as ckpt
from prefixlm.train.distributed import Dist
from trainhelpers import small_config, trainer_on


def _losses(history):
    return [record["loss"] for record in history]


RESUME_SETTINGS = {
    "transformer": [],
    # bp_steps 2 (<= H_cycles) for steps 1-5 of 16: the embedding has no gradient, so no AdamW
    # state, when step 4 is saved, and gets its first one after the resume (step 6).
    "hrm-bp-warmup": ["model.arch=hrm", "model.layers=2", "model.bp_warmup_ratio=1"],
    "hrm-all-under-grad": ["model.arch=hrm", "model.layers=2", "model.L_cycles=1",
                           "model.bp_min_steps=4", "model.bp_max_steps=4",
                           "model.bp_warmup_ratio=0"],
    "no-ema": ["ema_decay=0"],
    "grad-accum": ["grad_accum=2", "model.arch=hrm", "model.layers=2", "model.bp_warmup_ratio=1"],
}


@pytest.mark.parametrize("setting", list(RESUME_SETTINGS))
def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, prepared_dir, setting):
    """Guards anything a checkpoint forgets (optimizer moments, EMA, LR step, loader position,
    RNG), and runs that cannot resume at all (a parameter without gradient at save time has no
    AdamW state, and the load failed with "Missing key in checkpoint state_dict:
    optim.state.<param>.step"; HRM's bp warm-up leaves the embedding so): 4 steps + resume + 12
    steps equals 16 straight steps exactly on CPU, for every architecture and setting."""
    extra = ["steps=16", *RESUME_SETTINGS[setting]]
    straight = trainer_on(small_config(tmp_path / "a", *extra, "ckpt_every=0"), prepared_dir)
    expected = _losses(straight.fit())

    first = trainer_on(small_config(tmp_path / "b", *extra, "ckpt_every=4"), prepared_dir)
    got = _losses(first.fit(until=4))
    untouched = [name for name, p in first.model.named_parameters()
                 if first.optimizer.state[p]["step"].item() == 0]
    assert bool(untouched) == (setting in ("hrm-bp-warmup", "grad-accum")), untouched
    second = trainer_on(small_config(tmp_path / "b", *extra, "ckpt_every=4"), prepared_dir)
    assert second.resume().name == "step_00000004"
    got += _losses(second.fit())
    assert got == expected
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    assert (straight.ema is None) == (setting == "no-ema")
    for name in straight.ema.shadow if straight.ema else ():
        assert torch.equal(straight.ema.shadow[name], second.ema.shadow[name]), name


@pytest.mark.parametrize("kind", ["foreach", "fused", "amsgrad"])
def test_filled_optimizer_state_is_the_state_adamw_creates(kind):
    """Guards `fill_optimizer_state` changing the numbers: a parameter given step-0 state before
    its first gradient takes exactly the steps (weights and state) of one whose state AdamW
    created lazily."""
    torch.manual_seed(0)
    init, grads = torch.randn(5, 3), [torch.randn(5, 3) for _ in range(3)]
    options = {"foreach": dict(foreach=True), "fused": dict(fused=True),
               "amsgrad": dict(amsgrad=True)}[kind]
    runs = []
    for fill in (False, True):
        param = torch.nn.Parameter(init.clone())
        optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1, **options)
        if fill:
            ckpt.fill_optimizer_state(optimizer)
            assert optimizer.state[param]["step"].item() == 0
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        runs.append((param.detach(), optimizer.state[param]))
    (lazy, lazy_state), (filled, filled_state) = runs
    assert torch.equal(lazy, filled)
    assert lazy_state.keys() == filled_state.keys()
    for key, value in lazy_state.items():
        assert value.dtype == filled_state[key].dtype and value.device == filled_state[key].device
        assert torch.equal(value, filled_state[key]), key


class _TwoPart(torch.nn.Module):
    """`late` gets a gradient only from step `late_from` on (a warm-up without gradient)."""

    def __init__(self):
        super().__init__()
        self.early = torch.nn.Parameter(torch.randn(4))
        self.late = torch.nn.Parameter(torch.randn(4))

    def loss(self, step: int, late_from: int = 3):
        late = self.late if step >= late_from else self.late.detach()
        return ((self.early * late).sum() - 1.0) ** 2


def test_a_parameter_without_gradient_at_save_time_resumes_exactly(tmp_path):
    """Guards resume for any parameter that has had no gradient when the checkpoint is written
    (HRM's no-grad cycles today, a back-propagation warm-up tomorrow): the save covers it, and
    after the resume its first gradient takes the same step as in a straight run."""
    cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def run(steps, model, optimizer, start=0):
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            model.loss(step).backward()
            optimizer.step()

    torch.manual_seed(0)
    straight = _TwoPart()
    opt = torch.optim.AdamW(straight.parameters(), lr=0.05)
    run(6, straight, opt)

    torch.manual_seed(0)
    first = _TwoPart()
    opt_first = torch.optim.AdamW(first.parameters(), lr=0.05)
    run(2, first, opt_first)
    assert not opt_first.state[first.late]  # no gradient yet: AdamW made no state for it
    ckpt.save_checkpoint(tmp_path, 2, first, opt_first, None, {}, cpu.rank)

    second = _TwoPart()
    opt_second = torch.optim.AdamW(second.parameters(), lr=0.05)
    step, _, _ = ckpt.load_checkpoint(tmp_path, second, opt_second, None, cpu.rank)
    assert step == 2
    run(6, second, opt_second, start=2)
    assert torch.equal(second.early, straight.early) and torch.equal(second.late, straight.late)


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


def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_bit_is_caught_by_the_checksum(tmp_path, prepared_dir, capsys):
    """Guards silent corruption (a COMMIT that records sizes only: one flipped bit in a weight
    file resumed without a word): resume skips the checkpoint with a warning naming the file and
    takes the previous one; load_model_weights (generate/eval/export) refuses it, naming the
    file."""
    trainer = trainer_on(small_config(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
    trainer.fit()
    newest = tmp_path / "checkpoints" / "step_00000010"
    shard = next(newest.glob("*.distcp"))
    _flip_bit(shard)
    fresh = trainer_on(small_config(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
    assert fresh.resume().name == "step_00000005"
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: file {shard.name} fails its checksum" in err
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name} fails its checksum"):
        ckpt.load_model_weights(newest, fresh.model)
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name} fails its checksum"):
        ckpt.load_trained(newest)


class _Killed(BaseException):
    """Stands for the process dying in the middle of a deletion."""


def test_interrupted_prune_never_leaves_a_step_without_its_commit(tmp_path, prepared_dir,
                                                                  monkeypatch):
    """Guards a prune killed midway leaving a `step_*` without its COMMIT marker forever (the
    old prune deleted the directory in place): whatever a deletion has removed when it dies,
    no `step_*` is left incomplete, and the next save removes the remains."""
    trainer = trainer_on(small_config(tmp_path, "steps=6", "ckpt_every=2",
                                      "keep_checkpoints=2"), prepared_dir)
    trainer.fit(until=4)
    root = tmp_path / "checkpoints"
    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):
        path = type(root)(path)
        if (path / ckpt.COMMIT).is_file():
            (path / ckpt.COMMIT).unlink()  # the first file a deletion happened to remove
            next(path.glob("*.distcp")).unlink()
            raise _Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(_Killed):
        trainer.fit(until=6)  # saving step 6 prunes step 2
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    steps = [p for p in root.iterdir() if p.name.startswith("step_")]
    assert steps and all((p / ckpt.COMMIT).is_file() for p in steps), sorted(root.iterdir())
    assert ckpt.verify(root / "step_00000006") is None
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == [".deleting-step_00000002"]
    trainer.save()  # a re-save of step 6: the next save cleans up
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]
    assert all(ckpt.verify(p) is None for p in root.iterdir())


def _recommit(path, name):
    """Record `name`'s current size and CRC in the COMMIT (as if it had been saved so)."""
    commit = json.loads((path / ckpt.COMMIT).read_text())
    commit["files"][name] = (path / name).stat().st_size
    commit["crc32"][name] = ckpt.file_crc32(path / name)
    (path / ckpt.COMMIT).write_text(json.dumps(commit))


@pytest.mark.parametrize("text, match", [
    ("model: {hidden: [1, 2\n", r"config\.yaml is not valid YAML: .* at line 2"),
    ("just text\n", r"config\.yaml is not a valid run config: expected a mapping"),
    ("model: {hidden: -3}\n", r"config\.yaml is not a valid run config: .*model\.hidden"),
])
def test_corrupt_config_yaml_is_a_checkpoint_error_naming_it(tmp_path, prepared_dir, text,
                                                             match):
    """Guards a YAML traceback (or a raw ValueError naming no file) from eval/generate/export when
    a checkpoint's config.yaml is damaged: first the checksum names it; a config.yaml that
    matches its checksum but cannot be a run config is a CheckpointError naming the file."""
    trainer = trainer_on(small_config(tmp_path, "steps=1"), prepared_dir)
    trainer.fit()
    step = tmp_path / "checkpoints" / "step_00000001"
    (step / "config.yaml").write_text(text)
    with pytest.raises(ckpt.CheckpointError, match="file config.yaml (fails its checksum|has)"):
        ckpt.load_trained(step)
    _recommit(step, "config.yaml")
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_trained(step)


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, prepared_dir):
    """Guards eval/export accepting a checkpoint whose weights are NaN (one written before the
    trainer checked its weights): load_model_weights names the tensor, for the raw weights and
    for the EMA."""
    trainer = trainer_on(small_config(tmp_path, "steps=1"), prepared_dir)
    trainer.fit()
    name, param = list(trainer.model.named_parameters())[-1]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
        trainer.ema.shadow[name].view(-1)[0] = float("nan")
    path = ckpt.save_checkpoint(tmp_path / "poisoned", 1, trainer.model, trainer.optimizer,
                                trainer.ema.shadow, {}, 0)  # bypasses Trainer.save's check
    for use_ema, name in ((False, name), (True, f"ema.{name}")):
        with pytest.raises(ckpt.CheckpointError, match=rf"non-finite values in {name}:"):
            ckpt.load_model_weights(path, trainer.model, use_ema=use_ema)
