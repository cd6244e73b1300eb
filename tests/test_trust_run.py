"""Runs and files a user can trust: a run folder belongs to one run, writers respect their target, SIGTERM/Ctrl-C
save a checkpoint, a resume knows its data, and user mistakes are one line (issue 24)."""
import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import checkpoint_manager as cm
import clip
import dataloader
import eval_zeroshot
import logger
import train
from conftest import gloo_ranks
from conftest import train_argv as argv  # its defaults are this file's runs
from dataloader import read_index, save_json, write_tar
from files import atomic_write, temp_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # (HF_*_OFFLINE come from conftest's os.environ)


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def temps(*folders):
    """Temp files atomic_write left behind (<name>.tmp<pid>) anywhere under folders."""
    return [os.path.join(d, f) for folder in folders for d, _, fs in os.walk(folder) for f in fs
            if temp_writer(f) is not None]


def one_line_error(capsys, code=2):
    """The SystemExit(2) of parser.error: its message is the last stderr line, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


# -----------------------------------------------------------------------------
# writers that respect the target


def write_all(path):
    """The project's atomic writers, each writing `path` once."""
    logger.write_atomic(path, "text\n")
    save_json(path, {"a": 1})
    write_tar(path, [("000000001", {"txt": b"a cat"})])
    cm.save_atomic({"w": torch.ones(2)}, path)
    fig, _ = logger._figure("t", "y")
    logger.save_figure(fig, path)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.bin", tmp_path / "link.bin"
    target.write_text("old")
    link.symlink_to(target)
    write_all(str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the last writer's bytes landed in the target
    (tmp_path / "dangling").symlink_to(tmp_path / "new.json")  # a link to a file yet to be made: made there
    save_json(str(tmp_path / "dangling"), [1])
    assert json.loads((tmp_path / "new.json").read_text()) == [1] and (tmp_path / "dangling").is_symlink()
    cm.CheckpointManager(str(tmp_path / "run")).save({"step": 1}, step=1)  # latest.pt written through a link too
    ckpt = tmp_path / "run" / "ckpt"
    os.replace(ckpt / "latest.pt", tmp_path / "kept.pt")
    (ckpt / "latest.pt").symlink_to(tmp_path / "kept.pt")
    cm.CheckpointManager(str(tmp_path / "run")).save({"step": 2}, step=2)
    assert (ckpt / "latest.pt").is_symlink() and cm.load(str(tmp_path / "kept.pt"))["step"] == 2


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a fifo"])
def test_outputs_that_are_not_regular_files_are_refused(tmp_path, kind):
    fifo, out = tmp_path / "fifo", tmp_path / "out"
    if kind == "folder":
        out.mkdir()
    else:
        os.mkfifo(fifo)
        if kind == "link to a fifo":
            out.symlink_to(fifo)
    path = fifo if kind == "fifo" else out
    for write in (lambda p: logger.write_atomic(p, "x"), lambda p: save_json(p, {}), lambda p: write_tar(p, []),
                  lambda p: cm.save_atomic({}, p)):
        with pytest.raises(FileExistsError, match="not a regular file; not replacing it"):
            write(str(path))
    assert sorted(os.listdir(tmp_path)) == {"fifo": ["fifo"], "folder": ["out"], "link to a fifo": ["fifo", "out"]}[kind]
    assert out.is_dir() if kind == "folder" else stat.S_ISFIFO(os.stat(fifo).st_mode)
    if kind == "fifo":  # the logger appends to metrics.jsonl: a FIFO there would block it for ever, so it is refused
        os.rename(fifo, tmp_path / "metrics.jsonl")
        with pytest.raises(FileExistsError):
            logger.Logger(str(tmp_path))


def test_the_logger_cli_says_a_fifo_out_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    os.mkfifo(tmp_path / "cmp.png")
    with pytest.raises(SystemExit) as e:
        logger.main([str(run), str(run), "--out", str(tmp_path / "cmp.png")])
    line = one_line_error(capsys)
    assert e.value.code == 2 and line.endswith("cmp.png: exists and is not a regular file; not replacing it")
    assert stat.S_ISFIFO(os.stat(tmp_path / "cmp.png").st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_new_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        mgr = cm.CheckpointManager(str(tmp_path / "run"))
        mgr.save({"w": torch.ones(1)}, step=1, val_loss=1.0)
        paths = [tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.tar", tmp_path / "d.png"]
        logger.write_atomic(paths[0], "x")
        save_json(paths[1], {})
        write_tar(paths[2], [])
        logger.save_figure(logger._figure("t", "y")[0], paths[3])
        paths += [mgr.dir + "/" + n for n in ("step_00000001.pt", "latest.pt", "best.pt")]
    finally:
        os.umask(old)
    assert {oct(stat.S_IMODE(os.stat(p).st_mode)) for p in paths} == {oct(0o666 & ~umask)}  # not 0o600


def test_a_failed_write_leaves_no_temp_file_and_names_the_target(tmp_path, monkeypatch):
    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left") as e:
        cm.save_atomic({"w": torch.ones(1)}, tmp_path / "x.pt")
    assert e.value.filename == tmp_path / "x.pt" and os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # any exit: Ctrl-C mid-write too
        with atomic_write(tmp_path / "y") as tmp:
            open(tmp, "w").write("partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def _write_many(path, text, n):
    for _ in range(n):
        logger.write_atomic(path, text)


def test_two_processes_writing_one_file_never_collide(tmp_path):
    """Each process has its own temp name (<file>.tmp<pid>): neither replaces or deletes the other's temp file."""
    path = str(tmp_path / "config.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, text * 5000, 200)) for text in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert open(path).read() in ("a" * 5000, "b" * 5000) and os.listdir(tmp_path) == ["config.json"]


def test_the_checkpoint_sweep_removes_dead_writers_temps_only(tmp_path):
    mgr = cm.CheckpointManager(str(tmp_path))
    os.makedirs(mgr.dir)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, alive = f"step_00000001.pt.tmp{dead_pid()}", f"step_00000002.pt.tmp{live.pid}"
        for name in (dead, alive, "notes.tmp"):
            open(os.path.join(mgr.dir, name), "w").close()
        mgr.save({"step": 3}, step=3)
        assert sorted(os.listdir(mgr.dir)) == sorted([alive, "notes.tmp", "latest.pt", "step_00000003.pt"])
    finally:
        live.kill()
        live.wait()


# -----------------------------------------------------------------------------
# a run folder belongs to one run


def test_a_second_run_into_the_same_folder_is_refused_and_loses_nothing(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "a", "--stop_at", "6")) == 0
    ckpt, metrics = tmp_path / "out" / "a" / "ckpt", tmp_path / "logs" / "a" / "metrics.jsonl"
    before = (sorted(os.listdir(ckpt)), lines(metrics), (ckpt / "best.pt").read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "a", "--stop_at", "3"))
    line = one_line_error(capsys)
    assert e.value.code == 2 and "already holds a run (checkpoints up to step_00000006.pt and metrics in" in line
    assert "--resume latest" in line and "--run_name" in line and "--overwrite" in line
    assert (sorted(os.listdir(ckpt)), lines(metrics), (ckpt / "best.pt").read_bytes()) == before
    assert not os.path.exists(tmp_path / "out" / "a" / "run.lock")  # the refused run gave its lock back
    # --overwrite: the earlier run is moved aside whole, and said where; the new run starts clean
    assert train.main(argv(synth, tmp_path, "a", "--stop_at", "3", "--overwrite")) == 0
    out = capsys.readouterr().out
    moved = [d for d in os.listdir(tmp_path / "out") if d.startswith("a.old-")]
    assert len(moved) == 1 and f"moved the earlier run aside (not deleted) to {tmp_path / 'out' / moved[0]} and " \
                               f"{tmp_path / 'logs' / moved[0]}" in out
    assert sorted(os.listdir(tmp_path / "out" / moved[0] / "ckpt")) == before[0]
    assert lines(tmp_path / "logs" / moved[0] / "metrics.jsonl") == before[1]
    assert [json.loads(r)["step"] for r in lines(metrics)] == [1, 2, 3, 3]  # 3 train steps and the final val
    assert cm.load(str(ckpt / "best.pt"))["step"] == 3  # not the earlier run's best
    with pytest.raises(SystemExit):  # --overwrite starts over; --resume continues: not both
        train.main(argv(synth, tmp_path, "a", "--overwrite", "--resume", "latest"))
    assert "give one of them" in one_line_error(capsys)


def test_a_metrics_only_folder_is_not_offered_a_resume(synth, tmp_path, capsys):
    (tmp_path / "logs" / "m").mkdir(parents=True)
    (tmp_path / "logs" / "m" / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    with pytest.raises(SystemExit):
        train.main(argv(synth, tmp_path, "m"))
    line = one_line_error(capsys)
    assert "already holds a run (metrics in" in line and "--resume" not in line


def write_lock(folder, pid, host=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.lock"), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "since": "2025-01-01 00:00:00"}, f)


def test_the_lock_refuses_a_live_run_and_takes_over_a_dead_ones(synth, tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "logs" / "l", live.pid)  # a live run of the same name, logging to the same folder
        with pytest.raises(SystemExit) as e:
            train.main(argv(synth, tmp_path, "l", "--stop_at", "2"))
        line = one_line_error(capsys)
        assert e.value.code == 2 and f"is in use by another run (pid {live.pid} on {socket.gethostname()}" in line
        assert not os.path.exists(tmp_path / "out" / "l" / "run.lock")  # the lock it had taken on out/ is released
    finally:
        live.kill()
        live.wait()
    write_lock(tmp_path / "out" / "l", dead_pid())  # killed with -9: its lock stays behind, with a dead pid
    write_lock(tmp_path / "logs" / "l", live.pid)  # now dead too
    assert train.main(argv(synth, tmp_path, "l", "--stop_at", "2")) == 0
    assert not os.path.exists(tmp_path / "out" / "l" / "run.lock") and not os.path.exists(tmp_path / "logs" / "l" / "run.lock")
    write_lock(tmp_path / "out" / "l", 1, host="another-node")  # another machine's run: its pid cannot be checked here
    with pytest.raises(SystemExit):
        train.main(argv(synth, tmp_path, "l", "--resume", "latest"))
    line = one_line_error(capsys)
    assert "pid 1 on another-node" in line and f"delete {tmp_path / 'out' / 'l' / 'run.lock'}" in line


def test_the_lock_names_this_process_while_the_run_trains(synth, tmp_path, monkeypatch):
    seen = []
    real = train.forward_backward

    def peek(*a, **k):
        seen.append([cm.read_lock(str(tmp_path / d / "k" / "run.lock")) for d in ("out", "logs")])
        return real(*a, **k)
    monkeypatch.setattr(train, "forward_backward", peek)
    assert train.main(argv(synth, tmp_path, "k", "--stop_at", "1")) == 0
    assert [(x["pid"], x["host"]) for x in seen[0]] == [(os.getpid(), socket.gethostname())] * 2


# -----------------------------------------------------------------------------
# preemption: SIGTERM / SIGINT finish the step, checkpoint, exit non-zero; the resume is bit-exact


def cli(data, tmp, run):
    return [sys.executable, os.path.join(ROOT, "train.py")] + argv(
        data, tmp, run, "--epochs", "1.25", "--workers", "1", "--log_every", "1", "--ckpt_every", "100")


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    """An uninterrupted 20-step run (loader worker on), in this process: one thread, as the subprocesses."""
    tmp = tmp_path_factory.mktemp("ref")
    assert train.main(cli(synth, tmp, "ref")[2:]) == 0
    return cm.load(str(tmp / "out" / "ref" / "ckpt" / "latest.pt")), lines(tmp / "logs" / "ref" / "metrics.jsonl")


def interrupt(args, metrics, sig, after_lines=3):
    """Start args in its own process group, send sig to the whole group (as Ctrl-C and torchrun do, so the loader
    worker gets it too) once `metrics` has after_lines lines; returns the CompletedProcess-like result."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            not (os.path.exists(metrics) and len(lines(metrics)) >= after_lines):
        time.sleep(0.005)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_resume_is_bit_exact(synth, tmp_path, reference, sig):
    """SIGTERM (a preemption) and Ctrl-C, sent to the whole process group; the SIGTERM run is then resumed and must
    equal the uninterrupted one bit for bit (the Ctrl-C checkpoint is the same save)."""
    args = cli(synth, tmp_path, "p")
    code, out, err = interrupt(args, tmp_path / "logs" / "p" / "metrics.jsonl", sig)
    assert code == 128 + sig, (code, err)
    assert err.strip() == ""  # no traceback, from the trainer or from the loader worker
    step = cm.load(str(tmp_path / "out" / "p" / "ckpt" / "latest.pt"))["step"]
    assert 3 <= step < 20, "the run finished before the signal"
    said = [l for l in out.splitlines() if l.startswith("stopped by")]
    assert said == [f"stopped by {signal.Signals(sig).name} after step {step}: saved "
                    f"{tmp_path / 'out' / 'p' / 'ckpt' / f'step_{step:08d}.pt'}; continue with --resume latest"]
    assert not os.path.exists(tmp_path / "out" / "p" / "run.lock")  # released on the way out
    if sig == signal.SIGINT:
        return
    assert train.main(args[2:] + ["--resume", "latest"]) == 0
    ref_ckpt, ref_metrics = reference
    final = cm.load(str(tmp_path / "out" / "p" / "ckpt" / "latest.pt"))
    assert final["step"] == 20 and all(torch.equal(ref_ckpt["model"][k], final["model"][k]) for k in final["model"])
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("samples_per_s", "data_ms", "elapsed_s")}
                          for r in rows]
    assert strip(lines(tmp_path / "logs" / "p" / "metrics.jsonl")) == strip(ref_metrics)  # every step once, same loss


def test_ctrl_c_during_the_setup_is_one_line(synth, tmp_path):
    args = cli(synth, tmp_path, "s")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    time.sleep(1.0)  # importing torch: long before the first step
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "interrupted before training: nothing was saved\n" or \
        (err == "" and "stopped by SIGINT" in out)  # (a fast machine: already in the loop)


def test_a_second_signal_stops_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # (the real one would end pytest)
    p = train.Preemption()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signum == signal.SIGTERM and p.agreed(False, "cpu") == signal.SIGTERM and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130] and capsys.readouterr().err == "second SIGINT: stopping now, without a checkpoint\n"
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ddp_ranks_agree_to_stop_at_the_same_step(tmp_path):
    """Only rank 1 was signalled; at the log step both ranks stop (an all-reduced flag)."""
    outs = gloo_ranks(tmp_path, """
p = train.Preemption()
print(p.agreed(True, "cpu"))
if rank == 1:
    os.kill(os.getpid(), signal.SIGTERM)
print(p.agreed(True, "cpu"))
p.restore()""")
    assert [o.split() for o in outs] == [["None", str(int(signal.SIGTERM))]] * 2


# -----------------------------------------------------------------------------
# a resume knows its data; --init knows its heads


def test_resume_on_other_data_is_refused(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "d", "--stop_at", "5")) == 0
    ckpt = cm.load(str(tmp_path / "out" / "d" / "ckpt" / "latest.pt"))
    assert ckpt["data_fingerprint"] == dataloader.data_fingerprint(synth, read_index(synth, "train"))
    assert ckpt["data_fingerprint"]["shard_sizes"] == [256, 256] and ckpt["data_fingerprint"]["source_sha256"] is None
    other = tmp_path / "other"
    shutil.copytree(synth, other)
    with open(other / "train-000001.tar", "ab") as f:  # same names, same samples per shard: other bytes
        f.write(bytes(1024))
    with pytest.raises(SystemExit) as e:
        train.main(argv(str(other), tmp_path, "d", "--resume", "latest"))
    line = one_line_error(capsys)
    assert e.value.code == 2 and "was trained on other data than" in line and "(shard sizes in bytes differ;" in line
    assert "--init" in line
    shutil.copyfile(os.path.join(synth, "train-000001.tar"), other / "train-000001.tar")
    (other / ".prep_state.json").write_text(json.dumps({"source": {"files": 3, "sha256": "ab" * 32}}))
    with pytest.raises(SystemExit):
        train.main(argv(str(other), tmp_path, "d", "--resume", "latest"))
    assert "(prep's source fingerprint differ;" in one_line_error(capsys)
    os.remove(other / ".prep_state.json")  # the very same data in another folder: it resumes
    assert train.main(argv(str(other), tmp_path, "d", "--resume", "latest", "--stop_at", "6")) == 0


def test_a_checkpoint_without_a_fingerprint_still_resumes_and_a_smaller_set_is_one_line(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "o", "--stop_at", "10")) == 0
    latest = str(tmp_path / "out" / "o" / "ckpt" / "latest.pt")
    old = cm.load(latest)
    del old["data_fingerprint"]  # as train.py wrote them before
    cm.save_atomic(old, latest)
    small = tmp_path / "small"
    shutil.copytree(synth, small)
    index = json.loads((small / "index.json").read_text())
    index["train"] = {"shards": ["train-000000.tar"], "shard_sizes": [256], "num_samples": 256}
    (small / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit) as e:  # its loader position (batch 10) is past this data's 8 batches
        train.main(argv(str(small), tmp_path, "o", "--resume", "latest"))
    assert e.value.code == 2 and "loader state batch 10 is outside 0..8" in one_line_error(capsys)
    assert train.main(argv(synth, tmp_path, "o", "--resume", "latest", "--stop_at", "11")) == 0


def openai_file(tmp_path, vision_width, text_width, heads):
    torch.manual_seed(0)
    cfg = clip.get_config("micro", vocab_size=500, quick_gelu=True)
    cfg.vision.width, cfg.vision.heads, cfg.text.width, cfg.text.heads = vision_width, heads[0], text_width, heads[1]
    model = clip.CLIP(clip.CLIPConfig.from_dict(cfg.to_dict()))
    path = tmp_path / "openai.pt"
    torch.save(cm.to_openai_state_dict(model), path)
    return str(path), model


def test_init_heads_are_inferred_and_said_or_asked_for(synth, tmp_path, capsys):
    path, model = openai_file(tmp_path, 128, 64, (2, 1))
    sd, cfg, _ = cm.load_init(path, quick_gelu=True)
    assert (cfg["vision"]["heads"], cfg["text"]["heads"]) == (2, 1)
    assert "assumed 2 image heads (width 128) and 1 text heads (width 64); if wrong, give them with --init_heads" \
        in capsys.readouterr().out
    path, model = openai_file(tmp_path, 32, 32, (2, 4))  # widths CLIP's rule cannot divide
    with pytest.raises(ValueError, match="cannot infer the vision tower's head count from its width 32"):
        cm.from_openai_state_dict(torch.load(path))  # not "heads must be a positive integer, got 0"
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "h", "--init", path, "--stop_at", "1"))
    line = one_line_error(capsys)
    assert e.value.code == 2 and "(image width 32, text width 32: not a multiple of CLIP's head width 64)" in line
    assert train.main(argv(synth, tmp_path, "h", "--init", path, "--init_heads", "2", "4", "--stop_at", "1",
                           "--max_lr", "1e-12")) == 0
    trained = cm.load(str(tmp_path / "out" / "h" / "ckpt" / "latest.pt"))
    assert (trained["config"]["vision"]["heads"], trained["config"]["text"]["heads"]) == (2, 4)
    ref = model.state_dict()
    assert torch.allclose(trained["model"]["visual.blocks.0.attn.qkv.weight"], ref["visual.blocks.0.attn.qkv.weight"],
                          atol=1e-6)
    assert cm.WIDE_VISION_HEADS[1280] == 16  # ViT-H-14: 16 heads of 80, not 1280 // 64 = 20


# -----------------------------------------------------------------------------
# the remaining tracebacks, one line each (exit 2)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--seed", str(2 ** 63)], "--seed must be in [0, 2**63)"),
    (["--context_length", "100000"], "--context_length must be >= 3 (start token, caption, end token) and <= 1024"),
    (["--init_heads", "2", "2"], "--init_heads IMAGE TEXT takes two positive head counts and applies only with --init"),
])
def test_out_of_range_flags_are_one_line(synth, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "x", *extra))
    assert e.value.code == 2 and message in one_line_error(capsys)


def broken_copy(synth, tmp_path, edit=None, shard=None):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    index = json.loads((data / "index.json").read_text())
    if edit:
        edit(index)
    (data / "index.json").write_text(json.dumps(index))
    if shard is not None:
        (data / "train-000001.tar").write_bytes(shard)
    return str(data)


@pytest.mark.parametrize("edit, shard, message", [
    (lambda i: i.update(img_size=100000), None, "has no valid img_size (got 100000; at most 1024 px)"),
    (None, b"<html>404 Not Found</html>", "shard train-000001.tar of split train is not a tar file"),
    (None, bytes(1024), "shard train-000001.tar of split train is not a tar file (or holds no member)"),
])
def test_bad_data_is_one_line(synth, tmp_path, capsys, edit, shard, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv(broken_copy(synth, tmp_path, edit, shard), tmp_path, "x"))
    assert e.value.code == 2 and message in one_line_error(capsys)


def test_an_index_without_num_samples_is_counted(synth, tmp_path):
    def drop(index):
        for split in ("train", "val"):
            del index[split]["num_samples"]
        del index["val"]["shard_sizes"]  # val: counted from the tar headers
    data = broken_copy(synth, tmp_path, drop)
    assert read_index(data, "val")["val"]["num_samples"] == 128 and read_index(data)["train"]["num_samples"] == 512
    assert train.main(argv(data, tmp_path, "n", "--stop_at", "2")) == 0
    assert [json.loads(r)["split"] for r in lines(tmp_path / "logs" / "n" / "metrics.jsonl")] == ["train", "train", "val"]


def refuse_writes_under(monkeypatch, folder, err=errno.EACCES):
    """A read-only (EACCES) or full (ENOSPC) folder, as the OS would say it: root ignores chmod, and tests touch no
    real device, so creating a file under `folder` fails here."""
    real = os.open

    def guarded(path, flags, *a, **k):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), path)
        return real(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", guarded)


@pytest.mark.parametrize("which", ["out", "logs"])
def test_a_read_only_folder_is_found_before_training(synth, tmp_path, monkeypatch, capsys, which):
    refuse_writes_under(monkeypatch, tmp_path / which)
    started = []
    monkeypatch.setattr(train, "forward_backward", lambda *a: started.append(1))
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "ro"))
    line = one_line_error(capsys)
    assert e.value.code == 2 and f"cannot write in {tmp_path / which / 'ro'} (Permission denied)" in line
    assert started == [] and not os.path.exists(tmp_path / "out" / "ro" / "run.lock")


def test_an_out_path_under_a_file_is_one_line(synth, tmp_path, capsys):
    (tmp_path / "out").write_text("a file where the folder should be")
    with pytest.raises(SystemExit):
        train.main(argv(synth, tmp_path, "f"))
    assert f"cannot write in {tmp_path / 'out' / 'f'} (Not a directory)" in one_line_error(capsys)


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, s):
        if len(s) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(s)
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("mode, room", [("w", 0), ("a", 600)])
def test_a_full_log_disk_is_one_line_and_leaves_no_temp_file(synth, tmp_path, monkeypatch, capsys, mode, room):
    """config.json at the start ("w": written atomically); metrics.jsonl after two lines ("a": appended)."""
    monkeypatch.setattr(logger, "open", lambda p, m="r", **k: FullDisk(open(p, m, **k), room) if m == mode
                        else open(p, m, **k), raising=False)
    assert train.main(argv(synth, tmp_path, "full", "--stop_at", "12")) == 2
    err = capsys.readouterr().err
    name = "config.json" if mode == "w" else "metrics.jsonl"
    assert err.splitlines()[-1] == f"error: {tmp_path / 'logs' / 'full' / name}: No space left on device"
    assert "Traceback" not in err and not temps(tmp_path) and not os.path.exists(tmp_path / "logs" / "full" / "run.lock")


@pytest.mark.parametrize("fail_at", [5, 12])
def test_a_full_checkpoint_disk_is_one_line_and_leaves_no_temp_file(synth, tmp_path, monkeypatch, capsys, fail_at):
    """Step 5's checkpoint is written in the background (its error is raised at the next save); 12's is the last."""
    real = torch.save

    def full_at(obj, f):
        if isinstance(obj, dict) and obj.get("step") == fail_at:
            with open(f, "wb") as out:
                out.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)
    monkeypatch.setattr(torch, "save", full_at)
    assert train.main(argv(synth, tmp_path, "ck", "--stop_at", "12")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: {tmp_path / 'out' / 'ck' / 'ckpt' / f'step_{fail_at:08d}.pt'}: No space left on device"
    assert "Traceback" not in err and not temps(tmp_path) and not os.path.exists(tmp_path / "out" / "ck" / "run.lock")


def test_a_device_this_machine_lacks_is_not_called_a_corrupt_checkpoint(synth, tmp_path, capsys):
    model = clip.CLIP(clip.get_config("micro", vocab_size=500))
    path = str(tmp_path / "m.pt")
    tok = dataloader.load_tokenizer(os.path.join(synth, "tokenizer.json"))
    cm.save_atomic({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict()}, path)
    for device in ("cpu:0", torch.device("cpu", 0)):  # the same device as "cpu"
        m, _ = cm.load_model(path, map_location=device)
        assert next(m.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="onto device cuda:0: that device is not available here") as e:
            cm.load(path, map_location="cuda:0")
        assert "corrupt" not in str(e.value)
    with pytest.raises(ValueError, match="onto device gpu: that device is not available here"):
        cm.load(path, map_location="gpu")
    results = eval_zeroshot.main(["--ckpt", path, "--data", synth, "--device", "cpu:0", "--out",
                                  str(tmp_path / "r.json"), "--workers", "0", "--quiet"])  # the audit's command
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
