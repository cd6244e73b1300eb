"""The three trainer options side by side on CPU: --loss siglip vs the softmax loss, --patch_dropout 0.5, --grad_ckpt.

1. loss: the `tiny` preset for the same number of steps on the synthetic set, `clip` vs `siglip`, at batch 32
   (3 seeds) and batch 128 (1 seed); zero-shot top-1 and retrieval on the val split after the last step.
   Target: SigLIP at batch 32 at least as good as softmax at batch 32 (Zhai et al.'s small-batch claim).
   `--losses siglip_prior` adds an ablation that is not a train.py option: the bias starting at -log(B - 1).
2. dropout: the same training at --patch_dropout 0 and 0.5 (zero-shot, s/step), and the vision tower alone
   (forward + backward, no data loading) timed at 32 px (16 patches, the training set) and 64 px (64 patches).
   Target: 0.5 cuts the vision tower's step time by >= 35%.
3. ckpt: the `seed` preset (224 px, batch 4): forward + backward time with and without --grad_ckpt, and the bytes
   autograd keeps for backward, counted with torch.autograd.graph.saved_tensors_hooks (distinct non-parameter
   storages) plus the block inputs the checkpoint holds itself (the hooks do not see those). Target: >= 60% less.

Each part appends to bench/results/trainer_options.jsonl; `report` writes trainer_options.md from the newest record
of each measurement, so the parts can run separately (the machine is shared):

    OMP_NUM_THREADS=1 python bench/trainer_options.py loss --batches 32 --seeds 0 1 2
    OMP_NUM_THREADS=1 python bench/trainer_options.py loss --batches 128 --seeds 0
    OMP_NUM_THREADS=1 python bench/trainer_options.py loss --batches 32 --seeds 0 1 2 --losses siglip_prior
    OMP_NUM_THREADS=1 python bench/trainer_options.py loss --batches 128 --seeds 0 --losses siglip_prior
    OMP_NUM_THREADS=1 python bench/trainer_options.py dropout          # or `tower`: the timing alone
    OMP_NUM_THREADS=1 python bench/trainer_options.py ckpt
    python bench/trainer_options.py report
"""
import contextlib
import json
import math
import os
import statistics
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import clip
import train

JSONL = os.path.join(common.RESULTS, "trainer_options.jsonl")


def write(args, record):
    record = {"bench": "trainer_options", **common.machine("time", "host", "torch", "threads"), **record}
    common.append_jsonl(args.jsonl, record)
    print(json.dumps(record))


# ----------------------------------------------------------------------------- training runs (parts 1 and 2)

def train_run(args, name, batch, seed, extra):
    """train.py for args.steps steps; the val metrics after the last one and the step times."""
    with open(os.path.join(args.data, "index.json")) as f:
        n_train = json.load(f)["train"]["num_samples"]
    run = f"{name}-b{batch}-s{seed}"
    flags = ["--data", args.data, "--preset", "tiny", "--batch", str(batch), "--epochs", str(args.steps * batch / n_train),
             "--max_lr", str(args.max_lr), "--seed", str(seed), "--workers", "1", "--eval_every", "0",
             "--ckpt_every", "100000", "--out", os.path.join(args.out, "ckpt"), "--log_dir", os.path.join(args.out, "logs"),
             "--run_name", run, "--quiet"] + extra
    t0 = time.time()
    common.run_train(flags, quiet=False)
    train_rows, val = common.run_log(os.path.join(args.out, "logs"), run)
    steps = common.step_seconds(train_rows, batch, warmup=2)  # the first steps warm up
    keys = ("zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_heldout", "i2t_R@1", "t2i_R@1")
    # SigLIP only: steps whose train loss sat at the collapsed value (every cosine equal; see report)
    plateau = sum(abs(r["loss"] - min_collapsed(batch)) < 0.01 for r in train_rows) if "siglip" in name else None
    return {"steps": len(train_rows), "s_step_median": statistics.median(steps), "s_step_min": min(steps),
            "plateau_steps": plateau,
            "wall_s": time.time() - t0, "val_loss": val["loss"], "final_logit_scale": train_rows[-1]["logit_scale"],
            "final_logit_bias": train_rows[-1].get("logit_bias"), **{k: val[k] for k in keys}}


@contextlib.contextmanager
def bias_init(value):
    """Ablation only (no train.py flag): SigLIP's bias starts at `value` instead of -10."""
    real = clip.CLIP.init_weights

    def init_weights(self):
        real(self)
        if hasattr(self, "logit_bias"):
            torch.nn.init.constant_(self.logit_bias, value)
    clip.CLIP.init_weights = init_weights
    try:
        yield
    finally:
        clip.CLIP.init_weights = real


def part_loss(args):
    """siglip_prior: SigLIP with the bias starting at the log prior odds of a pair, -log(B - 1), instead of -10
    (the paper's value, which is the log prior at B = 32k): is the small-batch gap the bias's starting point?"""
    for batch in args.batches:
        for seed in args.seeds:
            for loss in args.losses:
                b0 = -math.log(batch - 1) if loss == "siglip_prior" else None
                with bias_init(b0) if b0 is not None else contextlib.nullcontext():
                    r = train_run(args, loss, batch, seed, ["--loss", "clip" if loss == "clip" else "siglip"])
                write(args, {"part": "loss", "loss": loss, "batch": batch, "seed": seed, "max_lr": args.max_lr,
                             "bias_init": b0 if b0 is not None else (-10.0 if loss == "siglip" else None), **r})


def tower_times(img_size, batch, reps):
    """The tiny vision tower's forward + backward (s), median over reps, dropout 0 and 0.5 interleaved so that
    load from other jobs on the machine falls on both alike."""
    torch.manual_seed(0)
    cfg = clip.get_config("tiny", img_size=img_size, patch_dropout=0.5)
    tower = clip.VisionTransformer(cfg).train()
    images = torch.randn(batch, 3, img_size, img_size)
    keep = clip.sample_patch_keep(batch, cfg.vision, torch.Generator().manual_seed(0))
    times = {0.0: [], 0.5: []}
    for i in range(reps + 2):
        for p, k in ((0.0, None), (0.5, keep)):
            t0 = time.perf_counter()
            tower(images, patch_keep=k).sum().backward()
            if i >= 2:  # two warm-up rounds
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) for p, t in times.items()}


def part_dropout(args):
    for p in (0.0, 0.5):
        r = train_run(args, f"drop{p}", args.dropout_batch, 0, ["--patch_dropout", str(p)])
        write(args, {"part": "dropout_train", "patch_dropout": p, "batch": args.dropout_batch, "seed": 0,
               "max_lr": args.max_lr, **r})
    part_tower(args)


def part_tower(args):
    for img_size in (32, 64):
        t = tower_times(img_size, args.dropout_batch, args.reps)
        patches = (img_size // 8) ** 2
        write(args, {"part": "dropout_tower", "img_size": img_size, "batch": args.dropout_batch, "patches": patches,
               "kept": patches // 2, "s_full": t[0.0], "s_dropout": t[0.5], "cut": 1 - t[0.5] / t[0.0], "reps": args.reps})


# ----------------------------------------------------------------------------- activation checkpointing (part 3)

def saved_activation_bytes(model, images, tokens):
    """Bytes kept for backward by one forward: distinct non-parameter storages that autograd saves (the hooks)
    plus each block's input (what a checkpointed block keeps itself, unseen by the hooks; without checkpointing
    ln_1 saves that same tensor, so it is counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def note(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    def note_input(block, inputs):  # a forward pre-hook; returning None leaves the input as it is
        note(inputs[0])
    hooks = [b.register_forward_pre_hook(note_input) for b in list(model.visual.blocks) + list(model.text.blocks)]
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        out = model(images, tokens)
    for h in hooks:
        h.remove()
    del out
    return sum(kept.values())


def part_ckpt(args):
    torch.manual_seed(0)
    cfg = clip.get_config("seed")
    model = clip.CLIP(cfg).train()
    B = args.ckpt_batch
    images = torch.randn(B, 3, cfg.vision.img_size, cfg.vision.img_size)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (B, cfg.text.context_length))
    tokens[:, 20] = cfg.text.vocab_size - 1  # eot
    loss_fn = train.make_loss(train.get_parser().parse_args([]), model)
    saved, times = {}, {False: [], True: []}
    for ckpt in (False, True):
        saved[ckpt] = saved_activation_bytes(model.set_grad_checkpointing(ckpt), images, tokens)
    for i in range(args.ckpt_reps + 1):  # interleaved; round 0 warms up
        for ckpt in (False, True):
            model.set_grad_checkpointing(ckpt).zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss, _ = loss_fn(model(images, tokens), None)
            loss.backward()
            if i:
                times[ckpt].append(time.perf_counter() - t0)
    for ckpt in (False, True):
        write(args, {"part": "ckpt", "preset": "seed", "batch": B, "grad_ckpt": ckpt, "saved_bytes": saved[ckpt],
               "s_fwd_bwd_median": statistics.median(times[ckpt]), "s_fwd_bwd_min": min(times[ckpt]),
               "reps": args.ckpt_reps})


# ----------------------------------------------------------------------------- report

def latest(records, part, *keys):
    """The newest record of each measurement (part, keys...)."""
    out = {}
    for r in records:
        if r.get("part") == part:
            out[tuple(r[k] for k in keys)] = r
    return out


def min_collapsed(B):
    """SigLIP's loss when every cosine is equal and t * cos + b sits at the optimum x = -log(B - 1)."""
    x = -math.log(B - 1)
    return math.log1p(math.exp(-x)) + (B - 1) * math.log1p(math.exp(x))


def report(path):
    records = common.read_jsonl(path)
    pct = lambda x: f"{100 * x:.1f}"
    lines = ["# Trainer options: --loss siglip, --patch_dropout, --grad_ckpt", "",
             "`bench/trainer_options.py` (parts run separately; settings per row below). CPU, a 2-core machine shared with "
             "other jobs: s/step is noisy, and so is a single seed's accuracy (zero-shot chance 1.6%, R@1 chance 0.05%).", ""]
    loss = latest(records, "loss", "loss", "batch", "seed")
    if loss:
        r0 = next(iter(loss.values()))
        lines += [f"## 1. Softmax (`clip`) vs sigmoid (`siglip`) loss: tiny preset, {r0['steps']} steps, max_lr {r0['max_lr']}, "
                  f"{r0['threads']} thread(s)", "",
                  "`siglip` starts at t = 10, b = -10 (the paper's values, and train.py's). `siglip_prior` is an ablation "
                  "that is no train.py option: the bias starts at -log(B - 1), the log prior odds that a pair matches "
                  "(-10 is that prior at B = 22k). A sigmoid model can also reach its prior by making every cosine equal; "
                  "that collapsed state has loss softplus(-x) + (B - 1) softplus(x) at x = -log(B - 1): "
                  + ", ".join(f"{min_collapsed(b):.3f} at B = {b}" for b in sorted({k[1] for k in loss})) + ".", ""]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        body = []
        for (name, batch, seed), r in sorted(loss.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            b0 = r.get("bias_init", -10.0 if name == "siglip" else None)  # records from before the field: train.py's -10
            body.append([batch, seed, name, fmt(b0), *(pct(r[k]) for k in ("zeroshot_top1", "zeroshot_top1_seen",
                         "zeroshot_top1_heldout", "i2t_R@1", "t2i_R@1")), f"{r['val_loss']:.3f}",
                         fmt(r.get("final_logit_scale")), fmt(r.get("final_logit_bias")),
                         r.get("plateau_steps", "-") if name != "clip" else "-", f"{r['s_step_median']:.3f}"])
        lines += common.md_table(["batch", "seed", "loss", "b init", "zero-shot top-1 %", "seen %", "held-out %",
                                  "i2t R@1 %", "t2i R@1 %", "val loss", "final t", "final b", "steps at collapse",
                                  "s/step (median)"], body, "rrl" + "r" * 11)
        body = []
        for batch in sorted({k[1] for k in loss}):
            for variant in ("siglip", "siglip_prior"):
                seeds = sorted(s for (n, b, s) in loss if b == batch and n == variant and ("clip", b, s) in loss)
                if not seeds:
                    continue
                c = [loss[("clip", batch, s)]["zeroshot_top1"] for s in seeds]
                g = [loss[(variant, batch, s)]["zeroshot_top1"] for s in seeds]
                wins = sum(y >= x for x, y in zip(c, g))
                gain = 100 * (statistics.mean(g) - statistics.mean(c))
                body.append([batch, variant, len(seeds), pct(statistics.mean(g)), pct(statistics.mean(c)),
                             f"{gain:+.1f}", f"{wins} of {len(seeds)} seeds"])
        lines += ["", *common.md_table(["batch", "loss", "seeds", "zero-shot % (mean)", "clip zero-shot % (mean)",
                                        "minus clip (points)", ">= clip on"], body, "rlrrrrl")]
        lines += ["- in final t / b / steps at collapse: not recorded by the runs that predate those fields.", ""]
    drop = latest(records, "dropout_train", "patch_dropout")
    tower = latest(records, "dropout_tower", "img_size")
    if drop or tower:
        lines += ["## 2. Patch dropout (FLIP)", ""]
    if drop:
        r0 = next(iter(drop.values()))
        body = [[p, *(pct(r[k]) for k in ("zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_heldout", "i2t_R@1")),
                 f"{r['s_step_median']:.3f}", f"{r['s_step_min']:.3f}"] for (p,), r in sorted(drop.items())]
        lines += [f"Training: tiny preset, 32 px (16 patches), batch {r0['batch']}, {r0['steps']} steps, seed 0.", "",
                  *common.md_table(["patch_dropout", "zero-shot top-1 %", "seen %", "held-out %", "i2t R@1 %",
                                    "s/step (median)", "s/step (min)"], body, "r" * 7), ""]
    if tower:
        lines += ["Vision tower alone (tiny, forward + backward of the tower only, no data loading, median of "
                  f"{next(iter(tower.values())).get('reps', 20)} interleaved repeats; target: >= 35% less):", "",
                  *common.md_table(["image", "patches kept", "batch", "s (all patches)", "s (dropout 0.5)", "time cut",
                                    "target met"],
                                   [[f"{size} px", f"{r['kept']} of {r['patches']}", r["batch"], f"{r['s_full']:.4f}",
                                     f"{r['s_dropout']:.4f}", f"{pct(r['cut'])}%", "yes" if r["cut"] >= 0.35 else "no"]
                                    for (size,), r in sorted(tower.items())], "llrrrrl"), ""]
    ck = latest(records, "ckpt", "grad_ckpt")
    if len(ck) == 2:
        off, on = ck[(False,)], ck[(True,)]
        cut = 1 - on["saved_bytes"] / off["saved_bytes"]
        lines += [f"## 3. Activation checkpointing: seed preset (224 px, ctx 77), batch {off['batch']}, fp32, "
                  f"{off['threads']} thread(s)", "",
                  *common.md_table(["--grad_ckpt", "saved activations (MiB)", "forward + backward s (median)", "min"],
                                   [[name, f"{r['saved_bytes'] / 2 ** 20:.1f}", f"{r['s_fwd_bwd_median']:.2f}",
                                     f"{r['s_fwd_bwd_min']:.2f}"] for name, r in (("off", off), ("on", on))], "lrrr"),
                  "", f"Saved activation bytes cut by {pct(cut)}% (target >= 60%: "
                  f"{'met' if cut >= 0.6 else 'not met'}); "
                  f"step time x{on['s_fwd_bwd_median'] / off['s_fwd_bwd_median']:.2f} (one extra forward).", ""]
    out = os.path.splitext(path)[0] + ".md"
    common.write_text(out, "\n".join(lines))  # (a hand-written reading below the table is kept)
    print("\n".join(lines))


def main(argv=None):
    p = common.parser(__doc__, whole=True)
    p.add_argument("part", choices=("loss", "dropout", "tower", "ckpt", "report"), help="tower: dropout's timing only")
    p.add_argument("--data", default=os.path.join(common.DATA, "syn32"), help="synthetic shards (read only)")
    p.add_argument("--out", default="/tmp/bench_trainer_options", help="checkpoints and logs go here")
    p.add_argument("--steps", type=int, default=300, help="steps per training run")
    p.add_argument("--max_lr", type=float, default=2e-3)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="loss: batch sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="loss: seeds")
    p.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=("clip", "siglip", "siglip_prior"),
                   help="loss: siglip_prior = siglip with the bias starting at -log(batch - 1) (an ablation)")
    p.add_argument("--dropout_batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20, help="dropout: vision-tower repeats")
    p.add_argument("--ckpt_batch", type=int, default=4)
    p.add_argument("--ckpt_reps", type=int, default=3)
    p.add_argument("--jsonl", default=JSONL, help="results file (the .md report is written beside it)")
    args = p.parse_args(argv)
    if args.part in ("loss", "dropout") and not os.path.isfile(os.path.join(args.data, "index.json")):
        p.error(f"--data {args.data} has no index.json (make it with "
                f"`python prep_dataset.py synthetic --out bench/.data/syn32 --img_size 32`)")
    {"loss": part_loss, "dropout": part_dropout, "tower": part_tower, "ckpt": part_ckpt, "report": lambda a: report(a.jsonl)}[args.part](args)


if __name__ == "__main__":
    main()
