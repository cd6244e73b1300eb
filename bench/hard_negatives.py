"""
Benchmark hard negatives on the synthetic set: does training with swapped captions (NegCLIP) or mined captions
(DPR-style) as extra negatives lift the swap tests off chance, and what does it cost in zero-shot accuracy,
retrieval and time per step? Equal steps, data order and seed for every mode.

  1. make the built-in synthetic set with prep_dataset.py (git-ignored bench/.data/); its json "negatives" are the
     train split's own swaps (colours swapped, relation reversed) plus the two objects swapped around the relation
     (one-object images have none). The swap test on val
     uses the val split's swaps: the same kind of caption, on other images and on held-out colour-shape
     combinations. Training on the train split's swaps is what NegCLIP does with its own data.
  2. per seed: train `none`; mine K negatives per training sample with that checkpoint
     (`prep_dataset.py add-negatives`, on a copy); train `swaps`, `mined` and `both` on the copy;
  3. read the final val record of each run: zero-shot top-1 (seen / held-out combinations), swap_attribute,
     swap_relation, i2t / t2i R@1; s/step is the median step time after 5 warmup steps.

Prints a table per step count in the jsonl (mean over seeds, the spread when there are several, and each seed's
swap scores: the target is per seed), writes bench/results/hard_negatives.md
and appends one JSON line per run to bench/results/hard_negatives.jsonl.

    python bench/hard_negatives.py                          # 1 seed, 1404 steps (9 epochs)
    python bench/hard_negatives.py --seeds 0 1 2 --modes none swaps
    python bench/hard_negatives.py --steps 702              # the README main command's length
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

MODES = ("none", "swaps", "mined", "both")
METRICS = ("zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_heldout", "swap_attribute", "swap_relation", "i2t_R@1", "t2i_R@1")


def results(log_dir, run_name, batch):
    train_recs, val = common.run_log(log_dir, run_name)
    return {**{k: val.get(k) for k in METRICS}, "val_loss": val["loss"],
            "s_per_step": statistics.median(common.step_seconds(train_recs, batch, warmup=5))}


def jsonl_rows(path, args, steps):
    """Every run in the jsonl with this benchmark's settings and `steps`, the latest per (mode, seed) -> {mode: [record]}:
    so seeds added by a later invocation (--seeds 1 2) join the table."""
    same = ("batch", "preset", "k", "num_train")
    latest = {}
    for r in common.read_jsonl(path):
        if r["steps"] == steps and all(r.get(k) == getattr(args, k) for k in same):
            latest[(r["mode"], r["seed"])] = r
    rows = {m: [] for m in MODES}
    for (mode, _), r in sorted(latest.items()):
        rows[mode].append(r)
    return rows, sorted({seed for _, seed in latest})


def table(rows, seeds, steps):
    """Mean (± standard deviation) over seeds per mode, then each seed's swap scores: the target is per seed."""
    def cell(mode, key, scale=100, fmt="{:.1f}"):
        vals = [r[key] for r in rows[mode] if r.get(key) is not None]
        if not vals:
            return "-"
        s = fmt.format(scale * statistics.mean(vals))
        return s + (f" ± {fmt.format(scale * statistics.stdev(vals))}" if len(vals) > 1 else "")
    body = []
    anchor = {r["seed"]: r["s_per_step"] for r in rows["none"]}  # the machine's load changes between runs:
    for mode in (m for m in MODES if rows[m]):  # each run is compared with the `none` run of its own seed
        ratios = [r["s_per_step"] / anchor[r["seed"]] for r in rows[mode] if r["seed"] in anchor]
        ratio = statistics.mean(ratios) if ratios else None
        body.append([mode, " ".join(str(r["seed"]) for r in rows[mode]), *(cell(mode, k) for k in METRICS),
                     cell(mode, "val_loss", 1, "{:.3f}"), cell(mode, "s_per_step", 1, "{:.3f}"),
                     "-" if ratio is None else f"{ratio:.2f}x"])
    head = ["--hard_negatives", "seeds", "zero-shot %", "zero-shot seen %", "zero-shot held-out %", "swap_attribute %",
            "swap_relation %", "i2t R@1 %", "t2i R@1 %", "val loss", "s/step", "s/step vs none"]
    lines = [f"## {steps} steps, seeds {' '.join(map(str, seeds))}", "", *common.md_table(head, body, "ll" + "r" * 10)]
    per_seed = "; ".join(f"{mode} " + ", ".join(f"s{r['seed']} {100 * r['swap_attribute']:.0f}/{100 * r['swap_relation']:.0f}"
                                                for r in rows[mode]) for mode in MODES if rows[mode])
    return lines + ["", f"swap_attribute / swap_relation % per seed: {per_seed}.", ""]


def report(args, jsonl, t_mine, t_all, load0):
    """Write a table per step count of the runs so far, longest first, to bench/results/hard_negatives.md."""
    step_counts = sorted({r["steps"] for r in common.read_jsonl(jsonl)}, reverse=True)
    tables = []
    for steps in step_counts:
        rows, s = jsonl_rows(jsonl, args, steps)
        if s:
            tables += table(rows, s, steps)
    table_md = "\n".join(tables).strip()
    total = time.time() - t_all
    settings = (f"data: synthetic, {args.num_train} train / {args.num_val} val at 32 px (bench/.data, made by "
                f"prep_dataset.py synthetic); `{args.preset}` preset, batch {args.batch}, max_lr "
                f"{args.lr}; mined: k={args.k} per training sample, with the "
                f"`none` checkpoint of the same seed and steps ({statistics.mean(t_mine) if t_mine else 0:.0f} s per add-negatives); "
                f"{args.workers} loader worker(s), {torch.get_num_threads()} torch thread(s) (OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); {os.cpu_count()} CPU cores ({platform.node()}) shared "
                f"with other jobs, load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; this "
                f"invocation {total:.0f} s.")
    if args.report_only:  # nothing ran: say where the runs' own load and thread counts are
        settings = settings.split("; mined:")[0] + (f"; mined: k={args.k} per training sample, with the `none` "
                                                   "checkpoint of the same seed and steps. Tables rebuilt from "
                                                   "bench/results/hard_negatives.jsonl: every run's load average, "
                                                   "threads (1 torch thread, OMP_NUM_THREADS=1) and time are in its line.")
    print(table_md)
    print(settings)
    md = (f"# Hard negatives on the synthetic set\n\nlast run as `{common.command()}`\n\n{settings}\n\n{table_md}\n\n"
          "Zero-shot: top-1 over the 64 colour-shape classes on val, split into the 56 combinations seen in training "
          "and the 8 held out of it. swap_attribute / swap_relation: the fraction of val images (two-object ones) "
          "whose own caption scores strictly above its colour-swapped / relation-reversed version (chance 0.5). "
          "`swaps` trains on the TRAIN split's own swaps of the same two kinds (as NegCLIP does with COCO) plus the "
          "two objects swapped around the relation, so the swap test measures generalisation to new images and "
          "held-out combinations, not an unseen kind of negative. `mined`: the k captions of other training samples the `none` model scores highest for each "
          "image. i2t/t2i R@1 among all val pairs (the synthetic captions repeat, so many pairs share a caption). "
          "s/step: median step time; the negative captions run through the text tower, so it grows with them; "
          "`vs none` compares each run with the `none` run of its own seed (the shared machine's load changes "
          "between runs, so absolute s/step differ across seeds). Rows average the seeds listed (± = standard "
          "deviation over them). "
          "With one seed, differences of a few points can be noise. The jsonl keeps every run; the table takes the "
          "latest per (mode, seed) with these settings (an earlier `swaps` run of seed 0, on the set with two "
          "negatives per caption instead of three, is in the jsonl and superseded here).\n")
    common.write_text(os.path.join(common.RESULTS, "hard_negatives.md"), md)


def main():
    p = common.parser(__doc__)
    p.add_argument("--work", default=os.path.join(common.DATA, "hard_negatives"), help="data, runs, logs")
    p.add_argument("--num_train", type=int, default=20000, help="the built-in set's size")
    p.add_argument("--num_val", type=int, default=2048, help="a multiple of 64 keeps the classes balanced")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=1404, help="training steps, the same for every mode (1404: twice the README "
                   "main command's 702; the relation test left chance on 1 seed of 3 within 702)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=2, help="mined negatives per training sample")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--workers", type=int, default=1)
    common.add_threads(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report_only", action="store_true", help="rewrite the table from the jsonl, run nothing")
    args = p.parse_args()
    common.set_threads(args.threads)
    t_all, load0 = time.time(), os.getloadavg()[0]
    jsonl = os.path.join(common.RESULTS, "hard_negatives.jsonl")
    if args.report_only:
        return report(args, jsonl, [], t_all, load0)
    base = os.path.join(args.work, "data")
    out, logs = os.path.join(args.work, "out"), os.path.join(args.work, "logs")
    index_path = os.path.join(base, "index.json")
    made = json.load(open(index_path)) if os.path.isfile(index_path) else None
    if made is None or (made["train"]["num_samples"], made["val"]["num_samples"]) != (args.num_train, args.num_val):
        shutil.rmtree(base, ignore_errors=True)
        prep_dataset.main(["synthetic", "--out", base, "--num_train", str(args.num_train), "--num_val",
                           str(args.num_val), "--img_size", "32", "--workers", "2", "--quiet"])

    rows, t_mine = {m: [] for m in args.modes}, []
    for seed in args.seeds:
        flags = ["--preset", args.preset, "--batch", str(args.batch), "--seed", str(seed), "--epochs",
                 str(common.epochs_for(args.steps, args.num_train // args.batch)), "--max_lr", str(args.lr),
                 "--workers", str(args.workers), "--eval_every", "0", "--ckpt_every", "100000", "--out", out,
                 "--log_dir", logs, "--quiet"]
        mined_data = os.path.join(args.work, f"data_mined_{seed}")
        for mode in args.modes:
            name = f"{mode}-s{seed}"
            shutil.rmtree(os.path.join(logs, name), ignore_errors=True)
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            if mode in ("mined", "both") and not os.path.isfile(os.path.join(mined_data, "index.json")):
                ckpt = os.path.join(out, f"none-s{seed}", "ckpt", "latest.pt")
                if not os.path.isfile(ckpt):
                    raise SystemExit(f"mining needs the `none` run of seed {seed} first ({ckpt}); add none to --modes")
                t0 = time.time()
                shutil.rmtree(mined_data, ignore_errors=True)
                shutil.copytree(base, mined_data)
                prep_dataset.main(["add-negatives", "--data", mined_data, "--model", ckpt, "--k", str(args.k)]
                                  + (["--quiet"] if args.quiet else []))
                t_mine.append(time.time() - t0)
            print(f"seed {seed}: --hard_negatives {mode}, {args.steps} steps", flush=True)
            data = mined_data if mode in ("mined", "both") else base
            common.run_train(["--data", data, "--run_name", name, "--hard_negatives", mode, *flags], args.quiet,
                             plots=False)
            r = results(logs, name, args.batch)
            rows[mode].append(r)
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if v is not None), flush=True)
            common.append_jsonl(jsonl, {**common.machine("time", "host"), "mode": mode, "seed": seed,
                                        "steps": args.steps, "batch": args.batch, "preset": args.preset, "k": args.k,
                                        "num_train": args.num_train, **common.machine("threads", "load"), **r})
            report(args, jsonl, t_mine, t_all, load0)  # after every run: a cut-off benchmark keeps its finished rows
        shutil.rmtree(mined_data, ignore_errors=True)


if __name__ == "__main__":
    main()
