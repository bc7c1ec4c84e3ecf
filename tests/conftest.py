import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and OpenMP threads that spin while another job holds
    a core slow those tests down tenfold on a shared 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
