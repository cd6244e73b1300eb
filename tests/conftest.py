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


@pytest.fixture(scope="session")
def shards8(synth, tmp_path_factory):
    """synth's 512 training samples in 8 shards of 64 (two windows of the loader's default 4), and no val split, so
    a run ends without an evaluation."""
    import json
    import shutil
    from dataloader import read_tar, save_json, write_tar
    out = tmp_path_factory.mktemp("shards8")
    with open(os.path.join(synth, "index.json")) as f:
        index = json.load(f)
    samples = [s for name in index["train"]["shards"] for s in read_tar(os.path.join(synth, name))[0].items()]
    names = [f"train-{i:06d}.tar" for i in range(8)]
    for i, name in enumerate(names):
        write_tar(str(out / name), samples[64 * i:64 * (i + 1)])
    keep = {k: v for k, v in index.items() if k not in ("train", "val", "classes", "heldout")}
    save_json(str(out / "index.json"), {**keep, "train": {"shards": names, "shard_sizes": [64] * 8, "num_samples": 512}})
    shutil.copy(os.path.join(synth, "tokenizer.json"), out / "tokenizer.json")
    return str(out)
