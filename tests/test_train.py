import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint_manager as cm
import clip
import train
from conftest import gloo_ranks, metrics, usage_error
from conftest import train_argv as argv  # its defaults are this file's runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # one of them typed as a user types it: `python train.py ...` in a process of its own
    assert message in usage_error(argv(synth, tmp_path) + extra, process=extra[0] == "--data")


@pytest.mark.parametrize("index, message", [("{}", "empty or not a JSON object"),
                                            ('{"img_size": 32, "train": {"shards": ["gone.tar"]}}', "shard gone.tar")])
def test_a_broken_index_json_is_one_clear_line(tmp_path, capsys, index, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.json").write_text(index)
    with pytest.raises(SystemExit) as e:
        train.main(argv(str(tmp_path / "d"), tmp_path))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_with_other_model_flags_names_the_fields(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "cfg", "--stop_at", "5")) == 0
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "cfg", "--resume", "latest", "--pool", "mean", "--quick_gelu"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "text.pool: 'eot' -> 'mean'" in err and "quick_gelu: False -> True" in err


# -----------------------------------------------------------------------------
# --preset / --data defaults that follow the machine (CUDA decided by the caller, so a CPU test can claim it)


def real_set(synth, path):
    """The synthetic shards under `path` as if text-to-image-2M had made them (index.json's source says so)."""
    os.makedirs(path)
    for name in os.listdir(synth):
        if name != "index.json":
            os.symlink(os.path.join(synth, name), os.path.join(path, name))
    with open(os.path.join(synth, "index.json")) as f:
        index = json.load(f)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({**index, "source": "text-to-image-2m"}, f)
    return str(path)


def defaults(flags, cuda):
    args = train.get_parser().parse_args(flags)
    said, hint = train.run_defaults(args, cuda)
    return args.preset, args.data, said, hint


def test_defaults_follow_the_machine(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t2i = os.path.join("data", "t2i")
    # CUDA, no data/t2i: the demo, and one line on how to get the real run
    preset, data, said, hint = defaults([], cuda=True)
    assert (preset, data, said) == ("tiny", None, "tiny preset on data/synthetic (--preset and --data: the defaults on CUDA)")
    assert hint.startswith("note: there is no data/t2i, so this CUDA run is the demo (tiny preset, built-in synthetic set)")
    for words in ("bash setup_gpu.sh --prep t2i 200000", "python prep_dataset.py text-to-image-2m --out data/t2i",
                  "--preset and --data choose explicitly"):
        assert words in hint
    os.makedirs(t2i)  # a prep that has not finished: no index.json yet
    assert "data/t2i holds no prepared set yet: data/t2i/index.json not found" in defaults([], cuda=True)[3]
    os.rmdir(t2i)
    real_set(synth, t2i)
    # CUDA and a prepared data/t2i: the design card's command is the seed run on it (run name seed-t2i)
    assert defaults([], cuda=True) == ("seed", t2i, "seed preset on data/t2i (--preset and --data: the defaults on CUDA)",
                                       None)
    # a CPU: as before, whatever data/t2i holds
    assert defaults([], cuda=False) == ("tiny", None, "tiny preset on data/synthetic (--preset and --data: the defaults "
                                                      "on a CPU)", None)


def test_explicit_preset_and_data_always_win(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t2i, other = os.path.join("data", "t2i"), real_set(synth, tmp_path / "other")
    for prepared in (False, True):
        if prepared:
            real_set(synth, t2i)
        for cuda in (False, True):
            gpu_data = t2i if cuda and prepared else None
            assert defaults(["--preset", "micro"], cuda)[:2] == ("micro", gpu_data)
            assert defaults(["--data", synth], cuda)[:2] == ("tiny", synth)  # a synthetic set: the demo's size
            assert defaults(["--data", other], cuda)[:2] == ("seed" if cuda else "tiny", other)  # real data
            assert defaults(["--data", other, "--preset", "micro"], cuda) == ("micro", other, f"micro preset on {other}",
                                                                             None)
    assert defaults(["--data", other], True)[2] == f"seed preset on {other} (--preset: the default on CUDA)"


def test_a_run_on_the_cuda_defaults_resumes_as_itself(synth, tmp_path, monkeypatch, capsys):
    """The design card's command with CUDA claimed (the seed preset made micro-sized for a CPU test): it trains seed
    on data/t2i as run seed-t2i, and the same command with --resume latest finds and continues that run. Where the
    defaults resolve otherwise (a CPU: tiny on the built-in set), a resume refuses in one line."""
    monkeypatch.chdir(tmp_path)
    real_set(synth, os.path.join("data", "t2i"))
    os.symlink(synth, os.path.join("data", "synthetic"))  # the built-in set, already made
    monkeypatch.setitem(clip.PRESETS, "seed", clip.PRESETS["micro"])
    card = ["--batch", "32", "--max_lr", "3e-4", "--epochs", "1", "--workers", "0", "--eval_every", "0"]
    real = train.run_defaults
    monkeypatch.setattr(train, "run_defaults", lambda args, cuda: real(args, True))
    assert train.main(card + ["--stop_at", "5", "--ckpt_every", "5"]) == 0
    out = capsys.readouterr().out
    assert "seed preset on data/t2i (--preset and --data: the defaults on CUDA): 32px images" in out
    assert cm.load(os.path.join("out", "seed-t2i", "ckpt", "latest.pt"))["args"]["data"] == os.path.join("data", "t2i")
    assert train.main(card + ["--resume", "latest", "--quiet"]) == 0
    assert "resumed from step 5 of 16" in capsys.readouterr().out
    monkeypatch.setattr(train, "run_defaults", real)  # this machine as it is: a CPU
    for resume, words in (("latest", "--resume latest: no checkpoint in out/tiny-synthetic/ckpt"),
                          (os.path.join("out", "seed-t2i", "ckpt", "latest.pt"), "the checkpoint's model differs")):
        with pytest.raises(SystemExit) as e:
            train.main(card + ["--resume", resume, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1] and "Traceback" not in "".join(err)
    # CUDA without data/t2i: the demo, and the hint once, before anything is made
    shutil.rmtree(os.path.join("data", "t2i"))
    monkeypatch.setattr(train, "run_defaults", lambda args, cuda: real(args, True))
    assert train.main(card + ["--stop_at", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("note: there is no data/t2i, so this CUDA run is the demo")


# -----------------------------------------------------------------------------
# the GPU path, checked on a CPU: no host syncs off log steps, compile, async checkpoints, clear errors

SYNCS = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")] \
    + [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")]


def test_no_host_sync_on_a_non_logging_step(synth, tmp_path, monkeypatch):
    """Every call that would make the host wait for the GPU, counted per step: only log steps (every 5th, the
    eval/checkpoint at the end) read values back."""
    calls, step = [], [0]
    fb = train.forward_backward

    def counting_fb(*a, **k):
        step[0] += 1  # calls from here until the next step's forward belong to this step
        return fb(*a, **k)
    monkeypatch.setattr(train, "forward_backward", counting_fb)
    for owner, name in SYNCS:
        def patched(*a, _real=getattr(owner, name), _name=name, **k):
            calls.append((step[0], _name))
            return _real(*a, **k)
        monkeypatch.setattr(owner, name, patched)
    # 1 worker: the loader's own work runs in its process, not counted here
    assert train.main(argv(synth, tmp_path, "sync", "--log_every", "5", "--ckpt_every", "100", "--stop_at", "12",
                           "--workers", "1")) == 0
    at = {s for s, _ in calls}
    assert at & set(range(1, 12)) == {5, 10}, sorted(calls)
    assert (5, "tolist") in calls and (10, "tolist") in calls  # the window's one read
    steps = [r["step"] for r in metrics(tmp_path, "sync") if r["split"] == "train"]
    assert steps == list(range(1, 13))  # every step is still logged


def test_compile_on_cpu_matches_eager(synth, tmp_path):
    """--compile on the micro preset end to end (inductor's C++ backend; gcc is on the CI machine)."""
    for run, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        assert train.main(argv(synth, tmp_path, run, "--stop_at", "3", "--ckpt_every", "100", flag)) == 0
    losses = {run: [r["loss"] for r in metrics(tmp_path, run) if r["split"] == "train"] for run in ("eager", "compiled")}
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    assert json.loads((tmp_path / "logs" / "compiled" / "config.json").read_text())["args"]["compile"] is True


def test_log_records_data_ms_and_the_epoch_report(synth, tmp_path, monkeypatch, capsys):
    reports = iter([None, None, {"epoch": 0, "skipped": {"corrupt_image": 3, "no_caption": 1}}])
    monkeypatch.setattr(train.ShardLoader, "pop_epoch_report", lambda self: next(reports, None))
    args = [a for a in argv(synth, tmp_path, "rep", "--stop_at", "6", "--log_every", "3") if a != "--quiet"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 0: skipped 3 corrupt_image, 1 no_caption" in out
    assert "data_ms" in out and "1 x cpu: fp32 (auto), not compiled, 0 loader workers per rank" in out
    records = [r for r in metrics(tmp_path, "rep") if r["split"] == "train"]
    assert [r.get("skipped_corrupt_image") for r in records] == [None, None, 3, None, None, None]
    assert all(r["data_ms"] >= 0 and r["samples_per_s"] > 0 for r in records)
    assert "time: " in out and "waiting for data" in out


def test_eval_reads_the_val_batches_once(synth, tmp_path, monkeypatch):
    calls = []
    real = train.val_batches
    monkeypatch.setattr(train, "val_batches", lambda *a: calls.append(a[1]) or real(*a))
    assert train.main(argv(synth, tmp_path, "ev", "--eval_every", "5", "--eval_batches", "2")) == 0
    assert calls == [2]  # 2 batches of 32, kept in memory for the evals at steps 5, 10, 15 and 16
    val = [r for r in metrics(tmp_path, "ev") if r["split"] == "val"]
    assert [r["step"] for r in val] == [5, 10, 15, 16] and len({r["loss"] for r in val}) == 4


def test_poisoned_weights_are_never_saved_or_named(synth, tmp_path, monkeypatch, capsys):
    """Weights that overflow in step 10's update (its loss was still finite): the checkpoint at 10 is refused and
    the stop names step 5's."""
    real, n = clip.CLIP.clamp_logit_scale, [0]

    def overflow(self):
        n[0] += 1
        if n[0] == 10:
            self.text.token_embed.weight.data[0, 0] = float("inf")
        return real(self)
    monkeypatch.setattr(clip.CLIP, "clamp_logit_scale", overflow)
    assert train.main(argv(synth, tmp_path, "inf")) == 1
    err = capsys.readouterr().err
    assert "a weight is not finite at step 10" in err and "step_00000005.pt" in err
    assert cm.CheckpointManager(str(tmp_path / "out" / "inf")).step_files()[-1].endswith("step_00000005.pt")


def test_compiled_ddp_ignores_distill_proj_by_its_compiled_name(tmp_path):
    model = clip.CLIP(clip.get_config("micro", vocab_size=300, teacher_dim=24))
    assert train.ddp_ignored(model) == ["distill_proj.weight"]
    compiled = torch.compile(model)  # lazy: nothing is compiled until a forward
    assert train.ddp_ignored(compiled) == ["_orig_mod.distill_proj.weight"]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        args = train.get_parser().parse_args(["--compile"])
        ddp = train.wrap_model(args, model, True, "cpu")
        assert ddp.parameters_to_ignore == {"_orig_mod.distill_proj.weight"}  # what DDP matches names against
    finally:
        torch.distributed.destroy_process_group()


def test_a_node_that_does_not_see_the_checkpoint_folder_is_named(tmp_path):
    """Two gloo processes whose --out folders differ, as on two nodes without a shared filesystem."""
    outs = gloo_ranks(tmp_path, f"""
from launch import unshared_ranks
print(unshared_ranks(os.path.join({str(tmp_path)!r}, "node" + str(rank)), rank, 2))
print(unshared_ranks({str(tmp_path / 'shared')!r}, rank, 2))""")
    assert [o.split("\n")[:2] for o in outs] == [["[1]", "[]"]] * 2
    assert os.listdir(tmp_path / "shared") == []  # the probe file is removed


@pytest.mark.parametrize("extra, message", [
    (["--stop_at", "0"], "--stop_at must be >= 1"),
    (["--stop_at", "-5"], "--stop_at must be >= 1"),
    (["--eval_batches", "-1"], "--eval_batches must be >= 0"),
    (["--keep", "0"], "--keep must be >= 1"),
    (["--log_every", "0"], "--log_every must be >= 1"),
    (["--context_length", "1"], "--context_length must be >= 3"),
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--epochs", "nan"], "--epochs must be a finite number"),
    (["--max_lr", "nan"], "--max_lr must be a finite number"),
    (["--beta2", "1.5"], "--beta2 in [0, 1)"),
    (["--ignore_keys", "text.(", "--init", __file__], "--ignore_keys 'text.(' is not a valid regular expression"),
])
def test_more_bad_input_is_one_clear_line(synth, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "bad", *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_resume_with_other_batch_accum_or_epochs_names_the_fields(synth, tmp_path, capsys):
    assert train.main(argv(synth, tmp_path, "rb", "--stop_at", "5")) == 0
    for extra, words in [(["--batch", "64"], "changed: batch 32 -> 64"),
                         (["--batch", "16", "--accum", "2"], "changed: batch 32 -> 16, accum 1 -> 2"),
                         (["--epochs", "2"], "changed: epochs 1.0 -> 2.0")]:
        with pytest.raises(SystemExit) as e:
            train.main(argv(synth, tmp_path, "rb", "--resume", "latest", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "--init" in err, err
    with pytest.raises(SystemExit):  # a stop before the checkpoint's step
        train.main(argv(synth, tmp_path, "rb", "--resume", "latest", "--stop_at", "3"))
    assert "--stop_at 3 is not after the checkpoint's step 5" in capsys.readouterr().err
    assert train.main(argv(synth, tmp_path, "rb", "--resume", "latest")) == 0  # the same flags: on to the end
    assert train.main(argv(synth, tmp_path, "rb", "--resume", "latest")) == 0  # a finished run: nothing to do
    assert "nothing to do: the checkpoint is at the run's last step (16 of 16)" in capsys.readouterr().out


def test_resume_from_a_file_that_is_not_a_run_checkpoint(synth, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    cm.save_atomic({"model": clip.CLIP(clip.get_config("micro", vocab_size=300)).state_dict()}, weights)
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "w", "--resume", str(weights)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a train.py checkpoint (it has no optimizer, config, step, loader, rng)" in err
    assert f"--init {weights}" in err


def test_a_backup_file_in_the_checkpoint_folder_is_left_alone(synth, tmp_path):
    ckpt = tmp_path / "out" / "bk" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "step_00000010_backup.pt").write_bytes(b"a user's copy")
    assert train.main(argv(synth, tmp_path, "bk", "--stop_at", "12", "--keep", "1")) == 0
    assert sorted(os.listdir(ckpt)) == ["best.pt", "latest.pt", "step_00000010_backup.pt", "step_00000012.pt"]
    assert train.main(argv(synth, tmp_path, "bk", "--resume", "latest")) == 0


def test_mfu_peaks_tell_the_h100_cards_apart():
    cfg = clip.get_config("seed")
    sxm, pcie = (clip.estimate_mfu(cfg, 100.0, name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"))
    assert sxm / pcie == pytest.approx(756 / 989)
    assert clip.estimate_mfu(cfg, 100.0, "NVIDIA H200") == pytest.approx(sxm)
    assert clip.estimate_mfu(cfg, 100.0, "NVIDIA GeForce RTX 4090") is None
