"""Beyond one machine: ranks from SLURM's variables, two torchrun "nodes" on this machine (they train, every sample is
made into a batch exactly once per epoch across the ranks, a relaunch after both are killed continues bit-exactly, a
rank that dies is named by the other within seconds), the heartbeat watch of a rank that goes silent, --resume auto.
The multi-process tests are the slow ones: the micro preset, 512 samples, one torch thread per process."""

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint_manager as cm
import launch
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                        "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
ENV["OMP_NUM_THREADS"] = "1"  # one torch thread per process

# runs train.py's main() and records every sample a batch is made of ("epoch position shard index", per process);
# its own stdout/stderr go to worker-<rank>-<pid>.log, apart from torchrun's
DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
out, rank = {out!r}, os.environ.get("RANK") or os.environ["SLURM_PROCID"]
log = open(os.path.join(out, f"worker-{{rank}}-{{os.getpid()}}.log"), "w")
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
with open(os.path.join(out, f"pid-{{rank}}"), "w") as f:
    f.write(str(os.getpid()))
import dataloader, train
make = dataloader.BatchMaker.__call__
def recorded(self, epoch, positions, pairs):
    with open(os.path.join(out, f"seen-{{rank}}-{{os.getpid()}}"), "a") as f:
        f.writelines(f"{{epoch}} {{p}} {{s}} {{k}}\\n" for p, (s, k) in zip(positions.tolist(), pairs.tolist()))
    return make(self, epoch, positions, pairs)
dataloader.BatchMaker.__call__ = recorded
sys.exit(train.main())
"""


def argv(data, tmp, run="r", *extra):
    return ["--data", data, "--preset", "micro", "--batch", "16", "--epochs", "2", "--max_lr", "3e-3", "--workers", "0",
            "--eval_every", "0", "--ckpt_every", "4", "--out", str(tmp / "out"), "--log_dir", str(tmp / "logs"),
            "--run_name", run, "--quiet", *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def driver(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "driver.py").write_text(DRIVER.format(root=ROOT, out=str(folder)))
    return str(folder / "driver.py")


def torchrun_nodes(folder, args, tag=""):
    """Two torchrun "nodes" (--nnodes 2, --node_rank 0 and 1) of one process each, in their own sessions."""
    port, script = free_port(), driver(folder)
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              script] + args, cwd=ROOT, env=ENV, start_new_session=True, stderr=subprocess.STDOUT,
                             stdout=open(folder / f"node{n}{tag}.log", "w")) for n in (0, 1)]


def wait_for(path, procs, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline and all(p.poll() is None for p in procs), f"{path} never appeared"
        time.sleep(0.02)


def worker_log(folder, rank, pid=None):
    """The text a worker process wrote (the newest launch's, or the one of `pid`)."""
    logs = sorted(glob.glob(str(folder / f"worker-{rank}-{pid or '*'}.log")), key=os.path.getmtime)
    with open(logs[-1]) as f:
        return f.read()


def records(folder):
    """{(epoch, position): (rank, shard, sample)} over every launch in folder; a launch never makes a position twice,
    and launches that both made one (a relaunch redoing steps after the last checkpoint) made the same sample."""
    seen = {}
    for path in glob.glob(str(folder / "seen-*")):
        rank = int(os.path.basename(path).split("-")[1])
        rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
        assert len({(e, p) for e, p, _, _ in rows}) == len(rows), f"{path} made a position twice"
        for e, p, s, k in rows.tolist():
            assert seen.setdefault((e, p), (rank, s, k)) == (rank, s, k), (e, p)
    return seen


def test_launch_env_reads_slurm_when_torchrun_is_absent():
    slurm = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
             "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert launch.launch_env({}) == (None, 0, 0, 1, 1)
    assert launch.launch_env(slurm) == ("slurm", 11, 3, 16, 8)  # rank 11 is local rank 3 of the second node
    assert launch.launch_env({**slurm, "SLURM_NTASKS_PER_NODE": "4"})[4] == 4
    with pytest.raises(ValueError, match="SLURM started 2 tasks but MASTER_PORT is not set"):
        launch.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "node1"})
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert launch.launch_env({**slurm, **torchrun}) == ("torchrun", 5, 1, 8, 4)  # torchrun inside an allocation
    assert launch.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (None, 0, 0, 1, 1)  # sbatch, one task
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT are not set"):
        launch.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_slurm_tasks_without_a_rendezvous_are_one_line(shards8, tmp_path, monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(SystemExit) as e:
        train.main(argv(shards8, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "MASTER_ADDR and MASTER_PORT are not set" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_newest_valid_skips_broken_and_foreign_files(tmp_path):
    assert cm.resolve("auto", tmp_path) is None and cm.newest_valid(tmp_path) is None  # no folder yet
    mgr = cm.CheckpointManager(tmp_path)
    full = {k: 0 for k in cm.RESUME_KEYS}
    for step in (10, 20):
        mgr.save({**full, "step": step}, step)
    step_20 = os.path.join(mgr.dir, "step_00000020.pt")
    assert cm.resolve("auto", tmp_path) == step_20
    with open(os.path.join(mgr.dir, "step_00000030.pt"), "wb") as f:
        f.write(b"PK\x03\x04 cut off")  # a newer file that does not load
    torch.save({"model": {}}, os.path.join(mgr.dir, "step_00000040.pt"))  # loads, but not a run's whole state
    assert cm.newest_valid(tmp_path) == step_20
    os.unlink(step_20)  # (latest.pt is a hard link to it: still there)
    os.unlink(os.path.join(mgr.dir, "step_00000010.pt"))
    assert cm.newest_valid(tmp_path) == os.path.join(mgr.dir, "latest.pt")


def test_resume_auto_starts_fresh_then_continues_exactly(shards8, tmp_path, capsys):
    common = ["--batch", "32", "--epochs", "0.5"]  # 8 steps
    assert train.main(argv(shards8, tmp_path, "full", *common)) == 0
    assert train.main(argv(shards8, tmp_path, "auto", *common, "--resume", "auto", "--stop_at", "4")) == 0
    assert f"--resume auto: no checkpoint in {tmp_path / 'out' / 'auto' / 'ckpt'}, starting fresh" in capsys.readouterr().out
    assert train.main(argv(shards8, tmp_path, "auto", *common, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"--resume auto: continuing from {tmp_path / 'out' / 'auto' / 'ckpt' / 'step_00000004.pt'}" in out
    assert "resumed from step 4 of 8" in out
    a = cm.load(str(tmp_path / "out" / "full" / "ckpt" / "latest.pt"))
    b = cm.load(str(tmp_path / "out" / "auto" / "ckpt" / "latest.pt"))
    assert b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_auto_relaunch_of_a_run_killed_before_its_first_checkpoint(shards8, tmp_path, capsys):
    """Metrics but no checkpoint (killed early): --resume auto starts fresh and moves the attempt aside, kept."""
    common = ["--batch", "32", "--epochs", "0.5", "--ckpt_every", "100"]
    assert train.main(argv(shards8, tmp_path, "early", *common, "--stop_at", "3")) == 0
    for f in (tmp_path / "out" / "early" / "ckpt").iterdir():
        f.unlink()  # as if killed after some log lines and before any checkpoint
    capsys.readouterr()
    assert train.main(argv(shards8, tmp_path, "early", *common, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "starting fresh" in out and "moved the earlier run aside (not deleted) to" in out
    aside = [p for p in (tmp_path / "logs").iterdir() if p.name.startswith("early.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").stat().st_size > 0


def test_two_torchrun_nodes_see_every_sample_once_and_resume_exactly_after_both_are_killed(shards8, tmp_path):
    # the reference, in one go: 2 processes started as srun starts them (SLURM's variables, no torchrun)
    ref, port = tmp_path / "ref", free_port()
    script = driver(ref)
    slurm = [subprocess.Popen([sys.executable, "-u", script] + argv(shards8, tmp_path, "ref", "--resume", "auto"),
                              cwd=ROOT, env={**ENV, "SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
                                             "SLURM_NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    assert [p.wait(timeout=300) for p in slurm] == [0, 0], worker_log(ref, 0) + worker_log(ref, 1)
    assert f"launcher: SLURM srun (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; no torchrun variables), 2 processes, " \
           f"rendezvous 127.0.0.1:{port}" in worker_log(ref, 0)

    # two torchrun nodes sharing --out, both killed (agents and workers) once step 8's checkpoint is written ...
    run, args = tmp_path / "run", argv(shards8, tmp_path, "run", "--resume", "auto")  # 2 epochs of 16 steps of 2 x 16
    nodes = torchrun_nodes(run, args)
    ckpt = tmp_path / "out" / "run" / "ckpt"
    wait_for(ckpt / "step_00000008.pt", nodes)
    first = [int((run / f"pid-{r}").read_text()) for r in (0, 1)]
    for pid in first + [p.pid for p in nodes]:
        os.kill(pid, signal.SIGKILL)
    [p.wait() for p in nodes]
    assert not (ckpt / "step_00000032.pt").exists(), "the run ended before it could be killed"
    assert "--resume auto: no checkpoint in" in worker_log(run, 0, first[0])
    # ... and relaunched with the same command: it continues from the newest checkpoint, bit-exactly
    nodes = torchrun_nodes(run, args, tag="-relaunch")
    assert [p.wait(timeout=300) for p in nodes] == [0, 0], worker_log(run, 0) + worker_log(run, 1)
    assert "launcher: torchrun (RANK/LOCAL_RANK/WORLD_SIZE), 2 processes" in worker_log(run, 0)
    assert f"--resume auto: continuing from {ckpt}{os.sep}step_000000" in worker_log(run, 0)
    a, b = cm.load(str(tmp_path / "out" / "ref" / "ckpt" / "latest.pt")), cm.load(str(ckpt / "latest.pt"))
    assert a["step"] == b["step"] == 32 and b["world_size"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    # every sample made into a batch exactly once per epoch, across the two ranks; the same under both launchers
    seen = records(run)
    assert {k: v for k, v in records(ref).items() if k[0] < 2} == {k: v for k, v in seen.items() if k[0] < 2}
    for epoch in (0, 1):
        this = {p: v for (e, p), v in seen.items() if e == epoch}
        assert sorted(this) == list(range(512))  # positions 0..511 of the epoch's order
        assert sorted((s, k) for _, s, k in this.values()) == [(s, k) for s in range(8) for k in range(64)]
        assert sum(r == 0 for r, _, _ in this.values()) == 256  # half on each rank


def test_when_a_rank_dies_the_other_names_it_and_exits_in_seconds(shards8, tmp_path):
    run = tmp_path / "run"
    nodes = torchrun_nodes(run, argv(shards8, tmp_path, "run", "--epochs", "100"))
    ckpt = tmp_path / "out" / "run" / "ckpt"
    wait_for(ckpt / "step_00000008.pt", nodes)
    saved = max(cm.CheckpointManager(str(tmp_path / "out" / "run")).step_files())
    pid0 = int((run / "pid-0").read_text())
    t0 = time.time()
    os.kill(int((run / "pid-1").read_text()), signal.SIGKILL)
    assert nodes[0].wait(timeout=120) == 1
    took = time.time() - t0
    nodes[1].wait(timeout=60)
    log = worker_log(run, 0, pid0)
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 (on ") and "rank 0 exits" in lines[0], log
    assert "Traceback" not in log and "pair.cc" not in log  # gloo's traceback, file name and all, is gone
    assert took < launch.PEER_EXIT_S + 25, took  # the check takes PEER_EXIT_S; the rest is a loaded 2-core machine
    # nothing already saved is lost: every checkpoint file loads, the newest is at least what was there
    for p in glob.glob(str(ckpt / "*.pt")):
        assert cm.load(p)["step"] >= 4
    assert cm.load(str(ckpt / "latest.pt"))["step"] >= int(os.path.basename(saved)[5:13])


def test_a_silent_rank_is_named_after_the_heartbeat_timeout(tmp_path):
    """A rank that stops answering without closing its connections (SIGSTOP: a hung process or a lost node) makes no
    collective fail: the watch of the rank before it names it after silent_s."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist, launch
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
peers = launch.PeerWatch(rank, 2, silent_s=2)
print("watching", flush=True)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(120)
"""
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        assert procs[0].stdout.readline() == "watching\n"
        t0 = time.time()
        assert procs[0].wait(timeout=60) == 1
        assert time.time() - t0 < 2 + 15
        err = procs[0].stderr.read().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: rank 1 (on ") and "(no heartbeat for 2 s)" in err[0], err
    finally:
        procs[1].kill()
        procs[1].wait()
