import os

import pytest
import torch

import prep_dataset

# no test reaches the network: `datasets` and huggingface_hub read this when they are imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# one intra-op thread: on a shared 2-core CI box, two threads per process oversubscribe and run several times slower
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small built-in synthetic set at 32 px, made once per test session."""
    out = tmp_path_factory.mktemp("synth")
    prep_dataset.main(["synthetic", "--out", str(out), "--num_train", "512", "--num_val", "128",
                       "--img_size", "32", "--shard_size", "256", "--workers", "1", "--quiet"])
    return str(out)
