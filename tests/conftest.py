"""Shared pytest setup: keep every test offline, and a single-thread fixture for tiny models.

The variables are set at import time, before any test module imports
`transformers`, because `huggingface_hub` and `datasets` read them once, when
first imported.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def single_thread():
    """Run the test with one intra-op thread and restore the previous count.

    The models in these tests have a few thousand parameters, so threading
    only adds synchronization. On a 2-core machine loaded by other processes,
    the BERT power iteration of test_curvature took 8.3 s with 2 threads and
    0.3 s with 1 thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
