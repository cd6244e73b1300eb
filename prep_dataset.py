"""
Image-caption sources -> webdataset shards + index.json + tokenizer.json, all in one folder:
    data/<name>/index.json                            splits (shard names, sizes, sample counts), img_size, source, ...
    data/<name>/tokenizer.json                        the BPE trained on the captions (tokenizer.py)
    data/<name>/train-000000.tar, val-000000.tar ...  the samples: <key>.jpg, <key>.txt, <key>.json each

    python prep_dataset.py synthetic --out data/synthetic                  # 20k/2k procedurally drawn 64 px images
    python prep_dataset.py text-to-image-2m --out data/t2i --limit 100000  # jackyhate/text-to-image-2M, streamed
    python prep_dataset.py hf --name user/dataset --out data/mine          # any image-caption set `datasets` streams
    python prep_dataset.py folder --src photos/ --out data/photos          # a.jpg + a.txt, or class sub-folders
    python prep_dataset.py jsonl --src pairs.jsonl --out data/pairs        # {"image": path, "caption": text}
    python prep_dataset.py tar --src shards/ --out data/mine               # existing webdataset tars
    python prep_dataset.py add-teacher --data data/synthetic --teacher out/big/ckpt/best.pt  # distillation
    python prep_dataset.py add-swaps --data data/t2i                                 # rule-based negatives
    python prep_dataset.py add-negatives --data data/t2i --model out/run/ckpt/best.pt --k 8  # mined negatives

Every sample is stored as <key>.jpg (RGB, shorter side resized + centre-cropped to S x S, JPEG q95), <key>.txt
(the caption, UTF-8) and <key>.json (metadata), keys being 9-digit indices within a split. index.json says what
the data is (splits, img_size, source, classes), whether its captions describe layout (layout_in_captions: then
train.py does not crop) and its longest caption in tokens (caption_tokens: train.py's text context). The shard format
(writing tars, reading members, the one image decode, class folders) is dataloader.py's; this file only turns
sources into samples.

Re-runs are safe. Shards are written to a temp name then os.replace'd, so a shard on disk is always whole, and
the real sources keep a .prep_state.json (settings, a fingerprint of the source, and what each shard holds) so a
re-run into the same --out skips complete shards and continues where an interrupted one stopped. The fingerprint
is the source's listing (relative paths, sizes, mtimes; for jsonl also the .jsonl itself) or its data files
(local tars: names, sizes, mtimes; URLs: the list; text-to-image-2M from the hub: names, sizes, sha256 as the
hub lists them), and for hf the dataset's id, resolved revision, config, split and columns among the settings;
the listing itself is kept in .prep_source.json. When the
source or the settings changed, the re-run stops and says so: shards of two listings are never mixed. --overwrite
deletes the old shards and state and starts over.

The synthetic set is the one to debug a CLIP on: 8 colours x 8 shapes, 1-2 objects with sizes, positions and a
relation, captions from templates, a long caption per image plus "swapped" negatives (colours swapped, relation
reversed) for compositional evaluation, and 8 colour-shape combinations held out of the training split so zero-shot
generalisation to unseen combinations can be measured on val.

Bad data (undecodable or empty images, images in formats but JPEG/PNG/WebP/GIF/BMP/TIFF, empty or non-UTF-8
captions, bad json, truncated tars, unsafe member names, a URL failing HTTP_TRIES times in a row; in a folder, links
out of --src or to folders, unreadable folders and captions, names that are not UTF-8) is skipped, counted per reason
in index.json["skipped"] and warned about, never silent; a run that ends with no sample at all is an error. Tar
members are only read into memory, never extracted. A full disk, SIGTERM or Ctrl-C ends a run with one line, its
temp files removed and its finished shards kept.

text-to-image-2m reads the tars itself (local files memory-mapped, URLs streamed through tarfile's "r|" mode) and
takes records round-robin over the data files (position p from file p % S, files that run out drop out), so a
--limit draws from every file; the caption is json["caption"], else json["prompt"], decided per sample. From the
hub it follows the hub's conventions over plain HTTP (urllib): HF_ENDPOINT (a mirror) and HF_TOKEN (sent only to
the endpoint, never across its redirect to storage, never printed or stored); the tar list from the repo's file
listing, pinned to its commit (the fixed list of 47 only when the hub answers the listing with an error, with a
warning); a dropped connection goes on at the byte where it broke (HTTP Range); retries back off 1, 2, 4, ... s or
as long as Retry-After says. Not huggingface_hub: hf_hub_download copies each 8.4 GB tar whole into its cache before
the first byte can be read (a --limit of a few percent would still fetch everything), and HfFileSystem's stream
re-opens a broken connection only once per file.

hf reads any image-caption dataset `datasets` can stream (a hub id, or a local folder of parquet/arrow files or
written by save_to_disk) through dataloader.py's hub functions, in the dataset's own order; images stay encoded
bytes until the workers decode them. The columns are inferred when only one fits (an Image feature; a string or
list-of-strings caption) or named with --image_column / --caption_column; of a list, the first non-empty caption is
the training caption and the others go to json "extra_captions" (multi-caption retrieval); a ClassLabel becomes
json "label" and index.json "classes". A hub id is checked against HF_ENDPOINT's API first, so an unknown id or an
endpoint that does not answer is one line rather than `datasets`' half-minute of retries.

add-teacher runs a trained checkpoint over every sample (its own tokenizer on the raw caption, images resized to
its resolution) and writes <shard>.teacher.tar beside each shard: the same members plus <key>.teacher_image.npy
and <key>.teacher_text.npy (float16, L2-normalised). index.json then lists the new shards ("shards_base" keeps the
old list), and train.py --distill reads the stored embeddings instead of running the teacher.

Hard negatives (train.py --hard_negatives): every source writes json "negatives" at prep time: the synthetic
set its swaps (one-object images have none), every other source what negative_captions' rules make of the caption
(swapped colour/size/material/number words, a reversed relation, the two nouns of a relation swapped; captions no
rule changes get [] and are counted in index.json "negatives"). add-swaps adds them to shards made before, and
add-negatives stores json "mined": the K captions of other training samples a trained checkpoint scores highest
for each image. Both write <shard>.<swaps|mined>.tar beside each shard and switch index.json at the end; an
interrupted run continues where it stopped (.add_<swaps|mined>.json). add-teacher starts from "shards_base", so
run it before them (after them it stops with an error rather than drop their json).

Left out on purpose: image deduplication, caption filtering by language or CLIP score, aspect-ratio bucketing
(CLIP trains on square crops), shuffling a hub dataset at prep time (it keeps its own order; the loader mixes a
few shards at a time, so a class-sorted set wants shuffling before), and remote sources other than tar URLs and
the hub.
"""

import argparse
import contextlib
import email.utils
import functools
import glob
import hashlib
import http.client
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dataloader import (articles, class_folders, decode_image, image_array, image_ext, is_image_file, map_file,
                        read_tar, safe_name, save_json, scan_tar, split_key, tar_members, walk_files, write_tar)
from dataloader import hub_columns, hub_image_bytes, open_hub_dataset, undecoded
from tokenizer import MAX_TRAIN_CHARS, Tokenizer

# jackyhate/text-to-image-2M, the 512 px part (webdataset tars of jpg + json {"prompt": ...}). The tars are read from
# the repo's file listing; these 47 names are the fallback when the hub does not answer the listing request.
T2I_REPO, T2I_DIR = "jackyhate/text-to-image-2M", "data_512_2M"
T2I_FILES = [f"{T2I_DIR}/data_{i:06d}.tar" for i in range(47)]
HTTP_TRIES, HTTP_WAIT, HTTP_TIMEOUT = 6, 1.0, 60  # failures in a row without progress, first backoff (s), socket (s)


# ----------------------------------------------------------------------------- writing shards

def sample_files(img, caption, meta):
    """One sample's members: a q95 JPEG, the caption and the metadata JSON."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return {"jpg": buf.getvalue(), "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def shard_captions(path):
    """The captions (.txt, plus json long/short when present) of a shard already on disk, for the tokenizer."""
    out = []
    for files in read_tar(path)[0].values():
        out += [files["txt"].decode("utf-8")] if "txt" in files else []
        meta = json.loads(files["json"]) if "json" in files else {}
        out += [meta[k] for k in ("long", "short") if k in meta]
    return out


def skip_summary(skipped):
    return ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "none"


def finish(out, splits, extra, captions, vocab_size, skipped, quiet, fit=None):
    """Train the tokenizer on the training captions, write tokenizer.json and index.json, report skips.
    index.json's caption_tokens is the longest of `fit` (default: the captions) in tokens with start and end: train.py
    shortens the text context to it when the preset's is longer. Both read at most MAX_TRAIN_CHARS characters of a
    caption (the shards keep it whole); index.json's captions_capped counts the captions that were longer."""
    fit = captions if fit is None else fit
    capped = sum(len(t) > MAX_TRAIN_CHARS for t in captions)
    if capped:
        warnings.warn(f"{capped} training captions are longer than {MAX_TRAIN_CHARS} characters; the tokenizer "
                      f"and caption_tokens read only their first {MAX_TRAIN_CHARS}")
    tok = Tokenizer().train(captions, vocab_size, quiet=quiet)
    tok.save(os.path.join(out, "tokenizer.json"))
    longest = max((len(tok.encode(t[:MAX_TRAIN_CHARS])) for t in fit), default=0) + 2
    index = {**splits, **extra, "vocab_size": tok.vocab_size, "caption_tokens": longest, "captions_capped": capped,
             "skipped": dict(sorted(skipped.items()))}
    save_json(os.path.join(out, "index.json"), index)
    counts = ", ".join(f"{s} {splits[s]['num_samples']} in {len(splits[s]['shards'])} shards" for s in splits)
    print(f"wrote {out}: {counts}, vocab {tok.vocab_size}")
    if skipped:
        warnings.warn(f"skipped {sum(skipped.values())} samples/members: {skip_summary(skipped)}")
    print(f"skipped {sum(skipped.values())}: {skip_summary(skipped)}" if skipped else "skipped: none")
    return index


# ----------------------------------------------------------------------------- ending cleanly

TEMP_FILE = re.compile(r"\.(tmp\d*|partial)$")  # write_tar, save_json, Tokenizer.save: <name>.tmp<pid> until os.replace


class Stopped(Exception):
    """SIGTERM (how clusters and `kill` stop a job) raised in the main process, so the step's cleanup runs."""


def raise_stopped(signum, frame):
    raise Stopped(signum)


def worker_signals():
    """Pool workers leave Ctrl-C and SIGTERM to the main process, which stops them (Pool.terminate) and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cleans_up(step):
    """For a step that writes into one folder (--out, or --data for add-*): however it ends, the temp files that
    appeared there while it ran (half-written shards of its own or of its workers) are removed, and a full disk
    (any OSError), SIGTERM or Ctrl-C ends it with one line instead of (chained) tracebacks. Finished shards stay,
    so the same command continues from them."""
    @functools.wraps(step)
    def run(*a, **kw):
        args = next(x for x in a if isinstance(x, argparse.Namespace))
        folder = args.data if args.source.startswith("add-") else args.out
        names = lambda: set(os.listdir(folder)) if os.path.isdir(folder) else set()
        before, main_thread = names(), threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, raise_stopped) if main_thread else None
        try:
            return step(*a, **kw)
        except OSError as e:  # also from a worker: Pool re-raises it here, with the worker's traceback as cause
            where = f": {e.filename}" if e.filename else ""
            print(f"prep_dataset.py: error: {e.strerror or e}{where}; run the same command again to continue",
                  file=sys.stderr)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, Stopped) as e:
            how = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"
            print(f"prep_dataset.py: stopped by {how}; temp files removed, finished shards kept: run the same "
                  "command again to continue", file=sys.stderr)
            raise SystemExit(143 if isinstance(e, Stopped) else 130) from None
        finally:
            for f in names() - before:
                if TEMP_FILE.search(f):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, f))
            if main_thread:
                signal.signal(signal.SIGTERM, old)
    return run


# ----------------------------------------------------------------------------- rule-based negative captions

# NegCLIP-style hard negatives (Yuksekgonul et al. 2023): the caption's own words, re-arranged so it is false.
# Closed lexicons: two words of one group are swapped ("a red cube left of a blue ball" -> "a blue cube left of a
# red ball"); a swap needs a word between the two other than "and"/"or"/commas ("a red and blue ball" is left
# alone: swapped, it says the same).
LEXICON = {
    "colour": {"red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black", "grey",
               "gray", "brown"},
    "size": {"small", "large", "big", "little", "tiny", "huge", "tall"},
    "material": {"wooden", "metal", "metallic", "plastic", "glass", "stone", "paper", "leather", "cotton", "rubber",
                 "ceramic", "steel", "golden", "silver"},
    "number": {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"},
}
RELATION_PAIRS = [("to the left of", "to the right of"), ("on the left of", "on the right of"), ("left of", "right of"),
                  ("in front of", "behind"), ("on top of", "underneath"), ("above", "below"), ("inside", "outside"),
                  ("on", "under")]
REVERSED = {**dict(RELATION_PAIRS), **{b: a for a, b in RELATION_PAIRS}}
# A relation must have an object: an article, number or possessive, then not a position ("on the left" has none).
RELATION_RE = re.compile(r"\b(" + "|".join(re.escape(r) for r in sorted(REVERSED, key=len, reverse=True)) + r")"
                         r"(?= (?:a|an|the|one|two|three|four|five|his|her|its|their|some) "
                         r"(?!(?:left|right|top|bottom|side|middle|centre|center)\b))", re.IGNORECASE)
WORD_RE = re.compile(r"[A-Za-z]+")
JOINED = re.compile(r"[\s,]*(?:(?:and|or)[\s,]*)?", re.IGNORECASE)  # what may sit between two words of one phrase
VERBS = {"is", "are", "was", "were", "sits", "stands", "lies", "sit", "stand", "lie"}  # skipped before a relation
BOUNDARY = {"and", "with", "in", "on", "at", "near", "while", "that", "which", "by", "for", "of", "next", "under"}


def edit(text, edits):
    """Apply [(start, end, new)] (non-overlapping) right to left; an article before an edit is re-decided
    ("an orange" -> "a red"), and a capitalised word stays capitalised."""
    for start, end, new in sorted(edits, reverse=True):
        new = new.capitalize() if text[start].isupper() else new.lower()
        text = text[:start] + new + text[end:]
        m = re.search(r"\b(an?)( )$", text[:start], re.IGNORECASE)
        if m:
            article = m.group(1)[0] + ("n" if new[0].lower() in "aeiou" else "")
            text = text[:m.start()] + article + " " + text[start:]
    return text


def relation_nouns(caption, words, m):
    """The two nouns a relation match joins, as (start, end, word) spans, or None: the word before it (past
    "is", "sits", "-ing" words) and the last word of the phrase after it (up to a comma or a boundary word)."""
    before = [w for w in words if w[1] <= m.start()]
    while before and (before[-1][2] in VERBS or before[-1][2].endswith("ing")):
        before.pop()
    after = []
    for w in (w for w in words if w[0] >= m.end()):
        if w[2] in BOUNDARY or "," in caption[(after[-1][1] if after else m.end()):w[0]]:
            break
        after.append(w)
    if not before or not after or before[-1][2] == after[-1][2] or before[-1][2] in ("a", "an", "the"):
        return None
    return before[-1], after[-1]


def negative_captions(caption):
    """A caption -> its rule-based hard negatives (distinct, none equal to it; [] when no rule applies): per
    lexicon group one swap of two different words, one reversed relation, and the two nouns around that relation
    swapped."""
    words = [(m.start(), m.end(), m.group().lower()) for m in WORD_RE.finditer(caption)]
    out = []
    for group in LEXICON.values():
        hits = [w for w in words if w[2] in group]
        for a, b in zip(hits, hits[1:]):
            if a[2] != b[2] and not JOINED.fullmatch(caption[a[1]:b[0]]):
                out.append(edit(caption, [(a[0], a[1], b[2]), (b[0], b[1], a[2])]))
                break
    m = RELATION_RE.search(caption)
    if m:
        out.append(edit(caption, [(m.start(), m.end(), REVERSED[m.group(1).lower()])]))
        nouns = relation_nouns(caption, words, m)
        if nouns:
            a, b = nouns
            out.append(edit(caption, [(a[0], a[1], b[2]), (b[0], b[1], a[2])]))
    return [n for n in dict.fromkeys(out) if n.lower() != caption.lower()]


# ----------------------------------------------------------------------------- the synthetic dataset

COLOURS = {"red": (220, 20, 30), "orange": (250, 130, 0), "yellow": (245, 215, 0), "green": (20, 150, 40),
           "cyan": (0, 190, 200), "blue": (25, 50, 210), "purple": (130, 30, 170), "pink": (250, 100, 180)}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart"]
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # label = colour index * 8 + shape index
# light, low-saturation background tints, so no object colour ever dominates the background
TINTS = {"grey": (215, 215, 215), "cream": (240, 232, 205), "beige": (225, 212, 188), "mint": (205, 235, 215),
         "lavender": (222, 212, 240), "peach": (245, 218, 200)}
TEXTURES = ["smooth", "speckled", "striped"]
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
REVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
POSITIONS = {"left": ((0.30, 0.50), "on the left"), "right": ((0.70, 0.50), "on the right"),
             "top": ((0.50, 0.30), "at the top"), "bottom": ((0.50, 0.70), "at the bottom"),
             "centre": ((0.50, 0.50), "in the centre")}
# where the first and second object of a pair sit for each relation (first-mentioned object first)
PAIR_POS = {"left": ("left", "right"), "right": ("right", "left"), "above": ("top", "bottom"),
            "below": ("bottom", "top")}
SINGLE_TEMPLATES = ["a {z} {c} {s} {p}", "a {c} {s} {p}", "a picture of a {z} {c} {s}",
                    "there is a {z} {c} {s} {p}", "a photo of a {c} {s}", "{p}, a {z} {c} {s}"]
# one canonical family, "a {c1} {s1} {rel} a {c2} {s2}" with a prefix or sizes, so swaps are well defined
PAIR_TEMPLATES = ["a {c1} {s1} {rel} a {c2} {s2}", "there is a {c1} {s1} {rel} a {c2} {s2}",
                  "a picture of a {c1} {s1} {rel} a {c2} {s2}", "a {z1} {c1} {s1} {rel} a {z2} {c2} {s2}",
                  "a photo of a {c1} {s1} {rel} a {c2} {s2}"]


def shape_polygon(shape):
    """Unit-radius outline of a shape as (K, 2) points around the origin, y down (None for the circle)."""
    t = lambda k, phase=-math.pi / 2: np.linspace(0, 2 * math.pi, k, endpoint=False) + phase
    ring = lambda a, r=1.0: np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    if shape == "triangle":
        return ring(t(3)) * [1.0, 1.0] + [0, 0.2]  # pushed down so it sits centred in its box
    if shape == "star":
        return ring(t(10)) * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]
    if shape == "cross":
        a, b = 0.32, 0.95
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]])
    if shape == "diamond":
        return np.array([[0, -1.0], [0.65, 0], [0, 1.0], [-0.65, 0]])
    if shape == "hexagon":
        return ring(t(6, 0.0))
    if shape == "heart":  # the classic parametric heart, scaled to unit radius
        a = t(48, 0.0)
        x, y = 16 * np.sin(a) ** 3, -(13 * np.cos(a) - 5 * np.cos(2 * a) - 2 * np.cos(3 * a) - np.cos(4 * a))
        return np.stack([x, y + 2.5], 1) / 16.5
    return None


POLYGONS = {s: shape_polygon(s) for s in SHAPES}


def heldout_combos(seed):
    """8 held-out (colour, shape) index pairs: a seeded permutation, so every colour and every shape is held out
    exactly once and each still appears in training with 7 of its 8 partners."""
    perm = np.random.default_rng([seed, 7919]).permutation(len(SHAPES))
    return {(c, int(perm[c])) for c in range(len(COLOURS))}


_GRIDS = {}


def grid(D):
    """(y, x) pixel coordinates in [-0.5, 0.5), (D, D) each; made once per size and process."""
    if D not in _GRIDS:
        _GRIDS[D] = np.mgrid[0:D, 0:D].astype(np.float32) / D - 0.5
    return _GRIDS[D]


def background(rng, D):
    """A light gradient in a random direction plus a texture: (D, D, 3) float32 and its words."""
    tint = list(TINTS)[rng.integers(len(TINTS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    c0 = np.array(TINTS[tint], np.float32) + rng.integers(-10, 11, 3)
    c1 = c0 + rng.integers(-25, 26, 3)
    yy, xx = grid(D)
    a = rng.uniform(0, 2 * math.pi)
    g = xx * math.cos(a) + yy * math.sin(a) + 0.5  # (D, D) position along the gradient
    img = c0 + g[..., None] * (c1 - c0)  # (D, D, 3)
    if texture == "speckled":
        img += rng.normal(0, 12, (D, D, 1)).astype(np.float32)
    elif texture == "striped":
        b, f = rng.uniform(0, math.pi), rng.uniform(4, 9)
        img += 14 * np.sin(2 * math.pi * f * (xx * math.cos(b) + yy * math.sin(b)))[..., None]
    else:
        img += rng.normal(0, 3, (D, D, 1)).astype(np.float32)  # "smooth" still has a little grain
    return np.clip(img, 150, 255), tint, texture


def draw_object(draw, shape, colour, cx, cy, r, rot):
    fill = COLOURS[colour]
    outline = tuple(int(v * 0.55) for v in fill)  # a darker rim keeps edges visible at 32 px
    width = max(1, round(r / 10))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        return
    c, s = math.cos(rot), math.sin(rot)
    pts = POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * r + [cx, cy]  # (K, 2) rotated, scaled, placed
    draw.polygon([tuple(p) for p in pts.tolist()], fill=fill, outline=outline, width=width)


def synthetic_sample(seed, split, index, img_size, heldout):
    """One image and its metadata; everything is drawn from a generator seeded by (seed, split, index), so a
    sample does not depend on which worker makes it or in what order."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])
    nc, ns = len(COLOURS), len(SHAPES)
    colours = list(COLOURS)
    allowed = lambda c, s: split == "val" or (c, s) not in heldout
    if split == "val":
        main = index % (nc * ns)  # balanced labels over all 64 combinations, held-out ones included
    else:
        main = rng.choice(sorted(set(range(nc * ns)) - {c * ns + s for c, s in heldout}))
    c1, s1 = divmod(int(main), ns)
    two = rng.random() < 0.5
    D = 2 * img_size  # draw at 2x and average down: cheap anti-aliasing
    bg, tint, texture = background(rng, D)
    im = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    z1 = ["small", "large"][rng.integers(2)]
    jitter = lambda: rng.uniform(-0.03, 0.03) * D
    if not two:
        pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
        (px, py), pword = POSITIONS[pos]
        r = D * (0.25 if z1 == "large" else 0.16) * rng.uniform(0.9, 1.1)
        draw_object(draw, SHAPES[s1], colours[c1], px * D + jitter(), py * D + jitter(), r, rng.uniform(-0.2, 0.2))
        fields = dict(z=z1, c=colours[c1], s=SHAPES[s1], p=pword)
        caption = articles(SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))].format(**fields))
        long = (f"{caption}. there is one object: a {z1} {colours[c1]} {SHAPES[s1]} {pword}. "
                f"the background is a {texture} pale {tint} gradient.")
        meta = {"label": int(main), "long": articles(long), "short": caption, "negatives": [], "source": "synthetic"}
        return im.reduce(2), caption, meta
    # Second object: another colour; in train, neither it nor the colour-swapped pair may be a held-out combo,
    # so no training caption (swaps included) ever names one.
    while True:
        c2, s2 = int(rng.integers(nc)), int(rng.integers(ns))
        if c2 != c1 and all(allowed(c, s) for c, s in [(c2, s2), (c1, s2), (c2, s1)]):
            break
    z2 = ["small", "large"][rng.integers(2)]
    rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
    for (c, s, z), pos in zip([(c1, s1, z1), (c2, s2, z2)], PAIR_POS[rel]):
        (px, py), _ = POSITIONS[pos]
        px, py = (px - 0.5) * 1.15 + 0.5, (py - 0.5) * 1.15 + 0.5  # a bit further apart than single objects
        r = D * (0.18 if z == "large" else 0.13) * rng.uniform(0.9, 1.1)
        draw_object(draw, SHAPES[s], colours[c], px * D + jitter(), py * D + jitter(), r, rng.uniform(-0.2, 0.2))
    template = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
    first, second = (c1, s1, z1), (c2, s2, z2)
    say = lambda a, b, rl: articles(template.format(c1=colours[a[0]], s1=SHAPES[a[1]], z1=a[2], c2=colours[b[0]],
                                                    s2=SHAPES[b[1]], z2=b[2], rel=RELATIONS[rl]))
    caption = say(first, second, rel)
    p1, p2 = (POSITIONS[p][1] for p in PAIR_POS[rel])
    long = (f"{caption}. there are two objects. the {colours[c1]} {SHAPES[s1]} is {z1} and sits {p1}. "
            f"the {colours[c2]} {SHAPES[s2]} is {z2} and sits {p2}. "
            f"the background is a {texture} pale {tint} gradient.")
    swaps = {"attribute": say((c2, s1, z1), (c1, s2, z2), rel), "relation": say(first, second, REVERSE[rel])}
    # The training negatives (never a held-out combination) are these swaps plus the two objects swapped around the
    # relation. "B left of A" means what the reversed relation means, but with a reversed relation alone the model
    # never learnt relations (bench/hard_negatives.py: swap_relation 0.51 after 702 steps; 0.71 after 468 with it).
    meta = {"label": int(main), "long": long, "short": caption, "swaps": swaps,
            "negatives": [*swaps.values(), say(second, first, rel)], "source": "synthetic"}
    return im.reduce(2), caption, meta


def synthetic_shard(job):
    """Worker: draw samples [start, end) of a split and write them as one shard; returns the training text."""
    path, split, start, end, seed, img_size, heldout = job
    samples, texts, short, no_negatives = [], [], [], 0
    for i in range(start, end):
        img, caption, meta = synthetic_sample(seed, split, i, img_size, heldout)
        samples.append((f"{i:09d}", sample_files(img, caption, meta)))
        texts += [caption, meta["long"]]
        short += [caption] + meta["negatives"]  # what the text tower reads without --long
        no_negatives += not meta["negatives"]
    write_tar(path, samples)
    return split, end - start, texts, short, no_negatives


@cleans_up
def prep_synthetic(args):
    heldout = heldout_combos(args.seed)
    jobs, splits = [], {}
    for split, n in [("train", args.num_train), ("val", args.num_val)]:
        names = [f"{split}-{k:06d}.tar" for k in range(math.ceil(n / args.shard_size))]
        sizes = [min(args.shard_size, n - k * args.shard_size) for k in range(len(names))]
        splits[split] = {"shards": names, "shard_sizes": sizes, "num_samples": n}
        jobs += [(os.path.join(args.out, name), split, k * args.shard_size, k * args.shard_size + size,
                  args.seed, args.img_size, heldout) for k, (name, size) in enumerate(zip(names, sizes))]
    captions, fit, no_negatives = [], [], 0
    bar = tqdm(total=args.num_train + args.num_val, desc="synthetic", unit="img", disable=args.quiet)
    with multiprocessing.Pool(args.workers, worker_signals) if args.workers > 1 else nullpool() as pool:
        for split, n, texts, short, without in pool.imap(synthetic_shard, jobs):  # in order: captions come out in order
            captions += texts if split == "train" else []
            fit += short
            no_negatives += without
            bar.update(n)
    bar.close()
    # the captions say where things are ("on the left", "above"): a crop or flip would make them false
    extra = {"img_size": args.img_size, "source": "synthetic", "classes": CLASSES, "layout_in_captions": True,
             "heldout": [f"{list(COLOURS)[c]} {SHAPES[s]}" for c, s in sorted(heldout)], "seed": args.seed,
             "negatives": {"rule": "swaps", "without": no_negatives}}  # one-object images have no swaps
    return finish(args.out, splits, extra, captions, args.vocab_size, Counter(), args.quiet, fit)


class nullpool:
    """A Pool stand-in that runs everything in this process (workers <= 1): the same code path, easier to debug."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, f, xs):
        return map(f, xs)

    def apply_async(self, f, args):
        return Ready(f(*args))


class Ready:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# ----------------------------------------------------------------------------- decoding real images

def read_caption(value):
    """bytes/str/number/None -> (caption, None) or (None, skip reason). A JSON number is text ("42"); a list, dict
    or bool is no caption. Long captions are kept whole; only the tokenizer truncates, at training time."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")  # a text editor's byte-order mark is not part of the caption
        except UnicodeDecodeError:
            return None, "bad_utf8"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        return None, "bad_caption"
    if not value or not value.strip():
        return None, "empty_caption"
    return value.strip(), None


def json_caption(data):
    """A sample's json member -> (caption, None) or (None, skip reason): json["caption"], else json["prompt"],
    decided for this sample alone (hub tars mix the two)."""
    try:
        meta = json.loads(data.decode("utf-8-sig")) if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        return None, "bad_utf8"
    except ValueError:
        return None, "bad_json"
    if not isinstance(meta, dict):
        return None, "bad_json"
    caption = next((meta[k] for k in ("caption", "prompt") if meta.get(k) not in (None, "")), None)
    if caption is None:
        return None, "empty_caption" if "caption" in meta or "prompt" in meta else "missing_caption"
    return read_caption(caption)


def make_sample(rec, img_size):
    """A raw record -> (img, caption, None) or (None, None, skip reason). Records carry the image as bytes or a
    path, and the caption as bytes/str, or inside json bytes/dict under "caption" or "prompt"."""
    if rec.get("caption") is None and rec.get("json") is not None:
        caption, reason = json_caption(rec["json"])
    else:
        caption, reason = read_caption(rec.get("caption"))
    if reason:
        return None, None, reason
    data = rec.get("image")
    if isinstance(data, str):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError:
            return None, None, "missing_file"
    if not data:
        return None, None, "empty_file" if data is not None else "missing_image"
    try:
        img = decode_image(data, img_size)
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, DecompressionBombError, ...)
        return None, None, "decode_error"
    return img, caption, None


def record_shard(path, split, items, img_size, source, full):
    """Worker: items [(split index, stream index, record)] -> one shard. Returns its name, count, skips, text;
    `full` (the shard got all shard_size positions) is passed through for the restart state."""
    samples, skipped, captions, no_negatives = [], Counter(), [], 0
    for j, i, rec in items:
        img, caption, reason = make_sample(rec, img_size)
        if reason:
            skipped[reason] += 1
            continue
        meta = {"source": source, "id": str(rec.get("id", i)), "negatives": negative_captions(caption)}
        no_negatives += not meta["negatives"]
        if rec.get("label") is not None:
            meta["label"] = rec["label"]
        meta.update(rec.get("meta", {}))  # a source's own fields (hf: extra_captions)
        samples.append((f"{j:09d}", sample_files(img, caption, meta)))
        captions.append(caption)
    write_tar(path, samples)
    return {"name": os.path.basename(path), "num_samples": len(samples), "skipped": dict(skipped),
            "captions": captions if split == "train" else [], "end": max(i for _, i, _ in items), "full": full,
            "no_negatives": no_negatives}


# ----------------------------------------------------------------------------- tars: local files and URLs

def file_samples(path, skipped):
    """(key, {ext: bytes}) of one local tar, in member order, from a memory map (dataloader.tar_members). Unsafe
    names, links and devices count as "unsafe_member"; a tar whose last member is not followed by the zero
    end-of-archive block (cut short, or garbage inside) counts one "truncated_tar" after its whole samples."""
    buf = map_file(path)
    key, group, end = None, {}, 0
    for name, offset, size, kind in tar_members(buf):
        end = offset + (size + 511) // 512 * 512
        if kind == b"5":  # a directory
            continue
        if offset + size > len(buf):  # the file ends inside this member's data
            break
        if kind not in (b"0", b"\0", b"7") or not safe_name(name):
            skipped["unsafe_member"] += 1
            continue
        k, ext = split_key(name)
        if k != key and group:
            yield key, group
            group = {}
        key, group[ext] = k, bytes(buf[offset:offset + size])
    if group:
        yield key, group
    if bytes(buf[end:end + 512]) != bytes(512):
        warnings.warn(f"{path}: truncated or corrupt tar; its whole samples were read, the rest skipped")
        skipped["truncated_tar"] += 1


NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, timeouts, resets, ConnectionError, IncompleteRead
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # HTTP answers worth asking again; any other 4xx is final


class HTTPGaveUp(Exception):
    """A URL that failed HTTP_TRIES times in a row without progress, or with an answer a retry cannot change. `code`
    is the last HTTP status, None when no server answered (refused, unknown host, timeouts)."""

    def __init__(self, msg, code=None):
        super().__init__(msg)
        self.code = code


def hub_endpoint():
    """HF_ENDPOINT (a mirror), as huggingface_hub reads it; read per call, so a test can point it at a local server."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_token():
    """HF_TOKEN, else the file `hf auth login` saved (HF_TOKEN_PATH, HF_HOME/token). Sent as a header, never printed
    or written anywhere."""
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    try:
        with open(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token"), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_request(url, start=0):
    """GET `url` from byte `start`. The token goes only to HF_ENDPOINT's own URLs, and as an unredirected header: the
    hub answers a file with a redirect to a signed storage URL, which must not receive it."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    token = hub_token()
    if token and url.startswith(hub_endpoint() + "/"):
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return req


def retry_after(e):
    """The seconds an HTTP answer's Retry-After asks for (a number or an HTTP date), else 0."""
    value = (getattr(e, "headers", None) or {}).get("Retry-After")
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


class HubFile:
    """A URL read front to back as a file object. A dropped connection (reset, timeout, closed before its
    Content-Length) is opened again at the byte where it broke, with an HTTP Range request; a server that ignores
    the range sends the whole file and the bytes already read are passed over. Retries wait wait, 2 wait, 4 wait,
    ... s, or what a 429/503 says in Retry-After (at most 10 min); after `tries` failures in a row without a byte of
    progress, HTTPGaveUp. A file whose size changes between two requests is given up too: the bytes would not join
    (hub URLs are pinned to a commit, so their files cannot change; an ETag would be a stricter test, but a CDN's
    edges need not agree on it)."""

    def __init__(self, url, opener=None, tries=None, wait=None):
        self.url, self.opener = url, opener or (lambda req: urllib.request.urlopen(req, timeout=HTTP_TIMEOUT))
        self.tries, self.wait = tries or HTTP_TRIES, HTTP_WAIT if wait is None else wait
        self.f, self.pos, self.end, self.failures = None, 0, None, 0  # end: the file's size, when the server says

    def open(self):
        f = self.f = self.opener(hub_request(self.url, self.pos))
        headers = getattr(f, "headers", None) or {}
        length = int(headers["Content-Length"]) if headers.get("Content-Length") else None
        if getattr(f, "status", 200) == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range") or "")
            if not m or int(m.group(1)) != self.pos:
                raise HTTPGaveUp(f"asked for bytes {self.pos}-, the server sent {headers.get('Content-Range')}")
            start, end = self.pos, int(m.group(2)) if m.group(2) != "*" else length and self.pos + length
        else:
            start, end = 0, length
        if self.end is not None and end is not None and end != self.end:
            raise HTTPGaveUp(f"the file changed on the server while being read ({self.end} -> {end} bytes)")
        self.end = end if self.end is None else self.end
        while start < self.pos:  # the whole file again: pass over what was read before
            chunk = f.read(min(self.pos - start, 1 << 20))
            if not chunk:
                raise ConnectionError(f"connection closed at byte {start} while passing over {self.pos}")
            start += len(chunk)

    def read(self, size=-1):
        if size is None or size < 0:  # in pieces, so a drop keeps what came before it
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while True:
            try:
                if self.f is None:
                    self.open()
                data = self.f.read(size)
                if not data and size and self.end is not None and self.pos < self.end:
                    raise ConnectionError(f"connection closed at byte {self.pos} of {self.end}")
                self.pos += len(data)
                self.failures = 0 if data else self.failures
                return data
            except urllib.error.HTTPError as e:
                self.close()
                e.close()
                if e.code not in RETRY_STATUS:
                    raise HTTPGaveUp(f"HTTP {e.code} {e.reason}", e.code) from None
                self.retry(e, e.code)
            except NETWORK_ERRORS as e:
                self.close()
                self.retry(e, None)

    def retry(self, e, code):
        self.failures += 1
        if self.failures >= self.tries:
            raise HTTPGaveUp(f"{e}; gave up after {self.tries} tries", code) from None
        time.sleep(min(600.0, max(self.wait * 2 ** (self.failures - 1), retry_after(e))))

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def url_samples(url, skipped, opener=None, tries=None, wait=None):
    """(key, {ext: bytes}) of a tar streamed from a URL (tarfile "r|" over a HubFile: members read into memory in
    order, never extracted; a dropped connection goes on at the byte where it broke). A URL HubFile gives up on
    skips the rest of its file, counted once as "network_error"; a cut or corrupt tar is "truncated_tar"."""
    f = HubFile(url, opener, tries, wait)
    try:
        tar = tarfile.open(fileobj=f, mode="r|")
        key, group = None, {}
        while (m := tar.next()) is not None:
            tar.members = []  # tarfile keeps every header it read; a hub tar has ~80k members
            if not m.isfile() or not safe_name(m.name):
                skipped["unsafe_member"] += not m.isdir()
                continue
            k, ext = split_key(m.name)
            if k != key and group:
                yield key, group
                group = {}
            key, group[ext] = k, tar.extractfile(m).read()
        if group:
            yield key, group
    except HTTPGaveUp as e:
        warnings.warn(f"{url}: {e}; the rest of this file is skipped")
        skipped["network_error"] += 1
    except (tarfile.TarError, EOFError) as e:
        warnings.warn(f"{url}: truncated or corrupt tar ({e}); its whole samples were read, the rest skipped")
        skipped["truncated_tar"] += 1
    finally:
        f.close()


def is_url(f):
    return re.match(r"^\w+://", f) is not None


def tar_records(groups, name, skipped):
    """Webdataset samples -> records: image from jpg/jpeg/png/webp, caption from .txt or .json."""
    for key, g in groups:
        image = image_ext(g)
        if image is None:
            skipped["missing_image"] += 1
        elif "txt" not in g and "json" not in g:
            skipped["missing_caption"] += 1
        else:
            yield {"id": f"{name}/{key}", "image": g[image], "caption": g.get("txt"), "json": g.get("json")}


def file_records(f, skipped, opener=None, wait=None):
    """The records of one data file, a local tar or a URL; nothing is opened until the first record is asked for."""
    groups = url_samples(f, skipped, opener, wait=wait) if is_url(f) else file_samples(f, skipped)
    yield from tar_records(groups, os.path.basename(f.rstrip("/")), skipped)


def round_robin(streams, taken):
    """Position p takes the next record of stream p % S, over the streams not yet run out (one that runs out drops
    out of the rotation); taken[k] counts the records drawn from stream k."""
    active = list(enumerate(streams))
    while active:
        for k, s in list(active):
            rec = next(s, None)
            if rec is None:
                active.remove((k, s))
                continue
            taken[k] += 1
            yield rec


def t2i_records(files, skipped, taken, opener=None, wait=None):
    """jackyhate/text-to-image-2M (or any webdataset tars of jpg + json), round-robin over the data files so a
    --limit samples all of them; images stay encoded bytes here (decoded in the workers)."""
    return round_robin([file_records(f, skipped, opener, wait) for f in files], taken)


def t2i_hub_files(parser):
    """text-to-image-2M's 512 px tars on HF_ENDPOINT -> (URLs, their listing for .prep_state.json, index.json "hub").
    The names come from the repo's file listing (so a shard added later is read too) and the URLs are pinned to the
    listed commit; the listing is [name, size, sha256] per file, so a re-run through another mirror or after a
    commit that left the tars alone continues, and a changed tar set refuses. When the hub answers the listing with
    an error (a mirror without the API, rate limits past the retries), the fixed list of 47, with a warning. An
    endpoint nothing answers on, or HF_HUB_OFFLINE, is one line (exit 2)."""
    endpoint = hub_endpoint()
    if hub_offline():
        parser.error("HF_HUB_OFFLINE is set: text-to-image-2m reads the hub (unset it, or give local --data_files)")
    try:
        info = json.loads(HubFile(f"{endpoint}/api/datasets/{T2I_REPO}/revision/main?blobs=true").read())
        files = {s["rfilename"]: s for s in info["siblings"]}
        names = sorted(n for n in files if re.fullmatch(rf"{T2I_DIR}/data_\d{{6}}\.tar", n))
        if not names or not isinstance(info["sha"], str):
            raise ValueError(f"no {T2I_DIR}/data_*.tar in the listing")
        revision, how = info["sha"], f"listed by {endpoint} at revision {info['sha'][:12]}"
        found = [[n, files[n].get("size"), (files[n].get("lfs") or {}).get("sha256") or files[n].get("blobId")]
                 for n in names]
    except HTTPGaveUp as e:
        if e.code is None:
            parser.error(f"HF_ENDPOINT {endpoint} cannot be reached ({e})")
        if e.code in (401, 403):  # the downloads would be refused too
            parser.error(f"{endpoint} refused to list {T2I_REPO} ({e})" + ("; check HF_TOKEN" if hub_token() else ""))
        revision, names, how = None, None, f"{endpoint} did not list the repo ({e})"
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # an answer that is not the hub's JSON
        revision, names, how = None, None, f"{endpoint} did not list the repo ({type(e).__name__}: {e})"
    if names is None:
        names, found = T2I_FILES, [[n, None, None] for n in T2I_FILES]
        warnings.warn(f"{how}; using the fixed list of {len(names)} files (the offline fallback: a file added to the "
                      f"repo since is missed)")
    else:
        print(f"{T2I_REPO}: {len(names)} data files {how}")
    urls = [f"{endpoint}/datasets/{T2I_REPO}/resolve/{revision or 'main'}/{n}" for n in names]
    return urls, found, {"id": T2I_REPO, "revision": revision, "listing": "fixed" if revision is None else "hub"}


# ----------------------------------------------------------------------------- local folders and jsonl

CLASS_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
                   "a photo of the {}.", "a {} in a photo."]


def folder_records(src, skipped, seed):
    """Class folders (dataloader.class_folders: src/<class>/**/<image>) or captioned images (a.jpg + a.txt anywhere
    below src); returns (records in a seeded order, class names or None). Both are walked by dataloader.walk_files:
    never out of src nor into a loop; links it passes over, unreadable folders and names that are not UTF-8 are
    counted in `skipped`."""
    found, records, classes = class_folders(src, skipped), [], None
    if found:
        classes, items, empty = found
        for d in empty:
            warnings.warn(f"{os.path.join(src, d)}: no images, so not a class")
        for path, label in items:
            rel = os.path.relpath(path, src)
            t = CLASS_TEMPLATES[int(hashlib.md5(f"{seed}:{rel}".encode()).hexdigest(), 16) % len(CLASS_TEMPLATES)]
            records.append({"id": rel, "image": path, "caption": articles(t.format(classes[label])), "label": label})
    else:
        files = walk_files(src, skipped)
        known = set(files)  # a caption is read only from a file the walk vetted
        for p in files:
            rel = os.path.relpath(p, src)
            if not is_image_file(p) or any(part.startswith(".") for part in rel.split(os.sep)):
                continue  # hidden files and folders (.DS_Store, ._a.jpg) are not samples
            txt = os.path.splitext(p)[0] + ".txt"
            if txt not in known:
                skipped["missing_caption"] += 1
                continue
            try:
                with open(txt, "rb") as f:
                    records.append({"id": rel, "image": p, "caption": f.read()})
            except OSError:  # no permission, or gone since the walk
                skipped["unreadable_caption"] += 1
    order = np.random.default_rng(seed).permutation(len(records))  # mix classes / folders across shards
    return [records[k] for k in order], classes


def jsonl_records(src, skipped, seed):
    """{"image": path relative to the jsonl's folder (or absolute), "caption": text} per line."""
    base, records = os.path.dirname(os.path.abspath(src)), []
    with open(src, "rb") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig"))  # a byte-order mark (Windows editors) starts line 0
            except UnicodeDecodeError:
                skipped["bad_utf8"] += 1
                continue
            except ValueError:
                skipped["bad_json"] += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                skipped["bad_json"] += 1
                continue
            records.append({"id": str(n), "image": os.path.join(base, row["image"]), "caption": row.get("caption")})
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[k] for k in order], None


# ----------------------------------------------------------------------------- hub datasets (through `datasets`)

class SourceError(Exception):
    """A stream that broke mid-run: one line for the user; the shards .prep_state.json records stay for the re-run."""


def hub_dataset_check(name):
    """Ask HF_ENDPOINT's API about a hub dataset before `datasets` does (its own retries take ~25 s to give up on an
    endpoint that does not answer): None when it is there, else the reason in one line."""
    endpoint = hub_endpoint()
    f = HubFile(f"{endpoint}/api/datasets/{name}")
    try:
        f.read(1)  # the answer's status is all it takes (the full answer lists every file of the repo)
        return None
    except HTTPGaveUp as e:
        if e.code is None:
            return f"HF_ENDPOINT {endpoint} cannot be reached ({e})"
        if e.code in (401, 403, 404):  # the hub answers 401 for a private id too, so as not to say it exists
            need = "" if hub_token() else ", or private or gated (then set HF_TOKEN)"
            return f"--name {name}: no such local folder, and no such hub dataset on {endpoint} ({e}{need})"
        return f"--name {name}: {endpoint} answered {e}"
    finally:
        f.close()


def hf_records(ds, cols, what):
    """A `datasets` stream -> records: the image's encoded bytes (decoded in the workers, as for every source), the
    caption (of a list, the first non-empty one; the others go to json "extra_captions" for multi-caption
    retrieval) and, when the dataset has a ClassLabel, the label. A stream that breaks is a SourceError."""
    rows, image, caption, label = iter(undecoded(ds, cols["image"])), cols["image"], cols["caption"], cols["label"]
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # the hub dropped the stream past `datasets`' retries, a file that does not parse, ...
            why = (str(e).strip().splitlines() or [""])[0]
            raise SourceError(f"{what}: record {i} could not be read ({type(e).__name__}: {why}); run the same "
                              f"command to continue (the shards on record are kept)") from None
        text, more = row[caption], []
        if cols["captions_list"]:
            texts = [t.strip() for t in text or [] if isinstance(t, str) and t.strip()]
            text, more = (texts[0], texts[1:]) if texts else (None, [])
        rec = {"id": str(i), "image": hub_image_bytes(row[image]), "caption": text}
        if cols["classes"] and isinstance(row[label], int) and 0 <= row[label] < len(cols["classes"]):
            rec["label"] = row[label]  # -1 is `datasets`' "no label"
        if more:
            rec["meta"] = {"extra_captions": more}
        yield rec


def prep_hf(parser, args, skipped):
    """`hf --name ID_OR_DIR`: open the split streamed, find its columns, and cut it into shards like every source.
    What identifies the source (id, resolved revision, config, split, columns) joins the settings in
    .prep_state.json, so a re-run against another revision refuses; a local folder is also listed file by file."""
    local = os.path.isdir(args.name)
    if not local:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", args.name):
            parser.error(f"--name {args.name}: no such folder, and not a hub id (user/dataset)")
        if not hub_offline() and (why := hub_dataset_check(args.name)):
            parser.error(why)
    try:
        ds, hub = open_hub_dataset(args.name, args.split, args.config)
        cols = hub_columns(ds, args.image_column, args.caption_column, need=("image", "caption"))
    except ValueError as e:
        parser.error(str(e))
    hub.update(image_column=cols["image"], caption_column=cols["caption"])
    files = []
    if local:  # the same files local_revision hashes, with mtimes: a file rewritten in place is a change too
        files = listing(sorted(os.path.join(d, f) for d, _, fs in os.walk(args.name) for f in fs
                               if not f.startswith(".")), args.name)
    make_out(parser, args.out, args.overwrite)
    try:
        return prep_records(parser, args, "hf", hf_records(ds, cols, args.name), skipped, files, cols["classes"],
                            extra={"hub": hub}, source_settings={f"hub_{k}": v for k, v in hub.items()})
    except SourceError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------- what the source is (for re-runs)

def listing(paths, root=None):
    """[[name, size, mtime_ns]] per file (name relative to root); [name, None, None] for a URL or a missing file.
    Two runs over an unchanged source produce the same listing."""
    out = []
    for p in paths:
        try:
            st = None if is_url(p) else os.stat(p)
        except OSError:
            st = None
        out.append([os.path.relpath(p, root) if root and not is_url(p) else p,
                    st and st.st_size, st and st.st_mtime_ns])
    return out


def folder_listing(src):
    """Every image and .txt file below src: a superset of what either folder layout reads, so a caption added
    for an image that had none counts as a change too."""
    return listing([p for p in walk_files(src) if p.endswith(".txt") or is_image_file(p)], src)


def listing_change(old, new):
    """What differs between two listings, in a few words: '2 added (e.g. b.jpg), 1 removed (e.g. a.jpg)'."""
    old, new = ({n: (s, t) for n, s, t in x} for x in (old, new))
    parts = []
    for what, names in [("added", new.keys() - old.keys()), ("removed", old.keys() - new.keys()),
                        ("modified", {n for n in new.keys() & old.keys() if new[n] != old[n]})]:
        if names:
            parts.append(f"{len(names)} {what} (e.g. {min(names)})")
    return ", ".join(parts) or "the listing differs"


def fingerprint(files):
    """A listing as its count and sha256: what .prep_state.json keeps (the listing itself may be large)."""
    return {"files": len(files), "sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


PREP_FILES = re.compile(r"(train|val)-\d{6}(\.teacher)?\.tar|index\.json|tokenizer\.json|\.prep_(state|source)\.json")


def overwrite(out):
    """--overwrite: delete what a prep run leaves in `out` (shards, index, tokenizer, state), nothing else."""
    for f in os.listdir(out):
        if PREP_FILES.fullmatch(f) or PREP_FILES.fullmatch(re.sub(r"\.tmp\d+$", "", f)):
            os.remove(os.path.join(out, f))


SHARD_STATE = {"num_samples", "skipped", "end", "full"}  # what .prep_state.json keeps per shard


def read_state(parser, out, settings, files):
    """The state of an earlier run into `out`, or a fresh one. Stops with one line (exit 2) when that run had
    other settings or another source, or when the state file is empty or malformed: never mix two listings."""
    path, again = os.path.join(out, ".prep_state.json"), "use --overwrite to delete its shards and start over"
    fresh = {"settings": settings, "source": fingerprint(files), "shards": {}}
    if not os.path.exists(path):
        return fresh
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        ok = isinstance(state, dict) and all(isinstance(state.get(k), dict) for k in fresh) and \
            all(isinstance(v, dict) and SHARD_STATE <= v.keys() for v in state["shards"].values())
    except (OSError, ValueError):  # ValueError: empty or not JSON (UnicodeDecodeError included)
        ok = False
    if not ok:
        parser.error(f"{path} is empty or malformed; {again}")
    if state["settings"] != settings:
        diff = ", ".join(f"{k} {state['settings'].get(k)} -> {v}" for k, v in settings.items()
                         if state["settings"].get(k) != v)
        parser.error(f"{out} holds shards made with other settings ({diff}); {again}")
    if state["source"] != fresh["source"]:
        try:
            with open(os.path.join(out, ".prep_source.json"), encoding="utf-8") as f:
                what = listing_change(json.load(f), files)
        except (OSError, ValueError, TypeError):  # the old listing is gone: the digests still say it changed
            what = f"{state['source'].get('files')} files then, {len(files)} now"
        parser.error(f"the source changed since the shards in {out} were made ({what}); {again}")
    return state


# ----------------------------------------------------------------------------- the streaming driver

def split_of(i, val_frac):
    """Stream position -> (split, index within the split). Val takes positions where floor(i * val_frac) steps,
    so exactly floor(n * val_frac) of the first n are val, evenly spread, and the answer never depends on how
    long the stream is (a larger --limit later extends the same splits)."""
    if math.floor((i + 1) * val_frac) > math.floor(i * val_frac):
        return "val", math.floor(i * val_frac)
    return "train", i - math.floor(i * val_frac)


@cleans_up
def prep_records(parser, args, source, records, skipped, files, classes=None, extra=None, source_settings=None):
    """Cut a record stream into train/val shards in parallel, restartably.

    Stream position i goes to (split, j) = split_of(i) and shard j // shard_size of that split, so shard
    contents are a pure function of the stream. A shard counts as done when .prep_state.json says it was full
    and its file exists; a re-run with the same settings and source reads the stream again from position 0 (so
    `skipped`, what the reader skips, and the reader's counts in `extra` cover it all) but leaves done shards
    untouched. `extra` goes into index.json once the stream is read; `source_settings` (what identifies a source
    that has no file listing: a hub id, its revision, ...) join the settings a re-run must match."""
    ss, limit = args.shard_size, args.limit
    settings = {"source": source, "img_size": args.img_size, "shard_size": ss, "val_frac": args.val_frac,
                "seed": args.seed, **(source_settings or {})}  # where it lives is not one: its listing says what it is
    state = read_state(parser, args.out, settings, files)
    save_json(os.path.join(args.out, ".prep_source.json"), files)  # the listing, to say what changed next time
    state_path = os.path.join(args.out, ".prep_state.json")
    done = {n for n, s in state["shards"].items()
            if s["full"] and (limit is None or s["end"] < limit) and os.path.exists(os.path.join(args.out, n))}

    def name_of(i):  # the shard that stream position i lands in
        split, j = split_of(i, args.val_frac)
        return f"{split}-{j // ss:06d}.tar"

    records = itertools.islice(records, limit)
    buffers, pending, captions = {"train": [], "val": []}, [], []
    bar = tqdm(desc=source, unit="img", total=limit, disable=args.quiet)

    def collect():  # the oldest shard's result: record it in the state, atomically, before going on
        r = pending.pop(0).get()
        state["shards"][r["name"]] = {k: r[k] for k in ("num_samples", "skipped", "end", "full", "no_negatives")}
        captions.extend(r.pop("captions"))
        save_json(state_path, state)

    def submit(split, full):
        items = buffers[split]
        buffers[split] = []
        name = f"{split}-{items[0][0] // ss:06d}.tar"
        pending.append(pool.apply_async(record_shard, (os.path.join(args.out, name), split, items, args.img_size,
                                                       source, full)))
        while len(pending) > 2 * max(1, args.workers):  # bound the raw bytes held in memory
            collect()

    with multiprocessing.Pool(args.workers, worker_signals) if args.workers > 1 else nullpool() as pool:
        end = 0
        for i, rec in enumerate(records):
            end = i + 1
            bar.update(1)
            split, j = split_of(i, args.val_frac)
            if name_of(i) in done:  # the reader still passes over it (its skips and counts are per run)
                continue
            buffers[split].append((j, i, rec))
            if j % ss == ss - 1:
                submit(split, True)
        for split in ("train", "val"):  # partial last shards: written, but redone by a run with a larger limit
            if buffers[split]:
                submit(split, False)
        while pending:
            collect()
    bar.close()

    # Everything up to `end` is on disk now; list the shards of positions [0, end) and sum their counts.
    splits, n_split = {}, {"train": end - math.floor(end * args.val_frac), "val": math.floor(end * args.val_frac)}
    no_negatives = 0  # captions the negative_captions rules cannot change
    for split, n in n_split.items():
        names = [f"{split}-{k:06d}.tar" for k in range(math.ceil(n / ss))]
        for m in names:  # empty shards too: their samples were all skipped
            skipped.update(state["shards"].get(m, {}).get("skipped", {}))
        names = [m for m in names if m in state["shards"] and state["shards"][m]["num_samples"] > 0]
        no_negatives += sum(state["shards"][m].get("no_negatives", 0) for m in names)
        sizes = [state["shards"][m]["num_samples"] for m in names]
        splits[split] = {"shards": names, "shard_sizes": sizes, "num_samples": sum(sizes)}
        if split == "train":
            for m in names:
                if m in done:  # written by an earlier run: read its captions back for the tokenizer
                    captions += shard_captions(os.path.join(args.out, m))
    if not splits["train"]["num_samples"] + splits["val"]["num_samples"]:
        parser.error(f"no samples written: {end} records read, every one skipped ({skip_summary(skipped)})")
    if splits["val"]["num_samples"] == 0:
        warnings.warn(f"the val split is empty ({end} samples x val_frac {args.val_frac})")
    # real captions rarely depend on where things sit in the frame: random crops keep them true (see train.py --augment)
    extra = {"img_size": args.img_size, "source": source, "layout_in_captions": False,
             **({"classes": classes} if classes else {}), **(extra or {}),
             "negatives": {"rule": "negative_captions", "without": no_negatives}}
    return finish(args.out, splits, extra, captions, args.vocab_size, skipped, args.quiet)


# ----------------------------------------------------------------------------- teacher embeddings (distillation)

def teacher_shard_name(name):
    """'train-000000.tar' -> 'train-000000.teacher.tar': the new shard sits beside the old one."""
    return (name[:-4] if name.endswith(".tar") else name) + ".teacher.tar"


def npy_bytes(a):
    """An array as .npy file bytes (in memory; plain dtypes only, so readers never need to unpickle)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def done_teacher_shard(path, dim):
    """The sample keys of a teacher shard left by an earlier run, or None when it must be (re)made. Shards are written
    atomically, so one that exists is whole; it counts only if every sample has both embeddings of size dim."""
    if not os.path.exists(path):
        return None
    buf = map_file(path)  # header scan only, no image data read
    groups, _ = scan_tar(buf)
    want = ("teacher_image.npy", "teacher_text.npy")
    if not groups or not all(all(w in exts for w in want) for exts in groups.values()):
        return None
    off, size = next(iter(groups.values()))["teacher_image.npy"]
    shape = np.load(io.BytesIO(buf[off:off + size]), allow_pickle=False).shape
    return set(groups) if shape == (dim,) else None


def teacher_inputs(path, S, skipped, drop=()):
    """A shard's usable samples as [(key, files, uint8 (3, S, S) pixels, raw caption)]; every other sample is
    skipped and counted by reason (members the tar reader dropped count as "bad_member"). Keys in `drop` are
    passed over without a decode (a re-run's samples that are already in a teacher shard)."""
    groups, bad = read_tar(path)
    if bad:
        skipped["bad_member"] += bad
    out = []
    for key, files in groups.items():
        if key in drop:
            continue
        image = image_ext(files)
        if image is None or "txt" not in files:
            skipped["missing_image" if image is None else "missing_caption"] += 1
            continue
        try:
            caption = files["txt"].decode("utf-8")
            json.loads(files.get("json", b"{}"))  # the loader skips a sample whose json is broken; so do we
        except UnicodeDecodeError:
            skipped["bad_utf8"] += 1
            continue
        except ValueError:
            skipped["bad_json"] += 1
            continue
        try:
            pixels = image_array(decode_image(files[image], S))  # (3, S, S), as the loader makes it
        except Exception:  # PIL raises many types for bad data
            skipped["decode_error"] += 1
            continue
        files = {e: d for e, d in files.items() if e not in ("teacher_image.npy", "teacher_text.npy")}
        out.append((key, files, pixels, caption))
    return out


def teacher_embed(model, tok, images, captions, device):
    """uint8 (B, 3, S, S) images + raw captions -> the teacher's L2-normalised embeddings, float16 (B, D) each."""
    import torch
    import torch.nn.functional as F
    import clip
    size = model.config.vision.img_size
    x = clip.normalize_images(torch.from_numpy(images).to(device))  # (B, 3, S, S) float
    if x.shape[-1] != size:  # the teacher was trained at another resolution (as train.OnlineTeacher does it)
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)  # (B, 3, size, size)
    tokens = tok.tokenize(captions, model.config.text.context_length).to(device)  # (B, ctx) its own tokens
    with torch.no_grad():
        outs = model(x, tokens)  # (B, D) each, normalised in float32
    return outs.image.float().cpu().numpy().astype(np.float16), outs.text.float().cpu().numpy().astype(np.float16)


@cleans_up
def add_teacher(parser, args):
    """Write <shard>.teacher.tar beside every shard: the original members plus <key>.teacher_image.npy and
    <key>.teacher_text.npy (float16 (D,), L2-normalised); then point index.json at the new shards."""
    import torch
    import checkpoint_manager as cm
    index_path = os.path.join(args.data, "index.json")
    if not os.path.isfile(index_path):
        parser.error(f"--data {args.data} has no index.json (make it with prep_dataset.py)")
    if not os.path.isfile(args.teacher):
        parser.error(f"--teacher {args.teacher} does not exist")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device {args.device}: {e}")
    try:
        model, ckpt = cm.load_model(args.teacher, map_location=device)
        tok = Tokenizer.from_dict(ckpt["tokenizer"])  # the teacher reads captions with its own tokenizer
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        parser.error(f"--teacher {args.teacher}: not a usable checkpoint ({type(e).__name__}: {e})")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        int(index["img_size"])
    except (ValueError, KeyError, TypeError) as e:
        parser.error(f"{index_path} is not a usable index ({type(e).__name__}: {e})")
    added = [cmd for key, cmd in (("swaps", "add-swaps"), ("mined", "add-negatives")) if key in index]
    if added:  # their json lives in the current shards only; add-teacher rebuilds from the originals
        parser.error(f"{args.data}: add-teacher starts from the shards prep made and would drop what {' and '.join(added)} "
                     f"wrote; run it on a fresh prep, then {' and '.join(added)} again")
    dim, S = model.config.output_dim, int(index["img_size"])
    data_tok = os.path.join(args.data, "tokenizer.json")
    differs = not os.path.isfile(data_tok) or Tokenizer.load(data_tok).to_dict() != tok.to_dict()
    # shards made for another teacher are redone, whatever they hold
    redo = index.get("teacher", {}).get("ckpt") not in (None, args.teacher)
    splits = [s for s, v in index.items() if isinstance(v, dict) and "shards" in v]
    bases = {s: index[s].get("shards_base", index[s]["shards"]) for s in splits}  # a re-run starts from the originals
    missing = [n for s in splits for n in bases[s] if not os.path.isfile(os.path.join(args.data, n))]
    if missing:
        parser.error(f"{index_path} lists {missing[0]}, which is not in {args.data}")
    total = sum(sum(index[s].get("shard_sizes_base", index[s].get("shard_sizes", [0]))) for s in splits)
    bar = tqdm(total=total or None, desc="add-teacher", unit="img", disable=args.quiet)
    skipped, sizes = Counter(), {}
    for split in splits:
        sizes[split] = []
        for name in bases[split]:
            out = os.path.join(args.data, teacher_shard_name(name))
            keys = None if redo else done_teacher_shard(out, dim)
            # a shard done by an earlier run: only its skipped samples are looked at again, to count them
            samples = teacher_inputs(os.path.join(args.data, name), S, skipped, drop=keys or ())
            n = len(keys) if keys is not None else len(samples)
            if keys is None:
                for i in range(0, len(samples), args.batch):
                    chunk = samples[i:i + args.batch]
                    t_img, t_txt = teacher_embed(model, tok, np.stack([c[2] for c in chunk]), [c[3] for c in chunk],
                                                 device)  # (b, D) float16 each
                    for (key, files, _, _), a, b in zip(chunk, t_img, t_txt):
                        files["teacher_image.npy"], files["teacher_text.npy"] = npy_bytes(a), npy_bytes(b)
                    bar.update(len(chunk))
                if n:
                    write_tar(out, [(key, files) for key, files, _, _ in samples])
            else:
                bar.update(n)
            if n:
                sizes[split].append((teacher_shard_name(name), n))
            else:
                warnings.warn(f"{name}: no usable samples; left out of the teacher shards")
    bar.close()

    # Only now, with every new shard on disk, does index.json point at them (atomically).
    for split in splits:
        info = index[split]
        if "shards_base" not in info:
            info["shards_base"] = info["shards"]
            if "shard_sizes" in info:
                info["shard_sizes_base"] = info["shard_sizes"]
        info["shards"] = [m for m, _ in sizes[split]]
        info["shard_sizes"] = [n for _, n in sizes[split]]
        info["num_samples"] = sum(info["shard_sizes"])
    index["teacher"] = {"ckpt": args.teacher, "dim": dim, "tokenizer_differs": differs,
                        "skipped": dict(sorted(skipped.items()))}
    save_json(index_path, index)
    counts = ", ".join(f"{s} {index[s]['num_samples']}" for s in splits)
    print(f"teacher embeddings (dim {dim}{', own tokenizer' if differs else ''}) in {args.data}: {counts}")
    if skipped:
        warnings.warn(f"add-teacher skipped {sum(skipped.values())} samples: {skip_summary(skipped)}")
    return index


# ----------------------------------------------------------------------------- negatives for existing shards

def negative_shard_name(name, suffix):
    """'train-000000.tar' -> 'train-000000.<suffix>.tar' beside it; a name with that suffix already keeps it."""
    stem = name[:-4] if name.endswith(".tar") else name
    return f"{stem}.tar" if stem.endswith(f".{suffix}") else f"{stem}.{suffix}.tar"


@cleans_up
def rewrite_json(parser, args, suffix, splits, update, settings):
    """Write <shard>.<suffix>.tar beside every shard of `splits`: the same members, each sample's json passed
    through update(key_id, meta, caption) -> number of negatives stored (0 is counted). Restartable: the shards
    done under these settings are listed in .add_<suffix>.json; index.json points at the new shards only once
    all are on disk. Returns {"without": samples left with none, "skipped": {reason: count}}."""
    index_path, state_path = os.path.join(args.data, "index.json"), os.path.join(args.data, f".add_{suffix}.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    state = {"settings": settings, "done": {}}
    if os.path.isfile(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                old = json.load(f)
            done = old["done"].values() if isinstance(old, dict) and isinstance(old.get("done"), dict) else None
            ok = done is not None and all(isinstance(d, dict) and isinstance(d.get("n"), int) and
                                          isinstance(d.get("without"), int) and isinstance(d.get("skipped"), dict)
                                          for d in done)
        except ValueError:  # empty, cut short or not JSON (UnicodeDecodeError included)
            ok = False
        if not ok:  # only a record of what is done: redoing every shard is always right
            warnings.warn(f"{state_path} is corrupt; ignoring it, every shard is redone")
        elif old.get("settings") == settings:  # other settings: every shard is redone
            state = old
    total = sum(index[s]["num_samples"] for s in splits)
    bar = tqdm(total=total or None, desc=f"add-{suffix}", unit="img", disable=args.quiet)
    for split in splits:
        for name in index[split]["shards"]:
            out = negative_shard_name(name, suffix)
            if out in state["done"] and os.path.isfile(os.path.join(args.data, out)):
                bar.update(state["done"][out]["n"])
                continue
            groups, bad = read_tar(os.path.join(args.data, name))
            without, skipped = 0, Counter({"bad_member": bad} if bad else {})
            for key in sorted(groups):
                files = groups[key]
                try:
                    meta = json.loads(files.get("json", b"{}"))
                    caption = files.get("txt", b"").decode("utf-8")
                except (ValueError, UnicodeDecodeError):  # the loader skips this sample; it is copied unchanged
                    skipped["bad_json_or_caption"] += 1
                    continue
                if not isinstance(meta, dict):
                    skipped["bad_json_or_caption"] += 1
                    continue
                without += update(f"{name}/{key}", meta, caption) == 0
                files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            write_tar(os.path.join(args.data, out), sorted(groups.items()))
            state["done"][out] = {"n": len(groups), "without": without, "skipped": dict(skipped)}
            save_json(state_path, state)
            bar.update(len(groups))
    bar.close()
    # Only now, with every new shard on disk, does index.json point at them (atomically).
    for split in splits:
        index[split]["shards"] = [negative_shard_name(n, suffix) for n in index[split]["shards"]]
    done = [state["done"][n] for s in splits for n in index[s]["shards"]]
    counts = {"without": sum(d["without"] for d in done),
              "skipped": dict(sum((Counter(d["skipped"]) for d in done), Counter()))}
    index[suffix] = {**settings, **counts}
    save_json(index_path, index)
    os.remove(state_path)  # a later run starts afresh from the shards index.json lists now
    print(f"{suffix} negatives in {args.data} ({', '.join(splits)}): {total - counts['without']} samples have some, "
          f"{counts['without']} have none" + (f"; skipped {skip_summary(counts['skipped'])}" if counts["skipped"] else ""))
    return index


def add_swaps(parser, args):
    """json "negatives" for every sample of every split: its synthetic "swaps" when it has them (they never name
    a held-out combination), else negative_captions(caption)."""
    splits = checked_splits(parser, args.data)

    def update(_, meta, caption):
        swaps = meta.get("swaps")
        meta["negatives"] = ([s for s in swaps.values() if isinstance(s, str)] if isinstance(swaps, dict)
                             else negative_captions(caption))
        return len(meta["negatives"])
    return rewrite_json(parser, args, "swaps", splits, update, {"rule": "swaps or negative_captions"})


@cleans_up
def add_negatives(parser, args):
    """json "mined" for every training sample (DPR-style hard negatives): the K captions of OTHER samples that a
    trained checkpoint scores highest for its image, never its own caption or an exact duplicate of it. One
    encoding pass (eval_zeroshot's, the embeddings --save_embeddings exports), then a chunked inner product."""
    import checkpoint_manager as cm
    import eval_zeroshot
    from dataloader import ShardLoader
    checked_splits(parser, args.data)
    if args.k < 1 or args.batch < 1 or args.chunk < 1:
        parser.error(f"--k, --batch and --chunk must be >= 1, got {args.k}, {args.batch}, {args.chunk}")
    if not os.path.isfile(args.model):
        parser.error(f"--model {args.model} does not exist")
    try:
        device = eval_zeroshot.pick_device(args.device)
        model, ckpt = cm.load_model(args.model, map_location=device)
        tok = Tokenizer.from_dict(ckpt["tokenizer"])  # the model reads captions with its own tokenizer
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        parser.error(f"--model {args.model}: not a usable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    with open(os.path.join(args.data, "index.json"), encoding="utf-8") as f:
        img_size = json.load(f)["img_size"]
    if model.config.vision.img_size != img_size:
        parser.error(f"--model takes {model.config.vision.img_size} px images but {args.data} has {img_size} px")
    model.eval()
    loader = ShardLoader(args.data, "train", args.batch, tok, model.config.text.context_length, shuffle=False,
                         drop_last=False, num_workers=args.workers)
    try:
        enc = eval_zeroshot.encode_split(model, loader, device, quiet=args.quiet)
        arrays = eval_zeroshot.embedding_arrays(enc, loader, tok)
    except ValueError as e:
        parser.error(f"--data {args.data}: {e}")
    finally:
        loader.close()
    # search over distinct captions: a caption shared by two samples is one key, excluded for both
    uniq, own = np.unique(arrays["captions"], return_inverse=True)  # (U,) sorted, (N,) each row's caption
    first = np.empty(len(uniq), dtype=np.int64)
    first[own[::-1]] = np.arange(len(own))[::-1]  # the first row holding each caption
    near = eval_zeroshot.nearest_captions(arrays["image"], arrays["text"][first], own, args.k, args.chunk)  # (N, k)
    mined = {i: [str(uniq[j]) for j in row] for i, row in zip(arrays["ids"].tolist(), near)}

    def update(key_id, meta, _):
        meta["mined"] = mined.get(key_id, [])  # a sample the loader could not read gets none (counted)
        return len(meta["mined"])
    return rewrite_json(parser, args, "mined", ["train"], update, {"model": args.model, "k": args.k})


def checked_splits(parser, data):
    """The splits of a shard folder made by this script (one clear error when it is not one)."""
    from dataloader import read_index
    if not os.path.isfile(os.path.join(data, "index.json")):
        parser.error(f"--data {data} has no index.json (make it with prep_dataset.py)")
    try:
        index = read_index(data)
    except ValueError as e:
        parser.error(str(e))
    return [s for s, v in index.items() if isinstance(v, dict) and "shards" in v]


# ----------------------------------------------------------------------------- CLI

MAX_IMG_SIZE = 1024  # a larger --img_size only fills memory: one 100k px image is 30 GB of pixels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard_size", type=int, default=1000, help="samples per tar shard")
    common.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (<= 1: none)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    real = argparse.ArgumentParser(add_help=False, parents=[common])
    real.add_argument("--img_size", type=int, default=224)
    real.add_argument("--vocab_size", type=int, default=8192)
    real.add_argument("--val_frac", type=float, default=0.05, help="fraction of samples for val")
    real.add_argument("--limit", type=int, default=None,
                      help="use only the first N samples of the source (text-to-image-2m: round-robin over its files)")
    real.add_argument("--overwrite", action="store_true",
                      help="delete the shards and state of an earlier run into --out and start over")

    p = sub.add_parser("synthetic", parents=[common], help="procedurally drawn shapes with captions")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_val", type=int, default=2000)
    p.add_argument("--img_size", type=int, default=32, help="32 px: the CPU demo; shapes stay recognisable")
    p.add_argument("--vocab_size", type=int, default=1024)
    p = sub.add_parser("text-to-image-2m", parents=[real], help="jackyhate/text-to-image-2M, streamed")
    p.add_argument("--out", default="data/t2i")
    p.add_argument("--data_files", nargs="+", default=None,
                   help="tar URLs or local paths/globs (default: the 512 px tars the hub lists; HF_ENDPOINT, HF_TOKEN)")
    p = sub.add_parser("hf", parents=[real], help="any image-caption dataset `datasets` streams: a hub id or a folder")
    p.add_argument("--name", required=True,
                   help="a hub dataset id (user/name; HF_ENDPOINT, HF_TOKEN) or a local folder in the hub's layout "
                        "(parquet/arrow files) or written by save_to_disk")
    p.add_argument("--config", default=None, help="the dataset's configuration (subset), if it has several")
    p.add_argument("--split", default="train", help="the split to read (--val_frac of it becomes val)")
    p.add_argument("--image_column", default=None, help="default: the one Image column")
    p.add_argument("--caption_column", default=None,
                   help="default: the one string or list-of-strings column (a list: the first caption trains, the "
                        "others go to json extra_captions)")
    p.add_argument("--out", required=True)
    for name, what in [("folder", "images with same-stem .txt captions, or class sub-folders"),
                       ("jsonl", 'a .jsonl file of {"image": path, "caption": text}'),
                       ("tar", "a webdataset .tar, or a folder of them")]:
        p = sub.add_parser(name, parents=[real], help=what)
        p.add_argument("--src", required=True, help=what)
        p.add_argument("--out", required=True)
    p = sub.add_parser("add-teacher", help="store a teacher checkpoint's embeddings in new shards (distillation)")
    p.add_argument("--data", required=True, help="a folder made by this script; index.json is rewritten")
    p.add_argument("--teacher", required=True, help="a checkpoint of ours (train.py)")
    p.add_argument("--batch", type=int, default=256, help="samples per teacher forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("add-swaps", help="store rule-based negative captions (json 'negatives') in new shards")
    p.add_argument("--data", required=True, help="a folder made by this script; index.json is rewritten")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("add-negatives", help="store mined hard-negative captions (json 'mined') in new shards")
    p.add_argument("--data", required=True, help="a folder made by this script; index.json is rewritten")
    p.add_argument("--model", required=True, help="a trained checkpoint of ours (train.py) that scores the captions")
    p.add_argument("--k", type=int, default=8, help="mined captions per training sample")
    p.add_argument("--batch", type=int, default=256, help="samples per forward pass")
    p.add_argument("--chunk", type=int, default=4096, help="query rows of the similarity matrix held at once")
    p.add_argument("--workers", type=int, default=0, help="loader processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.source == "add-teacher":
        return add_teacher(parser, args)
    if args.source == "add-swaps":
        return add_swaps(parser, args)
    if args.source == "add-negatives":
        return add_negatives(parser, args)
    if args.shard_size < 1 or args.workers < 0:
        parser.error("--shard_size must be >= 1 and --workers >= 0")
    if not 8 <= args.img_size <= MAX_IMG_SIZE:
        parser.error(f"--img_size must be in 8..{MAX_IMG_SIZE} (CLIP models take 224-448 px), got {args.img_size}")
    if args.vocab_size < 258:
        parser.error(f"--vocab_size must be >= 258 (256 bytes + sot + eot), got {args.vocab_size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; it must be a folder (made if missing)")
    if args.source == "synthetic":
        if args.num_train < 1 or args.num_val < 1:
            parser.error("--num_train and --num_val must be >= 1")
        make_out(parser, args.out)
        return prep_synthetic(args)
    if not 0 <= args.val_frac < 1:
        parser.error(f"--val_frac must be in [0, 1), got {args.val_frac}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    skipped = Counter()  # what the readers skip (the driver adds the workers' per-shard skips)
    if args.source == "hf":
        return prep_hf(parser, args, skipped)
    if args.source == "text-to-image-2m":
        hub = None
        if args.data_files:  # local globs are expanded here (sorted, so the stream order is fixed); URLs pass through
            files = [m for f in args.data_files for m in ([f] if is_url(f) else sorted(glob.glob(f)) or [f])]
            missing = [f for f in files if not is_url(f) and not os.path.isfile(f)]
            if missing:
                parser.error(f"--data_files: {missing[0]} is not a file")
            found = listing(files)
        else:
            files, found, hub = t2i_hub_files(parser)
        taken = [0] * len(files)
        extra = {"data_files": files, "data_files_taken": taken,  # taken: filled in as the stream is read
                 **({"hub": hub} if hub else {})}
        make_out(parser, args.out, args.overwrite)
        return prep_records(parser, args, "text-to-image-2m", t2i_records(files, skipped, taken), skipped, found,
                            extra=extra)
    if not os.path.exists(args.src):
        parser.error(f"--src {args.src} does not exist")
    if args.source == "tar":
        paths = sorted(glob.glob(os.path.join(glob.escape(args.src), "*.tar"))) if os.path.isdir(args.src) \
            else [args.src]
        if not paths:
            parser.error(f"--src {args.src} has no .tar files")
        make_out(parser, args.out, args.overwrite)
        records = itertools.chain.from_iterable(file_records(p, skipped) for p in paths)
        return prep_records(parser, args, "tar", records, skipped, listing(paths, args.src))
    if args.source == "folder" and not os.path.isdir(args.src):
        parser.error(f"--src {args.src} is not a folder")
    if args.source == "jsonl" and not os.path.isfile(args.src):
        parser.error(f"--src {args.src} is not a file")
    if args.source == "folder":
        records, classes = folder_records(args.src, skipped, args.seed)
        files = folder_listing(args.src)
    else:
        records, classes = jsonl_records(args.src, skipped, args.seed)
        files = listing([args.src] + sorted({r["image"] for r in records}), os.path.dirname(os.path.abspath(args.src)))
    if not records:
        parser.error(f"--src {args.src}: no usable images found")
    make_out(parser, args.out, args.overwrite)
    return prep_records(parser, args, args.source, iter(records), skipped, files, classes)


def make_out(parser, out, fresh=False):
    """The --out folder, made if missing; with --overwrite, emptied of an earlier run's files."""
    try:
        os.makedirs(out, exist_ok=True)
        if fresh:
            overwrite(out)
    except OSError as e:
        parser.error(f"--out {out}: {e.strerror or e}")


if __name__ == "__main__":
    main()
