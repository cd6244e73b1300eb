import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint_manager as cm
import clip
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv(data, tmp, run="r", *extra):
    return ["--data", data, "--preset", "micro", "--batch", "32", "--epochs", "1", "--max_lr", "3e-3",
            "--workers", "0", "--eval_every", "0", "--ckpt_every", "5", "--out", str(tmp / "out"),
            "--log_dir", str(tmp / "logs"), "--run_name", run, "--quiet", *extra]


def metrics(tmp, run):
    with open(tmp / "logs" / run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def final_weights(tmp, run):
    return cm.load(str(tmp / "out" / run / "ckpt" / "latest.pt"))["model"]


def test_lr_schedule_by_hand():
    lr = lambda s: train.lr_at(s, 100, 1.0, 0.1, 0.1)
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # linear warmup over 10 steps
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)  # cosine starts at max_lr ...
    assert lr(55) == pytest.approx(0.1 + 0.9 * 0.5)  # ... is half way down half way through ...
    assert lr(100) == pytest.approx(0.1)  # ... and ends at min_lr_frac * max_lr
    assert train.lr_at(0, 10, 1.0, 0.0, 0.0) == pytest.approx(1.0)  # no warmup


@pytest.mark.parametrize("flags", [[], ["--long"], ["--distill", "kd"], ["--distill", "mse"], ["--distill", "icl"]])
def test_accumulation_gives_the_big_batch_gradient(flags):
    """GradCache: 4 micro-batches of 3 = one batch of 12, for the plain, Long-CLIP and distillation losses."""
    torch.manual_seed(0)
    model = clip.CLIP(clip.get_config("micro", vocab_size=300, teacher_dim=24 if "--distill" in flags else 0))
    images = torch.randn(12, 3, 32, 32)
    tokens = torch.randint(1, 298, (12, 32))
    tokens[:, 9] = 299
    inputs = (images, tokens) + ((tokens.roll(1, dims=0),) if "--long" in flags else ())
    batch = {"teacher_image": torch.nn.functional.normalize(torch.randn(12, 24), dim=-1),
             "teacher_text": torch.nn.functional.normalize(torch.randn(12, 24), dim=-1)}
    loss_fn = train.make_loss(train.get_parser().parse_args(flags + ["--long_pca", "4"]), model)
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        loss, terms = train.forward_backward(model, inputs, accum, contextlib.nullcontext(), loss_fn, batch)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l4, g4) = grads
    assert l1.item() == pytest.approx(l4.item(), abs=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n
    assert g1["logit_scale"].abs().item() > 0
    if flags:
        assert len(terms) == 2 and all(torch.isfinite(v) for v in terms.values())


def test_stop_and_resume_is_bitwise_identical(synth, tmp_path):
    assert train.main(argv(synth, tmp_path, "full", "--epochs", "1.25")) == 0  # 20 steps of 32
    assert train.main(argv(synth, tmp_path, "split", "--epochs", "1.25", "--stop_at", "10")) == 0
    assert cm.load(str(tmp_path / "out" / "split" / "ckpt" / "latest.pt"))["step"] == 10
    best = cm.load(str(tmp_path / "out" / "split" / "ckpt" / "best.pt"))  # evaluated at the stop step
    assert best["step"] == 10 and best["best_val_loss"] is not None
    assert train.main(argv(synth, tmp_path, "split", "--epochs", "1.25", "--resume", "latest")) == 0
    a, b = final_weights(tmp_path, "full"), final_weights(tmp_path, "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(tmp_path, "split") if r["split"] == "train"]
    assert steps == list(range(1, 21))
    losses = lambda run: [r["loss"] for r in metrics(tmp_path, run) if r["split"] == "train"]
    assert losses("full") == losses("split")
    assert losses("full")[-1] < losses("full")[0]


def test_sigkill_after_a_checkpoint_then_resume(synth, tmp_path):
    # an uninterrupted reference, in a subprocess like the killed run (same code path, loader workers on)
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    args = argv(synth, tmp_path, "ref", "--epochs", "2.5", "--workers", "1", "--ckpt_every", "10", "--batch", "64")
    subprocess.run(cmd + args, check=True, cwd=ROOT, capture_output=True)  # 20 steps
    args = argv(synth, tmp_path, "kill", "--epochs", "2.5", "--workers", "1", "--ckpt_every", "10", "--batch", "64")
    proc = subprocess.Popen(cmd + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt10 = tmp_path / "out" / "kill" / "ckpt" / "step_00000010.pt"
    deadline = time.time() + 120
    while not ckpt10.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)  # let it run a few more steps (logged, never checkpointed) before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "out" / "kill" / "ckpt" / "step_00000020.pt").exists()
    subprocess.run(cmd + args + ["--resume", "latest"], check=True, cwd=ROOT, capture_output=True)
    a, b = final_weights(tmp_path, "ref"), final_weights(tmp_path, "kill")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(tmp_path, "kill") if r["split"] == "train"]
    assert steps == list(range(1, 21))


def test_ddp_two_processes_match_one(synth, tmp_path):
    """torchrun with 2 gloo processes of batch 16 = 1 process of batch 32 (every sample sees the global batch)."""
    common = ["--epochs", "0.5", "--max_lr", "1e-3"]
    assert train.main(argv(synth, tmp_path, "one", *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py")] + argv(synth, tmp_path, "two", *common) + ["--batch", "16"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    one = [r["loss"] for r in metrics(tmp_path, "one") if r["split"] == "train"]
    two = [r["loss"] for r in metrics(tmp_path, "two") if r["split"] == "train"]
    assert len(one) == len(two) == 8
    assert one == pytest.approx(two, abs=1e-5)


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(synth, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = clip.clip_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(clip, "clip_loss", poisoned)
    assert train.main(argv(synth, tmp_path, "nan")) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 7" in err and "step_00000005.pt" in err
    assert cm.load(str(tmp_path / "out" / "nan" / "ckpt" / "latest.pt"))["step"] == 5


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "unknown --preset"),
    (["--accum", "0"], "--accum must be >= 1"),
    (["--max_lr", "-1"], "--max_lr"),
    (["--batch", "100000"], "larger than the 512 training samples"),
    (["--data", "/no/such/dir"], "does not exist"),
    (["--resume", "latest"], "no checkpoint"),
])
def test_bad_input_is_one_clear_line(synth, tmp_path, extra, message):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv(synth, tmp_path) + extra,
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_resume_with_other_model_flags_names_the_fields(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "cfg", "--stop_at", "5")) == 0
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "cfg", "--resume", "latest", "--pool", "mean", "--quick_gelu"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "text.pool: 'eot' -> 'mean'" in err and "quick_gelu: False -> True" in err
