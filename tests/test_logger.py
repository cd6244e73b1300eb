import json
import os
import subprocess
import sys

import numpy as np
import torch

from logger import Logger, plot_run, plot_runs, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == PNG


def fake_run(log_dir, steps=20, val_every=5, eval_metrics=True, scale=1.0):
    lg = Logger(log_dir, config={"preset": "tiny", "lr": 1e-3}, quiet=True)
    for s in range(1, steps + 1):
        lg.log(s, loss=scale * 4.0 / s, lr=1e-3 * s / steps, grad_norm=1.0 + s / 10, logit_scale=14.3)
        if s % val_every == 0:
            extra = {"zeroshot_top1": s / 100, "i2t_R@1": s / 50} if eval_metrics else {}
            lg.log(s, split="val", loss=scale * 5.0 / s, **extra)
    lg.close()
    return lg


def test_records_roundtrip(tmp_path):
    lg = Logger(tmp_path / "run", config={"batch": 8, "device": torch.device("cpu")}, quiet=True)
    lg.log(1, loss=torch.tensor(2.5), lr=np.float32(0.5), grad_norm=3)
    lg.log(1, split="val", loss=2.0, **{"i2t_R@1": 0.25})
    # flushed per line: readable before close
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "split": "train", "loss": 2.5, "lr": 0.5, "grad_norm": 3},
        {"step": 1, "split": "val", "loss": 2.0, "i2t_R@1": 0.25}]
    lg.close()
    assert json.load(open(tmp_path / "run" / "config.json")) == {"batch": 8, "device": "cpu"}


def test_resume_keeps_each_step_once(tmp_path):
    d = tmp_path / "run"
    fake_run(d, steps=10, val_every=5)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "split": "tr')  # killed mid-line
    lg = Logger(d, resume_step=6, quiet=True)  # checkpoint was at step 6; steps 7.. are redone
    for s in range(7, 13):
        lg.log(s, loss=1.0)
    lg.close()
    recs = read_metrics(d / "metrics.jsonl")
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in recs if r["split"] == "val"] == [5]  # the step-10 val is gone
    assert [r["loss"] for r in recs if r["split"] == "train"][5:] == [4.0 / 6] + [1.0] * 6
    # a fresh (non-resumed) run in the same directory starts a fresh log
    Logger(d, quiet=True).log(1, loss=9.0)
    assert read_metrics(d / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 9.0}]


def test_console_line(tmp_path, capsys):
    lg = Logger(tmp_path, total_steps=100, print_every=2)
    lg.log(1, loss=3.0)
    assert capsys.readouterr().out == ""  # only every 2nd train call prints
    lg.log(2, loss=3.21544, lr=2.9e-4, grad_norm=1.234, logit_scale=14.28, samples_per_s=1234.4, mfu=0.412)
    out = capsys.readouterr().out.strip()
    assert out.startswith("step 2/100 | loss 3.2154 | lr 2.9e-04 | gnorm 1.23 | scale 14.3 | "
                          "1234 samples/s | mfu 41.2% | eta ")
    lg.log(2, split="val", loss=2.5, zeroshot_top1=0.125)
    assert capsys.readouterr().out.strip() == "val step 2/100 | loss 2.5000 | zeroshot_top1 0.125"
    Logger(tmp_path / "q", quiet=True).log(5, split="val", loss=1.0)
    assert capsys.readouterr().out == ""


def test_plots_are_pngs(tmp_path):
    d = tmp_path / "run"
    fake_run(d)
    written = plot_run(d)
    names = ["loss.png", "lr.png", "grad_norm.png", "logit_scale.png", "eval.png"]
    assert sorted(os.path.basename(p) for p in written) == sorted(names)
    assert all(is_png(d / n) for n in names)
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    # a run with only a train loss: just loss.png, the rest are skipped quietly
    lg = Logger(tmp_path / "bare", quiet=True)
    lg.log(1, loss=1.0)
    assert [os.path.basename(p) for p in lg.plot()] == ["loss.png"]
    out = plot_runs([d, tmp_path / "bare"], tmp_path / "cmp.png")
    assert is_png(out)


def test_cli_compare_and_replot(tmp_path):
    fake_run(tmp_path / "a")
    fake_run(tmp_path / "b", scale=0.5, eval_metrics=False)
    r = subprocess.run([sys.executable, os.path.join(REPO, "logger.py"), "a", "b"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "compare.png")
    r = subprocess.run([sys.executable, os.path.join(REPO, "logger.py"), str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "b" / "loss.png") and not os.path.exists(tmp_path / "b" / "eval.png")


def test_cli_bad_dir(tmp_path):
    fake_run(tmp_path / "a")
    r = subprocess.run([sys.executable, os.path.join(REPO, "logger.py"), str(tmp_path / "a"),
                        str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "missing" in errors[0] and "metrics.jsonl" in errors[0]
    assert "Traceback" not in r.stderr


def test_disabled_writes_nothing(tmp_path, capsys):
    lg = Logger(tmp_path / "rank1", config={"a": 1}, total_steps=10, print_every=1, enabled=False)
    lg.log(1, loss=1.0)
    lg.log(1, split="val", loss=1.0)
    assert lg.plot() == []
    lg.close()
    assert not os.path.exists(tmp_path / "rank1")
    assert capsys.readouterr().out == ""
