"""
Shards -> batches for CLIP training: a small loader you can read top to bottom (in the spirit of build-nanogpt's
DataLoaderLite and llm.c's DistributedDataLoader), with worker processes so the next batches are decoded while
the training step runs.

    loader = ShardLoader("data/synth", "train", batch_size=256, num_workers=4, rank=rank, world_size=world)
    for batch in loader:          # one epoch; batch["image"] uint8 (B, 3, S, S), batch["text"] int64 (B, ctx)
        ...
    state = loader.state_dict()   # {"epoch", "batch", "seed", "bad"}: resume mid-epoch with load_state_dict(state)

How an epoch is ordered (it depends only on (seed, epoch), never on num_workers or timing):
1. the split's shards (sorted names from index.json) are permuted with a generator seeded by (seed, epoch);
2. the permuted shards are cut into windows of `shuffle_shards` shards; the samples of a window are mixed and
   permuted. A true global shuffle needs random access to every sample (so every shard in memory, or a seek
   per sample); the window gets most of its benefit - a batch draws from `shuffle_shards` shards, and the
   shard order changes every epoch - with only a window of shards in memory per worker. Larger windows mix
   better and cost `shuffle_shards` x shard size of memory per worker.
3. global batch b is positions [b*G, (b+1)*G) of that order, G = batch_size * world_size; rank r takes every
   world_size-th sample of it starting at r, so ranks are disjoint and always get the same number of batches
   (drop_last=True drops the last partial global batch; drop_last=False keeps it, cut to a multiple of
   world_size so ranks still get equal, smaller batches).
shuffle=False (the default for splits other than "train") keeps sorted shard and key order.

Where the work happens: the main process only reads tar headers (or per-shard counts from index.json) to
build the order; workers map whole shards into memory (mmap: never extracted to disk, and the OS page cache is
shared by all workers and ranks, though each worker's mix of samples touches every shard of the window),
decode images, tokenize captions and collate whole batches. Batch i goes to worker i % num_workers and results
are read back in order, so the output is identical for any num_workers; each worker keeps `prefetch` batches in
flight. Workers start on the first iteration and live until close() (no re-fork per epoch). A thread of the
main process receives the batches (and pins them for CUDA), so the training loop only takes finished batches.

Bad records never stop a run and are never trained on wrongly: a sample whose image is missing or does not
decode, whose caption is missing, empty or not UTF-8, whose json or .npy field is broken, is skipped and replaced by
the first good sample of the same shard from a start drawn with (seed, epoch, position) - the same replacement
in every run, with any number of workers, and after a resume - so batches keep their size on every rank. The
distinct bad samples met are counted per reason and reported once per epoch (pop_epoch_report). Unsafe member
names ("../x", "/etc/x") and truncated tars are skipped at scan time and warned about once.

A data folder at a URL (https://, s3://, gs://) is read whole shards at a time like a local one: the main process
downloads the shards of the batches it hands out into a local ShardCache (the next window in the background) and
deletes each after its last batch; the workers map the local copies.

Left out on purpose: decoding to float / normalising (done on the device, so only uint8 bytes cross PCIe),
torchvision transforms (one optional random-resized-crop in PIL is enough for CLIP), streaming sample by sample.
"""

import atexit
import io
import json
import math
import multiprocessing
import os
import queue
import mmap
import re
import shutil
import signal
import socket
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
import weakref
import collections
from collections import Counter, OrderedDict

import numpy as np
import torch
import torch.multiprocessing as torch_mp
from PIL import Image, ImageOps

from files import atomic_write, pid_alive
from tokenizer import Tokenizer


# ================================================================ the shard format
# Everything that knows how samples sit on disk lives here, and prep_dataset.py, train.py, eval_zeroshot.py and
# demo.py use it from here: tar members, grouping by key, the completeness rule, the one image decode, class
# folders, index.json and tokenizer.json.

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members of a shard
FOLDER_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff")  # local files: any of IMAGE_FORMATS
# The only PIL decoders any image bytes reach (shards, folders, uploads): the formats image-text datasets use.
# Without the list PIL tries every plugin it has, EPS among them, which hands the bytes to Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def map_file(path):
    """The whole file as a read-only buffer: mmap shares the OS page cache between workers and ranks (no
    per-worker copy, only touched pages are read); slicing it returns bytes. A URL is downloaded to an unnamed
    temporary file first (one-off reads; the loader's own go through a ShardCache)."""
    if is_url(path):
        os.makedirs(cache_root(), exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_root()) as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if download(path, f) else b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def tar_members(buf):
    """Yield (name, data offset, size, type flag) for each member of a tar held in memory. Reads the fixed
    ustar header fields directly, because tarfile spends ~50 us of Python per header (a third of the worker's
    time on 1000-sample shards); handles POSIX prefixes, GNU long names and pax "path" records, and stops at
    the end marker, a header cut off by truncation, or a header whose checksum does not match."""
    pos, long_name = 0, None
    while pos + 512 <= len(buf):
        h = buf[pos:pos + 512]  # one header block (bytes)
        if not header_ok(h):
            return  # the zero end-of-archive block, or garbage
        try:
            size = int.from_bytes(h[125:136], "big") if h[124] & 0x80 else int(h[124:136].strip(b" \0") or 0, 8)
        except ValueError:
            return
        name, kind, data = h[:100].split(b"\0", 1)[0], h[156:157], pos + 512
        if h[257:263] == b"ustar\0" and h[345] != 0:  # POSIX: long paths are split into prefix + name
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        pos = data + (size + 511) // 512 * 512
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            long_name = buf[data:data + size].split(b"\0", 1)[0]
        elif kind == b"x":  # pax extended header: records "<length> key=value\n"; we need "path"
            rec, i = buf[data:data + size], 0
            while i < len(rec):
                sp = rec.find(b" ", i)
                end = i + int(rec[i:sp]) if sp > i and rec[i:sp].isdigit() else 0  # length counts itself
                if end <= sp:
                    return  # malformed record
                key, _, value = rec[sp + 1:end - 1].partition(b"=")
                long_name = value if key == b"path" else long_name
                i = end
        elif kind != b"g":  # (g: pax global header, nothing we use)
            yield (long_name or name).decode("utf-8", "replace"), data, size, kind
            long_name = None


def header_ok(h):
    """A 512-byte tar header whose checksum matches (the all-zero end block and garbage do not)."""
    try:
        return int(h[148:156].replace(b"\0", b" ").strip() or b"x", 8) == sum(h[:148]) + 256 + sum(h[156:])
    except ValueError:
        return False


def is_tar(path):
    """The file starts with a tar member: a listed shard that is an HTML error page, an empty tar or another format
    is found before training, not by a loader worker mid-run."""
    with open(path, "rb") as f:
        return header_ok(f.read(512))


def safe_name(name):
    """Member names we accept: relative, without '..' parts (we never extract, but never trust them either)."""
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name))


def split_key(name):
    """Webdataset key and extension: "dir/000012.teacher_image.npy" -> ("dir/000012", "teacher_image.npy")."""
    head, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(head, key), ext.lower()


def scan_tar(buf):
    """Group a tar's members by webdataset key without reading their data.
    Returns ({key: {ext: (offset, size)}}, skipped): `skipped` counts members with unsafe names (absolute, or
    with a ".." part), links and other non-file members, and the member cut off by a truncated file. Reading
    stops at the first unreadable header; the members before it are kept."""
    groups, skipped = {}, 0
    for name, offset, size, kind in tar_members(buf):
        if kind == b"5":  # directory
            continue
        if kind not in (b"0", b"\0", b"7") or not safe_name(name) or "." not in os.path.basename(name) or \
                offset + size > len(buf):  # last: data cut off
            skipped += 1
            continue
        key, ext = split_key(name)
        groups.setdefault(key, {})[ext] = (offset, size)
    return groups, skipped


def read_tar(path):
    """A whole shard in memory: ({key: {ext: bytes}} in key order, members skipped). For prep and tests; the
    loader keeps (offset, size) spans into the mapped file instead."""
    buf = map_file(path)
    groups, skipped = scan_tar(buf)
    return {k: {e: bytes(buf[o:o + n]) for e, (o, n) in groups[k].items()} for k in sorted(groups)}, skipped


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})] -> a tar at `path`, atomically. Members have mtime 0, uid 0 and no user
    names, so the bytes of a shard depend only on its samples (same args -> same bytes)."""
    with atomic_write(path) as temp, tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def save_json(path, obj):
    """JSON written atomically (atomic_write): a reader sees the old file or the new one, never half."""
    with atomic_write(path) as temp, open(temp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def image_ext(exts):
    return next((e for e in IMAGE_EXTS if e in exts), None)


def complete(exts, required=("txt",), fields=()):
    """A sample is usable when it has an image, every required extension and every shared .npy field."""
    return image_ext(exts) is not None and all(e in exts for e in required) and \
        all(f + ".npy" in exts for f in fields)


def is_image_file(path):
    return path.rsplit(".", 1)[-1].lower() in FOLDER_EXTS and os.path.isfile(path)


def teacher_embedding_dim(data_dir, shards):
    """Teacher embedding size when every sample of `shards` carries both teacher fields (train.py --distill);
    else one ValueError naming the first shard that lacks them (checked before training, not mid-run)."""
    want, dim = {"teacher_image.npy", "teacher_text.npy"}, None
    for name in shards:
        buf = map_file(os.path.join(data_dir, name))
        groups, _ = scan_tar(buf)
        have = [want <= exts.keys() for exts in groups.values()]
        if not all(have):
            raise ValueError(f"--distill: {sum(not h for h in have)} of {len(have)} samples in shard {name} have no "
                             f"teacher embeddings (run `prep_dataset.py add-teacher`, or pass --teacher CKPT)")
        if dim is None and groups:
            off, size = next(iter(groups.values()))["teacher_image.npy"]
            dim = np.load(io.BytesIO(buf[off:off + size]), allow_pickle=False).shape[-1]
    return dim


def negative_slots(data_dir, shards, keys):
    """The most negative captions any sample of `shards` has under the json `keys` (train.py --hard_negatives: the
    loader's slot count), or one ValueError naming the first shard with a sample that lacks them. A sample whose
    json is missing or broken is the loader's to skip (missing_json, bad_json)."""
    most = 0
    for name in shards:
        buf = map_file(os.path.join(data_dir, name))
        groups, _ = scan_tar(buf)
        lacking = 0
        for exts in groups.values():
            try:
                meta = json.loads(buf[exts["json"][0]:exts["json"][0] + exts["json"][1]]) if "json" in exts else None
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                continue
            lists = [meta.get(k) for k in keys]
            if all(isinstance(x, list) for x in lists):
                most = max(most, sum(map(len, lists)))
            else:
                lacking += 1
        if lacking:
            cmd = "add-negatives --model CKPT" if "mined" in keys else "add-swaps"
            raise ValueError(f"--hard_negatives: {lacking} of {len(groups)} samples in shard {name} have no json "
                             f"{' / '.join(keys)} list (run `prep_dataset.py {cmd}` on {data_dir})")
    if most == 0:
        raise ValueError(f"--hard_negatives: no sample in {data_dir} has a negative caption")
    return most


# ---------------------------------------------------------------- the one image decode + preprocess

def to_rgb(img):
    """Any PIL mode -> RGB: transparency composited on white, 16-bit greys scaled (not clipped) to 8 bits, CMYK
    through PIL's converter (Adobe's inverted CMYK JPEGs are un-inverted by PIL's JPEG reader)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)  # 16-bit values 0..65535
        img = Image.fromarray(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":  # float images: assume 0..1 when the values fit, else 0..255
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max(initial=0) <= 1 else 1.0) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")  # L, CMYK, P, 1, YCbCr, RGBA-on-white ... -> RGB


def decode_image(data, size=None, box=None):
    """Encoded image bytes -> RGB PIL image: EXIF rotation applied, alpha composited on white, 16-bit and CMYK
    converted, then (optional) cropped to box (x0, y0, x1, y1), and with `size` the shorter side resized to it
    and centre-cropped to size x size (CLIP's preprocessing). Raises on bytes PIL cannot decode, and on any
    format but IMAGE_FORMATS (PIL.UnidentifiedImageError, an OSError)."""
    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    if size is not None and box is None:
        img.draft("RGB", (size, size))  # JPEG only: decode at a reduced DCT scale >= the target (much faster)
    img.load()  # decodes now, so a truncated or corrupt file fails here
    img = to_rgb(ImageOps.exif_transpose(img))
    if box is not None:
        img = img.crop(box)
    if img.width < 1 or img.height < 1:
        raise ValueError(f"empty image or crop box {box}")
    if size is not None and img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.BICUBIC)  # shorter side -> size, centre crop
    return img


def image_array(img):
    """RGB PIL image -> uint8 (3, H, W) numpy array, the layout of a batch's images."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


# ---------------------------------------------------------------- class folders, index.json, tokenizer.json

def articles(text):
    """'a orange' -> 'an orange' (class-name templates always write 'a')."""
    return re.sub(r"\ba(?= [aeiou])", "an", text)


def folder_entries(folder, inside, skipped):
    """One folder's usable entries, sorted, as (path, is_folder): its sub-folders (a link to a folder never: inside
    `inside` it repeats a folder walked anyway, out of it it leaves the source, and either can loop) and its files
    (a link only to a file inside `inside`, a real path). Whatever is passed over is counted in `skipped` by
    reason: link_folder, link_outside, broken_link, not_a_file (FIFOs, sockets, devices), bad_filename (not UTF-8:
    no caption, id or index.json could carry it) and unreadable_folder (this folder itself)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        skipped["unreadable_folder"] += 1
        return []
    out = []
    for e in entries:
        try:
            e.name.encode("utf-8")
        except UnicodeEncodeError:  # the surrogates os.fsdecode makes of bytes that are not UTF-8
            skipped["bad_filename"] += 1
            continue
        if e.is_symlink():
            target = os.path.realpath(e.path)
            reason = ("broken_link" if not os.path.exists(target) else  # dangling, or a loop of links
                      "link_outside" if os.path.commonpath([inside, target]) != inside else
                      "link_folder" if os.path.isdir(target) else None)
        else:
            reason = None if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False) else "not_a_file"
        if reason:
            skipped[reason] += 1
        else:
            out.append((e.path, e.is_dir(follow_symlinks=False)))
    return out


def walk_files(root, skipped=None, inside=None):
    """Every file below root, sorted, never leaving `inside` (default root) and never looping: folder_entries'
    rules, folder by folder; what it passes over is counted in `skipped` (a Counter)."""
    skipped = Counter() if skipped is None else skipped
    inside, files, todo = os.path.realpath(inside or root), [], [root]
    while todo:
        for path, is_folder in folder_entries(todo.pop(), inside, skipped):
            (todo if is_folder else files).append(path)
    return sorted(files)


def class_folders(root, skipped=None):
    """root/<class>/**/<image> (the ImageNet layout) -> (class names, [(path, label)], empty folder names), or
    None when root is not laid out that way: it has images at the top, .txt captions anywhere below, or no
    sub-folder with an image. A sub-folder with no image is not a class. Names: folder names, "_" -> " ".
    Walked by walk_files' rules (links stay inside root); what they pass over is added to `skipped` when root is
    laid out this way."""
    if not os.path.isdir(root):
        return None
    seen, inside = Counter(), os.path.realpath(root)
    top = folder_entries(root, inside, seen)
    if any(not is_folder and is_image_file(p) for p, is_folder in top):
        return None
    classes, items, empty = [], [], []
    for d in [os.path.basename(p) for p, is_folder in top if is_folder]:
        files = walk_files(os.path.join(root, d), seen, inside)
        if any(f.endswith(".txt") for f in files):
            return None  # captioned images in sub-folders, not classes
        images = [f for f in files if is_image_file(f)]
        if not images:
            empty.append(d)
            continue
        items += [(f, len(classes)) for f in images]
        classes.append(d.replace("_", " "))
    if classes and skipped is not None:
        skipped.update(seen)
    return (classes, items, empty) if classes else None


# a sane bound: past 2x the largest CLIP input (448 px) a typo, not a dataset (the patch grid, so the attention,
# grows with its square; 100000 px would ask for terabytes)
MAX_IMG_SIZE = 1024


def read_index(data_dir, split=None):
    """data_dir/index.json, checked: a JSON object with an img_size in 1..MAX_IMG_SIZE and at least one split
    {"shards": [names], optional "num_samples": N and "shard_sizes" parallel to shards}, every shard (of `split`,
    when given) on disk and starting like a tar. A missing num_samples is filled in: the sum of shard_sizes, else
    (for `split`) counted from the tar headers.
    Any problem is one ValueError line naming the file and what is wrong (and `split`, when given, must exist).
    A URL data_dir: index.json is read from there (unreachable, not found: one line); shards are not checked."""
    path = os.path.join(data_dir, "index.json")
    remote = is_url(data_dir)
    if not remote and not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir} does not exist")
    if not remote and not os.path.isfile(path):
        raise ValueError(f"{path} not found (make the shards with prep_dataset.py)")
    text = read_url(path) if remote else None  # (outside the try: its own one-line errors)
    try:
        if remote:
            index = json.loads(text)
        else:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or not index:
        raise ValueError(f"{path} is empty or not a JSON object")
    size = index.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMG_SIZE:
        raise ValueError(f"{path} has no valid img_size (got {size!r}; at most {MAX_IMG_SIZE} px)")
    splits = [k for k, v in index.items() if isinstance(v, dict) and "shards" in v]
    if not splits:
        raise ValueError(f"{path} lists no split (expected e.g. \"train\": {{\"shards\": [...]}})")
    for s in splits:
        info = index[s]
        shards, sizes = info["shards"], info.get("shard_sizes")
        if not isinstance(shards, list) or not all(isinstance(n, str) and n for n in shards):
            raise ValueError(f"{path}: {s}.shards must be a list of file names")
        if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(shards) or
                                  not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)):
            raise ValueError(f"{path}: {s}.shard_sizes must be {len(shards)} non-negative integers, one per shard")
        n = info.get("num_samples")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"{path}: {s}.num_samples must be a non-negative integer, got {n!r}")
        for name in shards if split in (None, s) else ():  # a loader needs only its own split's files
            if not safe_name(name) or not (remote or os.path.isfile(os.path.join(data_dir, name))):
                raise ValueError(f"{path}: shard {name} of split {s} does not exist in {data_dir}")
            if not remote and not is_tar(os.path.join(data_dir, name)):  # 512 bytes read per shard
                raise ValueError(f"{path}: shard {name} of split {s} is not a tar file (or holds no member)")
        if n is None and sizes is not None:  # a hand-made index.json may leave the count out: it is worked out
            info["num_samples"] = sum(sizes)
        elif n is None and remote and split in (None, s):
            raise ValueError(f"{path}: {s} has neither num_samples nor shard_sizes (needed for shards at a URL)")
        elif n is None and split in (None, s):  # from the tar headers (no image data is read)
            info["num_samples"] = sum(len(scan_tar(map_file(os.path.join(data_dir, name)))[0]) for name in shards)
    if split is not None and (split not in splits or not index[split]["shards"]):
        raise ValueError(f"split {split!r} not in {path} (it has {[s for s in splits if index[s]['shards']]})")
    return index


def data_fingerprint(data_dir, index, split="train"):
    """What a checkpoint records of the data it was trained on, so that a --resume on other data is refused: the
    split's shard names, samples per shard (index.json) and bytes per shard, and the source fingerprint prep keeps
    in .prep_state.json (a sha256 of the source listing; the synthetic set and hand-made shards have none). A stat
    per shard: no shard is read (shards at a URL: bytes None, the names and sizes have to do)."""
    shards = list(index[split]["shards"])
    if is_url(data_dir):
        return {"shards": shards, "shard_sizes": index[split].get("shard_sizes"), "bytes": None, "source_sha256": None}
    try:
        with open(os.path.join(data_dir, ".prep_state.json"), encoding="utf-8") as f:
            source = json.load(f)["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None
    return {"shards": shards, "shard_sizes": index[split].get("shard_sizes"),
            "bytes": [os.path.getsize(os.path.join(data_dir, n)) for n in shards], "source_sha256": source}


def load_tokenizer(path):
    """tokenizer.json (a path or a URL) -> Tokenizer, or one ValueError line when it is missing, empty or not a
    tokenizer."""
    text = read_url(path) if is_url(path) else None
    if text is None and not os.path.isfile(path):
        raise ValueError(f"tokenizer {path} not found")
    try:
        if text is not None:
            d = json.loads(text)
        else:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        return Tokenizer.from_dict(d)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a usable tokenizer file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# ---------------------------------------------------------------- shard folders at a URL
# `--data https://host/set` (or s3://bucket/set, gs://bucket/set): the folder prep_dataset.py wrote, uploaded as it
# is. index.json and tokenizer.json are read into memory; the loader's shards go through a ShardCache, a window at
# a time. https:// and http:// need nothing but urllib; s3:// and gs:// go through fsspec (installed with
# `datasets`) and its backend s3fs / gcsfs, when installed.

URL_SCHEMES = ("https://", "http://", "s3://", "gs://")
FSSPEC_BACKENDS = {"s3": "s3fs", "gs": "gcsfs"}
FETCH_TRIES, FETCH_WAIT_S, FETCH_TIMEOUT_S = 6, 0.5, 60  # transient errors: 6 tries, waits 0.5, 1, 2, 4, 8 s
FETCH_THREADS = 4  # downloads in flight per loader (object stores serve one connection at ~100 MB/s)


def is_url(path):
    return isinstance(path, str) and path.startswith(URL_SCHEMES)


def remote_fs(url):
    """The fsspec filesystem of an s3:// or gs:// URL, or one ValueError line naming the package it needs."""
    scheme = url.split("://", 1)[0]
    try:
        import fsspec
        return fsspec.filesystem(scheme)
    except ImportError as e:  # fsspec says "Install s3fs to access S3"
        raise ValueError(f"{url}: reading {scheme}:// needs the package {FSSPEC_BACKENDS[scheme]} "
                         f"(pip install {FSSPEC_BACKENDS[scheme]}); {e}") from None


def download(url, f):
    """Write the file at `url` into the open binary file `f`. Transient failures (refused, reset or dropped
    connections, timeouts, HTTP 5xx/408/429) are retried FETCH_TRIES times with doubling waits, continuing where
    the data stopped (HTTP Range, or a seek), else from the start. Anything else, or the last failure, is one
    ValueError line. Returns the bytes written."""
    import urllib.error
    import urllib.request  # (imported here: ~30 ms that local data never pays)
    done, last = 0, None
    for attempt in range(FETCH_TRIES):
        if attempt:
            time.sleep(FETCH_WAIT_S * 2 ** (attempt - 1))
        try:
            if url.startswith(("https://", "http://")):
                req = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
                src = urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S)
                if done and src.status != 206:  # the server ignored Range: the whole file again
                    done = 0
                length = src.headers.get("Content-Length")
                total = done + int(length) if length is not None else None
            else:
                src = remote_fs(url).open(url, "rb")
                src.seek(done)
                total = getattr(src, "size", None)
            f.seek(done)
            f.truncate()
            with src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
            if total is not None and done < total:  # (urllib's read returns b"" when a connection drops early)
                raise ConnectionError(f"the connection closed at byte {done} of {total}")
            return done
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                raise ValueError(f"{url}: {'not found' if e.code == 404 else 'refused'} (HTTP {e.code} {e.reason})") from None
            last = e
        except (FileNotFoundError, PermissionError) as e:  # fsspec's "no such key" / "access denied"
            raise ValueError(f"{url}: {'not found' if isinstance(e, FileNotFoundError) else 'access denied'}") from None
        except (ValueError, InterruptedError):  # remote_fs: a missing backend; ShardCache.close()
            raise
        except Exception as e:  # refused, reset, timed out, cut short (http.client.IncompleteRead)
            last = e
    why = getattr(last, "reason", None) or last
    raise ValueError(f"{url}: cannot read it ({type(last).__name__}: {why}) after {FETCH_TRIES} tries") from None


def read_url(url):
    """The bytes of a small file at a URL (index.json, tokenizer.json)."""
    f = io.BytesIO()
    download(url, f)
    return f.getvalue()


def cache_root():
    """Where remote shards are kept while read: $CLIP_SHARD_CACHE, else <tmp>/clip-shards (node-local disk is best)."""
    return os.environ.get("CLIP_SHARD_CACHE") or os.path.join(tempfile.gettempdir(), "clip-shards")


class ShardCache:
    """Shards of a URL data folder on local disk while a loader reads them. get(urls, then) blocks until those
    shards are local and queues `then` (the next window) behind them; FETCH_THREADS threads download in the
    background; drop(urls) deletes shards no later batch reads. Each loader has its own folder
    (<cache_root>/<host>-<pid>-...), removed by close(); folders of processes that died on this host are removed
    when the next one is made. `peak_bytes`: the most bytes the folder held (partial downloads included)."""

    def __init__(self, url):
        root = cache_root()
        os.makedirs(root, exist_ok=True)
        host = socket.gethostname()
        for d in os.listdir(root):  # left by a killed run on this host (a pid that is gone)
            m = re.fullmatch(rf"{re.escape(host)}-(\d+)-.*", d)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        self.url = url.rstrip("/")
        self.dir = tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-", dir=root)
        self.cond = threading.Condition()
        self.queue, self.busy, self.have, self.unwanted = [], set(), {}, set()  # have: url -> bytes on disk
        self.error, self.threads, self.stopping = None, [], False
        self.bytes = self.peak_bytes = self.peak_files = 0
        self.bound = None  # the most shards it should hold (ShardLoader.cache_bound)

    def path(self, url):
        """The local file of a shard URL."""
        return os.path.join(self.dir, urllib.parse.quote(url[len(self.url) + 1:], safe=""))

    def get(self, urls, then=()):
        """Block until every shard in `urls` is on local disk (downloaded first), with `then` queued after them."""
        with self.cond:
            if not self.threads:  # (re)started on first use, also after close()
                os.makedirs(self.dir, exist_ok=True)
                self.stopping, self.error = False, None
                self.threads = [threading.Thread(target=self.fetch_loop, daemon=True, name="shard-fetch")
                                for _ in range(FETCH_THREADS)]
                for t in self.threads:
                    t.start()
            want = [u for u in urls if u not in self.have and u not in self.busy]
            self.queue = want + [u for u in self.queue if u not in want]  # what a batch waits for goes first
            self.queue += [u for u in then if u not in self.have and u not in self.busy and u not in self.queue]
            self.unwanted -= set(urls) | set(then)
            self.cond.notify_all()
            while not all(u in self.have for u in urls):
                if self.error is not None:
                    raise self.error
                self.cond.wait()
        return [self.path(u) for u in urls]

    def fetch_loop(self):
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                url = self.queue.pop(0)
                self.busy.add(url)
                self.peak_files = max(self.peak_files, len(self.have) + len(self.busy))
            dst, size = self.path(url), 0
            try:
                with open(dst + ".part", "wb") as f:
                    size = download(url, Counting(f, self))
                os.replace(dst + ".part", dst)
            except BaseException as e:
                with self.cond:
                    self.busy.discard(url)
                    if not self.stopping:  # (close() stops a download by failing its next write)
                        self.error = e if isinstance(e, ValueError) else ValueError(f"{url}: {e}")
                    self.cond.notify_all()
                return
            with self.cond:
                self.busy.discard(url)
                self.have[url] = size
                if url in self.unwanted:  # dropped while it downloaded
                    self.remove([url])
                self.cond.notify_all()

    def grow(self, n):
        with self.cond:
            self.bytes += n
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def drop(self, urls):
        """Delete these shards (a worker that still maps one keeps reading it: unlinking frees the disk only once
        the last map closes); queued ones are not downloaded."""
        with self.cond:
            self.queue = [u for u in self.queue if u not in urls]
            self.unwanted |= {u for u in urls if u in self.busy}
            self.remove([u for u in urls if u in self.have])

    def drop_all_but(self, keep):
        with self.cond:
            self.drop([u for u in list(self.have) + self.queue + list(self.busy) if u not in keep])

    def remove(self, urls):  # (holding the lock)
        for u in urls:
            self.bytes -= self.have.pop(u)
            try:
                os.unlink(self.path(u))
            except FileNotFoundError:
                pass

    def close(self):
        """Stop the downloads and delete the folder (get() makes it again)."""
        with self.cond:
            self.stopping, self.queue = True, []
            self.cond.notify_all()
            threads, self.threads = self.threads, []
        for t in threads:
            t.join()
        with self.cond:
            self.have, self.busy, self.unwanted, self.bytes = {}, set(), set(), 0
        shutil.rmtree(self.dir, ignore_errors=True)


class Counting:
    """A file being downloaded that tells its ShardCache how its size changes (the cache's disk use)."""

    def __init__(self, f, cache):
        self.f, self.cache, self.size = f, cache, 0

    def write(self, b):
        if self.cache.stopping:
            raise InterruptedError("the cache was closed")
        self.cache.grow(len(b))
        self.size += len(b)
        return self.f.write(b)

    def seek(self, pos):
        return self.f.seek(pos)

    def truncate(self):  # at the position seeked to: a download that starts again
        pos = self.f.tell()
        self.cache.grow(pos - self.size)
        self.size = pos
        return self.f.truncate()


# ---------------------------------------------------------------- hub datasets (through `datasets`)
# prep_dataset.py's `hf` source and eval_zeroshot.py's `hf:` data read the hub's image sets through these three
# functions: open (streamed), find the columns, take an image's bytes. Images stay encoded until decode_image.

def open_hub_dataset(name, split, config=None):
    """A hub dataset id, or a local folder in the hub's layout (parquet/arrow files under data/, as
    `huggingface-cli download` leaves them) or written by save_to_disk -> (IterableDataset, source dict {id,
    revision, config, split}). Streamed: records are read as they are consumed, so an ImageNet-sized split needs
    no full download and never sits in RAM. HF_ENDPOINT and HF_TOKEN are honoured by `datasets` itself. Any
    problem (unknown id, no such split or config, the hub unreachable) is one ValueError line."""
    import datasets  # ~2 s to import: only the hub sources pay for it
    from huggingface_hub.errors import HfHubHTTPError
    local = os.path.isdir(name)
    try:
        if local and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name)  # memory-mapped arrow files, not read into RAM
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in {name} (it has {', '.join(sorted(ds))})")
                ds = ds[split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError, HfHubHTTPError, datasets.exceptions.DatasetsError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"hub dataset {name!r} (config {config}, split {split}): {why}") from None
    revision = local_revision(name) if local else hub_revision(name)
    return ds, {"id": os.path.abspath(name) if local else name, "revision": revision, "config": config, "split": split}


def hub_revision(name):
    """The commit the hub resolves `name` to (what a re-run must match), or None when the hub does not say."""
    try:
        from huggingface_hub import HfApi
        return HfApi().dataset_info(name).sha
    except Exception:  # offline, a mirror without the API, a gated repo: the id alone has to do
        return None


def local_revision(folder):
    """A local copy's stand-in for a commit: sha256 over its files' relative names and sizes."""
    import hashlib
    files = sorted([os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f))]
                   for d, _, fs in os.walk(folder) for f in fs if not f.startswith("."))
    return "local-" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def hub_columns(ds, image=None, caption=None, label=None, need=("image",)):
    """The columns to read: {"image", "caption", "label": column name or None, "classes": ClassLabel names or
    None, "captions_list": whether the caption column holds lists}. A column given by name must exist and be of
    its kind (image: an Image feature; caption: a string, or a list of strings; label: a ClassLabel or an
    integer); one not given is inferred when exactly one column is of its kind. A kind in `need` that cannot be
    found, or is ambiguous, is one ValueError line naming the candidates."""
    import datasets
    features = ds.features if ds.features is not None else ds._resolve_features().features  # peeks one record
    kinds = {"image": lambda f: isinstance(f, datasets.Image),
             "caption": lambda f: is_text_feature(f) or (isinstance(f, (datasets.List, datasets.LargeList))
                                                         and is_text_feature(f.feature)),
             "label": lambda f: isinstance(f, datasets.ClassLabel) or
                                (isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint")))}
    given, out = {"image": image, "caption": caption, "label": label}, {}
    for kind, is_kind in kinds.items():
        col = given[kind]
        if col is not None:
            if col not in features:
                raise ValueError(f"--{kind}_column {col!r} is not a column (columns: {', '.join(features)})")
            if not is_kind(features[col]):
                raise ValueError(f"--{kind}_column {col!r} holds {features[col]}, not {KIND_NAMES[kind]}")
        else:
            found = [c for c, f in features.items() if is_kind(f)]
            if kind == "label" and len(found) > 1:  # prefer the ClassLabel when plain integers sit beside it
                found = [c for c in found if isinstance(features[c], datasets.ClassLabel)] or found
            if len(found) == 1:
                col = found[0]
            elif kind in need:
                which = f"several ({', '.join(found)})" if found else "none"
                raise ValueError(f"which column holds the {kind}? {which} of the columns {', '.join(features)} "
                                 f"hold {KIND_NAMES[kind]}; name it with --{kind}_column")
        out[kind] = col
    f = features[out["label"]] if out["label"] else None
    out["classes"] = list(f.names) if isinstance(f, datasets.ClassLabel) else None
    out["captions_list"] = bool(out["caption"]) and not is_text_feature(features[out["caption"]])
    return out


KIND_NAMES = {"image": "images (an Image feature)", "caption": "text (a string or a list of strings)",
              "label": "class labels (a ClassLabel or integers)"}


def is_text_feature(f):
    import datasets
    return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")


def hub_image_bytes(value):
    """A record's undecoded image ({"bytes", "path"} with decode=False) -> the encoded bytes, or None when it has
    none (a path that is not a local file)."""
    if not isinstance(value, dict):
        return None
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path")
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    return None


def undecoded(ds, image_column):
    """The dataset with its image column left as bytes: `datasets` would decode every image with every PIL
    plugin; decode_image opens them with ours."""
    import datasets
    return ds.cast_column(image_column, datasets.Image(decode=False))


# ---------------------------------------------------------------- CLIP_benchmark's webdataset layout (read-only)
# The clip-benchmark/wds_* sets as downloaded: root/<split>/nshards.txt, root/<split>/{0..n-1}.tar, and beside the
# splits classnames.txt, zeroshot_classification_templates.txt ({c} marks the class name) and an optional
# dataset_type.txt. A sample is <key>.webp|.png|.jpg|.jpeg plus <key>.cls (a class index as text: classification)
# or <key>.txt (captions, one per line: retrieval). eval_zeroshot.py reads them with these functions.

def wds_splits(root):
    """The splits of a CLIP_benchmark wds folder (sub-folders holding nshards.txt), sorted; [] when it is not one."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "nshards.txt")))


def wds_text(path, numbered=False):
    """Stripped non-empty lines of a small UTF-8 text file (a BOM dropped), or one ValueError line. numbered: line
    i is item i (class names), so an empty line before the last name is an error, not a line to drop."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    while numbered and lines and not lines[-1]:
        lines.pop()
    if numbered and "" in lines:
        raise ValueError(f"{path}: line {lines.index('') + 1} is empty (line i names class i)")
    return [line for line in lines if line]


def wds_layout(root, split):
    """root's `split` -> {"shards": [tar paths], "type": "classification" | "retrieval", "classes": names or None,
    "templates": list or None}; anything missing or malformed is one ValueError line. Multi-label sets (.npy
    targets, scored by mean average precision) are refused: their metric is not ours."""
    splits = wds_splits(root)
    if split not in splits:
        raise ValueError(f"{root}: split {split!r} has no {split}/nshards.txt (this CLIP_benchmark set has "
                         f"{', '.join(splits) or 'no split'})")
    lines = wds_text(os.path.join(root, split, "nshards.txt"))
    if len(lines) != 1 or not lines[0].isdigit() or int(lines[0]) < 1:
        raise ValueError(f"{root}/{split}/nshards.txt must hold one positive integer, got {' '.join(lines)[:40]!r}")
    shards = [os.path.join(root, split, f"{i}.tar") for i in range(int(lines[0]))]
    missing = [os.path.basename(p) for p in shards if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{root}/{split}: nshards.txt says {len(shards)} shards but {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''} {'is' if len(missing) == 1 else 'are'} missing")
    path = os.path.join(root, "dataset_type.txt")
    kind = (wds_text(path) or ["classification"])[0].lower() if os.path.isfile(path) else "classification"
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{path}: dataset type {kind!r} is not supported (classification or retrieval)")
    read = lambda name, numbered=False: wds_text(os.path.join(root, name), numbered) \
        if os.path.isfile(os.path.join(root, name)) else None
    classes, templates = (read("classnames.txt", True), read("zeroshot_classification_templates.txt")) \
        if kind == "classification" else (None, None)
    return {"shards": shards, "type": kind, "classes": classes or None, "templates": templates or None}


def wds_records(path, kind):
    """The samples of one CLIP_benchmark tar, in member order, read from the mapped file (never extracted):
    {"image": bytes, "label": int} (classification) or {"image": bytes, "captions": [str]} (retrieval), each with
    "name" (shard/key). A sample that cannot be used is its reason instead, for the caller to count: missing_image,
    missing_cls, bad_label, missing_txt, bad_utf8, no_caption, or bad_member for a member the tar scan skipped
    (an unsafe name, a link, a truncated end)."""
    data = map_file(path)
    get = lambda exts, ext: bytes(data[exts[ext][0]:exts[ext][0] + exts[ext][1]])  # a copy, not a view
    try:
        groups, skipped = scan_tar(data)
        yield from ["bad_member"] * skipped
        for key, exts in groups.items():
            ext = image_ext(exts)
            if ext is None:
                yield "missing_image"
                continue
            record = {"image": get(exts, ext), "name": f"{os.path.basename(path)}/{key}"}
            if kind == "classification":
                text = get(exts, "cls").strip() if "cls" in exts else None
                if text is None:
                    yield "missing_cls"
                elif not text.isdigit():  # a class index: ASCII digits only (no sign, no spaces inside)
                    yield "bad_label"
                else:
                    yield {**record, "label": int(text)}
                continue
            if "txt" not in exts:
                yield "missing_txt"
                continue
            try:
                captions = [c.strip() for c in get(exts, "txt").decode("utf-8").splitlines() if c.strip()]
            except UnicodeDecodeError:
                yield "bad_utf8"
                continue
            yield {**record, "captions": captions} if captions else "no_caption"
    finally:  # also when the caller stops early (--max_images)
        if hasattr(data, "close"):
            data.close()


# ---------------------------------------------------------------- building batches (runs in the workers)

class BadSample(Exception):
    """A sample that cannot be trained on; args[0] is the reason it is counted under."""


# random-resized-crop defaults (train.py --crop_area/--crop_ratio): area 0.35-1 transferred best across digit
# sources in bench/recipe.py (0.9-1 as OpenCLIP and 0.6-1 gave less); the aspect range is the usual one
CROP_AREA, CROP_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


class BatchMaker:
    """Everything a worker needs to turn a list of (shard, sample) pairs into a batch. Picklable, so it can be
    sent to a spawned worker; keeps an LRU cache of whole shards mapped into memory."""

    def __init__(self, paths, sizes, fields, required, tokenizer, context_length, img_size, labels,
                 long_captions, augment, seed, cache_shards, crop_area=CROP_AREA, crop_ratio=CROP_RATIO,
                 negatives=(), num_negatives=0, local=None):
        self.paths, self.sizes, self.fields, self.required = paths, sizes, fields, required
        self.local = local  # URL shards: their local copies (on disk before a batch that reads them is made)
        self.negatives, self.num_negatives = negatives, num_negatives  # json keys of negative captions, slots
        self.tokenizer, self.context_length, self.img_size = tokenizer, context_length, img_size
        self.labels, self.long_captions, self.augment, self.seed = labels, long_captions, augment, seed
        self.cache_shards, self.crop_area, self.crop_ratio = cache_shards, crop_area, crop_ratio
        self.cache = OrderedDict()  # shard index -> (mapped tar, [{ext: (offset, size)} per key, sorted by key])

    def __getstate__(self):  # the cache stays behind when this object is sent to a worker
        return {k: (OrderedDict() if k == "cache" else v) for k, v in self.__dict__.items()}

    def shard(self, s, notes):
        """Shard s as (data, samples): every key of the tar in sorted order (complete or not: an incomplete one
        is a bad sample, found when it is used), mapped whole into memory (never extracted), in a small LRU."""
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        data = map_file(self.paths[s] if self.local is None else self.local[s])
        groups, skipped = scan_tar(data)
        samples = [groups[k] for k in sorted(groups)]
        if len(samples) != self.sizes[s]:  # the count the order was built from (index.json) was wrong
            notes.append(f"{self.paths[s]}: {len(samples)} samples but the index says {self.sizes[s]} "
                         f"({skipped} members skipped); positions past the end wrap around")
        if not samples:
            raise ValueError(f"{self.paths[s]}: no samples")
        self.cache[s] = (data, samples)
        if len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return self.cache[s]

    def random_resized_crop(self, img, epoch, pos):
        """Crop a crop_area fraction of the area at an aspect ratio in crop_ratio (log-uniform), resized back to
        S; seeded by (seed, epoch, position) so it is the same in every run and after a resume."""
        rng = np.random.default_rng([self.seed, epoch, pos])
        W, H = img.size
        area = W * H * rng.uniform(*self.crop_area)
        ratio = math.exp(rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
        w = min(W, round(math.sqrt(area * ratio)))
        h = min(H, round(math.sqrt(area / ratio)))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        return img.resize((self.img_size, self.img_size), Image.BICUBIC, box=(x, y, x + w, y + h))

    def read(self, data, exts, epoch, pos):
        """One sample -> (pixels uint8 (3, S, S), caption, short caption, label, {field: array}); raises
        BadSample(reason) for anything that would make a wrong or broken (image, caption) pair."""
        get = lambda ext: data[exts[ext][0]: exts[ext][0] + exts[ext][1]]  # member bytes
        if image_ext(exts) is None:
            raise BadSample("missing_image")
        missing = [e for e in self.required if e not in exts] + [f for f in self.fields if f + ".npy" not in exts]
        if missing:
            raise BadSample(f"missing_{missing[0].split('.')[0]}")  # missing_txt, missing_json, missing_<field>
        try:
            txt = get("txt").decode("utf-8-sig")  # a text editor's byte-order mark is not part of the caption
        except UnicodeDecodeError:
            raise BadSample("bad_utf8") from None
        meta = {}
        if "json" in exts:  # metadata that does not parse: its label or long caption cannot be trusted
            try:
                meta = json.loads(get("json"))
            except (ValueError, UnicodeDecodeError):
                raise BadSample("bad_json") from None
            if not isinstance(meta, dict):
                raise BadSample("bad_json")
        try:
            arrays = {f: np.load(io.BytesIO(get(f + ".npy")), allow_pickle=False) for f in self.fields}
        except (ValueError, OSError, EOFError):
            raise BadSample("bad_array") from None
        try:  # corrupt or truncated bytes fail inside decode (PIL raises many types)
            img = decode_image(get(image_ext(exts)), None if self.augment else self.img_size)
            if self.augment:
                img = self.random_resized_crop(img, epoch, pos)
        except Exception:
            raise BadSample("bad_image") from None
        caption, short = txt, ""
        # Long-CLIP: the long caption is the text, the short one its summary
        if self.long_captions:
            caption, short = meta.get("long"), meta.get("short")
            if not isinstance(caption, str) or not isinstance(short, str):
                raise BadSample("missing_long_caption")
        if not caption.strip() or (self.long_captions and not short.strip()):
            raise BadSample("empty_caption")  # nothing to tell this image from the others in the batch
        label = meta.get("label", -1) if self.labels else -1
        if not isinstance(label, int) or isinstance(label, bool):
            raise BadSample("bad_label")
        return image_array(img), caption, short, label, arrays

    def read_negatives(self, data, exts):
        """The sample's negative captions: the json lists under self.negatives, concatenated, at most
        num_negatives of them (read's json check has passed, so the json parses)."""
        meta = json.loads(data[exts["json"][0]: exts["json"][0] + exts["json"][1]])
        negs = [meta.get(k) for k in self.negatives]
        if not all(isinstance(n, list) and all(isinstance(c, str) for c in n) for n in negs):
            raise BadSample("missing_negatives")
        return [c for n in negs for c in n][:self.num_negatives]

    def __call__(self, epoch, positions, pairs):
        """positions: (n,) sample positions in the epoch order; pairs: (n, 2) (shard, sample index).
        Returns (batch dict of tensors, notes, bad) where bad lists (shard, sample index, reason) of every bad
        sample met. A bad sample is replaced by the first good one of the same shard, scanning on from a start
        drawn from (seed, epoch, position): the same replacement in every run and after a resume."""
        notes, bad, n, S = [], [], len(pairs), self.img_size
        image = np.empty((n, 3, S, S), dtype=np.uint8)  # (B, 3, S, S), filled in place
        captions, shorts, labels = [""] * n, [""] * n, [-1] * n
        arrays = {f: [None] * n for f in self.fields}  # stored arrays (distillation's teacher embeddings)
        # hard negatives: each sample's negative captions
        negs = [[] for _ in range(n)]
        # visit shards in order of first use, so a batch straddling two windows evicts the older one first
        for s in dict.fromkeys(pairs[:, 0].tolist()):
            data, samples = self.shard(s, notes)
            for i in np.flatnonzero(pairs[:, 0] == s):
                k, start = int(pairs[i, 1]) % len(samples), None
                for _ in range(len(samples)):
                    try:
                        image[i], captions[i], shorts[i], labels[i], a = self.read(data, samples[k], epoch,
                                                                                   int(positions[i]))
                        # hard negatives: read with the sample, so a sample without them is bad as a whole
                        negs[i] = self.read_negatives(data, samples[k]) if self.negatives else []
                        break
                    except BadSample as e:
                        bad.append((s, k, e.args[0]))
                        if start is None:  # the first replacement candidate: a seeded draw, then onwards
                            start = int(np.random.default_rng([self.seed, epoch, int(positions[i])])
                                        .integers(len(samples)))
                            k = start
                        else:
                            k = (k + 1) % len(samples)
                else:
                    raise ValueError(f"{self.paths[s]}: no usable sample in the whole shard")
                for f in self.fields:
                    arrays[f][i] = a[f]
        batch = {"image": torch.from_numpy(image),
                 "text": self.tokenizer.tokenize(captions, self.context_length)}  # int64 (B, ctx)
        # Long-CLIP: the short captions
        if self.long_captions:
            batch["text_short"] = self.tokenizer.tokenize(shorts, self.context_length)  # int64 (B, ctx)
        if self.labels:
            batch["label"] = torch.tensor(labels, dtype=torch.int64)  # (B,)
        # hard negatives: fixed slots per sample; an empty slot is an all-zero row (no sot), masked in the loss
        if self.negatives:
            tok = torch.zeros(n * self.num_negatives, self.context_length, dtype=torch.int64)  # (B*K, ctx)
            flat = [(i * self.num_negatives + j, c) for i, cs in enumerate(negs) for j, c in enumerate(cs)]
            if flat:
                tok[[r for r, _ in flat]] = self.tokenizer.tokenize([c for _, c in flat], self.context_length)
            batch["text_neg"] = tok.view(n, self.num_negatives, self.context_length)  # int64 (B, K, ctx)
        for f, arrs in arrays.items():
            # float16 -> float32 is exact, so stored teacher values arrive unchanged
            batch[f] = torch.from_numpy(np.stack(arrs).astype(np.float32))  # (B, ...)
        return batch, notes, bad


def worker_loop(make, tasks, results, current):
    """Worker process: take (generation, batch index, epoch, positions, pairs), put (generation, batch index,
    batch, notes, bad) back. Tasks of an abandoned iteration (generation != current.value) are dropped."""
    torch.set_num_threads(1)  # the work here is PIL and Python; torch threads would only oversubscribe cores
    # Ctrl-C and a preemption's SIGTERM reach the whole process group: the main process decides when we stop (it
    # finishes its step and checkpoints first), so no traceback here and no batch lost mid-step
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the main process died without closing us
                return
            continue
        if task is None:
            return
        gen, b = task[:2]
        if gen != current.value:
            continue
        try:
            results.put((gen, b, *make(*task[2:])))
        except Exception:
            results.put((gen, b, None, [traceback.format_exc()], []))


# ---------------------------------------------------------------- the loader (main process)

def auto_workers(local_world_size=1, cap=16):
    """Loader processes per rank when --workers is not given: the cores this process may use, shared by the
    ranks of this machine, minus one for the rank's own main process (at least 1, at most `cap`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores // max(1, local_world_size) - 1))


# loaders with live workers, closed at exit before multiprocessing's own exit hook (registered earlier, so run
# later) would terminate() and join them: the workers ignore SIGTERM, so that join would wait for ever
OPEN_LOADERS = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(OPEN_LOADERS)])


class ShardLoader:
    """Batches from `data_dir/index.json`'s `split`; one full pass over the split per `for` loop (an epoch).
    Iterating again continues from state (epoch, batch), so a loop interrupted by `break` or a restart resumes
    exactly where it stopped. Worker processes start on the first iteration and live until close().
    negatives: json keys of per-sample caption lists (hard negatives); the batch then has "text_neg" int64
    (B, num_negatives, ctx), the lists concatenated, an all-zero row for each empty slot."""

    def __init__(self, data_dir, split="train", batch_size=32, tokenizer=None, context_length=77, seed=0,
                 shuffle=None, drop_last=None, rank=0, world_size=1, num_workers=0, prefetch=2,
                 shuffle_shards=4, long_captions=False, augment=False, pin_memory=False, crop_area=CROP_AREA,
                 crop_ratio=CROP_RATIO, negatives=(), num_negatives=0):
        self.workers = []  # (process, task queue, result queue) once started
        # batches kept referenced by the feeder thread: queued, being put, being received, the two the loop had last
        self.held = collections.deque(maxlen=max(1, prefetch) + 4)
        index = read_index(data_dir, split)
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0 or prefetch < 1 or shuffle_shards < 1:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, num_workers >= 0, prefetch >= 1, "
                             f"shuffle_shards >= 1; got {batch_size}, {rank}, {world_size}, {num_workers}, "
                             f"{prefetch}, {shuffle_shards}")
        self.data_dir, self.split, self.batch_size, self.seed = data_dir, split, batch_size, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.drop_last = self.shuffle if drop_last is None else drop_last
        self.rank, self.world_size, self.num_workers, self.prefetch = rank, world_size, num_workers, prefetch
        self.shuffle_shards, self.pin_memory = shuffle_shards, pin_memory
        if tokenizer is None:
            tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))

        # shard list (sorted) and per-shard sample counts: from index.json when prep wrote them ("shard_sizes",
        # parallel to "shards"), else from the tar headers (no image data is read, but a header costs ~50 us)
        info = index[split]
        names, given = list(info["shards"]), info.get("shard_sizes")
        order = sorted(range(len(names)), key=lambda i: names[i])
        paths = [os.path.join(data_dir, names[i]) for i in order]
        labels = "classes" in index  # labelled sets list their classes; every sample's json then has "label"
        required = ("txt",) + (("json",) if long_captions or labels or negatives else ())
        sizes, fields, bad, mb = [], None, [], None
        for p in paths[:1] if given is not None else paths:  # with given sizes, fields come from shard 0
            buf = map_file(p)
            groups, skipped = scan_tar(buf)
            mb = len(buf) / 2 ** 20 if mb is None else mb  # shard 0's size
            for g in groups.values():  # .npy fields present in every complete sample of the split
                if complete(g, required):
                    have = {e[:-4] for e in g if e.endswith(".npy")}
                    fields = have if fields is None else fields & have
            sizes.append(len(groups))
            if skipped:
                bad.append(f"{os.path.basename(p)}: {skipped} members skipped (unsafe name, truncated or not a file)")
        if bad:
            warnings.warn(f"{len(bad)} shard(s) of {split} had problems: " + "; ".join(bad))
        self.sizes = [int(given[i]) for i in order] if given is not None else sizes
        self.num_samples = sum(self.sizes)
        if info.get("num_samples") is not None and info["num_samples"] != self.num_samples:
            warnings.warn(f"{data_dir}/index.json: {split} num_samples is {info['num_samples']} but the shards "
                          f"hold {self.num_samples} samples; using {self.num_samples}")
        self.fields = sorted(fields or ())
        self.remote = ShardCache(data_dir) if is_url(data_dir) else None  # URL shards: local copies, a window at a time
        self.make = BatchMaker(paths, self.sizes, self.fields, required, tokenizer, context_length,
                               int(index["img_size"]), labels, long_captions, augment, seed,
                               cache_shards=shuffle_shards + 1,  # a window, plus one for batches that straddle
                               crop_area=crop_area, crop_ratio=crop_ratio, negatives=tuple(negatives),
                               num_negatives=num_negatives, local=self.remote and [self.remote.path(p) for p in paths])
        self.epoch, self.batch = 0, 0
        self.bad = {}  # (shard, sample) -> reason: the bad samples met so far this epoch (saved in state_dict)
        self.epoch_report, self.noted = None, set()
        self.generation, self.current = 0, None  # which iteration the workers' tasks belong to
        if len(self) == 0:
            raise ValueError(f"batch_size {batch_size} x world_size {world_size} = "
                             f"{batch_size * world_size} is larger than the {self.num_samples} samples "
                             f"of split {split!r} (drop_last={self.drop_last})")
        if self.remote is not None:  # the cache's bound, from epoch 0's order (every epoch's is alike)
            self.remote.bound = self.cache_bound(self.epoch_order(0))
            if rank == 0 and self.shuffle:  # (a training loader's; evaluation reads each shard once, in order)
                print(f"{split} shards from {data_dir}: local cache {self.remote.dir}, at most {self.remote.bound} of "
                      f"the {len(paths)} shards at once ({self.remote.bound * mb:.0f} MB at shard 0's {mb:.1f} MB), each "
                      f"deleted after its last batch")

    def __len__(self):
        """Batches per epoch on each rank (the same on every rank)."""
        G = self.batch_size * self.world_size
        full, rest = divmod(self.num_samples, G)
        return full + int(not self.drop_last and rest // self.world_size > 0)

    def epoch_order(self, epoch):
        """The epoch's global sample order as an int64 (N, 2) array of (shard, sample index); all ranks
        compute the same one, so it depends only on (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(len(self.sizes)) if self.shuffle else np.arange(len(self.sizes))
        parts = []
        for w in range(0, len(shards), self.shuffle_shards):  # a window of shards, mixed then permuted
            window = np.concatenate([np.stack([np.full(self.sizes[s], s), np.arange(self.sizes[s])], 1)
                                     for s in shards[w:w + self.shuffle_shards]])  # (n_window, 2)
            parts.append(window[rng.permutation(len(window))] if self.shuffle else window)
        return np.concatenate(parts)  # (N, 2)

    def batch_pairs(self, order, b):
        """This rank's part of global batch b: (positions in the epoch order (n,), (shard, sample) pairs (n, 2))."""
        G = self.batch_size * self.world_size
        g = order[b * G:(b + 1) * G]  # (<= G, 2)
        n = len(g) // self.world_size  # equal on every rank; a short last batch drops < world_size samples
        positions = b * G + self.rank + self.world_size * np.arange(n)
        return positions, g[self.rank::self.world_size][:n]

    def __iter__(self):
        epoch, start, n = self.epoch, self.batch, len(self)
        order = self.epoch_order(epoch)
        tasks = ((b, epoch, *self.batch_pairs(order, b)) for b in range(start, n))
        ends = {}  # batch -> URL shards no later batch of the epoch reads
        if self.remote is not None:
            tasks, ends = self.fetched(tasks, order, start)
        if self.num_workers == 0:
            results = ((self.pin(batch), notes, bad) for batch, notes, bad in (self.make(*t[1:]) for t in tasks))
        else:  # decoded by the workers; received (and pinned) by a thread, off the training loop's path
            results = background(self.from_workers(tasks), self.prefetch, self.pin, self.held)
        try:
            for b, (batch, notes, bad) in zip(range(start, n), results):
                for note in notes:
                    if note not in self.noted:  # once per run, not per batch
                        self.noted.add(note)
                        warnings.warn(note)
                self.bad.update({(s, k): reason for s, k, reason in bad})
                self.batch = b + 1  # batches already yielded this epoch
                if b in ends:  # (workers have made every batch up to this one)
                    self.remote.drop(ends[b])
                if self.batch == n:  # the last one: the epoch's report is ready, and the state moves on now
                    self.finish_epoch(epoch)
                yield batch
        except BaseException as e:
            results.close()  # stops the feeder thread
            if not isinstance(e, GeneratorExit):
                self.close()  # an error; an abandoned epoch (GeneratorExit) keeps the workers, who drop its tasks
            raise
        results.close()
        if self.epoch == epoch:  # resumed at the very end of an epoch: nothing was left to yield
            self.finish_epoch(epoch)

    def fetched(self, tasks, order, start):
        """URL shards: (tasks, ends). A task goes out once the shards it reads are on local disk, and meanwhile the
        next window - the `shuffle_shards` shards first read after them - downloads in the background; ends[b]:
        the shards batch b reads last, deleted once it is yielded. Uses are per global batch (a superset of this
        rank's), so they need no rank arithmetic."""
        urls, (shards, first, last, used) = self.make.paths, self.shard_uses(order)
        upcoming = shards[used][np.argsort(first[used], kind="stable")]  # in the order batches start reading them
        first_of, ends = dict(zip(shards.tolist(), first.tolist())), {}
        for s, b in zip(shards[used], last[used]):
            ends.setdefault(int(b), []).append(urls[s])
        self.remote.drop_all_but({urls[s] for s in shards[used & (last >= start)]})  # left by an abandoned epoch

        def fetching():
            i = 0
            for task in tasks:  # (b, epoch, positions, pairs)
                while i < len(upcoming) and first_of[upcoming[i]] <= task[0]:
                    i += 1
                self.remote.get([urls[s] for s in np.unique(task[3][:, 0])],
                                then=[urls[s] for s in upcoming[i:i + self.shuffle_shards]])
                yield task
        return fetching(), ends

    def shard_uses(self, order):
        """(shards, first, last, used): each shard's first and last global batch of the epoch; `used` is False
        for a shard that only the dropped partial last batch would read."""
        G, n = self.batch_size * self.world_size, len(self)
        shards, first = np.unique(order[:, 0], return_index=True)  # each shard's first position in the order
        _, last = np.unique(order[::-1, 0], return_index=True)  # and its last, counted from the end
        first, last = first // G, np.minimum((len(order) - 1 - last) // G, n - 1)  # as batch indices
        return shards, first, last, first < n

    def cache_bound(self, order):
        """The most shards a ShardCache holds in this epoch: after batch y is yielded it has those read by a batch
        made already (up to `ahead` past y: the workers' prefetch, the feeder's queue) and by a later one, plus the
        next window."""
        _, first, last, used = self.shard_uses(order)
        ahead = (self.num_workers + 1) * self.prefetch + 2 if self.num_workers else 1
        held = np.zeros(len(self) + 1, dtype=np.int64)  # shards on disk after each yield y = -1 .. n-1
        np.add.at(held, np.maximum(first[used] - ahead, 0), 1)  # fetched from ahead of their first batch ...
        np.add.at(held, last[used] + 1, -1)  # ... to their last
        return min(int(np.cumsum(held).max()) + self.shuffle_shards, len(self.sizes))

    def finish_epoch(self, epoch):
        counts = Counter(self.bad.values())
        self.epoch_report = {"epoch": epoch, "skipped": dict(sorted(counts.items()))}
        self.epoch, self.batch, self.bad = epoch + 1, 0, {}

    def pin(self, batch):
        if self.pin_memory and torch.cuda.is_available():  # pinned -> .to(device, non_blocking=True)
            return {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def from_workers(self, tasks):
        """Send `tasks` to the workers round-robin, keeping `prefetch` in flight per worker; yield the results
        in task order as (batch, notes, bad). Batch i goes to worker i % num_workers whatever the start, so the
        output never depends on the number of workers."""
        self.start_workers()
        self.generation += 1
        gen, inflight = self.generation, []
        self.current.value = gen  # workers drop tasks of any earlier, abandoned iteration
        for task in tasks:
            self.workers[task[0] % self.num_workers][1].put((gen, *task))
            inflight.append(task[0])
            if len(inflight) >= self.num_workers * self.prefetch:
                yield self.receive(inflight.pop(0), gen)
        while inflight:
            yield self.receive(inflight.pop(0), gen)

    def start_workers(self):
        if self.workers and all(p.is_alive() for p, _, _ in self.workers):
            return
        self.close()
        # fork where the OS has it (instant, nothing to re-import), else spawn; queues pass tensors through
        # shared memory (torch.multiprocessing), so a batch costs a file descriptor, not a pickled copy
        ctx = torch_mp.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self.current = ctx.Value("q", self.generation, lock=False)
        for _ in range(self.num_workers):
            tasks, results = ctx.Queue(), ctx.Queue()
            p = ctx.Process(target=worker_loop, args=(self.make, tasks, results, self.current), daemon=True)
            p.start()
            self.workers.append((p, tasks, results))
        OPEN_LOADERS.add(self)

    def receive(self, b, gen):
        w = b % self.num_workers
        p, _, results = self.workers[w]
        while True:
            try:
                got_gen, got, batch, notes, bad = results.get(timeout=5)
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"loader worker {w} died (exit code {p.exitcode}) before sending batch {b}")
                continue
            if got_gen == gen:  # older generations: results of an abandoned iteration, dropped
                break
        assert got == b, f"worker sent batch {got}, expected {b}"
        if batch is None:
            raise RuntimeError(f"loader worker failed on batch {b}:\n{notes[0]}")
        return batch, notes, bad

    def close(self):
        """Stop the worker processes (called by the owner at the end, on errors and by the GC), delete the local
        copies of URL shards."""
        self.held.clear()
        if getattr(self, "remote", None) is not None:
            self.remote.close()
        for p, tasks, _ in self.workers:
            if p.is_alive():
                tasks.put(None)
        for p, tasks, results in self.workers:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()  # not terminate(): workers ignore SIGTERM
                p.join()
            for q in (tasks, results):
                q.cancel_join_thread()  # never block exit on undelivered items
                q.close()
        self.workers = []
        OPEN_LOADERS.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the queues' internals may already be gone
            pass

    def pop_epoch_report(self):
        """None, or once after each finished epoch {"epoch": e, "skipped": {reason: count}}: the distinct bad
        samples met in that epoch (each skipped and replaced), for the caller to print and log."""
        report, self.epoch_report = self.epoch_report, None
        return report

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "bad": [[s, k, r] for (s, k), r in sorted(self.bad.items())]}

    def load_state_dict(self, state):
        """Resume: the next iteration yields batches state["batch"]... of epoch state["epoch"]."""
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"loader state batch {state['batch']} is outside 0..{len(self)} batches per epoch")
        if int(state["seed"]) != self.make.seed:
            self.close()  # the workers hold the old seed (augmentation, replacements)
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
        self.make.seed = self.seed
        self.bad = {(int(s), int(k)): r for s, k, r in state.get("bad", [])}


def background(results, size, pin, held):
    """Run the generator `results` in a thread, `size` items ahead, applying `pin` to each batch there; the
    training loop then only takes finished batches from a queue. Returns a generator; closing it stops the
    thread (after the batch it is receiving, if any). `held` (a deque that outlives the thread, so across epochs)
    keeps the last few batches referenced: the one the loop has finished with is then freed by this thread when
    it drops out of the deque (returning a 154 MB batch's shared-memory pages costs ~25 ms), not by the loop."""
    out, stop = queue.Queue(size), threading.Event()

    def put(item):  # False once the consumer has gone
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run():
        try:
            for batch, notes, bad in results:
                batch = pin(batch)
                held.append(batch)
                if not put((batch, notes, bad)):
                    return
            put(StopIteration)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        finally:
            results.close()

    thread = threading.Thread(target=run, daemon=True, name="loader-feeder")
    thread.start()
    try:
        while True:
            item = out.get()
            if item is StopIteration:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
