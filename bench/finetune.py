"""
Fine-tuning benchmark: what each fine-tuning recipe learns, forgets, trains and costs.

1) Split the synthetic set by colour: "old" = samples whose main object has one of the first 4 of the 8 colours,
   "new" = the other 4 (train and val both; classes and held-out combinations stay the full lists, so labels
   keep their meaning). Shards are read in memory and rewritten under --work; data/syn32 is never touched.
2) Pre-train on "old" only.
3) From that checkpoint, fine-tune on "new" with: full (every weight), LiT (--lock_image), adapters
   (--adapters 8, all else frozen) and adapters + heads (--train_heads).
4) Zero-shot top-1 over all 64 classes on the full val split, averaged per class over old-colour classes, new-colour
   classes (both without the held-out combinations, which no stage ever trains on) and the held-out ones.

The anchor is full fine-tuning, measured in the same run: trainable parameters and step time are printed as
ratios to it. One JSON line per run goes to bench/results/finetune.jsonl, the table to bench/results/finetune.md.

    python bench/finetune.py                       # micro preset, ~10 minutes on a shared 2-core CPU
    python bench/finetune.py --preset tiny --threads 8   # a wider model, on a machine with cores to spare
    python bench/finetune.py --pre_steps 40 --ft_steps 20   # a smoke run
"""

import contextlib
import json
import os
import shutil
import statistics
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import checkpoint_manager as cm
import clip
import eval_zeroshot
import train
from dataloader import ShardLoader, read_tar, write_tar
from tokenizer import Tokenizer

METHODS = {  # name -> train.py flags on top of --init
    "full": [],
    "LiT (--lock_image)": ["--lock_image"],
    "adapters (--adapters 8)": ["--adapters", "8"],
    "adapters + heads": ["--adapters", "8", "--train_heads"],
}


# -----------------------------------------------------------------------------
# the two shard sets

def split_by_colour(src, work, n_old=4, shard_size=1000):
    """src shard set -> work/old and work/new (train + val), split on the main object's colour; returns the
    old-colour names. Samples without a label json are counted and skipped."""
    with open(os.path.join(src, "index.json")) as f:
        index = json.load(f)
    classes = index["classes"]  # "colour shape", colour-major
    colours = list(dict.fromkeys(c.split()[0] for c in classes))
    old = set(colours[:n_old])
    sets = {"old": {}, "new": {}}
    skipped = 0
    for split in ("train", "val"):
        parts = {"old": [], "new": []}
        for name in index[split]["shards"]:
            for key, files in read_tar(os.path.join(src, name))[0].items():
                label = json.loads(files["json"])["label"] if "json" in files else None
                if label is None:
                    skipped += 1
                    continue
                parts["old" if classes[label].split()[0] in old else "new"].append((key, files))
        for part, samples in parts.items():
            d = os.path.join(work, part)
            os.makedirs(d, exist_ok=True)
            shards = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
            names = [f"{split}-{i:06d}.tar" for i in range(len(shards))]
            for n, s in zip(names, shards):
                write_tar(os.path.join(d, n), s)
            sets[part][split] = {"shards": names, "shard_sizes": [len(s) for s in shards], "num_samples": len(samples)}
    if skipped:
        print(f"warning: {skipped} samples without a label were skipped")
    for part, splits in sets.items():
        sub = {**index, **splits, "subset": f"{part} colours of {os.path.abspath(src)}"}
        with open(os.path.join(work, part, "index.json"), "w") as f:
            json.dump(sub, f, indent=1)
        shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(work, part, "tokenizer.json"))
    return [c for c in colours if c in old]


# -----------------------------------------------------------------------------
# runs and measurements

def run(args, data, name, steps, extra):
    """train.main for `steps` optimizer steps; returns the run's latest checkpoint path."""
    with open(os.path.join(data, "index.json")) as f:
        n = json.load(f)["train"]["num_samples"]
    epochs = steps / (n // args.batch)  # train.py counts steps as ceil(epochs * batches per epoch)
    argv = ["--data", data, "--preset", args.preset, "--batch", str(args.batch), "--epochs", f"{epochs:.6f}",
            "--max_lr", str(args.max_lr), "--warmup_frac", "0.05", "--workers", "0", "--eval_every", "0",
            "--ckpt_every", str(10 ** 9), "--seed", str(args.seed), "--out", os.path.join(args.work, "out"),
            "--log_dir", os.path.join(args.work, "logs"), "--run_name", name, "--quiet", *extra]
    t0 = time.time()
    common.run_train(argv, quiet=False)
    print(f"  {name}: {steps} steps in {time.time() - t0:.0f} s")
    return os.path.join(args.work, "out", name, "ckpt", "latest.pt")


def interleaved_step_times(args, data, pre, rounds=5, steps=4):
    """Seconds per optimizer step (forward, backward, AdamW) of each method on one real batch, best of `rounds`
    interleaved round-robin: load from other processes on a shared machine hits every method alike."""
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    setups = {}
    for method, flags in METHODS.items():
        targs = train.get_parser().parse_args(["--init", pre, "--max_lr", str(args.max_lr), *flags])
        config, tok, init_sd = train.build_config(targs, index, Tokenizer.load(os.path.join(data, "tokenizer.json")), 0)
        model = train.build_model(targs, config, init_sd, quiet=True).train()
        setups[method] = (model, clip.configure_optimizers(model, targs.wd, args.max_lr), train.make_loss(targs, model))
    loader = ShardLoader(data, "train", args.batch, tok, config.text.context_length, num_workers=0)
    batch = next(iter(loader))
    loader.close()
    inputs = (clip.normalize_images(batch["image"]), batch["text"])
    times = {m: [] for m in setups}
    for _ in range(rounds):
        for method, (model, opt, loss_fn) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train.forward_backward(model, inputs, 1, contextlib.nullcontext(), loss_fn, batch)
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[method].append((time.perf_counter() - t0) / steps)
    return {m: min(t) for m, t in times.items()}


def step_time(args, name):
    """Median seconds per optimizer step from the run's metrics (the first 5 steps are warm-up)."""
    train_recs, _ = common.run_log(os.path.join(args.work, "logs"), name)
    return statistics.median(common.step_seconds(train_recs, args.batch, warmup=5))


def measure(args, path, old_colours):
    """Zero-shot on the full val split -> per-class means over old / new colours and the held-out classes."""
    model, ckpt = cm.load_model(path)
    tok = Tokenizer.from_dict(ckpt["tokenizer"])
    r = eval_zeroshot.evaluate_checkpoint(model, tok, args.src, split="val", details=True)
    with open(os.path.join(args.src, "index.json")) as f:
        heldout = set(json.load(f)["heldout"])
    per = r["zeroshot_per_class"]
    mean = lambda keys: 100 * sum(per[k] for k in keys) / max(1, len(keys))
    old = [c for c in per if c.split()[0] in old_colours and c not in heldout]
    new = [c for c in per if c.split()[0] not in old_colours and c not in heldout]
    trainable = sum(s["exp_avg"].numel() for s in ckpt["optimizer"]["state"].values())  # what AdamW really moved
    return {"old_top1": mean(old), "new_top1": mean(new), "heldout_top1": mean([c for c in per if c in heldout]),
            "all_top1": 100 * r["zeroshot_top1"], "trainable_params": trainable,
            "total_params": model.num_params()}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--src", default=os.path.join(common.ROOT, "data", "syn32"), help="synthetic shard set to split")
    p.add_argument("--work", default="/tmp/finetune_bench", help="filtered shard sets, checkpoints and logs")
    p.add_argument("--preset", default="micro")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pre_steps", type=int, default=500, help="pre-training steps on the old colours")
    p.add_argument("--ft_steps", type=int, default=150, help="fine-tuning steps on the new colours, per method")
    p.add_argument("--max_lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    common.add_threads(p)
    p.add_argument("--out", default=common.RESULTS)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.src, "index.json")):
        p.error(f"--src {args.src} has no index.json (make it with prep_dataset.py synthetic)")
    if min(args.batch, args.pre_steps, args.ft_steps) < 1 or args.max_lr <= 0:
        p.error("--batch, --pre_steps, --ft_steps and --max_lr must be positive")
    common.set_threads(args.threads)
    t_start = time.time()

    for sub in ("old", "new", "out", "logs"):  # only what this script makes: no stale checkpoint or shard survives
        shutil.rmtree(os.path.join(args.work, sub), ignore_errors=True)
    old_colours = split_by_colour(args.src, args.work)
    print(f"split {args.src} into old colours {old_colours} and the rest under {args.work}")
    pre = run(args, os.path.join(args.work, "old"), "pretrain", args.pre_steps, [])
    rows = [{"method": "pre-trained (old colours only)", **measure(args, pre, old_colours),
             "step_s_in_run": step_time(args, "pretrain")}]
    for i, (method, flags) in enumerate(METHODS.items()):
        path = run(args, os.path.join(args.work, "new"), f"ft{i}", args.ft_steps, ["--init", pre, *flags])
        rows.append({"method": method, "flags": " ".join(flags), **measure(args, path, old_colours),
                     "step_s_in_run": step_time(args, f"ft{i}")})
    print("timing one step of each method, interleaved")
    times = interleaved_step_times(args, os.path.join(args.work, "new"), pre)
    full = rows[1]  # the anchor
    for r in rows[1:]:
        r["step_s"] = times[r["method"]]
        r["params_vs_full"] = r["trainable_params"] / full["trainable_params"]
        r["step_vs_full"] = r["step_s"] / full["step_s"]

    head = (f"preset {args.preset}, batch {args.batch}, pre-train {args.pre_steps} steps on old colours, fine-tune "
            f"{args.ft_steps} steps on new colours, max_lr {args.max_lr}, seed {args.seed}, "
            f"{torch.get_num_threads()} CPU thread(s); zero-shot top-1 (%) over all 64 classes on the val split, "
            f"mean per class; step = one optimizer step (forward, backward, AdamW) on one batch, best of 5 "
            f"interleaved rounds")
    body = []
    for r in rows:
        cost = ([f"{r['trainable_params']:,}", f"{r['params_vs_full']:.3f}", f"{r['step_s']:.3f}",
                 f"{r['step_vs_full']:.2f}"] if "step_s" in r else ["–"] * 4)  # the start: nothing fine-tuned
        body.append([r["method"], f"{r['old_top1']:.1f}", f"{r['new_top1']:.1f}", f"{r['heldout_top1']:.1f}",
                     f"{r['all_top1']:.1f}", *cost])
    lines = common.md_table(["method", "old colours", "new colours", "held-out", "all", "trainable params", "vs full",
                             "step (s)", "vs full"], body, "l" + "r" * 8)
    print("\n" + head + "\n" + "\n".join(lines))
    print("anchor = full fine-tuning, measured in this run: 'vs full' = the method's value / full's")

    record = {"bench": "finetune", **common.machine("time"), "preset": args.preset,
              "batch": args.batch, "pre_steps": args.pre_steps, "ft_steps": args.ft_steps, "max_lr": args.max_lr,
              "seed": args.seed, "threads": torch.get_num_threads(), "old_colours": old_colours, "anchor": "full",
              "rows": rows, "wall_s": round(time.time() - t_start, 1)}
    common.append_jsonl(os.path.join(args.out, "finetune.jsonl"), record)
    md = os.path.join(args.out, "finetune.md")
    common.write_text(md, f"# Fine-tuning: old vs new classes\n\n`{common.command(argv)}` ({record['time']}, "
                          f"{record['wall_s']:.0f} s)\n\n{head}.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {md} and appended to finetune.jsonl ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
