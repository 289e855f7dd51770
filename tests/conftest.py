import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when tests spawn processes.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_data():
    from onceforall.data import load_dataset

    return load_dataset("synthetic:600", val_size=120)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
