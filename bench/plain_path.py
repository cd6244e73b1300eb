"""
The plain CLIP path's length: the lines a reader reads to follow bytes -> batch (dataloader.py) -> towers and the
contrastive loss (clip.py) -> the step, the loop and their setup (train.py, launch.py), every fenced experiment
block skipped. nanoGPT's model.py + train.py are the yardstick (666 lines in all).

    python bench/plain_path.py                       # this checkout; a line appended to bench/results/plain_path.jsonl
    python bench/plain_path.py --root DIR --tag before   # another checkout (git worktree add DIR <commit>)
    python bench/plain_path.py --list                # and every function counted, with its lines

What it counts, exactly:
- The functions on the path are found by running it: a plain one-process CPU run of `python train.py` (micro preset,
  the built-in synthetic set at bench/.data/plain_path/data/synthetic, small and made once, batch 32 for 4 steps,
  one loader worker, an eval and a checkpoint at the end) under sys.settrace, in its main process, its threads and
  its loader worker. A function of dataloader.py, clip.py, train.py or launch.py counts when the run enters it from
  those files alone: one entered only under another of the repository's files (checkpoint_manager.py writing a
  checkpoint, logger.py, eval_zeroshot.py's zero-shot pass, tokenizer.py) belongs to that file. The command line
  (train.get_parser's flags, train.validate's checks) is not counted.
- Per function: its lines from the `def` (decorators included) to its last, nested functions with their parent; for a
  method, also its class's header line and docstring. Module docstrings, imports and constants are not counted.
- Skipped: fenced blocks. A fence is a comment line `# NAME: ...` with NAME one of EXPERIMENTS; it fences itself, the
  comment lines right after it and the one statement they precede (a line, or a whole if/for/def block).
- Reported: `lines` (non-blank: what a reader reads, comments and docstrings included), `code` (non-blank lines that
  are neither comment-only nor in a docstring), `fenced` (non-blank lines inside counted functions that fences skip).
"""

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize

import common  # first: the repository root goes ahead of bench/ on sys.path

FILES = ("dataloader.py", "clip.py", "train.py", "launch.py")  # launch.py: train.py's DDP setup (from issue 28)
NOT_THE_PATH = {("train.py", "get_parser"), ("train.py", "validate")}  # the command line
# the experiments a fence may name (the flag that turns each on)
EXPERIMENTS = {"Long-CLIP": "--long", "distillation": "--distill", "hard negatives": "--hard_negatives",
               "SigLIP": "--loss siglip", "FLIP": "--patch_dropout", "adapters": "--adapters",
               "LiT": "--lock_image/--lock_text"}
FENCE = re.compile(r"\s*# (" + "|".join(map(re.escape, EXPERIMENTS)) + r"): .*")
RUN = ["--preset", "micro", "--batch", "32", "--epochs", "0.24", "--workers", "1", "--quiet", "--run_name", "plain"]

# runs in a fresh interpreter: argv = root, records file, counted files (comma-separated), train.py's argv
TRACER = r"""
import os, sys, threading
root, records, counted, argv = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
sys.path.insert(0, root)
counted = {os.path.join(root, f) for f in counted}
others = {os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py")} - counted
out, seen = open(records, "a", buffering=1), set()  # a line per function, flushed at once (workers are forked)

def trace(frame, event, arg):
    code = frame.f_code
    if code.co_filename in counted and code not in seen:
        up = frame.f_back
        while up is not None and up.f_code.co_filename not in others:
            up = up.f_back
        if up is None:  # entered from the counted files alone
            seen.add(code)
            out.write(f"{code.co_filename}\t{code.co_firstlineno}\t{code.co_qualname}\n")
    return None  # no line events

sys.settrace(trace)
threading.settrace(trace)
import train
sys.exit(train.main(argv))
"""


def make_data(quiet):
    """The built-in synthetic set, small (512 + 128 samples at 32 px), made once under bench/.data/plain_path."""
    work = os.path.join(common.DATA, "plain_path")
    if not os.path.isfile(os.path.join(work, "data", "synthetic", "index.json")):
        subprocess.run([sys.executable, os.path.join(common.ROOT, "prep_dataset.py"), "synthetic", "--out",
                        os.path.join(work, "data", "synthetic"), "--num_train", "512", "--num_val", "128",
                        "--img_size", "32", "--shard_size", "256", "--workers", "1"] + ["--quiet"] * quiet, check=True)
    return work


def entered(root, files, quiet):
    """{(file, first line)} of the functions the plain run enters, traced in root's code."""
    work, tmp = make_data(quiet), tempfile.mkdtemp(prefix="plain_path-")
    try:
        records = os.path.join(tmp, "records.tsv")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        argv = RUN + ["--out", os.path.join(tmp, "out"), "--log_dir", os.path.join(tmp, "logs")]
        r = subprocess.run([sys.executable, "-c", TRACER, root, records, ",".join(files), *argv], cwd=work, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the traced run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        with open(records) as f:
            return {(os.path.basename(p), int(line)) for p, line, _ in (row.rstrip("\n").split("\t") for row in f)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def first_line(node):
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def fences(source):
    """[(name, first line, last line)] of every fence in source, and [line] of fences that precede no statement."""
    tree, lines = ast.parse(source), source.split("\n")
    starts = {}  # line -> the last line of the outermost statement starting there
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            starts[first_line(node)] = max(starts.get(first_line(node), 0), node.end_lineno)
    found, stray = [], []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        m = FENCE.fullmatch(lines[tok.start[0] - 1]) if tok.type == tokenize.COMMENT else None  # a whole-line comment
        if m is None:
            continue
        at = tok.start[0] + 1  # the statement: after the comment lines that follow the fence
        while at <= len(lines) and lines[at - 1].strip().startswith("#"):
            at += 1
        if at in starts:
            found.append((m.group(1), tok.start[0], starts[at]))
        else:
            stray.append(tok.start[0])
    return found, stray


def count(source, firsts, skip=()):
    """Count one file: firsts = the first lines (def or decorator) of its functions on the path; skip = names of
    top-level functions not to count. -> {lines, code, fenced, functions: [(qualname, lines)]}."""
    tree, text = ast.parse(source), source.split("\n")
    counted, docs, functions = set(), set(), []

    def visit(node, prefix, cls):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                body = child.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                        isinstance(body[0].value.value, str):
                    docs.update(range(body[0].lineno, body[0].end_lineno + 1))
                if not isinstance(child, ast.ClassDef) and first_line(child) in firsts and child.name not in skip \
                        and not counted >= set(range(first_line(child), child.end_lineno + 1)):  # (not nested)
                    span = range(first_line(child), child.end_lineno + 1)
                    counted.update(span)
                    functions.append((prefix + child.name, span))
                    if cls is not None:  # the method's class: its header and docstring
                        head = cls.body[0].end_lineno if cls.body[0].lineno in docs else cls.lineno
                        counted.update(range(first_line(cls), head + 1))
                visit(child, prefix + child.name + ".", child if isinstance(child, ast.ClassDef) else None)
    visit(tree, "", None)
    fenced = {n for _, a, b in fences(source)[0] for n in range(a, b + 1)}
    nonblank = lambda ns: {n for n in ns if text[n - 1].strip()}
    read = nonblank(counted - fenced)
    code = {n for n in read if n not in docs and not text[n - 1].strip().startswith("#")}
    return {"lines": len(read), "code": len(code), "fenced": len(nonblank(counted & fenced)),
            "functions": [(name, len(nonblank(set(span) - fenced))) for name, span in functions]}


def main():
    p = common.parser(__doc__)
    p.add_argument("--root", default=common.ROOT, help="the checkout to count (default: this one)")
    p.add_argument("--tag", default=None, help="a name for the result line (default: the checkout's commit)")
    p.add_argument("--list", action="store_true", help="also print every function counted, with its lines")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only, append nothing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    root = os.path.abspath(args.root)
    files = [f for f in FILES if os.path.isfile(os.path.join(root, f))]
    firsts = entered(root, files, args.quiet)
    result = {}
    for f in files:
        with open(os.path.join(root, f)) as fh:
            source = fh.read()
        result[f] = count(source, {line for name, line in firsts if name == f}, {n for g, n in NOT_THE_PATH if g == f})
        stray = fences(source)[1]
        if stray:
            print(f"warning: {f}: fence comment(s) at line(s) {stray} precede no statement (not skipped)")
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or None  # (None: not a git checkout, e.g. a `git archive` copy)
    dirty = bool(commit and git("status", "--porcelain", "--untracked-files=no"))
    total = {k: sum(r[k] for r in result.values()) for k in ("lines", "code", "fenced")}
    print(f"plain path of {root} ({args.tag or commit}{' + changes' if dirty else ''}): {total['lines']} lines, "
          f"{total['code']} of them code; {total['fenced']} fenced experiment lines skipped")
    for f, r in result.items():
        print(f"  {f:<14} {r['lines']:>5} lines {r['code']:>5} code {r['fenced']:>4} fenced  "
              f"({len(r['functions'])} functions)")
        for name, n in r["functions"] if args.list else ():
            print(f"      {n:>4}  {name}")
    if args.save:
        record = {"tag": args.tag or commit, "commit": commit, "dirty": dirty, **total,
                  "files": {f: {k: r[k] for k in ("lines", "code", "fenced")} | {"functions": len(r["functions"])}
                            for f, r in result.items()},
                  "run": "python train.py " + " ".join(RUN), **common.machine("time", "host")}
        common.append_jsonl(os.path.join(common.RESULTS, "plain_path.jsonl"), record)


if __name__ == "__main__":
    main()
