"""
Byte-level BPE tokenizer for CLIP captions, written from scratch (in the spirit of minbpe's RegexTokenizer).

Text is pre-split with a regex into words (letters, digits, punctuation, whitespace runs); each word's UTF-8
bytes are merged by learned byte-pair merges, never across word boundaries. Two special tokens follow the
merges: sot (start of text) = vocab_size - 2 and eot (end of text) = vocab_size - 1, so eot is the highest id
and `tokens.argmax(-1)` finds it (CLIP pools the text tower at that position).

    tok = Tokenizer().train(captions, vocab_size=8258)  # 256 bytes + 8000 merges + sot + eot
    tok.tokenize(["a red cube"], context_length=77)     # int64 (1, 77): sot, ids..., eot, 0, 0, ...

`clean()` (lower-case, whitespace collapsed, stripped; as CLIP's whitespace_clean) is applied by `train` and
`tokenize`, not by `encode`: encode/decode are lossless for any str that has no lone surrogates.

Left out on purpose:
- the `regex` package (\\p{L} classes): stdlib `re` classes ([^\\W\\d_] for letters) split well enough;
- GPT-2's byte-to-unicode remap: it only exists to store merges as printable strings, we store integer ids;
- ftfy / html unescaping from CLIP's basic_clean: our captions come from our own prep step;
- the "</w>" end-of-word marker of CLIP's BPE: the leading space carried by each word plays that role.
"""

import heapq
import json
import re
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from files import atomic_write

FORMAT_VERSION = 1
# GPT-2's split with stdlib classes: contractions | letters | 1-3 digits (so long numbers do not each become a
# new word) | other symbols (underscore included) | whitespace not followed by a word | whitespace.
# Every character falls in some branch, so "".join(SPLIT.findall(t)) == t for any t.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?(?:_|[^\s\w])+|\s+(?!\S)|\s+"""
SPLIT = re.compile(SPLIT_PATTERN)
_WHITESPACE = re.compile(r"\s+")
_CACHE_MAX = 1_000_000  # words kept in the encode cache; beyond it words are still encoded, just not stored
# Training reads at most this many characters of each text: far more than any context holds (~800 tokens of
# English), and what a text costs is bounded (one 30 MB caption, read whole, took 6 GB of RAM).
MAX_TRAIN_CHARS = 4096


def clean(text):
    """CLIP-like caption cleaning: whitespace runs -> one space, stripped, lower-cased."""
    return _WHITESPACE.sub(" ", text).strip().lower()


def merge(ids, pair, idx):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `idx`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    def __init__(self, merges=()):
        # merges: [(a, b), ...] in rank order; merge r makes token 256 + r
        self.merges = {tuple(p): 256 + r for r, p in enumerate(merges)}  # (a, b) -> new id
        self.vocab = {i: bytes([i]) for i in range(256)}  # id -> the bytes it stands for
        for (a, b), idx in self.merges.items():
            self.vocab[idx] = self.vocab[a] + self.vocab[b]
        self.vocab_size = 256 + len(self.merges) + 2
        self.sot, self.eot = self.vocab_size - 2, self.vocab_size - 1
        self._cache = {}  # word (str) -> its token ids; captions repeat words, so most encodes are lookups

    # ---------------------------------------------------------------- training

    def train(self, texts, vocab_size, quiet=False):
        """Learn vocab_size - 258 merges from an iterable of strings (or one string), each cut to its first
        MAX_TRAIN_CHARS characters (pass a long corpus as its lines); returns self."""
        if vocab_size < 258:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + sot + eot), got {vocab_size}")
        if isinstance(texts, str):
            texts = [texts]
        # Count each distinct word once; training then works on (distinct word, frequency) pairs.
        counts = Counter(w for t in texts for w in SPLIT.findall(clean(t[:MAX_TRAIN_CHARS])))
        words = [list(w.encode("utf-8")) for w in counts]
        freqs = list(counts.values())
        # pair -> total count over the corpus, and pair -> indices of the words that contain it
        pair_count, where = Counter(), {}
        for i, (w, f) in enumerate(zip(words, freqs)):
            for p in zip(w, w[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(i)
        # Max-heap by (count, then smallest pair) via (-count, pair); entries go stale when a count changes
        # and are skipped on pop (lazy deletion), so picking the best pair is O(log P), not a rescan.
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        for _ in tqdm(range(vocab_size - 258), desc="bpe merges", disable=quiet):
            while heap and pair_count.get(heap[0][1], 0) != -heap[0][0]:
                heapq.heappop(heap)  # stale entry
            if not heap:
                break  # the corpus ran out of pairs: stop early, vocab_size shrinks to what was learned
            pair = heapq.heappop(heap)[1]
            idx = 256 + len(merges)
            merges.append(pair)
            touched = set()
            # Only the words that contain the pair change: take their old pairs out, put their new pairs in.
            for i in where.pop(pair):
                old, f = words[i], freqs[i]
                new = words[i] = merge(old, pair, idx)
                old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
                for p in old_pairs:
                    pair_count[p] -= f
                for p in new_pairs:
                    pair_count[p] += f
                old_set, new_set = set(old_pairs), set(new_pairs)
                for p in old_set - new_set:
                    if p != pair:
                        where[p].discard(i)
                for p in new_set - old_set:
                    where.setdefault(p, set()).add(i)
                touched |= old_set | new_set
            for p in touched:
                c = pair_count[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:  # the merged pair, or a pair that only lived inside merged occurrences
                    del pair_count[p]
                    where.pop(p, None)
        self.__init__(merges)
        return self

    # ---------------------------------------------------------------- encode / decode

    def _encode_word(self, b):
        """BPE on one word's bytes: repeatedly apply the present pair with the lowest merge rank."""
        ids = list(b)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break  # nothing left to merge
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode(self, text):
        """str -> list of token ids (no cleaning, no specials); lossless: decode(encode(t)) == t."""
        ids, cache = [], self._cache
        for w in SPLIT.findall(text):
            w_ids = cache.get(w)
            if w_ids is None:
                w_ids = self._encode_word(w.encode("utf-8"))
                if len(cache) < _CACHE_MAX:
                    cache[w] = w_ids
            ids.extend(w_ids)
        return ids

    def decode(self, ids):
        """Token ids (list or 1-D tensor) -> str; sot/eot are dropped, broken UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return b"".join(self.vocab[i] for i in ids if i < self.sot).decode("utf-8", errors="replace")

    def tokenize(self, texts, context_length=77):
        """Captions (a list, or one str) -> int64 (N, context_length): sot, encode(clean(t)), eot, zero padding.
        Too-long captions are cut and keep eot as their last token (the text tower pools at eot)."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for sot and eot), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        # Rows are written into a numpy buffer: torch.tensor() on nested lists is ~10x slower than this.
        out = np.zeros((len(texts), context_length), dtype=np.int64)  # (N, ctx), 0 = padding
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(clean(t))[: context_length - 2] + [self.eot]
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)  # (N, ctx) int64

    # ---------------------------------------------------------------- persistence

    def to_dict(self):
        """A JSON-able dict (checkpoints embed it); merges as [a, b] lists in rank order."""
        return {"format": "clip-bpe", "version": FORMAT_VERSION, "pattern": SPLIT_PATTERN,
                "vocab_size": self.vocab_size, "sot": self.sot, "eot": self.eot,
                "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, d):
        if d.get("format") != "clip-bpe" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a clip-bpe v{FORMAT_VERSION} tokenizer: format={d.get('format')!r} "
                             f"version={d.get('version')!r}")
        if d.get("pattern") != SPLIT_PATTERN:
            raise ValueError("tokenizer was trained with a different split pattern; its encodings would differ")
        merges = [tuple(p) for p in d["merges"]]
        for r, p in enumerate(merges):  # each merge may only use bytes and earlier merges
            if len(p) != 2 or not all(isinstance(x, int) and 0 <= x < 256 + r for x in p):
                raise ValueError(f"bad merge #{r}: {list(p)}")
        tok = cls(merges)
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise ValueError(f"vocab_size {d['vocab_size']} does not match {len(merges)} merges + 258")
        return tok

    def save(self, path):
        """Write JSON atomically (files.atomic_write), so a crash never leaves half a tokenizer."""
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
