import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
    """A small prepared dataset of the built-in synthetic task (byte tokenizer)."""
    from prefixlm.data.prepare import prepare_sft
    from prefixlm.train.synthetic import make_samples, write_jsonl

    root = tmp_path_factory.mktemp("data")
    write_jsonl(make_samples(600, seed=0), root / "train.jsonl")
    prepare_sft([str(root / "train.jsonl")], str(root / "prepared"), context_size=64,
                progress=False)
    return root / "prepared"
