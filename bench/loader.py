"""
Benchmark dataloader.py: samples/s of ShardLoader (read shards + JPEG decode + tokenize + batch) against two
anchors measured in the same run on the same shards with the same worker count:
  (b) the `webdataset` library doing the same work: WebDataset(...).decode("pil") -> uint8 (3, S, S) + caption,
      batched and tokenized in the workers of a torch DataLoader;
  (c) a bare PIL decode loop over the same JPEG bytes in one process, the ceiling for one worker; ShardLoader
      with one worker is measured against it (and num_workers=0, one worker's work free of core contention).
(d) the same shards from a local HTTP server (python -m http.server, another process) against disk, both in windows
    of one shard so the URL loader's cache downloads, reads and deletes each shard in turn: target >= 0.9 of disk,
    with the cache's peak disk use.
Also: the main process's cost per 1,024-sample batch (CPU time of the receiving thread + the training loop's
wait when the workers are ahead; pinning is added on a CUDA box), each worker's peak RSS, and the cores needed
to feed 5,600 samples/s (an H100 step at the seed preset) at the measured per-worker rate.
Targets: ours / webdataset >= 1.2 (equal workers), one worker / bare >= 0.9, main process <= 15 ms per
1,024-sample batch at 224 px.

The shards (default 4 x 1000 synthetic 224 px noise JPEGs at quality 95, a worst case for the decoder) are made
once into bench/.data/loader/ and reused.

webdataset is not a dependency of this repo; install it into a separate venv to measure anchor (b):
    python3 -m venv bench/.venv-anchors && bench/.venv-anchors/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch webdataset -r requirements.txt
    bench/.venv-anchors/bin/python bench/loader.py

    python bench/loader.py [--workers 2] [--batch 128] [--shards 4] [--per_shard 1000] [--repeats 3] [--quiet]
"""

import io
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common  # first: the repository root goes ahead of bench/ on sys.path
from dataloader import ShardLoader
from tokenizer import Tokenizer

RATIO_TARGET, PER_WORKER_TARGET, MAIN_MS_TARGET, FEED_RATE, URL_TARGET = 1.2, 0.9, 15.0, 5600, 0.9
WORDS = "a red green blue small large cube sphere dog cat photo of on the in near with beach forest city".split()


def make_data(path, shards, per_shard, size, quiet):
    """Noise JPEGs (q95) + captions in webdataset-style shards, index.json and tokenizer.json; reused if there."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        if index["train"]["num_samples"] == shards * per_shard and index["img_size"] == size:
            return
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    names, captions = [], []
    for s in tqdm(range(shards), desc="making shards", disable=quiet):
        names.append(f"train-{s:06d}.tar")
        with tarfile.open(os.path.join(path, names[-1] + ".tmp"), "w") as tf:
            for i in range(per_shard):
                buf = io.BytesIO()
                noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(noise).save(buf, format="JPEG", quality=95)
                captions.append(" ".join(rng.choice(WORDS, rng.integers(5, 15))))
                for ext, data in (("jpg", buf.getvalue()), ("txt", captions[-1].encode())):
                    info = tarfile.TarInfo(f"{s * per_shard + i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        os.replace(os.path.join(path, names[-1] + ".tmp"), os.path.join(path, names[-1]))
    Tokenizer().train(captions, vocab_size=400, quiet=True).save(os.path.join(path, "tokenizer.json"))
    index = {"train": {"shards": names, "num_samples": shards * per_shard}, "img_size": size, "source": "bench"}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


def worker_memory():
    """(peak RSS, private memory) in MiB of each live child process, from /proc (Linux only)."""
    out = []
    for p in multiprocessing.active_children():
        try:
            with open(f"/proc/{p.pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                private = sum(int(line.split()[1]) for line in f if line.startswith("Private_"))
            out.append((hwm / 1024, private / 1024))
        except (OSError, StopIteration):
            pass
    return out


def timed(batches, n_batches, quiet, desc):
    """Iterate a loader to the end; samples/s after the first batch (which pays worker start-up and the first
    shard reads), and worker memory sampled at the last batch."""
    count, mem, t0 = 0, [], None
    for i, batch in enumerate(tqdm(batches, total=n_batches, desc=desc, disable=quiet)):
        assert batch["image"].dtype == torch.uint8 and batch["text"].dtype == torch.int64
        if t0 is None:
            t0 = time.perf_counter()
        else:
            count += len(batch["image"])
        if i == n_batches - 1:
            mem = worker_memory()
    return count / (time.perf_counter() - t0), mem


def webdataset_anchor(path, tok, batch, workers, quiet):
    import webdataset as wds

    def collate(samples):
        images = torch.from_numpy(np.stack([np.asarray(img).transpose(2, 0, 1) for img, _ in samples]))
        return {"image": images, "text": tok.tokenize([t for _, t in samples], 77)}

    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    urls = [os.path.join(path, n) for n in index["train"]["shards"]]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt")
          .batched(batch, collation_fn=collate, partial=False))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2)
    per_worker = len(urls) // workers * (index["train"]["num_samples"] // len(urls)) // batch
    return timed(dl, per_worker * workers, quiet, "webdataset")


def main_thread_cost(path, tok, batch, workers, steps=6):
    """The training loop's own cost per batch, in main-thread CPU ms (medians), when the workers are ahead:
    (next(): take a received - and, with CUDA, pinned - batch from the feeder thread; releasing the previous
    batch). The feeder thread's receive and pin, and the freeing of the workers' shared memory (which it does by
    holding the last few batches), are off this path."""
    loader = ShardLoader(path, "train", batch_size=batch, num_workers=workers, tokenizer=tok,
                         pin_memory=torch.cuda.is_available())
    it = iter(loader)
    prev, take, free = next(it), [], []
    for _ in range(steps):
        time.sleep(1.0)  # a stand-in for the training step: the workers get ahead, so next() never waits
        t0 = time.thread_time()
        try:
            b = next(it)
        except StopIteration:  # the next epoch, with the same (persistent) workers
            it = iter(loader)
            b = next(it)
        take.append(time.thread_time() - t0)
        t0 = time.thread_time()
        del prev
        free.append(time.thread_time() - t0)
        prev = b
    loader.close()
    return 1000 * float(np.median(take)), 1000 * float(np.median(free))


def bare_decode(path, limit):
    """One process, no tar, no tokenizer, no batching: just PIL decode of the JPEG bytes to uint8 (3, S, S)."""
    with open(os.path.join(path, "train-000000.tar"), "rb") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            jpegs = [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")][:limit]
    t0 = time.perf_counter()
    for b in jpegs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1).copy()
    return len(jpegs) / (time.perf_counter() - t0)


def http_server(path):
    """`python -m http.server` serving path, in its own process (as a real server would be): (process, URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/index.json", timeout=1).read()
            return server, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the HTTP server did not start")


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per_shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many interleaved runs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.workers < 1 or args.shards % args.workers:
        parser.error(f"--workers must be >= 1 and divide --shards ({args.shards}) so webdataset splits evenly")
    path = os.path.join(common.DATA, "loader")
    make_data(path, args.shards, args.per_shard, args.size, args.quiet)
    tok = Tokenizer.load(os.path.join(path, "tokenizer.json"))

    try:
        import webdataset  # noqa: F401
        have_wds = True
    except ImportError:
        have_wds = False
        print("webdataset is not installed here; skipping anchor (b). To measure it:\n"
              "  python3 -m venv bench/.venv-anchors && bench/.venv-anchors/bin/pip install torch==2.14.1 "
              "torchvision==0.29.1 open_clip_torch webdataset -r requirements.txt\n  bench/.venv-anchors/bin/python bench/loader.py")
    # best of --repeats, interleaved, so a burst of load from other processes hits every contender alike
    bare = single = one_worker = ours = wds_rate = disk1 = url1 = 0.0
    our_mem = wds_mem = url_mem = []
    server, url = http_server(path)
    url_peak, url_bound = 0, None
    for _ in range(args.repeats):
        bare = max(bare, bare_decode(path, 500))
        one = ShardLoader(path, "train", batch_size=args.batch, num_workers=0, tokenizer=tok)  # one worker's work
        single = max(single, timed(one, len(one), args.quiet, "ShardLoader in-process")[0])
        loader = ShardLoader(path, "train", batch_size=args.batch, num_workers=args.workers, tokenizer=tok)
        rate, our_mem = timed(loader, len(loader), args.quiet, "ShardLoader")
        ours = max(ours, rate)
        loader.close()
        loader = ShardLoader(path, "train", batch_size=args.batch, num_workers=1, tokenizer=tok)
        one_worker = max(one_worker, timed(loader, len(loader), args.quiet, "ShardLoader, 1 worker")[0])
        loader.close()
        if have_wds:
            rate, wds_mem = webdataset_anchor(path, tok, args.batch, args.workers, args.quiet)
            wds_rate = max(wds_rate, rate)
        # (d) windows of one shard, from disk and from the HTTP server
        loader = ShardLoader(path, "train", batch_size=args.batch, num_workers=args.workers, tokenizer=tok, shuffle_shards=1)
        disk1 = max(disk1, timed(loader, len(loader), args.quiet, "ShardLoader, disk, 1-shard windows")[0])
        loader.close()
        loader = ShardLoader(url, "train", batch_size=args.batch, num_workers=args.workers, tokenizer=tok, shuffle_shards=1)
        rate, url_mem = timed(loader, len(loader), args.quiet, "ShardLoader, HTTP, 1-shard windows")
        url1, url_peak, url_bound = max(url1, rate), max(url_peak, loader.remote.peak_bytes), loader.remote.bound
        loader.close()
    server.terminate()
    wds_rate = wds_rate if have_wds else None
    shard_mib = os.path.getsize(os.path.join(path, "train-000000.tar")) / 2 ** 20

    per_worker = ours / (args.workers * bare)
    take_ms, free_ms = main_thread_cost(path, tok, 1024, args.workers)  # 1,024-sample batches: the seed preset's
    cores = FEED_RATE / min(one_worker, single)  # a worker's rate without contention, cores busy decoding
    fmt = lambda mem: ", ".join(f"{h:.0f} MiB peak ({p:.0f} private)" for h, p in mem) or "n/a"
    print(f"bare PIL decode, 1 process : {bare:8.0f} samples/s")
    print(f"ShardLoader, in-process    : {single:8.0f} samples/s  ({single / bare:.2f} x bare: the work of one "
          f"worker, free of core contention)")
    print(f"ShardLoader, {args.workers} workers    : {ours:8.0f} samples/s  workers: {fmt(our_mem)}")
    if wds_rate is not None:
        print(f"webdataset, {args.workers} workers     : {wds_rate:8.0f} samples/s  workers: {fmt(wds_mem)}")
        print(f"ours / webdataset          : {ours / wds_rate:8.2f}  (target >= {RATIO_TARGET})")
    print(f"disk, 1-shard windows      : {disk1:8.0f} samples/s")
    print(f"HTTP, 1-shard windows      : {url1:8.0f} samples/s  workers: {fmt(url_mem)}")
    print(f"HTTP / disk                : {url1 / disk1:8.2f}  (target >= {URL_TARGET}); the cache's peak disk use "
          f"{url_peak / 2 ** 20:.0f} MiB = {url_peak / 2 ** 20 / shard_mib:.1f} shards of {shard_mib:.0f} MiB "
          f"(bound {url_bound} shards)")
    print(f"ShardLoader, 1 worker      : {one_worker:8.0f} samples/s  (1 worker / bare {one_worker / bare:.2f}, "
          f"target >= {PER_WORKER_TARGET})")
    print(f"ours / (workers x bare)    : {per_worker:8.2f}  ({os.cpu_count()} cores, the main process shares them)")
    print(f"training loop per 1,024-sample batch: next() {take_ms:.2f} ms + releasing the batch {free_ms:.1f} ms "
          f"of main-thread CPU (target <= {MAIN_MS_TARGET} together; "
          f"{'pinned' if torch.cuda.is_available() else 'not pinned: no CUDA here'})")
    print(f"cores to feed {FEED_RATE} samples/s at {args.size} px: {cores:.1f} (at one worker's "
          f"{min(one_worker, single):.0f} samples/s)")
    print(f"max RSS of any finished child: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")

    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
           "workers": args.workers, "batch": args.batch, "repeats": args.repeats, "samples": args.shards * args.per_shard,
           "img_size": args.size, "ours_samples_per_s": round(ours, 1), "bare_samples_per_s": round(bare, 1),
           "ours_in_process_samples_per_s": round(single, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
           "webdataset_samples_per_s": None if wds_rate is None else round(wds_rate, 1),
           "ratio_vs_webdataset": None if wds_rate is None else round(ours / wds_rate, 3),
           "per_worker_vs_bare": round(per_worker, 3), "one_worker_samples_per_s": round(one_worker, 1),
           "one_worker_vs_bare": round(one_worker / bare, 3), "main_next_ms_per_1024_batch": round(take_ms, 2),
           "main_release_ms_per_1024_batch": round(free_ms, 2),
           "pinned": torch.cuda.is_available(), f"cores_for_{FEED_RATE}_per_s": round(cores, 1),
           "ours_worker_peak_rss_mib": [round(h) for h, _ in our_mem],
           "disk_1shard_windows_samples_per_s": round(disk1, 1), "http_1shard_windows_samples_per_s": round(url1, 1),
           "http_vs_disk": round(url1 / disk1, 3), "http_cache_peak_mib": round(url_peak / 2 ** 20, 1),
           "http_cache_bound_shards": url_bound, "shard_mib": round(shard_mib, 1),
           "http_worker_peak_rss_mib": [round(h) for h, _ in url_mem],
           "http_worker_private_mib": [round(p) for _, p in url_mem],
           "ours_worker_private_mib": [round(p) for _, p in our_mem],
           "webdataset_worker_peak_rss_mib": [round(h) for h, _ in wds_mem]}
    common.append_jsonl(os.path.join(common.RESULTS, "loader.jsonl"), row)


if __name__ == "__main__":
    main()
