"""
Per-step host overhead of train.py's loop on a CPU: the wall time of a step minus the time spent in the model's
forward/backward, gradient clipping and the optimizer step. The `micro` preset keeps that compute small, so what
the loop itself costs per step (fetching the batch, logging, reading values back, progress bar) shows.

How: train.main runs unchanged on a small synthetic set (32 px, 1 loader worker, no mid-run eval or checkpoint);
train.forward_backward and torch.nn.utils.clip_grad_norm_ are wrapped with timers and the optimizer step is timed
with torch's global optimizer step hooks. A step is the interval between two consecutive forward_backward starts;
overhead = interval - (forward/backward + clip + optimizer). Of it, `loader` is the time spent getting batches from
the loader (each next() on train.iter_forever: the worker hand-off through shared memory, the next task sent), and
`loop` the rest: the loop's own bookkeeping (schedule, logging, reading values back, progress bar). Medians over the
steps (epoch starts, where the loader restarts its worker, are in the mean and p90, not the median).

    OMP_NUM_THREADS=1 python bench/step_overhead.py --label after
    git show REV:train.py > /tmp/train_before.py
    OMP_NUM_THREADS=1 python bench/step_overhead.py --train_py /tmp/train_before.py --label before

Appends one JSON line per run to bench/results/step_overhead.jsonl.
"""

import importlib.util
import os
import statistics
import subprocess
import tempfile
import time

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path
import prep_dataset

ROOT = common.ROOT


def load_train(path):
    """train.py (or an older copy of it) as a module, resolving its imports from this repository."""
    spec = importlib.util.spec_from_file_location("train_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = common.parser(__doc__)
    p.add_argument("--train_py", default=os.path.join(ROOT, "train.py"))
    p.add_argument("--label", default="after")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num_train", type=int, default=2048)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--out", default=os.path.join(common.RESULTS, "step_overhead.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(1)
    train = load_train(args.train_py)

    starts, compute = [], []  # per step: forward_backward start time, seconds of compute
    fb = train.forward_backward

    def timed_fb(*a, **k):
        starts.append(time.perf_counter())
        out = fb(*a, **k)
        compute.append(time.perf_counter() - starts[-1])
        return out
    train.forward_backward = timed_fb

    clip_grad = torch.nn.utils.clip_grad_norm_

    def timed_clip(*a, **k):
        t0 = time.perf_counter()
        out = clip_grad(*a, **k)
        compute[-1] += time.perf_counter() - t0
        return out
    torch.nn.utils.clip_grad_norm_ = timed_clip
    t_opt = {}
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(lambda *a: t_opt.__setitem__("t0", time.perf_counter()))
    register_optimizer_step_post_hook(lambda *a: compute.__setitem__(-1, compute[-1] + time.perf_counter() - t_opt["t0"]))

    waits = []  # (start, seconds) of each next() on the loader's batches
    forever = train.iter_forever

    def timed_forever(loader):
        batches = forever(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches)
            waits.append((t0, time.perf_counter() - t0))
            yield batch
    train.iter_forever = timed_forever

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        prep_dataset.main(["synthetic", "--out", data, "--num_train", str(args.num_train), "--num_val", "64",
                           "--img_size", "32", "--workers", "1", "--quiet"])
        t0 = time.perf_counter()
        rc = train.main(["--data", data, "--preset", "micro", "--batch", str(args.batch), "--epochs", str(args.epochs),
                         "--workers", "1", "--eval_every", "0", "--ckpt_every", "1000000", "--out", f"{tmp}/out",
                         "--log_dir", f"{tmp}/logs", "--run_name", "bench", "--quiet"])
        wall = time.perf_counter() - t0
    assert rc == 0, f"train.main returned {rc}"
    interval = [b - a for a, b in zip(starts, starts[1:])]  # step i: from its forward to the next one's
    over = [i - c for i, c in zip(interval, compute)]
    # the loader's time inside each step's interval (train.py may fetch one batch ahead: match by time, not index)
    loader = [sum(d for t, d in waits if a <= t < b) for a, b in zip(starts, starts[1:])]
    loop = [o - w for o, w in zip(over, loader)]
    ms = lambda xs: round(1000 * statistics.median(xs), 3)
    rec = {**common.machine("time"), "label": args.label, "train_py": os.path.relpath(args.train_py, ROOT)
           if args.train_py.startswith(ROOT) else args.train_py,
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
           **common.machine("host", "torch", "threads"),
           "preset": "micro", "batch": args.batch, "steps": len(starts),
           "step_ms_median": ms(interval), "compute_ms_median": ms(compute), "overhead_ms_median": ms(over),
           "loader_ms_median": ms(loader), "loop_ms_median": ms(loop), "overhead_ms_mean": round(1000 * statistics.mean(over), 3),
           "overhead_ms_p90": round(1000 * sorted(over)[int(0.9 * len(over))], 3), "wall_s": round(wall, 1),
           **common.machine("load_avg_1m")}
    print(f"{args.label}: {rec['steps']} steps, step {rec['step_ms_median']} ms, compute {rec['compute_ms_median']} ms, "
          f"host overhead {rec['overhead_ms_median']} ms median ({rec['overhead_ms_mean']} mean, "
          f"{rec['overhead_ms_p90']} p90); of it the loader {rec['loader_ms_median']} ms, the loop itself {rec['loop_ms_median']} ms")
    common.append_jsonl(args.out, rec)


if __name__ == "__main__":
    main()
