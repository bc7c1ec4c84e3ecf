"""The spec's batches: the length generator and the token batch builder."""

import pytest

from prefixlm.bench.spec import SpecLoader, spec_lengths, token_batch


def test_spec_lengths_is_the_spec_generator():
    """Guards the bench drawing other batches than bench_spec.md's (order of draws, bounds,
    overflow rule): the spec's stated counts for T = 16384 and 65536, zero-causal fractions
    honoured, and the capacity check."""
    for capacity, counts in ((16384, (11, 15548)), (65536, (42, 63768))):
        prefix, causal = spec_lengths(capacity, 1)
        assert (len(prefix), sum(prefix) + sum(causal)) == counts
    assert all(c == 0 for c in spec_lengths(65536, 1, 1.0)[1])
    mixed = spec_lengths(65536, 1, 0.3)[1]
    assert 0 < sum(c == 0 for c in mixed) < len(mixed)
    with pytest.raises(ValueError, match="longest sample"):
        spec_lengths(2048, 1)


def test_token_batch_follows_the_loader_label_convention():
    """Guards labels shifted wrongly (leaking the predicted token, or dropping the one label of a
    zero-causal sample): labels = S[1:] from the last prefix row, positions restart per sample."""
    prefix, causal = [5, 3, 4], [2, 0, 3]
    batch = token_batch(prefix, causal, 24, 50, seed=0)
    assert int((batch.labels != -100).sum()) == sum(c + 1 for c in causal)
    at = 0
    for p, c in zip(prefix, causal):
        rows = slice(at, at + p + c)
        assert batch.position_ids[rows].tolist() == list(range(p + c))
        assert (batch.labels[at:at + p - 1] == -100).all()
        # Label of row i is the input of row i + 1 inside the sample (next-token prediction).
        assert batch.labels[at + p - 1:at + p + c - 1].tolist() == \
            batch.inputs[at + p:at + p + c].tolist()
        # The response copies the prefix shifted by one id.
        head = batch.inputs[at:at + p]
        assert batch.labels[at + p - 1].item() == (head[0].item() + 1) % 50
        at += p + c
    assert (batch.labels[at:] == -100).all() and batch.info.total == at
    loader = SpecLoader(512, 64, max_prefix=64, max_causal=32, all_zero_causal_every=2)
    batches = [next(iter(loader)) for _ in range(4)]
    assert [b.info.max_causal == 0 for b in batches] == [False, True, False, True]
    assert loader.state_dict() == {"position": 4}


def test_the_cli_defaults_name_every_case_and_method():
    """Guards `prefixlm bench attention` silently skipping a method: the CLI's default lists
    (kept there so that --help imports nothing heavy) must equal the benchmark's own."""
    from prefixlm.bench.attention import METHODS
    from prefixlm.bench.spec import CASES
    from prefixlm.bench.train import ARCHS, DEFAULT_BACKENDS
    from prefixlm.cli import bench as cli_bench

    assert cli_bench.ATTENTION_CASES.split(",") == list(CASES)
    assert tuple(cli_bench.ATTENTION_METHODS.split(",")) == METHODS
    assert tuple(cli_bench.TRAIN_BACKENDS.split(",")) == tuple(DEFAULT_BACKENDS)
    assert tuple(cli_bench.TRAIN_ARCHS.split(",")) == tuple(ARCHS)
