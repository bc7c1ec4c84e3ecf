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
