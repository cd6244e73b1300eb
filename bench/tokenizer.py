"""
Benchmark tokenizer.py: BPE training time (256 + 8000 merges + 2 specials on 100k synthetic captions) and
tokenize() throughput on one core, against targets (training < 60 s, encoding >= 20k captions/s).

Anchors, measured in this run: training against a naive BPE that rescans every word before each merge (run on
a subset, same merges, since the full naive run takes far too long), and encoding against the same BPE without
the word cache. No external anchor is needed: tokenizer.py has no dependency beyond torch.

    python bench/tokenizer.py [--captions 100000] [--merges 8000] [--quiet]
"""

import os
import random
import time
from collections import Counter

import torch

import common  # first: the repository root goes ahead of bench/ on sys.path (this file is bench/tokenizer.py)
from tokenizer import SPLIT, Tokenizer, clean, merge

TRAIN_TARGET_S, ENCODE_TARGET = 60.0, 20_000

COLOURS = "red green blue yellow orange purple pink brown black white grey cyan magenta teal navy".split()
SHAPES = "cube sphere cone cylinder pyramid torus star ring disc prism".split()
OBJECTS = ("dog cat car bicycle chair table lamp tree house boat bird horse cup bottle guitar clock "
           "umbrella mountain flower person child woman man train plane").split()
PLACES = ("beach forest kitchen street park desert city lake garden studio office field river "
          "bridge market").split()
ADJ = "small large tiny huge shiny matte old new wooden metal glass soft bright dark".split()
TEMPLATES = [
    "a {adj} {colour} {shape} on the {place}",
    "A photo of a {colour} {obj} in the {place}.",
    "{obj} next to a {adj} {shape}, {w} {w}",
    "Two {colour} {obj}s and a {shape} near the {place} ({n} items)",
    "a {w} {obj} called {W} at the {place}",
    "close-up of the {adj} {obj}: {w}-{w} style, {n}px",
]
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwxz" for v in ["a", "e", "i", "o", "u", "ai", "ou", "ee"]]


def make_captions(n, seed=0):
    """n seeded captions: templates over colours/shapes/objects/places plus Zipf-ish pseudo-words, so the
    corpus has enough distinct pairs for thousands of merges."""
    rng = random.Random(seed)
    pseudo = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(20_000)]
    weights = [1 / (r + 1) for r in range(len(pseudo))]
    words = iter(rng.choices(pseudo, weights, k=6 * n))  # drawn in bulk: faster than one choices() per word
    out = []
    for _ in range(n):
        s = rng.choice(TEMPLATES)
        while "{w}" in s or "{W}" in s:
            s = s.replace("{w}", next(words), 1).replace("{W}", next(words).capitalize(), 1)
        out.append(s.format(adj=rng.choice(ADJ), colour=rng.choice(COLOURS), shape=rng.choice(SHAPES),
                            obj=rng.choice(OBJECTS), place=rng.choice(PLACES), n=rng.randint(1, 4096)))
    return out


def naive_train(texts, num_merges):
    """Anchor: full rescan of every word's pairs before each merge (what the incremental counts avoid)."""
    counts = Counter(w for t in texts for w in SPLIT.findall(clean(t)))
    words = {tuple(w.encode("utf-8")): f for w, f in counts.items()}
    merges = []
    for _ in range(num_merges):
        stats = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                stats[p] += f
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        merges.append(pair)
        words = {tuple(merge(list(w), pair, 255 + len(merges))): f for w, f in words.items()}
    return merges


class NoCacheTokenizer(Tokenizer):
    """Anchor: the same BPE, but every word is merged again each time it is seen."""

    def encode(self, text):
        return [i for w in SPLIT.findall(text) for i in self._encode_word(w.encode("utf-8"))]


def main():
    parser = common.parser(__doc__, whole=True)
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--merges", type=int, default=8000)
    parser.add_argument("--anchor_captions", type=int, default=5000, help="subset size for the naive anchor")
    parser.add_argument("--anchor_merges", type=int, default=100)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.captions < 1 or args.merges < 0:
        parser.error("--captions must be >= 1 and --merges >= 0")
    torch.set_num_threads(1)  # one core, as the target says

    t0 = time.perf_counter()
    captions = make_captions(args.captions)
    print(f"generated {len(captions):,} captions in {time.perf_counter() - t0:.1f}s, e.g. {captions[:2]}")

    # --- training: ours on the full corpus
    t0 = time.perf_counter()
    tok = Tokenizer().train(captions, vocab_size=256 + args.merges + 2, quiet=args.quiet)
    train_s = time.perf_counter() - t0
    print(f"train: {len(tok.merges):,} merges (vocab {tok.vocab_size:,}) in {train_s:.2f}s")

    # --- training anchor: naive vs ours on a subset, same number of merges, same answer
    sub = captions[: args.anchor_captions]
    t0 = time.perf_counter()
    naive_merges = naive_train(sub, args.anchor_merges)
    naive_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub_tok = Tokenizer().train(sub, vocab_size=258 + args.anchor_merges, quiet=True)
    ours_sub_s = time.perf_counter() - t0
    assert list(sub_tok.merges) == naive_merges, "incremental and naive training disagree"
    train_speedup = naive_s / ours_sub_s
    print(f"train anchor ({len(sub):,} captions, {args.anchor_merges} merges): naive {naive_s:.2f}s, "
          f"ours {ours_sub_s:.3f}s -> {train_speedup:.1f}x")

    # --- encoding: the tokenize() path, cold word cache, one core
    tok = Tokenizer.from_dict(tok.to_dict())  # fresh tokenizer, empty cache
    t0 = time.perf_counter()
    tokens = tok.tokenize(captions, context_length=77)  # (N, 77)
    enc_s = time.perf_counter() - t0
    enc_rate = len(captions) / enc_s
    n_anchor = min(len(captions), 10_000)
    t0 = time.perf_counter()
    anchor_tokens = NoCacheTokenizer(list(tok.merges)).tokenize(captions[:n_anchor], context_length=77)
    anchor_rate = n_anchor / (time.perf_counter() - t0)
    assert torch.equal(anchor_tokens, tokens[:n_anchor]), "cached and uncached encodings disagree"
    lengths = (tokens > 0).sum(1).float()
    print(f"encode: {enc_rate:,.0f} captions/s ({enc_s:.2f}s for {len(captions):,}; "
          f"{lengths.mean():.1f} tokens/caption); no-cache anchor {anchor_rate:,.0f}/s "
          f"-> {enc_rate / anchor_rate:.1f}x")

    train_ok, enc_ok = train_s < TRAIN_TARGET_S, enc_rate >= ENCODE_TARGET
    print(f"target train < {TRAIN_TARGET_S:.0f}s: {'PASS' if train_ok else 'FAIL'} ({train_s:.2f}s)")
    print(f"target encode >= {ENCODE_TARGET:,} captions/s: {'PASS' if enc_ok else 'FAIL'} ({enc_rate:,.0f}/s)")

    row = {"bench": "tokenizer", **common.machine("time"), "captions": len(captions),
           "merges": len(tok.merges), "train_s": round(train_s, 3), "train_target_s": TRAIN_TARGET_S,
           "train_pass": train_ok, "train_anchor_naive_s": round(naive_s, 3),
           "train_anchor_ours_s": round(ours_sub_s, 3), "train_speedup_vs_naive": round(train_speedup, 2),
           "encode_captions_per_s": round(enc_rate), "encode_target": ENCODE_TARGET, "encode_pass": enc_ok,
           "encode_anchor_nocache_per_s": round(anchor_rate), "encode_speedup_vs_nocache":
           round(enc_rate / anchor_rate, 2), "tokens_per_caption": round(lengths.mean().item(), 2)}
    common.append_jsonl(os.path.join(common.RESULTS, "tokenizer.jsonl"), row)


if __name__ == "__main__":
    main()
