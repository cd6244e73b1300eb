"""
Train CLIP. One code path for a laptop CPU, one GPU, and many GPUs under torchrun.

    python train.py                                   # built-in synthetic set, tiny preset, a few minutes on a CPU
    python train.py --data data/t2i --preset seed --batch 1024 --max_lr 3e-4 --precision bf16 --compile
    torchrun --standalone --nproc_per_node=8 train.py --data data/t2i --preset seed --batch 128

--batch is per process and per micro-batch: the effective batch is batch x accum x processes, and every sample
is contrasted against all of it (features are gathered across ranks and cached across micro-batches).

Left out on purpose: FSDP/tensor parallelism (CLIP at these sizes fits one GPU per replica), gradient scaling
(bf16 needs none), EMA weights, and wandb (metrics.jsonl + PNGs in logs/<run>/ instead).
"""

import argparse
import json
import contextlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint_manager as cm
import clip
from dataloader import ShardLoader
from logger import Logger
from tokenizer import Tokenizer

DEFAULT_DATA = os.path.join("data", "synthetic")
# --hard_negatives -> the per-sample json lists read (prep_dataset.py writes "negatives" at prep time or with
# add-swaps, "mined" with add-negatives)
NEGATIVE_KEYS = {"none": (), "swaps": ("negatives",), "mined": ("mined",), "both": ("negatives", "mined")}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--data", default=None, help=f"shard dir from prep_dataset.py (default: the built-in {DEFAULT_DATA}, made on first use)")
    a("--preset", default="tiny", help=f"model size: {', '.join(clip.PRESETS)}")
    a("--batch", type=int, default=128, help="micro-batch per process")
    a("--accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--epochs", type=float, default=3.0, help="passes over the training split (fractions allowed)")
    a("--max_lr", type=float, default=2e-3)
    a("--min_lr_frac", type=float, default=0.1, help="cosine decays to this fraction of max_lr")
    a("--warmup_frac", type=float, default=0.02, help="fraction of steps with linear warmup")
    a("--wd", type=float, default=0.2, help="AdamW weight decay (matrices only)")
    a("--beta2", type=float, default=0.98)
    a("--grad_clip", type=float, default=1.0, help="max grad norm (0: no clipping)")
    a("--label_smoothing", type=float, default=None, help="default 0, or 0.1 with --long (as Long-CLIP)")
    a("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (GPU only; CPU stays fp32)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=2, help="loader worker processes per rank")
    a("--augment", action="store_true", help="random-resized-crop on training images")
    # not --run / --logs: torchrun reads those as ambiguous abbreviations of its own --run-path / --logs-specs
    a("--run_name", default=None, help="run name (default: <preset>-<data dir name>)")
    a("--out", default="out", help="checkpoints go to <out>/<run_name>/ckpt")
    a("--log_dir", default="logs", help="metrics go to <log_dir>/<run_name>/")
    a("--eval_every", type=int, default=200, help="validation + zero-shot every N steps (0: only at the end)")
    a("--eval_batches", type=int, default=0, help="cap the val loss to N batches (0: the whole split)")
    a("--ckpt_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=3, help="step checkpoints to keep (plus latest and best)")
    a("--resume", default=None, help="'latest' or a checkpoint path: continue that run exactly")
    a("--stop_at", type=int, default=None, help="end cleanly after this step, schedule unchanged")
    a("--init", default=None, help="start from these weights (ours or an original CLIP state dict)")
    a("--ignore_keys", nargs="*", default=[], help="regexes of --init keys not to load")
    # model variants
    a("--context_length", type=int, default=None, help="text context (default: the preset's)")
    a("--pool", choices=clip.POOLS, default="eot", help="text pooling")
    a("--pool_layers", type=int, default=1, help="average the pooled token over the last N layers")
    a("--head", choices=clip.HEADS, default="linear", help="projection, or a fixed polytope head (simplex.py)")
    a("--head_mode", choices=clip.HEAD_MODES, default="replace")
    a("--quick_gelu", action="store_true", help="QuickGELU (what OpenAI's weights need)")
    # distillation (teacher embeddings stored in the shards by `prep_dataset.py add-teacher`, or --teacher online)
    a("--distill", choices=("none", "kd", "mse", "icl"), default="none")
    a("--distill_weight", type=float, default=0.5, help="total = (1 - w) * clip + w * distill")
    a("--teacher", default=None, help="teacher checkpoint run online when the shards hold no teacher embeddings")
    a("--teacher_scale", type=float, default=100.0, help="kd: the teacher's fixed logit scale")
    # Long-CLIP
    a("--long", action="store_true", help="long captions + short-caption PCA loss; with --init, stretch positions")
    a("--long_pca", type=int, default=32, help="principal components of the coarse image feature")
    # hard negatives (NegCLIP swaps / mined captions stored in the shards' json by prep_dataset.py)
    a("--hard_negatives", choices=tuple(NEGATIVE_KEYS), default="none",
      help="extra captions each image must score below its own: swaps (json 'negatives'), mined ('mined'), both")
    # fine-tuning
    a("--lock_image", action="store_true", help="freeze the image tower (LiT)")
    a("--lock_text", action="store_true", help="freeze the text tower")
    a("--unlocked_layers", type=int, default=0, help="with --lock_*: the last N blocks stay trainable")
    a("--adapters", type=int, default=0, help="bottleneck adapters with this reduction (e.g. 8); all else frozen")
    a("--adapter_towers", nargs="+", choices=("visual", "text"), default=["visual", "text"])
    a("--train_heads", action="store_true", help="with --adapters: projections and logit scale train too")
    a("--quiet", action="store_true", help="no progress bars, fewer lines")
    return p


def validate(parser, args):
    """User mistakes -> one clear line and exit 2 (argparse's parser.error)."""
    if args.preset not in clip.PRESETS:
        parser.error(f"unknown --preset {args.preset!r}; choose from {', '.join(clip.PRESETS)}")
    for name in ("batch", "accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_lr <= 0 or args.epochs <= 0:
        parser.error(f"--max_lr and --epochs must be > 0, got {args.max_lr} and {args.epochs}")
    if not 0 <= args.min_lr_frac <= 1 or not 0 <= args.warmup_frac < 1:
        parser.error("--min_lr_frac must be in [0, 1] and --warmup_frac in [0, 1)")
    if args.wd < 0 or args.grad_clip < 0 or args.workers < 0 or args.eval_every < 0 or args.ckpt_every < 1:
        parser.error("--wd, --grad_clip, --workers, --eval_every must be >= 0 and --ckpt_every >= 1")
    if args.data is not None and not os.path.isfile(os.path.join(args.data, "index.json")):
        what = "does not exist" if not os.path.exists(args.data) else "has no index.json (make it with prep_dataset.py)"
        parser.error(f"--data {args.data} {what}")
    if args.init is not None and not os.path.isfile(args.init):
        parser.error(f"--init {args.init} does not exist")
    if args.teacher is not None and not os.path.isfile(args.teacher):
        parser.error(f"--teacher {args.teacher} does not exist")
    if not 0 <= args.distill_weight <= 1:
        parser.error(f"--distill_weight must be in [0, 1], got {args.distill_weight}")
    if args.train_heads and not args.adapters:
        parser.error("--train_heads only applies with --adapters")
    if args.unlocked_layers and not (args.lock_image or args.lock_text):
        parser.error("--unlocked_layers only applies with --lock_image or --lock_text")
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.adapters < 0 or args.unlocked_layers < 0 or args.long_pca < 1:
        parser.error("--adapters and --unlocked_layers must be >= 0, --long_pca >= 1")
    if args.hard_negatives != "none" and (args.long or args.label_smoothing):
        parser.error("--hard_negatives does not combine with --long or --label_smoothing")


def lr_at(step, total, max_lr, warmup_frac, min_lr_frac):
    """Linear warmup for warmup_frac of the steps, then cosine from max_lr down to min_lr_frac * max_lr."""
    warmup = int(warmup_frac * total)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
    min_lr = min_lr_frac * max_lr
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# the loss across ranks and micro-batches


class GatherWithGrad(torch.autograd.Function):
    """(b, E) on every rank -> (world * b, E) in rank order. Backward: every rank's loss used every rank's rows,
    so the gradient of row block r is the sum over ranks (all_reduce) of that block (works on gloo and nccl)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * b, E)

    @staticmethod
    def backward(ctx, grad):  # grad: (world * b, E)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]  # (b, E) this rank's rows


def gather(x):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


def make_loss(args, model, teacher=None):
    """loss_fn(outs, batch) -> (total, terms). outs = the model's CLIPOutput in fp32 for the step's whole batch on
    this rank. Extra terms are computed on the gathered global batch on every rank (identical values; DDP's
    gradient average then gives exactly the global loss's gradient)."""
    smoothing = args.label_smoothing if args.label_smoothing is not None else 0.1 if args.long else 0.0

    def loss_fn(outs, batch):
        img, txt, scale = outs.image, outs.text, outs.logit_scale  # (b, E), (b, E), ()
        all_img, all_txt = gather(img), gather(txt)  # (N, E): every rank's rows, gathered once per step
        rank = dist.get_rank() if dist.is_initialized() else 0
        # this rank's rows against the global batch, as if one big batch
        if args.hard_negatives != "none":  # images also against every negative caption of the global batch
            all_neg = gather(outs.text_neg)  # (N, K, E); empty slots are zero vectors
            loss = clip.negclip_loss(img, txt, all_neg, all_neg.abs().sum(-1) > 0, scale, all_img=all_img,
                                     all_txt=all_txt, offset=rank * img.shape[0])
        else:
            loss = clip.clip_loss(img, txt, scale, smoothing, all_img=all_img, all_txt=all_txt, offset=rank * img.shape[0])
        terms = {}
        if args.long:  # fine: long caption vs image; coarse: short caption vs the image's top principal components
            short = gather(outs.text_short)  # (N, E)
            coarse = F.normalize(clip.pca_reconstruct(all_img, args.long_pca), dim=-1)  # (N, E)
            terms["loss_long"], terms["loss_short"] = loss, clip.clip_loss(coarse, short, scale, smoothing)
            loss = loss + terms["loss_short"]
        if args.distill != "none":
            t_img, t_txt = teacher_features(batch, teacher, img.device)  # (b, Et) each, normalised
            t_img, t_txt = gather(t_img), gather(t_txt)  # (N, Et)
            if hasattr(model, "distill_proj"):  # student -> teacher space when the sizes differ
                all_img = F.normalize(model.distill_proj(all_img), dim=-1)
                all_txt = F.normalize(model.distill_proj(all_txt), dim=-1)
            if args.distill == "kd":
                d = clip.kd_loss(all_img, all_txt, scale, t_img, t_txt, args.teacher_scale)
            elif args.distill == "mse":
                d = clip.mse_loss(all_img, all_txt, t_img, t_txt)
            else:
                d = clip.icl_loss(all_img, all_txt, scale, t_img, t_txt)
            terms["loss_clip"], terms["loss_distill"] = loss, d
            loss = (1 - args.distill_weight) * loss + args.distill_weight * d
        return loss, terms
    return loss_fn


def as_float(outs):
    """A CLIPOutput with every tensor in fp32 (the loss is computed in fp32 under bf16 autocast)."""
    return outs._replace(**{k: v.float() for k, v in outs._asdict().items() if v is not None})


def teacher_features(batch, teacher, device):
    """Stored embeddings from the shards, else the online teacher (no gradient, never in the optimizer)."""
    if "teacher_image" in batch:
        return batch["teacher_image"].to(device).float(), batch["teacher_text"].to(device).float()
    return teacher(batch)


def forward_backward(model, inputs, accum, autocast, loss_fn, batch=None):
    """One optimizer step's gradients; returns (loss, terms). inputs: the model's batched inputs (images, tokens
    [, short tokens]). With accum > 1 (GradCache, Gao et al. 2021): 1) embed every micro-batch without
    gradients, 2) compute the whole batch's loss on those cached embeddings and its gradient w.r.t. them,
    3) re-embed each micro-batch with gradients and backpropagate the cached gradients. Exactly the big batch's
    gradient, at the activation memory of one micro-batch, for one extra forward pass."""
    if accum == 1:
        with autocast:
            outs = model(*inputs)  # CLIPOutput: image (B, E), text (B, E), logit_scale () ...
        loss, terms = loss_fn(as_float(outs), batch)
        loss.backward()
        return loss.detach(), terms
    chunks = list(zip(*(x.chunk(accum) if x is not None else [None] * accum for x in inputs)))
    with torch.no_grad(), autocast:
        cached = [model(*c) for c in chunks]
    # the cached outputs as leaves: per-sample embeddings (B, E) concatenated, scalars (scale, bias) taken once
    fields = [k for k, v in cached[0]._asdict().items() if v is not None]
    scalar = {k for k in fields if cached[0]._asdict()[k].dim() == 0}
    leaves = cached[0]._replace(**{k: (getattr(cached[0], k) if k in scalar else torch.cat([getattr(c, k) for c in cached]))
                                   .float().requires_grad_() for k in fields})
    loss, terms = loss_fn(leaves, batch)
    loss.backward()  # gradients w.r.t. the cached outputs only; the model is untouched so far
    sizes = [c[0].shape[0] for c in chunks]
    grads = {k: getattr(leaves, k).grad.split(sizes) for k in fields if k not in scalar}
    for i, c in enumerate(chunks):
        last = i == accum - 1  # DDP: all-reduce gradients once, on the last micro-batch
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                outs = model(*c)
            # d(loss)/d(theta) = sum over cached outputs of their gradient times d(output)/d(theta)
            surrogate = sum((getattr(outs, k).float() * g[i]).sum() for k, g in grads.items())
            # the scalars (scale, bias): their gradient once, spread over the micro-batches
            surrogate = surrogate + sum(getattr(outs, k) * getattr(leaves, k).grad / accum for k in scalar)
            surrogate.backward()
    return loss.detach(), terms


# -----------------------------------------------------------------------------
# evaluation during training


@torch.no_grad()
def val_loss(model, loader, device, autocast, max_batches):
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with autocast:
            outs = model(clip.normalize_images(batch["image"].to(device)), batch["text"].to(device))
        img, txt = outs.image.float(), outs.text.float()
        total += clip.clip_loss(img, txt, outs.logit_scale).item() * img.shape[0]
        n += img.shape[0]
    loader.load_state_dict({"epoch": 0, "batch": 0, "seed": loader.seed})  # a break leaves it mid-epoch
    model.train()
    return total / max(1, n)


def zero_shot(model, tokenizer, data_dir, device, precision):
    """Zero-shot and retrieval metrics from eval_zeroshot.py on the val split; {} if the data has no classes."""
    import eval_zeroshot
    model.eval()
    try:
        return eval_zeroshot.evaluate_checkpoint(model, tokenizer, data_dir, split="val", device=device,
                                                 precision=precision, quiet=True)
    finally:
        model.train()


# -----------------------------------------------------------------------------
# main


def ensure_synthetic(path, quiet, master):
    """The built-in dataset: made on first use (about a minute on 2 cores)."""
    if master and not os.path.isfile(os.path.join(path, "index.json")):
        print(f"no --data given and {path} does not exist yet: creating the built-in synthetic dataset there")
        import prep_dataset
        prep_dataset.main(["synthetic", "--out", path] + (["--quiet"] if quiet else []))
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    validate(parser, args)

    # one code path for CPU, one GPU and torchrun: RANK/WORLD_SIZE come from torchrun when it launches us
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts it)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs for whatever runs in fp32 on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.precision == "bf16" and device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    quiet = args.quiet or not master

    data = args.data or DEFAULT_DATA
    if args.data is None:
        ensure_synthetic(data, args.quiet, master)
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    tokenizer = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    run = args.run_name or f"{args.preset}-{os.path.basename(os.path.normpath(data))}"
    out_dir, log_dir = os.path.join(args.out, run), os.path.join(args.log_dir, run)

    # hard negatives: every training sample's json must carry the lists (checked now, not mid-run)
    num_negatives = 0
    if args.hard_negatives != "none":
        try:
            num_negatives = stored_negatives(data, index, NEGATIVE_KEYS[args.hard_negatives])
        except ValueError as e:
            parser.error(str(e))

    # the teacher: stored in the shards (checked for every sample now, not mid-run), or run online
    teacher, teacher_dim = None, 0
    if args.distill != "none":
        try:
            teacher_dim = stored_teacher_dim(data, index)
        except ValueError as e:
            if args.teacher is None:
                parser.error(str(e))
            teacher = OnlineTeacher(args.teacher, tokenizer, device)
            teacher_dim = teacher.dim
    try:
        config, tokenizer, init_sd = build_config(args, index, tokenizer, teacher_dim)
    except ValueError as e:
        parser.error(str(e))
    ckpt = None
    if args.resume:
        try:
            ckpt = cm.load(cm.resolve(args.resume, out_dir), map_location="cpu")
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        if ckpt["config"] != config.to_dict():
            diff = diff_configs(ckpt["config"], config.to_dict())
            parser.error(f"--resume: the checkpoint's model differs from these flags: {diff}")

    # data: each rank reads disjoint samples; the loader yields the whole step's batch (accum micro-batches)
    step_batch = args.batch * args.accum
    train_split = index["train"]["num_samples"]
    if step_batch * world > train_split:
        parser.error(f"--batch {args.batch} x --accum {args.accum} x {world} processes = {step_batch * world} "
                     f"is larger than the {train_split} training samples")
    loader = ShardLoader(data, "train", step_batch, tokenizer, config.text.context_length, seed=args.seed,
                         rank=rank, world_size=world, num_workers=args.workers, augment=args.augment,
                         long_captions=args.long, pin_memory=device.startswith("cuda"),
                         negatives=NEGATIVE_KEYS[args.hard_negatives], num_negatives=num_negatives)
    val_loader = ShardLoader(data, "val", min(args.batch, index["val"]["num_samples"]), tokenizer,
                             config.text.context_length, num_workers=0, long_captions=args.long) if master and index.get("val", {}).get("num_samples") else None
    total_steps = max(1, math.ceil(args.epochs * len(loader)))

    try:
        model = build_model(args, config, init_sd if ckpt is None else None, quiet).to(device)
    except ValueError as e:
        parser.error(str(e))
    optimizer = clip.configure_optimizers(model, args.wd, args.max_lr, betas=(0.9, args.beta2))
    step, best_val = 0, None
    if ckpt is not None:
        model.load_state_dict(cm.strip_prefixes(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        cm.set_rng_state(ckpt["rng"])
        step, best_val = ckpt["step"], ckpt.get("best_val_loss")
        if master:
            print(f"resumed from step {step} of {total_steps}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        if hasattr(raw_model, "distill_proj"):  # used outside forward (in the loss): its gradient is averaged by hand
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                raw_model, ["distill_proj.weight"])
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    loss_fn = make_loss(args, raw_model, teacher)

    manager = cm.CheckpointManager(out_dir, keep=args.keep) if master else None
    logger = Logger(log_dir, config={"args": vars(args), "model": config.to_dict(), "world_size": world},
                    resume_step=step if ckpt is not None else None, total_steps=total_steps,
                    print_every=1 if total_steps < 50 else 10, quiet=args.quiet, enabled=master)
    if master and not args.quiet:
        print(f"{config.vision.img_size}px images, {raw_model.num_params() / 1e6:.2f}M parameters "
              f"({raw_model.num_params(trainable_only=True) / 1e6:.2f}M trainable), "
              f"{total_steps} steps of {step_batch * world} samples on {world} x {device}")

    def save(val=None):
        nonlocal best_val
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
                 "args": vars(args), "step": step, "epoch": loader.epoch, "loader": loader.state_dict(),
                 "rng": cm.rng_state(), "best_val_loss": best_val, "tokenizer": tokenizer.to_dict()}
        path = manager.save(state, step, val_loss=val)  # best.pt when val beats the best so far
        if args.adapters:  # the adapters alone, small enough to share
            cm.save_adapters(raw_model, os.path.join(out_dir, "adapters.pt"))
        best_val = manager.best_val_loss
        return path

    def evaluate():
        v = val_loss(raw_model, val_loader, device, autocast, args.eval_batches)
        metrics = {"loss": v}
        if "classes" in index:
            results = zero_shot(raw_model, tokenizer, data, device, args.precision)
            metrics.update({k: x for k, x in results.items() if isinstance(x, (int, float))})
        logger.log(step, "val", **metrics)
        return v, metrics

    batches = iter_forever(loader)
    stop = min(total_steps, args.stop_at or total_steps)
    bar = tqdm(total=stop, initial=step, disable=quiet, desc="train", dynamic_ncols=True)
    t_start, metrics = time.time(), {}
    model.train()
    while step < stop:
        t0 = time.time()
        lr = lr_at(step, total_steps, args.max_lr, args.warmup_frac, args.min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        images = clip.normalize_images(batch["image"].to(device, non_blocking=True))  # uint8 -> float on the device
        inputs = (images, batch["text"].to(device, non_blocking=True))
        if args.long:
            inputs += (batch["text_short"].to(device, non_blocking=True),)
        if args.hard_negatives != "none":  # (images, tokens, no short tokens, negative tokens (B, K, ctx))
            inputs += (None, batch["text_neg"].to(device, non_blocking=True))
        loss, terms = forward_backward(model, inputs, args.accum, autocast, loss_fn, batch)
        if ddp:  # log the global batch's loss: the mean of the ranks' means
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            if hasattr(raw_model, "distill_proj"):
                dist.all_reduce(raw_model.distill_proj.weight.grad, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss):
            last = (manager.step_files() or [None])[-1] if manager else None
            msg = f"error: loss is {loss.item()} at step {step + 1}; stopping. Last good checkpoint: {last or 'none'}"
            print(msg, file=sys.stderr)
            cleanup(loader, logger, bar, ddp)
            return 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.clamp_logit_scale()
        step += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        sps = step_batch * world / dt
        record = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": lr, "grad_norm": grad_norm.item(),
                  "logit_scale": raw_model.logit_scale.exp().item(), "samples_per_s": sps,
                  "elapsed_s": time.time() - t_start}
        mfu = clip.estimate_mfu(config, sps / world) if device.startswith("cuda") else None
        if mfu is not None:
            record["mfu"] = mfu
        logger.log(step, "train", **record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        last_step = step == stop
        if master and val_loader is not None and ((args.eval_every and step % args.eval_every == 0) or last_step):
            v, metrics = evaluate()
            if not last_step:  # the end of the run plots once below
                logger.plot()
        if master and (step % args.ckpt_every == 0 or last_step):
            save(metrics.get("loss") if (args.eval_every and step % args.eval_every == 0) or last_step else None)
        if ddp:
            dist.barrier()  # the others wait while rank 0 evaluates and saves
    bar.close()
    if master:
        logger.plot()
        summary(metrics, index, log_dir)
    cleanup(loader, logger, None, ddp)
    return 0


def iter_forever(loader):
    while True:  # each pass is one epoch, resumed mid-epoch after load_state_dict
        yield from loader


def cleanup(loader, logger, bar, ddp):
    loader.close()
    logger.close()
    if bar is not None:
        bar.close()
    if ddp:
        dist.destroy_process_group()


def diff_configs(a, b, prefix=""):
    """Fields that differ between two config dicts, as 'name: saved -> flags'."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out.append(diff_configs(a[k], b[k], f"{prefix}{k}."))
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return ", ".join(x for x in out if x)


def read_init(path, quick_gelu):
    """--init file -> (state dict, config dict, tokenizer dict or None): our checkpoint, or an original CLIP /
    OpenCLIP ViT state dict (converted by clip.py)."""
    sd = cm.load(path)
    if "model" in sd and "config" in sd:
        return cm.strip_prefixes(sd["model"]), sd["config"], sd.get("tokenizer")
    sd = cm.strip_prefixes(sd.get("state_dict", sd))
    model = clip.CLIP.from_openai_state_dict(sd, quick_gelu=quick_gelu)
    return model.state_dict(), model.config.to_dict(), None


def build_config(args, index, tokenizer, teacher_dim):
    """The run's model config (and tokenizer): the preset sized to the data, or --init's architecture with the
    pooling/adapter flags on top; --long with --init stretches the text positions (Long-CLIP)."""
    init_sd = None
    if args.init:
        init_sd, cfg, tok = read_init(args.init, args.quick_gelu)
        if tok is not None:  # the model's token embeddings go with its own tokenizer
            tokenizer = Tokenizer.from_dict(tok)
        if cfg["vision"]["img_size"] != index["img_size"]:
            raise ValueError(f"--init model takes {cfg['vision']['img_size']} px images but the data has {index['img_size']} px")
        cfg["text"].update(pool=args.pool, pool_layers=args.pool_layers)
        if args.head != "linear" and (cfg["head"], cfg["head_mode"]) != (args.head, args.head_mode):
            raise ValueError(f"--head {args.head}/{args.head_mode}: the --init model has {cfg['head']}/{cfg['head_mode']}")
        config = clip.CLIPConfig.from_dict(cfg)
    else:
        config = clip.get_config(args.preset, vocab_size=tokenizer.vocab_size, img_size=index["img_size"],
                                 context_length=args.context_length, pool=args.pool, pool_layers=args.pool_layers,
                                 head=args.head, head_mode=args.head_mode, quick_gelu=args.quick_gelu)
    config.adapters, config.adapter_towers, config.teacher_dim = args.adapters, tuple(args.adapter_towers), teacher_dim
    if args.long and not args.init:
        print(f"note: --long without --init trains at context {config.text.context_length} from scratch "
              f"(no stretching); longer captions are truncated")
    if args.long and args.init and config.text.freeze_positions == 0:
        n = config.text.context_length
        config.text.context_length, config.text.freeze_positions = 20 + 4 * (n - 20), 20
    return clip.CLIPConfig.from_dict(config.to_dict()), tokenizer, init_sd  # re-validated


def build_model(args, config, init_sd, quiet):
    """The model, initialised from --init (stretched for --long), with the fine-tuning freezes applied."""
    model = clip.CLIP(config)
    if init_sd is not None:
        if config.text.freeze_positions and "text.pos_fixed" not in init_sd:  # --long: stretch 77 -> 248 style
            cfg = clip.CLIPConfig.from_dict(config.to_dict())
            cfg.text.context_length = init_sd["text.pos_embed"].shape[0]
            cfg.text.freeze_positions = 0
            base = clip.CLIP(cfg)
            cm.load_partial(base, init_sd, args.ignore_keys, quiet=quiet)
            model = clip.stretch_text_model(base)
        else:
            cm.load_partial(model, init_sd, args.ignore_keys, quiet=quiet)
    if args.lock_image:
        model.lock("visual", args.unlocked_layers)
    if args.lock_text:
        model.lock("text", args.unlocked_layers)
    if args.adapters:  # only the adapters train (plus the heads with --train_heads)
        for name, p in model.named_parameters():
            head = name.startswith(("visual.proj", "text.proj", "logit_scale", "distill_proj"))
            p.requires_grad_("adapter_" in name or (head and args.train_heads) or name.startswith("distill_proj"))
    return model


def stored_teacher_dim(data, index):
    """Teacher embedding size when every training sample carries both teacher fields; else one clear error
    naming the first shard that lacks them (checked before training, not discovered mid-run)."""
    import io
    import numpy as np
    from dataloader import map_file, scan_tar
    want, dim = {"teacher_image.npy", "teacher_text.npy"}, None
    for name in index["train"]["shards"]:
        buf = map_file(os.path.join(data, name))
        groups, _ = scan_tar(buf)
        have = [want <= exts.keys() for exts in groups.values()]
        if not all(have):
            raise ValueError(f"--distill: {sum(not h for h in have)} of {len(have)} samples in shard {name} have no "
                             f"teacher embeddings (run `prep_dataset.py add-teacher`, or pass --teacher CKPT)")
        if dim is None and groups:
            off, size = next(iter(groups.values()))["teacher_image.npy"]
            dim = np.load(io.BytesIO(buf[off:off + size]), allow_pickle=False).shape[-1]
    return dim


def stored_negatives(data, index, keys):
    """The most negative captions any training sample has under the json `keys` (the loader's slot count), or
    one clear error naming the first shard with a sample that lacks them. Reads every json member once."""
    from dataloader import map_file, scan_tar
    most = 0
    for name in index["train"]["shards"]:
        buf = map_file(os.path.join(data, name))
        groups, _ = scan_tar(buf)
        lacking = 0
        for exts in groups.values():
            if "json" not in exts:
                continue  # the loader skips it (missing_json), as it skips a broken json below
            try:
                meta = json.loads(buf[exts["json"][0]:exts["json"][0] + exts["json"][1]])
            except ValueError:
                continue
            lists = [meta.get(k) for k in keys] if isinstance(meta, dict) else [None]
            if all(isinstance(x, list) for x in lists):
                most = max(most, sum(map(len, lists)))
            else:
                lacking += 1
        if lacking:
            cmd = "add-negatives --model CKPT" if "mined" in keys else "add-swaps"
            raise ValueError(f"--hard_negatives: {lacking} of {len(groups)} samples in shard {name} have no json "
                             f"{' / '.join(keys)} list (run `prep_dataset.py {cmd}` on {data})")
    if most == 0:
        raise ValueError(f"--hard_negatives: no training sample in {data} has a negative caption")
    return most


class OnlineTeacher:
    """A frozen teacher run in-process when the shards hold no stored embeddings. It reads the captions with its
    own tokenizer: our tokens are decoded back to text (lossless after clean()) and re-tokenized."""

    def __init__(self, path, tokenizer, device):
        self.model, ckpt = cm.load_model(path, map_location=device)
        self.model.requires_grad_(False)  # never in the optimizer
        self.tokenizer, self.own = tokenizer, Tokenizer.from_dict(ckpt["tokenizer"])
        self.dim, self.size = self.model.config.output_dim, self.model.config.vision.img_size

    @torch.no_grad()
    def __call__(self, batch):
        device = next(self.model.parameters()).device
        images = clip.normalize_images(batch["image"].to(device))  # (B, 3, S, S)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", antialias=True)
        eot = self.tokenizer.eot  # the ids between sot and eot: the zero padding after eot is not text
        texts = [self.tokenizer.decode(row[1:row.index(eot)]) for row in batch["text"].tolist()]
        tokens = self.own.tokenize(texts, self.model.config.text.context_length).to(device)
        outs = self.model(images, tokens)
        return outs.image.float(), outs.text.float()


def summary(metrics, index, log_dir):
    """The last lines of a run: val loss and zero-shot accuracy against chance."""
    if "loss" in metrics:
        print(f"final val loss {metrics['loss']:.4f}")
    if "zeroshot_top1" in metrics:
        n = len(index.get("classes", [])) or 1
        line = f"zero-shot top-1 on val: {100 * metrics['zeroshot_top1']:.1f}% (chance {100 / n:.1f}%)"
        if "zeroshot_top1_heldout" in metrics:
            line += (f"; seen combinations {100 * metrics['zeroshot_top1_seen']:.1f}%, held-out "
                     f"{100 * metrics['zeroshot_top1_heldout']:.1f}%")
        print(line)
    print(f"metrics and plots: {log_dir}/")


if __name__ == "__main__":
    sys.exit(main())
