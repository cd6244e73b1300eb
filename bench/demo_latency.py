"""
Latency of demo.py's API, as a browser sees it: p50/p95 per endpoint over a 1,000-image collection, then the same
endpoints under 16 concurrent clients. Everything runs on this machine over loopback (127.0.0.1) and every loop is
bounded in count and in time.

1) Data and model (made once into bench/.data/demo_latency/, reused): a synthetic shard set whose val split has
   --images images at --img_size px, and a --preset checkpoint trained for a few steps by train.py (latency does
   not depend on how well it is trained, only on its size).
2) demo.py in a subprocess (--port 0, no cache: the start-up encoding of every image is timed too), with the
   environment of this script, so OMP_NUM_THREADS=1 here means one intra-op thread in the server.
3) Serial: --requests requests per endpoint, one client, a new connection each (the server speaks HTTP/1.0), the
   inputs varied (captions of the set as queries, image numbers spread over the set, uploads of the set's own
   images re-encoded as PNG). classify cycles through 4 label sets, so after the first round its prompt-ensemble
   embeddings come from the server's cache, as when a user re-submits labels.
4) Concurrent: --clients threads, each sending --per_client requests that cycle through the endpoints; per-endpoint
   p50/p95 under load and the total throughput.
One JSON line goes to bench/results/demo.jsonl.

    OMP_NUM_THREADS=1 python bench/demo_latency.py                      # ~2 minutes on a shared 2-core CPU
    python bench/demo_latency.py --images 200 --requests 20 --per_client 5   # a smoke run
"""

import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
from PIL import Image

import common  # first: the repository root goes ahead of bench/ on sys.path
from dataloader import read_tar

ROOT = common.ROOT


def make_data(work, images, img_size, preset, quiet):
    """Shards with `images` val images + a checkpoint trained for a few steps -> (data dir, checkpoint path)."""
    data, out = os.path.join(work, f"syn{img_size}-{images}"), os.path.join(work, "out")
    ckpt = os.path.join(out, f"{preset}-{img_size}", "ckpt", "latest.pt")
    run = lambda args: subprocess.run([sys.executable, *args], cwd=ROOT, check=True,
                                      stdout=subprocess.DEVNULL if quiet else None)
    if not os.path.isfile(os.path.join(data, "index.json")):
        run(["prep_dataset.py", "synthetic", "--out", data, "--num_train", "256", "--num_val", str(images),
             "--img_size", str(img_size), "--workers", "1", "--quiet"])
    if not os.path.isfile(ckpt):
        run(["train.py", "--data", data, "--preset", preset, "--batch", "32", "--epochs", "1", "--workers", "0",
             "--eval_every", "0", "--out", out, "--log_dir", os.path.join(work, "logs"),
             "--run_name", f"{preset}-{img_size}", "--quiet"])
    return data, ckpt


def start_demo(ckpt, data, threads):
    """demo.py on a free loopback port -> (process, base URL, start-up seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "demo.py", "--ckpt", ckpt, "--images", data, "--port", "0",
                             "--no_cache", "--quiet", "--threads", str(threads)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the first line that matters says where it listens
        if m := re.search(r"serving on (http://127\.0\.0\.1:\d+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, m.group(1), time.time() - t0
    raise SystemExit(f"demo.py did not start (exit {proc.wait()})")


def call(base, method, path, body=None):
    """One request on a new connection -> (status, seconds)."""
    u = urllib.parse.urlsplit(base)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0
    finally:
        conn.close()


def workload(data, n_images):
    """endpoint name -> a function k -> (method, path, body): the k-th request of that kind."""
    shard = json.load(open(os.path.join(data, "index.json")))["val"]["shards"][0]
    samples, _ = read_tar(os.path.join(data, shard))
    captions = [s["txt"].decode() for s in samples.values()][:200]
    classes = json.load(open(os.path.join(data, "index.json")))["classes"]
    uploads = []  # the set's own JPEGs re-encoded as PNG, as a pasted screenshot would be
    for s in list(samples.values())[:20]:
        out = io.BytesIO()
        Image.open(io.BytesIO(s["jpg"])).save(out, "PNG")
        uploads.append(out.getvalue())
    spread = lambda k: (k * 7919) % n_images  # image numbers spread over the whole set
    labels = [",".join(classes[j:j + 8]) for j in range(0, 32, 8)]  # 4 sets of 8 labels
    q = lambda k: urllib.parse.quote(captions[k % len(captions)])
    return {
        "search": lambda k: ("GET", f"/api/search?q={q(k)}", None),
        "similar_images": lambda k: ("GET", f"/api/similar_images?i={spread(k)}", None),
        "similar_texts": lambda k: ("GET", f"/api/similar_texts?i={spread(k)}", None),
        "classify": lambda k: ("GET", f"/api/classify?i={spread(k)}&labels={urllib.parse.quote(labels[k % 4])}", None),
        "heatmap": lambda k: ("GET", f"/api/heatmap?i={spread(k)}&q={q(k)}", None),
        "query_image": lambda k: ("POST", "/api/query_image", uploads[k % len(uploads)]),
        "image": lambda k: ("GET", f"/api/image/{spread(k)}", None),
        "browse": lambda k: ("GET", f"/api/browse?start={(k * 48) % n_images}", None),
    }


def stats(seconds):
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "mean_ms": round(float(ms.mean()), 2)}


def serial(base, work, requests, deadline):
    out = {}
    for name, make in work.items():
        for k in range(4):  # warm-up: first-use costs (the 4 label sets, page faults) are not latency
            call(base, *make(k))
        times = []
        for k in range(requests):
            if time.time() > deadline:
                break
            status, dt = call(base, *make(k))
            assert status == 200, (name, status)
            times.append(dt)
        out[name] = stats(times)
        print(f"  {name:15s} p50 {out[name]['p50_ms']:7.2f} ms   p95 {out[name]['p95_ms']:7.2f} ms   (n={len(times)})")
    return out


def concurrent(base, work, clients, per_client, deadline):
    names = list(work)
    times, errors, lock = {n: [] for n in names}, [], threading.Lock()

    def client(c):
        for k in range(per_client):
            if time.time() > deadline:
                return
            name = names[(c + k) % len(names)]
            try:
                status, dt = call(base, *work[name](c * per_client + k))
            except OSError as e:
                status, dt = type(e).__name__, 0.0
            with lock:
                (times[name].append(dt) if status == 200 else errors.append(f"{name}: {status}"))

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    done = sum(map(len, times.values()))
    per = {n: stats(v) for n, v in times.items() if v}
    for n, s in per.items():
        print(f"  {n:15s} p50 {s['p50_ms']:7.2f} ms   p95 {s['p95_ms']:7.2f} ms   (n={s['n']})")
    print(f"  {done} answers in {wall:.1f} s = {done / wall:.1f} requests/s; errors: {len(errors)}")
    return {"clients": clients, "requests": done, "wall_s": round(wall, 2), "requests_per_s": round(done / wall, 1),
            "errors": len(errors), "error_examples": errors[:5], "endpoints": per}


def main():
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, default=1000, help="images in the collection (the val split)")
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--requests", type=int, default=200, help="serial requests per endpoint")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per_client", type=int, default=40, help="requests each concurrent client sends")
    p.add_argument("--server_threads", type=int, default=8, help="demo.py --threads")
    p.add_argument("--time_limit", type=float, default=600, help="seconds; the loops stop early past it")
    p.add_argument("--work", default=os.path.join(common.DATA, "demo_latency"))
    p.add_argument("--note", default="", help="a remark stored with the result (e.g. the machine was shared)")
    p.add_argument("--results", default=os.path.join(common.RESULTS, "demo.jsonl"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if min(args.images, args.requests, args.clients, args.per_client, args.server_threads) < 1:
        p.error("--images, --requests, --clients, --per_client and --server_threads must be >= 1")

    t_start, load = time.time(), [round(x, 2) for x in os.getloadavg()]  # the machine may be shared: say how busy
    data, ckpt = make_data(args.work, args.images, args.img_size, args.preset, args.quiet)
    proc, base, startup = start_demo(ckpt, data, args.server_threads)
    deadline = time.time() + args.time_limit
    try:
        print(f"demo.py up in {startup:.1f} s (encoded {args.images} images at {args.img_size} px, {args.preset}) "
              f"at {base}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        work = workload(data, args.images)
        print(f"serial, one client, {args.requests} requests per endpoint:")
        one = serial(base, work, args.requests, deadline)
        print(f"{args.clients} concurrent clients x {args.per_client} requests, endpoints in turn:")
        many = concurrent(base, work, args.clients, args.per_client, deadline)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    row = {"bench": "demo_latency", **common.machine("time"), "preset": args.preset,
           "img_size": args.img_size, "images": args.images, "server_threads": args.server_threads,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **common.machine("cpus"),
           "load_avg_at_start": load, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
           "python": platform.python_version(),
           "startup_s": round(startup, 1), "serial": one, "concurrent": many,
           "wall_s": round(time.time() - t_start, 1), "note": args.note}
    common.append_jsonl(args.results, row)
    print(f"appended to {args.results} ({row['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
