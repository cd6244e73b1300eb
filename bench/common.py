"""
What the benchmarks in bench/ all do the same way, written once. A script imports this before any module of the
repository:

    import common  # first: the repository root goes ahead of bench/ on sys.path
    import train

- sys.path: `python bench/x.py` puts bench/ first on sys.path, where bench/tokenizer.py (a benchmark) would shadow
  the top-level tokenizer.py; the repository root goes in front of it.
- parser(doc), add_threads / set_threads: argparse with the docstring as --help, torch threads per process.
- machine(*fields), append_jsonl, read_jsonl: a result line with where and when it was measured.
- run_train(argv), epochs_for(steps, batches): train.main in this process, for an exact number of steps.
- run_log(log_dir, name), step_seconds(records, batch): what a finished run wrote to its metrics.jsonl.
- md_table(head, rows, align), write_text(path, text), command(): the tables of bench/results/*.md (a reading
  written by hand below a `<!-- reading:` line survives a regenerated table).

Nothing heavy is imported at the top: recipe.py's digit writer imports this file in a venv that has no torch.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")  # what the benchmarks report (committed)
DATA = os.path.join(ROOT, "bench", ".data")  # what they make once and reuse: shards, runs (git-ignored)


# -----------------------------------------------------------------------------
# the command line

def parser(doc, whole=False):
    """The script's ArgumentParser; --help describes it with the docstring's first paragraph (whole: all of it,
    laid out as written)."""
    if whole:
        return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_threads(p, default=1):
    p.add_argument("--threads", type=int, default=default, help="torch threads in this process (0: torch's default); "
                   "on a shared 2-core box two spinning threads make small steps many times slower")


def set_threads(n):
    """torch's intra-op threads in this process; 0 or None leaves torch's default."""
    import torch
    if n:
        torch.set_num_threads(n)


def command(argv=None):
    """How this script was run, for the head of a results file: `python bench/NAME.py ARGS`."""
    return " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT),
                     *(sys.argv[1:] if argv is None else argv)])


# -----------------------------------------------------------------------------
# result lines (bench/results/*.jsonl)

def machine(*fields):
    """Where and when a result was measured, under the names the result lines use: time, host, cpus, threads
    (torch's), torch (its version), load (the 1-minute load average: other jobs slow every row alike) and
    load_avg_1m (the same, rounded)."""
    load = os.getloadavg()[0]
    known = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
             "load": load, "load_avg_1m": round(load, 2)}
    if {"threads", "torch"} & set(fields):
        import torch
        known.update(threads=torch.get_num_threads(), torch=torch.__version__)
    return {k: known[k] for k in fields}


def append_jsonl(path, record):
    """One JSON line appended to path; its folder is made when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """Every line of a results file ([] when there is none yet); blank lines are skipped."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# training runs, in this process

def epochs_for(steps, batches_per_epoch):
    """The --epochs that makes train.py run exactly `steps` steps: it runs ceil(epochs * batches per epoch)."""
    return (steps - 0.5) / batches_per_epoch


def run_train(argv, quiet=True, plots=True):
    """train.main(argv) in this process -> what it printed (captured with quiet; shown, and "" returned, without).
    A failed run ends the benchmark with one line (and the end of the captured output). plots=False skips the loss
    PNGs: matplotlib costs seconds per run on 2 cores, and the metrics.jsonl a benchmark reads are written anyway."""
    import train
    out, plot = io.StringIO(), train.Logger.plot
    if not plots:
        train.Logger.plot = lambda self: None
    try:
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            code = train.main(argv)
    finally:
        train.Logger.plot = plot
    if code != 0:
        raise SystemExit(f"train.py {' '.join(argv)} exited with {code}\n{out.getvalue()[-2000:]}".strip())
    return out.getvalue()


def run_log(log_dir, name):
    """A finished run's log_dir/name/metrics.jsonl -> (its train records, its last val record or None)."""
    from logger import read_metrics
    records = read_metrics(os.path.join(log_dir, name, "metrics.jsonl"))
    val = [r for r in records if r["split"] == "val"]
    return [r for r in records if r["split"] == "train"], (val[-1] if val else None)


def step_seconds(train_records, batch, warmup=0):
    """Seconds per step of each train record (batch / samples_per_s, which train.py averages over the log window),
    the first `warmup` left out when the run is longer than that."""
    s = [batch / r["samples_per_s"] for r in train_records]
    return s[warmup:] or s


# -----------------------------------------------------------------------------
# markdown (bench/results/*.md)

def md_table(head, rows, align=""):
    """The lines of a markdown table: `head` (column names), then a line per row of cells (str() each). align: a
    letter per column, "r" right-aligns it (`---:`, for numbers), "l" or none leaves it left."""
    sep = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(head), "l"))
    return ["| " + " | ".join(head) + " |", sep] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


READING = "<!-- reading:"  # a hand-written reading starts with this line; a regenerated table keeps it


def write_text(path, text):
    """A results file written whole (files.atomic_write): a reader sees the old table or the new one. The old
    file's hand-written reading (from a line starting with READING to the end) is kept below the new text."""
    from files import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = ""
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        at = old.find("\n" + READING)
        kept = old[at:] if at >= 0 else ""
    with atomic_write(path) as temp, open(temp, "w") as f:
        f.write(text.rstrip("\n") + "\n" + kept if kept else text)
