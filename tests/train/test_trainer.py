"""Trainer tests on CPU: learning, exact resume, checkpoint failures, odd batches, NaN stop."""

import shutil

import pytest
import torch

from prefixlm.data import PackedLoader, V1Dataset
from prefixlm.data.loader import Batch, supervised_rows
from prefixlm.model.flops import step_flops
from prefixlm.train import checkpoint as ckpt
from prefixlm.train.config import load_config
from prefixlm.train.distributed import Dist
from prefixlm.train.synthetic import make_samples
from prefixlm.model.flops import useful_pairs
from prefixlm.train.trainer import NonFiniteLossError, Trainer
from trainhelpers import VOCAB, ListLoader, encode, pack

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = ["model.hidden=32", "model.heads=2", "model.layers=1", "model.ffn_hidden=64",
         "model.vocab_size=260", "capacity=256", "context_size=64", "lr=1e-2", "warmup_steps=2",
         "ema_decay=0.9", "progress=false", "tensorboard=false", "log_every=1",
         "model.attention_backend=sdpa"]


def _cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"run_dir={tmp_path}", *extra])


def _trainer(cfg, prepared_dir):
    loader = PackedLoader(V1Dataset(prepared_dir), cfg.capacity, seed=cfg.seed)
    return Trainer(cfg, CPU, loader)


def _losses(history):
    return [record["loss"] for record in history]


def test_loss_falls(tmp_path, prepared_dir):
    """Guards a trainer that does not learn (wrong labels, LR, normalisation, optimizer wiring)."""
    trainer = _trainer(_cfg(tmp_path, "steps=40", "ckpt_every=0"), prepared_dir)
    losses = _losses(trainer.fit())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_resume_gives_the_same_losses_as_a_straight_run(tmp_path, prepared_dir):
    """Guards anything a checkpoint forgets (optimizer moments, EMA, LR step, loader position,
    RNG): 10 steps + resume + 10 steps equals 20 straight steps exactly on CPU."""
    straight = _trainer(_cfg(tmp_path / "a", "steps=20", "ckpt_every=0"), prepared_dir)
    expected = _losses(straight.fit())

    first = _trainer(_cfg(tmp_path / "b", "steps=20", "ckpt_every=10"), prepared_dir)
    got = _losses(first.fit(until=10))
    second = _trainer(_cfg(tmp_path / "b", "steps=20", "ckpt_every=10"), prepared_dir)
    assert second.resume().name == "step_00000010"
    got += _losses(second.fit())
    assert got == expected
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], second.ema.shadow[name]), name


def _corrupt_and_resume(tmp_path, prepared_dir, damage):
    trainer = _trainer(_cfg(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
    trainer.fit()
    newest = tmp_path / "checkpoints" / "step_00000010"
    damage(newest)
    fresh = _trainer(_cfg(tmp_path, "steps=10", "ckpt_every=5"), prepared_dir)
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
    trainer = _trainer(_cfg(tmp_path, "steps=5", "ckpt_every=5"), prepared_dir)
    trainer.fit()
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step_00000005", root / ".tmp-step_00000009")
    assert ckpt.latest_checkpoint(root).name == "step_00000005"
    _truncate(root / "step_00000005")
    fresh = _trainer(_cfg(tmp_path, "steps=5"), prepared_dir)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*step_00000005"):
        fresh.resume()


class _ScriptedLoader(ListLoader):
    """ListLoader whose batch `special_at` consists only of samples with causal_len == 0."""

    def __init__(self, samples, capacity, special_at):
        super().__init__(samples, capacity)
        self.special_at = special_at

    def __iter__(self):
        for batch in super().__iter__():
            if self.position - 1 == self.special_at:
                # Responses of one token (end of answer only): causal_len 0 everywhere; the only
                # labels sit on the last prefix positions.
                zero = [(prefix, [VOCAB - 1]) for prefix, _ in self.samples[:20]]
                batch = pack(zero, self.capacity)
                assert int(batch.info.causal_lens.sum()) == 0
            yield batch


def test_all_zero_causal_batch_mid_run_trains_on(tmp_path):
    """Guards the seed's failure at step 2284: a batch in which every sample has causal_len == 0
    must give a finite loss and gradient, and training must continue after it."""
    cfg = _cfg(tmp_path, "steps=8", "ckpt_every=0", "model.vocab_size=258")
    trainer = Trainer(cfg, CPU, _ScriptedLoader(encode(make_samples(300, 0)), 256, special_at=3))
    history = trainer.fit()
    assert len(history) == 8
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in history)
    assert history[3]["supervised_tokens"] == 20


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, prepared_dir):
    """Guards a NaN loss being applied to the weights (and the optimizer state): the run stops
    with a clear error and the parameters are unchanged."""
    trainer = _trainer(_cfg(tmp_path, "steps=6", "ckpt_every=0"), prepared_dir)
    trainer.fit(until=2)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(NonFiniteLossError, match="step 3.*before the optimizer step"):
        trainer.fit()
    assert trainer.step == 2
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) or name == "lm_head.weight"
    assert torch.equal(trainer.model.lm_head.weight[1:], before["lm_head.weight"][1:])
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], moments)



def _with_supervised_rows(batch):
    return Batch(*batch[:4], supervised_rows(batch.labels.numpy()))


def test_logits_of_supervised_rows_only_train_exactly_like_all_rows(tmp_path):
    """Guards the LM head running on the supervised rows only: the same batches with and without
    `supervised_rows` give the same loss, accuracies and gradients (fp64), and the step's FLOPs
    count the head on those rows alone."""
    cfg = _cfg(tmp_path, "steps=1", "ckpt_every=0", "model.vocab_size=258", "grad_accum=2",
               "ema_decay=0")
    samples = encode(make_samples(40, 1))
    batches = [pack(samples[:5], 256), pack(samples[5:9], 256)]
    results = []
    for chosen in (batches, [_with_supervised_rows(b) for b in batches]):
        torch.manual_seed(0)
        trainer = Trainer(cfg, CPU, ListLoader(samples, 256))
        trainer.model.double()
        stats = trainer.train_step(chosen)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                 if p.grad is not None}
        results.append((stats, grads))
    (full, full_grads), (some, some_grads) = results
    for key in ("loss", "token_acc", "exact_acc", "grad_norm", "tokens"):
        assert some[key] == pytest.approx(full[key], rel=1e-12, abs=1e-12), key
    assert full_grads.keys() == some_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(some_grads[name], grad, rtol=1e-10, atol=1e-12)
    head_rows = [int((b.labels != -100).sum()) for b in batches]
    assert 0 < sum(head_rows) < sum(b.info.total for b in batches)
    assert some["flops"] == pytest.approx(sum(
        step_flops(cfg.model, b.info.total, useful_pairs(b.info), rows)
        for b, rows in zip(batches, head_rows)))
    assert full["flops"] == pytest.approx(sum(
        step_flops(cfg.model, b.info.total, useful_pairs(b.info)) for b in batches))


def test_supervised_rows_missing_a_supervised_row_is_an_error(tmp_path):
    """Guards a loader whose supervised_rows leave out a labelled row: its loss would silently
    drop that token; the step stops before the optimizer instead, naming the counts."""
    cfg = _cfg(tmp_path, "steps=1", "ckpt_every=0", "model.vocab_size=258")
    samples = encode(make_samples(10, 2))
    batch = _with_supervised_rows(pack(samples[:5], 256))
    short = Batch(*batch[:4], batch.supervised_rows[1:])
    trainer = Trainer(cfg, CPU, ListLoader(samples, 256))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    n = len(batch.supervised_rows)
    with pytest.raises(ValueError, match=f"list {n - 1} supervised rows but their labels have {n}"):
        trainer.train_step([short])
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_batch_stats_on_supervised_rows_equal_those_on_all_rows():
    """Guards the per-sample bookkeeping of `batch_stats(rows=...)`: with logits that predict some
    samples exactly, some in part and some not at all, the statistics from the supervised rows'
    logits alone equal those from every row's (samples counted, exact ones, tokens, CE)."""
    from prefixlm.train.metrics import batch_stats

    batch = _with_supervised_rows(pack(encode(make_samples(12, 3))[:7], 256))
    labels, rows = batch.labels, batch.supervised_rows
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(256, VOCAB, generator=gen, dtype=torch.float64)
    sample_of = torch.repeat_interleave(torch.arange(batch.info.slots), batch.info.host_lens.sum(0))
    exact_samples = {0, 2, 5}
    for row in rows.tolist():
        if sample_of[row].item() in exact_samples or row % 3 == 0:
            logits[row, labels[row]] = 100.0  # right where forced; else right by chance only
    full = batch_stats(logits, labels, batch.info)
    some = batch_stats(logits[rows], labels, batch.info, rows)
    assert int(full["exact"]) >= len(exact_samples) and int(full["samples"]) == 7
    for key in ("tokens", "correct", "samples", "exact"):
        assert int(some[key]) == int(full[key]), key
    # batch_stats sums the CE in fp32; the two calls sum in different orders.
    torch.testing.assert_close(some["ce_sum"], full["ce_sum"], rtol=1e-6, atol=0)


def test_checkpoint_with_unpadded_qkvg_loads_weights_and_refuses_resume(tmp_path):
    """Guards checkpoints written before the q/k/v/gate projection was padded to a multiple of 8
    rows (tiny preset: 388 saved, 392 now): eval/generate/export read their weights (padding rows
    0, outputs as before), a resume stops with the reason instead of a size mismatch."""
    from prefixlm.model import PrefixLM, preset_config
    from prefixlm.train.checkpoint import (CheckpointError, load_checkpoint, load_model_weights,
                                           save_checkpoint)

    cfg = preset_config("tiny", vocab_size=260)
    torch.manual_seed(0)
    old = PrefixLM(cfg)
    used = sum(old.blocks[0].attn.split[:-1])
    assert used < old.blocks[0].attn.qkvg.weight.shape[0]
    for block in old.blocks:  # the old layout: only the used rows exist
        block.attn.qkvg.weight = torch.nn.Parameter(block.attn.qkvg.weight.detach()[:used].clone())
    optimizer = torch.optim.AdamW(old.parameters())
    path = save_checkpoint(tmp_path, 3, old, optimizer, None, {}, rank=0)

    new = PrefixLM(cfg)
    assert load_model_weights(path, new, use_ema=False) is False
    for before, after in zip(old.blocks, new.blocks):
        torch.testing.assert_close(after.attn.qkvg.weight[:used], before.attn.qkvg.weight,
                                   rtol=0, atol=0)
        assert (after.attn.qkvg.weight[used:] == 0).all()
    torch.testing.assert_close(new.embed.weight, old.embed.weight, rtol=0, atol=0)
    fresh = PrefixLM(cfg)
    with pytest.raises(CheckpointError, match="388 saved, 392 now.*cannot resume"):
        load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()), None, rank=0)
