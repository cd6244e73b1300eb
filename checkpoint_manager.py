"""
Checkpoints: save atomically, keep the last N, remember the best, find the latest, load safely.

A checkpoint is one dict written with torch.save. It holds only tensors, numbers, strings, lists and
dicts, so torch.load(..., weights_only=True) can read it: loading a checkpoint never runs code from it.
On disk, under <out_dir>/ckpt/:

    step_00001000.pt   one file per save; only the newest `keep` are kept
    latest.pt          the last save (a hard link to its step file, so it costs no space)
    best.pt            the save with the lowest val loss so far

Every file is written to a temp name in the same directory (<name>.tmp<pid>), fsynced, then os.replace'd into
place (files.atomic_write), so a process killed mid-write (OOM, preemption, kill -9) leaves the previous
file whole; its stray temp file is removed by the next save (a live process's never is). Other names in the
folder (step_00000010_backup.pt, notes) are left alone: only step_<digits>.pt counts as a step file.

save_async() takes the write off the training loop: the state is copied to the CPU (the caller's tensors go
on changing), then a background thread writes it exactly as save() does. At most one write is in flight; the
next save waits for it, and wait() (call it before exiting) re-raises a failed write.

Also here, because they are about what is on disk rather than about training: loading (weights_only, partial
loads for --init, the original CLIP / OpenCLIP layout both ways), a run's folders (claim_folders: a lock while a run
writes there, and no earlier run mixed in), the RNG state, and adapters saved alone.

Left out on purpose: sharded (FSDP) checkpoints, cloud storage. Only the master process of a DDP run saves.
"""

import contextlib
import glob
import json
import os
import pickle
import random
import re
import shutil
import socket
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from files import atomic_write, pid_alive, temp_writer

# -----------------------------------------------------------------------------
# atomic writes (files.atomic_write: temp file, fsync, os.replace; links written through, devices refused)

def save_atomic(obj, path):
    """torch.save obj to path so that path is always either the old file or the complete new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)

def _point_atomic(src, dst):
    """Make dst the same file as src, atomically: a hard link under a temp name, then os.replace."""
    with atomic_write(dst) as tmp:
        try:
            os.link(src, tmp)  # no copy: latest.pt and step_N.pt share the bytes
        except OSError:
            shutil.copyfile(src, tmp)  # filesystems without hard links (some network/FUSE mounts)

# -----------------------------------------------------------------------------
# the manager

class CheckpointManager:

    def __init__(self, out_dir, keep=3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = os.path.join(out_dir, "ckpt")
        self.keep = keep
        self.best_val_loss = None
        self._thread, self._error = None, None  # the background write in flight, and its exception
        best = os.path.join(self.dir, "best.pt")
        if os.path.exists(best):
            # mmap=True reads only the small entries, not the weights, so this is cheap
            try:
                self.best_val_loss = torch.load(best, map_location="cpu", weights_only=True,
                                                mmap=True).get("best_val_loss")
            except Exception:
                pass  # an unreadable best.pt is simply beaten by the next val loss

    def step_files(self):
        """Step checkpoints, oldest first; names that are not exactly step_<digits>.pt are not ours and are ignored."""
        steps = {}
        for p in glob.glob(os.path.join(self.dir, "step_*.pt")):
            m = re.fullmatch(r"step_(\d+)\.pt", os.path.basename(p))
            if m:
                steps[p] = int(m.group(1))
        return sorted(steps, key=steps.get)

    def latest(self):
        """Path of the newest checkpoint, or None."""
        p = os.path.join(self.dir, "latest.pt")
        if os.path.exists(p):
            return p
        files = self.step_files()
        return files[-1] if files else None

    def save(self, state, step, val_loss=None):
        """Write step_<step>.pt, point latest.pt (and best.pt on a new best) at it; return its path."""
        self.wait()  # a background write first: files appear in step order
        return self._write(*self._prepare(state, step, val_loss))

    def save_async(self, state, step, val_loss=None):
        """save() in a background thread, on a CPU copy of state; returns the path it will write. Waits for the
        previous write first, so at most one is in flight."""
        self.wait()
        state = to_cpu(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking device -> host copies have landed
        args = self._prepare(state, step, val_loss)
        self._thread = threading.Thread(target=self._write_catching, args=args, daemon=True)
        self._thread.start()
        return args[1]

    def wait(self):
        """Block until the background write (if any) is on disk; re-raise its error here, in the caller."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error  # the write's own exception: a full disk's OSError names the checkpoint, in one line

    def _write_catching(self, *args):
        try:
            self._write(*args)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _prepare(self, state, step, val_loss):
        """(state with the best val loss so far, its path, whether it is a new best): cheap, in the caller."""
        # the best so far: from this manager's saves/best.pt, or carried in the state across a resume
        known = [b for b in (self.best_val_loss, state.get("best_val_loss")) if b is not None]
        best = min(known) if known else None
        is_best = val_loss is not None and (best is None or val_loss < best)
        if is_best:
            best = float(val_loss)
        self.best_val_loss = best
        state = {**state, "best_val_loss": best}  # shallow copy: the caller's dict is not changed
        return state, os.path.join(self.dir, f"step_{step:08d}.pt"), is_best

    def _write(self, state, path, is_best):
        os.makedirs(self.dir, exist_ok=True)
        for name in os.listdir(self.dir):  # temp files left by a save killed mid-write (never a live writer's)
            pid = temp_writer(name)
            if pid is not None and (pid == os.getpid() or not pid_alive(pid)):
                os.unlink(os.path.join(self.dir, name))
        save_atomic(state, path)
        _point_atomic(path, os.path.join(self.dir, "latest.pt"))
        if is_best:
            _point_atomic(path, os.path.join(self.dir, "best.pt"))
        # keep-N: drop the oldest step files (latest/best are their own links, so they survive)
        old = [p for p in self.step_files() if p != path]
        for p in old[:max(0, len(old) - (self.keep - 1))]:
            os.unlink(p)
        return path

    def newest_finite(self):
        """The newest step file whose model weights are all finite (read with mmap, tensor by tensor), or None:
        what to name as the last good checkpoint after a NaN, without trusting the newest one blindly."""
        self.wait()
        for p in reversed(self.step_files()):
            try:
                model = torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("model", {})
            except Exception:
                continue  # unreadable: not good either
            if model and all(torch.isfinite(t).all() for t in model.values() if torch.is_floating_point(t)):
                return p
        return None


def to_cpu(obj):
    """A copy of a (nested) state with every tensor on the CPU: training goes on changing the originals in place.
    Device tensors are copied with non_blocking (into pinned memory); synchronize before reading them."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj

# -----------------------------------------------------------------------------
# loading

def load(path, map_location="cpu"):
    """Load a checkpoint dict with weights_only=True; a clear error for a missing or bad file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if isinstance(map_location, (str, torch.device)):  # a device this machine lacks is not a corrupt file
        try:
            device = torch.device(map_location)
            torch.empty(0, device=device)  # raises for cuda without CUDA, cuda:7 on a 2-GPU box, "gpu", ...
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot load checkpoint {path} onto device {map_location}: that device is not "
                             f"available here ({first[:200]})") from None
        map_location = "cpu" if device.type == "cpu" else device  # torch.load knows "cpu" but not "cpu:0"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # not a torch zip archive at all: garbage, not forbidden objects
                raise ValueError(f"cannot load checkpoint {path}: corrupt, truncated or not a torch file") from e
        # holds objects weights_only refuses to build: never fall back to weights_only=False
        why = [l for l in str(e).splitlines() if "GLOBAL" in l or "Unsupported" in l]
        raise ValueError(f"cannot load checkpoint {path}: it holds objects other than tensors, "
                         f"numbers, strings, lists and dicts ({why[0].strip() if why else e})") from e
    except Exception as e:  # truncated or corrupt zip archive, not a torch file at all, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load checkpoint {path}: corrupt, truncated or not a torch file "
                         f"({type(e).__name__}: {first[:200]})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"cannot load checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt

def resolve(resume, out_dir):
    """--resume value -> checkpoint path: "latest" finds the newest in <out_dir>/ckpt, "auto" the newest valid one
    there or None (start fresh: a launch that can be re-run as it is), else a file path."""
    if not resume:
        return None
    if resume == "auto":
        return newest_valid(out_dir)
    if resume == "latest":
        p = CheckpointManager(out_dir).latest()
        if p is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {os.path.join(out_dir, 'ckpt')}")
        return p
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
    return resume

RESUME_KEYS = ("model", "optimizer", "config", "step", "loader", "rng")  # what a run needs to continue exactly

def newest_valid(out_dir):
    """The step file with the highest step in <out_dir>/ckpt that loads (weights_only, mmap: only its index is
    read) and holds a run's whole state; latest.pt only when no step file does; None when there is none. Newest by
    step, not by latest.pt: a kill between writing step_N.pt and re-pointing latest.pt leaves step_N the newest."""
    mgr = CheckpointManager(out_dir)
    for p in list(reversed(mgr.step_files())) + [os.path.join(mgr.dir, "latest.pt")]:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # missing, truncated, not a torch file: not valid, try the next older one
            continue
        if isinstance(ckpt, dict) and all(k in ckpt for k in RESUME_KEYS):
            return p
    return None

def strip_prefixes(state_dict, prefixes=("module.", "_orig_mod.")):
    """Remove the leading wrappers DDP (module.) and torch.compile (_orig_mod.) add to every key."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(prefixes):  # any order, any repetition: module._orig_mod.module.x -> x
            k = k[len(next(p for p in prefixes if k.startswith(p))):]
        out[k] = v
    return out

class LoadReport(NamedTuple):
    missing: list      # in the model, not in the checkpoint (left at their init)
    unexpected: list   # in the checkpoint, not in the model (dropped)
    ignored: list      # in the checkpoint, dropped because they matched ignore_keys
    mismatched: list   # in both, but with different shapes (left at their init)

def load_partial(model, state_dict, ignore_keys=(), quiet=False):
    """Load what fits: drop keys matching any ignore_keys regex (re.search) and shape mismatches."""
    sd = strip_prefixes(state_dict)
    patterns = [re.compile(p) for p in ignore_keys]
    ignored = [k for k in sd if any(p.search(k) for p in patterns)]
    own = model.state_dict()
    mismatched = [k for k in sd if k not in ignored and k in own and own[k].shape != sd[k].shape]
    skip = set(ignored) | set(mismatched)
    res = model.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=False)
    report = LoadReport(missing=[k for k in res.missing_keys if k not in skip],
                        unexpected=list(res.unexpected_keys), ignored=ignored, mismatched=mismatched)
    if not quiet:
        def names(ks):
            return f" ({', '.join(ks[:4])}{', ...' if len(ks) > 4 else ''})" if ks else ""
        print(f"load_partial: loaded {len(sd) - len(skip) - len(report.unexpected)}/{len(own)} tensors"
              + "".join(f"; {name} {len(ks)}{names(ks)}" for name, ks in report._asdict().items()))
    return report

def diff_configs(a, b, prefix=""):
    """Fields that differ between two config dicts, as 'name: saved -> flags'."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out.append(diff_configs(a[k], b[k], f"{prefix}{k}."))
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return ", ".join(x for x in out if x)


# -----------------------------------------------------------------------------
# the original CLIP / OpenCLIP state dict, both ways (what --init reads; bench/ compares against OpenCLIP with it)

# ours <-> theirs; block keys are handled by BLOCK_KEYS, projections are transposed (they store x @ proj)
OPENAI_KEYS = {
    "visual.patch_embed.weight": "visual.conv1.weight",
    "visual.cls_token": "visual.class_embedding",
    "visual.pos_embed": "visual.positional_embedding",
    "visual.ln_pre.weight": "visual.ln_pre.weight", "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj.weight": "visual.proj",
    "text.token_embed.weight": "token_embedding.weight",
    "text.pos_embed": "positional_embedding",
    "text.ln_final.weight": "ln_final.weight", "text.ln_final.bias": "ln_final.bias",
    "text.proj.weight": "text_projection",
    "logit_scale": "logit_scale",
}
BLOCK_KEYS = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight", "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight", "mlp.c_proj.bias": "mlp.c_proj.bias",
}
TOWER_PREFIX = {"visual.blocks.": "visual.transformer.resblocks.", "text.blocks.": "transformer.resblocks."}

def to_openai_state_dict(model):
    """Our CLIP model's weights under the original CLIP / OpenCLIP names (linear heads, the softmax loss only)."""
    if model.config.head != "linear":
        raise ValueError("only head='linear' models have an original-CLIP equivalent")
    if model.config.loss != "clip":
        raise ValueError("a SigLIP model (loss='siglip') has a learned logit bias that original CLIP has not, "
                         "and its logit scale means something else; it has no original-CLIP equivalent")
    out = {}
    for k, v in model.state_dict().items():
        if k in OPENAI_KEYS:
            out[OPENAI_KEYS[k]] = v.t() if k.endswith("proj.weight") else v
            continue
        m = re.match(r"(visual\.blocks\.|text\.blocks\.)(\d+)\.(.+)", k)
        if m is None or m.group(3) not in BLOCK_KEYS:
            raise ValueError(f"no original-CLIP name for {k!r} (adapters and polytope heads have none)")
        out[TOWER_PREFIX[m.group(1)] + m.group(2) + "." + BLOCK_KEYS[m.group(3)]] = v
    return out

def from_openai_state_dict(sd, quick_gelu=True, vision_heads=None, text_heads=None, pool="eot"):
    """Our CLIP model from an original CLIP / OpenCLIP ViT state dict, the config inferred from the shapes.
    Head counts are not in the shapes: CLIP's rule is width // 64 (override with vision_heads/text_heads)."""
    from clip import CLIP, CLIPConfig, TextConfig, VisionConfig  # lazy, as in load_model
    sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.conv1.weight" not in sd:
        raise ValueError("not a CLIP ViT state dict: 'visual.conv1.weight' is missing (ResNet towers are not supported)")
    count = lambda prefix: len({k.split(".")[len(prefix.split(".")) - 1] for k in sd if k.startswith(prefix)})

    def heads(given, width, tower):  # width // 64 only where it divides: 0 heads is not what went wrong
        if not given and width % 64:
            raise ValueError(f"cannot infer the {tower} tower's head count from its width {width} (CLIP's rule, "
                             f"width // 64, needs a multiple of 64): give {tower}_heads")
        return given or width // 64
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    ctx, tw = sd["positional_embedding"].shape
    config = CLIPConfig(
        VisionConfig(img_size=grid * patch, patch_size=patch, width=vw,
                     layers=count("visual.transformer.resblocks."), heads=heads(vision_heads, vw, "vision")),
        TextConfig(vocab_size=sd["token_embedding.weight"].shape[0], context_length=ctx, width=tw,
                   layers=count("transformer.resblocks."), heads=heads(text_heads, tw, "text"), pool=pool),
        embed_dim=sd["text_projection"].shape[1], quick_gelu=quick_gelu)
    model = CLIP(config)
    ours = {}
    theirs_to_ours = {v: k for k, v in OPENAI_KEYS.items()}
    block_back = {v: k for k, v in BLOCK_KEYS.items()}
    for k, v in sd.items():
        if k in theirs_to_ours:
            ours[theirs_to_ours[k]] = v.t() if theirs_to_ours[k].endswith("proj.weight") else v
            continue
        m = re.match(r"(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)", k)
        if m is None or m.group(3) not in block_back:
            raise ValueError(f"unexpected key in the original state dict: {k!r}")
        prefix = {v: k for k, v in TOWER_PREFIX.items()}[m.group(1)]
        ours[prefix + m.group(2) + "." + block_back[m.group(3)]] = v
    model.load_state_dict(ours, strict=True)  # every tensor is loaded, or this raises
    return model


# Head counts are not in a state dict's shapes. CLIP's towers have heads of width 64, except OpenCLIP's ViT-H/g/bigG/e-14
# image towers (widths 1280, 1408, 1664, 1792: 16 heads of width 80-112); their text towers keep width 64
WIDE_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16, 1792: 16}

def load_init(path, quick_gelu, heads=None, quiet=False):
    """--init file -> (state dict, config dict, tokenizer dict or None): our checkpoint, or an original CLIP /
    OpenCLIP ViT state dict (converted by from_openai_state_dict). heads: (image, text) head counts for the latter
    (--init_heads); None infers them from the widths and prints what it assumed, or raises when a width cannot say."""
    sd = load(path)
    if "model" in sd and "config" in sd:
        return strip_prefixes(sd["model"]), sd["config"], sd.get("tokenizer")
    sd = strip_prefixes(sd.get("state_dict", sd))
    # (a state dict without these keys: from_openai_state_dict says what is missing)
    if heads is None and {"visual.conv1.weight", "positional_embedding"} <= sd.keys():
        vw, tw = sd["visual.conv1.weight"].shape[0], sd["positional_embedding"].shape[1]
        odd = [f"{tower} width {w}" for tower, w in (("image", vw), ("text", tw)) if w % 64]
        if odd:
            raise ValueError(f"--init {path}: an original CLIP state dict has no head counts, and they cannot be "
                             f"inferred ({', '.join(odd)}: not a multiple of CLIP's head width 64): give them with "
                             f"--init_heads IMAGE TEXT")
        heads = (WIDE_VISION_HEADS.get(vw, vw // 64), tw // 64)
        if not quiet:
            print(f"--init {path}: an original CLIP state dict has no head counts; assumed {heads[0]} image heads (width "
                  f"{vw}) and {heads[1]} text heads (width {tw}); if wrong, give them with --init_heads IMAGE TEXT")
    vision_heads, text_heads = heads or (None, None)
    model = from_openai_state_dict(sd, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads)
    return model.state_dict(), model.config.to_dict(), None


def load_model(path, map_location="cpu"):
    """Rebuild the CLIP model a checkpoint was trained with; returns (model in eval mode, ckpt dict)."""
    from clip import CLIP, CLIPConfig  # lazy: the rest of this file does not need the model code
    ckpt = load(path, map_location)
    for key in ("config", "model"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no '{key}' entry; was it saved by train.py?")
    model = CLIP(CLIPConfig.from_dict(ckpt["config"]))
    model.load_state_dict(strip_prefixes(ckpt["model"]))  # strict: every key must match
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), ckpt

# -----------------------------------------------------------------------------
# a run's folders (<out>/<run>, <log_dir>/<run>) belong to one run: a lock while it runs, no earlier run mixed in

LOCK = "run.lock"  # in each of a run's folders while it runs: {"pid", "host", "since"}

def earlier_run(out_dir, log_dir):
    """What an earlier run left in these folders, in words ('' when nothing): checkpoints, logged metrics."""
    manager, found = CheckpointManager(out_dir), []
    if manager.step_files():
        found.append(f"checkpoints up to {os.path.basename(manager.step_files()[-1])}")
    elif manager.latest() or os.path.exists(os.path.join(manager.dir, "best.pt")):
        found.append("checkpoints")
    metrics = os.path.join(log_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        found.append(f"metrics in {metrics}")
    return " and ".join(found)

def read_lock(path):
    """A lock file's {"pid", "host", "since"}, or None when it is missing, being written or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            lock = json.load(f)
        return lock if isinstance(lock, dict) and isinstance(lock.get("pid"), int) else None
    except (OSError, ValueError):
        return None

def take_lock(folder):
    """Create <folder>/run.lock naming this process; None, or the line saying which live run holds it. A lock whose
    holder is dead (this host, its pid gone: killed, out of memory) is taken over. Raises OSError when the folder
    cannot be written (read-only, full): found now, not at the first checkpoint."""
    path, host = os.path.join(folder, LOCK), socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # fails when it exists: one winner
        except FileExistsError:
            holder = read_lock(path)
            if holder is None or holder.get("host") != host or pid_alive(holder["pid"]):
                who = f"pid {holder['pid']} on {holder.get('host')}, since {holder.get('since')}" if holder else "unreadable lock"
                gone = "" if holder and holder.get("host") == host else f"; if no run uses it, delete {path}"
                return f"{folder} is in use by another run ({who}): wait for it to end or use another --run_name{gone}"
            # a dead holder: move its lock aside under our own name (one taker wins), then try again
            aside = f"{path}.stale{os.getpid()}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another run moved it first
            if read_lock(aside) != holder:  # a live run's fresh lock moved by mistake: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
            os.unlink(aside)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return None
    return f"{folder}: could not take {path} (other runs are starting there)"

def release_lock(path):
    if (read_lock(path) or {}).get("pid") == os.getpid():
        os.unlink(path)

def claim_folders(out_dir, log_dir, resume, overwrite):
    """Make this run's folders its own: made, writable and locked, and holding no earlier run unless this one
    continues it (--resume latest, or a checkpoint inside <out>/<run>); --overwrite moves an earlier run aside
    (never deletes it). Returns (lock files to release at the end, None) or ([], the line saying why not)."""
    folders, locks = list(dict.fromkeys(os.path.abspath(f) for f in (out_dir, log_dir))), []
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            why = take_lock(folder)
        except OSError as e:
            why = f"cannot write in {folder} ({e.strerror}): choose --out and --log_dir folders this run can write"
        if why:
            for lock in locks:
                release_lock(lock)
            return [], why
        locks.append(os.path.join(folder, LOCK))
    inside = resume is not None and os.path.abspath(resume).startswith(os.path.abspath(out_dir) + os.sep)
    earlier = "" if resume == "latest" or inside else earlier_run(out_dir, log_dir)
    if not earlier:
        return locks, None
    for lock in locks:
        release_lock(lock)
    if resume is not None:
        return [], f"{out_dir} holds another run ({earlier}); --resume {resume} would mix the two: use another --run_name"
    if not overwrite:
        again = "continue it with --resume latest (or --resume auto), " if "checkpoints" in earlier else ""
        return [], (f"{out_dir} already holds a run ({earlier}): {again}give this run another --run_name, or start "
                    f"over with --overwrite (the earlier run is moved aside, not deleted)")
    stamp, moved = time.strftime("%Y%m%d-%H%M%S"), []
    for folder in folders:
        if os.path.isdir(folder) and os.listdir(folder):
            aside, i = f"{folder}.old-{stamp}", 1
            while os.path.exists(aside):
                aside, i = f"{folder}.old-{stamp}-{i}", i + 1
            os.rename(folder, aside)
            moved.append(aside)
    print(f"moved the earlier run aside (not deleted) to {' and '.join(moved)}")
    return claim_folders(out_dir, log_dir, resume, overwrite=False)

# -----------------------------------------------------------------------------
# RNG state, in weights_only-safe form (tensors, lists, numbers, strings)

def rng_state():
    """torch (+ every cuda device), numpy's global RNG and python's random, as plain objects."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),  # ByteTensor
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": [version, list(internal), gauss_next],  # gauss_next is None or a float
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # list of ByteTensor, one per device
    return state

def set_rng_state(state):
    """Restore what rng_state() captured, exactly."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])

# -----------------------------------------------------------------------------
# adapters alone: a few hundred KB instead of the whole model (the base weights come from the base checkpoint)

def adapter_state_dict(model):
    """Only the adapter tensors (keys containing "adapter_"), wrapper prefixes stripped."""
    return {k: v for k, v in strip_prefixes(model.state_dict()).items() if "adapter_" in k}

def save_adapters(model, path):
    """Write {"adapters": the adapter tensors, "config": the model's config} atomically."""
    sd = adapter_state_dict(model)
    if not sd:
        raise ValueError("the model has no adapters to save (build it with config.adapters > 0)")
    save_atomic({"adapters": sd, "config": model.config.to_dict()}, path)

def load_adapters(model, path, quiet=False):
    """Load save_adapters' file into a model that has adapters; returns a LoadReport whose `missing` lists the
    model's adapter tensors the file did not have (left at their init, which is the identity)."""
    ckpt = load(path)
    if "adapters" not in ckpt:
        raise ValueError(f"{path} has no 'adapters' entry; was it written by save_adapters?")
    own = [k for k in model.state_dict() if "adapter_" in k]
    if not own:
        raise ValueError("the model has no adapters to load into (build it with config.adapters > 0)")
    r = load_partial(model, ckpt["adapters"], quiet=True)
    report = r._replace(missing=[k for k in r.missing if "adapter_" in k])  # the base weights are not the file's job
    if not quiet:
        print(f"load_adapters: loaded {len(own) - len(report.missing) - len(report.mismatched)}/{len(own)} adapter "
              f"tensors" + "".join(f"; {name} {len(ks)}" for name, ks in report._asdict().items() if ks))
    return report
