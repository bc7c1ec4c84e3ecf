"""PackedLoader: label convention, sample boundaries, SeqInfo, ranks, exact resume, prefetch."""

import itertools

import pytest
import torch

from datahelpers import random_samples, write_v1
from prefixlm.data import PackedLoader, V1Dataset


def _dataset(tmp_path, n=60, epochs=2, seed=0):
    samples = random_samples(n, seed=seed)
    return V1Dataset(write_v1(tmp_path / "d", samples, epochs=epochs, gap=2)), samples


def _take(loader, k):
    return list(itertools.islice(iter(loader), k))


def _same(a, b):
    return (torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
            and torch.equal(a.position_ids, b.position_ids)
            and torch.equal(a.info.cu_seqlens, b.info.cu_seqlens)
            and torch.equal(a.info.prefix_lens, b.info.prefix_lens)
            and torch.equal(a.supervised_rows, b.supervised_rows))


def test_labels_positions_and_boundaries_match_reference(tmp_path):
    """Guards the HRM-Text convention per sample (inputs = inst + resp[:-1], only the last prefix
    position and causal positions labelled, positions restart) and that nothing crosses samples."""
    ds, samples = _dataset(tmp_path)
    loader = PackedLoader(ds, 160, prefetch=0)
    plan = loader.plan(0)
    index = ds.epoch(0)
    for step in range(plan.num_steps):
        b = next(iter(loader))
        ids = plan.batch(step, 0)
        info = b.info
        cu = info.cu_seqlens.tolist()
        assert info.capacity == 160 and info.num_samples == len(ids)
        for k, sid in enumerate(ids.tolist()):
            inst, resp = samples[sid]
            assert index.inst_len[sid] == len(inst)
            lo, hi = cu[k], cu[k + 1]
            assert hi - lo == len(inst) + len(resp) - 1
            assert info.prefix_lens[k] == len(inst) and info.causal_lens[k] == len(resp) - 1
            assert b.inputs[lo:hi].tolist() == inst + resp[:-1]
            assert b.labels[lo:hi].tolist() == [-100] * (len(inst) - 1) + resp
            assert b.position_ids[lo:hi].tolist() == list(range(hi - lo))
        total = info.total
        assert (b.labels[total:] == -100).all() and (b.position_ids[total:] == 0).all()
        assert b.inputs.dtype == b.labels.dtype == b.position_ids.dtype == torch.int64
        assert b.inputs.shape == (160,)
        assert b.supervised_rows.tolist() == torch.nonzero(b.labels != -100).flatten().tolist()


def test_capacity_below_longest_sample_is_an_error(tmp_path):
    """Guards that a too-small capacity fails at construction with the sample named."""
    ds, _ = _dataset(tmp_path)
    with pytest.raises(ValueError, match="more than the batch capacity 20"):
        PackedLoader(ds, 20)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_cover_every_sample_once(tmp_path, world):
    """Guards the distributed split: across ranks each sample of the epoch appears exactly once."""
    ds, samples = _dataset(tmp_path, n=101)
    loaders = [PackedLoader(ds, 200, rank=r, world_size=world, prefetch=0) for r in range(world)]
    steps = loaders[0].batches_per_epoch
    assert all(ld.batches_per_epoch == steps for ld in loaders)
    seen = []
    for ld in loaders:
        for b in _take(ld, steps):
            cu = b.info.cu_seqlens.tolist()
            for k in range(b.info.num_samples):
                seen.append(tuple(b.inputs[cu[k]: cu[k + 1]].tolist()))
    dropped = len(loaders[0].plan(0).dropped)
    expected = [tuple(i + r[:-1]) for i, r in samples]
    assert len(seen) + dropped == len(expected) and set(seen) <= set(expected)
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_exact(tmp_path, prefetch):
    """Guards exact resume at 0, 1, mid-epoch and end of epoch, resuming twice, and state_dict right
    after a resume."""
    ds, _ = _dataset(tmp_path)
    ref_loader = PackedLoader(ds, 160, world_size=2, rank=1, seed=4, prefetch=prefetch)
    per_epoch = ref_loader.batches_per_epoch
    ref = _take(ref_loader, 3 * per_epoch)
    for stop in (0, 1, per_epoch // 2, per_epoch, per_epoch + 1):
        first = PackedLoader(ds, 160, world_size=2, rank=1, seed=4, prefetch=prefetch)
        _take(first, stop)
        state = first.state_dict()
        second = PackedLoader(ds, 160, world_size=2, rank=1, seed=4, prefetch=prefetch)
        second.load_state_dict(state)
        assert second.state_dict() == state
        got = _take(second, 2)
        state2 = second.state_dict()
        third = PackedLoader(ds, 160, world_size=2, rank=1, seed=4, prefetch=prefetch)
        third.load_state_dict(state2)
        got += _take(third, per_epoch)
        want = ref[stop: stop + 2 + per_epoch]
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want)), stop


def test_state_counts_consumed_not_prefetched(tmp_path):
    """Guards that prefetching ahead does not advance the saved position."""
    ds, _ = _dataset(tmp_path)
    loader = PackedLoader(ds, 160, prefetch=4)
    it = iter(loader)
    next(it)
    assert (loader.epoch, loader.step) == (0, 1)
    it.close()


def test_load_state_rejects_other_setup(tmp_path):
    """Guards resuming with a different world size or seed, which cannot continue the same batches."""
    ds, _ = _dataset(tmp_path)
    state = PackedLoader(ds, 160, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        PackedLoader(ds, 160, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(ds, 160, world_size=2, seed=1).load_state_dict(state)


def test_epochs_continue_and_differ(tmp_path):
    """Guards the endless iteration: epoch advances, reads epoch_k % num_epochs, reshuffles."""
    ds, _ = _dataset(tmp_path, epochs=1)
    loader = PackedLoader(ds, 160, prefetch=0)
    n = loader.batches_per_epoch
    batches = _take(loader, 2 * n)
    assert loader.epoch == 2 and loader.step == 0
    assert not all(_same(a, b) for a, b in zip(batches[:n], batches[n:]))


def test_a_state_of_another_planner_is_refused(tmp_path):
    """Guards a resume continuing with other batches unnoticed after the planner changed: a loader
    state records the planner's version, and a state without one came from the first planner."""
    ds, _ = _dataset(tmp_path)
    loader = PackedLoader(ds, 160)
    state = loader.state_dict()
    state.pop("planner")
    with pytest.raises(ValueError, match="planner = 1"):
        PackedLoader(ds, 160).load_state_dict(state)
    PackedLoader(ds, 160).load_state_dict(loader.state_dict())
