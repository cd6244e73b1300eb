"""
Image-caption sources -> webdataset shards + index.json + tokenizer.json (the layout in DESIGN.md "Data on disk").

    python prep_dataset.py synthetic --out data/synthetic                  # 20k/2k procedurally drawn 64 px images
    python prep_dataset.py text-to-image-2m --out data/t2i --limit 100000  # jackyhate/text-to-image-2M, streamed
    python prep_dataset.py folder --src photos/ --out data/photos          # a.jpg + a.txt, or class sub-folders
    python prep_dataset.py jsonl --src pairs.jsonl --out data/pairs        # {"image": path, "caption": text}
    python prep_dataset.py tar --src shards/ --out data/mine               # existing webdataset tars
    python prep_dataset.py add-teacher --data data/synthetic --teacher out/big/ckpt/best.pt  # distillation

Every sample is stored as <key>.jpg (RGB, shorter side resized + centre-cropped to S x S, JPEG q95), <key>.txt
(the caption, UTF-8) and <key>.json (metadata), keys being 9-digit indices within a split. Shards are written to a
temp name then os.replace'd, so a shard on disk is always whole; the streamed sources keep a small
.prep_state.json so a re-run skips complete shards and continues where an interrupted one stopped.

The synthetic set is the one to debug a CLIP on: 8 colours x 8 shapes, 1-2 objects with sizes, positions and a
relation, captions from templates, a long caption per image plus "swapped" negatives (colours swapped, relation
reversed) for compositional evaluation, and 8 colour-shape combinations held out of the training split so zero-shot
generalisation to unseen combinations can be measured on val.

Bad data (undecodable or empty images, empty or non-UTF-8 captions, truncated tars, unsafe member names) is skipped,
counted per reason in index.json["skipped"] and warned about, never silent. Tar members are only read into memory,
never extracted to disk.

add-teacher runs a trained checkpoint over every sample (its own tokenizer on the raw caption, images resized to
its resolution) and writes <shard>.teacher.tar beside each shard: the same members plus <key>.teacher_image.npy
and <key>.teacher_text.npy (float16, L2-normalised). index.json then lists the new shards ("shards_base" keeps the
old list), and train.py --distill reads the stored embeddings instead of running the teacher.

Left out on purpose: image deduplication, caption filtering by language or CLIP score, aspect-ratio bucketing
(CLIP trains on square crops), and reading remote sources other than the one hub dataset.
"""

import argparse
import glob
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import tarfile
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from tokenizer import Tokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the tar source reads (the loader's set)
FOLDER_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")  # local files may be anything PIL opens
# jackyhate/text-to-image-2M, the 512 px part (webdataset tars of jpg + json {"prompt": ...}).
T2I_URLS = [f"https://huggingface.co/datasets/jackyhate/text-to-image-2M/resolve/main/data_512_2M/data_{i:06d}.tar"
            for i in range(47)]


# ----------------------------------------------------------------------------- writing shards

def write_tar(path, samples):
    """samples: [(key, {ext: bytes})] -> a tar at `path`, atomically. Members have mtime 0, uid 0 and no user
    names, so the bytes of a shard depend only on its samples (same args -> same bytes)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def sample_files(img, caption, meta):
    """One sample's members: a q95 JPEG, the caption and the metadata JSON."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return {"jpg": buf.getvalue(), "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def save_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def shard_captions(path):
    """The captions (.txt, plus json long/short when present) of a shard already on disk, for the tokenizer."""
    out = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.name.endswith(".txt"):
                out.append(tar.extractfile(m).read().decode("utf-8"))
            elif m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                out += [meta[k] for k in ("long", "short") if k in meta]
    return out


def finish(out, splits, extra, captions, vocab_size, skipped, quiet):
    """Train the tokenizer on the training captions, write tokenizer.json and index.json, report skips."""
    tok = Tokenizer().train(captions, vocab_size, quiet=quiet)
    tok.save(os.path.join(out, "tokenizer.json"))
    index = {**splits, **extra, "vocab_size": tok.vocab_size, "skipped": dict(sorted(skipped.items()))}
    save_json(os.path.join(out, "index.json"), index)
    counts = ", ".join(f"{s} {splits[s]['num_samples']} in {len(splits[s]['shards'])} shards" for s in splits)
    print(f"wrote {out}: {counts}, vocab {tok.vocab_size}")
    if skipped:
        msg = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        warnings.warn(f"skipped {sum(skipped.values())} samples/members: {msg}")
        print(f"skipped {sum(skipped.values())}: {msg}")
    else:
        print("skipped: none")
    return index


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


def articles(text):
    """'a orange' -> 'an orange' (templates always write 'a')."""
    return re.sub(r"\ba(?= [aeiou])", "an", text)


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
        meta = {"label": int(main), "long": articles(long), "short": caption, "source": "synthetic"}
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
    say = lambda ca, cb, rl: articles(template.format(c1=colours[ca], s1=SHAPES[s1], c2=colours[cb],
                                                      s2=SHAPES[s2], z1=z1, z2=z2, rel=RELATIONS[rl]))
    caption = say(c1, c2, rel)
    p1, p2 = (POSITIONS[p][1] for p in PAIR_POS[rel])
    long = (f"{caption}. there are two objects. the {colours[c1]} {SHAPES[s1]} is {z1} and sits {p1}. "
            f"the {colours[c2]} {SHAPES[s2]} is {z2} and sits {p2}. "
            f"the background is a {texture} pale {tint} gradient.")
    meta = {"label": int(main), "long": long, "short": caption,
            "swaps": {"attribute": say(c2, c1, rel), "relation": say(c1, c2, REVERSE[rel])}, "source": "synthetic"}
    return im.reduce(2), caption, meta


def synthetic_shard(job):
    """Worker: draw samples [start, end) of a split and write them as one shard; returns the training text."""
    path, split, start, end, seed, img_size, heldout = job
    samples, texts = [], []
    for i in range(start, end):
        img, caption, meta = synthetic_sample(seed, split, i, img_size, heldout)
        samples.append((f"{i:09d}", sample_files(img, caption, meta)))
        texts += [caption, meta["long"]]
    write_tar(path, samples)
    return split, end - start, texts


def prep_synthetic(args):
    os.makedirs(args.out, exist_ok=True)
    heldout = heldout_combos(args.seed)
    jobs, splits = [], {}
    for split, n in [("train", args.num_train), ("val", args.num_val)]:
        names = [f"{split}-{k:06d}.tar" for k in range(math.ceil(n / args.shard_size))]
        sizes = [min(args.shard_size, n - k * args.shard_size) for k in range(len(names))]
        splits[split] = {"shards": names, "shard_sizes": sizes, "num_samples": n}
        jobs += [(os.path.join(args.out, name), split, k * args.shard_size, k * args.shard_size + size,
                  args.seed, args.img_size, heldout) for k, (name, size) in enumerate(zip(names, sizes))]
    captions = []
    bar = tqdm(total=args.num_train + args.num_val, desc="synthetic", unit="img", disable=args.quiet)
    with multiprocessing.Pool(args.workers) if args.workers > 1 else nullpool() as pool:
        for split, n, texts in pool.imap(synthetic_shard, jobs):  # in order, so captions come out in order
            captions += texts if split == "train" else []
            bar.update(n)
    bar.close()
    extra = {"img_size": args.img_size, "source": "synthetic", "classes": CLASSES,
             "heldout": [f"{list(COLOURS)[c]} {SHAPES[s]}" for c, s in sorted(heldout)], "seed": args.seed}
    return finish(args.out, splits, extra, captions, args.vocab_size, Counter(), args.quiet)


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

def to_rgb(img):
    """Any PIL mode -> RGB: transparency composited on white, 16-bit greys scaled (not clipped) to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)  # 16-bit values 0..65535
        img = Image.fromarray(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")  # L, CMYK, P, 1, YCbCr, RGBA-on-white ... -> RGB


def load_image(data, img_size):
    """Encoded bytes -> RGB img_size x img_size: EXIF rotation applied, shorter side resized, centre-cropped."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img_size, img_size))  # JPEG only: decode at a reduced DCT scale >= the target (much faster)
    img.load()  # decodes now, so a truncated or corrupt file fails here
    img = to_rgb(ImageOps.exif_transpose(img))
    return ImageOps.fit(img, (img_size, img_size), method=Image.BICUBIC)  # resize shorter side + centre crop


def read_caption(value):
    """bytes/str/None -> (caption, None) or (None, skip reason). Long captions are kept whole; only the
    tokenizer truncates, at training time."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_utf8"
    if not isinstance(value, str) or not value.strip():
        return None, "empty_caption"
    return value.strip(), None


def make_sample(rec, img_size):
    """A raw record -> (img, caption, None) or (None, None, skip reason). Records carry the image as bytes or a
    path, and the caption as bytes/str, or inside json bytes/dict under "caption" or "prompt"."""
    caption = rec.get("caption")
    if caption is None and rec.get("json") is not None:
        meta = rec["json"]
        if isinstance(meta, bytes):
            try:
                meta = json.loads(meta.decode("utf-8"))
            except UnicodeDecodeError:
                return None, None, "bad_utf8"
            except ValueError:
                return None, None, "bad_json"
        meta = meta if isinstance(meta, dict) else {}
        caption = meta.get("caption", meta.get("prompt"))
    caption, reason = read_caption(caption)
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
        img = load_image(data, img_size)
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, DecompressionBombError, ...)
        return None, None, "decode_error"
    return img, caption, None


def record_shard(path, split, items, img_size, source, full):
    """Worker: items [(split index, stream index, record)] -> one shard. Returns its name, count, skips, text;
    `full` (the shard got all shard_size positions) is passed through for the restart state."""
    samples, skipped, captions = [], Counter(), []
    for j, i, rec in items:
        img, caption, reason = make_sample(rec, img_size)
        if reason:
            skipped[reason] += 1
            continue
        meta = {"source": source, "id": str(rec.get("id", i))}
        if rec.get("label") is not None:
            meta["label"] = rec["label"]
        samples.append((f"{j:09d}", sample_files(img, caption, meta)))
        captions.append(caption)
    write_tar(path, samples)
    return {"name": os.path.basename(path), "num_samples": len(samples), "skipped": dict(skipped),
            "captions": captions if split == "train" else [], "end": max(i for _, i, _ in items), "full": full}


# ----------------------------------------------------------------------------- sources of raw records

def split_of(i, val_frac):
    """Stream position -> (split, index within the split). Val takes positions where floor(i * val_frac) steps,
    so exactly floor(n * val_frac) of the first n are val, evenly spread, and the answer never depends on how
    long the stream is (a larger --limit later extends the same splits)."""
    if math.floor((i + 1) * val_frac) > math.floor(i * val_frac):
        return "val", math.floor(i * val_frac)
    return "train", i - math.floor(i * val_frac)


def safe_name(name):
    """Tar member names we accept: relative, without '..' parts (we never extract, but never trust them either)."""
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
                or ".." in re.split(r"[/\\]", name))


def tar_members(path, skipped):
    """(name, bytes) of the regular, safely named members of one tar, read into memory. A truncated tar yields
    its whole members, then counts one "truncated_tar" and warns."""
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.ReadError, OSError) as e:
        warnings.warn(f"{path}: not a readable tar ({e}); skipped")
        skipped["bad_tar"] += 1
        return
    truncated = False
    with tar:
        while True:
            try:
                m = tar.next()
            except (tarfile.ReadError, EOFError, OSError):
                truncated = True
                break
            if m is None:
                break
            if not safe_name(m.name) or m.issym() or m.islnk():
                skipped["unsafe_member"] += 1
                continue
            if not m.isfile():
                continue  # directories and the like carry no data
            try:
                data = tar.extractfile(m).read()
            except (tarfile.ReadError, EOFError, OSError):
                data = b""
            if len(data) != m.size:  # the file ends inside this member
                truncated = True
                break
            yield m.name, data
        # A whole tar ends with two zero blocks after the last member; missing ones mean the file was cut short
        # at a member boundary, which tarfile itself reports as a normal end.
        truncated = truncated or os.path.getsize(path) < tar.offset + 1024
    if truncated:
        warnings.warn(f"{path}: truncated tar; its complete members were read, the rest skipped")
        skipped["truncated_tar"] += 1


def tar_records(paths, skipped):
    """Webdataset grouping: consecutive members sharing a key (the name up to the basename's first dot) are one
    sample; image from jpg/jpeg/png/webp, caption from .txt or .json["caption"/"prompt"]."""
    def groups():
        for path in paths:
            key, group = None, {}
            for name, data in tar_members(path, skipped):
                head, base = os.path.split(name)
                k, _, ext = base.partition(".")
                k = os.path.join(head, k)
                if k != key and group:
                    yield key, group
                    group = {}
                key = k
                group[ext.lower()] = data
            if group:
                yield key, group
    for key, g in groups():
        image = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if image is None:
            skipped["missing_image"] += 1
        elif "txt" not in g and "json" not in g:
            skipped["missing_caption"] += 1
        else:
            yield {"id": key, "image": image, "caption": g.get("txt"), "json": g.get("json")}


def folder_records(src, skipped, seed):
    """Captioned (a.jpg + a.txt anywhere below src) or class folders (src/<class>/**/*.jpg); returns
    (records in a seeded order, class names or None)."""
    is_image = lambda p: p.rsplit(".", 1)[-1].lower() in FOLDER_EXTS and os.path.isfile(p)
    subdirs = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    top_images = [p for p in glob.glob(os.path.join(glob.escape(src), "*")) if is_image(p)]
    records, classes = [], None
    if subdirs and not top_images and not glob.glob(os.path.join(glob.escape(src), "**", "*.txt"), recursive=True):
        classes = [d.replace("_", " ") for d in subdirs]
        templates = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
                     "a photo of the {}.", "a {} in a photo."]
        for label, d in enumerate(subdirs):
            for p in sorted(glob.glob(os.path.join(glob.escape(src), d, "**", "*"), recursive=True)):
                if is_image(p):
                    rel = os.path.relpath(p, src)
                    t = templates[int(hashlib.md5(f"{seed}:{rel}".encode()).hexdigest(), 16) % len(templates)]
                    records.append({"id": rel, "image": p, "caption": articles(t.format(classes[label])),
                                    "label": label})
    else:
        for p in sorted(glob.glob(os.path.join(glob.escape(src), "**", "*"), recursive=True)):
            if is_image(p):
                txt = os.path.splitext(p)[0] + ".txt"
                if not os.path.isfile(txt):
                    skipped["missing_caption"] += 1
                    continue
                with open(txt, "rb") as f:
                    records.append({"id": os.path.relpath(p, src), "image": p, "caption": f.read()})
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
                row = json.loads(line.decode("utf-8"))
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


def t2i_records(data_files, start, stop):
    """jackyhate/text-to-image-2M (or any webdataset tars with jpg + json["prompt"]), streamed with the datasets
    library from position `start`; images stay encoded bytes here (decoded in the workers)."""
    from datasets import Image as HFImage, load_dataset
    ds = load_dataset("webdataset", data_files=data_files, split="train", streaming=True)
    ds = ds.cast_column("jpg", HFImage(decode=False)).skip(start)  # skip() passes over raw examples, no decoding
    for ex in ds if stop is None else ds.take(stop - start):
        jpg = ex.get("jpg")
        yield {"id": ex.get("__key__"), "image": jpg["bytes"] if jpg else None, "json": ex.get("json")}


# ----------------------------------------------------------------------------- the streaming driver

def prep_records(args, source, make_records, classes=None):
    """Cut a record stream into train/val shards in parallel, restartably.

    Stream position i goes to (split, j) = split_of(i) and shard j // shard_size of that split, so shard
    contents are a pure function of the stream. A shard counts as done when .prep_state.json says it was full
    and its file exists; a re-run with the same settings starts the stream at the first position of the first
    shard not done (make_records(start) skips the rest) and leaves done shards untouched."""
    os.makedirs(args.out, exist_ok=True)
    ss, limit = args.shard_size, args.limit
    settings = {"source": source, "src": getattr(args, "src", None), "data_files": getattr(args, "data_files", None),
                "img_size": args.img_size, "shard_size": ss, "val_frac": args.val_frac, "seed": args.seed}
    state_path = os.path.join(args.out, ".prep_state.json")
    state = {"settings": settings, "shards": {}}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("settings") == settings:
            state = old
    done = {n for n, s in state["shards"].items()
            if s["full"] and (limit is None or s["end"] < limit) and os.path.exists(os.path.join(args.out, n))}

    def name_of(i):  # the shard that stream position i lands in
        split, j = split_of(i, args.val_frac)
        return f"{split}-{j // ss:06d}.tar"

    start = next(i for i in itertools.count() if name_of(i) not in done)
    start = start if limit is None else min(start, limit)
    skipped = Counter()
    records = make_records(start, skipped)

    buffers, pending, captions = {"train": [], "val": []}, [], []
    bar = tqdm(desc=source, unit="img", initial=start, total=limit, disable=args.quiet)

    def collect():  # the oldest shard's result: record it in the state, atomically, before going on
        r = pending.pop(0).get()
        state["shards"][r["name"]] = {k: r[k] for k in ("num_samples", "skipped", "end", "full")}
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

    with multiprocessing.Pool(args.workers) if args.workers > 1 else nullpool() as pool:
        end = start
        for i, rec in zip(itertools.count(start), records):
            end = i + 1
            bar.update(1)
            split, j = split_of(i, args.val_frac)
            if name_of(i) in done:
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
    for split, n in n_split.items():
        names = [f"{split}-{k:06d}.tar" for k in range(math.ceil(n / ss))]
        names = [m for m in names if m in state["shards"] and state["shards"][m]["num_samples"] > 0]
        for m in names:
            skipped.update(state["shards"][m]["skipped"])
        sizes = [state["shards"][m]["num_samples"] for m in names]
        splits[split] = {"shards": names, "shard_sizes": sizes, "num_samples": sum(sizes)}
        if split == "train":
            for m in names:
                if m in done:  # written by an earlier run: read its captions back for the tokenizer
                    captions += shard_captions(os.path.join(args.out, m))
    if splits["val"]["num_samples"] == 0:
        warnings.warn(f"the val split is empty ({end} samples x val_frac {args.val_frac})")
    extra = {"img_size": args.img_size, "source": source, **({"classes": classes} if classes else {})}
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


def shard_groups(path, skipped):
    """A shard's members grouped by webdataset key, as the loader groups them: [(key, {ext: bytes})]."""
    groups = {}
    for name, data in tar_members(path, skipped):
        head, base = os.path.split(name)
        key, _, ext = base.partition(".")
        groups.setdefault(os.path.join(head, key), {})[ext.lower()] = data
    return list(groups.items())


def done_teacher_shard(path, dim):
    """Samples in a teacher shard left by an earlier run, or None when it must be (re)made. Shards are written
    atomically, so one that exists is whole; it counts only if every sample has both embeddings of size dim."""
    if not os.path.exists(path):
        return None
    from dataloader import map_file, scan_tar  # header scan only, no image data read
    buf = map_file(path)
    groups, _ = scan_tar(buf)
    want = ("teacher_image.npy", "teacher_text.npy")
    if not groups or not all(all(w in exts for w in want) for exts in groups.values()):
        return None
    off, size = next(iter(groups.values()))["teacher_image.npy"]
    shape = np.load(io.BytesIO(buf[off:off + size]), allow_pickle=False).shape
    return len(groups) if shape == (dim,) else None


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
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    dim, S = model.config.output_dim, int(index["img_size"])
    data_tok = os.path.join(args.data, "tokenizer.json")
    differs = not os.path.isfile(data_tok) or Tokenizer.load(data_tok).to_dict() != tok.to_dict()
    # shards made for another teacher are redone, whatever they hold
    redo = index.get("teacher", {}).get("ckpt") not in (None, args.teacher)
    splits = [s for s, v in index.items() if isinstance(v, dict) and "shards" in v]
    bases = {s: index[s].get("shards_base", index[s]["shards"]) for s in splits}  # a re-run starts from the originals
    total = sum(sum(index[s].get("shard_sizes_base", index[s].get("shard_sizes", [0]))) for s in splits)
    bar = tqdm(total=total or None, desc="add-teacher", unit="img", disable=args.quiet)
    skipped, sizes = Counter(), {}
    for split in splits:
        sizes[split] = []
        for name in bases[split]:
            out = os.path.join(args.data, teacher_shard_name(name))
            n = None if redo else done_teacher_shard(out, dim)
            if n is None:
                samples = []
                for key, files in shard_groups(os.path.join(args.data, name), skipped):
                    image = next((e for e in IMAGE_EXTS if e in files), None)
                    if image is None or "txt" not in files:
                        skipped["missing_image" if image is None else "missing_caption"] += 1
                        continue
                    try:
                        img = Image.open(io.BytesIO(files[image]))
                        img = img.convert("RGB") if img.mode != "RGB" else img
                        img = img.resize((S, S), Image.BICUBIC) if img.size != (S, S) else img  # as the loader
                        pixels = np.asarray(img).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S) uint8
                    except Exception:  # PIL raises many types for bad data
                        skipped["decode_error"] += 1
                        continue
                    caption = files["txt"].decode("utf-8", "replace")  # the raw caption, as the loader reads it
                    files = {e: d for e, d in files.items() if e not in ("teacher_image.npy", "teacher_text.npy")}
                    samples.append((key, files, pixels, caption))
                for i in range(0, len(samples), args.batch):
                    chunk = samples[i:i + args.batch]
                    t_img, t_txt = teacher_embed(model, tok, np.stack([c[2] for c in chunk]), [c[3] for c in chunk],
                                                 device)  # (b, D) float16 each
                    for (key, files, _, _), a, b in zip(chunk, t_img, t_txt):
                        files["teacher_image.npy"], files["teacher_text.npy"] = npy_bytes(a), npy_bytes(b)
                    bar.update(len(chunk))
                n = len(samples)
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
        msg = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        warnings.warn(f"add-teacher skipped {sum(skipped.values())} samples/members: {msg}")
    return index


# ----------------------------------------------------------------------------- CLI

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
    real.add_argument("--limit", type=int, default=None, help="use only the first N samples of the source")

    p = sub.add_parser("synthetic", parents=[common], help="procedurally drawn shapes with captions")
    p.add_argument("--out", default="data/synthetic")
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_val", type=int, default=2000)
    p.add_argument("--img_size", type=int, default=32, help="32 px: the CPU demo; shapes stay recognisable")
    p.add_argument("--vocab_size", type=int, default=1024)
    p = sub.add_parser("text-to-image-2m", parents=[real], help="jackyhate/text-to-image-2M, streamed")
    p.add_argument("--out", default="data/t2i")
    p.add_argument("--data_files", nargs="+", default=None,
                   help="tar URLs or local paths/globs (default: the 512 px shards on the hub)")
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
    args = parser.parse_args(argv)

    if args.source == "add-teacher":
        return add_teacher(parser, args)
    if args.shard_size < 1 or args.workers < 0:
        parser.error("--shard_size must be >= 1 and --workers >= 0")
    if args.img_size < 8:
        parser.error(f"--img_size must be >= 8, got {args.img_size}")
    if args.vocab_size < 258:
        parser.error(f"--vocab_size must be >= 258 (256 bytes + sot + eot), got {args.vocab_size}")
    if args.source == "synthetic":
        if args.num_train < 1 or args.num_val < 1:
            parser.error("--num_train and --num_val must be >= 1")
        return prep_synthetic(args)
    if not 0 <= args.val_frac < 1:
        parser.error(f"--val_frac must be in [0, 1), got {args.val_frac}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.source == "text-to-image-2m":
        files = args.data_files or T2I_URLS
        # local globs are expanded here (sorted, so the stream order is fixed); URLs are passed through
        files = [m for f in files for m in (sorted(glob.glob(f)) if not re.match(r"^\w+://", f) else [f]) or [f]]
        missing = [f for f in files if not re.match(r"^\w+://", f) and not os.path.exists(f)]
        if missing:
            parser.error(f"--data_files: {missing[0]} does not exist")
        args.data_files = files
        return prep_records(args, "text-to-image-2m", lambda start, skipped: t2i_records(files, start, args.limit))
    if not os.path.exists(args.src):
        parser.error(f"--src {args.src} does not exist")
    skipped = Counter()  # skips found while listing the source (the driver adds its own per-shard ones)
    if args.source == "tar":
        paths = sorted(glob.glob(os.path.join(glob.escape(args.src), "*.tar"))) if os.path.isdir(args.src) \
            else [args.src]
        if not paths:
            parser.error(f"--src {args.src} has no .tar files")
        make = lambda start, sk: itertools.islice(tar_records(paths, sk), start, args.limit)
        return prep_records(args, "tar", make)
    if args.source == "folder" and not os.path.isdir(args.src):
        parser.error(f"--src {args.src} is not a folder")
    if args.source == "jsonl" and not os.path.isfile(args.src):
        parser.error(f"--src {args.src} is not a file")
    lister = folder_records if args.source == "folder" else jsonl_records
    records, classes = lister(args.src, skipped, args.seed)
    if not records:
        parser.error(f"--src {args.src}: no usable images found")

    def make(start, sk):
        sk.update(skipped)
        return itertools.islice(records, start, args.limit)
    return prep_records(args, args.source, make, classes)


if __name__ == "__main__":
    main()
