"""
What the text context costs: one training step (forward, backward, AdamW) of the `tiny` preset at the synthetic
set's sizes (32 px, vocab 438, batch 128) with the preset's 32-token context and with the 16 that train.py now takes
from the data (index.json caption_tokens). Captions are random ids of the synthetic set's lengths (5-15 tokens with
start and end), so both contexts see the same text; only the padding differs.

    python bench/context_length.py            # 2 torch threads (the README main command's)

Prints the median step time of each (after 2 warm-up steps) and their ratio; appends one JSON line to
bench/results/context_length.jsonl.
"""

import os
import statistics
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import clip


def step_ms(ctx, steps, batch, seed=0):
    torch.manual_seed(seed)
    model = clip.CLIP(clip.get_config("tiny", vocab_size=438, img_size=32, context_length=ctx))
    opt = clip.configure_optimizers(model, 0.2, 1e-3)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    lengths = torch.randint(5, 16, (batch,), generator=g)  # with start and end token, as the synthetic captions
    tokens = torch.zeros(batch, ctx, dtype=torch.int64)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, :n] = torch.randint(1, 436, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = 436, 437  # start, end (the highest id: the text tower pools there)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        out = model(images, tokens)
        clip.clip_loss(out.image, out.text, out.logit_scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def main():
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    common.add_threads(p, default=2)
    args = p.parse_args()
    common.set_threads(args.threads)
    ms = {ctx: step_ms(ctx, args.steps, args.batch) for ctx in (32, 16)}
    rec = {**common.machine("time", "host"), "threads": args.threads, "batch": args.batch, "steps": args.steps,
           "ms_ctx32": round(ms[32], 1), "ms_ctx16": round(ms[16], 1), "ratio": round(ms[16] / ms[32], 3),
           **common.machine("load")}
    print(f"tiny step, batch {args.batch}, {args.threads} threads: context 32 {ms[32]:.0f} ms, context 16 "
          f"{ms[16]:.0f} ms (x{ms[16] / ms[32]:.2f})")
    common.append_jsonl(os.path.join(common.RESULTS, "context_length.jsonl"), rec)


if __name__ == "__main__":
    main()
