"""
Train CLIP. One code path for a laptop CPU, one GPU, and many GPUs under torchrun.

    python train.py                                   # built-in synthetic set, tiny preset, a few minutes on a CPU
    python train.py --batch 1024 --max_lr 3e-4        # on CUDA after `bash setup_gpu.sh --prep t2i N`: the seed
                                                      # preset on data/t2i, bf16 + compile (all defaults on CUDA)
    torchrun --standalone --nproc_per_node=8 train.py --data data/t2i --preset seed --batch 128

--batch is per process and per micro-batch: the effective batch is batch x accum x processes, and every sample
is contrasted against all of it (features are gathered across ranks and cached across micro-batches).

The loop never waits for the GPU except on log steps (every --log_every steps, and checkpoint/eval steps): the
loss, grad norm and logit scale stay on the device until then, the next batch is copied to the device while the
current step runs, and checkpoints are written by a background thread.

Reading order: run() at the bottom is the spine (the setup, then the training loop); above it, the command line,
the setup functions in the order run() calls them, the step (loss, forward and backward), the evaluation, and the
loop's machinery. Experiment lines are fenced: a comment `# NAME: ...` (Long-CLIP, distillation, hard negatives,
SigLIP, FLIP, adapters, LiT) starts the one statement that belongs to that experiment alone, so the plain CLIP path
reads by skipping them. launch.py holds the DDP machinery (torchrun/SLURM, the dead-rank watch); checkpoint_manager.py
the run folders' locks.

Left out on purpose: FSDP/tensor parallelism (CLIP at these sizes fits one GPU per replica), gradient scaling
(bf16 needs none), EMA weights, and wandb (metrics.jsonl + PNGs in logs/<run>/ instead).
"""

import argparse
import contextlib
import datetime
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time


def exit_now(signum, message):
    """One line and out, at once: an exception raised from a signal handler can land in an import's or a library's
    bare `except:` and be swallowed. A lock left behind names a dead pid and is taken over by the next run."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":  # Ctrl-C before the loop takes it over (Preemption): one line, also during the imports
    signal.signal(signal.SIGINT, lambda signum, frame: exit_now(signum, "interrupted before training: nothing was saved"))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint_manager as cm
import clip
from dataloader import (CROP_AREA, CROP_RATIO, ShardLoader, auto_workers, data_fingerprint, is_url, load_tokenizer,
                        negative_slots, read_index, teacher_embedding_dim)
from launch import LAUNCHERS, PeerWatch, launch_env, unshared_ranks
from logger import Logger
from tokenizer import Tokenizer

DEFAULT_DATA = os.path.join("data", "synthetic")  # the built-in demo set, made on first use
GPU_DATA = os.path.join("data", "t2i")  # where `bash setup_gpu.sh --prep t2i N` puts text-to-image-2M
# torchrun's collectives give up after this long; rank 0 works alone for much less (an eval, a checkpoint's copy
# to the CPU, making the synthetic set), while the other ranks wait at their next collective
PG_TIMEOUT = datetime.timedelta(minutes=30)
VAL_CACHE_BYTES = 4 * 2 ** 30  # the in-training val batches are kept in host memory when they fit in this
PLOT_EVERY_S = 300  # redraw the PNGs after an eval at most this often (drawing takes ~1 s of the training thread)
# --hard_negatives -> the per-sample json lists read (prep_dataset.py writes "negatives" at prep time or with
# add-swaps, "mined" with add-negatives)
NEGATIVE_KEYS = {"none": (), "swaps": ("negatives",), "mined": ("mined",), "both": ("negatives", "mined")}
# a sane bound: 4x Long-CLIP's 248 tokens holds any caption; past it only the text attention's cost (T^2) grows
MAX_CONTEXT = 1024


# -----------------------------------------------------------------------------
# the command line


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--data", default=None, help=f"shard dir from prep_dataset.py, or its URL (https://, s3://, gs://) (default: "
                                   f"{GPU_DATA} on CUDA once it holds a prepared set, else the built-in {DEFAULT_DATA}, "
                                   f"made on first use)")
    a("--preset", default=None, help=f"model size: {', '.join(clip.PRESETS)} (default: seed on CUDA, tiny for a synthetic "
                                     f"set and on a CPU)")
    a("--batch", type=int, default=128, help="micro-batch per process")
    a("--accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--epochs", type=float, default=4.5, help="passes over the training split (fractions allowed)")
    a("--max_lr", type=float, default=2e-3)
    a("--min_lr_frac", type=float, default=0.1, help="cosine decays to this fraction of max_lr")
    a("--warmup_frac", type=float, default=0.02, help="fraction of steps with linear warmup")
    a("--wd", type=float, default=0.2, help="AdamW weight decay (matrices only)")
    a("--beta2", type=float, default=0.98)
    a("--grad_clip", type=float, default=1.0, help="max grad norm (0: no clipping)")
    a("--label_smoothing", type=float, default=None, help="default 0, or 0.1 with --long (as Long-CLIP)")
    a("--precision", choices=("auto", "fp32", "bf16"), default="auto",
      help="auto: bf16 autocast where CUDA supports it, else fp32 (bf16 is GPU only; a CPU stays fp32)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on with CUDA, off on a CPU)")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=None, help="loader worker processes per rank (default: from the free cores)")
    a("--augment", action=argparse.BooleanOptionalAction, default=None,
      help="random-resized-crop on training images (default: from the data: off when its captions describe layout)")
    a("--crop_area", type=float, nargs=2, default=CROP_AREA, metavar=("MIN", "MAX"), help="fraction of the image area kept")
    a("--crop_ratio", type=float, nargs=2, default=CROP_RATIO, metavar=("MIN", "MAX"), help="crop aspect ratio w/h")
    # not --run / --logs: torchrun reads those as ambiguous abbreviations of its own --run-path / --logs-specs
    a("--run_name", default=None, help="run name (default: <preset>-<data dir name>)")
    a("--out", default="out", help="checkpoints go to <out>/<run_name>/ckpt")
    a("--log_dir", default="logs", help="metrics go to <log_dir>/<run_name>/")
    a("--log_every", type=int, default=10, help="read the loss etc. from the device and log every N steps")
    a("--eval_every", type=int, default=200, help="validation + zero-shot every N steps (0: only at the end)")
    # 20 batches: a forward pass is ~1/3 of a training step (2 of the 6 FLOPs per weight), so an eval costs ~7
    # steps' time, 3.3% of the 200 steps between evals at the default --eval_every (the batches are read once)
    a("--eval_batches", type=int, default=20, help="val loss over the first N val batches of --batch (0: the whole split)")
    a("--zeroshot_data", default=None, metavar="SRC", help="also zero-shot top-1/top-5 on SRC at every eval (rank 0; "
      "--data may have no classes): class folders (ImageNet val), a CLIP_benchmark wds folder, hf:<hub id or dir>")
    a("--zeroshot_max_images", type=int, default=5000, help="--zeroshot_data: at most this many images per eval")
    a("--ckpt_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=3, help="step checkpoints to keep (plus latest and best)")
    a("--resume", default=None, help="'latest' or a checkpoint path: continue that run exactly; 'auto': the newest valid "
      "checkpoint of this run when there is one, else start fresh (a launch a scheduler can re-run as it is)")
    a("--overwrite", action="store_true",
      help="start over in a run folder that holds an earlier run (moved aside to <folder>.old-<time>, not deleted)")
    a("--stop_at", type=int, default=None, help="end cleanly after this step, schedule unchanged")
    a("--init", default=None, help="start from these weights (ours or an original CLIP state dict)")
    a("--ignore_keys", nargs="*", default=[], help="regexes of --init keys not to load")
    a("--init_heads", type=int, nargs=2, default=None, metavar=("IMAGE", "TEXT"),
      help="head counts of an original CLIP/OpenCLIP --init state dict (not in its shapes; default: inferred, said)")
    # model variants
    a("--context_length", type=int, default=None,
      help="text context (default: the preset's, or the data's longest caption rounded up to 8 when shorter)")
    a("--pool", choices=clip.POOLS, default="eot", help="text pooling")
    a("--pool_layers", type=int, default=1, help="average the pooled token over the last N layers")
    a("--head", choices=clip.HEADS, default="linear", help="projection, or a fixed polytope head (simplex.py)")
    a("--head_mode", choices=clip.HEAD_MODES, default="replace")
    a("--quick_gelu", action="store_true", help="QuickGELU (what OpenAI's weights need)")
    # what OpenCLIP users expect from a trainer
    a("--loss", choices=clip.LOSSES, default="clip", help="clip: softmax over the batch; siglip: a sigmoid per pair (+ learned bias)")
    a("--patch_dropout", type=float, default=0.0, help="FLIP: drop this fraction of each image's patches while training, in [0, 1)")
    a("--grad_ckpt", action="store_true", help="activation checkpointing per block: less memory, one extra forward")
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
    if args.preset is not None and args.preset not in clip.PRESETS:  # None: run_defaults chooses
        parser.error(f"unknown --preset {args.preset!r}; choose from {', '.join(clip.PRESETS)}")
    for name, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):  # argparse takes "nan" and "inf" as floats
            parser.error(f"--{name} must be a finite number, got {v}")
    for name in ("batch", "accum", "ckpt_every", "keep", "log_every", "stop_at", "zeroshot_max_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_lr <= 0 or args.epochs <= 0:
        parser.error(f"--max_lr and --epochs must be > 0, got {args.max_lr} and {args.epochs}")
    if not 0 <= args.min_lr_frac <= 1 or not 0 <= args.warmup_frac < 1 or not 0 <= args.beta2 < 1:
        parser.error("--min_lr_frac must be in [0, 1], --warmup_frac and --beta2 in [0, 1)")
    if args.wd < 0 or args.grad_clip < 0 or (args.workers or 0) < 0 or args.eval_every < 0 or args.eval_batches < 0:
        parser.error("--wd, --grad_clip, --workers, --eval_every and --eval_batches must be >= 0")
    if args.context_length is not None and not 3 <= args.context_length <= MAX_CONTEXT:
        parser.error(f"--context_length must be >= 3 (start token, caption, end token) and <= {MAX_CONTEXT}, "
                     f"got {args.context_length}")
    if not 0 <= args.seed < 2 ** 63:  # numpy's seeding takes no negative number, torch's no more than 64 bits
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts a run over and --resume continues one: give one of them")
    if args.init_heads is not None and (args.init is None or min(args.init_heads) < 1):
        parser.error("--init_heads IMAGE TEXT takes two positive head counts and applies only with --init")
    for pattern in args.ignore_keys:
        try:
            re.compile(pattern)
        except re.error as e:
            parser.error(f"--ignore_keys {pattern!r} is not a valid regular expression ({e})")
    if args.data is not None and not is_url(args.data) and not os.path.isfile(os.path.join(args.data, "index.json")):
        what = "does not exist" if not os.path.exists(args.data) else "has no index.json (make it with prep_dataset.py)"
        parser.error(f"--data {args.data} {what}")
    if args.init is not None and not os.path.isfile(args.init):
        parser.error(f"--init {args.init} does not exist")
    zs = args.zeroshot_data
    if zs is not None and not zs.startswith("hf:") and not os.path.isdir(zs):
        parser.error(f"--zeroshot_data {args.zeroshot_data} is not a directory (nor hf:<hub id or local dir>)")
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
    if not 0 <= args.patch_dropout < 1:
        parser.error(f"--patch_dropout must be in [0, 1) (the fraction of patches dropped), got {args.patch_dropout}")
    if args.loss == "siglip" and args.label_smoothing:
        parser.error("--label_smoothing applies to the softmax loss only, not --loss siglip")
    (a0, a1), (r0, r1) = args.crop_area, args.crop_ratio
    if not 0 < a0 <= a1 <= 1 or not 0 < r0 <= r1:
        parser.error(f"--crop_area needs 0 < MIN <= MAX <= 1 and --crop_ratio 0 < MIN <= MAX, got {args.crop_area} "
                     f"and {args.crop_ratio}")
    if args.hard_negatives != "none" and (args.long or args.label_smoothing or args.loss == "siglip"):
        parser.error("--hard_negatives extends the softmax loss: it does not combine with --long, --label_smoothing "
                     "or --loss siglip")


# -----------------------------------------------------------------------------
# setup, in the order run() calls it: processes and devices, defaults, data, the model's config, resume, loaders,
# the model


def setup_distributed():
    """One code path for CPU, one GPU, torchrun and SLURM's srun: (ddp, rank, world, device, peers). Rank 0 prints the
    launcher it saw; under DDP every rank watches the others (peers: a launch.PeerWatch, else None)."""
    launcher, rank, local_rank, world, local_world = launch_env(os.environ)
    if launcher == "slurm":  # what init_process_group("env://"), device_defaults and the loader read
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(local_world))
    ddp, peers = world > 1, None
    if rank == 0 and launcher is not None:  # (a plain `python train.py` has nothing to say here)
        where = f", rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if ddp else ""
        print(f"launcher: {LAUNCHERS[launcher]}, {world} process{'es' * ddp}{where}", flush=True)
    # modulo: srun --gpus-per-task shows each task only its own GPU, as cuda:0
    device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if ddp:  # device_id binds NCCL to this GPU at once; the timeout outlasts rank 0's work alone (PG_TIMEOUT)
        extra = {"device_id": torch.device(device)} if device.startswith("cuda") else {}
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=PG_TIMEOUT, **extra)
        peers = PeerWatch(rank, world, [0] if launcher == "slurm" else list(range(local_world)))
    return ddp, rank, world, device, peers


def run_defaults(args, cuda):
    """Fill --data and --preset when not given, from the machine: on CUDA the real run, the seed preset on GPU_DATA
    once it holds a prepared set (so the design card's `python train.py --batch 1024 --max_lr 3e-4` is it), else the
    demo, the tiny preset on the built-in synthetic set (args.data stays None for it). A flag given always wins; an
    unset --preset follows the data: seed for real data on CUDA, tiny for a synthetic set and on a CPU. A resumed
    run resolves the same way on the same machine, so it finds its own run folder (run names are preset-data).
    Returns (the start line's words for it, a hint line when CUDA falls back to the demo, else None)."""
    unset = [flag for flag, v in (("--preset", args.preset), ("--data", args.data)) if v is None]
    why = None
    if args.data is None and cuda:
        try:
            read_index(GPU_DATA, "train")  # a prepared set: index.json readable, its train shards on disk
            args.data = GPU_DATA
        except (OSError, ValueError) as e:
            why = f"{GPU_DATA} holds no prepared set yet: {e}" if os.path.exists(GPU_DATA) else f"there is no {GPU_DATA}"
    if args.preset is None:  # seed for real data on CUDA, tiny for a synthetic set and on a CPU
        try:
            real = cuda and args.data is not None and read_index(args.data).get("source") != "synthetic"
        except (OSError, ValueError):  # a broken --data: load_data says what is wrong with it
            real = False
        args.preset = "seed" if real else "tiny"
    said = f"{args.preset} preset on {args.data or DEFAULT_DATA}"
    if unset:
        said += f" ({' and '.join(unset)}: the default{'s' * (len(unset) > 1)} on {'CUDA' if cuda else 'a CPU'})"
    hint = None if why is None else (
        f"note: {why}, so this CUDA run is the demo ({args.preset} preset, built-in synthetic set). The real run: "
        f"bash setup_gpu.sh --prep t2i 200000 (or python prep_dataset.py text-to-image-2m --out {GPU_DATA} --limit "
        f"200000), then this command again; --preset and --data choose explicitly")
    return said, hint


def device_defaults(args, device):
    """Fill the flags left to the machine: bf16 where CUDA supports it, compile on CUDA, loader workers from the
    cores this machine's ranks share. Returns how the start line describes them."""
    cuda = device.startswith("cuda")
    said = []
    if args.precision == "auto":
        args.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        said.append(f"{args.precision} (auto)")
    else:
        said.append(args.precision if cuda or args.precision == "fp32" else "fp32 (bf16 needs CUDA)")
    if args.compile is None:
        args.compile = cuda
    said.append("compiled" if args.compile else "not compiled")
    auto = args.workers is None
    if auto:
        args.workers = auto_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    said.append(f"{args.workers} loader worker{'s' * (args.workers != 1)} per rank{' (auto)' * auto}")
    return ", ".join(said)


def ensure_synthetic(path, quiet, master):
    """The built-in dataset: made on first use (about a minute on 2 cores)."""
    if master and not os.path.isfile(os.path.join(path, "index.json")):
        print(f"no --data given and {path} does not exist yet: creating the built-in synthetic dataset there")
        prep = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prep_dataset.py")  # its CLI, not its helpers
        if subprocess.run([sys.executable, prep, "synthetic", "--out", path] + (["--quiet"] if quiet else [])).returncode:
            raise ValueError(f"making the built-in synthetic dataset in {path} failed (see above)")
    if dist.is_initialized():
        dist.barrier()


def load_data(args, master):
    """(data dir, its index.json, its tokenizer, checkpoint dir, log dir): --data, else the built-in synthetic set."""
    data = args.data or DEFAULT_DATA
    if args.data is None:
        ensure_synthetic(data, args.quiet, master)
    index = read_index(data, "train")  # checked: one clear line for any problem
    run = args.run_name or f"{args.preset}-{os.path.basename(os.path.normpath(data))}"
    return data, index, load_tokenizer(os.path.join(data, "tokenizer.json")), os.path.join(args.out, run), \
        os.path.join(args.log_dir, run)


def build_config(args, index, tokenizer, teacher_dim, master=True):
    """The run's model config (and tokenizer): the preset sized to the data, or --init's architecture with the
    pooling/adapter flags on top; --long with --init stretches the text positions (Long-CLIP)."""
    init_sd = None
    if args.init:
        init_sd, cfg, tok = cm.load_init(args.init, args.quick_gelu, args.init_heads, quiet=not master)
        if tok is not None:  # the model's token embeddings go with its own tokenizer
            tokenizer = Tokenizer.from_dict(tok)
        if cfg["vision"]["img_size"] != index["img_size"]:
            raise ValueError(f"--init model takes {cfg['vision']['img_size']} px images but the data has {index['img_size']} px")
        if args.context_length not in (None, cfg["text"]["context_length"]):  # its position table fixes it
            raise ValueError(f"--context_length {args.context_length}: the --init model's text context is "
                             f"{cfg['text']['context_length']} tokens (--long stretches it; leave --context_length out)")
        cfg["text"].update(pool=args.pool, pool_layers=args.pool_layers)
        if args.head != "linear" and (cfg["head"], cfg["head_mode"]) != (args.head, args.head_mode):
            raise ValueError(f"--head {args.head}/{args.head_mode}: the --init model has {cfg['head']}/{cfg['head_mode']}")
        config = clip.CLIPConfig.from_dict(cfg)
    else:
        ctx, longest = args.context_length, index.get("caption_tokens")
        if ctx is None and longest and not args.long:  # padding costs text-tower time and changes nothing else
            ctx = min(clip.get_config(args.preset).text.context_length, -(-longest // 8) * 8)
        config = clip.get_config(args.preset, vocab_size=tokenizer.vocab_size, img_size=index["img_size"],
                                 context_length=ctx, pool=args.pool, pool_layers=args.pool_layers,
                                 head=args.head, head_mode=args.head_mode, quick_gelu=args.quick_gelu)
    # the flags below also apply over an --init model's own
    # adapters: their reduction and towers
    config.adapters, config.adapter_towers = args.adapters, tuple(args.adapter_towers)
    # distillation: the teacher's embedding size (the model projects to it when it differs)
    config.teacher_dim = teacher_dim
    # SigLIP: the sigmoid loss (the model then holds a learned bias)
    config.loss = args.loss
    # FLIP: the fraction of patches dropped while training
    config.vision.patch_dropout = args.patch_dropout
    # Long-CLIP: trained from scratch, the context stays as it is
    if args.long and not args.init:
        print(f"note: --long without --init trains at context {config.text.context_length} from scratch "
              f"(no stretching); longer captions are truncated")
    # Long-CLIP: an --init model keeps its first 20 positions and stretches the rest 4x (77 -> 248)
    if args.long and args.init and config.text.freeze_positions == 0:
        n = config.text.context_length
        if n <= 20:
            raise ValueError(f"--long --init needs a model with a text context over 20 tokens; this one has {n} "
                             f"(train it with --context_length 32 or more)")
        config.text.context_length, config.text.freeze_positions = 20 + 4 * (n - 20), 20
    return clip.CLIPConfig.from_dict(config.to_dict()), tokenizer, init_sd  # re-validated


def load_resume(args, out_dir, config, world, data, fingerprint):
    """The --resume checkpoint, after the checks that make a resume exact (else a one-line ValueError)."""
    path = cm.resolve(args.resume, out_dir)
    if dist.is_initialized():  # every rank continues from rank 0's pick (a shared folder can lag on other nodes)
        picked = [path]
        dist.broadcast_object_list(picked, src=0)
        path = picked[0]
    if args.resume == "auto" and (not dist.is_initialized() or dist.get_rank() == 0):
        where = f"continuing from {path}" if path else f"no checkpoint in {os.path.join(out_dir, 'ckpt')}, starting fresh"
        print(f"--resume auto: {where}")
    if path is None:
        return None
    ckpt = cm.load(path, map_location="cpu")
    why = check_resume(ckpt, path, args, world)
    if why is None and ckpt["config"] != config.to_dict():
        why = f"--resume: the checkpoint's model differs from these flags: {cm.diff_configs(ckpt['config'], config.to_dict())}"
    if why is None and "data_fingerprint" in ckpt:  # (checkpoints from before the fingerprint resume unchecked)
        why = data_change(ckpt["data_fingerprint"], fingerprint, path, data)
    if why:
        raise ValueError(why)
    return ckpt


def check_resume(ckpt, path, args, world):
    """None, or the one line saying why this checkpoint cannot continue exactly with these flags."""
    missing = [k for k in ("model", "optimizer", "config", "step", "loader", "rng") if k not in ckpt]
    if missing:
        return (f"--resume {path} is not a train.py checkpoint (it has no {', '.join(missing)}); "
                f"to start from its weights use --init {path}")
    saved = ckpt.get("args") or {}
    was = {"batch": saved.get("batch"), "accum": saved.get("accum"), "epochs": saved.get("epochs"),
           "processes": ckpt.get("world_size")}
    now = {"batch": args.batch, "accum": args.accum, "epochs": args.epochs, "processes": world}
    changed = [f"{k} {was[k]} -> {now[k]}" for k in now if was[k] is not None and was[k] != now[k]]
    if changed:  # they set the data order per step and the schedule's length: a resume would be silently inexact
        return (f"--resume continues a run exactly, so --batch, --accum, --epochs and the process count must match "
                f"the checkpoint's; changed: {', '.join(changed)} (to change them, start a new run with --init {path})")
    return None


def data_change(saved, now, path, data):
    """None, or the line saying that the checkpoint was trained on other data than --data (dataloader.data_fingerprint)."""
    words = {"shards": "shard names", "shard_sizes": "samples per shard", "bytes": "shard sizes in bytes",
             "source_sha256": "prep's source fingerprint"}
    url = None in (saved.get("bytes"), now.get("bytes"))  # shards at a URL: neither their bytes nor prep's state is known
    unknown = lambda k: url and k in ("bytes", "source_sha256")
    differ = [w for k, w in words.items() if saved.get(k) != now.get(k) and not unknown(k)]
    if not differ:
        return None
    count = lambda fp: f"{len(fp['shards'])} shard(s)" + (f" of {sum(fp['shard_sizes'])} samples" if fp.get("shard_sizes") else "")
    return (f"--resume: {path} was trained on other data than {data} ({', '.join(differ)} differ; {count(saved)} then, "
            f"{count(now)} now): resume on its own data, or start a new run from its weights with --init {path}")


def make_loaders(args, data, index, tokenizer, config, rank, world, cuda, master):
    """This rank's training loader (disjoint samples; each batch is a whole step: --accum micro-batches, pinned for
    the copy to the GPU; augmented as augment_policy says) and, on rank 0, the val loader (never augmented)."""
    step_batch, train_split = args.batch * args.accum, index["train"]["num_samples"]
    if step_batch * world > train_split:
        raise ValueError(f"--batch {args.batch} x --accum {args.accum} x {world} processes = {step_batch * world} "
                         f"is larger than the {train_split} training samples")
    keys, slots = NEGATIVE_KEYS[args.hard_negatives], 0
    # hard negatives: every sample's json must carry the lists (checked now, not mid-run); slots per sample
    if keys:
        slots = negative_slots(data, index["train"]["shards"], keys)
    augment, why = augment_policy(args, index)
    if master:  # even with --quiet: what the data did to the recipe is worth one line
        crop = f" (area {args.crop_area[0]:g}-{args.crop_area[1]:g}, aspect {args.crop_ratio[0]:.3g}-{args.crop_ratio[1]:.3g})"
        print(f"augmentation: {'random-resized-crop' + crop if augment else 'none'}, from {why}")
    ctx = config.text.context_length
    loader = ShardLoader(data, "train", step_batch, tokenizer, ctx, seed=args.seed, rank=rank, world_size=world,
                         num_workers=args.workers, augment=augment, long_captions=args.long, pin_memory=cuda,
                         crop_area=tuple(args.crop_area), crop_ratio=tuple(args.crop_ratio), negatives=keys,
                         num_negatives=slots)
    # (read_index counts a split whose index.json entry has no num_samples; `index` was read for train only)
    n_val = read_index(data, "val")["val"]["num_samples"] if rank == 0 and index.get("val", {}).get("shards") else 0
    val_loader = ShardLoader(data, "val", min(args.batch, n_val), tokenizer, ctx, num_workers=args.workers,
                             long_captions=args.long, augment=False) if rank == 0 and n_val else None
    return loader, val_loader


def augment_policy(args, index):
    """(augment?, why): --augment/--no-augment, else what the data says about itself (index.json
    "layout_in_captions": crops would make "on the left" false), else off only for the synthetic set (made
    before the field existed)."""
    if args.augment is not None:
        return args.augment, "--augment" if args.augment else "--no-augment"
    if "layout_in_captions" in index:
        layout = bool(index["layout_in_captions"])
        return not layout, f"index.json: layout_in_captions={str(layout).lower()}"
    synthetic = index.get("source") == "synthetic"
    return not synthetic, f"index.json has no layout_in_captions; source {index.get('source')!r}"


def open_zeroshot_data(src, max_images, img_size):
    """--zeroshot_data -> eval_zeroshot's Source, checked now (labelled, with class names, images the model can
    take) rather than at the first eval; one ValueError line otherwise."""
    import eval_zeroshot
    source = eval_zeroshot.open_source(src, None, max_images)
    if not (source.labelled and source.classes):
        raise ValueError(f"--zeroshot_data {src}: no classes to classify (it needs labels with class names: class "
                         f"folders, a CLIP_benchmark classification set, a hub set with a ClassLabel column)")
    if source.img_size not in (None, img_size):
        raise ValueError(f"--zeroshot_data {src} has {source.img_size} px images but the model takes {img_size} px")
    return source


def build_model(args, config, init_sd, quiet):
    """The model, initialised from --init (stretched for --long), with the fine-tuning freezes applied."""
    model = clip.CLIP(config)
    # Long-CLIP: an --init model with the shorter context is loaded as it was, then its positions stretched
    if init_sd is not None and config.text.freeze_positions and "text.pos_fixed" not in init_sd:
        cfg = clip.CLIPConfig.from_dict(config.to_dict())
        cfg.text.context_length = init_sd["text.pos_embed"].shape[0]
        cfg.text.freeze_positions = 0
        base = clip.CLIP(cfg)
        cm.load_partial(base, init_sd, args.ignore_keys, quiet=quiet)
        model, init_sd = clip.stretch_text_model(base), None  # (loaded)
    if init_sd is not None:
        cm.load_partial(model, init_sd, args.ignore_keys, quiet=quiet)
    # LiT: the image tower frozen, but for its last --unlocked_layers blocks
    if args.lock_image:
        model.lock("visual", args.unlocked_layers)
    # LiT: the text tower, the same
    if args.lock_text:
        model.lock("text", args.unlocked_layers)
    model.set_grad_checkpointing(args.grad_ckpt)
    # adapters: only the adapters train (plus the heads with --train_heads)
    if args.adapters:
        for name, p in model.named_parameters():
            head = name.startswith(("visual.proj", "text.proj", "logit_scale", "logit_bias", "distill_proj"))
            p.requires_grad_("adapter_" in name or (head and args.train_heads) or name.startswith("distill_proj"))
    return model


def claim_run_folders(args, ckpt, out_dir, log_dir):
    """Rank 0 makes this run's folders its own, before anything is written (cm.claim_folders: writable, locked while it
    runs, holding no other run): (lock files to release at the end, None) or ([], the line saying why not). --resume
    auto is --resume latest when it found a checkpoint; else a fresh start that moves a run killed before its first
    checkpoint aside (never deleted), so a scheduler's relaunch is not refused."""
    fresh = args.resume == "auto" and ckpt is None
    resume = None if fresh else "latest" if args.resume == "auto" else args.resume
    return cm.claim_folders(out_dir, log_dir, resume, args.overwrite or fresh)


def wrap_model(args, raw_model, ddp, device):
    """torch.compile, then DDP. The distillation projection is used in the loss, outside forward: DDP must not wait
    for its gradient (the loop averages it by hand), and DDP knows it by its name after compile's _orig_mod. prefix."""
    model = torch.compile(raw_model) if args.compile else raw_model
    if ddp:
        DDP = torch.nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(model, ddp_ignored(model))
        # no buffer broadcast each step: the buffers (image statistics, frozen positions) never change
        model = DDP(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None,
                    broadcast_buffers=False)
    return model


def ddp_ignored(model):
    """The parameter names DDP must leave alone, as the (possibly compiled) model names them."""
    return [n for n in dict(model.named_parameters()) if list(cm.strip_prefixes({n: 0})) == ["distill_proj.weight"]]


# -----------------------------------------------------------------------------
# distillation's teacher (--distill): embeddings stored in the shards, or a model run online


# distillation: the teacher, when --distill asks for one
def load_teacher(args, data, index, tokenizer, device):
    """(online teacher or None, teacher embedding size): stored in the shards (checked for every sample now, not
    discovered mid-run), else --teacher run online; (None, 0) without --distill."""
    if args.distill == "none":
        return None, 0
    try:
        return None, teacher_embedding_dim(data, index["train"]["shards"])
    except ValueError:
        if args.teacher is None:
            raise
    teacher = OnlineTeacher(args.teacher, tokenizer, device)
    return teacher, teacher.dim


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
        # (reading the tokens back is a host sync each step: the price of re-tokenizing for the teacher)
        texts = [self.tokenizer.decode(row[1:row.index(eot)]) for row in batch["text"].tolist()]
        tokens = self.own.tokenize(texts, self.model.config.text.context_length).to(device)
        outs = self.model(images, tokens)
        return outs.image.float(), outs.text.float()


def teacher_features(batch, teacher, device):
    """Stored embeddings from the shards, else the online teacher (no gradient, never in the optimizer)."""
    if "teacher_image" in batch:
        return batch["teacher_image"].to(device).float(), batch["teacher_text"].to(device).float()
    return teacher(batch)


# -----------------------------------------------------------------------------
# the step: the learning rate, the loss over the global batch (across ranks: clip.gather), forward and backward


def lr_at(step, total, max_lr, warmup_frac, min_lr_frac):
    """Linear warmup for warmup_frac of the steps, then cosine from max_lr down to min_lr_frac * max_lr."""
    warmup = int(warmup_frac * total)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
    min_lr = min_lr_frac * max_lr
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_loss(args, model, teacher=None):
    """loss_fn(outs, batch) -> (total, terms). outs = the model's CLIPOutput in fp32 for the step's whole batch on
    this rank. Every term is computed on the global batch gathered from every rank (identical values on each; DDP's
    gradient average then gives exactly the global loss's gradient). The contrastive loss comes first, then one block
    per experiment: --loss siglip replaces every contrastive term (the main one and Long-CLIP's coarse one) with the
    sigmoid loss; the distillation terms stay as they are (kd and icl are softmaxes over the student's logits, which a
    shared bias does not change)."""
    smoothing = args.label_smoothing if args.label_smoothing is not None else 0.1 if args.long else 0.0

    def contrastive(img, txt, outs, all_img=None, all_txt=None, offset=0):
        """(b, E) local rows against the (N, E) global batch; row i's own caption is column offset + i."""
        if args.loss == "clip":  # CLIP's softmax over the batch, image -> caption and caption -> image
            return clip.clip_loss(img, txt, outs.logit_scale, smoothing, all_img=all_img, all_txt=all_txt,
                                  offset=offset)
        # SigLIP: a sigmoid per pair, each image against every caption (the reverse direction is the same pairs)
        return clip.siglip_loss(img, txt, outs.logit_scale, outs.logit_bias, all_txt=all_txt, offset=offset)

    def loss_fn(outs, batch):
        img, txt, scale = outs.image, outs.text, outs.logit_scale  # (b, E), (b, E), ()
        all_img, all_txt = clip.gather(img), clip.gather(txt)  # (N, E): every rank's rows, gathered once per step
        offset = (dist.get_rank() if dist.is_initialized() else 0) * img.shape[0]  # this rank's first row of the N
        terms = {}
        # this rank's rows against the global batch, as if one big batch
        if args.hard_negatives == "none":
            loss = contrastive(img, txt, outs, all_img, all_txt, offset)
        # hard negatives: the softmax of NegCLIP instead, where images also meet every negative caption of the batch
        if args.hard_negatives != "none":
            all_neg = clip.gather(outs.text_neg)  # (N, K, E); empty slots are zero vectors
            loss = clip.negclip_loss(img, txt, all_neg, all_neg.abs().sum(-1) > 0, scale, all_img=all_img,
                                     all_txt=all_txt, offset=offset)
        # Long-CLIP: the loss above is the fine one (long caption vs image); coarse: short caption vs the image's top
        # principal components
        if args.long:
            short = clip.gather(outs.text_short)  # (N, E)
            coarse = F.normalize(clip.pca_reconstruct(all_img, args.long_pca), dim=-1)  # (N, E)
            terms["loss_long"], terms["loss_short"] = loss, contrastive(coarse, short, outs)
            loss = loss + terms["loss_short"]
        # distillation: the student's global batch against the teacher's, mixed in with --distill_weight
        if args.distill != "none":
            t_img, t_txt = teacher_features(batch, teacher, img.device)  # (b, Et) each, normalised
            t_img, t_txt = clip.gather(t_img), clip.gather(t_txt)  # (N, Et)
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


# FLIP: which patches each image keeps this step
def patch_keep(config, seed, step, rank, batch, device):
    """FLIP patch dropout: this rank's (batch, K) kept-patch indices for this step, or None without it. A fresh
    generator seeded from (seed, step, rank) alone: a resumed run drops the same patches, and nothing else that
    draws from the global torch RNG can shift the choice. A tensor input, so torch.compile does not recompile."""
    if not config.vision.patch_dropout:
        return None
    import numpy as np
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)  # a 63-bit seed
    return clip.sample_patch_keep(batch, config.vision, torch.Generator(device).manual_seed(mixed))


def as_float(outs):
    """A CLIPOutput with every tensor in fp32 (the loss is computed in fp32 under bf16 autocast)."""
    return outs._replace(**{k: v.float() for k, v in outs._asdict().items() if v is not None})


def model_inputs(batch, long, keep=None):
    """The model's inputs from a batch on the device: uint8 images (the model normalises them), tokens, short tokens
    (--long, else None), the kept patches (--patch_dropout, else None), negative captions (--hard_negatives)."""
    return batch["image"], batch["text"], batch["text_short"] if long else None, keep, batch.get("text_neg")


def forward_backward(model, inputs, accum, autocast, loss_fn, batch=None):
    """One optimizer step's gradients; returns (loss, terms). inputs: the model's batched inputs (images, tokens,
    short tokens or None, kept patches or None, negative captions or None). --accum > 1: grad_cache."""
    if accum > 1:
        return grad_cache(model, inputs, accum, autocast, loss_fn, batch)
    with autocast:
        outs = model(*inputs)  # CLIPOutput: image (B, E), text (B, E), logit_scale () ...
    loss, terms = loss_fn(as_float(outs), batch)
    loss.backward()
    return loss.detach(), terms


def grad_cache(model, inputs, accum, autocast, loss_fn, batch=None):
    """forward_backward over accum micro-batches (GradCache, Gao et al. 2021): 1) embed every micro-batch without
    gradients, 2) compute the whole batch's loss on those cached embeddings and its gradient w.r.t. them, 3) re-embed
    each micro-batch with gradients and backpropagate the cached gradients. Exactly the big batch's gradient, at the
    activation memory of one micro-batch, for one extra forward pass. An input may be None (no short captions, no
    patch dropout); a tensor input such as the kept-patch indices is split like the images, so both passes over a
    micro-batch see the same patches."""
    chunks = list(zip(*(x.chunk(accum) if x is not None else [None] * accum for x in inputs)))
    with torch.no_grad(), autocast:
        cached = [model(*c) for c in chunks]
    # the cached outputs as leaves: per-sample embeddings (B, E) concatenated, scalars (scale, bias) taken once.
    # detach: a scalar may be the parameter itself (SigLIP's bias), whose .grad the loss must not write into
    fields = [k for k, v in cached[0]._asdict().items() if v is not None]
    scalar = {k for k in fields if cached[0]._asdict()[k].dim() == 0}
    leaves = cached[0]._replace(**{k: (getattr(cached[0], k) if k in scalar else torch.cat([getattr(c, k) for c in cached]))
                                   .detach().float().requires_grad_() for k in fields})
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
def val_loss(model, batches, device, autocast):
    """Mean training loss (softmax or SigLIP) over the val batches, each weighted by its size; one read from the device."""
    model.eval()
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        with autocast:  # uint8 images: the model normalises them
            outs = model(batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True))
        img, txt, scale = outs.image.float(), outs.text.float(), outs.logit_scale.float()
        if outs.logit_bias is None:
            loss = clip.clip_loss(img, txt, scale)
        # SigLIP: its own loss, so best.pt follows what it trains on
        if outs.logit_bias is not None:
            loss = clip.siglip_loss(img, txt, scale, outs.logit_bias.float())
        total += loss * outs.image.shape[0]
        n += outs.image.shape[0]
    model.train()
    return total.item() / max(1, n)


def val_batches(loader, max_batches):
    """The first max_batches of the val split in order (0: all of it); the loader is rewound for the next eval."""
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        yield batch
    loader.load_state_dict({"epoch": 0, "batch": 0, "seed": loader.seed})


def zero_shot(model, tokenizer, data_dir, device, precision):
    """Zero-shot and retrieval metrics from eval_zeroshot.py on the val split; {} if the data has no classes."""
    import eval_zeroshot
    model.eval()
    try:
        return eval_zeroshot.evaluate_checkpoint(model, tokenizer, data_dir, split="val", device=device,
                                                 precision=precision, quiet=True)
    finally:
        model.train()


class Evaluator:
    """Rank 0's evaluation during training; each call -> (metrics, seconds of it spent on zero-shot): the val loss over
    the first --eval_batches val batches (read once and kept in host memory when they fit in VAL_CACHE_BYTES),
    zero-shot and retrieval on --data's val split when it has classes, zero-shot on --zeroshot_data."""

    def __init__(self, model, val_loader, zs_source, args, index, tokenizer, data, device, autocast):
        self.model, self.val_loader, self.zs_source, self.args = model, val_loader, zs_source, args
        self.index, self.tokenizer, self.data, self.device, self.autocast = index, tokenizer, data, device, autocast
        self.val_cache = None

    def __call__(self):
        args, val_loader, metrics = self.args, self.val_loader, {}
        if val_loader is not None and self.val_cache is None and args.eval_batches and \
                args.eval_batches * val_loader.batch_size * 3 * self.model.config.vision.img_size ** 2 <= VAL_CACHE_BYTES:
            self.val_cache = list(val_batches(val_loader, args.eval_batches))
            val_loader.close()  # its workers are not needed again
        if val_loader is not None:
            val_data = self.val_cache or val_batches(val_loader, args.eval_batches)
            metrics["loss"] = val_loss(self.model, val_data, self.device, self.autocast)
        t0 = time.time()
        if "classes" in self.index and val_loader is not None:
            results = zero_shot(self.model, self.tokenizer, self.data, self.device, args.precision)
            metrics.update({k: x for k, x in results.items() if isinstance(x, (int, float))})
        if self.zs_source is not None:  # the classifier is re-encoded from the current weights each time
            import eval_zeroshot
            r = eval_zeroshot.evaluate_checkpoint(self.model, self.tokenizer, self.zs_source, device=self.device,
                                                  workers=args.workers, precision=args.precision, retrieval=False)
            metrics.update(zeroshot_data_top1=r["zeroshot_top1"], zeroshot_data_top5=r["zeroshot_top5"])
        return metrics, time.time() - t0


# -----------------------------------------------------------------------------
# the loop's machinery: batches on the device, the log window, bad samples and values, preemption, the end


class DevicePrefetcher:
    """The loader's batches, already on the device: batch i+1's host->device copy (pinned memory, non_blocking, on a
    side stream) is issued before step i runs, so it overlaps the GPU's work. The loader is one batch ahead, so
    `state` keeps its state after the batch handed out last (what a checkpoint must resume from); `wait_s` sums the
    time spent waiting for the loader."""

    def __init__(self, loader, device):
        self.loader, self.device, self.wait_s = loader, device, 0.0
        self.stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
        self.batches = iter_forever(loader)
        self.next = self.fetch()

    def fetch(self):
        self.state = self.loader.state_dict()  # the state after the batch handed out last
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def __next__(self):
        batch = self.next
        if self.stream is not None:  # the compute stream waits for the copy (on the GPU, not here)
            torch.cuda.current_stream().wait_stream(self.stream)
            for v in batch.values():
                v.record_stream(torch.cuda.current_stream())  # its memory is in use there until the step is done
        self.next = self.fetch()
        return batch

    def pop_wait(self):
        wait, self.wait_s = self.wait_s, 0.0
        return wait


def iter_forever(loader):
    while True:  # each pass is one epoch, resumed mid-epoch after load_state_dict
        yield from loader


def read_window(window, ddp):
    """[(step, {name: host value}, {name: device scalar})] -> [(step, {name: float})]: one stack, one all_reduce
    (the ranks' mean loss; the grad norm and scale are equal on every rank) and one copy to the host."""
    names = list(window[0][2])
    values = torch.stack([torch.stack([v[k].float() for k in names]) for _, _, v in window])  # (steps, names)
    if ddp:
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
    return [(s, {**dict(zip(names, row)), **host}) for (s, host, _), row in zip(window, values.tolist())]


def weights_finite(model):
    """All parameters finite: one reduction on the device, one read (on checkpoint steps only)."""
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def skipped_samples(loader, say):
    """{"skipped_<reason>": count} for the bad samples met in the epoch that just ended (each skipped and replaced),
    said in one line when `say`; {} on other steps."""
    report = loader.pop_epoch_report()
    if not (report and report["skipped"]):
        return {}
    if say:
        tqdm.write(f"epoch {report['epoch']}: skipped {', '.join(f'{n} {w}' for w, n in report['skipped'].items())}")
    return {f"skipped_{why}": n for why, n in report["skipped"].items()}


def stop_bad(what, value, at, manager, master):
    """A non-finite loss, grad norm or weight: one line naming the last good checkpoint (checked, not just the newest);
    returns the exit code, 1."""
    last = manager.newest_finite() if manager else None
    if master:
        print(f"error: {what} is {value} at step {at}; stopping. Last good checkpoint: {last or 'none'}",
              file=sys.stderr)
    return 1


class Preemption:
    """SIGTERM (how clouds and SLURM preempt) and SIGINT (Ctrl-C): the handler only notes the signal; the loop
    finishes its step, checkpoints and exits with 128 + the signal's number. A second signal stops at once, without
    a checkpoint. Loader workers ignore both (dataloader.worker_loop): the main process decides."""

    def __init__(self):
        self.signum = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum is not None:
            exit_now(signum, f"second {signal.Signals(signum).name}: stopping now, without a checkpoint")
        self.signum = signum

    def agreed(self, ddp, device):
        """The signal every rank stops on now, or None. Under DDP each rank's flag is all-reduced (MAX) here, on a
        log step, where the host waits for the device anyway: one tiny collective per log step (no per-step sync), at
        the price of stopping up to --log_every steps after the signal."""
        if not ddp:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def cleanup(loader, logger, bar, peers, manager=None):
    if manager is not None:
        manager.wait()  # a checkpoint still being written is finished, not cut off
    loader.close()
    if logger is not None:
        logger.close()
    if bar is not None:
        bar.close()
    if peers is not None:  # DDP
        peers.close()
        dist.destroy_process_group()


def summary(metrics, index, log_dir, timing, zeroshot_data=None, zs_source=None):
    """The last lines of a run: val loss, zero-shot accuracy against chance, where the wall time went."""
    if "loss" in metrics:
        print(f"final val loss {metrics['loss']:.4f}")
    if "zeroshot_top1" in metrics:
        n = len(index.get("classes", [])) or 1
        line = f"zero-shot top-1 on val: {100 * metrics['zeroshot_top1']:.1f}% (chance {100 / n:.1f}%)"
        if "zeroshot_top1_heldout" in metrics:
            line += (f"; seen combinations {100 * metrics['zeroshot_top1_seen']:.1f}%, held-out "
                     f"{100 * metrics['zeroshot_top1_heldout']:.1f}%")
        print(line)
    if "zeroshot_data_top1" in metrics:
        print(f"zero-shot on {zeroshot_data}: top-1 {100 * metrics['zeroshot_data_top1']:.1f}%, top-5 "
              f"{100 * metrics['zeroshot_data_top5']:.1f}% (chance {100 / len(zs_source.classes):.1f}%)")
    # data waits are inside the training loop's time, zero-shot inside the eval's
    wall = sum(v for k, v in timing.items() if k not in ("data", "zero-shot"))
    pct = lambda k: f"{100 * timing[k] / max(wall, 1e-9):.1f}%"
    print(f"time: {wall:.1f} s; training {timing['loop']:.1f} s (waiting for data {timing['data']:.1f} s, "
          f"{pct('data')}), eval {timing['eval']:.1f} s ({pct('eval')}; zero-shot {timing['zero-shot']:.1f} s, "
          f"{pct('zero-shot')}), checkpoints {timing['checkpoint']:.1f} s on the training thread + final save "
          f"{timing['final save']:.1f} s")
    print(f"metrics and plots: {log_dir}/")


# -----------------------------------------------------------------------------
# main and run: the setup, then the training loop


def main(argv=None):
    """run() with what it holds (the run folders' locks, the signal handlers, the loader workers, a checkpoint being
    written) given back however it ends; a full disk or a folder made read-only mid-run is one line, exit 2."""
    held = []  # closers run() adds as it takes things
    try:
        return run(argv, held)
    except OSError as e:  # (writes are rank 0's: the other ranks of a DDP run wait at their next collective)
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for close in reversed(held):
            with contextlib.suppress(Exception):  # the error being reported is the one that matters
                close()


def run(argv, held):
    """The setup (the named functions above), then the training loop; returns the exit code."""
    parser = get_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    # processes and devices; what the machine decides (bf16 and compile on CUDA, loader workers from the cores)
    try:
        ddp, rank, world, device, peers = setup_distributed()
    except ValueError as e:  # SLURM without a rendezvous
        parser.error(str(e))
    master, cuda, quiet = rank == 0, device.startswith("cuda"), args.quiet or rank != 0

    def fail(msg):  # after the processes started: one line from rank 0, exit 2 everywhere
        if peers is not None:  # every rank is leaving: none of them is a failure to name
            peers.closed.set()
        if master:
            parser.error(msg)
        sys.exit(2)

    chosen, hint = run_defaults(args, cuda)  # --preset/--data left unset: the seed run on CUDA once data/t2i is prepared
    if master and hint:
        print(hint)
    said = device_defaults(args, device)
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts it)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs for whatever runs in fp32 on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.precision == "bf16" and cuda
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # the data and where this run writes; under DDP every rank must see the folder rank 0 writes
    try:
        data, index, tokenizer, out_dir, log_dir = load_data(args, master)
    except ValueError as e:
        fail(str(e))
    if ddp:  # rank 0 writes the checkpoints and every rank reads one on --resume: all must see the same folder
        missing = unshared_ranks(out_dir, rank, world)
        if missing:
            fail(f"ranks {missing} do not see {out_dir}, which rank 0 writes: put --out on a filesystem every node "
                 f"shares (checkpoints are written by rank 0 and read by every rank on --resume)")
    fingerprint = data_fingerprint(data, index)  # saved in every checkpoint; a --resume on other data is refused
    # the model's config (preset or --init), the checkpoint to --resume, the loaders, the model
    try:
        # distillation: the teacher (its embeddings stored in the shards, or a model run online) and their size
        teacher, teacher_dim = load_teacher(args, data, index, tokenizer, device)
        config, tokenizer, init_sd = build_config(args, index, tokenizer, teacher_dim, master)
        ckpt = load_resume(args, out_dir, config, world, data, fingerprint) if args.resume else None
        loader, val_loader = make_loaders(args, data, index, tokenizer, config, rank, world, cuda, master)
        held.append(lambda: [x.close() for x in (loader, val_loader) if x is not None])
        # checked on every rank (a bad one stops them all at once), evaluated on rank 0
        zs_source = open_zeroshot_data(args.zeroshot_data, args.zeroshot_max_images, config.vision.img_size) \
            if args.zeroshot_data else None
        model = build_model(args, config, init_sd if ckpt is None else None, quiet).to(device)
        if ckpt is not None:  # a checkpoint from before the data fingerprint, on a smaller dataset, fails here
            loader.load_state_dict(ckpt["loader"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    # this run's folders, before anything is written: rank 0 claims them, every rank hears why not
    locks, why = claim_run_folders(args, ckpt, out_dir, log_dir) if master else ([], None)
    held.append(lambda: [cm.release_lock(lock) for lock in locks])
    if ddp:
        box = [why]
        dist.broadcast_object_list(box, src=0)
        why = box[0]
    if why:
        fail(why)
    # the optimizer; a resumed run continues with the model, optimizer, data position (above) and RNGs as they were
    total_steps = max(1, math.ceil(args.epochs * len(loader)))
    optimizer = clip.configure_optimizers(model, args.wd, args.max_lr, betas=(0.9, args.beta2))
    step, best_val = 0, None
    if ckpt is not None:
        model.load_state_dict(cm.strip_prefixes(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        cm.set_rng_state(ckpt["rng"])
        step, best_val = ckpt["step"], ckpt.get("best_val_loss")
        if args.stop_at is not None and args.stop_at <= step:
            fail(f"--stop_at {args.stop_at} is not after the checkpoint's step {step}")
        if step >= total_steps:
            if master:
                print(f"nothing to do: the checkpoint is at the run's last step ({step} of {total_steps})")
            cleanup(loader, None, None, peers)
            return 0
        if master:
            print(f"resumed from step {step} of {total_steps}")
    raw_model, model = model, wrap_model(args, model, ddp, device)  # compiled, DDP; raw_model for eval and saving
    loss_fn = make_loss(args, raw_model, teacher)
    # checkpoints, logs and evaluation (rank 0), and the line that says what runs
    manager = cm.CheckpointManager(out_dir, keep=args.keep) if master else None
    held.append(lambda: manager and manager.wait())  # on any way out, a checkpoint being written is finished
    if ddp and master:  # a peer that stops while a checkpoint is being written: the write is completed first
        peers.finish = manager.wait
    logger = Logger(log_dir, config={"args": vars(args), "model": config.to_dict(), "world_size": world},
                    resume_step=step if ckpt is not None else None, total_steps=total_steps,
                    print_every=args.log_every, quiet=args.quiet, enabled=master)
    held.append(logger.close)
    evaluate = Evaluator(raw_model, val_loader, zs_source, args, index, tokenizer, data, device, autocast) \
        if master and (val_loader is not None or args.zeroshot_data) else None
    step_batch = args.batch * args.accum
    if master and not args.quiet:
        print(f"{chosen}: {config.vision.img_size}px images, {config.text.context_length}-token context, "
              f"{raw_model.num_params() / 1e6:.2f}M parameters "
              f"({raw_model.num_params(trainable_only=True) / 1e6:.2f}M trainable), "
              f"{total_steps} steps of {step_batch * world} samples on {world} x {device}: {said}")

    # -----------------------------------------------------------------------------
    # the training loop: one optimizer step per iteration. Nothing in it waits for the GPU except a log step.
    stop = min(total_steps, args.stop_at or total_steps)
    batches = DevicePrefetcher(loader, device)
    batches.pop_wait()  # the first batch's wait is before the clock starts
    bar = tqdm(total=stop, initial=step, disable=quiet, desc="train", dynamic_ncols=True)
    preempt = Preemption()  # from here SIGTERM / Ctrl-C end the run after a step, with a checkpoint
    held.extend([bar.close, preempt.restore])
    window, metrics = [], {}  # window: this log window's steps, their values still on the device
    timing = {"loop": 0.0, "data": 0.0, "eval": 0.0, "zero-shot": 0.0, "checkpoint": 0.0, "final save": 0.0}  # s
    t_start = t_window = t_plot = time.time()
    model.train()
    while step < stop:
        # the learning rate of this step (warmup, then cosine), written into the optimizer
        lr = lr_at(step, total_steps, args.max_lr, args.warmup_frac, args.min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the batch, already on the device: its copy was issued while the previous step ran
        batch = next(batches)
        # FLIP: the patches each image keeps this step (B, K); None without patch dropout
        keep = patch_keep(config, args.seed, step, rank, batch["image"].shape[0], device)
        # forward, the loss over the global batch, backward (GradCache over --accum micro-batches)
        loss, terms = forward_backward(model, model_inputs(batch, args.long, keep), args.accum, autocast, loss_fn, batch)
        # distillation: DDP leaves the projection's gradient to us (see wrap_model)
        if ddp and hasattr(raw_model, "distill_proj"):
            dist.all_reduce(raw_model.distill_proj.weight.grad, op=dist.ReduceOp.AVG)
        # clip, update, clamp the temperature; the values to log stay on the device
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.clamp_logit_scale()
        step += 1
        bar.update(1)
        host = {"lr": lr, **skipped_samples(loader, master and not args.quiet)}  # (bad samples: once per epoch)
        values = {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "grad_norm": grad_norm,
                  "logit_scale": raw_model.logit_scale.detach().exp()}
        # SigLIP: the learned bias is logged too
        if config.loss == "siglip":
            values["logit_bias"] = raw_model.logit_bias.detach()
        window.append((step, host, values))

        eval_step = (args.eval_every and step % args.eval_every == 0) or step == stop
        ckpt_step = step % args.ckpt_every == 0 or step == stop
        if step % args.log_every and not eval_step and not ckpt_step and not (preempt.signum and not ddp):
            continue
        # a log step: wait for the GPU once, read the window's values, stop at the first non-finite one
        if cuda:
            torch.cuda.synchronize()
        dt, wait = time.time() - t_window, batches.pop_wait()
        timing["loop"], timing["data"] = timing["loop"] + dt, timing["data"] + wait
        rows = read_window(window, ddp)
        window = []
        rate = {"samples_per_s": len(rows) * step_batch * world / dt, "data_ms": 1000 * wait / len(rows)}
        mfu = clip.estimate_mfu(config, rate["samples_per_s"] / world) if cuda else None
        rate.update({"mfu": mfu} if mfu is not None else {})
        for s, r in rows:
            bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(r[k])), None)
            if bad:
                code = stop_bad(bad.replace("_", " "), r[bad], s, manager, master)
                cleanup(loader, logger, bar, peers, manager)
                return code
            logger.log(s, "train", **r, **rate, **({"elapsed_s": time.time() - t_start} if s == step else {}))
        bar.set_postfix(loss=f"{rows[-1][1]['loss']:.3f}", refresh=False)
        # validation and zero-shot (rank 0; the others wait at their next collective, well within PG_TIMEOUT)
        t0 = time.time()
        if evaluate is not None and eval_step:
            metrics, zero_shot_s = evaluate()
            timing["zero-shot"] += zero_shot_s
            logger.log(step, "val", **metrics)
            if step != stop and time.time() - t_plot > PLOT_EVERY_S:  # the end of the run plots once below
                logger.plot()
                t_plot = time.time()
        timing["eval"] += time.time() - t0
        # preemption: a SIGTERM / SIGINT on any rank stops every rank here, after this step's checkpoint (at the last
        # step the run is simply done)
        signum = preempt.agreed(ddp, device) if step < stop else None
        # checkpoint: weights checked finite on every rank, then (rank 0) the whole state copied to the CPU and
        # written by a background thread; the last one is written here, and waited for
        t0 = time.time()
        if ckpt_step or signum:
            if not weights_finite(raw_model):
                code = stop_bad("a weight", "not finite", step, manager, master)
                cleanup(loader, logger, bar, peers, manager)
                return code
            if master:
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "config": config.to_dict(), "args": vars(args), "world_size": world, "step": step,
                         "epoch": batches.state["epoch"], "loader": batches.state, "rng": cm.rng_state(),
                         "best_val_loss": best_val, "tokenizer": tokenizer.to_dict(), "data_fingerprint": fingerprint}
                save = manager.save if step == stop or signum else manager.save_async
                save(state, step, val_loss=metrics.get("loss") if eval_step else None)  # best.pt on a new best
                best_val = manager.best_val_loss
                # adapters: the adapters alone, small enough to share
                if args.adapters:
                    cm.save_adapters(raw_model, os.path.join(out_dir, "adapters.pt"))
        timing["final save" if step == stop else "checkpoint"] += time.time() - t0
        if signum:
            if master:
                tqdm.write(f"stopped by {signal.Signals(signum).name} after step {step}: saved "
                           f"{os.path.join(manager.dir, f'step_{step:08d}.pt')}; continue with --resume latest")
            cleanup(loader, logger, bar, peers, manager)
            return 128 + signum  # non-zero: the run is not finished (a scheduler requeues it)
        t_window = time.time()
    bar.close()
    if master:
        logger.plot()
        summary(metrics, index, log_dir, timing, args.zeroshot_data, zs_source)
    cleanup(loader, logger, None, peers, manager)
    return 0


if __name__ == "__main__":
    sys.exit(main())
