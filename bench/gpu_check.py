"""
The whole GPU check in one command, made to end within 8 minutes on one H100/H200:

  (a) our training step (train.py's forward_backward + clip + AdamW), seed preset, bf16 + torch.compile, at batch
      256 and 1024: samples/s, MFU, peak memory; again with --grad_ckpt at 1024; and, when --budget leaves time
      (--budget 800), issue 16's rows: --patch_dropout 0.5 at 256, the vit-b-16 preset at 1024 with and without
      --grad_ckpt
  (b) OpenCLIP's step on the same config beside ours (both eager bf16, batch 256), when open_clip imports
  (c) the loader's feed rate at 224 px with every core (train.py's auto worker count), and webdataset's with the
      same workers when it imports, against what the step in (a) consumes
  (d) a 150-step train.py run on 224 px synthetic shards with the default GPU flags (bf16, compile, auto workers),
      --eval_every 50 --ckpt_every 50: samples/s, data_ms as a share of the step, eval share (measured, and at the
      default --eval_every 200), checkpoint stall on the training thread

    python bench/gpu_check.py            # on the GPU box; prints a table last, appends bench/results/gpu.jsonl
    python bench/gpu_check.py --smoke    # tiny sizes (micro preset, 32 px, a few steps): runs on a CPU in a minute

Each part runs in its own process with a time limit taken from what is left of --budget (a hang or an
out-of-memory ends that part, not the check); a part whose package is missing says so in one line and is skipped.

The device machine has torch, numpy, pillow, tqdm and matplotlib but no network. OpenCLIP and webdataset come as
wheels made on a machine with network, for the torch that is on the device (torchvision must match it):
    pip download open_clip_torch webdataset ftfy regex huggingface_hub safetensors timm braceexpand pyyaml \\
        "torchvision==<the pair of the device's torch>" -d wheels/ --only-binary=:all: --python-version 3.X
then on the device, before the check:
    pip install --no-index --find-links wheels/ open_clip_torch webdataset
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import common  # first: the repository root goes ahead of bench/ on sys.path (bench/tokenizer.py is a benchmark)

ROOT = common.ROOT

# per part: (seconds it may take at most, what it needs); the budget left decides the rest
PARTS = [("step256", 150), ("train", 150), ("loader", 45), ("step1024", 120), ("openclip", 60), ("step1024_ckpt", 120),
         # issue 16's GPU rows: run when --budget leaves time for them (--budget 800 runs them all)
         ("step256_pd", 120), ("vitb1024", 150), ("vitb1024_ckpt", 150)]


def sizes(smoke):
    """Everything that differs between the GPU check and the CPU smoke run."""
    if smoke:
        return dict(preset="micro", big="tiny", img=32, vocab=300, batches=(16, 32), steps=3, num_train=320, num_val=64,
                    train_batch=32, eval_every=10, ckpt_every=10, epochs=3, loader_batches=10)
    return dict(preset="seed", big="vit-b-16", img=224, vocab=49408, batches=(256, 1024), steps=10, num_train=12800, num_val=2560,
                train_batch=256, eval_every=50, ckpt_every=50, epochs=3, loader_batches=60)


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


# -----------------------------------------------------------------------------
# (a) our step, as train.py runs it


def part_step(args, batch, grad_ckpt=False, patch_dropout=0.0, preset=None):
    import torch
    import clip
    import train
    from types import SimpleNamespace
    z, cuda = sizes(args.smoke), torch.cuda.is_available()
    preset = preset or z["preset"]
    flags = ["--preset", preset, "--batch", str(batch), "--patch_dropout", str(patch_dropout)] + \
        (["--grad_ckpt"] if grad_ckpt else [])
    targs = train.get_parser().parse_args(flags)
    config, _, _ = train.build_config(targs, {"img_size": z["img"]}, SimpleNamespace(vocab_size=z["vocab"]), 0)
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = train.build_model(targs, config, None, quiet=True).to(device)
    opt = clip.configure_optimizers(model, 0.2, 3e-4)
    compiled = torch.compile(model) if cuda else model  # train.py's defaults: compile and bf16 on CUDA only
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    loss_fn = train.make_loss(targs, model)
    S, T, V = z["img"], config.text.context_length, config.text.vocab_size
    images = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8, device=device)  # (B, 3, S, S)
    tokens = torch.randint(1, V - 1, (batch, T), device=device)  # (B, T), eot (the largest id) mid-caption
    tokens[:, T // 2] = V - 1

    n = [0]

    def step():  # with --patch_dropout, this step's kept patches as train.py draws them
        keep = train.patch_keep(config, 0, n[0], 0, batch, device)
        n[0] += 1
        inputs = train.model_inputs({"image": images, "text": tokens}, False, keep)
        loss, _ = train.forward_backward(compiled, inputs, 1, autocast, loss_fn)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        return loss

    t0 = time.time()
    for _ in range(2):  # the first compiles
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    compile_s = time.time() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(z["steps"]):
        loss = step()
    sync()
    sps = z["steps"] * batch / (time.time() - t0)
    out = dict(part="step", preset=preset, batch=batch, grad_ckpt=grad_ckpt, patch_dropout=patch_dropout, samples_per_s=round(sps, 1), loss=round(loss.item(), 4),
               compile_s=round(compile_s, 1), mfu=clip.estimate_mfu(config, sps) if cuda else None,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
               params=model.num_params())
    result(**out)
    if cuda and batch == z["batches"][0] and not grad_ckpt and not patch_dropout and preset == z["preset"]:
        # what the GPU spends the step on (for a low MFU)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


# -----------------------------------------------------------------------------
# (b) OpenCLIP's step beside ours


def part_openclip(args):
    try:
        import open_clip  # noqa: F401
        from train_step import make_openclip, openclip_optimizer  # bench/train_step.py: the same sizes and AdamW
    except ImportError as e:
        return result(part="openclip", skipped=f"open_clip not importable ({e}); see this file's docstring")
    import torch
    import checkpoint_manager as cm
    import clip
    z, cuda = sizes(args.smoke), torch.cuda.is_available()
    device, B = ("cuda" if cuda else "cpu"), z["batches"][0]
    config = clip.get_config(z["preset"], vocab_size=z["vocab"], img_size=z["img"])
    torch.manual_seed(0)
    ours = clip.CLIP(config).to(device)
    theirs = make_openclip(config).to(device)
    theirs.load_state_dict(cm.to_openai_state_dict(ours), strict=True)  # the same starting weights
    S, T, V = z["img"], config.text.context_length, config.text.vocab_size
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device=device)
    tokens = torch.randint(1, V - 1, (B, T), device=device)
    tokens[:, T // 2] = V - 1
    loss_fn = open_clip.ClipLoss()
    sides = {"ours": (ours, lambda m, x: clip.clip_loss(*m(x, tokens)[:3]), clip.configure_optimizers(ours, 0.2, 3e-4)),
             "openclip": (theirs, lambda m, x: loss_fn(*m(x, tokens)), openclip_optimizer(theirs))}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {n: [] for n in sides}
    for i in range(2 + z["steps"]):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):  # interleaved: neither side always first
            model, fwd, opt = sides[name]
            sync()
            t0 = time.time()
            x = clip.normalize_images(images)
            with amp:
                loss = fwd(model, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 2:
                times[name].append(time.time() - t0)
    sps = {n: B / statistics.median(t) for n, t in times.items()}
    result(part="openclip", batch=B, ours_eager=round(sps["ours"], 1), openclip_eager=round(sps["openclip"], 1),
           ratio=round(sps["ours"] / sps["openclip"], 3))


# -----------------------------------------------------------------------------
# (c) the loader's feed rate


def part_loader(args):
    import torch
    from dataloader import ShardLoader, auto_workers
    z = sizes(args.smoke)
    workers, B, n = auto_workers(1), z["train_batch"], z["loader_batches"]

    def rate(batches):
        count, t0 = 0, None
        for i, batch in enumerate(batches):
            if i == workers:  # the pipeline is full: start the clock
                t0 = time.time()
            elif i > workers:
                count += len(batch["image"])
            if i == workers + n:
                break
        return count / (time.time() - t0)

    loader = ShardLoader(args.data, "train", B, num_workers=workers, pin_memory=torch.cuda.is_available())

    def forever():  # epochs back to back, as train.py reads them
        while True:
            yield from loader
    ours = rate(forever())
    loader.close()
    out = dict(part="loader", workers=workers, batch=B, ours=round(ours, 1))
    try:
        import webdataset as wds
    except ImportError as e:
        out["webdataset"] = f"skipped: webdataset not importable ({e})"
    else:
        import numpy as np
        from tokenizer import Tokenizer
        tok = Tokenizer.load(os.path.join(args.data, "tokenizer.json"))
        with open(os.path.join(args.data, "index.json")) as f:
            urls = [os.path.join(args.data, s) for s in json.load(f)["train"]["shards"]]

        def collate(samples):
            images = torch.from_numpy(np.stack([np.asarray(img).transpose(2, 0, 1) for img, _ in samples]))
            return {"image": images, "text": tok.tokenize([t for _, t in samples], 77)}
        ds = (wds.WebDataset(urls * 4, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt")
              .batched(B, collation_fn=collate, partial=False))
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                         pin_memory=torch.cuda.is_available())
        out["webdataset"] = round(rate(iter(dl)), 1)
    result(**out)


# -----------------------------------------------------------------------------
# (d) train.py with the default GPU flags


def part_train(args):
    z = sizes(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", args.data, "--preset", z["preset"],
               "--batch", str(z["train_batch"]), "--epochs", str(z["epochs"]), "--max_lr", "3e-4",
               "--eval_every", str(z["eval_every"]), "--ckpt_every", str(z["ckpt_every"]), "--out", f"{tmp}/out",
               "--log_dir", f"{tmp}/logs", "--run_name", "gpu_check", "--quiet"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.time() - t0
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
            return result(part="train", failed=f"train.py exited {r.returncode}: {tail}")
        with open(f"{tmp}/logs/gpu_check/metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        with open(f"{tmp}/logs/gpu_check/config.json") as f:
            ran = json.load(f)["args"]
    train_recs = [r for r in records if r["split"] == "train"]
    steady = train_recs[10:] or train_recs  # after the first log window (compile, warm-up)
    sps = statistics.median(r["samples_per_s"] for r in steady)
    step_ms = 1000 * z["train_batch"] / sps
    data_ms = statistics.median(r["data_ms"] for r in steady)
    # "time: W s; training L s (waiting for data D s, x%), eval E s (y%), checkpoints C s on the training thread + final save F s"
    m = re.search(r"time: ([\d.]+) s; training ([\d.]+) s .*?eval ([\d.]+) s .*?checkpoints ([\d.]+) s .*?final save ([\d.]+) s",
                  r.stdout)
    wall_s, loop_s, eval_s, ckpt_s, final_s = (float(x) for x in m.groups())
    steps = len(train_recs)
    n_evals = sum(rec["split"] == "val" for rec in records)
    n_saves = steps // z["ckpt_every"] - (steps % z["ckpt_every"] == 0)  # mid-run saves; the last is the final one
    per_eval = eval_s / max(1, n_evals)
    result(part="train", steps=steps, precision=ran["precision"], compile=ran["compile"], workers=ran["workers"],
           samples_per_s=round(sps, 1), mfu=statistics.median(r.get("mfu") or 0 for r in steady) or None,
           step_ms=round(step_ms, 1), data_ms=round(data_ms, 2), data_share=round(data_ms / step_ms, 4),
           eval_s_per_eval=round(per_eval, 2), eval_share=round(eval_s / wall_s, 4),
           # at the default --eval_every 200: one eval per 200 steps of training
           eval_share_at_200=round(per_eval / (per_eval + 200 * step_ms / 1000), 4),
           ckpt_stall_s_per_save=round(ckpt_s / max(1, n_saves), 3), final_save_s=round(final_s, 2),
           wall_s=round(wall, 1), loop_s=loop_s)


# -----------------------------------------------------------------------------
# the check: data, the parts in their own processes, the table


def run_part(args, name, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--data", args.data] + (["--smoke"] if args.smoke else [])
    print(f"--- {name} (at most {timeout:.0f} s)", flush=True)
    # its own session: on a timeout the whole group goes (train.py and loader workers too), freeing the GPU
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        print(out[-2000:])
        return {"part": name, "failed": f"timed out after {timeout:.0f} s"}
    print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT ")))
    found = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"part": name, "failed": f"exit {proc.returncode}: {last[:300]}"}
    return found[-1]


def table(results, consume):
    """The rows a reader scans: one per measurement."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    rows = []
    for name, r in results.items():
        if "failed" in r or "skipped" in r:
            rows.append((name, r.get("failed") or r.get("skipped")))
        elif r["part"] == "step":
            rows.append((f"(a) {r['preset']} step, batch {r['batch']}" + (", --grad_ckpt" if r["grad_ckpt"] else "")
                         + (f", --patch_dropout {r['patch_dropout']}" if r["patch_dropout"] else ""),
                         f"{r['samples_per_s']:.0f} samples/s, MFU {pct(r['mfu'])}, peak {r['peak_gib'] or '-'} GiB, "
                         f"compile {r['compile_s']} s"))
        elif r["part"] == "openclip":
            rows.append(("(b) eager bf16, batch %d" % r["batch"],
                         f"ours {r['ours_eager']:.0f} vs OpenCLIP {r['openclip_eager']:.0f} samples/s ({r['ratio']:.2f}x)"))
        elif r["part"] == "loader":
            wds = r["webdataset"] if isinstance(r["webdataset"], str) else f"webdataset {r['webdataset']:.0f} samples/s"
            feed = f" = {r['ours'] / consume:.1f}x what the step eats" if consume else ""
            rows.append((f"(c) loader, workers {r['workers']}", f"ours {r['ours']:.0f} samples/s{feed}; {wds}"))
        elif r["part"] == "train":
            rows.append((f"(d) train.py, {r['steps']} steps", f"{r['samples_per_s']:.0f} samples/s, MFU {pct(r['mfu'])}, "
                         f"{r['precision']}, compile {r['compile']}, workers {r['workers']}"))
            rows.append(("(d) data / eval / ckpt", f"data_ms {r['data_ms']} = {pct(r['data_share'])} of a step; eval "
                         f"{r['eval_s_per_eval']} s each = {pct(r['eval_share'])} measured, {pct(r['eval_share_at_200'])} "
                         f"at --eval_every 200; ckpt stall {r['ckpt_stall_s_per_save']} s/save, final {r['final_save_s']} s"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main():
    p = common.parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole check on a CPU in about a minute")
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole check")
    p.add_argument("--data", default=None, help="224 px shards for (c) and (d) (default: made in a temp folder)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one part, in its own process
    p.add_argument("--out", default=None, help="results file (default: bench/results/gpu.jsonl; none with --smoke)")
    args = p.parse_args()
    if args.part:
        runs = {"step256": lambda: part_step(args, sizes(args.smoke)["batches"][0]),
                "step1024": lambda: part_step(args, sizes(args.smoke)["batches"][1]),
                "step1024_ckpt": lambda: part_step(args, sizes(args.smoke)["batches"][1], grad_ckpt=True),
                "step256_pd": lambda: part_step(args, sizes(args.smoke)["batches"][0], patch_dropout=0.5),
                "vitb1024": lambda: part_step(args, sizes(args.smoke)["batches"][1], preset=sizes(args.smoke)["big"]),
                "vitb1024_ckpt": lambda: part_step(args, sizes(args.smoke)["batches"][1], grad_ckpt=True,
                                                   preset=sizes(args.smoke)["big"]),
                "openclip": lambda: part_openclip(args), "loader": lambda: part_loader(args),
                "train": lambda: part_train(args)}
        return runs[args.part]()

    import torch
    t_start, z = time.time(), sizes(args.smoke)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_check{' --smoke' if args.smoke else ''} on {device}, torch {torch.__version__}, {os.cpu_count()} cores")
    tmp = tempfile.TemporaryDirectory()
    if args.data is None:  # synthetic shards at the check's image size (500 per shard: enough shards for every worker)
        import prep_dataset
        args.data = os.path.join(tmp.name, "data")
        prep_dataset.main(["synthetic", "--out", args.data, "--num_train", str(z["num_train"]), "--num_val",
                           str(z["num_val"]), "--img_size", str(z["img"]), "--shard_size", "500", "--quiet"])
        # no classes, as text-to-image-2M: (d)'s eval is the val loss alone, not zero-shot over the whole split
        with open(os.path.join(args.data, "index.json")) as f:
            index = json.load(f)
        index.pop("classes", None)
        with open(os.path.join(args.data, "index.json"), "w") as f:
            json.dump(index, f)
        print(f"data: {z['num_train']} + {z['num_val']} synthetic samples at {z['img']} px in {time.time() - t_start:.0f} s")
    results = {}
    for name, cap in PARTS:
        left = args.budget - (time.time() - t_start)
        if left < 20:
            results[name] = {"part": name, "skipped": f"no time left in the {args.budget:.0f} s budget"}
            continue
        results[name] = run_part(args, name, min(cap, left - 10))
    tmp.cleanup()

    order = ["step256", "step1024", "step1024_ckpt", "step256_pd", "vitb1024", "vitb1024_ckpt", "openclip", "loader",
             "train"]
    results = {k: results[k] for k in order}
    a = results["step256"]
    consume = a.get("samples_per_s") if "failed" not in a and "skipped" not in a else None
    rec = {**common.machine("time", "host"), "device": device, **common.machine("torch", "cpus"), "smoke": args.smoke,
           "wall_s": round(time.time() - t_start, 1), "results": results}
    out = args.out or (None if args.smoke else os.path.join(common.RESULTS, "gpu.jsonl"))
    if out:
        common.append_jsonl(out, rec)
    print(f"\n=== gpu_check on {device} in {rec['wall_s']:.0f} s" + (f" (appended to {out})" if out else ""))
    print(table(results, consume))


if __name__ == "__main__":
    main()
