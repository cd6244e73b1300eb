import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import logger
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
    lg.log(1, loss=3.0, elapsed_s=10.0)
    assert capsys.readouterr().out == ""  # only every 2nd train call prints
    lg.log(2, loss=3.21544, lr=2.9e-4, grad_norm=1.234, logit_scale=14.28, data_ms=0.06499, samples_per_s=1234.4,
           mfu=0.412, elapsed_s=10.5)
    out = capsys.readouterr().out.strip()
    # eta: 98 steps left at 0.5 s per step (10.0 s at step 1 -> 10.5 s at step 2) = 49 s
    assert out == ("step 2/100 | loss 3.2154 | lr 2.9e-04 | gnorm 1.23 | scale 14.3 | data_ms 0.1 | "
                   "1234 samples/s | mfu 41.2% | eta 0m49s")
    lg.log(2, split="val", loss=2.5, zeroshot_top1=0.125)
    assert capsys.readouterr().out.strip() == "val step 2/100 | loss 2.5000 | zeroshot_top1 0.125"
    Logger(tmp_path / "q", quiet=True).log(5, split="val", loss=1.0)
    assert capsys.readouterr().out == ""


def test_eta_formula_by_hand():
    assert logger.eta_s([(5.0, 10)], 100) is None  # one point: the first window (compile, warm-up) is not a rate
    assert logger.eta_s([(5.0, 10), (9.0, 20), (13.0, 30)], 100) == 40.0  # 8 s per 20 steps -> 100 steps in 40 s
    assert logger.eta_s([(5.0, 10), (5.0, 10)], 100) is None


def test_eta_agrees_with_tqdm_on_a_recorded_step_time_sequence(tmp_path):
    """train.py's pattern on a fixed sequence of step times shaped like the main command's run (702 steps of
    0.3 s +- 10%, a 20 s first step for the warm-up, an eval of 7 steps' time after steps 200, 400, 600): tqdm is
    updated after every step; every 10 steps the window's rows are logged at once, elapsed_s on its last row. After
    the first window, each console eta is within 10% of tqdm's and of the time the run really had left. The old eta
    (the wall clock at each log() call, over the last 20 rows, i.e. two windows) credited one window's time to 19
    steps: about half (the issue saw "eta 0m49s" at step 370 of 702 at 3.3 it/s)."""
    import io
    import random
    import re
    from tqdm import tqdm
    rng, total, now = random.Random(0), 702, [0.0]
    dts = [20.0] + [0.3 * rng.uniform(0.9, 1.1) for _ in range(total - 1)]  # seconds per step
    pause = {200: 2.1, 400: 2.1, 600: 2.1}  # an eval after the log at these steps
    end = sum(dts) + sum(pause.values())
    lg = Logger(tmp_path, total_steps=total, print_every=10, quiet=True)
    bar = tqdm(total=total, file=io.StringIO())
    bar._time = lambda: now[0]  # tqdm's clock, faked
    bar.start_t = bar.last_print_t = 0.0
    logged, calls, checks = 0, [], []
    for step in range(1, total + 1):
        now[0] += dts[step - 1]
        bar.update(1)
        if step % 10 and step != total:
            continue
        for s in range(logged + 1, step + 1):  # the window's rows, logged together when it is read
            lg.log(s, loss=1.0, **({"elapsed_s": now[0]} if s == step else {}))
            calls.append((now[0], s))
        logged = step
        m = re.search(r"eta (\d+)m(\d+)s$", lg.format({"step": step, "split": "train"}))
        if 10 < step < total:
            eta, left = 60 * int(m[1]) + int(m[2]), end - now[0]
            checks.append((eta, (total - step) / bar.format_dict["rate"], left))
        if step == 370:
            (t0, s0), (t1, s1) = calls[-20], calls[-1]
            assert 0.45 < (total - step) * (t1 - t0) / (s1 - s0) / (eta + 1) < 0.6  # the old formula
        now[0] += pause.get(step, 0.0)
    assert len(checks) == 69  # within 10%, plus the 1 s the console line shows
    assert all(abs(eta - tq) <= 0.1 * tq + 1 and abs(eta - left) <= 0.1 * left + 1 for eta, tq, left in checks), checks
    bar.close()


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


def test_read_metrics_skips_and_counts_what_is_not_a_record(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "val", "loss": 1.5}]
    lines = [json.dumps(good[0]), "[1, 2]", '"x"', "3", json.dumps({"split": "train", "loss": 1.0}),
             json.dumps({"step": "4", "split": "train"}), json.dumps({"step": True, "split": "train"}),
             json.dumps({"step": 5, "loss": 1.0}), json.dumps(good[1])]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 6, "split": "tr\xff\xfe"}\n{"step": 7, "sp')
    assert read_metrics(path) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path}: skipped 9 unreadable line(s) (3 not a JSON object, 3 no numeric step, "
                   f"1 no split, 2 not JSON)"]
    # a resume over such a file keeps the good records and does not crash on the others
    lg = Logger(tmp_path, resume_step=1, quiet=True)
    lg.log(2, loss=0.5)
    lg.close()
    assert read_metrics(path) == [good[0], {"step": 2, "split": "train", "loss": 0.5}]


def run_cli(argv, capsys):
    """logger.main in-process -> (exit code, stdout, stderr)."""
    try:
        logger.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "nope: no such run directory (a folder holding metrics.jsonl)"),
    ("no_metrics", "no metrics.jsonl in this directory"),
    ("empty", "has no records"),
    ("not_records", "has no records"),
    ("no_metric", "nothing to plot"),
    ("out_missing_folder", "does not exist"),
    ("out_is_dir", "is a directory"),
    ("compare_no_loss", "no run has a train or val loss"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case, message):
    fake_run(tmp_path / "a", steps=5)
    run = tmp_path / "r"
    run.mkdir()
    argv = [run]
    if case == "missing_dir":
        argv = [tmp_path / "nope"]
    elif case == "empty":
        (run / "metrics.jsonl").write_text("")
    elif case == "not_records":
        (run / "metrics.jsonl").write_text('[1, 2]\n"x"\n{"split": "train", "loss": 1}\n')
    elif case in ("no_metric", "compare_no_loss"):
        (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "samples_per_s": 10}\n')
        argv = [run] if case == "no_metric" else [run, run, "--out", tmp_path / "c.png"]
    elif case == "out_missing_folder":
        argv = [tmp_path / "a", tmp_path / "a", "--out", tmp_path / "no" / "such" / "c.png"]
    elif case == "out_is_dir":
        argv = [tmp_path / "a", "--out", tmp_path]
    code, out, err = run_cli(argv, capsys)
    errors = [l for l in err.splitlines() if "error:" in l]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "a" / "loss.png").exists()  # nothing was plotted before the check


def test_cli_in_process_replot_and_compare(tmp_path, capsys):
    fake_run(tmp_path / "a", steps=5)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tr')  # a run killed mid-line still plots, with one warning
    code, out, err = run_cli([tmp_path / "a"], capsys)
    assert code == 0 and out.count("wrote") == 5 and "skipped 1 unreadable line(s) (1 not JSON)" in err
    code, out, err = run_cli([tmp_path / "a", tmp_path / "a", "--out", tmp_path / "c.png"], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'c.png'}" and is_png(tmp_path / "c.png")


def test_disabled_writes_nothing(tmp_path, capsys):
    lg = Logger(tmp_path / "rank1", config={"a": 1}, total_steps=10, print_every=1, enabled=False)
    lg.log(1, loss=1.0)
    lg.log(1, split="val", loss=1.0)
    assert lg.plot() == []
    lg.close()
    assert not os.path.exists(tmp_path / "rank1")
    assert capsys.readouterr().out == ""
