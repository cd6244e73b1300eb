import pytest
import torch

import prep_dataset

# one intra-op thread: on a shared 2-core CI box, two threads per process oversubscribe and run several times slower
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small built-in synthetic set at 32 px, made once per test session."""
    out = tmp_path_factory.mktemp("synth")
    prep_dataset.main(["synthetic", "--out", str(out), "--num_train", "512", "--num_val", "128",
                       "--img_size", "32", "--shard_size", "256", "--workers", "1", "--quiet"])
    return str(out)
