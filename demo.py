"""
A small local web page to query a trained checkpoint: type a caption and see the images that match it best, or
pick an image and see the captions / class names that match it best.

    python demo.py --ckpt out/tiny-syn32/ckpt/best.pt --images data/syn32          # a shard set: its val split
    python demo.py --ckpt best.pt --images ~/photos --port 8080 --topk 12          # a plain folder of images
    then open http://127.0.0.1:8000

How it works: every image (and every candidate text) is encoded once at start, in batches, and the normalised
embeddings are kept in memory and written to an .npz cache (--cache, default <ckpt>.demo.npz) keyed by the
checkpoint's size/mtime and the data files' names/sizes/mtimes, so a restart with the same inputs skips the
model entirely. A query is then one text encoding and one (N, E) @ (E,) matmul; a picked image needs no model at
all. The page is one HTML document with plain JS that calls a JSON API:

    /api/info                     {"images", "texts", "checkpoint", "data", "error"}
    /api/search?q=TEXT            {"query", "results": [{"i", "score", "caption"}, ...]}   (top-k images)
    /api/similar_texts?i=N        {"i", "caption", "results": [{"text", "kind", "score", "true"}, ...]}
    /api/image/N                  the image as JPEG bytes (served from memory)

Every failure is an {"error": "..."} answer that the page shows as one line (never a traceback): an empty
query, an image number out of range, a checkpoint that is corrupt or does not fit clip.py. Scores are cosine
similarities in [-1, 1] (the logits CLIP uses are these times exp(logit_scale)).

Candidate texts for an image: "a photo of a <class>." for each class of a labelled shard set (or each class
folder), plus every distinct caption of the images shown (shard .txt members, or a.txt beside a.jpg).

Left out on purpose: uploading new images, an approximate-nearest-neighbour index (a brute-force matmul over
100k images takes milliseconds), authentication (the server binds to 127.0.0.1 unless told otherwise), and any
JS framework or external asset (the page works offline).
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import traceback
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint_manager as cm
from dataloader import complete, image_ext, map_file, scan_tar
from eval_zeroshot import encode_images, encode_texts, load_image
from prep_dataset import FOLDER_EXTS, articles
from tokenizer import Tokenizer

TEMPLATE = "a photo of a {}."  # class name -> candidate text
CACHE_VERSION = 1  # bump when what goes into the cache changes
THUMB = 256  # images from a folder are served as JPEGs of at most this many pixels a side

# -----------------------------------------------------------------------------
# the images: a shard split or a folder, held as JPEG bytes (shards) or paths (folder)


class Gallery:
    """Images with their captions and labels. self.items[i] is (bytes, ext) for a shard member (a slice of the
    mmapped tar, read on demand) or (path, None) for a file; self.files are the data files (for the cache key)."""

    def __init__(self, root, split="val", limit=None):
        self.items, self.captions, self.labels, self.classes, self.files = [], [], [], [], []
        index_path = os.path.join(root, "index.json")
        if os.path.isfile(index_path):
            self.read_shards(root, index_path, split)
        else:
            self.read_folder(root)
        if limit is not None:
            self.items, self.captions, self.labels = self.items[:limit], self.captions[:limit], self.labels[:limit]
        if not self.items:
            raise ValueError(f"no images found in {root}" + (f" (split {split!r})" if os.path.isfile(index_path) else
                                                             f" (looked for {', '.join(FOLDER_EXTS)} files)"))

    def read_shards(self, root, index_path, split):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index.get(split), dict) or not index[split].get("shards"):
            splits = [k for k, v in index.items() if isinstance(v, dict) and "shards" in v]
            raise ValueError(f"split {split!r} not in {index_path} (it has {splits}; pick one with --split)")
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
        self.files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
                            if f.rsplit(".", 1)[-1].lower() in FOLDER_EXTS)
        for p in self.files:
            self.items.append((p, None))
            txt = os.path.splitext(p)[0] + ".txt"  # a.jpg + a.txt: prep_dataset's captioned-folder layout
            with open(txt, "rb") if os.path.isfile(txt) else io.BytesIO() as f:
                self.captions.append(f.read().decode("utf-8", "replace").strip())
        # class folders (root/<class>/**/*.jpg, no captions, nothing at the top): folder names are the classes
        rel = [os.path.relpath(p, root) for p in self.files]
        tops = [r.split(os.sep)[0] for r in rel]
        if self.files and not any(self.captions) and all(os.sep in r for r in rel):
            dirs = sorted(set(tops))
            self.classes = [d.replace("_", " ") for d in dirs]
            self.labels = [dirs.index(t) for t in tops]
        else:
            self.labels = [-1] * len(self.files)

    def __len__(self):
        return len(self.items)

    def pixels(self, i, size):
        """Image i -> uint8 (3, size, size), prepared like the shards (short side resized, centre crop)."""
        src, ext = self.items[i]
        return load_image(io.BytesIO(src) if ext is not None else src, size)

    def jpeg(self, i):
        """Image i as JPEG bytes for the browser: a shard's JPEG member as it is, anything else re-encoded."""
        src, ext = self.items[i]
        if ext in ("jpg", "jpeg"):
            return bytes(src)
        with Image.open(io.BytesIO(src) if ext is not None else src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))  # keeps the aspect ratio; never enlarges
            out = io.BytesIO()
            im.save(out, "JPEG", quality=90)
            return out.getvalue()


def candidate_texts(gallery):
    """[(text, kind)]: one prompt per class, then each distinct non-empty caption (first kind wins on a tie)."""
    texts = {articles(TEMPLATE.format(c)): "class" for c in gallery.classes}
    for c in gallery.captions:
        if c:
            texts.setdefault(c, "caption")
    return list(texts.items())


# -----------------------------------------------------------------------------
# embeddings, computed once and cached


def cache_key(ckpt, gallery, texts):
    """A hash of everything the embeddings depend on: the checkpoint file, the data files, the candidate texts."""
    stat = lambda p: [os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns]
    parts = {"version": CACHE_VERSION, "ckpt": stat(ckpt), "data": [stat(p) for p in gallery.files],
             "images": len(gallery), "texts": [t for t, _ in texts]}
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_cache(path, key, n_images, n_texts):
    """(image_emb, text_emb) from the .npz at path when its key matches, else None."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or len(z["image"]) != n_images or len(z["text"]) != n_texts:
                return None  # another checkpoint or other data: recompute (and overwrite)
            return torch.from_numpy(z["image"]), torch.from_numpy(z["text"])
    except Exception as e:  # a truncated or foreign file is only a cache miss
        warnings.warn(f"ignoring unreadable cache {path}: {type(e).__name__}: {e}")
        return None


def save_cache(path, key, image_emb, text_emb):
    """np.savez to a temp file in the same directory, then os.replace: a crash never leaves half a cache.
    The temp name ends in ".partial", not ".tmp", which CheckpointManager sweeps from a ckpt folder."""
    tmp = None
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".demo-cache.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:  # a file object: np.savez does not append ".npz" to it
            np.savez(f, key=np.array(key), image=image_emb.numpy(), text=text_emb.numpy())
        os.replace(tmp, path)
    except OSError as e:  # a read-only checkpoint folder costs the next start some time, nothing else
        warnings.warn(f"could not write the embedding cache {path}: {e}")
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


@torch.inference_mode()
def embed_gallery(model, tokenizer, gallery, texts, device, batch=256, quiet=False):
    """Normalised float32 embeddings on the CPU: images (N, E) and candidate texts (M, E)."""
    size, parts, broken = model.config.vision.img_size, [], 0
    for s in tqdm(range(0, len(gallery), batch), desc="encode images", unit="batch", disable=quiet):
        pixels = []
        for i in range(s, min(s + batch, len(gallery))):
            try:
                pixels.append(gallery.pixels(i, size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pixels.append(torch.zeros(3, size, size, dtype=torch.uint8))  # keeps indices aligned
                broken += 1
        parts.append(encode_images(model, torch.stack(pixels), device).cpu())  # (b, E)
    if broken:
        warnings.warn(f"{broken} image(s) could not be decoded; they are encoded as black images")
    text_emb = encode_texts(model, tokenizer, [t for t, _ in texts], device, batch=batch).cpu()  # (M, E)
    return torch.cat(parts), text_emb


# -----------------------------------------------------------------------------
# the demo: answers to the API, as (HTTP status, JSON-able dict)


class Demo:

    def __init__(self, gallery, texts, topk, model=None, tokenizer=None, device="cpu", image_emb=None,
                 text_emb=None, error=None, description=""):
        self.gallery, self.texts, self.topk, self.error, self.description = gallery, texts, topk, error, description
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.image_emb, self.text_emb = image_emb, text_emb  # (N, E), (M, E) normalised, CPU
        self.lock = threading.Lock()  # one model call at a time: the server answers requests in threads

    def info(self):
        return 200, {"images": len(self.gallery), "texts": len(self.texts), "topk": self.topk,
                     "data": self.description, "error": self.error}

    def image_index(self, value):
        """A user's image number -> int, or an error answer."""
        try:
            i = int(value)
        except (TypeError, ValueError):
            return None, (400, {"error": f"the image number must be an integer, got {value!r}"})
        if not 0 <= i < len(self.gallery):
            return None, (404, {"error": f"no image #{i}: pick a number from 0 to {len(self.gallery) - 1}"})
        return i, None

    def search(self, q):
        """Caption -> the top-k images by cosine similarity."""
        q = (q or "").strip()
        if not q:
            return 400, {"error": "type a caption to search for, e.g. \"a red cube\""}
        if self.error:
            return 503, {"error": self.error}
        with self.lock:
            query = encode_texts(self.model, self.tokenizer, [q], self.device).cpu()[0]  # (E,)
        scores = self.image_emb @ query  # (N,) cosine similarities
        top = torch.topk(scores, min(self.topk, len(scores)))
        return 200, {"query": q, "results": [{"i": i, "score": round(s, 4), "caption": self.gallery.captions[i]}
                                             for s, i in zip(top.values.tolist(), top.indices.tolist())]}

    def similar_texts(self, value):
        """Image number -> the top-k candidate texts; "true" marks the image's own caption or class."""
        i, err = self.image_index(value)
        if err:
            return err
        if self.error:
            return 503, {"error": self.error}
        if not self.texts:
            return 404, {"error": "these images have no captions or classes to rank (add a.txt beside a.jpg)"}
        scores = self.text_emb @ self.image_emb[i]  # (M,)
        top = torch.topk(scores, min(self.topk, len(scores)))
        label = self.gallery.labels[i]
        own = {self.gallery.captions[i]} | ({articles(TEMPLATE.format(self.gallery.classes[label]))}
                                            if 0 <= label < len(self.gallery.classes) else set())
        results = [{"text": self.texts[j][0], "kind": self.texts[j][1], "score": round(s, 4),
                    "true": self.texts[j][0] in own} for s, j in zip(top.values.tolist(), top.indices.tolist())]
        return 200, {"i": i, "caption": self.gallery.captions[i], "results": results}


def build(ckpt, images, split="val", topk=8, cache=None, device="cpu", batch=256, limit=None, quiet=False):
    """Read the images, load the checkpoint and embed everything (or read the cache) -> Demo. A checkpoint that
    cannot be used is not fatal: the page still shows the images and says what is wrong with it."""
    gallery = Gallery(images, split, limit)
    texts = candidate_texts(gallery)
    shards = os.path.isfile(os.path.join(images, "index.json"))
    what = f"{len(gallery)} images from {images}" + (f" ({split})" if shards else "")
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
        image_emb, text_emb = cached
        if not quiet:
            print(f"loaded embeddings of {what} and {len(texts)} texts from {cache}")
    else:
        image_emb, text_emb = embed_gallery(model, tokenizer, gallery, texts, device, batch, quiet)
        if cache:
            save_cache(cache, key, image_emb, text_emb)
        if not quiet:
            print(f"encoded {what} and {len(texts)} texts" + (f"; cached in {cache}" if cache else ""))
    return Demo(gallery, texts, topk, model, tokenizer, device, image_emb, text_emb, description=what)


# -----------------------------------------------------------------------------
# the web server (standard library only)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CLIP demo</title>
<style>
 body { font-family: sans-serif; margin: 1.5em; max-width: 72em; }
 form { margin: .4em 0; }
 #error { color: #b00020; font-weight: bold; min-height: 1.3em; }
 #results { display: flex; flex-wrap: wrap; gap: 12px; }
 figure { margin: 0; width: 140px; cursor: pointer; font-size: 12px; }
 figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
 .score { font-weight: bold; }
 .true { color: #0a7a0a; font-weight: bold; }
</style></head>
<body>
<h1>CLIP demo</h1>
<p id="status">loading...</p>
<form id="search-form"><input id="q" size="50" placeholder="a red cube to the left of a blue ball" autofocus>
 <button id="search" type="submit">Search images</button></form>
<form id="pick-form"><input id="img" size="8" placeholder="image #">
 <button id="pick" type="submit">Best captions for image</button></form>
<p id="error" role="alert"></p>
<div id="results"></div>
<div id="picked"></div>
<ol id="texts"></ol>
<script>
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {  // text goes in as textContent: captions are never parsed as HTML
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
// every API answer is JSON; one with an "error" field is shown on the page and nothing else changes
async function api(url) {
  $("error").textContent = "";
  try {
    const data = await (await fetch(url)).json();
    if (data.error) { $("error").textContent = data.error; return null; }
    return data;
  } catch (e) { $("error").textContent = "the demo server did not answer (" + e + ")"; return null; }
}
async function search(q) {
  const data = await api("/api/search?q=" + encodeURIComponent(q));
  if (!data) return;
  $("results").replaceChildren(...data.results.map((r) => {
    const f = el("figure"), img = el("img");
    img.src = "/api/image/" + r.i; img.alt = "image " + r.i; f.append(img);
    const cap = el("figcaption"); cap.append(el("span", r.score.toFixed(3), "score"), " #" + r.i + " " + r.caption);
    f.append(cap); f.onclick = () => { $("img").value = r.i; texts(r.i); };
    return f;
  }));
}
async function texts(i) {
  const data = await api("/api/similar_texts?i=" + encodeURIComponent(i));
  if (!data) return;
  const img = el("img"); img.src = "/api/image/" + data.i; img.alt = "image " + data.i; img.width = 128;
  img.style.imageRendering = "pixelated";
  $("picked").replaceChildren(el("h3", "image #" + data.i + (data.caption ? ": " + data.caption : "")), img);
  $("texts").replaceChildren(...data.results.map((r) => {
    const li = el("li"); li.append(el("span", r.score.toFixed(3), "score"), " " + r.text + " (" + r.kind + ")");
    if (r.true) li.append(el("span", " \\u2713 true", "true"));
    return li;
  }));
}
$("search-form").onsubmit = (e) => { e.preventDefault(); search($("q").value); };
$("pick-form").onsubmit = (e) => { e.preventDefault(); texts($("img").value.trim()); };
fetch("/api/info").then((r) => r.json()).then((d) => {  // a checkpoint problem shows as soon as the page opens
  $("status").textContent = d.data + ", " + d.texts + " candidate texts, top " + d.topk;
  if (d.error) $("error").textContent = d.error;
});
</script>
</body></html>
"""


def make_handler(demo, quiet=False):
    class Handler(BaseHTTPRequestHandler):

        def send(self, status, body, ctype):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            args = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            try:
                if url.path in ("/", "/index.html"):
                    return self.send(200, PAGE.encode(), "text/html; charset=utf-8")
                if url.path.startswith("/api/image/"):
                    i, err = demo.image_index(url.path[len("/api/image/"):])
                    if not err:
                        return self.send(200, demo.gallery.jpeg(i), "image/jpeg")
                    status, answer = err
                elif url.path == "/api/info":
                    status, answer = demo.info()
                elif url.path == "/api/search":
                    status, answer = demo.search(args.get("q"))
                elif url.path == "/api/similar_texts":
                    status, answer = demo.similar_texts(args.get("i"))
                else:
                    status, answer = 404, {"error": f"no such page: {url.path}"}
            except Exception as e:  # a bug or a broken image file: one line for the page, the traceback for the log
                traceback.print_exc()
                status, answer = 500, {"error": f"the demo failed on this request ({type(e).__name__}: {e})"}
            self.send(status, json.dumps(answer).encode(), "application/json")

        def log_message(self, fmt, *args):
            if not quiet:
                super().log_message(fmt, *args)

    return Handler


def main(argv=None):
    p = argparse.ArgumentParser(description="Query a CLIP checkpoint in the browser: text -> images, image -> texts.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    p.add_argument("--images", required=True, help="a shard set (with index.json) or a folder of images")
    p.add_argument("--split", default="val", help="which split of a shard set to show")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves the whole network: there is no login")
    p.add_argument("--topk", type=int, default=8, help="results per query")
    p.add_argument("--cache", default=None, help="embedding cache .npz (default: <ckpt>.demo.npz)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--limit", type=int, default=None, help="show only the first N images")
    p.add_argument("--batch", type=int, default=256, help="images per forward pass at start")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no request log")
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        p.error(f"--ckpt {args.ckpt} does not exist")
    if not os.path.isdir(args.images):
        p.error(f"--images {args.images} is not a folder (give a shard set or a folder of images)")
    if args.topk < 1 or args.batch < 1 or (args.limit is not None and args.limit < 1):
        p.error(f"--topk, --batch and --limit must be >= 1, got {args.topk}, {args.batch}, {args.limit}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    try:
        demo = build(args.ckpt, args.images, args.split, args.topk,
                     None if args.no_cache else args.cache or args.ckpt + ".demo.npz", args.device, args.batch,
                     args.limit, args.quiet)
    except ValueError as e:  # no images, unknown split
        p.error(str(e))
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(demo, args.quiet))
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
