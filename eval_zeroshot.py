"""
Evaluate a CLIP checkpoint: zero-shot classification, image-text retrieval and a compositional (swap) test.

    python eval_zeroshot.py --ckpt out/ckpt/best.pt --data data/synthetic          # shards: everything that applies
    python eval_zeroshot.py --ckpt best.pt --data imagenet/val --out in1k.json     # class folders: zero-shot only
    python eval_zeroshot.py --ckpt best.pt --data wds_cifar10                      # a CLIP_benchmark set (split test)
    python eval_zeroshot.py --ckpt best.pt --data hf:uoft-cs/cifar10 --split test  # a hub dataset, streamed
    python eval_zeroshot.py --ckpt best.pt --aro visual_genome_relation.json --aro_images vg_images/

What --data can be (open_source finds the layout; one reader per layout, all giving the same batches):
- a shard set from prep_dataset.py (index.json; --split val by default);
- class folders DIR/<class>/*.jpg, named by their folders;
- CLIP_benchmark's webdataset layout as downloaded (`huggingface-cli download clip-benchmark/wds_cifar10
  --repo-type dataset --local-dir DIR`): DIR/<split>/nshards.txt, DIR/<split>/{0..n-1}.tar (.webp/.png/.jpg
  images with .cls labels, or .txt captions one per line), classnames.txt, zeroshot_classification_templates.txt
  ({c} marks the class name), optional dataset_type.txt; --split test by default;
- hf:<hub id or local dir> through `datasets`, streamed (an ImageNet-sized split needs no full download):
  ClassLabel names become class names; --image_column / --label_column / --caption_column when the columns
  cannot be inferred; --split validation by default (test when there is none).
Classes named by ImageNet's WordNet ids (n01440764, ... any subset of the 1,000: ImageNet's train/val folders, or
such class names in a set) get OpenAI's curated class names and its 80 templates (imagenet_classes.json).
--max_images N evaluates the first N samples (class folders: N spread evenly over the sorted files, so every
class is in). Samples that cannot be used are skipped and counted (skipped_<reason>); nothing is extracted to disk.

What runs on what:
- zero-shot (Radford et al. 2021, sec. 3.1.4): on labelled data. Each class becomes one text embedding: the
  caption embeddings of every template, each normalised, averaged and normalised again (prompt ensembling).
  Templates: --templates, else the data's own (CLIP_benchmark sets, ImageNet folders), used verbatim as the
  field does; else our short generic list, with "a apple" written "an apple". zeroshot_top1 / zeroshot_top5
  (top-k capped at the number of classes; CLIP_benchmark's acc1 / acc5), mean_per_class_recall (the mean over
  classes of their top-1: CLIP_benchmark's balanced accuracy), per-class top-1 and a confusion matrix PNG. On the
  synthetic set, top-1 is also split into seen and held-out colour-shape combinations (by true label).
- retrieval: on captioned data (shard sets; CLIP_benchmark and hub sets with one caption or several per image).
  image->text and text->image R@1/5/10, mean reciprocal rank and median rank. A caption query is right when its
  image is in the top k; an image query when any of its captions is (the rank of its best-placed caption), as in
  CLIP_benchmark and the papers: i2t_R@k is CLIP_benchmark's text_retrieval_recall@k, t2i_R@k its
  image_retrieval_recall@k. Only `chunk` rows of the similarity matrix exist at a time.
- swaps (ARO, Yuksekgonul et al. 2023): is the true caption scored strictly higher than a swapped one
  ("a red cube left of a blue ball" vs "a blue cube left of a red ball")? Accuracy per swap type, from the
  synthetic shards' json "swaps", a jsonl file (--swaps_jsonl), or ARO's VG-Relation / VG-Attribution files
  (--aro FILE --aro_images DIR; each image is cropped to its bbox first, as ARO does).

Memory: images are encoded in batches as they stream in. Zero-shot keeps only per-class counts (and the C x C
confusion for the CLI), so it is bounded by --batch and the class count, not the number of images; retrieval
keeps one embedding per image and caption (it needs them all).

Ranks and ties: the rank of the right answer is 1 + the number of candidates with a strictly higher score, so a
tie counts in the model's favour (identical captions in a retrieval set do not push each other down). Accuracies,
recalls and MRR are fractions in [0, 1].

--save_embeddings DIR exports the shard split's embeddings (DIR/{image,text}.npy float32 normalised, ids.npy
"shard/key", captions.npy; np.load with allow_pickle=False). nearest_captions searches them in chunks (plain numpy,
or a FAISS IndexFlatIP); `prep_dataset.py add-negatives` mines hard negatives with exactly these functions.

train.py calls `evaluate_checkpoint` every --eval_every steps: one encoding pass over the split, reused by
zero-shot, retrieval and the swap test (and, with --zeroshot_data, zero-shot on that source). Pass it the bare
model (not the DDP wrapper, which has no encode_image).

Left out on purpose: linear probes, few-shot, test-time augmentation, multi-label sets (mean average precision),
per-class prompt lists (CuPL), and per-dataset class-name cleaning beyond ImageNet's curated names.
"""

import argparse
import functools
import json
import math
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from clip import normalize_images
from dataloader import (ShardLoader, articles, class_folders, complete, decode_image, hub_columns, hub_image_bytes,
                        image_array, is_url, load_tokenizer, map_file, open_hub_dataset, read_index, scan_tar,
                        undecoded, wds_layout, wds_records, wds_splits)
from logger import save_figure, write_atomic

# A short, generic CLIP-style template list (prompt ensembling); --templates or the data's own list replaces it.
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.", "a {}."]
RECALL_AT = (1, 5, 10)
IMAGENET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.json")

# -----------------------------------------------------------------------------
# images from files and records


def load_image(src, size, box=None):
    """Image file (a path or a binary file object) -> uint8 (3, size, size) through dataloader's one decode, the
    same as the shards': EXIF rotation, alpha on white, optional crop to box (x0, y0, x1, y1) in the upright
    image, shorter side resized to `size`, centre crop."""
    if hasattr(src, "read"):
        data = src.read()
    else:
        with open(src, "rb") as f:
            data = f.read()
    return torch.from_numpy(image_array(decode_image(data, size, box)))  # (3, S, S) uint8


def try_load(item, size):
    """(path, box) -> uint8 (3, S, S), or None when the file does not decode (counted by the caller)."""
    try:
        return load_image(item[0], size, item[1])
    except Exception:  # PIL raises many types on corrupt or truncated bytes (as the shard loader, which skips them)
        return None


class ImageRecords:
    """Records -> batches like ShardLoader's, in order: "image" uint8 (B, 3, S, S), plus "label" int64 (B,) when the
    records have labels, plus "text" int64 (M, ctx) and "text_image" int64 (M,) (each caption's row in the batch)
    when they have captions. `records()` gives a fresh iterator of dicts {"image": encoded bytes, or "path" and
    "box", "name", "label"?, "captions"?}, or of reason strings for samples already found unusable. Images decode
    in a thread pool (PIL releases the GIL) one batch ahead, so decoding overlaps the model's forward; one that
    does not decode is "bad_image", named in a warning. self.skipped counts every unusable sample per reason."""

    def __init__(self, records, img_size, batch_size=256, workers=4, tokenizer=None, context_length=None,
                 num_records=None):
        self.records, self.img_size, self.batch_size, self.workers = records, img_size, batch_size, max(1, workers)
        self.tokenizer, self.context_length, self.num_records = tokenizer, context_length, num_records
        self.skipped, self.failed = Counter(), []

    def __len__(self):  # batches, when the number of records is known (a stream's is not)
        if self.num_records is None:
            raise TypeError("a stream of records has no length")
        return math.ceil(self.num_records / self.batch_size)

    def decode(self, r):
        """A record's image -> uint8 (3, S, S), or None when it does not decode."""
        if "path" in r:
            return try_load((r["path"], r.get("box")), self.img_size)
        try:
            return torch.from_numpy(image_array(decode_image(r["image"], self.img_size)))  # (3, S, S) uint8
        except Exception:  # PIL raises many types on corrupt or truncated bytes
            return None

    def __iter__(self):
        self.skipped, self.failed = Counter(), []
        records = iter(self.records())
        with ThreadPoolExecutor(self.workers) as pool:
            submit = lambda: [(r, pool.submit(self.decode, r) if isinstance(r, dict) else None)
                              for r in islice(records, self.batch_size)]
            todo = submit()
            while todo:
                done, todo = todo, submit()  # the next batch decodes while this one is encoded
                good = []
                for r, f in done:
                    image = f.result() if f is not None else None
                    if image is not None:
                        good.append((r, image))
                    elif f is None:
                        self.skipped[r] += 1
                    else:
                        self.skipped["bad_image"] += 1
                        self.failed.append(r["name"])
                if good:
                    yield self.collate(good)
        if self.failed:
            warnings.warn(f"skipped {len(self.failed)} image(s) that could not be decoded: "
                          + ", ".join(self.failed[:5]) + (", ..." if len(self.failed) > 5 else ""))

    def collate(self, good):
        batch = {"image": torch.stack([image for _, image in good])}  # (B, 3, S, S) uint8
        if "label" in good[0][0]:
            batch["label"] = torch.tensor([r["label"] for r, _ in good], dtype=torch.int64)  # (B,)
        if "captions" in good[0][0]:
            pairs = [(i, c) for i, (r, _) in enumerate(good) for c in r["captions"]]
            batch["text"] = self.tokenizer.tokenize([c for _, c in pairs], self.context_length)  # (M, ctx)
            batch["text_image"] = torch.tensor([i for i, _ in pairs], dtype=torch.int64)  # (M,)
        return batch

    def close(self):
        pass


def image_files(items, labels, img_size, batch_size=256, workers=4):
    """[(path, box)] and a label per item -> ImageRecords of those files, in order."""
    records = lambda: ({"path": p, "box": box, "name": p, "label": int(y)} for (p, box), y in zip(items, labels))
    return ImageRecords(records, img_size, batch_size, workers, num_records=len(items))


class FirstImages:
    """The first n images of a shard loader's batches (the last batch cut), for --max_images on a shard set."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return min(len(self.loader), math.ceil(self.n / self.loader.batch_size))

    def __iter__(self):
        left = self.n
        for batch in self.loader:
            yield {k: v[:left] for k, v in batch.items()}  # every field of a shard batch is one row per image
            left -= len(batch["image"])
            if left <= 0:
                break

    def close(self):
        self.loader.close()


# -----------------------------------------------------------------------------
# evaluation sources: one reader per layout behind open_source


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """({WordNet id: OpenAI's curated name}, the 80 ImageNet templates) from imagenet_classes.json."""
    with open(IMAGENET_FILE, encoding="utf-8") as f:
        d = json.load(f)
    return dict(map(tuple, d["classes"])), d["templates"]


def curated(classes, templates=None):
    """Class names that are all ImageNet WordNet ids (n01440764, ...) -> OpenAI's curated names and the 80
    templates; any other names are kept, with `templates`."""
    names, imagenet_templates = imagenet_classes()
    if classes and all(c in names for c in classes):
        return [names[c] for c in classes], imagenet_templates
    return classes, templates


class Source:
    """An evaluation set as open_source found it: what it holds (classes: names or None; templates: the data's own
    list or None; labelled / captioned: whether its batches carry labels / captions; heldout: the synthetic set's
    held-out class indices), and batches(...) to read it, again at every call, at a model's image size (see
    ImageRecords for the batch fields; shard sets give ShardLoader's). Finding it is cheap (no image is read), so
    a bad --data is found before a checkpoint is loaded or a run starts."""

    def __init__(self, data, split, make, classes=None, templates=None, labelled=False, captioned=False,
                 heldout=None, img_size=None):
        self.data, self.split, self.make, self.classes, self.templates = data, split, make, classes, templates
        self.labelled, self.captioned, self.heldout, self.img_size = labelled, captioned, heldout, img_size

    def batches(self, img_size, tokenizer, context_length, batch=256, workers=0):
        if self.img_size is not None and self.img_size != img_size:  # shards are stored at one size
            raise ValueError(f"{self.data} has {self.img_size} px images but the model takes {img_size} px")
        return self.make(img_size, tokenizer, context_length, batch, workers)


def open_source(data, split=None, max_images=None, columns=None):
    """--data -> Source: hf:<id or dir> (a hub dataset), a shard set (index.json), a CLIP_benchmark wds folder
    (<split>/nshards.txt), or class folders, in that order. split None: the layout's usual evaluation split.
    columns: {"image", "label", "caption"} column names for hub sets (None: inferred). One ValueError line for
    anything that is not one of these layouts or is broken."""
    if data.startswith("hf:"):
        return hub_source(data[3:], split, max_images, columns or {})
    if is_url(data):  # a shard folder in object storage (index.json read from there)
        return shard_source(data, split or "val", max_images)
    if not os.path.isdir(data):
        raise ValueError(f"{data} is not a directory (nor hf:<hub id or local dir>)")
    if os.path.isfile(os.path.join(data, "index.json")):
        return shard_source(data, split or "val", max_images)
    if wds_splits(data):
        return wds_source(data, split or "test", max_images)
    return folder_source(data, max_images)


def shard_source(data, split, max_images):
    """Our shards: ShardLoader's batches (image, text, and label when index.json lists classes)."""
    index = read_index(data, split)  # one ValueError line for a missing shard, no img_size, ...
    names = index.get("classes")
    if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise ValueError(f"{data}/index.json: classes must be a list of names")
    heldout = None
    if index.get("source") == "synthetic" and names and isinstance(index.get("heldout"), list):
        heldout = [names.index(h) for h in index["heldout"] if h in names]  # indices: --classes may rename

    def make(size, tokenizer, ctx, batch, workers):
        loader = ShardLoader(data, split, batch, tokenizer, ctx, shuffle=False, drop_last=False, num_workers=workers)
        return FirstImages(loader, max_images) if max_images else loader
    return Source(data, split, make, *curated(names), labelled=names is not None, captioned=True, heldout=heldout,
                  img_size=index["img_size"])


def folder_source(root, max_images):
    """Class folders root/<class>/**/<image>, sorted; ImageNet's WordNet-id folders get the curated names and the
    80 templates. A folder with no image is not a class: it is left out with a warning naming it."""
    found = class_folders(root)
    if found is None:
        raise ValueError(f"{root}: not a shard set (index.json), a CLIP_benchmark set (<split>/nshards.txt) or class "
                         f"folders with images ({root}/<class>/*.jpg, no images at the top, no .txt captions)")
    classes, items, empty = found
    if empty:
        warnings.warn(f"skipped {len(empty)} folder(s) with no images (not classes): {', '.join(empty)}")
    classes, templates = curated(classes)  # ImageNet's layout: WordNet-id folders
    if max_images and max_images < len(items):  # spread over the sorted list, so every class is in
        items = [items[i] for i in np.linspace(0, len(items) - 1, max_images).round().astype(int)]
    make = lambda size, tokenizer, ctx, batch, workers: image_files([(p, None) for p, _ in items],
                                                                    [y for _, y in items], size, batch, workers)
    return Source(root, None, make, classes, templates, labelled=True)


def wds_source(root, split, max_images):
    """CLIP_benchmark's webdataset layout: classification (.cls) or retrieval (.txt captions) samples, read from
    the mapped tars in shard and member order (dataloader.wds_records)."""
    info = wds_layout(root, split)
    records = lambda: islice((r for path in info["shards"] for r in wds_records(path, info["type"])), max_images)
    make = lambda size, tokenizer, ctx, batch, workers: ImageRecords(records, size, batch, workers, tokenizer, ctx)
    return Source(root, split, make, *curated(info["classes"], info["templates"]),
                  labelled=info["type"] == "classification", captioned=info["type"] == "retrieval")


def hub_source(name, split, max_images, columns):
    """A hub dataset (or a local copy in the hub's layout) through `datasets`, streamed; images stay encoded until
    our decode. Labels need a ClassLabel column (its names are the class names) or --classes."""
    errors = []
    for s in [split] if split else ["validation", "test"]:
        try:
            ds, _ = open_hub_dataset(name, s)
            break
        except ValueError as e:
            errors.append(str(e))
    else:
        raise ValueError(errors[-1] + ("" if split else " (tried --split validation, then test)"))
    split = s
    try:
        cols = hub_columns(ds, columns.get("image"), columns.get("caption"), columns.get("label"))
    except ValueError as e:
        raise ValueError(f"hf:{name}: {e}") from None
    if cols["label"] is None and cols["caption"] is None:
        raise ValueError(f"hf:{name}: no column of labels or captions to evaluate against; name one with "
                         f"--label_column or --caption_column")
    ds = undecoded(ds.select_columns([c for c in (cols["image"], cols["label"], cols["caption"]) if c]), cols["image"])

    def records():
        for i, r in enumerate(islice(ds, max_images)):
            data = hub_image_bytes(r[cols["image"]])
            if data is None:
                yield "missing_image"
                continue
            record = {"image": data, "name": f"{split}[{i}]"}
            if cols["label"]:
                if not isinstance(r[cols["label"]], int):
                    yield "missing_label"
                    continue
                record["label"] = r[cols["label"]]
            if cols["caption"]:
                value = r[cols["caption"]]
                record["captions"] = [c.strip() for c in (value if isinstance(value, list) else [value])
                                      if isinstance(c, str) and c.strip()]
                if not record["captions"]:
                    yield "no_caption"
                    continue
            yield record
    make = lambda size, tokenizer, ctx, batch, workers: ImageRecords(records, size, batch, workers, tokenizer, ctx)
    return Source(f"hf:{name}", split, make, *curated(cols["classes"]), labelled=cols["label"] is not None,
                  captioned=cols["caption"] is not None)


# -----------------------------------------------------------------------------
# encoding


def model_device(model):
    return next(model.parameters()).device


def autocast(device, precision):
    """bf16 autocast on CUDA (tensor cores, half the memory traffic); plain fp32 everywhere else."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")


@torch.inference_mode()
def encode_texts(model, tokenizer, texts, device=None, precision="fp32", batch=256):
    """Captions -> normalised (M, E) float32 embeddings; each distinct caption is encoded once."""
    device = torch.device(device) if device is not None else model_device(model)
    uniq = list(dict.fromkeys(texts))
    if not uniq:
        return torch.empty(0, model.config.output_dim, device=device)
    ctx = model.config.text.context_length
    parts = []
    for s in range(0, len(uniq), batch):
        tokens = tokenizer.tokenize(uniq[s:s + batch], ctx).to(device)  # (b, ctx) int64
        with autocast(device, precision):
            parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))  # (b, E)
    where = {t: i for i, t in enumerate(uniq)}
    return torch.cat(parts)[torch.tensor([where[t] for t in texts], device=device)]  # (M, E)


@torch.inference_mode()
def encode_images(model, images, device=None, precision="fp32", batch=256):
    """uint8 (N, 3, S, S) images (normalised here) or float ones (already normalised) -> normalised (N, E)."""
    device = torch.device(device) if device is not None else model_device(model)
    parts = []
    for s in range(0, len(images), batch):
        x = images[s:s + batch].to(device)
        x = normalize_images(x) if x.dtype == torch.uint8 else x.float()  # (b, 3, S, S)
        with autocast(device, precision):
            parts.append(F.normalize(model.encode_image(x).float(), dim=-1))  # (b, E)
    return torch.cat(parts) if parts else torch.empty(0, model.config.output_dim, device=device)


@torch.inference_mode()
def encode_split(model, loader, device, precision="fp32", quiet=True, classifier=None, keep=True, confusion=False):
    """Every batch of `loader` (a Source's batches, ShardLoader, ImageRecords) -> dict(image=(N, E), text=(M, E),
    text_image=(M,) the image row of each caption, label=(N,), tokens=(M, ctx) int64 on the CPU; each None when
    absent or not kept; zeroshot=ZeroShotCounts or None, num_images=N), embeddings normalised float32 on `device`.
    classifier (C, E): each labelled batch is scored as it comes (ZeroShotCounts). keep=False keeps no embedding
    (and encodes no caption): memory then does not grow with the number of images. The tokens say which caption
    each row got (shard_swaps checks its rows against them)."""
    device = torch.device(device)
    imgs, txts, owners, tokens, labels = [], [], [], [], []
    counts = ZeroShotCounts(classifier.to(device), confusion) if classifier is not None else None
    try:
        total = len(loader)
    except TypeError:  # a stream
        total = None
    t0, n, m = time.time(), 0, 0
    for batch in tqdm(loader, total=total, desc="encode", unit="batch", disable=quiet, leave=False):
        x = normalize_images(batch["image"].to(device, non_blocking=True))  # uint8 -> float on the device
        with autocast(device, precision):
            img = F.normalize(model.encode_image(x).float(), dim=-1)  # (B, E)
            if keep and "text" in batch:
                txts.append(F.normalize(model.encode_text(batch["text"].to(device, non_blocking=True)).float(), dim=-1))
        if counts is not None and "label" in batch:
            counts.update(img, batch["label"].to(device))
        if keep:
            imgs.append(img)
            if "text" in batch:
                tokens.append(batch["text"].clone())  # a copy: a worker's shared-memory tensor holds a file descriptor
                owner = batch.get("text_image", torch.arange(len(x)))  # (M,) row in this batch; shards: paired
                owners.append(owner.to(device) + n)
                m += len(owner)
            if "label" in batch:
                labels.append(batch["label"].to(device))
        n += len(x)
    if n == 0:
        raise ValueError("no images to evaluate (every image failed to decode?)")
    if device.type == "cuda":
        torch.cuda.synchronize()  # the GPU runs ahead of Python: wait, or the timing is of the launches only
    if not quiet:
        dt = time.time() - t0
        print(f"encoded {n} images{f' and {m} captions' if txts else ''} in {dt:.1f}s ({n / dt:.0f} images/s)")
    cat = lambda parts: torch.cat(parts) if parts else None
    return {"image": cat(imgs), "text": cat(txts), "text_image": cat(owners), "label": cat(labels),
            "tokens": cat(tokens), "zeroshot": counts, "num_images": n}


def zeroshot_classifier(model, tokenizer, classes, templates=TEMPLATES, device=None, precision="fp32", batch=256,
                        fix_articles=True):
    """Class names -> (C, E) normalised class embeddings: every template's caption embedding, normalised,
    averaged over templates and normalised again (CLIP's prompt ensembling). A template marks the name with {} or
    {c} (CLIP_benchmark's). fix_articles: "a {}" + "apple" -> "an apple" (for our own list; the field's lists are
    used verbatim). Encodes about `batch` prompts at a time, so memory is (C, E) plus one batch."""
    templates = [t.replace("{c}", "{}") for t in templates]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' or '{{c}}' for the class name; got {templates[:3]}")
    if not classes:
        raise ValueError("no class names")
    fill = (lambda t, c: articles(t.replace("{}", c))) if fix_articles else (lambda t, c: t.replace("{}", c))
    per, rows = max(1, batch // len(templates)), []  # classes per text batch
    for s in range(0, len(classes), per):
        prompts = [fill(t, c) for c in classes[s:s + per] for t in templates]  # c*T captions, class-major
        emb = encode_texts(model, tokenizer, prompts, device, precision, batch=len(prompts))  # (c*T, E)
        rows.append(F.normalize(emb.view(-1, len(templates), emb.shape[-1]).mean(1), dim=-1))  # (c, E)
    return torch.cat(rows)  # (C, E)


# -----------------------------------------------------------------------------
# metrics on embeddings


def ranks_of_positives(queries, keys, positive, chunk=1024):
    """(Q, E) queries, (K, E) keys, positive(s, e) -> (e - s, K) bool, the right keys of queries s..e-1 ->
    (Q,) rank of each query's best-scored right key: 1 + the number of keys scored strictly higher (K + 1 when
    a query has none). Works on `chunk` rows of the (Q, K) score matrix at a time and keeps only the ranks."""
    Q = queries.shape[0]
    ranks = torch.empty(Q, dtype=torch.int64, device=queries.device)
    for s in range(0, Q, chunk):
        scores = queries[s:s + chunk] @ keys.t()  # (c, K)
        c = scores.shape[0]
        best = scores.masked_fill(~positive(s, s + c), -math.inf).amax(1)  # (c,) from the same matmul: no rounding gap
        ranks[s:s + c] = (scores > best[:, None]).sum(1) + 1
    return ranks


def median(x):
    """Median as numpy defines it: the mean of the two middle values for an even count."""
    x = x.double().sort().values
    n = len(x)
    return float((x[(n - 1) // 2] + x[n // 2]) / 2)


def evaluate_retrieval(image_emb, text_emb, text_image=None, chunk=1024):
    """(N, E) images, (M, E) captions, text_image (M,): the image of each caption (None: paired, caption i is
    image i's) -> R@1/5/10, MRR and median rank, both directions. i2t: an image's rank is that of its best-placed
    caption (right when any of its captions is in the top k); t2i: a caption's rank is its image's."""
    if text_image is None:
        if image_emb.shape != text_emb.shape:
            raise ValueError(f"need paired (N, E) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
        text_image = torch.arange(len(image_emb), device=image_emb.device)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1] or \
            len(image_emb) == 0 or len(text_emb) == 0 or text_image.shape != (len(text_emb),):
        raise ValueError(f"need (N, E) images, (M, E) captions and (M,) caption->image rows, got "
                         f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)} and {tuple(text_image.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    text_image = text_image.to(image_emb.device)
    images = torch.arange(len(image_emb), device=image_emb.device)
    out = {}
    for name, queries, keys, positive in (
            ("i2t", image_emb, text_emb, lambda s, e: images[s:e, None] == text_image[None, :]),  # (c, M)
            ("t2i", text_emb, image_emb, lambda s, e: text_image[s:e, None] == images[None, :])):  # (c, N)
        r = ranks_of_positives(queries, keys, positive, chunk)  # (N,) or (M,)
        for k in RECALL_AT:
            out[f"{name}_R@{k}"] = (r <= k).double().mean().item()
        out[f"{name}_mrr"] = (1.0 / r.double()).mean().item()
        out[f"{name}_median_rank"] = median(r)
    return out


class ZeroShotCounts:
    """Zero-shot counts of a stream of (image embeddings, labels) against a (C, E) classifier: per class its
    samples, top-1 and top-5 hits, and with confusion=True the (C, C) confusion matrix (rows true, columns argmax
    prediction). Memory O(C) (O(C^2) with the confusion), whatever the number of images. Labels outside [0, C)
    (-1: the shard's json had none) are left out and counted."""

    def __init__(self, classifier, confusion=False):
        self.classifier, C = classifier, classifier.shape[0]
        device = classifier.device
        self.count, self.top1, self.top5 = (torch.zeros(C, dtype=torch.int64, device=device) for _ in range(3))
        self.confusion = torch.zeros(C * C, dtype=torch.int64, device=device) if confusion else None
        self.unlabelled = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, image_emb, labels):
        C = self.classifier.shape[0]
        keep = (labels >= 0) & (labels < C)
        self.unlabelled += (~keep).sum()
        emb, y = image_emb[keep], labels[keep]  # (n, E), (n,)
        logits = emb @ self.classifier.to(emb.dtype).t()  # (n, C) cosine similarities
        rank = (logits > logits.gather(1, y[:, None])).sum(1) + 1  # (n,) 1 + classes scored strictly higher
        self.count += torch.bincount(y, minlength=C)
        self.top1 += torch.bincount(y[rank == 1], minlength=C)
        self.top5 += torch.bincount(y[rank <= min(5, C)], minlength=C)
        if self.confusion is not None:
            self.confusion += torch.bincount(y * C + logits.argmax(1), minlength=C * C)

    def result(self, classes=None, heldout=None):
        """zeroshot_top1, zeroshot_top5 (top-min(5, C)), mean_per_class_recall (the mean over classes with samples
        of their top-1), zeroshot_n, zeroshot_per_class {class: top-1}, confusion (C, C) when counted, and
        zeroshot_top1_seen / zeroshot_top1_heldout when `heldout` (class names or indices) is given."""
        count, top1, top5 = self.count.cpu(), self.top1.cpu(), self.top5.cpu()
        C, n = len(count), int(count.sum())
        if n == 0:
            raise ValueError(f"no sample has a label in [0, {C})")
        names = list(classes) if classes is not None else [str(c) for c in range(C)]
        has = count > 0
        out = {"zeroshot_top1": top1.sum().item() / n, "zeroshot_top5": top5.sum().item() / n,
               "mean_per_class_recall": (top1[has].double() / count[has]).mean().item(), "zeroshot_n": n}
        if self.unlabelled:
            out["zeroshot_unlabelled"] = int(self.unlabelled)
            warnings.warn(f"{out['zeroshot_unlabelled']} samples have no label in [0, {C}) and were left out")
        if heldout is not None:
            held = torch.zeros(C, dtype=torch.bool)
            held[[names.index(h) if isinstance(h, str) else int(h) for h in heldout]] = True
            for key, m in (("zeroshot_top1_seen", ~held), ("zeroshot_top1_heldout", held)):
                if count[m].sum() > 0:  # no samples of a group: no number (rather than NaN in the JSON)
                    out[key] = top1[m].sum().item() / count[m].sum().item()
        out["zeroshot_per_class"] = {names[c]: top1[c].item() / count[c].item() for c in range(C) if count[c] > 0}
        if self.confusion is not None:
            out["confusion"] = self.confusion.cpu().view(C, C)  # (C, C) true x predicted
        return out


def evaluate_zeroshot(image_emb, labels, classifier, classes=None, heldout=None, chunk=4096):
    """(N, E) images, (N,) true labels, (C, E) classifier -> ZeroShotCounts.result (with the confusion matrix),
    counted `chunk` images at a time."""
    counts = ZeroShotCounts(classifier.to(image_emb.device, image_emb.dtype), confusion=True)
    labels = labels.to(image_emb.device)
    for s in range(0, len(labels), chunk):
        counts.update(image_emb[s:s + chunk], labels[s:s + chunk])
    return counts.result(classes, heldout)


def swap_accuracy(image_emb, true_emb, false_emb, types, groups=None, prefix="swap_"):
    """Row-aligned (M, E) image, true-caption and swapped-caption embeddings, a swap type per row ->
    {prefix+type: fraction with score(true) > score(swapped) strictly, prefix+type+"_n": rows}; with `groups`
    (ARO's relation name / attribute pair per row) also prefix+type+"_macro": the mean of per-group accuracies."""
    correct = ((image_emb * true_emb).sum(-1) > (image_emb * false_emb).sum(-1)).cpu()  # (M,) bool
    out = {}
    for t in dict.fromkeys(types):
        rows = [i for i, x in enumerate(types) if x == t]
        out[f"{prefix}{t}"] = correct[rows].double().mean().item()
        out[f"{prefix}{t}_n"] = len(rows)
        if groups is not None:
            per = {}
            for i in rows:
                per.setdefault(groups[i], []).append(correct[i].item())
            out[f"{prefix}{t}_macro"] = float(np.mean([np.mean(v) for v in per.values()]))
    return out


# -----------------------------------------------------------------------------
# swap tests from tensors, shards and files


def evaluate_swaps(model, tokenizer, images, captions, swapped, precision="fp32", batch=256):
    """images: uint8 (N, 3, S, S) (or float, normalised), captions: N true captions, swapped: {type: N captions,
    None where a sample has no swap of that type} -> {"swap_<type>": accuracy, "swap_<type>_n": count}."""
    if len(images) != len(captions) or any(len(v) != len(captions) for v in swapped.values()):
        raise ValueError("images, captions and every swapped list must have the same length")
    rows = [(i, t, s) for t, lst in swapped.items() for i, s in enumerate(lst) if s is not None]
    if not rows:
        raise ValueError("no swapped captions")
    device = model_device(model)
    img = encode_images(model, images, device, precision, batch)  # (N, E)
    idx = torch.tensor([i for i, _, _ in rows], device=device)
    true = encode_texts(model, tokenizer, [captions[i] for i, _, _ in rows], device, precision, batch)  # (M, E)
    false = encode_texts(model, tokenizer, [s for _, _, s in rows], device, precision, batch)  # (M, E)
    return swap_accuracy(img[idx], true, false, [t for _, t, _ in rows])


def shard_swaps(loader):
    """The json "swaps" {type: caption} of every sample of an unshuffled ShardLoader, as rows (sample index,
    type, swapped caption, the sample's own caption), and the number of samples. Uses the loader's own shard
    list and completeness rule, so sample i here is row i of its batches unless the loader put another sample
    in that row (evaluate_checkpoint checks the caption); tar members are read in memory (mmap), never extracted.
    The shards come through the loader's own cache: an in-process loader (no workers) has just mapped and scanned
    them, and scanning a 1,000-sample tar again costs ~0.1 s per eval (shards at a URL are fetched again)."""
    rows, n = [], 0
    for s in range(len(loader.make.paths)):  # sorted, as the loader reads them when shuffle=False
        if getattr(loader, "remote", None) is None:
            data, samples = loader.make.shard(s, [])  # every key in sorted order, complete or not
        else:  # shards at a URL: the loader's cache has let them go by now, so each is fetched once more
            groups, _ = scan_tar(data := map_file(loader.make.paths[s]))
            samples = [groups[k] for k in sorted(groups)]
        for exts in samples:
            if not complete(exts, loader.make.required, loader.make.fields):
                continue
            if "json" in exts:
                get = lambda ext: data[exts[ext][0]:exts[ext][0] + exts[ext][1]]  # member bytes
                try:
                    swaps = json.loads(get("json")).get("swaps")
                except (ValueError, AttributeError):  # corrupt json, or not an object: no swaps for this sample
                    swaps = None
                if isinstance(swaps, dict):
                    caption = get("txt").decode("utf-8", "replace") if "txt" in exts else ""
                    rows += [(n, t, c, caption) for t, c in swaps.items() if isinstance(c, str)]
            n += 1
    return rows, n


def read_swaps_jsonl(path):
    """jsonl of {"image", "caption", "swaps": {type: caption}} or {"image", "true_caption", "false_caption",
    "type"} (image paths relative to the file's folder) -> swap records; bad lines are skipped and counted."""
    base, records, bad = os.path.dirname(os.path.abspath(path)), [], 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not an error for the file
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                bad += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                bad += 1
                continue
            image = os.path.join(base, row["image"])
            if isinstance(row.get("caption"), str) and isinstance(row.get("swaps"), dict):
                records += [{"image": image, "box": None, "true": row["caption"], "false": s, "type": str(t)}
                            for t, s in row["swaps"].items() if isinstance(s, str)]
            elif isinstance(row.get("true_caption"), str) and isinstance(row.get("false_caption"), str):
                records.append({"image": image, "box": None, "true": row["true_caption"],
                                "false": row["false_caption"], "type": str(row.get("type", "swap"))})
            else:
                bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not a swap record")
    if not records:
        raise ValueError(f"{path}: no swap records")
    return records


def read_aro(path, image_dir):
    """ARO's VG-Relation / VG-Attribution file: a JSON list of {"image_path", "bbox_x", "bbox_y", "bbox_w",
    "bbox_h", "true_caption", "false_caption", "relation_name" | "attributes"} -> swap records of type
    "relation" / "attribute", grouped by relation name / attribute pair (for ARO's macro accuracy)."""
    try:
        with open(path, "rb") as f:
            items = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not a JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of ARO items, got {type(items).__name__}")
    records, bad = [], 0
    for it in items:
        try:
            x, y, w, h = (float(it[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            rec = {"image": os.path.join(image_dir, it["image_path"]), "box": (x, y, x + w, y + h),
                   "true": str(it["true_caption"]), "false": str(it["false_caption"])}
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        if "relation_name" in it:
            rec.update(type="relation", group=str(it["relation_name"]))
        elif "attributes" in it:
            a = it["attributes"]
            rec.update(type="attribute", group=" / ".join(map(str, a)) if isinstance(a, list) else str(a))
        else:
            rec.update(type="swap", group="")
        records.append(rec)
    if bad:
        warnings.warn(f"{path}: skipped {bad} item(s) without image_path, bbox or captions")
    if not records:
        raise ValueError(f"{path}: no ARO items")
    return records


def evaluate_swap_records(model, tokenizer, records, batch=256, precision="fp32", workers=4, quiet=True,
                          prefix="swap_"):
    """Swap records {"image", "box", "true", "false", "type"[, "group"]} -> swap_accuracy of those whose image
    decodes (each distinct image/crop is encoded once); `prefix`skipped_images counts the rest."""
    device = model_device(model)
    items = list(dict.fromkeys((r["image"], r["box"]) for r in records))  # distinct (path, box)
    where = {it: i for i, it in enumerate(items)}
    images = image_files(items, range(len(items)), model.config.vision.img_size, batch, workers)
    enc = encode_split(model, images, device, precision, quiet)  # label = index of each decoded item
    slot = torch.full((len(items),), -1, dtype=torch.int64)
    slot[enc["label"].cpu()] = torch.arange(len(enc["label"]))  # item -> its row in enc["image"], -1 if failed
    recs = [r for r in records if slot[where[(r["image"], r["box"])]] >= 0]
    if not recs:
        raise ValueError("no swap record has an image that decodes")
    rows = torch.tensor([slot[where[(r["image"], r["box"])]].item() for r in recs], device=device)
    true = encode_texts(model, tokenizer, [r["true"] for r in recs], device, precision, batch)
    false = encode_texts(model, tokenizer, [r["false"] for r in recs], device, precision, batch)
    groups = [r["group"] for r in recs] if all("group" in r for r in recs) else None
    out = swap_accuracy(enc["image"][rows], true, false, [r["type"] for r in recs], groups, prefix)
    out[f"{prefix}skipped_images"] = sum(images.skipped.values())
    return out


def loader_swaps(model, tokenizer, loader, enc, device, precision="fp32", batch=256):
    """Swap accuracy of the shards' json "swaps", on the images and captions encode_split already encoded.
    A row whose caption is not its sample's own (a loader that filled a bad record's place with another sample)
    is left out and counted as swap_misaligned: its image is not the one the swap was made for."""
    rows, n = shard_swaps(loader)
    if not rows:
        return {}
    if n != len(enc["image"]):
        warnings.warn(f"swap test skipped: the shards list {n} samples, the loader gave {len(enc['image'])}")
        return {}
    ctx = enc["tokens"].shape[1]
    idx = torch.tensor([i for i, _, _, _ in rows])  # (M,)
    same = (enc["tokens"][idx] == tokenizer.tokenize([c for _, _, _, c in rows], ctx)).all(1)  # (M,) bool
    out = {}
    if not same.all():
        out["swap_misaligned"] = int((~same).sum())
        warnings.warn(f"swap test: left out {out['swap_misaligned']} swap(s) of samples the loader replaced")
        rows, idx = [r for r, ok in zip(rows, same.tolist()) if ok], idx[same]
    if rows:
        idx = idx.to(enc["image"].device)
        false = encode_texts(model, tokenizer, [s for _, _, s, _ in rows], device, precision, batch)  # (M, E)
        out.update(swap_accuracy(enc["image"][idx], enc["text"][idx], false, [t for _, t, _, _ in rows]))
    return out


# -----------------------------------------------------------------------------
# exported embeddings and nearest-caption search (hard-negative mining)


def split_records(loader):
    """(ids "shard.tar/key", captions) of every complete sample of an unshuffled ShardLoader, in its row order."""
    ids, captions = [], []
    for path in loader.make.paths:  # sorted, as the loader reads them when shuffle=False
        data = map_file(path)
        groups, _ = scan_tar(data)
        for key in sorted(groups):
            exts = groups[key]
            if complete(exts, loader.make.required, loader.make.fields):
                ids.append(f"{os.path.basename(path)}/{key}")
                off, size = exts["txt"]
                captions.append(bytes(data[off:off + size]).decode("utf-8", "replace"))
    return ids, captions


def embedding_arrays(enc, loader, tokenizer):
    """encode_split's output on a shard split -> numpy {image, text: float32 (M, E) normalised, ids, captions: str
    (M,)}. A row the loader filled with another sample (a bad record) is dropped: its image is not its id's."""
    ids, captions = split_records(loader)
    if len(ids) != len(enc["image"]):
        raise ValueError(f"the shards list {len(ids)} complete samples but the loader gave {len(enc['image'])}")
    same = (enc["tokens"] == tokenizer.tokenize(captions, enc["tokens"].shape[1])).all(1).numpy()  # (N,) bool
    keep = np.flatnonzero(same)
    return {"image": enc["image"].cpu().numpy()[keep].astype(np.float32),
            "text": enc["text"].cpu().numpy()[keep].astype(np.float32),
            "ids": np.array(ids)[keep].astype(str), "captions": np.array(captions)[keep].astype(str)}


def save_embeddings(folder, arrays):
    """DIR/{image,text,ids,captions}.npy: plain dtypes (float32, fixed-width unicode), so np.load never unpickles;
    row i of each is one sample. A FAISS IndexFlatIP or plain numpy (nearest_captions) searches them."""
    os.makedirs(folder, exist_ok=True)
    for name, a in arrays.items():
        np.save(os.path.join(folder, f"{name}.npy"), a, allow_pickle=False)


def load_embeddings(folder):
    return {name: np.load(os.path.join(folder, f"{name}.npy"), allow_pickle=False)
            for name in ("image", "text", "ids", "captions")}


def nearest_captions(queries, keys, own, k, chunk=4096):
    """(N, E) queries, (U, E) keys (distinct captions), own: (N,) index of each query's own caption in keys ->
    (N, min(k, U - 1)) key indices, most similar first, never the query's own caption. Inner products on
    normalised rows (cosine), `chunk` query rows at a time: the (N, U) matrix never exists whole."""
    k = min(k, len(keys) - 1)
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ keys.T  # (c, U)
        c = len(scores)
        scores[np.arange(c), own[s:s + chunk]] = -np.inf  # its own caption (and its exact duplicates) is no negative
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (c, k) the k best, unordered
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")  # (c, k)
        out[s:s + c] = np.take_along_axis(top, order, 1)
    return out


# -----------------------------------------------------------------------------
# one call for train.py and the CLI


def evaluate_checkpoint(model, tokenizer, data, split=None, batch=256, device="cpu", precision="fp32",
                        templates=None, quiet=True, classes=None, workers=0, chunk=1024, details=False,
                        save_embeddings_to=None, max_images=None, columns=None, retrieval=True):
    """Everything that applies to `data`, from one encoding pass: zero-shot (labelled data), retrieval (captioned
    data) and swaps (shard sets). data: a Source, or what open_source takes (a folder, hf:<id or dir>; `split`,
    `max_images` and `columns` go with it). Returns numbers only (loggable as they are); details=True adds
    zeroshot_per_class, the class names and the confusion matrix. retrieval=False: zero-shot only (no caption is
    encoded, no embedding kept). save_embeddings_to: a folder for a shard split's embeddings."""
    source = data if isinstance(data, Source) else open_source(data, split, max_images, columns)
    names = source.classes
    if classes is not None and not source.labelled:
        warnings.warn(f"class names given but {source.data} has no labels: they are not used")
    elif classes is not None and names is not None and len(classes) != len(names):
        raise ValueError(f"{len(classes)} class names given but {source.data} has {len(names)} classes")
    elif classes is not None:
        names = list(classes)
    if source.labelled and not names:
        raise ValueError(f"{source.data} has labels but no class names (give them with --classes FILE)")
    was_training = model.training
    model.eval()
    loader, out = None, {}
    try:
        loader = source.batches(model.config.vision.img_size, tokenizer, model.config.text.context_length, batch,
                                workers)
        classifier = None
        if source.labelled:  # the classifier first: images are then scored as they stream past
            own = templates or source.templates  # the field's lists are used verbatim; ours gets "an apple"
            classifier = zeroshot_classifier(model, tokenizer, names, own or TEMPLATES, device, precision, batch,
                                             fix_articles=own is None)
        keep = source.captioned and retrieval
        enc = encode_split(model, loader, device, precision, quiet, classifier, keep=keep, confusion=details)
        out["num_images"] = enc["num_images"]
        out.update({f"skipped_{why}": n for why, n in sorted(getattr(loader, "skipped", {}).items())})
        if classifier is not None:
            out.update(enc["zeroshot"].result(names, source.heldout))
            out["classes"] = list(names)
        if keep:
            out.update(evaluate_retrieval(enc["image"], enc["text"], enc["text_image"], chunk))
            if isinstance(loader, ShardLoader):  # the swap test and the export read the shards' json and keys
                if save_embeddings_to is not None:
                    save_embeddings(save_embeddings_to, embedding_arrays(enc, loader, tokenizer))
                out.update(loader_swaps(model, tokenizer, loader, enc, device, precision, batch))
    finally:
        model.train(was_training)
        if loader is not None:
            loader.close()
    if not details:
        out = {k: v for k, v in out.items() if isinstance(v, (int, float))}
    return out


# -----------------------------------------------------------------------------
# output


def plot_confusion(confusion, classes, path):
    """Row-normalised confusion matrix (P(predicted | true)) as a PNG, written atomically. Figure + Agg
    canvas, no pyplot: no display needed and no global state touched."""
    C = confusion.shape[0]
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)  # (C, C) each row sums to 1
    side = min(4 + 0.15 * C, 30)
    fig = Figure(figsize=(side + 1, side), tight_layout=True)
    ax = fig.add_subplot()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set(title=f"zero-shot confusion ({C} classes)", xlabel="predicted", ylabel="true")
    if C <= 100:  # beyond that the names are unreadable anyway
        ax.set_xticks(range(C), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(C), classes, fontsize=6)
    save_figure(fig, path)


def format_table(results):
    """Plain aligned text: one "metric  value" line per number, then the 5 weakest and strongest classes."""
    nums = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    w = max(map(len, nums), default=0)
    lines = [f"{k:<{w}}  {v if isinstance(v, int) else f'{v:.4f}'}" for k, v in nums.items()]
    per = results.get("zeroshot_per_class")
    if per and len(per) > 1:
        show = lambda sign: ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: sign * kv[1])[:5])
        lines += [f"{'weakest classes':<{w}}  {show(1)}", f"{'strongest classes':<{w}}  {show(-1)}"]
    return "\n".join(lines)


def read_lines(path):
    """Non-empty, stripped lines of a UTF-8 text file (a BOM is dropped); one ValueError line when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def pick_device(name):
    """--device -> torch.device, or one ValueError line when it does not exist here (checked before the checkpoint
    is loaded, which would otherwise fail with a misleading message)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def check_out(path):
    """--out must be a file whose folder exists or can be made: checked (and the folder made) before the
    evaluation, so a typo does not cost a whole run. One ValueError line otherwise."""
    if not os.path.basename(path) or os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name such as {os.path.join(path, 'results.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--out {path}: cannot create the folder {folder}: a file of that name exists")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot create the folder {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {path}: the folder {folder} is not writable")


def main(argv=None):
    from checkpoint_manager import load_model
    from tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint .pt (model, config, tokenizer)")
    parser.add_argument("--data", help="shard set (index.json; a folder or its URL: https://, s3://, gs://), class "
                                       "folders DIR/<class>/*.jpg, a CLIP_benchmark "
                                       "wds folder, or hf:<hub id or local dir>")
    parser.add_argument("--split", help="default: val (shard sets), test (CLIP_benchmark), validation or test (hub)")
    parser.add_argument("--max_images", type=int, help="evaluate the first N samples only (class folders: N spread "
                                                       "over the classes)")
    parser.add_argument("--image_column", help="hf: the image column (when it cannot be inferred)")
    parser.add_argument("--label_column", help="hf: the label column (a ClassLabel, or integers with --classes)")
    parser.add_argument("--caption_column", help="hf: the caption column (a string or a list of strings)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="results.json", help="results JSON; the confusion PNG goes next to it")
    parser.add_argument("--classes", help="file: one class name per line (replaces the data's names, same order)")
    parser.add_argument("--templates", help="file: one template per line, {} or {c} marks the class name")
    parser.add_argument("--tokenizer", help="tokenizer.json, for a checkpoint saved without one")
    parser.add_argument("--swaps_jsonl", help='jsonl of {"image", "caption", "swaps": {type: caption}} or '
                                              '{"image", "true_caption", "false_caption", "type"}')
    parser.add_argument("--aro", help="ARO VG-Relation / VG-Attribution annotation JSON")
    parser.add_argument("--aro_images", help="folder the ARO file's image_path values are relative to")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on cuda")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="loader processes (shards) / decoding threads (image files)")
    parser.add_argument("--chunk", type=int, default=1024, help="similarity rows held at once in retrieval")
    parser.add_argument("--save_embeddings", metavar="DIR", help="shard sets: write the split's normalised "
                        "embeddings to DIR/{image,text,ids,captions}.npy (float32; np.load, no pickle)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or speed line")
    args = parser.parse_args(argv)

    # every input is checked before the checkpoint is loaded and anything is encoded: each problem is one line
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt}: no such file")
    if args.data is None and not (args.aro or args.swaps_jsonl):
        parser.error("--data is required (unless --aro or --swaps_jsonl is given)")
    if args.data is not None and not (args.data.startswith("hf:") or is_url(args.data) or os.path.isdir(args.data)):
        parser.error(f"--data {args.data}: no such directory")
    for flag in ("classes", "templates", "tokenizer", "swaps_jsonl", "aro"):
        if getattr(args, flag) is not None and not os.path.isfile(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)}: no such file")
    if bool(args.aro) != bool(args.aro_images) or (args.aro_images and not os.path.isdir(args.aro_images)):
        parser.error("--aro FILE needs --aro_images DIR (an existing folder), and the other way round")
    if args.batch < 1 or args.chunk < 1 or args.workers < 0 or (args.max_images is not None and args.max_images < 1):
        parser.error("--batch, --chunk and --max_images must be >= 1, --workers >= 0")
    columns = {"image": args.image_column, "label": args.label_column, "caption": args.caption_column}
    if any(columns.values()) and not (args.data or "").startswith("hf:"):
        parser.error("--image_column, --label_column and --caption_column apply to --data hf:<id or dir> only")
    shards = args.data and (is_url(args.data) or os.path.isfile(os.path.join(args.data, "index.json")))
    if args.save_embeddings and (args.max_images or not shards):
        parser.error("--save_embeddings needs --data to be a shard set (a folder with index.json) and no --max_images")
    if args.save_embeddings and os.path.exists(args.save_embeddings) and not os.path.isdir(args.save_embeddings):
        parser.error(f"--save_embeddings {args.save_embeddings} is a file; give a folder")

    def checked(flag, fn, *a):  # fn's one-line ValueError -> "error: FLAG message", exit 2
        try:
            return fn(*a)
        except ValueError as e:
            parser.error(f"{flag}{e}")
    classes = checked("--classes ", read_lines, args.classes) if args.classes else None
    templates = checked("--templates ", read_lines, args.templates) if args.templates else None
    if classes is not None and not classes:
        parser.error(f"--classes {args.classes}: no class names in the file")
    if templates is not None and (not templates or any("{}" not in t and "{c}" not in t for t in templates)):
        parser.error(f"--templates {args.templates}: every line needs a {{}} or {{c}} for the class name")
    tokenizer = checked("--tokenizer ", load_tokenizer, args.tokenizer) if args.tokenizer else None
    device = checked("", pick_device, args.device)
    checked("", check_out, args.out)
    # the layout, its split, its columns: found now (no image read), so a broken --data is one line before loading
    source = checked("--data ", open_source, args.data, args.split, args.max_images, columns) if args.data else None
    if source is not None and source.labelled and not (source.classes or classes):
        parser.error(f"--data {args.data} has labels but no class names: give them with --classes FILE")
    if source is not None and classes and source.classes and len(classes) != len(source.classes):
        parser.error(f"--classes {args.classes}: {len(classes)} names, but --data {args.data} has "
                     f"{len(source.classes)} classes")
    precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision

    try:
        model, ckpt = load_model(args.ckpt, map_location=device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.error(str(e).splitlines()[0])
    if tokenizer is None:
        if not isinstance(ckpt.get("tokenizer"), dict):
            parser.error(f"checkpoint {args.ckpt} has no tokenizer; pass --tokenizer FILE (e.g. DATA/tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        except (ValueError, KeyError, TypeError) as e:
            parser.error(f"checkpoint {args.ckpt}: its tokenizer is not usable ({e}); pass --tokenizer FILE")
    if tokenizer.vocab_size > model.config.text.vocab_size:  # token ids past the embedding table: wrong tokenizer
        parser.error(f"the tokenizer has {tokenizer.vocab_size} tokens but the model was trained with "
                     f"{model.config.text.vocab_size}: pass the tokenizer of its training data")

    results = {"ckpt": args.ckpt, "data": args.data, "split": source.split if source else None,
               "step": ckpt.get("step")}
    try:
        if source:
            results.update(evaluate_checkpoint(model, tokenizer, source, None, args.batch, device, precision,
                                               templates, args.quiet, classes, args.workers, args.chunk, details=True,
                                               save_embeddings_to=args.save_embeddings))
        if args.swaps_jsonl:
            results.update(evaluate_swap_records(model, tokenizer, read_swaps_jsonl(args.swaps_jsonl), args.batch,
                                                 precision, args.workers, args.quiet, prefix="jsonl_"))
        if args.aro:
            results.update(evaluate_swap_records(model, tokenizer, read_aro(args.aro, args.aro_images), args.batch,
                                                 precision, args.workers, args.quiet, prefix="aro_"))
    except ValueError as e:
        parser.error(str(e))

    confusion = results.pop("confusion", None)
    write_atomic(args.out, json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"wrote {args.out}")
    if args.save_embeddings:
        print(f"wrote embeddings of {results.get('num_images')} samples to {args.save_embeddings}/")
    if confusion is not None:
        png = os.path.splitext(args.out)[0] + "_confusion.png"
        plot_confusion(confusion, results["classes"], png)
        print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
