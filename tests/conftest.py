import sys
from pathlib import Path

import pytest
import torch

# The shared helpers (datahelpers, trainhelpers) import by name from every test folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and OpenMP threads that spin while another job holds
    a core slow those tests down tenfold on a shared 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
    """A small prepared dataset of the built-in synthetic task (byte tokenizer)."""
    from prefixlm.data.prepare import prepare_sft
    from prefixlm.data.synthetic import make_samples, write_jsonl

    root = tmp_path_factory.mktemp("data")
    write_jsonl(make_samples(600, seed=0), root / "train.jsonl")
    prepare_sft([str(root / "train.jsonl")], str(root / "prepared"), context_size=64,
                progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def hrm_fixtures(tmp_path_factory):
    """HRM-Text's and data_io's layouts built from their documented formats (tests/hrmformats.py):
    a data_io sampled folder, a data_io tokenized folder, an HRM-Text SFT folder, the tokenizer."""
    pytest.importorskip("tokenizers", reason="the HF tokenizer of the fixtures needs `tokenizers`")
    from hrmformats import build_fixtures

    return build_fixtures(tmp_path_factory.mktemp("hrm"))
