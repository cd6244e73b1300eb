"""Long-CLIP fine-tuning recipe on the synthetic set: does `train.py --long --init BASE` help long-caption
retrieval, and what does it cost on short captions?

1. base: a short-context model trained from scratch on the .txt captions (the "77-token" model; the micro/tiny
   presets have context 32, so it is stretched to 20 + 4 * 12 = 68 positions).
2. control: the base fine-tuned for the same steps on the .txt captions again (no --long): separates "more
   training" from "long captions".
3. long: the base fine-tuned with --long (stretched positions, long captions + the short-caption PCA loss).
All three are evaluated on val retrieval (R@1) against the json "long" captions (cut to each model's own
context: the base and control see only the first 32 tokens) and against the .txt short captions.
The anchor is the base model measured in this run; the ratio printed is long / base on long-caption R@1.

    python bench/longclip.py                       # ~10 min on 2 CPU cores; outputs under /tmp
    python bench/longclip.py --base_epochs 0.1 --ft_epochs 0.05 --quiet   # a smoke run
"""
import json
import os
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import checkpoint_manager as cm
import eval_zeroshot
from dataloader import ShardLoader
from tokenizer import Tokenizer


def token_lengths(data, tokenizer, split="val"):
    """(N,) tokens per long caption, sot and eot included (tokenized at a context no caption reaches)."""
    loader = ShardLoader(data, split, 500, tokenizer, 1024, long_captions=True, shuffle=False)
    lengths = torch.cat([(b["text"] != 0).sum(1) for b in loader])  # 0 is padding
    loader.close()
    return lengths


def retrieval(model, tokenizer, data, long_captions, batch=250):
    """Val R@1 both ways, captions tokenized at the model's own context (longer ones are cut, eot kept)."""
    loader = ShardLoader(data, "val", batch, tokenizer, model.config.text.context_length,
                         long_captions=long_captions, shuffle=False)
    emb = eval_zeroshot.encode_split(model, loader, "cpu")
    loader.close()
    r = eval_zeroshot.evaluate_retrieval(emb["image"], emb["text"])
    return {"i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"]}


def run_train(name, args, extra):
    flags = ["--data", args.data, "--preset", args.preset, "--batch", str(args.batch), "--workers", str(args.workers),
             "--eval_every", "0", "--ckpt_every", "100000", "--eval_batches", "1", "--seed", str(args.seed),
             "--out", os.path.join(args.out, "ckpt"), "--log_dir", os.path.join(args.out, "logs"),
             "--run_name", name, "--overwrite"] + (["--quiet"] if args.quiet else []) + extra  # (a re-run starts over)
    t0 = time.time()
    common.run_train(flags, quiet=False)
    print(f"{name}: trained in {time.time() - t0:.0f}s")
    return os.path.join(args.out, "ckpt", name, "ckpt", "latest.pt")


def table(rows, lengths, base_ctx, long_ctx):
    over = lambda n: (lengths > n).double().mean().item()
    q = lambda p: int(torch.quantile(lengths.double(), p).item())
    lines = [f"Long captions of the val split, tokens with sot/eot: min {int(lengths.min())}, median {q(0.5)}, "
             f"90th percentile {q(0.9)}, max {int(lengths.max())}. Longer than the base context ({base_ctx}): "
             f"{over(base_ctx):.1%}; longer than the stretched context ({long_ctx}): {over(long_ctx):.1%}; "
             f"longer than 77: {over(77):.1%}.", ""]
    body = [[name, ctx, *(f"{r[c][k]:.3f}" for c in ("long", "short") for k in ("i2t_R@1", "t2i_R@1"))]
            for name, ctx, r in rows]
    return "\n".join(lines + common.md_table(["model", "context", "long i2t R@1", "long t2i R@1", "short i2t R@1",
                                                "short t2i R@1"], body))


def main(argv=None):
    p = common.parser(__doc__, whole=True)
    p.add_argument("--data", default=os.path.join(common.ROOT, "data", "syn32"), help="synthetic shards (read only)")
    p.add_argument("--out", default="/tmp/bench_longclip", help="checkpoints and logs go here")
    p.add_argument("--preset", default="micro", choices=["micro", "tiny"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--base_epochs", type=float, default=0.5)
    p.add_argument("--ft_epochs", type=float, default=0.2, help="each fine-tune (control and --long)")
    p.add_argument("--base_lr", type=float, default=3e-3)
    p.add_argument("--ft_lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_control", action="store_true", help="skip the short-caption fine-tune")
    p.add_argument("--no_write", action="store_true", help="print only; do not write bench/results")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "index.json")):
        p.error(f"--data {args.data} has no index.json (make one with prep_dataset.py synthetic)")
    t_start = time.time()
    torch.manual_seed(args.seed)

    # the preset's full context (32), not train.py's default fitted to the short captions: --long stretches it
    base_path = run_train("base", args, ["--epochs", str(args.base_epochs), "--max_lr", str(args.base_lr),
                                         "--context_length", "32"])
    ft = ["--epochs", str(args.ft_epochs), "--max_lr", str(args.ft_lr), "--init", base_path]
    paths = [("base", base_path)]
    if not args.no_control:
        paths.append(("control (short ft)", run_train("control", args, ft)))
    paths.append(("long (--long ft)", run_train("long", args, ft + ["--long"])))

    rows = []
    for name, path in paths:
        model, ckpt = cm.load_model(path)
        tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        r = {"long": retrieval(model, tokenizer, args.data, True), "short": retrieval(model, tokenizer, args.data, False)}
        rows.append((name, model.config.text.context_length, r))
        print(f"{name}: ctx {model.config.text.context_length}, {json.dumps(r)}")
    base_ctx, long_ctx = rows[0][1], rows[-1][1]
    lengths = token_lengths(args.data, tokenizer)
    md = table(rows, lengths, base_ctx, long_ctx)
    base_r1, long_r1 = rows[0][2]["long"]["i2t_R@1"], rows[-1][2]["long"]["i2t_R@1"]
    ratio = long_r1 / base_r1 if base_r1 else float("inf")
    wall = time.time() - t_start
    print("\n" + md)
    print(f"\nlong-caption i2t R@1: --long {long_r1:.3f} vs base {base_r1:.3f} (anchor): ratio {ratio:.2f}x "
          f"[{wall:.0f}s total]")

    record = {"bench": "longclip", **common.machine("time", "host", "torch", "threads"),
              "data": os.path.basename(args.data),
              "preset": args.preset, "batch": args.batch, "base_epochs": args.base_epochs, "ft_epochs": args.ft_epochs,
              "base_lr": args.base_lr, "ft_lr": args.ft_lr, "base_ctx": base_ctx, "long_ctx": long_ctx,
              "long_tokens": {"min": int(lengths.min()), "median": float(lengths.double().median()),
                              "max": int(lengths.max()), "frac_over_base_ctx": (lengths > base_ctx).double().mean().item(),
                              "frac_over_77": (lengths > 77).double().mean().item()},
              "models": {name: r for name, _, r in rows}, "ratio_long_i2t_R@1": ratio, "wall_s": wall}
    if not args.no_write:
        common.append_jsonl(os.path.join(common.RESULTS, "longclip.jsonl"), record)
        header = (f"# Long-CLIP fine-tuning on {os.path.basename(args.data)} ({args.preset} preset)\n\n"
                  f"`{common.command(argv)}` — {record['time']}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, "
                  f"{wall:.0f}s. Base: {args.base_epochs} epoch at lr {args.base_lr}; each fine-tune: "
                  f"{args.ft_epochs} epoch at lr {args.ft_lr}, batch {args.batch}. Val split, R@1.\n\n")
        common.write_text(os.path.join(common.RESULTS, "longclip.md"),
                          header + md + f"\n\nRatio --long / base on long-caption i2t R@1: {ratio:.2f}x\n")


if __name__ == "__main__":
    main()
