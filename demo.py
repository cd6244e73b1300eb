"""
A small local web page to query a trained checkpoint: type a caption and see the images that match it best, click
(or upload, paste, drop) an image and see the images and captions nearest to it, classify it against labels you
type, and see which patches of it match a caption.

    python demo.py --ckpt out/tiny-syn32/ckpt/best.pt --images data/syn32          # a shard set: its val split
    python demo.py --ckpt best.pt --images ~/photos --port 8080 --topk 12          # a plain folder of images
    then open http://127.0.0.1:8000  (or http://127.0.0.1:8000/?q=a+red+star to start with a query)

How it works: every image (and every candidate text) is encoded once at start, in batches, and the normalised
embeddings are kept in memory and written to an .npz cache (--cache, default <ckpt>.demo.npz) keyed by the
checkpoint's size/mtime and the data files' names/sizes/mtimes, so a restart with the same inputs skips the
model entirely. A text query is then one text encoding and one (N, E) @ (E,) matmul; a clicked image needs no
model at all; an uploaded image is one image encoding. Every image is decoded by dataloader.decode_image, the
same code that made the shards and feeds training, so an upload is seen exactly as a training image would be.
The page is one HTML document with plain JS (no external asset: it works offline) that calls a JSON API:

    /api/info                          {"images", "texts", "data", "error", "hint", "labels_hint", "max_upload", ...}
    /api/browse?start=K                {"start", "total", "results": [item, ...]}         (the landing grid)
    /api/search?q=TEXT                 {"query", "results": [item + "score", ...]}        (top-k images)
    /api/similar_images?i=N            {"image": item, "results": [item + "score", ...]}  (top-k other images)
    /api/similar_texts?i=N             {"i", "caption", "results": [{"text", "kind", "score", "true"}, ...]}
    /api/classify?i=N&labels=a,b,c     {"labels", "results": [{"label", "score", "prob"}, ...]}
    /api/heatmap?i=N&q=TEXT            {"query", "grid", "heat": [[cosine per patch]], "score", "min", "max"}
    POST /api/query_image              body = image bytes -> {"width", "height", "images": [...], "texts": [...]}
    POST /api/classify?labels=a,b      body = image bytes -> as GET
    POST /api/heatmap?q=TEXT           body = image bytes -> as GET
    /api/image/N                       the image as JPEG bytes (served from memory)
An item is {"i", "name" (file name or shard key), "label" (class name or ""), "caption"}. The page keeps its
query in the URL (?q=TEXT, ?i=N, &labels=a,b), so a link reopens it and the back button steps through queries.

Every failure is an {"error": "..."} answer with a 4xx/5xx status that the page shows as one line (never a
traceback): an empty query, an image number out of range, bytes that are not an image (or not JPEG, PNG, WebP, GIF,
BMP or TIFF: no other decoder is ever tried), a body over --max_upload_mb or slower than --timeout, an image that
stopped decoding since the start (those that did not decode then are left out), fewer than two labels, a Host header
that is not this server, a checkpoint that is corrupt or does not fit clip.py. Scores are cosine similarities in
[-1, 1] (the logits CLIP uses are these times exp(logit_scale)); a classification's "prob" is the softmax of those
logits over the typed labels, each label's text embedding being the normalised mean over eval_zeroshot.TEMPLATES
(CLIP's prompt ensembling).

Candidate texts for an image: "a photo of a <class>." for each class of a labelled shard set (or each class
folder), plus every distinct caption of the images shown (shard .txt members, or a.txt beside a.jpg).

The patch heatmap ("where does it look?"). The vision tower turns the image into 1 + g*g tokens (the class token
and one per patch), runs them through its blocks, and CLIP keeps only the class token: ln_post, then the
projection into the shared space, then normalise; that is the image embedding. The heatmap sends every other
token down the same road: the last block's (1 + g*g, C) hidden states -> ln_post -> proj -> (1 + g*g, E),
normalised, and each patch token's cosine with the text embedding is one cell of the g x g map (row 0 of the
same computation is the image embedding itself, which the tests check). The page colours the cells from the
lowest (blue, transparent) to the highest (red) cosine of that image and lays them over the image, cropped as the
model saw it. Known limits: (1) only the class token is trained against text; patch tokens reach the shared space
through a projection that never saw them, so their alignment is a by-product: maps are coarse, noisy, and on
larger CLIPs often inverted or lit on background patches (MaskCLIP, Zhou et al. 2022, and CLIP Surgery, Li et al.
2023, dig into why and fix it); (2) after a few blocks of attention each token carries context from the whole
image, so a cell is not "these pixels alone"; (3) the resolution is one value per patch (4 x 4 for the micro
preset at 32 px, 14 x 14 for ViT-B/16 at 224 px); (4) the colours are relative to the one image: a text that
matches nothing still lights its least-bad patch, so read the map next to the score.

Hardening (it is a local tool, but a browser page from anywhere can talk to localhost): the server binds to
127.0.0.1 unless told otherwise; a request whose Host header is not an IP address, localhost or an --allowed_hosts
name is refused (a DNS-rebinding page could otherwise read the images); a request must arrive whole within --timeout
seconds (one deadline, not one per read: a client trickling a byte a second is cut off too), its answer is sent
within as long again, and connections are served by a fixed pool of --threads threads (the rest wait in the listen
backlog), so idle, half-open or slow clients cannot pile up threads; POST bodies must state their length and are
capped (--max_upload_mb); uploads over MAX_PIXELS are refused before decoding; every answer carries
X-Content-Type-Options: nosniff and a Content-Security-Policy that allows only this page's own inline script and
style (by hash), images from this server or the user's own upload, and fetches to this server.

Left out on purpose: storing uploads (the page keeps the file and sends it again to classify it or map it), an
approximate-nearest-neighbour index (a brute-force matmul over 100k images takes milliseconds), authentication,
HTTPS, and any JS framework or external asset.
"""

import argparse
import base64
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint_manager as cm
from clip import normalize_images
from dataloader import (FOLDER_EXTS, IMAGE_FORMATS, articles, class_folders, complete, decode_image, image_array,
                        image_ext, is_image_file, map_file, read_index, scan_tar, walk_files)
from eval_zeroshot import TEMPLATES, encode_images, encode_texts, zeroshot_classifier
from tokenizer import Tokenizer

TEMPLATE = "a photo of a {}."  # class name -> candidate text
CACHE_VERSION = 3  # bump when what goes into the cache changes (2: decode_image, 3: the broken images' numbers)
THUMB = 256  # images from a folder are served as JPEGs of at most this many pixels a side
PAGE_SIZE = 48  # images per page of the landing grid
MAX_QUERY = 500  # characters of a caption query
MAX_LABELS, MAX_LABEL = 64, 100  # typed labels: how many, and characters each
MAX_PIXELS = 40_000_000  # an upload larger than this is refused before it is decoded (a 40 MP photo is ~120 MB RGB)

# -----------------------------------------------------------------------------
# the images: a shard split or a folder, held as JPEG bytes (shards) or paths (folder)


class Gallery:
    """Images with their captions, labels and names. self.items[i] is (bytes, ext) for a shard member (a slice of
    the mmapped tar, read on demand) or (path, None) for a file; self.files are the data files (for the cache key)."""

    def __init__(self, root, split="val", limit=None):
        self.items, self.captions, self.labels, self.names, self.classes, self.files = [], [], [], [], [], []
        shards = os.path.isfile(os.path.join(root, "index.json"))
        if shards:
            self.read_shards(root, split)
        else:
            self.read_folder(root)
        if limit is not None:
            self.items, self.captions = self.items[:limit], self.captions[:limit]
            self.labels, self.names = self.labels[:limit], self.names[:limit]
        if not self.items:
            raise ValueError(f"no images found in {root}" + (f" (split {split!r})" if shards else
                                                             f" (looked for {', '.join(FOLDER_EXTS)} files)"))
        self.jpeg = lru_cache(maxsize=1024)(self.make_jpeg)  # folder images are re-encoded once, not per request

    def read_shards(self, root, split):
        index = read_index(root, split)  # one ValueError line for a broken index or a missing split
        self.classes = list(index.get("classes") or [])
        skipped = 0
        for name in sorted(index[split]["shards"]):
            path = os.path.join(root, name)
            self.files.append(path)
            buf = map_file(path)  # read-only mmap: nothing is extracted, pages are read when an image is asked for
            groups, bad = scan_tar(buf)
            skipped += bad
            get = lambda span: bytes(buf[span[0]:span[0] + span[1]])
            for key in sorted(groups):
                exts = groups[key]
                if not complete(exts, ()):  # no image member
                    skipped += 1
                    continue
                ext = image_ext(exts)
                self.items.append((memoryview(buf)[exts[ext][0]:exts[ext][0] + exts[ext][1]], ext))
                self.names.append(f"{key}.{ext}")
                self.captions.append(get(exts["txt"]).decode("utf-8", "replace").strip() if "txt" in exts else "")
                try:
                    label = int(json.loads(get(exts["json"])).get("label", -1)) if "json" in exts else -1
                except (ValueError, TypeError, AttributeError):  # broken json: the image stays, unlabelled
                    label, skipped = -1, skipped + 1
                self.labels.append(label)
        if skipped:
            warnings.warn(f"{skipped} tar members, samples without an image or broken json were skipped in "
                          f"{root} ({split})")

    def read_folder(self, root):
        # walked as prep_dataset walks a folder (dataloader.walk_files): never out of root, never into a loop
        skipped, walked = Counter(), set()
        layout = class_folders(root, skipped)  # root/<class>/**/*.jpg, no captions: folder names are the classes
        if layout is not None:
            self.classes, items, empty = layout
            if empty:
                warnings.warn(f"{len(empty)} sub-folder(s) of {root} hold no image and are not classes: {empty[:5]}")
            self.files, self.labels = [p for p, _ in items], [label for _, label in items]
        else:
            walked = set(walk_files(root, skipped))
            self.files = sorted(p for p in walked if is_image_file(p))
            self.labels = [-1] * len(self.files)
        for p in self.files:
            self.items.append((p, None))
            self.names.append(os.path.relpath(p, root))
            txt = os.path.splitext(p)[0] + ".txt"  # a.jpg + a.txt: prep_dataset's captioned-folder layout
            try:
                self.captions.append(read_text(txt) if txt in walked else "")
            except OSError:  # no permission, or gone since the walk: the image stays, without a caption
                self.captions.append("")
                skipped["unreadable_caption"] += 1
        if skipped:
            warnings.warn(f"{root}: passed over {', '.join(f'{n} {r}' for r, n in sorted(skipped.items()))} "
                          "(links are followed only to files inside it)")

    def keep(self, indices):
        """Keep only the images at `indices` (build drops the ones that do not decode)."""
        for name in ("items", "captions", "labels", "names"):
            setattr(self, name, [getattr(self, name)[i] for i in indices])

    def __len__(self):
        return len(self.items)

    def data(self, i):
        """Image i's encoded bytes."""
        src, ext = self.items[i]
        if ext is not None:
            return bytes(src)
        with open(src, "rb") as f:
            return f.read()

    def pixels(self, i, size):
        """Image i -> uint8 (3, size, size), prepared like the shards (short side resized, centre crop)."""
        return torch.from_numpy(image_array(decode_image(self.data(i), size)))

    def make_jpeg(self, i):
        """Image i as JPEG bytes for the browser: a shard's JPEG member as it is, anything else re-encoded."""
        if self.items[i][1] in ("jpg", "jpeg"):
            return self.data(i)
        im = decode_image(self.data(i))  # EXIF rotation, alpha on white, 16-bit and CMYK handled as for training
        im.thumbnail((THUMB, THUMB))  # keeps the aspect ratio; never enlarges
        out = io.BytesIO()
        im.save(out, "JPEG", quality=90)
        return out.getvalue()

    def item(self, i):
        """What the page shows under an image."""
        label = self.labels[i]
        return {"i": i, "name": self.names[i], "caption": self.captions[i],
                "label": self.classes[label] if 0 <= label < len(self.classes) else ""}


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").strip()


def candidate_texts(gallery):
    """[(text, kind)]: one prompt per class, then each distinct non-empty caption (first kind wins on a tie)."""
    texts = {articles(TEMPLATE.format(c)): "class" for c in gallery.classes}
    for c in gallery.captions:
        if c:
            texts.setdefault(c, "caption")
    return list(texts.items())


def parse_labels(text):
    """"cat, dog\\nbird" -> ["cat", "dog", "bird"]: split on commas and newlines, trimmed, duplicates dropped."""
    return list(dict.fromkeys(s.strip() for s in (text or "").replace("\n", ",").split(",") if s.strip()))


# -----------------------------------------------------------------------------
# embeddings, computed once and cached


def cache_key(ckpt, gallery, texts):
    """A hash of everything the embeddings depend on: the checkpoint file, the data files, the candidate texts."""
    stat = lambda p: [os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns]
    parts = {"version": CACHE_VERSION, "ckpt": stat(ckpt), "data": [stat(p) for p in gallery.files],
             "images": len(gallery), "texts": [t for t, _ in texts]}
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_cache(path, key, n_images, n_texts):
    """(image_emb, text_emb, broken image numbers) from the .npz at path when its key matches, else None."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or len(z["image"]) != n_images or len(z["text"]) != n_texts:
                return None  # another checkpoint or other data: recompute (and overwrite)
            return torch.from_numpy(z["image"]), torch.from_numpy(z["text"]), z["broken"].tolist()
    except Exception as e:  # a truncated or foreign file is only a cache miss
        warnings.warn(f"ignoring unreadable cache {path}: {type(e).__name__}: {e}")
        return None


def save_cache(path, key, image_emb, text_emb, broken=()):
    """np.savez to a temp file in the same directory, then os.replace: a crash never leaves half a cache.
    The temp name ends in ".partial", not ".tmp", which CheckpointManager sweeps from a ckpt folder."""
    tmp = None
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".demo-cache.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:  # a file object: np.savez does not append ".npz" to it
            np.savez(f, key=np.array(key), image=image_emb.numpy(), text=text_emb.numpy(),
                     broken=np.array(broken, dtype=np.int64))
        os.replace(tmp, path)
    except OSError as e:  # a read-only checkpoint folder costs the next start some time, nothing else
        warnings.warn(f"could not write the embedding cache {path}: {e}")
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


@torch.inference_mode()
def embed_gallery(model, tokenizer, gallery, texts, device, batch=256, quiet=False):
    """Normalised float32 embeddings on the CPU: images (N, E) and candidate texts (M, E), and the numbers of the
    images that did not decode (their rows are a black image's embedding, for build to drop)."""
    size, parts, broken = model.config.vision.img_size, [], []
    for s in tqdm(range(0, len(gallery), batch), desc="encode images", unit="batch", disable=quiet):
        pixels = []
        for i in range(s, min(s + batch, len(gallery))):
            try:
                pixels.append(gallery.pixels(i, size))
            except Exception:  # PIL raises many types for a broken file (or a format not in IMAGE_FORMATS)
                pixels.append(torch.zeros(3, size, size, dtype=torch.uint8))  # keeps indices aligned
                broken.append(i)
        parts.append(encode_images(model, torch.stack(pixels), device).cpu())  # (b, E)
    text_emb = encode_texts(model, tokenizer, [t for t, _ in texts], device, batch=batch).cpu()  # (M, E)
    return torch.cat(parts), text_emb, broken


@torch.inference_mode()
def patch_similarity(model, images, text_emb):
    """uint8 (B, 3, S, S) images, normalised (E,) text embedding -> (B, g, g) cosine of each patch token with the
    text, every token taken down the class token's road (ln_post, proj); see the module docstring."""
    visual = model.visual
    x = normalize_images(images.to(text_emb.device))  # (B, 3, S, S) float
    _, hidden = visual(x, return_hidden=True)  # hidden[-1]: (B, 1 + g*g, C) after the last block
    tokens = F.normalize(visual.proj(visual.ln_post(hidden[-1])).float(), dim=-1)  # (B, 1 + g*g, E)
    return (tokens[:, 1:] @ text_emb).view(len(images), visual.grid, visual.grid)  # (B, g, g)


# -----------------------------------------------------------------------------
# the demo: answers to the API, as (HTTP status, JSON-able dict)


class Demo:

    def __init__(self, gallery, texts, topk, model=None, tokenizer=None, device="cpu", image_emb=None,
                 text_emb=None, error=None, description=""):
        self.gallery, self.texts, self.topk, self.error, self.description = gallery, texts, topk, error, description
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.image_emb, self.text_emb = image_emb, text_emb  # (N, E), (M, E) normalised, CPU
        self.lock = threading.Lock()  # one model call at a time: the server answers requests in threads
        self.classifiers = OrderedDict()  # labels tuple -> (C, E) ensembled label embeddings, a small LRU
        self.max_upload = 8 * 2**20  # bytes; make_server sets it from --max_upload_mb (the page checks it first)

    # --- inputs: an image number, a caption, labels, uploaded bytes -> value or an error answer

    def image_index(self, value):
        """A user's image number -> int, or an error answer."""
        try:
            i = int(value)
        except (TypeError, ValueError):
            return None, (400, {"error": f"the image number must be an integer, got {value!r}"})
        if not 0 <= i < len(self.gallery):
            return None, (404, {"error": f"no image #{i}: pick a number from 0 to {len(self.gallery) - 1}"})
        return i, None

    def caption(self, q):
        q = (q or "").strip()
        if not q:
            return None, (400, {"error": f"type a caption to search for, e.g. \"{self.hint()}\""})
        if len(q) > MAX_QUERY:
            return None, (400, {"error": f"the caption is {len(q)} characters long; at most {MAX_QUERY}"})
        return q, None

    def upload(self, data):
        """Uploaded bytes -> (uint8 (3, S, S) pixels, (width, height)) decoded by the one image decoder, or
        (None, error answer)."""
        if not data:
            return None, (400, {"error": "the request body is empty: send the image's bytes"})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked next
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # reads the header only
                    w, h = im.size
                if w * h > MAX_PIXELS:
                    return None, (413, {"error": f"the image is {w}x{h} pixels; the demo decodes at most "
                                                 f"{MAX_PIXELS:,}"})
                img = decode_image(data, self.img_size)
        except Image.UnidentifiedImageError:
            return None, (400, {"error": "the upload is not an image this demo reads (JPEG, PNG, WebP, GIF, BMP, TIFF)"})
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for a truncated or broken file
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return None, (400, {"error": f"could not decode the uploaded image ({type(e).__name__}: {first})"})
        return torch.from_numpy(image_array(img)), (w, h)

    def image_source(self, value, body, pixels=False):
        """?i=N (a shown image) or a POSTed body (an upload) -> ((E,) embedding, uint8 (3, S, S) pixels or None),
        or an error answer. A shown image is decoded again only when its pixels are asked for (a heatmap)."""
        if body is not None:
            x, err = self.upload(body)
            if x is None:
                return None, err
            with self.lock:
                return (encode_images(self.model, x[None], self.device).cpu()[0], x), None  # (E,)
        i, err = self.image_index(value)
        if err:
            return None, err
        x, err = self.shown(i, lambda i: self.gallery.pixels(i, self.img_size)) if pixels else (None, None)
        return (None, err) if err else ((self.image_emb[i], x), None)

    def shown(self, i, how):
        """how(i) on gallery image i (its JPEG or its pixels) -> (value, None), or (None, error answer) when its bytes
        do not decode: build left out the images that did not, so this one was changed or removed since (or the
        checkpoint is unusable and nothing was decoded at the start)."""
        try:
            return how(i), None
        except Exception as e:  # PIL raises many types for a broken file; a removed one is an OSError
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return None, (422, {"error": f"image #{i} ({self.gallery.names[i]}) could not be read or decoded "
                                         f"({type(e).__name__}: {first})"})

    @property
    def img_size(self):
        return self.model.config.vision.img_size

    def labels_hint(self):
        return ", ".join(self.gallery.classes[:4] or ["a photo", "a drawing", "a diagram"])

    def hint(self):
        """A query the data can answer: the first caption, else the first class name."""
        return next((c for c in self.gallery.captions if c), None) or \
            (articles(f"a {self.gallery.classes[0]}") if self.gallery.classes else "a photo of a dog")

    # --- answers

    def info(self):
        cfg = self.model.config.vision if self.model is not None else None
        return 200, {"images": len(self.gallery), "texts": len(self.texts), "topk": self.topk,
                     "data": self.description, "error": self.error, "hint": self.hint(),
                     "labels_hint": self.labels_hint(), "page": PAGE_SIZE, "max_upload": self.max_upload,
                     "img_size": cfg.img_size if cfg else None, "grid": cfg.img_size // cfg.patch_size if cfg else None}

    def browse(self, start):
        """The landing grid: PAGE_SIZE images from `start` on."""
        try:
            start = max(0, int(start or 0))
        except ValueError:
            return 400, {"error": f"start must be an integer, got {start!r}"}
        items = [self.gallery.item(i) for i in range(start, min(start + PAGE_SIZE, len(self.gallery)))]
        return 200, {"start": start, "total": len(self.gallery), "results": items}

    def ranked(self, scores, exclude=None):
        """(N,) scores -> the top-k images as items with their score, best first."""
        if exclude is not None:
            scores = scores.clone()
            scores[exclude] = -float("inf")
        top = torch.topk(scores, min(self.topk, len(scores) - (exclude is not None)))
        return [{**self.gallery.item(i), "score": round(s, 4)} for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def ranked_texts(self, emb, own=()):
        scores = self.text_emb @ emb  # (M,)
        top = torch.topk(scores, min(self.topk, len(scores)))
        return [{"text": self.texts[j][0], "kind": self.texts[j][1], "score": round(s, 4),
                 "true": self.texts[j][0] in own} for s, j in zip(top.values.tolist(), top.indices.tolist())]

    def search(self, q):
        """Caption -> the top-k images by cosine similarity."""
        q, err = self.caption(q)
        if err:
            return err
        if self.error:
            return 503, {"error": self.error}
        with self.lock:
            query = encode_texts(self.model, self.tokenizer, [q], self.device).cpu()[0]  # (E,)
        return 200, {"query": q, "results": self.ranked(self.image_emb @ query)}  # (N,) cosine similarities

    def similar_images(self, value):
        """Image number -> the top-k other images."""
        i, err = self.image_index(value)
        if err:
            return err
        if self.error:
            return 503, {"error": self.error}
        return 200, {"image": self.gallery.item(i), "results": self.ranked(self.image_emb @ self.image_emb[i], i)}

    def similar_texts(self, value):
        """Image number -> the top-k candidate texts; "true" marks the image's own caption or class."""
        i, err = self.image_index(value)
        if err:
            return err
        if self.error:
            return 503, {"error": self.error}
        label = self.gallery.labels[i]
        own = {self.gallery.captions[i]} | ({articles(TEMPLATE.format(self.gallery.classes[label]))}
                                            if 0 <= label < len(self.gallery.classes) else set())
        return 200, {"i": i, "caption": self.gallery.captions[i], "results": self.ranked_texts(self.image_emb[i], own),
                     **({} if self.texts else {"note": "these images have no captions or classes to rank"})}

    def query_image(self, body):
        """Uploaded image -> the top-k images and the top-k candidate texts."""
        if self.error:
            return 503, {"error": self.error}
        pixels, size = self.upload(body)
        if pixels is None:
            return size  # (None, error answer)
        with self.lock:
            emb = encode_images(self.model, pixels[None], self.device).cpu()[0]  # (E,)
        return 200, {"width": size[0], "height": size[1], "images": self.ranked(self.image_emb @ emb),
                     "texts": self.ranked_texts(emb)}

    def classify(self, value, labels, body=None):
        """A shown (?i=N) or uploaded image against typed labels: cosine and softmax probability per label."""
        labels = parse_labels(labels)
        if len(labels) < 2:
            return 400, {"error": f"type two or more labels, comma-separated, e.g. \"{self.labels_hint()}\""}
        if len(labels) > MAX_LABELS or max(map(len, labels)) > MAX_LABEL:
            return 400, {"error": f"at most {MAX_LABELS} labels of at most {MAX_LABEL} characters each"}
        if self.error:
            return 503, {"error": self.error}
        src, err = self.image_source(value, body)
        if err:
            return err
        emb = src[0]
        with self.lock:
            key = tuple(labels)
            if key not in self.classifiers:  # C * len(TEMPLATES) text encodings, once per set of labels
                self.classifiers[key] = zeroshot_classifier(self.model, self.tokenizer, labels, TEMPLATES,
                                                            self.device).cpu()  # (C, E)
                if len(self.classifiers) > 64:
                    self.classifiers.popitem(last=False)
            self.classifiers.move_to_end(key)
            classifier, scale = self.classifiers[key], self.model.logit_scale.exp().item()
        scores = classifier @ emb  # (C,) cosine per label
        probs = torch.softmax(scale * scores, dim=0)  # (C,) CLIP's logits, softmaxed over the typed labels
        order = torch.argsort(probs, descending=True).tolist()
        return 200, {"labels": labels, "templates": len(TEMPLATES), "results": [
            {"label": labels[k], "score": round(scores[k].item(), 4), "prob": round(probs[k].item(), 4)} for k in order]}

    def heatmap(self, value, q, body=None):
        """A shown or uploaded image and a caption -> the g x g patch cosines (see patch_similarity)."""
        q, err = self.caption(q)
        if err:
            return err
        if self.error:
            return 503, {"error": self.error}
        src, err = self.image_source(value, body, pixels=True)
        if err:
            return err
        emb, pixels = src  # (E,), (3, S, S) uint8
        with self.lock:
            text = encode_texts(self.model, self.tokenizer, [q], self.device)[0]  # (E,)
            heat = patch_similarity(self.model, pixels[None], text)[0].cpu()  # (g, g)
        return 200, {"query": q, "grid": heat.shape[0], "heat": [[round(v, 4) for v in row] for row in heat.tolist()],
                     "score": round((emb @ text.cpu()).item(), 4), "min": round(heat.min().item(), 4),
                     "max": round(heat.max().item(), 4)}


def build(ckpt, images, split="val", topk=8, cache=None, device="cpu", batch=256, limit=None, quiet=False):
    """Read the images, load the checkpoint and embed everything (or read the cache) -> Demo. A checkpoint that
    cannot be used is not fatal: the page still shows the images and says what is wrong with it."""
    gallery = Gallery(images, split, limit)
    texts = candidate_texts(gallery)
    shards = os.path.isfile(os.path.join(images, "index.json"))
    describe = lambda: f"{len(gallery)} images from {os.path.basename(os.path.normpath(images))}" + \
        (f" ({split})" if shards else "")
    what = describe()
    try:
        model, state = cm.load_model(ckpt, map_location=device)
        tokenizer = Tokenizer.from_dict(state["tokenizer"]) if "tokenizer" in state else \
            Tokenizer.load(os.path.join(images, "tokenizer.json"))
    except Exception as e:  # missing, corrupt, not ours, or a model clip.py cannot rebuild
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix(f"cannot load checkpoint {ckpt}: ")
        error = f"cannot use checkpoint {ckpt}: {first[:300]}"
        print(f"error: {error}", file=sys.stderr)
        return Demo(gallery, texts, topk, error=error, description=what)
    key = cache_key(ckpt, gallery, texts)
    cached = load_cache(cache, key, len(gallery), len(texts))
    if cached is not None:
        image_emb, text_emb, broken = cached
        if not quiet:
            print(f"loaded embeddings of {what} and {len(texts)} texts from {cache}")
    else:
        image_emb, text_emb, broken = embed_gallery(model, tokenizer, gallery, texts, device, batch, quiet)
        if cache:
            save_cache(cache, key, image_emb, text_emb, broken)
        if not quiet:
            print(f"encoded {what} and {len(texts)} texts" + (f"; cached in {cache}" if cache else ""))
    if broken:  # left out, so no answer ever points at an image the server cannot show
        warnings.warn(f"{len(broken)} image(s) could not be decoded and are left out: "
                      f"{', '.join(gallery.names[i] for i in broken[:5])}")
        keep = sorted(set(range(len(gallery))) - set(broken))
        if not keep:
            raise ValueError(f"none of the {len(gallery)} images in {images} could be decoded")
        gallery.keep(keep)
        image_emb, what = image_emb[keep], describe()  # (N', E)
    return Demo(gallery, texts, topk, model, tokenizer, device, image_emb, text_emb, description=what)


# -----------------------------------------------------------------------------
# the page: plain HTML, CSS and JS in one document; the CSP allows exactly this script and style (by hash)

STYLE = """
 body { font-family: sans-serif; margin: 1.2em; max-width: 76em; }
 [hidden] { display: none !important; }
 h1 { margin: 0 0 .2em; font-size: 1.5em; } h1 a { color: inherit; text-decoration: none; }
 h2 { font-size: 1.1em; margin: .8em 0 .4em; } h3 { margin: .2em 0; } h4 { margin: .2em 0; }
 form { margin: .3em 0; } .dim { color: #666; font-size: 12px; }
 #error { color: #b00020; font-weight: bold; min-height: 1.3em; margin: .3em 0; }
 #loading { color: #555; font-style: italic; margin: .3em 0; }
 #results { display: flex; flex-wrap: wrap; gap: 10px; }
 figure { margin: 0; width: 112px; cursor: pointer; font-size: 11px; overflow-wrap: anywhere; }
 figure img { width: 104px; height: 104px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
 figure:hover img { border-color: #06c; }
 figcaption span { display: block; }
 .score { font-weight: bold; } .label { color: #06c; } .name { color: #666; }
 .true { color: #0a7a0a; font-weight: bold; }
 #detail { border: 1px solid #ddd; padding: .6em; margin: .6em 0; }
 .row { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: flex-start; }
 .col { min-width: 15em; max-width: 20em; } ol { padding-left: 1.4em; margin: .3em 0; font-size: 13px; }
 .frame { position: relative; width: 144px; height: 144px; flex: none; }
 .frame img, .frame canvas { position: absolute; left: 0; top: 0; width: 144px; height: 144px; }
 .frame img { object-fit: cover; image-rendering: pixelated; } /* cover = the centre crop the model sees */
 .bar { display: inline-block; height: .8em; background: #06c; margin-right: .4em; vertical-align: middle; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let info = {}, gen = 0, pending = 0, target = null, lastUpload = null;  // target: {i} or {blob} of the panel
function el(tag, text, cls) {  // text goes in as textContent: captions are never parsed as HTML
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function clearPanels() {  // a new query: nothing of the previous one stays on screen
  for (const id of ["results", "texts", "classes", "picked-meta", "heat-note", "results-title", "error"])
    $(id).replaceChildren();
  $("detail").hidden = true; $("more").hidden = true; $("heatmap").hidden = true; delete $("heatmap").dataset.query;
  $("picked-img").removeAttribute("src"); $("heat-img").removeAttribute("src"); target = null;
}
// every API answer is JSON; one with an "error" field is shown on the page. Answers to an older query
// (gen moved on while they were under way) are dropped, so a slow answer never overwrites a newer one.
async function api(url, body) {
  const mine = gen;
  pending++; $("loading").hidden = false;
  try {
    const r = await fetch(url, body ? {method: "POST", body: body} : undefined);
    const data = await r.json();
    if (mine !== gen) return null;
    if (data.error) { $("error").textContent = data.error; return null; }
    return data;
  } catch (e) {
    if (mine === gen) $("error").textContent = "the demo server did not answer (" + e + ")";
    return null;
  } finally { pending--; $("loading").hidden = pending === 0; }
}
function figure(r) {
  const f = el("figure"), img = el("img"), cap = el("figcaption");
  img.src = "/api/image/" + r.i; img.alt = "image " + r.i; img.loading = "lazy";
  if (r.score !== undefined) cap.append(el("span", r.score.toFixed(3), "score"));
  cap.append(el("span", "#" + r.i + " " + r.name, "name"));
  if (r.label) cap.append(el("span", r.label, "label"));
  if (r.caption) cap.append(el("span", r.caption, "caption"));
  f.append(img, cap);
  f.onclick = () => go({i: r.i, q: $("q").value.trim()});
  return f;
}
function textList(results) {
  $("texts").replaceChildren(...results.map((r) => {
    const li = el("li");
    li.append(el("span", r.score.toFixed(3), "score"), " " + r.text + " ", el("span", r.kind, "dim"));
    if (r.true) li.append(el("span", " \u2713 true", "true"));
    return li;
  }));
}
function showPanel(title, src, meta) {
  $("detail").hidden = false;
  $("picked-title").textContent = title;
  $("picked-img").src = $("heat-img").src = src;
  $("picked-meta").replaceChildren(...meta.filter((m) => m).map((m) => el("div", m)));
  $("heat-q").value = $("q").value.trim();
}
// --- the views, one per kind of URL
function params() {
  const p = new URLSearchParams(location.search);
  return {q: p.get("q") || "", i: p.get("i"), labels: p.get("labels") || ""};
}
function url(p) {
  const u = new URLSearchParams();
  for (const k of ["q", "i", "labels"]) if (p[k] !== undefined && p[k] !== null && p[k] !== "") u.set(k, p[k]);
  return u.toString() ? "?" + u : location.pathname;
}
function go(p) { history.pushState(null, "", url(p)); render(); }
function render() {
  gen++; clearPanels();
  if (history.state && history.state.upload && lastUpload) return queryUpload(lastUpload, false);
  const p = params();
  $("q").value = p.q; $("img").value = p.i === null ? "" : p.i; $("labels").value = p.labels;
  if (p.i !== null) return showImage(p.i, p.q, p.labels);
  if (p.q) return search(p.q);
  return landing(0);
}
async function landing(start) {
  const data = await api("/api/browse?start=" + start);
  if (!data) return;
  $("results-title").textContent = "The collection: " + data.total + " images (click one)";
  $("results").append(...data.results.map(figure));
  const next = data.start + data.results.length;
  $("more").hidden = next >= data.total;
  $("more").onclick = () => landing(next);
}
async function search(q) {
  const data = await api("/api/search?q=" + encodeURIComponent(q));
  if (!data) return;
  $("results-title").textContent = "Images for \u201c" + data.query + "\u201d";
  $("results").replaceChildren(...data.results.map(figure));
}
async function showImage(i, q, labels) {
  const ask = (path) => api(path + "?i=" + encodeURIComponent(i));
  const [sim, txt] = await Promise.all([ask("/api/similar_images"), ask("/api/similar_texts")]);
  if (!sim) return;
  const it = sim.image;
  target = {i: it.i};
  showPanel("image #" + it.i + (it.caption ? ": " + it.caption : ""), "/api/image/" + it.i,
            [it.name, it.label ? "class: " + it.label : ""]);
  $("results-title").textContent = "Similar images";
  $("results").replaceChildren(...sim.results.map(figure));
  if (txt) textList(txt.results);
  if (txt && txt.note) $("texts").replaceChildren(el("li", txt.note, "dim"));
  if (q) heatmap(q);
  if (labels) classify(labels);
}
async function queryUpload(blob, push) {
  if (!blob) return;
  if (blob.size > info.max_upload) {
    $("error").textContent = "the image is " + blob.size + " bytes; the demo takes at most " + info.max_upload;
    return;
  }
  if (push) { gen++; clearPanels(); lastUpload = blob; history.pushState({upload: true}, "", location.pathname); }
  $("q").value = ""; $("img").value = "";
  const data = await api("/api/query_image", blob);
  if (!data) return;
  target = {blob: blob};
  showPanel("your image", URL.createObjectURL(blob),
            [(blob.name || "pasted image") + ", " + data.width + "\u00d7" + data.height + " px"]);
  $("results-title").textContent = "Images like yours";
  $("results").replaceChildren(...data.images.map(figure));
  textList(data.texts);
}
function targetUrl(path, arg) {  // a shown image goes by number, an upload as the POST body
  return path + "?" + (target.i !== undefined ? "i=" + target.i + "&" : "") + arg;
}
function keep(k, v) {  // a shown image's heatmap text and labels go into the URL, without a new history entry
  if (target.i === undefined) return;
  const p = params(); p[k] = v; history.replaceState(null, "", url(p));
}
async function heatmap(q) {
  const data = await api(targetUrl("/api/heatmap", "q=" + encodeURIComponent(q)), target.blob);
  if (!data) return;
  const g = data.grid, small = document.createElement("canvas"), c = $("heatmap");
  small.width = small.height = g;
  const sctx = small.getContext("2d"), px = sctx.createImageData(g, g), span = (data.max - data.min) || 1;
  data.heat.flat().forEach((v, k) => {  // lowest patch: faint blue, highest: red, the image showing through
    const t = (v - data.min) / span;
    px.data.set([Math.round(255 * t), 40, Math.round(255 * (1 - t)), Math.round(40 + 120 * t)], 4 * k);
  });
  sctx.putImageData(px, 0, 0);
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height); ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, c.width, c.height);
  c.hidden = false; c.dataset.query = data.query;
  $("heat-note").textContent = "\u201c" + data.query + "\u201d: image score " + data.score.toFixed(3) +
    "; patches from " + data.min.toFixed(3) + " (blue) to " + data.max.toFixed(3) + " (red), " + g + "\u00d7" + g;
}
async function classify(labels) {
  const data = await api(targetUrl("/api/classify", "labels=" + encodeURIComponent(labels)), target.blob);
  if (!data) return;
  $("classes").replaceChildren(...data.results.map((r) => {
    const li = el("li"), bar = el("span", "", "bar");
    bar.style.width = Math.round(120 * r.prob) + "px";
    li.append(bar, el("span", (100 * r.prob).toFixed(1) + "%", "score"), " " + r.label + " ",
              el("span", "cos " + r.score.toFixed(3), "dim"));
    return li;
  }));
}
// --- the controls
$("search-form").onsubmit = (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (!q) { $("error").textContent = "type a caption to search for, e.g. \u201c" + info.hint + "\u201d"; return; }
  go({q: q});
};
$("pick-form").onsubmit = (e) => {
  e.preventDefault();
  const i = $("img").value.trim();
  if (!i) { $("error").textContent = "type an image number, 0 to " + (info.images - 1); return; }
  go({i: i, q: $("q").value.trim()});
};
$("file").onchange = () => { if ($("file").files.length) queryUpload($("file").files[0], true); $("file").value = ""; };
$("heat-form").onsubmit = (e) => {
  e.preventDefault();
  const q = $("heat-q").value.trim();
  if (!target) return;
  keep("q", q); heatmap(q);
};
$("heat-show").onchange = () => { $("heatmap").style.visibility = $("heat-show").checked ? "visible" : "hidden"; };
$("classify-form").onsubmit = (e) => {
  e.preventDefault();
  if (!target) return;
  keep("labels", $("labels").value.trim()); classify($("labels").value);
};
document.addEventListener("paste", (e) => {  // an image on the clipboard (a screenshot, "copy image")
  const items = [...(e.clipboardData ? e.clipboardData.items : [])];
  const item = items.find((it) => it.kind === "file" && it.type.startsWith("image/"));
  if (item) { e.preventDefault(); queryUpload(item.getAsFile(), true); }
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) queryUpload(e.dataTransfer.files[0], true);
});
window.addEventListener("popstate", render);
fetch("/api/info").then((r) => r.json()).then((d) => {  // a checkpoint problem shows as soon as the page opens
  info = d;
  $("status").textContent = d.data + ", " + d.texts + " candidate texts, top " + d.topk;
  $("q").placeholder = "e.g. " + d.hint; $("labels").placeholder = d.labels_hint;
  render();
  if (d.error) $("error").textContent = d.error;
}).catch((e) => { $("error").textContent = "the demo server did not answer (" + e + ")"; });
"""

BODY = """
<h1><a href="/">CLIP demo</a></h1>
<p id="status" class="dim">loading...</p>
<form id="search-form"><input id="q" size="50" aria-label="caption" autofocus>
 <button id="search" type="submit">Search images</button></form>
<form id="pick-form"><input id="img" size="6" placeholder="image #" aria-label="image number">
 <button id="pick" type="submit">Show image</button>
 &nbsp; or upload <input id="file" type="file" accept="image/*"> <span class="dim">(or paste or drop an image)</span>
</form>
<p id="error" role="alert"></p>
<p id="loading" hidden>loading&hellip;</p>
<section id="detail" hidden>
 <h3 id="picked-title"></h3>
 <div class="row">
  <div class="frame"><img id="picked-img" alt="the picked image"></div>
  <div class="frame"><img id="heat-img" alt=""><canvas id="heatmap" width="144" height="144" hidden></canvas></div>
  <div class="col">
   <div id="picked-meta" class="dim"></div>
   <form id="heat-form"><input id="heat-q" size="24" aria-label="text for the heatmap">
    <button id="heat" type="submit">Where does it look?</button>
    <label class="dim"><input id="heat-show" type="checkbox" checked> overlay</label></form>
   <p id="heat-note" class="dim"></p>
   <form id="classify-form"><input id="labels" size="30" aria-label="labels, comma-separated">
    <button id="classify" type="submit">Classify</button></form>
   <ol id="classes"></ol>
  </div>
  <div class="col"><h4>Best captions</h4><ol id="texts"></ol></div>
 </div>
</section>
<h2 id="results-title"></h2>
<div id="results"></div>
<p><button id="more" hidden>Show more</button></p>
"""

PAGE = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>CLIP demo</title>\n'
        f'<style>{STYLE}</style></head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body></html>\n').encode()
sha = lambda text: "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
# nothing but this page's own script and style; images from here or the user's own upload (blob:); fetches to here
CSP = (f"default-src 'none'; script-src {sha(SCRIPT)}; style-src {sha(STYLE)}; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP,
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


# -----------------------------------------------------------------------------
# the web server (standard library only)


def host_allowed(host, allowed):
    """A Host header we answer: an IP address (a DNS-rebinding page's requests carry its own domain name, never an
    address), localhost, or a name the user allowed. Anything else may be a page that rebound its name to us."""
    try:
        name = urllib.parse.urlsplit("//" + (host or "")).hostname or ""
    except ValueError:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.rstrip(".") in {"localhost", *allowed}


class Deadline(io.RawIOBase):
    """A socket's reads under one deadline for the whole request: each recv may wait only for what is left of it,
    so a client that sends a byte every second holds a thread for `seconds` at most (a timeout per recv never
    fires on it)."""

    def __init__(self, sock, seconds):
        self.sock, self.end = sock, time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buf):
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received within --timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


def make_handler(demo, quiet=False, max_body=8 * 2**20, timeout=10.0, allowed_hosts=()):
    allowed = {h.lower() for h in allowed_hosts}

    class Handler(BaseHTTPRequestHandler):
        server_version = "clip-demo"

        def setup(self):
            super().setup()
            self.rfile.close()
            # HTTP/1.0, one request per connection: this is the request's deadline
            self.rfile = io.BufferedReader(Deadline(self.connection, timeout))

        def send(self, status, body, ctype):
            self.connection.settimeout(timeout)  # the answer's own bound: a sendall gets `timeout` in all
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_json(self, status, answer):
            self.send(status, json.dumps(answer).encode(), "application/json")

        def send_error(self, code, message=None, explain=None):
            """http.server's own errors (bad request line, unknown method, ...) as JSON with our headers too."""
            self.close_connection = True
            with contextlib.suppress(ConnectionError, TimeoutError):  # the client may have gone already
                self.send_json(code, {"error": f"{code} {message or self.responses.get(code, ('',))[0]}"})

        def read_body(self):
            """The POST body, or an error answer. Content-Length is required and capped; the body is read within the
            request's deadline."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return None, (411, {"error": "send the image with a Content-Length (chunked bodies are not read)"})
            try:
                n = int(self.headers.get("Content-Length", ""))
                assert n >= 0
            except (ValueError, AssertionError):
                return None, (411, {"error": "a POST needs a valid Content-Length header"})
            if n > max_body:
                self.close_connection = True
                self.discard(n)
                return None, (413, {"error": f"the upload is {n} bytes; the demo takes at most {max_body} bytes "
                                             "(--max_upload_mb)"})
            try:
                data = self.rfile.read(n)
            except TimeoutError:
                self.close_connection = True
                return None, (408, {"error": f"the upload did not arrive within {timeout:g} s (--timeout)"})
            if len(data) != n:
                return None, (400, {"error": f"the body ended after {len(data)} of {n} bytes"})
            return data, None

        def discard(self, n, limit=64 * 2**20):
            """Read and drop a too-large body (up to `limit` bytes), so the client is reading when the 413 comes;
            closing with unread data would reset the connection before the client sees the answer."""
            if n <= limit:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    while n > 0 and (chunk := self.rfile.read(min(n, 2**16))):
                        n -= len(chunk)

        def route(self, body=None):
            url = urllib.parse.urlsplit(self.path)
            args = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            post = self.command == "POST"
            if not host_allowed(self.headers.get("Host"), allowed):
                return 403, {"error": f"Host {self.headers.get('Host')!r} is not this server: open it as "
                                      f"http://127.0.0.1:{self.server.server_address[1]}/ or start it with "
                                      "--allowed_hosts NAME"}
            gets = {"/api/info": lambda: demo.info(), "/api/browse": lambda: demo.browse(args.get("start")),
                    "/api/search": lambda: demo.search(args.get("q")),
                    "/api/similar_images": lambda: demo.similar_images(args.get("i")),
                    "/api/similar_texts": lambda: demo.similar_texts(args.get("i"))}
            both = {"/api/classify": lambda b: demo.classify(args.get("i"), args.get("labels"), b),
                    "/api/heatmap": lambda b: demo.heatmap(args.get("i"), args.get("q"), b),
                    "/api/query_image": lambda b: demo.query_image(b) if post else
                    (405, {"error": "POST the image's bytes to /api/query_image"})}
            if post and url.path not in both:
                return 404 if url.path not in gets else 405, {"error": f"POST is not accepted at {url.path}"}
            if post:
                body, err = self.read_body()
                return err or both[url.path](body)
            if url.path in ("/", "/index.html"):
                return 200, PAGE
            if url.path.startswith("/api/image/"):
                i, err = demo.image_index(url.path[len("/api/image/"):])
                jpeg, err = (None, err) if err else demo.shown(i, demo.gallery.jpeg)
                return err or (200, jpeg)
            if url.path in gets:
                return gets[url.path]()
            if url.path in both:
                return both[url.path](None)
            return 404, {"error": f"no such page: {url.path}"}

        def answer(self):
            try:
                status, answer = self.route()
            except Exception as e:  # a bug or a broken image file: one line for the page, the traceback for the log
                traceback.print_exc()
                status, answer = 500, {"error": f"the demo failed on this request ({type(e).__name__}: {e})"}
            if isinstance(answer, bytes):  # the page or an image
                return self.send(status, answer, "text/html; charset=utf-8" if answer is PAGE else "image/jpeg")
            self.send_json(status, answer)

        do_GET = do_POST = do_HEAD = answer

        def log_message(self, fmt, *args):
            if not quiet:
                super().log_message(fmt, *args)

    return Handler


class Server(HTTPServer):
    """HTTPServer answering connections in a fixed pool of `threads` threads. When all are busy the accept loop
    waits (new connections queue in the kernel's listen backlog), so memory and threads stay bounded whatever the
    clients do; with the handler's deadline a silent or slow connection holds a thread for at most that long."""
    request_queue_size = 128  # the listen backlog

    def __init__(self, address, handler, threads=8):
        self.slots = threading.BoundedSemaphore(threads)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="demo-http")
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.slots.acquire()  # all threads busy: accept nothing until one is free
        self.pool.submit(self.work, request, client_address)

    def work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(demo, host="127.0.0.1", port=0, threads=8, timeout=10.0, max_body=8 * 2**20, allowed_hosts=(),
                quiet=False):
    """The demo's HTTP server, bound and ready for serve_forever()."""
    demo.max_upload = max_body
    return Server((host, port), make_handler(demo, quiet, max_body, timeout, allowed_hosts), threads)


def main(argv=None):
    p = argparse.ArgumentParser(description="Query a CLIP checkpoint in the browser: text -> images, image -> "
                                            "images and texts, typed-label classification, patch heatmaps.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    p.add_argument("--images", required=True, help="a shard set (with index.json) or a folder of images")
    p.add_argument("--split", default="val", help="which split of a shard set to show")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves the whole network: there is no login")
    p.add_argument("--allowed_hosts", nargs="*", default=[], metavar="NAME",
                   help="host names (besides IP addresses and localhost) that browsers may use to reach the server")
    p.add_argument("--topk", type=int, default=8, help="results per query")
    p.add_argument("--cache", default=None, help="embedding cache .npz (default: <ckpt>.demo.npz)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--limit", type=int, default=None, help="show only the first N images")
    p.add_argument("--batch", type=int, default=256, help="images per forward pass at start")
    p.add_argument("--threads", type=int, default=8, help="connections served at once (a fixed thread pool)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a client has to send its whole request (and, again, to take the answer)")
    p.add_argument("--max_upload_mb", type=float, default=8.0, help="largest uploaded image, in MiB")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no request log")
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        p.error(f"--ckpt {args.ckpt} does not exist")
    if not os.path.isdir(args.images):
        p.error(f"--images {args.images} is not a folder (give a shard set or a folder of images)")
    if args.topk < 1 or args.batch < 1 or args.threads < 1 or (args.limit is not None and args.limit < 1):
        p.error(f"--topk, --batch, --threads and --limit must be >= 1, got {args.topk}, {args.batch}, "
                f"{args.threads}, {args.limit}")
    if not args.timeout > 0 or not args.max_upload_mb > 0:
        p.error(f"--timeout and --max_upload_mb must be > 0, got {args.timeout} and {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    try:
        demo = build(args.ckpt, args.images, args.split, args.topk,
                     None if args.no_cache else args.cache or args.ckpt + ".demo.npz", args.device, args.batch,
                     args.limit, args.quiet)
    except ValueError as e:  # no images, unknown split, broken index.json
        p.error(str(e))
    try:
        server = make_server(demo, args.host, args.port, args.threads, args.timeout,
                             int(args.max_upload_mb * 2**20), args.allowed_hosts, args.quiet)
    except OSError as e:
        p.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
