"""
Training logs: a metrics.jsonl file, a compact console line, and PNG plots.

    logs/<run>/config.json      the run's config, written once (atomically)
    logs/<run>/metrics.jsonl    one JSON object per line: {"step", "split", ...metrics}
    logs/<run>/loss.png         train + val loss (log y); also lr.png, grad_norm.png, logit_scale.png,
                                and eval.png for any extra eval metric (zeroshot_top1, i2t_R@1, ...)

Resuming at step S keeps the records with step <= S and appends after them, so a resumed run's log
has every step exactly once. A line that is not such a record (the half-written last line of a killed
run, a hand edit) is skipped, counted and named in one warning line, when reading and on resume.
Re-plot or compare runs from the shell (bad input there is one error line and exit status 2):

    python logger.py logs/a                      # re-plot logs/a/*.png
    python logger.py logs/a logs/b --out c.png   # both runs' losses on one figure

Plots use matplotlib's object API (Figure + the Agg canvas), not pyplot: no display is needed, the
global backend is left alone (importing this in a notebook changes nothing) and no figure is kept
alive in pyplot's registry. Left out on purpose: TensorBoard / wandb, live plotting.
"""

import argparse
import collections
import json
import os
import sys

from tqdm import tqdm

from files import atomic_write, regular_target

# keys plotted on their own figure; anything else in a val/eval record is an eval metric (eval.png)
STANDARD = {"step", "split", "loss", "lr", "grad_norm", "logit_scale", "samples_per_s", "elapsed_s",
            "mfu", "epoch"}

# -----------------------------------------------------------------------------
# files

def write_atomic(path, text):
    """text -> path, whole or not at all (files.atomic_write: a link written through, a device refused)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def read_metrics(path):
    """All records of a metrics.jsonl: JSON objects with a numeric "step" and a string "split". Any other line is
    skipped and counted, with one warning line per file: a broken last line (a run killed mid-write), a line
    that is not JSON or not UTF-8, or a JSON value that is not such a record (`[1, 2]`, `"x"`, no step)."""
    records, bad = [], collections.Counter()
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is one bad line, not a UnicodeDecodeError
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                bad["not JSON"] += 1
                continue
            if not isinstance(r, dict):
                bad["not a JSON object"] += 1
            elif not _is_number(r.get("step")):
                bad["no numeric step"] += 1
            elif not isinstance(r.get("split"), str):
                bad["no split"] += 1
            else:
                records.append(r)
    if bad:
        why = ", ".join(f"{n} {reason}" for reason, n in bad.items())
        print(f"warning: {path}: skipped {sum(bad.values())} unreadable line(s) ({why})", file=sys.stderr)
    return records

def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)

def _number(v):
    # tensors / numpy scalars -> python numbers, so json writes 3.2 and not a repr
    if hasattr(v, "item"):
        v = v.item()
    return v

# -----------------------------------------------------------------------------
# the logger

# the eta's step rate is over the last 20 log windows: 200 steps at the default --log_every 10, so at the default
# --eval_every 200 the span always holds one eval, its time spread evenly over the steps
ETA_POINTS = 21


def eta_s(points, steps_left):
    """Seconds left at the measured step rate: points are (elapsed_s, step) pairs, oldest first, each taken at the
    end of a log window; the rate is over the whole span, so an eval or checkpoint pause inside it counts as the
    share of time it takes. None until two points (the first window holds the compile and warm-up)."""
    if len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return max(0, steps_left) * (t1 - t0) / (s1 - s0)


class Logger:

    def __init__(self, log_dir, config=None, resume_step=None, total_steps=None, print_every=10,
                 quiet=False, enabled=True):
        self.enabled = enabled  # False on non-master DDP ranks: every method does nothing
        if not enabled:
            return
        self.log_dir, self.total_steps, self.print_every, self.quiet = log_dir, total_steps, print_every, quiet
        os.makedirs(log_dir, exist_ok=True)
        if config is not None:
            write_atomic(os.path.join(log_dir, "config.json"), json.dumps(config, indent=2, default=str) + "\n")
        self.path = regular_target(os.path.join(log_dir, "metrics.jsonl"))  # appended to: a FIFO would block
        if resume_step is None:
            open(self.path, "w").close()  # a fresh run starts a fresh log
        elif os.path.exists(self.path):
            # resume: drop what was logged after the checkpoint; those steps are about to be redone
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.f = open(self.path, "a")
        self.n_train = 0
        # (elapsed_s, step) at the last ETA_POINTS log steps: the step rate the eta uses. Not the wall clock at each
        # log() call: train.py logs a whole window of steps at once, so that clock would credit a window's time to
        # the steps of two windows and halve the eta
        self.times = collections.deque(maxlen=ETA_POINTS)

    def log(self, step, split="train", **metrics):
        """Append {"step", "split", **metrics}; print a train line every print_every calls, val/eval always."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _number(v) for k, v in metrics.items()}}
        try:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()  # a crash loses at most the line being written
        except OSError as e:  # a full disk's error names no file: say which
            e.filename = e.filename or self.path
            raise
        if split == "train":
            if _is_number(record.get("elapsed_s")):  # train.py: on the last step of each log window
                self.times.append((record["elapsed_s"], record["step"]))
            self.n_train += 1
            if self.n_train % self.print_every != 0:
                return
        if not self.quiet:
            tqdm.write(self.format(record))  # tqdm.write keeps an active progress bar intact

    def format(self, r):
        """step 120/1000 | loss 3.2154 | lr 2.9e-04 | gnorm 1.23 | ... (only the fields present)."""
        step = f"step {r['step']}" + (f"/{self.total_steps}" if self.total_steps else "")
        parts = [step] if r["split"] == "train" else [f"{r['split']} {step}"]
        fmt = {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.1e}"), "grad_norm": ("gnorm", "{:.2f}"),
               "logit_scale": ("scale", "{:.1f}"), "data_ms": ("data_ms", "{:.1f}")}  # a wait under 0.1 ms is noise
        for k, v in r.items():
            if k in ("step", "split", "samples_per_s", "mfu", "elapsed_s"):
                continue
            name, f = fmt.get(k, (k, "{:.4g}"))
            parts.append(f"{name} {f.format(v)}" if isinstance(v, (int, float)) else f"{name} {v}")
        if "samples_per_s" in r:
            parts.append(f"{r['samples_per_s']:.0f} samples/s")
        if "mfu" in r:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")  # mfu is logged as a fraction of peak
        left = eta_s(self.times, self.total_steps - r["step"]) if r["split"] == "train" and self.total_steps else None
        if left is not None:
            h, m, s = int(left) // 3600, int(left) % 3600 // 60, int(left) % 60
            parts.append("eta " + (f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"))
        return " | ".join(parts)

    def plot(self):
        """Re-draw this run's PNGs from metrics.jsonl."""
        if not self.enabled:
            return []
        self.f.flush()
        return plot_run(self.log_dir)

    def close(self):
        if self.enabled and not self.f.closed:
            self.f.close()

# -----------------------------------------------------------------------------
# plots

def _series(records, key, split):
    pts = [(r["step"], r[key]) for r in records if r["split"] == split and _is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]

def save_figure(fig, path):
    # atomically (files.atomic_write), so an image viewer never shows a half-written PNG
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)

def _figure(title, ylabel):
    from matplotlib.figure import Figure  # here: a training process that never plots never pays its ~1 s import
    fig = Figure(figsize=(7, 4), tight_layout=True)  # no pyplot: freed as soon as it goes out of scope
    ax = fig.add_subplot()
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax

def _plot_lines(ax, lines, log):
    """lines: (steps, values, label, style kwargs); log y only when every value is positive."""
    for steps, ys, label, kw in lines:
        ax.plot(steps, ys, label=label, **kw)
    if log and all(y > 0 for _, ys, _, _ in lines for y in ys):
        ax.set_yscale("log")
    ax.legend()

def plot_run(log_dir, records=None):
    """Write loss/lr/grad_norm/logit_scale/eval PNGs for one run (records: read from its metrics.jsonl unless
    given); a plot with no data is skipped. Returns the paths written."""
    if records is None:
        records = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    written = []
    plots = [("loss.png", "loss", "loss", [("train", {"lw": 1}), ("val", {"marker": "o"})], True),
             ("lr.png", "learning rate", "lr", [("train", {})], False),
             ("grad_norm.png", "gradient norm (before clipping)", "grad_norm", [("train", {"lw": 1})], True),
             ("logit_scale.png", "logit scale (exp of the learned temperature)", "logit_scale",
              [("train", {})], False)]
    for fname, title, key, splits, log in plots:
        lines = [(*_series(records, key, s), s, kw) for s, kw in splits]
        lines = [l for l in lines if l[0]]
        if lines:
            fig, ax = _figure(title, key)
            _plot_lines(ax, lines, log)
            save_figure(fig, os.path.join(log_dir, fname))
            written.append(fname)
    # eval.png: every other numeric metric of the val/eval records (zeroshot_top1, i2t_R@1, ...)
    extra = sorted({(r["split"], k) for r in records if r["split"] != "train"
                    for k, v in r.items() if k not in STANDARD and _is_number(v)})
    if extra:
        fig, ax = _figure("eval metrics", "value")
        _plot_lines(ax, [(*_series(records, k, s), f"{s}/{k}", {"marker": "o"}) for s, k in extra], False)
        save_figure(fig, os.path.join(log_dir, "eval.png"))
        written.append("eval.png")
    return [os.path.join(log_dir, f) for f in written]

def plot_runs(run_dirs, out_path, records=None):
    """Several runs' train (solid) and val (dashed, dots) loss on one figure, labelled by directory (records:
    one list per run, read from each metrics.jsonl unless given). Returns out_path, or None when no run has a loss."""
    fig, ax = _figure("loss", "loss")
    lines = []
    for i, d in enumerate(run_dirs):
        records_i = read_metrics(os.path.join(d, "metrics.jsonl")) if records is None else records[i]
        name, color = os.path.basename(os.path.normpath(d)), f"C{i % 10}"
        for split, kw in (("train", {"lw": 1}), ("val", {"ls": "--", "marker": "o"})):
            steps, ys = _series(records_i, "loss", split)
            if steps:
                lines.append((steps, ys, f"{name} {split}", {"color": color, **kw}))
    if not lines:
        return None
    _plot_lines(ax, lines, True)
    save_figure(fig, out_path)
    return out_path

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-plot a run's PNGs, or compare several runs' losses.")
    parser.add_argument("runs", nargs="+", help="log directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="comparison figure (default: compare.png in the cwd)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None or len(args.runs) == 1 else "compare.png"
    if out is not None:  # checked before any plotting: a bad --out is not found after the work is done
        folder = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out) or not os.path.basename(out):
            parser.error(f"--out {out} is a directory; give a file name such as {os.path.join(out, 'compare.png')}")
        if not os.path.isdir(folder):
            parser.error(f"--out {out}: folder {folder} does not exist")
    records = []
    for d in args.runs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isdir(d):
            parser.error(f"{d}: no such run directory (a folder holding metrics.jsonl)")
        if not os.path.isfile(path):
            parser.error(f"{d}: no metrics.jsonl in this directory")
        records.append(read_metrics(path))
        if not records[-1]:
            parser.error(f"{path} has no records (empty, or no line is a {{\"step\", \"split\", ...}} object)")
    try:
        if out is None:
            written = plot_run(args.runs[0], records[0])
            if not written:
                parser.error(f"{args.runs[0]}: nothing to plot (no loss, lr, grad_norm, logit_scale or eval metric)")
        else:
            written = [plot_runs(args.runs, out, records)]
            if written[0] is None:
                parser.error("nothing to compare: no run has a train or val loss")
    except OSError as e:  # a read-only log folder, a full disk: one line, not a traceback
        parser.error(f"cannot write {e.filename or out}: {e.strerror or e}")
    for p in written:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
