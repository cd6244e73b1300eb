"""bench/plain_path.py's count (issue 28): a fence skips its comment and the one statement after it, nothing else; the
repository's fences each precede a statement, and the loss reads its plain contrastive term before any experiment."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # after the root: bench/tokenizer.py must not shadow tokenizer.py
import plain_path  # noqa: E402

SOURCE = '''
class Model:
    """A model."""

    def forward(self, x):
        y = x + 1  # (B, E)

        # Long-CLIP: a fenced block,
        # its comment on two lines
        if x:
            y = 2
        # hard negatives: one line
        z = 3
        # DDP: not an experiment, so not a fence
        return y + z

    def unused(self):
        return 0
'''


def test_a_fence_skips_its_comment_and_one_statement():
    found, stray = plain_path.fences(SOURCE)
    assert found == [("Long-CLIP", 8, 11), ("hard negatives", 12, 13)] and stray == []
    forward = SOURCE.split("\n").index("    def forward(self, x):") + 1  # 5
    r = plain_path.count(SOURCE, {forward})
    # read: class line, its docstring, def, y = ..., the DDP comment, return  (unused() is not on the path)
    assert (r["lines"], r["code"], r["fenced"]) == (6, 4, 6)
    assert r["functions"] == [("Model.forward", 4)]
    assert plain_path.count(SOURCE, {forward}, skip={"forward"})["lines"] == 0


def test_a_fence_before_no_statement_is_reported():
    assert plain_path.fences("def f():\n    return 1\n    # SigLIP: nothing follows\n")[1] == [3]


def test_the_repository_fences_precede_statements_and_the_loss_reads_plain_first():
    for f in plain_path.FILES:
        with open(os.path.join(ROOT, f)) as fh:
            source = fh.read()
        assert plain_path.fences(source)[1] == [], f
    with open(os.path.join(ROOT, "train.py")) as fh:
        lines = fh.read().split("\n")
    start = lines.index("    def loss_fn(outs, batch):")
    plain = lines.index("            loss = contrastive(img, txt, outs, all_img, all_txt, offset)")
    fenced = {name: a for name, a, _ in plain_path.fences("\n".join(lines))[0] if a > start}
    assert {"hard negatives", "Long-CLIP", "distillation"} <= set(fenced)
    assert start < plain < min(fenced.values())
