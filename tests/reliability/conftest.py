"""One intra-op thread for these tests: tiny models gain nothing from two, and on a shared 2-core
machine two OpenMP threads spinning against other processes made runs several times slower."""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
