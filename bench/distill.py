"""
Benchmark distillation on the synthetic set: does a student trained with a teacher's targets beat the same
student trained with the CLIP loss alone, for the same steps, data order and seed?

  1. copy --train_shards train shards and the val split of --data into --work (the original stays read-only);
  2. train the teacher (--teacher_preset, --teacher_steps) on that copy;
  3. copy the data again and store the teacher's embeddings there with `prep_dataset.py add-teacher`
     (it rewrites index.json, hence the copy);
  4. train the student (--student_preset, --steps) four times on the teacher copy: --distill none (the anchor),
     kd, mse, icl; every run reads the same shards, so the loader's cost is the same for all;
  5. read the final val record of each run's metrics.jsonl: zero-shot top-1 on val (all 64 colour-shape
     classes), zero-shot top-1 on the 8 combinations held out of training, image->text R@1; time per step is
     the median over steps (after 5 warmup steps) of batch / samples_per_s.

Prints the table with each student's ratio to the anchor, writes it to bench/results/distill.md and appends one
JSON line to bench/results/distill.jsonl. No extra packages: the anchor is our own student without a teacher.

    python bench/distill.py                                   # ~10 minutes on 2 CPU cores
    python bench/distill.py --teacher_steps 600 --steps 400 --student_preset tiny
"""

import json
import os
import platform
import shutil
import statistics
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import prep_dataset
from dataloader import save_json

ROOT = common.ROOT

MODES = ("none", "kd", "mse", "icl")


def subset(src, dst, train_shards):
    """Copy the first `train_shards` train shards, every val shard and the tokenizer; write a matching index."""
    with open(os.path.join(src, "index.json")) as f:
        index = json.load(f)
    os.makedirs(dst, exist_ok=True)
    t = index["train"]
    n = min(train_shards, len(t["shards"]))
    index["train"] = {"shards": t["shards"][:n], "shard_sizes": t["shard_sizes"][:n],
                      "num_samples": sum(t["shard_sizes"][:n])}
    for name in index["train"]["shards"] + index["val"]["shards"] + ["tokenizer.json"]:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    save_json(os.path.join(dst, "index.json"), index)
    return index


def results(log_dir, run_name, batch):
    train_recs, val = common.run_log(log_dir, run_name)
    return {"zeroshot_top1": val["zeroshot_top1"], "zeroshot_top1_heldout": val.get("zeroshot_top1_heldout"),
            "i2t_R@1": val["i2t_R@1"], "val_loss": val["loss"],
            "s_per_step": statistics.median(common.step_seconds(train_recs, batch, warmup=5))}


def main():
    p = common.parser(__doc__)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "syn32"), help="a synthetic set (read only)")
    p.add_argument("--work", default=os.path.join(common.DATA, "distill"), help="copies, runs, logs")
    p.add_argument("--train_shards", type=int, default=6, help="train shards copied from --data")
    p.add_argument("--teacher_preset", default="tiny")
    p.add_argument("--teacher_steps", type=int, default=300)
    p.add_argument("--teacher_lr", type=float, default=2e-3)
    p.add_argument("--student_preset", default="micro")
    p.add_argument("--steps", type=int, default=250, help="student steps, the same for every mode")
    p.add_argument("--lr", type=float, default=3e-3, help="student max_lr")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--distill_weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    common.add_threads(p)
    p.add_argument("--reuse_teacher", action="store_true", help="keep a teacher checkpoint already in --work")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.data, "index.json")):
        p.error(f"--data {args.data} has no index.json (python prep_dataset.py synthetic --out {args.data} "
                f"--img_size 32)")

    common.set_threads(args.threads)
    t_all, load0 = time.time(), os.getloadavg()[0]  # other jobs on the machine slow every row alike
    base, stored = os.path.join(args.work, "data"), os.path.join(args.work, "data_teacher")
    out, logs = os.path.join(args.work, "out"), os.path.join(args.work, "logs")
    teacher_ckpt = os.path.join(out, "teacher", "ckpt", "latest.pt")
    for d in ([base, stored, logs] if args.reuse_teacher and os.path.isfile(teacher_ckpt) else [args.work]):
        shutil.rmtree(d, ignore_errors=True)
    index = subset(args.data, base, args.train_shards)
    n_train = index["train"]["num_samples"]
    epochs = lambda steps: common.epochs_for(steps, n_train // args.batch)
    flags = ["--batch", str(args.batch), "--seed", str(args.seed), "--workers", str(args.workers), "--eval_every",
              "0", "--ckpt_every", "100000", "--out", out, "--log_dir", logs, "--quiet",
              "--overwrite"]  # with --reuse_teacher the students' earlier runs are still in --work: moved aside

    t0 = time.time()
    if not (args.reuse_teacher and os.path.isfile(teacher_ckpt)):
        print(f"teacher: {args.teacher_preset}, {args.teacher_steps} steps of {args.batch} on {n_train} samples")
        common.run_train(["--data", base, "--preset", args.teacher_preset, "--epochs", str(epochs(args.teacher_steps)),
                          "--max_lr", str(args.teacher_lr), "--run_name", "teacher", *flags], args.quiet, plots=False)
        teacher = results(logs, "teacher", args.batch)
    else:
        print(f"teacher: reusing {teacher_ckpt}")
        teacher = None
    t_teacher = time.time() - t0

    t0 = time.time()
    shutil.copytree(base, stored)
    prep_dataset.main(["add-teacher", "--data", stored, "--teacher", teacher_ckpt, "--batch", "256"]
                      + (["--quiet"] if args.quiet else []))
    t_store = time.time() - t0
    n_stored = n_train + index["val"]["num_samples"]

    rows = {}
    for mode in MODES:
        print(f"student: {args.student_preset}, --distill {mode}, {args.steps} steps")
        common.run_train(["--data", stored, "--preset", args.student_preset, "--epochs", str(epochs(args.steps)),
                          "--max_lr", str(args.lr), "--run_name", f"student-{mode}", "--distill", mode,
                          "--distill_weight", str(args.distill_weight), *flags], args.quiet, plots=False)
        rows[mode] = results(logs, f"student-{mode}", args.batch)

    anchor = rows["none"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    cells = lambda r: [pct(r["zeroshot_top1"]), pct(r["zeroshot_top1_heldout"]), pct(r["i2t_R@1"]),
                       f"{r['val_loss']:.3f}", f"{r['s_per_step']:.3f}"]
    body = [[f"teacher ({args.teacher_preset})", "-", *cells(teacher), "-", "-"]] if teacher else []
    body += [[f"student ({args.student_preset})", mode, *cells(r),
              f"{r['zeroshot_top1'] / max(anchor['zeroshot_top1'], 1e-9):.2f}x",
              f"{r['s_per_step'] / anchor['s_per_step']:.2f}x"] for mode, r in rows.items()]
    table = "\n".join(common.md_table(["model", "distill", "zero-shot top-1 %", "held-out top-1 %", "i2t R@1 %",
                                        "val loss", "s/step", "zero-shot vs none", "s/step vs none"], body))
    total = time.time() - t_all
    settings = (f"data: {args.train_shards} train shards ({n_train} samples) + val ({index['val']['num_samples']}) "
                f"of `{os.path.relpath(args.data, ROOT)}` at {index['img_size']} px; batch {args.batch}, seed "
                f"{args.seed}, {args.workers} loader worker(s), {torch.get_num_threads()} torch thread(s); teacher `{args.teacher_preset}` "
                f"{args.teacher_steps} steps at max_lr {args.teacher_lr}"
                f"{'' if teacher else ' (reused)'}; students `{args.student_preset}` {args.steps} steps at max_lr "
                f"{args.lr}, --distill_weight {args.distill_weight}; {os.cpu_count()} CPU cores ({platform.node()}), "
                f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n"
                f"Teacher training {t_teacher:.0f} s, add-teacher {t_store:.0f} s ({n_stored / t_store:.0f} samples/s), "
                f"whole benchmark {total:.0f} s.")
    print(table)
    print(settings)
    md = (f"# Distillation on the synthetic set\n\n`{common.command()}`\n\n{table}\n\n{settings}\n\n"
          "Zero-shot: top-1 over the 64 colour-shape classes on val; held-out: the same on the 8 combinations never "
          "seen in training; i2t R@1: each val image's own caption ranked first among all val captions; "
          "s/step: median training step time (the stored teacher embeddings cost no teacher forward pass). "
          "Ratios are against the `none` student from the same run. One seed and a few hundred steps: differences of "
          "a few points can be seed noise (rerun with --seed to check).\n")
    common.write_text(os.path.join(common.RESULTS, "distill.md"), md)
    line = {**common.machine("time", "host", "cpus"),
            "args": {k: v for k, v in vars(args).items() if k not in ("data", "work", "quiet")},
            "train_samples": n_train, "teacher": teacher, "students": rows,
            "zeroshot_vs_none": {m: r["zeroshot_top1"] / max(anchor["zeroshot_top1"], 1e-9) for m, r in rows.items()},
            "s_per_step_vs_none": {m: r["s_per_step"] / anchor["s_per_step"] for m, r in rows.items()},
            "teacher_s": round(t_teacher, 1), "add_teacher_s": round(t_store, 1), "total_s": round(total, 1)}
    common.append_jsonl(os.path.join(common.RESULTS, "distill.jsonl"), line)


if __name__ == "__main__":
    main()
