"""
Evaluate a CLIP checkpoint: zero-shot classification, image-text retrieval and a compositional (swap) test.

    python eval_zeroshot.py --ckpt out/ckpt/best.pt --data data/synthetic          # shards: everything that applies
    python eval_zeroshot.py --ckpt best.pt --data imagenet/val --out in1k.json     # class folders: zero-shot only
    python eval_zeroshot.py --ckpt best.pt --aro visual_genome_relation.json --aro_images vg_images/

What runs on what:
- zero-shot (Radford et al. 2021, sec. 3.1.4): on class folders (DIR/<class>/*.jpg, ImageNet layout) and on
  shard sets whose index.json lists "classes". Each class becomes one text embedding: the caption embeddings of
  every template ("a photo of a {}.", ...), each normalised, averaged and normalised again (prompt ensembling).
  Top-1 / top-5 accuracy (top-k capped at the number of classes), per-class top-1 and a confusion matrix PNG.
  On the synthetic set, top-1 is also split into seen and held-out colour-shape combinations (by true label).
- retrieval: on any shard set, image i's own caption is caption i. image->text and text->image R@1/5/10, mean
  reciprocal rank and median rank. Only `chunk` rows of the similarity matrix exist at a time, so 100k pairs
  need a few hundred MB, never the full N x N matrix.
- swaps (ARO, Yuksekgonul et al. 2023): is the true caption scored strictly higher than a swapped one
  ("a red cube left of a blue ball" vs "a blue cube left of a red ball")? Accuracy per swap type, from the
  synthetic shards' json "swaps", a jsonl file (--swaps_jsonl), or ARO's VG-Relation / VG-Attribution files
  (--aro FILE --aro_images DIR; each image is cropped to its bbox first, as ARO does).

Ranks and ties: the rank of the right answer is 1 + the number of candidates with a strictly higher score, so a
tie counts in the model's favour (identical captions in a retrieval set do not push each other down). Accuracies,
recalls and MRR are fractions in [0, 1].

--save_embeddings DIR exports the shard split's embeddings (DIR/{image,text}.npy float32 normalised, ids.npy
"shard/key", captions.npy; np.load with allow_pickle=False). nearest_captions searches them in chunks (plain numpy,
or a FAISS IndexFlatIP); `prep_dataset.py add-negatives` mines hard negatives with exactly these functions.

train.py calls `evaluate_checkpoint` every --eval_every steps: one encoding pass over the split, reused by
zero-shot, retrieval and the swap test. Pass it the bare model (not the DDP wrapper, which has no encode_image).

Left out on purpose: linear probes, few-shot, test-time augmentation, the 80 ImageNet templates of CLIP (give
them with --templates), and per-dataset class-name cleaning.
"""

import argparse
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from clip import normalize_images
from dataloader import (ShardLoader, articles, class_folders, complete, decode_image, image_array, is_url,
                        load_tokenizer, map_file, read_index, scan_tar)
from logger import save_figure, write_atomic

# A short, generic CLIP-style template list (prompt ensembling); --templates replaces it.
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.", "a {}."]
RECALL_AT = (1, 5, 10)

# -----------------------------------------------------------------------------
# images from files (class folders, jsonl / ARO swap files)


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
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


class ImageList:
    """Image files -> batches like ShardLoader's: {"image": uint8 (B, 3, S, S), "label": int64 (B,)}, in order.
    Files that do not decode are skipped, counted (self.skipped) and named in a warning. Decoding runs in a
    thread pool (PIL releases the GIL while decoding) one batch ahead, so it overlaps the model's forward."""

    def __init__(self, items, labels, img_size, batch_size=256, workers=4):
        self.items, self.labels = list(items), torch.as_tensor(labels, dtype=torch.int64)  # [(path, box)], (N,)
        self.img_size, self.batch_size, self.workers = img_size, batch_size, max(1, workers)
        self.skipped, self.failed = 0, []

    def __len__(self):
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self):
        self.skipped, self.failed, B = 0, [], self.batch_size
        with ThreadPoolExecutor(self.workers) as pool:
            submit = lambda s: [pool.submit(try_load, it, self.img_size) for it in self.items[s:s + B]]
            futures = submit(0)
            for s in range(0, len(self.items), B):
                images = [f.result() for f in futures]
                futures = submit(s + B)  # the next batch decodes while this one is encoded
                ok = [i for i, im in enumerate(images) if im is not None]
                self.failed += [self.items[s + i][0] for i, im in enumerate(images) if im is None]
                if ok:
                    yield {"image": torch.stack([images[i] for i in ok]),  # (B', 3, S, S) uint8
                           "label": self.labels[s:s + B][ok]}  # (B',)
        self.skipped = len(self.failed)
        if self.failed:
            warnings.warn(f"skipped {self.skipped} image(s) that could not be decoded: "
                          + ", ".join(self.failed[:5]) + (", ..." if self.skipped > 5 else ""))

    def close(self):
        pass


def image_folder(root, img_size, batch_size=256, workers=4):
    """Class folders root/<class>/**/<image> (ImageNet layout, found by dataloader.class_folders) -> (ImageList,
    class names). A folder with no image is not a class: it is left out with a warning naming it."""
    found = class_folders(root)
    if found is None:
        raise ValueError(f"{root}: no index.json and not class folders with images (expected {root}/<class>/*.jpg "
                         f"with no images at the top and no .txt captions beside the images)")
    classes, items, empty = found
    if empty:
        warnings.warn(f"skipped {len(empty)} folder(s) with no images (not classes): {', '.join(empty)}")
    return ImageList([(p, None) for p, _ in items], [y for _, y in items], img_size, batch_size, workers), classes


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
def encode_split(model, loader, device, precision="fp32", quiet=True):
    """Every batch of `loader` (ShardLoader or ImageList) -> dict(image=(N, E), text=(N, E) or None,
    label=(N,) or None, tokens=(N, ctx) int64 on the CPU or None), embeddings normalised float32 on `device`.
    The tokens say which caption each row got (shard_swaps checks its rows against them)."""
    device = torch.device(device)
    imgs, txts, tokens, labels = [], [], [], []
    t0, n = time.time(), 0
    for batch in tqdm(loader, total=len(loader), desc="encode", unit="batch", disable=quiet, leave=False):
        x = normalize_images(batch["image"].to(device, non_blocking=True))  # uint8 -> float on the device
        with autocast(device, precision):
            imgs.append(F.normalize(model.encode_image(x).float(), dim=-1))  # (B, E)
            if "text" in batch:
                txts.append(F.normalize(model.encode_text(batch["text"].to(device, non_blocking=True)).float(), dim=-1))
        if "text" in batch:
            tokens.append(batch["text"].clone())  # a copy: a worker's shared-memory tensor holds a file descriptor
        if "label" in batch:
            labels.append(batch["label"].to(device))
        n += len(x)
    if not imgs:
        raise ValueError("no images to evaluate (every image failed to decode?)")
    if device.type == "cuda":
        torch.cuda.synchronize()  # the GPU runs ahead of Python: wait, or the timing is of the launches only
    if not quiet:
        dt = time.time() - t0
        print(f"encoded {n} images{' and captions' if txts else ''} in {dt:.1f}s ({n / dt:.0f} images/s)")
    return {"image": torch.cat(imgs), "text": torch.cat(txts) if txts else None,
            "label": torch.cat(labels) if labels else None, "tokens": torch.cat(tokens) if tokens else None}


def zeroshot_classifier(model, tokenizer, classes, templates=TEMPLATES, device=None, precision="fp32"):
    """Class names -> (C, E) normalised class embeddings: every template's caption embedding, normalised,
    averaged over templates and normalised again (CLIP's prompt ensembling). "a {}" + "apple" -> "an apple"."""
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the class name; got {templates[:3]}")
    if not classes:
        raise ValueError("no class names")
    prompts = [articles(t.replace("{}", c)) for c in classes for t in templates]  # C*T captions, class-major
    emb = encode_texts(model, tokenizer, prompts, device, precision)  # (C*T, E)
    emb = emb.view(len(classes), len(templates), -1).mean(1)  # (C, E) average over templates
    return F.normalize(emb, dim=-1)


# -----------------------------------------------------------------------------
# metrics on embeddings


def ranks_of_diagonal(queries, keys, chunk=1024):
    """(N, E) queries, (N, E) keys -> (N,) rank of keys[i] for query i: 1 + #keys with a strictly higher
    score. Works on `chunk` rows of the (N, N) score matrix at a time and keeps only the ranks."""
    N = queries.shape[0]
    ranks = torch.empty(N, dtype=torch.int64, device=queries.device)
    for s in range(0, N, chunk):
        scores = queries[s:s + chunk] @ keys.t()  # (c, N)
        c = scores.shape[0]
        true = scores[torch.arange(c, device=scores.device), torch.arange(s, s + c, device=scores.device)]  # (c,)
        ranks[s:s + c] = (scores > true[:, None]).sum(1) + 1  # the true score from the same matmul: no rounding gap
    return ranks


def median(x):
    """Median as numpy defines it: the mean of the two middle values for an even count."""
    x = x.double().sort().values
    n = len(x)
    return float((x[(n - 1) // 2] + x[n // 2]) / 2)


def evaluate_retrieval(image_emb, text_emb, chunk=1024):
    """Paired (N, E) image and caption embeddings -> R@1/5/10, MRR and median rank, both directions."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2 or len(image_emb) == 0:
        raise ValueError(f"need paired (N, E) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = {}
    for name, queries, keys in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        r = ranks_of_diagonal(queries, keys, chunk)  # (N,)
        for k in RECALL_AT:
            out[f"{name}_R@{k}"] = (r <= k).double().mean().item()
        out[f"{name}_mrr"] = (1.0 / r.double()).mean().item()
        out[f"{name}_median_rank"] = median(r)
    return out


def evaluate_zeroshot(image_emb, labels, classifier, classes=None, heldout=None, chunk=4096):
    """(N, E) images, (N,) true labels, (C, E) classifier -> zeroshot_top1, zeroshot_top5 (top-min(5, C)),
    zeroshot_per_class {class: top-1}, confusion (C, C) int64 (rows true, columns argmax prediction), and
    zeroshot_top1_seen / zeroshot_top1_heldout when `heldout` (class names or indices) is given.
    Samples with a label outside [0, C) (-1: the shard's json had none) are left out and counted."""
    C = classifier.shape[0]
    labels = labels.to(image_emb.device)
    keep = (labels >= 0) & (labels < C)
    if not keep.any():
        raise ValueError(f"no sample has a label in [0, {C})")
    emb, y = image_emb[keep], labels[keep]  # (n, E), (n,)
    classifier = classifier.to(emb.device, emb.dtype)
    rank, pred = [], []
    for s in range(0, len(y), chunk):
        logits = emb[s:s + chunk] @ classifier.t()  # (c, C) cosine similarities
        true = logits.gather(1, y[s:s + chunk, None])  # (c, 1)
        rank.append((logits > true).sum(1) + 1)  # (c,) 1 + classes scored strictly higher
        pred.append(logits.argmax(1))
    rank, pred = torch.cat(rank).cpu(), torch.cat(pred).cpu()
    y = y.cpu()
    top1 = rank == 1
    names = list(classes) if classes is not None else [str(c) for c in range(C)]
    out = {"zeroshot_top1": top1.double().mean().item(),
           "zeroshot_top5": (rank <= min(5, C)).double().mean().item(),
           "zeroshot_n": len(y)}
    if (~keep).any():
        out["zeroshot_unlabelled"] = int((~keep).sum())
        warnings.warn(f"{out['zeroshot_unlabelled']} samples have no label in [0, {C}) and were left out")
    if heldout is not None:
        idx = [names.index(h) if isinstance(h, str) else int(h) for h in heldout]
        held = torch.isin(y, torch.tensor(idx, dtype=torch.int64))
        for key, m in (("zeroshot_top1_seen", ~held), ("zeroshot_top1_heldout", held)):
            if m.any():  # no samples of a group: no number (rather than NaN in the JSON)
                out[key] = top1[m].double().mean().item()
    count = torch.bincount(y, minlength=C)  # (C,) samples per class
    hits = torch.bincount(y[top1], minlength=C)  # (C,) top-1 hits per class
    out["zeroshot_per_class"] = {names[c]: hits[c].item() / count[c].item() for c in range(C) if count[c] > 0}
    out["confusion"] = torch.bincount(y * C + pred, minlength=C * C).view(C, C)  # (C, C) true x predicted
    return out


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
    in that row (evaluate_checkpoint checks the caption); tar members are read in memory (mmap), never extracted."""
    rows, n = [], 0
    for path in loader.make.paths:  # sorted, as the loader reads them when shuffle=False
        data = map_file(path)
        groups, _ = scan_tar(data)
        for key in sorted(groups):
            exts = groups[key]
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
                    rows += [(n, t, s, caption) for t, s in swaps.items() if isinstance(s, str)]
            n += 1
        if hasattr(data, "close"):
            data.close()
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
    images = ImageList(items, range(len(items)), model.config.vision.img_size, batch, workers)
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
    out[f"{prefix}skipped_images"] = images.skipped
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


def evaluate_checkpoint(model, tokenizer, data_dir, split="val", batch=256, device="cpu", precision="fp32",
                        templates=None, quiet=True, classes=None, workers=0, chunk=1024, details=False,
                        save_embeddings_to=None):
    """Everything that applies to data_dir, from one encoding pass: zero-shot (labelled data), retrieval and
    swaps (shard sets). Returns numbers only (loggable as they are); details=True adds zeroshot_per_class and
    the class names and the confusion matrix. data_dir: a shard set (index.json; `split` is read) or class folders.
    save_embeddings_to: a folder for the shard split's embeddings (embedding_arrays, save_embeddings)."""
    if not is_url(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist")
    size, ctx = model.config.vision.img_size, model.config.text.context_length
    was_training = model.training
    model.eval()
    heldout, loader, out = None, None, {}
    try:
        if is_url(data_dir) or os.path.isfile(os.path.join(data_dir, "index.json")):  # a URL: a shard folder
            index = read_index(data_dir, split)  # one ValueError line for a missing shard, no img_size, ...
            if index["img_size"] != size:
                raise ValueError(f"{data_dir} has {index['img_size']} px images but the model takes {size} px")
            names = index.get("classes")
            if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
                raise ValueError(f"{data_dir}/index.json: classes must be a list of names")
            if index.get("source") == "synthetic" and names and isinstance(index.get("heldout"), list):
                heldout = [names.index(h) for h in index["heldout"] if h in names]  # indices: --classes may rename
            loader = ShardLoader(data_dir, split, batch, tokenizer, ctx, shuffle=False, drop_last=False,
                                 num_workers=workers)
        else:
            loader, names = image_folder(data_dir, size, batch, max(1, workers))
        if classes is not None and names is None:
            warnings.warn(f"class names given but {data_dir} has no labels: they are not used")
        if classes is not None and names is not None and len(classes) != len(names):
            raise ValueError(f"{len(classes)} class names given but {data_dir} has {len(names)} classes")
        names = list(classes) if classes is not None and names is not None else names

        enc = encode_split(model, loader, device, precision, quiet)
        out["num_images"] = len(enc["image"])
        if isinstance(loader, ImageList):
            out["skipped_images"] = loader.skipped
        if names and enc["label"] is not None:
            classifier = zeroshot_classifier(model, tokenizer, names, templates or TEMPLATES, device, precision)
            out.update(evaluate_zeroshot(enc["image"], enc["label"], classifier, names, heldout))
            out["classes"] = list(names)
        if enc["text"] is not None:
            out.update(evaluate_retrieval(enc["image"], enc["text"], chunk))
            if save_embeddings_to is not None and not isinstance(loader, ImageList):
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
    parser.add_argument("--data", help="shard set (index.json; a folder or its URL: https://, s3://, gs://) or class "
                                       "folders DIR/<class>/*.jpg")
    parser.add_argument("--split", default="val", help="split of a shard set")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="results.json", help="results JSON; the confusion PNG goes next to it")
    parser.add_argument("--classes", help="file: one class name per line (replaces the data's names, same order)")
    parser.add_argument("--templates", help="file: one template per line, {} marks the class name")
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
    if args.data is not None and not is_url(args.data) and not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: no such directory")
    for flag in ("classes", "templates", "tokenizer", "swaps_jsonl", "aro"):
        if getattr(args, flag) is not None and not os.path.isfile(getattr(args, flag)):
            parser.error(f"--{flag} {getattr(args, flag)}: no such file")
    if bool(args.aro) != bool(args.aro_images) or (args.aro_images and not os.path.isdir(args.aro_images)):
        parser.error("--aro FILE needs --aro_images DIR (an existing folder), and the other way round")
    if args.batch < 1 or args.chunk < 1 or args.workers < 0:
        parser.error("--batch and --chunk must be >= 1, --workers >= 0")
    shards = args.data and (is_url(args.data) or os.path.isfile(os.path.join(args.data, "index.json")))
    if args.save_embeddings and not shards:
        parser.error("--save_embeddings needs --data to be a shard set (a folder with index.json)")
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
    if templates is not None and (not templates or any("{}" not in t for t in templates)):
        parser.error(f"--templates {args.templates}: every line needs a {{}} for the class name")
    tokenizer = checked("--tokenizer ", load_tokenizer, args.tokenizer) if args.tokenizer else None
    device = checked("", pick_device, args.device)
    checked("", check_out, args.out)
    if shards:
        checked("--data ", read_index, args.data, args.split)  # a missing shard, {}, no img_size, ...
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

    results = {"ckpt": args.ckpt, "data": args.data, "split": args.split, "step": ckpt.get("step")}
    try:
        if args.data:
            results.update(evaluate_checkpoint(model, tokenizer, args.data, args.split, args.batch, device, precision,
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
