"""
Benchmark one CLIP training step of clip.py against OpenCLIP's, side by side in one process: same sizes, same
batch, same precision, same starting weights. A step is forward + backward + AdamW step + logit-scale clamp:
  ours:     clip.CLIP + clip.clip_loss + AdamW from clip.configure_optimizers
  openclip: open_clip.CLIP built from the matching CLIPVisionCfg/CLIPTextCfg + open_clip.ClipLoss + torch AdamW
            grouped as open_clip_train/main.py does (no decay on gains, biases and the logit scale)
Both sides get the same inputs: uint8 images normalised on the device with clip.normalize_images, random tokens
ending in an eot (the largest id, which both towers pool at).

First the check that makes it apples to apples: our weights go through checkpoint_manager.to_openai_state_dict into
the OpenCLIP model (strict load; GELU or QuickGELU as in our config) and both must give the same image and text
embeddings (atol 1e-4). Then warmup, then --steps timed steps per side, interleaved (A B B A A B ...) so that
other jobs on a shared machine slow both sides alike; samples/s = batch / median step time. Prints the ratio
ours/openclip (target >= 1.15 on CPU fp32), FLOPs per sample (clip.estimate_flops_per_sample), MFU on a GPU
(clip.estimate_mfu) and on CUDA each side's peak memory; appends one JSON line to bench/results/train_step.jsonl.

open_clip_torch is not a dependency of this repo. Install it into the benchmark venv (torchvision, which
open_clip imports, does not import beside the 2.13.0 CPU wheel, so that venv moves to the 2.14.1 pair; both
sides then run on that same torch, in this one process):
    python3 -m venv bench/.venv-anchors
    bench/.venv-anchors/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch -r requirements.txt
    bench/.venv-anchors/bin/python bench/train_step.py --preset tiny
    bench/.venv-anchors/bin/python bench/train_step.py --preset seed      # batch 8, 5 steps on CPU
Without open_clip the script says so and times ours alone.

    python bench/train_step.py [--preset tiny|seed] [--batch B] [--steps N] [--warmup W] [--precision fp32|bf16]
                               [--compile] [--device cpu|cuda] [--profile] [--quiet]
"""

import contextlib
import math
import os
import statistics
import time

import torch
from tqdm import tqdm

import common  # first: the repository root goes ahead of bench/ on sys.path
import checkpoint_manager as cm
import clip

try:
    import open_clip
except ImportError:  # the anchor is optional; ours is timed anyway
    open_clip = None

RATIO_TARGET = 1.15
# (batch, timed steps) per preset and device: seed at batch 8 finishes in a couple of minutes on 2 CPU cores
DEFAULTS = {("tiny", "cpu"): (64, 20), ("seed", "cpu"): (8, 5), ("tiny", "cuda"): (256, 50), ("seed", "cuda"): (128, 30)}
LR, WD, BETAS, EPS = 5e-4, 0.2, (0.9, 0.98), 1e-6


def make_openclip(config):
    """The OpenCLIP model with our sizes; heads are given to the vision tower as head_width = width / heads."""
    vc, tc = config.vision, config.text
    vision = open_clip.CLIPVisionCfg(layers=vc.layers, width=vc.width, head_width=vc.width // vc.heads,
                                     patch_size=vc.patch_size, image_size=vc.img_size)
    text = open_clip.CLIPTextCfg(context_length=tc.context_length, vocab_size=tc.vocab_size, width=tc.width,
                                 heads=tc.heads, layers=tc.layers)
    return open_clip.CLIP(config.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=config.quick_gelu)


def openclip_optimizer(model):
    """AdamW exactly as open_clip_train/main.py groups it."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
                             lr=LR, betas=BETAS, eps=EPS)


def make_batches(config, batch, n, device, seed=0):
    """n batches of (uint8 images (B, 3, S, S), int64 tokens (B, T)): random ids, one eot, zeros after it."""
    g = torch.Generator().manual_seed(seed)
    S, T, V = config.vision.img_size, config.text.context_length, config.text.vocab_size
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, S, S), dtype=torch.uint8, generator=g)
        tokens = torch.randint(1, V - 1, (batch, T), generator=g)  # (B, T) ids below eot = V - 1
        eot = torch.randint(1, T, (batch,), generator=g)  # (B,) where each caption ends
        pos = torch.arange(T)[None, :]  # (1, T)
        tokens = torch.where(pos < eot[:, None], tokens, 0)  # pad after the caption with 0
        tokens[torch.arange(batch), eot] = V - 1
        out.append((images.to(device), tokens.to(device)))
    return out


@torch.no_grad()
def check_equivalence(ours, theirs, batch):
    """Max |difference| of the unnormalised image and text embeddings; raises past atol 1e-4."""
    ours.eval(), theirs.eval()
    images, tokens = batch
    x = clip.normalize_images(images)
    diffs = [(ours.encode_image(x) - theirs.encode_image(x)).abs().max().item(),
             (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max().item()]
    ours.train(), theirs.train()
    if max(diffs) > 1e-4:
        raise RuntimeError(f"ours and OpenCLIP disagree: max |diff| image {diffs[0]:.2e}, text {diffs[1]:.2e}")
    return max(diffs)


def make_step(model, forward_loss, optimizer, device, precision):
    """One closure: forward + loss under autocast, backward, AdamW, clamp exp(logit_scale) <= 100."""
    amp = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    raw = getattr(model, "_orig_mod", model)

    def step(images, tokens):
        x = clip.normalize_images(images)  # uint8 -> float on the device, same for both sides
        with amp:
            loss = forward_loss(model, x, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            raw.logit_scale.clamp_(0, math.log(100))
        return loss
    return step


def resident_bytes(model, optimizer):
    """Bytes of parameters and optimizer state that live between steps (the other side's are not counted)."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    parser = common.parser(__doc__, whole=True)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "seed"])
    parser.add_argument("--batch", type=int, default=None, help="default: 64 tiny / 8 seed on CPU, 256 / 128 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default: 20 tiny / 5 seed on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step per side")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "train_step.jsonl"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    batch, steps = DEFAULTS[(args.preset, args.device)]
    batch, steps = args.batch or batch, args.steps or steps
    if batch < 2 or steps < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2 (a contrastive loss needs negatives), --steps >= 1, --warmup >= 0")
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 matmuls
    log = (lambda *a: None) if args.quiet else print

    config = clip.get_config(args.preset)
    torch.manual_seed(0)
    ours = clip.CLIP(config).to(dev)
    batches = make_batches(config, batch, 4, dev)
    sides = {"ours": (ours, lambda m, x, t: clip.clip_loss(*m(x, t)[:3]), clip.configure_optimizers(ours, WD, LR, BETAS, EPS))}
    max_diff = None
    if open_clip is None:
        print("open_clip is not installed here; timing ours alone. To time the anchor:\n"
              "    bench/.venv-anchors/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch -r requirements.txt\n"
              "    bench/.venv-anchors/bin/python bench/train_step.py --preset " + args.preset)
    else:
        theirs = make_openclip(config).to(dev)
        theirs.load_state_dict(cm.to_openai_state_dict(ours), strict=True)  # the same starting weights
        max_diff = check_equivalence(ours, theirs, batches[0])
        log(f"equivalence: OpenCLIP with our weights gives our embeddings (max |diff| {max_diff:.1e})")
        loss_fn = open_clip.ClipLoss()
        sides["openclip"] = (theirs, lambda m, x, t: loss_fn(*m(x, t)), openclip_optimizer(theirs))

    steps_fn = {}
    for name, (model, fwd, opt) in sides.items():
        model = torch.compile(model) if args.compile else model
        steps_fn[name] = make_step(model, fwd, opt, dev, args.precision)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    names = list(sides)

    for i in tqdm(range(args.warmup), desc="warmup", disable=args.quiet):
        for name in names:
            steps_fn[name](*batches[i % len(batches)])
    sync()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0  # both sides' weights + optimizer states
    times, extra = {n: [] for n in names}, {n: 0 for n in names}
    for i in tqdm(range(steps), desc="timed steps", disable=args.quiet):
        for name in (names if i % 2 == 0 else names[::-1]):  # A B, B A, ...: neither side always goes first
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            steps_fn[name](*batches[i % len(batches)])
            sync()
            times[name].append(time.perf_counter() - t0)
            if dev == "cuda":
                extra[name] = max(extra[name], torch.cuda.max_memory_allocated() - base)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in names:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
            with profile(activities=acts) as prof:
                steps_fn[name](*batches[0])
                sync()
            sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
            print(f"--- profile: {name}, one step ---")
            print(prof.key_averages().table(sort_by=sort, row_limit=20))

    flops = clip.estimate_flops_per_sample(config)
    sps = {n: batch / statistics.median(t) for n, t in times.items()}
    rec = {**common.machine("time", "host", "cpus", "threads"),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "preset": args.preset, "batch": batch, "steps": steps, "warmup": args.warmup, "precision": args.precision,
           "compile": args.compile, "torch": torch.__version__,
           "open_clip": getattr(open_clip, "__version__", None), "params": ours.num_params(),
           "flops_per_sample": flops, "equivalence_max_abs_diff": max_diff,
           **common.machine("load_avg_1m")}
    for n in names:
        rec[f"{n}_samples_per_s"] = round(sps[n], 2)
        rec[f"{n}_step_ms_median"] = round(1000 * statistics.median(times[n]), 1)
        rec[f"{n}_step_ms_min"] = round(1000 * min(times[n]), 1)
        if dev == "cuda":
            model, _, opt = sides[n]
            rec[f"{n}_peak_mib"] = round((resident_bytes(model, opt) + extra[n]) / 2 ** 20)
    rec["ours_mfu"] = clip.estimate_mfu(config, sps["ours"]) if dev == "cuda" else None
    rec["ratio_vs_openclip"] = round(sps["ours"] / sps["openclip"], 3) if "openclip" in sps else None

    print(f"preset {args.preset}, batch {batch}, {args.precision}{', compiled' if args.compile else ''}, {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {steps} steps after {args.warmup}")
    print(f"FLOPs per sample (ours): {flops / 1e9:.2f} GFLOP")
    for n in names:
        line = (f"{n:9s} {sps[n]:9.2f} samples/s  ({rec[f'{n}_step_ms_median']:.1f} ms/step median, "
                f"{flops * sps[n] / 1e12:.3f} TFLOP/s)")
        if dev == "cuda":
            line += f"  peak {rec[f'{n}_peak_mib']} MiB"
        print(line)
    if rec["ours_mfu"] is not None:
        print(f"MFU (ours): {100 * rec['ours_mfu']:.1f}%")
    if rec["ratio_vs_openclip"] is not None:
        r = rec["ratio_vs_openclip"]
        print(f"ours / openclip: {r:.3f}  (target >= {RATIO_TARGET}: {'met' if r >= RATIO_TARGET else 'NOT met'})")

    common.append_jsonl(args.out, rec)
    log(f"appended to {os.path.relpath(args.out, common.ROOT)}")


if __name__ == "__main__":
    main()
