import os

import pytest
import torch


# Two cores on CI: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(int(os.environ.get("PEFT_EXT_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
