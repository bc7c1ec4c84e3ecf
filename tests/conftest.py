import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# No network in the tests: datasets and the hub read local files only (lm-eval's tasks), W&B
# writes offline run files. Set before anything imports datasets, which reads them once.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="prefixlm-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
os.environ["WANDB_MODE"] = "offline"

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
def memorised_run(tmp_path_factory):
    """A run whose tiny model answers the evaluation fixtures (tests/evalhelpers.py)."""
    from evalhelpers import train_memoriser

    return train_memoriser(tmp_path_factory.mktemp("memorised"))


@pytest.fixture(scope="session")
def hrm_fixtures(tmp_path_factory):
    """HRM-Text's and data_io's layouts built from their documented formats (tests/hrmformats.py):
    a data_io sampled folder, a data_io tokenized folder, an HRM-Text SFT folder, the tokenizer."""
    pytest.importorskip("tokenizers", reason="the HF tokenizer of the fixtures needs `tokenizers`")
    from hrmformats import build_fixtures

    return build_fixtures(tmp_path_factory.mktemp("hrm"))
