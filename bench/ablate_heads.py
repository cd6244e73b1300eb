"""
Ablation of the projection heads (simplex.py, Pernici et al. 2021): the same run of train.py (same preset, data,
steps, batch, learning rate and seed) once per head x mode the preset can make:
    linear                                  the anchor: a learned width -> embed_dim projection (CLIP)
    simplex / orthoplex / cube  x replace   a learned width -> d map, then K = embed_dim fixed vertices
    simplex / orthoplex / cube  x after     the learned width -> embed_dim projection, then the K fixed vertices
                                            of the embed_dim-polytope (K = embed_dim+1, 2*embed_dim, 2^embed_dim)
Combinations the config refuses (cube x after needs 2^embed_dim vertices, refused above 2^16) get a row that says
so. Each run's final val loss, zero-shot top-1 on seen / held-out colour-shape combinations, i2t / t2i R@1,
trainable parameters and fastest time per step go to a markdown table (bench/results/heads.md) and one JSON line
per run (bench/results/heads.jsonl); the console shows each head against the linear anchor of the same run.

Defaults (tiny preset, 32 px synthetic set, batch 64, 150 steps, max_lr 2e-3, seed 0) make the 6 runs + their
final evaluations about 10-12 minutes on 2 idle CPU cores; on a shared machine it takes longer and the time per
step (the fastest step of each run) is the best it can be, not a clean measurement.

    python bench/ablate_heads.py [--data data/syn32] [--preset tiny] [--batch 64] [--steps 150] [--report] [--quiet]

Runs write checkpoints and logs under --work (default /tmp/ablate_heads); the data directory is only read.
"""

import json
import math
import os
import sys
import time

import common  # first: the repository root goes ahead of bench/ on sys.path
import clip
from dataloader import ShardLoader
from tokenizer import Tokenizer

COMBOS = [("linear", "replace")] + [(h, m) for h in ("simplex", "orthoplex", "cube") for m in ("replace", "after")]
METRICS = ["zeroshot_top1_seen", "zeroshot_top1_heldout", "i2t_R@1", "t2i_R@1", "loss"]


def get_parser():
    p = common.parser(__doc__)
    a = p.add_argument
    a("--data", default=os.path.join(common.ROOT, "data", "syn32"),
      help="labelled synthetic shard set (default: %(default)s)")
    a("--preset", default="tiny", help="model preset (default: %(default)s)")
    a("--batch", type=int, default=64, help="batch per step (default: %(default)s)")
    a("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
    a("--max_lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    a("--seed", type=int, default=0, help="(default: %(default)s)")
    a("--work", default="/tmp/ablate_heads", help="checkpoints and logs of the runs (default: %(default)s)")
    a("--md", default=os.path.join(common.RESULTS, "heads.md"), help="table (default: %(default)s)")
    a("--jsonl", default=os.path.join(common.RESULTS, "heads.jsonl"), help="(default: %(default)s)")
    a("--report", action="store_true", help="no training: rebuild the table and lines from the runs in --work")
    a("--quiet", action="store_true", help="no progress bars")
    return p


def run_one(args, head, mode, epochs):
    """One train.py run; returns read_run of its log."""
    name = f"{args.preset}-{head}-{mode}"
    argv = ["--data", args.data, "--preset", args.preset, "--batch", str(args.batch), "--epochs", repr(epochs),
            "--max_lr", str(args.max_lr), "--seed", str(args.seed), "--workers", "0", "--eval_every", "0",
            "--ckpt_every", str(10 ** 9), "--out", os.path.join(args.work, "out"),
            "--log_dir", os.path.join(args.work, "logs"), "--run_name", name, "--head", head, "--head_mode", mode,
            "--overwrite"] + (["--quiet"] if args.quiet else [])  # --overwrite: an earlier run is moved aside
    t0 = time.time()
    common.run_train(argv, args.quiet)
    return read_run(args, name, time.time() - t0)


def read_run(args, name, wall=None):
    """A finished run's final val record, fastest step time, last train loss and wall time (from its log)."""
    steps, val = common.run_log(os.path.join(args.work, "logs"), name)
    if len(steps) != args.steps or val is None:
        raise RuntimeError(f"{name}: the log in {args.work} has {len(steps)} of {args.steps} steps and no final eval")
    # the fastest step, as timeit does: on a shared machine the neighbours only ever add time, so the minimum is
    # the head's own cost (the median of a run that shared the cores with another job says more about the job)
    s_per_step = min(common.step_seconds(steps, args.batch))
    return val, s_per_step, [r["loss"] for r in steps], wall if wall is not None else steps[-1]["elapsed_s"]


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be >= 1")
    if not os.path.isfile(os.path.join(args.data, "index.json")):
        parser.error(f"--data {args.data} has no index.json")
    with open(os.path.join(args.data, "index.json")) as f:
        index = json.load(f)
    if "classes" not in index:
        parser.error(f"--data {args.data} has no classes: zero-shot needs a labelled set (prep_dataset.py synthetic)")
    tok = Tokenizer.load(os.path.join(args.data, "tokenizer.json"))
    batches = len(ShardLoader(args.data, "train", args.batch, tok, 8))  # per epoch (drop_last)
    epochs = common.epochs_for(args.steps, batches)
    sizes = dict(vocab_size=tok.vocab_size, img_size=index["img_size"])
    print(f"{args.preset} preset on {args.data} ({index['img_size']} px, {index['train']['num_samples']} train / "
          f"{index['val']['num_samples']} val): {args.steps} steps of {args.batch}, max_lr {args.max_lr}, seed {args.seed}")

    rows, anchor = [], None
    for head, mode in COMBOS:
        row = {"bench": "ablate_heads", "preset": args.preset, "head": head, "head_mode": mode, "steps": args.steps,
               "batch": args.batch, "max_lr": args.max_lr, "seed": args.seed, "data": os.path.basename(args.data),
               **common.machine("host", "cpus", "time")}
        try:
            config = clip.get_config(args.preset, head=head, head_mode=mode, **sizes)
        except ValueError as e:  # the same check train.py turns into its exit-2 error
            row.update(status="refused", reason=str(e))
            print(f"{head:9s} {mode:7s} refused: {e}")
            rows.append(row)
            continue
        model = clip.CLIP(config)
        row.update(status="ok", output_dim=config.output_dim, trainable_params=model.num_params(trainable_only=True),
                   polytope_d=None if head == "linear" else model.visual.proj.d if mode == "replace" else config.embed_dim)
        if args.report:
            val, s_per_step, losses, wall = read_run(args, f"{args.preset}-{head}-{mode}")
        else:
            val, s_per_step, losses, wall = run_one(args, head, mode, epochs)
        # a contrastive batch of B starts at loss ln B (chance); runs sit on that plateau for a while, and when
        # they leave it decides much of where they are after a short run
        chance = math.log(args.batch)
        row.update({k: val[k] for k in METRICS + ["zeroshot_top1"] if k in val},
                   s_per_step=s_per_step, last_train_loss=losses[-1], wall_s=wall,
                   leaves_chance_step=next((i + 1 for i, x in enumerate(losses) if x < chance - 0.1), None))
        if head == "linear":
            anchor, anchor_losses = row, losses
        else:  # first step whose train loss is off the linear run's by > 1e-3 (for `after`: rounding, grown)
            row["off_linear_step"] = next((i + 1 for i, (a, b) in enumerate(zip(losses, anchor_losses))
                                           if abs(a - b) > 1e-3), None)
        row["step_time_vs_linear"] = s_per_step / anchor["s_per_step"]
        print(f"{head:9s} {mode:7s} val loss {row['loss']:.4f}  zero-shot seen {100 * row['zeroshot_top1_seen']:.1f}% "
              f"held-out {100 * row['zeroshot_top1_heldout']:.1f}%  R@1 i2t {100 * row['i2t_R@1']:.1f}% "
              f"t2i {100 * row['t2i_R@1']:.1f}%  {s_per_step:.3f} s/step = {row['step_time_vs_linear']:.2f}x linear "
              f"({wall:.0f} s)", flush=True)
        rows.append(row)
    for row in rows:
        common.append_jsonl(args.jsonl, row)
    write_md(args, index, rows, anchor)
    print(f"wrote {args.md} and appended {len(rows)} lines to {args.jsonl}")
    return 0


def write_md(args, index, rows, anchor):
    pct = lambda v: f"{100 * v:.1f}"
    lines = [f"# Projection heads: {args.preset} preset, {args.steps} steps of {args.batch}",
             "",
             f"`python bench/ablate_heads.py --preset {args.preset} --batch {args.batch} --steps {args.steps} "
             f"--max_lr {args.max_lr} --seed {args.seed}` on `{os.path.basename(args.data)}` "
             f"({index['img_size']} px synthetic shapes, {index['train']['num_samples']} train / "
             f"{index['val']['num_samples']} val, {len(index['classes'])} classes of which {len(index.get('heldout', []))} "
             f"never appear in training captions), {rows[0]['time'][:10]}, {rows[0]['cpus']} CPU cores "
             "(shared with other jobs; s/step is each run's fastest step, the least disturbed by them).",
             "Every run: same seed, data order, schedule (warmup + cosine) and weight decay; only the head differs. "
             "Metrics on the val split after the last step; zero-shot chance is "
             f"{100 / len(index['classes']):.1f}%, R@1 chance {100 / index['val']['num_samples']:.2f}%.",
             ""]
    body = [[r["head"], r["head_mode"], "refused (below)", *[""] * 10] if r["status"] == "refused" else
            [r["head"], r["head_mode"] if r["head"] != "linear" else "-", r["output_dim"], r["polytope_d"] or "-",
             f"{r['trainable_params']:,}", f"{r['loss']:.4f}", pct(r["zeroshot_top1_seen"]),
             pct(r["zeroshot_top1_heldout"]), pct(r["i2t_R@1"]), pct(r["t2i_R@1"]), r["leaves_chance_step"] or "never",
             f"{r['s_per_step']:.3f}", f"{r['step_time_vs_linear']:.2f}x"] for r in rows]
    lines += common.md_table(["head", "mode", "out dim", "d", "trainable params", "val loss", "zero-shot seen %",
                              "zero-shot held-out %", "i2t R@1 %", "t2i R@1 %", "leaves chance at step", "s/step",
                              "vs linear"], body, "ll" + "r" * 11)
    lines += [f"\n{r['head']} x {r['head_mode']} was not run: the config refuses it (`{r['reason']}`)."
              for r in rows if r["status"] == "refused"]
    after = [r for r in rows if r["status"] == "ok" and r["head_mode"] == "after" and r["head"] != "linear"]
    if after and anchor:
        gap = max(abs(r[k] - anchor[k]) for r in after for k in METRICS)
        lines += ["", "## Reading it", "",
                  "- `after` cannot change what CLIP learns: the simplex, orthoplex and cube vertex matrices V (K x d) "
                  "are tight frames, V^T V = (K/d) I, so |Vz| = sqrt(K/d) |z| and cos(Vz, Vw) = cos(z, w). The "
                  "contrastive loss sees only cosines, so an `after` run is the linear run with a K-wide output "
                  "(more memory, no new information) in exact arithmetic. In float32 the extra matmul rounds "
                  "differently; training amplifies that, and the train loss leaves the linear run's (by > 1e-3) at "
                  "step " + ", ".join(f"{r['off_linear_step']} ({r['head']})" for r in after) + ". The `after` rows "
                  f"therefore show this benchmark's noise floor: same model, different rounding, metric gaps up to "
                  f"{gap:.3g} (val loss, or fraction for the accuracies). Differences between heads smaller than that "
                  "are not results.",
                  f"- Every run first sits at the chance loss ln {args.batch} = {math.log(args.batch):.3f} and leaves it "
                  "at some step (the `leaves chance` column); in a run this short, a late escape costs more than any "
                  "head difference, so read a lower score together with that column.",
                  "- `replace` is, by the same identity, the linear head with embed_dim = d (the `d` column): a "
                  "learned width -> d map whose cosines the fixed vertices pass on unchanged. So it changes only the "
                  "width of the shared space (d x width trainable weights per tower instead of embed_dim x width); "
                  "cube, with d = log2(embed_dim), is the one that narrows it a lot."]
    common.write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
