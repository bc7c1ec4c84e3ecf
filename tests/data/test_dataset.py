"""V1 reader: HRM-Text layout (non-contiguous responses) and validation errors."""

import json
import re

import numpy as np
import pytest

from datahelpers import random_samples, write_v1
from prefixlm.data import V1Dataset


def test_reads_hrm_layout_with_gaps(tmp_path):
    """Guards reading by the index arrays only (resp_start need not follow the instruction)."""
    samples = random_samples(20)
    ds = V1Dataset(write_v1(tmp_path / "d", samples, epochs=2, gap=3))
    assert ds.num_epochs == 2 and ds.max_seq_len == 4097
    for i, (inst, resp) in enumerate(samples):
        a, b = ds.sample(0, i)
        assert a.tolist() == inst and b.tolist() == resp


def _edit_metadata(path, **values):
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(values)
    (path / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "tokens.npy").unlink(), "tokens.npy: missing file"),
    (lambda p: (p / "epoch_0" / "resp_len.npy").unlink(), "resp_len.npy: missing file"),
    (lambda p: (p / "metadata.json").unlink(), "metadata.json: missing file"),
    (lambda p: (p / "metadata.json").write_text("{"), "not valid JSON"),
    (lambda p: (p / "metadata.json").write_text('{"tokenizer_info": {}}'), "'max_seq_len'"),
    (lambda p: np.save(p / "epoch_0" / "inst_len.npy", np.ones(3, np.int64)),
     "length mismatch: inst_len.npy has 3"),
    (lambda p: np.save(p / "epoch_0" / "resp_start.npy", np.full(5, 10**6, np.int64)),
     "resp_start + resp_len > len(tokens)"),
    (lambda p: np.save(p / "epoch_0" / "inst_start.npy", np.full(5, -1, np.int64)),
     "inst_start < 0"),
    (lambda p: np.save(p / "epoch_0" / "resp_len.npy", np.zeros(5, np.int64)), "resp_len = 0"),
    (lambda p: np.save(p / "epoch_0" / "inst_len.npy", np.ones(5, np.float32)), "expected integers"),
    (lambda p: np.save(p / "tokens.npy", np.zeros(3, np.int32)), "> len(tokens) = 3"),
    (lambda p: _edit_metadata(p, max_seq_len=3), "exceeds metadata.json's max_seq_len 3"),
])
def test_validation_errors(tmp_path, damage, message):
    """Guards each validation: a damaged dataset gives a clear ValueError naming the problem."""
    path = write_v1(tmp_path / "d", random_samples(5))
    damage(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        V1Dataset(path).validate()


def test_epoch_out_of_range(tmp_path):
    """Guards asking for an epoch the dataset does not have."""
    ds = V1Dataset(write_v1(tmp_path / "d", random_samples(5)))
    with pytest.raises(ValueError, match="has 1 epochs"):
        ds.epoch(1)


def test_opens_data_io_sampled_folder_as_it_is(hrm_fixtures):
    """Guards refusing data_io's output: its total_length is the mean sampled tokens per epoch
    while tokens.npy holds every row of every source (uint16 here), and its epochs hold different
    subsets. It must open and validate, with total_length reported as information."""
    ds = V1Dataset(hrm_fixtures["sampled"])
    ds.validate()
    assert ds.tokens.dtype == np.uint16 and ds.vocab_size == 400 and not ds.ours
    assert ds.metadata["total_length"] != len(ds.tokens)
    assert "mean sampled tokens per epoch" in ds.total_length_note()
    assert "data_io" in ds.origin
    starts = [set(ds.epoch(k).inst_start.tolist()) for k in range(ds.num_epochs)]
    assert ds.num_epochs == 2 and starts[0] != starts[1]
    assert ds.count_short(1) == [1, 1]  # the truncate mode's resp_len == 1 sample, each epoch


def test_opens_hrm_sft_folder_as_it_is(hrm_fixtures):
    """Guards the HRM-Text SFT folder: int32 tokens, total_length = len(tokens.npy)."""
    ds = V1Dataset(hrm_fixtures["sft"])
    ds.validate()
    assert ds.tokens.dtype == np.int32 and len(ds.epoch(0)) == 3
    assert "= len(tokens.npy)" in ds.total_length_note() and "HRM-Text" in ds.origin


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64])
def test_token_dtypes(tmp_path, dtype):
    """Guards a reader that assumes int32 tokens: data_io writes uint8 / uint16 / int32 by vocab."""
    samples = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    path = write_v1(tmp_path / "d", samples, metadata={"tokenizer_info": {"vocab_size": 200}})
    tokens = np.load(path / "tokens.npy")
    np.save(path / "tokens.npy", tokens.astype(dtype))
    ds = V1Dataset(path)
    ds.validate()
    assert ds.tokens.dtype == dtype
    assert [[a.tolist(), b.tolist()] for a, b in (ds.sample(0, i) for i in range(2))] == \
        [list(map(list, s)) for s in samples]


def test_our_total_length_is_still_checked(tmp_path):
    """Guards a damaged dataset we wrote (tokens.npy replaced) passing now that foreign
    total_length values are information only."""
    path = write_v1(tmp_path / "d", random_samples(5), metadata={"writer": "prefixlm prepare-sft"})
    tokens = np.load(path / "tokens.npy")
    np.save(path / "tokens.npy", np.concatenate([tokens, tokens]))
    with pytest.raises(ValueError, match="says total_length"):
        V1Dataset(path)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_token_id_outside_the_vocabulary_is_caught(tmp_path, dtype):
    """Guards a token id >= vocab in tokens.npy reaching the embedding (IndexError mid-training) or
    passing `inspect`: validate names the position, the loader names the sample."""
    from prefixlm.data import PackedLoader

    path = write_v1(tmp_path / "d", [([1, 2, 3], [4, 5]), ([6, 7], [8, 9])],
                    metadata={"tokenizer_info": {"vocab_size": 9}})
    np.save(path / "tokens.npy", np.load(path / "tokens.npy").astype(dtype))
    with pytest.raises(ValueError, match=r"token id 9 at position 8 is outside the vocabulary "
                                         r"\[0, 9\)"):
        V1Dataset(path).validate()
    V1Dataset(path).validate(vocab_size=10)  # an explicit size wins
    with pytest.raises(ValueError, match=r"epoch_0: sample 1 holds token id 9 .*position 8"):
        list(zip(range(2), PackedLoader(path, 16, prefetch=0)))
