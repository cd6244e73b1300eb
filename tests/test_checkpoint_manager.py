import glob
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoint_manager
from checkpoint_manager import (CheckpointManager, load, load_model, load_partial, resolve, rng_state,
                                save_atomic, set_rng_state, strip_prefixes)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("how", ["save", "save_async"])
def test_atomic_save_survives_kill_9(tmp_path, how):
    mgr = CheckpointManager(tmp_path)
    mgr.save({"w": torch.ones(4)}, step=1)
    # a child overwrites step 1 with 200 MB (in the background thread for save_async); we SIGKILL it while the
    # temp file is being written
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {REPO!r})
from checkpoint_manager import CheckpointManager
mgr = CheckpointManager({str(tmp_path)!r})
mgr.{how}({{"w": torch.full((50_000_000,), 2.0)}}, step=1)
mgr.wait()
"""])
    deadline = time.time() + 60
    tmp = None
    while time.time() < deadline and child.poll() is None:
        tmps = glob.glob(os.path.join(mgr.dir, f"step_00000001.pt.tmp{child.pid}"))  # <file>.tmp<pid>
        if tmps and os.path.getsize(tmps[0]) > 20_000_000:  # it exists and has grown: mid-write
            tmp = tmps[0]
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    child.wait()
    assert tmp is not None and child.returncode == -signal.SIGKILL, "child was not killed mid-write"
    assert os.path.exists(tmp)  # the half-written temp file is left behind...
    for p in (mgr.latest(), os.path.join(mgr.dir, "step_00000001.pt")):
        assert torch.equal(load(p)["w"], torch.ones(4))  # ...but the old checkpoint is whole
    assert mgr.latest() == os.path.join(mgr.dir, "latest.pt")
    mgr.save({"w": torch.zeros(2)}, step=2)
    assert not glob.glob(os.path.join(mgr.dir, "*.tmp*"))  # ...and cleaned by the next save (its writer is dead)


def test_save_atomic_roundtrip(tmp_path):
    p = tmp_path / "sub" / "x.pt"
    save_atomic({"a": torch.arange(3), "b": [1, 2.5, "s"], "c": {"d": None}}, p)
    d = load(str(p))
    assert torch.equal(d["a"], torch.arange(3)) and d["b"] == [1, 2.5, "s"] and d["c"] == {"d": None}
    assert os.listdir(tmp_path / "sub") == ["x.pt"]


def test_keep_n_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for step in (10, 20, 30, 40):
        mgr.save({"step": step}, step=step)
        assert load(mgr.latest())["step"] == step
    names = sorted(os.listdir(mgr.dir))
    assert names == ["latest.pt", "step_00000030.pt", "step_00000040.pt"]
    assert resolve("latest", tmp_path) == mgr.latest()
    assert resolve(os.path.join(mgr.dir, "step_00000030.pt"), tmp_path).endswith("step_00000030.pt")


def test_save_async_writes_the_state_as_it_was_when_called(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    w = torch.zeros(1000)
    for step in (1, 2, 3):
        w.fill_(step)
        path = mgr.save_async({"model": {"w": w}, "step": step}, step=step, val_loss=4.0 - step)
        w.fill_(-1)  # training goes on changing the tensor while the thread writes
        assert path.endswith(f"step_{step:08d}.pt")
    mgr.wait()
    assert torch.equal(load(mgr.latest())["model"]["w"], torch.full((1000,), 3.0))
    assert sorted(os.listdir(mgr.dir)) == ["best.pt", "latest.pt", "step_00000002.pt", "step_00000003.pt"]
    assert load(os.path.join(mgr.dir, "best.pt"))["best_val_loss"] == 1.0
    mgr.save({"step": 4}, step=4)  # a synchronous save after async ones: same folder, same rules
    assert load(mgr.latest())["step"] == 4 and len(mgr.step_files()) == 2


def test_a_failed_background_write_is_raised_in_the_caller(tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_manager, "save_atomic", full_disk)
    mgr = CheckpointManager(tmp_path)
    mgr.save_async({"step": 1}, step=1)
    with pytest.raises(OSError, match="No space left"):  # the write's own error: train.py says it in one line
        mgr.wait()
    mgr.wait()  # reported once


def test_step_files_ignore_names_that_do_not_parse(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    os.makedirs(mgr.dir)
    for name in ("step_00000010_backup.pt", "step_final.pt", "step_00000005.pt.bak"):
        open(os.path.join(mgr.dir, name), "w").close()
    for step in (20, 30):
        mgr.save({"step": step}, step=step)
    assert mgr.step_files() == [os.path.join(mgr.dir, "step_00000030.pt")]
    assert sorted(os.listdir(mgr.dir)) == ["latest.pt", "step_00000005.pt.bak", "step_00000010_backup.pt",
                                           "step_00000030.pt", "step_final.pt"]  # keep-N leaves other names alone


def test_newest_finite_skips_poisoned_weights(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=5)
    assert mgr.newest_finite() is None
    mgr.save({"model": {"w": torch.ones(3), "n": torch.tensor(7)}}, step=1)
    mgr.save({"model": {"w": torch.tensor([1.0, float("inf"), 1.0])}}, step=2)
    mgr.save({"model": {"w": torch.tensor([float("nan")] * 3)}}, step=3)
    assert mgr.newest_finite() == os.path.join(mgr.dir, "step_00000001.pt")


def test_best_follows_lowest_val_loss(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    for step, vl in [(1, 3.0), (2, 2.0), (3, 2.5), (4, None), (5, 1.5), (6, 1.7)]:
        mgr.save({"step": step}, step=step, val_loss=vl)
    best = load(os.path.join(mgr.dir, "best.pt"))
    assert best["step"] == 5 and best["best_val_loss"] == 1.5
    assert load(mgr.latest())["step"] == 6 and load(mgr.latest())["best_val_loss"] == 1.5
    # keep=1 deleted step 5's file; best.pt is its own link and survives
    assert sorted(os.listdir(mgr.dir)) == ["best.pt", "latest.pt", "step_00000006.pt"]
    # a fresh manager (a resumed run) knows the best from best.pt: 1.6 is not a new best, 1.4 is
    mgr2 = CheckpointManager(tmp_path)
    mgr2.save({"step": 7}, step=7, val_loss=1.6)
    assert load(os.path.join(mgr.dir, "best.pt"))["step"] == 5
    mgr2.save({"step": 8}, step=8, val_loss=1.4)
    assert load(os.path.join(mgr.dir, "best.pt"))["step"] == 8
    # the best carried in the state counts too
    mgr3 = CheckpointManager(tmp_path / "other")
    mgr3.save({"step": 1, "best_val_loss": 1.0}, step=1, val_loss=2.0)
    assert not os.path.exists(os.path.join(mgr3.dir, "best.pt"))
    assert load(mgr3.latest())["best_val_loss"] == 1.0


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_rejects_pickled_objects_and_bad_files(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)  # plain pickle of an arbitrary callable
    with pytest.raises(ValueError, match="evil.pt"):
        load(str(p))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load(str(tmp_path / "nope.pt"))
    bad = tmp_path / "trunc.pt"
    torch.save({"w": torch.ones(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated, as by a crashed non-atomic write
    with pytest.raises(ValueError, match="trunc.pt"):
        load(str(bad))
    (tmp_path / "pk.pt").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="pk.pt"):
        load(str(tmp_path / "pk.pt"))
    with pytest.raises(FileNotFoundError):
        resolve("latest", tmp_path)


def test_strip_prefixes():
    sd = {"module._orig_mod.a.weight": 1, "_orig_mod.module.module.b": 2, "c.module.d": 3, "e": 4}
    assert strip_prefixes(sd) == {"a.weight": 1, "b": 2, "c.module.d": 3, "e": 4}


def test_load_partial_report():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # keys 0.weight 0.bias 1.weight 1.bias
    dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 1))
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    sd["extra.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    r = load_partial(dst, sd, ignore_keys=[r"^0\.bias$"], quiet=True)
    assert r.ignored == ["0.bias"]
    assert r.mismatched == ["1.weight", "1.bias"]  # (2, 4) vs (5, 4)
    assert r.unexpected == ["extra.weight"]
    assert sorted(r.missing) == ["2.bias", "2.weight"]
    new = dst.state_dict()
    assert torch.equal(new["0.weight"], src.state_dict()["0.weight"])  # loaded
    for k in ("0.bias", "1.weight", "2.weight"):
        assert torch.equal(new[k], before[k])  # left alone


def test_rng_roundtrip(tmp_path):
    torch.manual_seed(1); np.random.seed(1); random.seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state, the tricky part
    np.random.standard_normal()

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.standard_normal(),
                [random.random() for _ in range(3)], random.gauss(0, 1))

    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    a = draw()
    assert draw() != a
    set_rng_state(load(str(tmp_path / "r.pt"))["rng"])  # through disk with weights_only=True
    assert draw() == a


def test_load_model(tmp_path):
    import clip  # here, so the other tests do not depend on the model code
    cfg = clip.get_config("tiny", vocab_size=300, img_size=32)
    torch.manual_seed(0)
    model = clip.CLIP(cfg)
    compiled_like = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    CheckpointManager(tmp_path).save({"model": compiled_like, "config": cfg.to_dict()}, step=5)
    m2, ckpt = load_model(resolve("latest", tmp_path))
    assert not m2.training and ckpt["config"] == cfg.to_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
