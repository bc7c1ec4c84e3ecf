"""Trainer tests on CPU: learning, odd batches, the NaN stop, the LM head on supervised rows."""

import pytest
import torch

from prefixlm.data.loader import Batch, supervised_rows
from prefixlm.data.synthetic import make_samples
from prefixlm.model.flops import step_flops, useful_pairs
from prefixlm.train.trainer import NonFiniteLossError, NonFiniteWeightError, Trainer
from trainhelpers import CPU, VOCAB, ListLoader, encode, pack, small_config, trainer_on


def _losses(history):
    return [record["loss"] for record in history]


def test_loss_falls(tmp_path, prepared_dir):
    """Guards a trainer that does not learn (wrong labels, LR, normalisation, optimizer wiring)."""
    trainer = trainer_on(small_config(tmp_path, "steps=40", "ckpt_every=0"), prepared_dir)
    losses = _losses(trainer.fit())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


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
    cfg = small_config(tmp_path, "steps=8", "ckpt_every=0", "model.vocab_size=258")
    trainer = Trainer(cfg, CPU, _ScriptedLoader(encode(make_samples(300, 0)), 256, special_at=3))
    history = trainer.fit()
    assert len(history) == 8
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in history)
    assert history[3]["supervised_tokens"] == 20


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, prepared_dir):
    """Guards a NaN loss being applied to the weights (and the optimizer state): the run stops
    with a clear error and the parameters are unchanged."""
    trainer = trainer_on(small_config(tmp_path, "steps=6", "ckpt_every=0"), prepared_dir)
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


def test_infinite_lr_never_writes_a_checkpoint(tmp_path, prepared_dir):
    """Guards a poisoned checkpoint: with lr=inf (past validation) the loss and gradient of step 1
    are finite, the step makes every weight NaN/inf, and the old trainer saved that checkpoint
    (which eval and export then accepted). The check after the optimizer step stops before the
    save, naming the first bad tensor."""
    cfg = small_config(tmp_path, "steps=4", "ckpt_every=1")
    cfg.lr = float("inf")
    trainer = trainer_on(cfg, prepared_dir)
    first = next(name for name, _ in trainer.model.named_parameters())
    with pytest.raises(NonFiniteWeightError, match=rf"^{first} holds NaN/inf after step 1; "
                                                   r"stopped before saving"):
        trainer.fit()
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_non_finite_weight_check_names_the_first_bad_tensor(tmp_path, prepared_dir):
    """Guards a weight check that names the wrong tensor or misses the EMA: with two poisoned
    weights the message names the earlier one in parameter order, with only an EMA tensor
    poisoned it names that (`ema.` + name); a clean model saves."""
    trainer = trainer_on(small_config(tmp_path, "steps=2", "ckpt_every=0"), prepared_dir)
    trainer.fit(until=1)
    names = [name for name, _ in trainer.model.named_parameters()]
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        params[names[-1]].view(-1)[3] = float("inf")
        params[names[2]].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=rf"^{names[2]} holds NaN/inf"):
        trainer.save()
    with torch.no_grad():
        params[names[-1]].view(-1)[3] = 0.0
        params[names[2]].view(-1)[0] = 0.0
        trainer.ema.shadow[names[1]].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=rf"^ema\.{names[1]} holds NaN/inf"):
        trainer.save()
    trainer.ema.shadow[names[1]].view(-1)[0] = 0.0
    assert trainer.save().name == "step_00000001"



def _with_supervised_rows(batch):
    return Batch(*batch[:4], supervised_rows(batch.labels.numpy()))


def test_logits_of_supervised_rows_only_train_exactly_like_all_rows(tmp_path):
    """Guards the LM head running on the supervised rows only: the same batches with and without
    `supervised_rows` give the same loss, accuracies and gradients (fp64), and the step's FLOPs
    count the head on those rows alone."""
    cfg = small_config(tmp_path, "steps=1", "ckpt_every=0", "model.vocab_size=258", "grad_accum=2",
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
    cfg = small_config(tmp_path, "steps=1", "ckpt_every=0", "model.vocab_size=258")
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


def test_trainer_drives_hrm_texts_bp_warmup(tmp_path, prepared_dir):
    """Guards the training progress the model's bp warm-up needs: step s of N (counted from 1, as
    HRM-Text counts) trains with HRM-Text's bp_steps (written out here from its formula), the
    embedding is left alone while no differentiated call reads it (bp_steps <= H_cycles: no
    gradient, so no update and no decay), and each step's FLOPs count that step's calls."""
    cfg = small_config(tmp_path, "steps=10", "ckpt_every=0", "model.arch=hrm", "model.layers=2",
                       "model.bp_warmup_ratio=0.5", "ema_decay=0")
    trainer = trainer_on(cfg, prepared_dir)
    embedding = trainer.model.model.embed_tokens.weight
    before = embedding.detach().clone()
    seen = []
    for step in range(1, 11):
        batch = next(iter(trainer.loader))
        stats = trainer.train_step([batch])
        warmup = 10 * 0.5
        expected = 2 + int(min(1.0, step / warmup) * (5 - 2))
        seen.append(stats["bp_steps"])
        assert stats["bp_steps"] == expected, (step, seen)
        assert stats["flops"] == pytest.approx(step_flops(
            cfg.model, batch.info.total, useful_pairs(batch.info),
            len(batch.supervised_rows), expected))
        if expected <= 2:
            assert torch.equal(embedding, before), step
    assert seen == [2, 3, 3, 4, 5, 5, 5, 5, 5, 5] and not torch.equal(embedding, before)
