import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

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


# ----------------------------------------------------------------------------- train.py runs, for the test files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_argv(data, tmp, run="r", *extra, quiet=True, **flags):
    """train.py's argv for a short micro run on `data`, writing under tmp/out and tmp/logs/<run>: batch 32, one
    epoch, no loader workers, no mid-run eval. flags (name=value) replace those values or add options; extra goes
    last, as given (argparse: the last of a repeated option wins)."""
    opts = {"preset": "micro", "batch": 32, "epochs": 1, "max_lr": 3e-3, "workers": 0, "eval_every": 0,
            "ckpt_every": 5, **flags}
    return (["--data", str(data), *(x for k, v in opts.items() for x in (f"--{k}", str(v)))]
            + ["--out", str(tmp / "out"), "--log_dir", str(tmp / "logs"), "--run_name", run]
            + (["--quiet"] if quiet else []) + list(extra))


def metrics(tmp, run, split=None):
    """The records of tmp/logs/<run>/metrics.jsonl, or those of one split."""
    with open(tmp / "logs" / run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if split in (None, r["split"])]


def gloo_ranks(tmp, body, world_size=2):
    """Run `body` (Python source; `train`, `rank` and `dist` are defined) in world_size processes joined in a gloo
    group (a file store under tmp) -> each rank's stdout; every process must exit 0."""
    script = f"""
import os, signal, sys
import torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import train
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp / 'store'}", rank=rank, world_size={world_size})
{body}
dist.destroy_process_group()  # exiting with the group alive can abort in gloo's teardown ("terminate called ...")
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(world_size)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world_size
    return outs


def usage_error(argv, script="train.py", process=False):
    """A script's refusal of argv: exit 2 and no traceback -> its stderr (the one line). Its main(argv) runs in this
    process, where a traceback would be an exception that fails the test; process=True starts `python script` as a
    user does (the same check through the command line, at the price of a torch import)."""
    if process:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        importlib.import_module(script.removesuffix(".py")).main(argv)
    assert e.value.code == 2, err.getvalue()
    return err.getvalue()
