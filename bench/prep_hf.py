"""
Benchmark prep_dataset.py's `hf` source against its `folder` source on the same images, in the same run: 10,000
small JPEGs (64 x 48, noisy so decoding costs what a photo's does) with captions, once as a folder of a.jpg + a.txt
and once as a local dataset in the hub's layout (4 parquet files under data/, the image bytes and captions
unchanged). Each source runs as its own process (the command a user types), alternating folder, hf, folder, hf, ...
so drift on a shared machine hits both alike; the best of --repeats is compared (wall time, the target: hf within
1.5x of folder; and the CPU seconds of all processes, which other jobs on the machine disturb less).

Memory: the peak RSS of the largest process of each run (the main process or a pool worker; getrusage of the
children), and the same for hf with --limit a quarter of the images: streamed, the peak does not grow with the
number of samples (the dataset is never read into memory; only the captions are kept, for the tokenizer).

    python bench/prep_hf.py [--n 10000] [--workers 2] [--repeats 2] [--quiet]
"""

import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

import common  # first: the repository root goes ahead of bench/ on sys.path

TARGET = 1.5
COLOURS = "red green blue yellow orange purple pink brown black white grey cyan".split()
THINGS = "cube ball cone ring star dog cat car boat tree house lamp".split()

# run one command; print its wall time, the CPU time of all its processes and the peak RSS (KiB on Linux) of the
# largest one
TIMED = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "rc = subprocess.run(sys.argv[1:]).returncode; r = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(rc, time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss)")


def make_data(root, n):
    """The same n images and captions as a folder and as 4 parquet files; made once, reused by later runs."""
    folder, hub = os.path.join(root, "folder"), os.path.join(root, "hub")
    if os.path.exists(os.path.join(root, "done")):
        return folder, hub
    import datasets
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images, captions = [], []
    for i in range(n):
        base = np.array([40 * (i % 6), 20 * (i % 13), 255 - 30 * (i % 9)], dtype=np.int16)
        a = np.clip(base + rng.integers(-40, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(f"a {COLOURS[i % 12]} {THINGS[(i // 12) % 12]} next to a {COLOURS[(i * 7) % 12]} "
                        f"{THINGS[(i * 5) % 12]}, photo {i}")
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(images[-1])
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
            f.write(captions[-1])
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    os.makedirs(os.path.join(hub, "data"), exist_ok=True)
    for k in range(4):
        part = slice(k * n // 4, (k + 1) * n // 4)
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images[part]],
                                         "text": captions[part]}, features=features)
        ds.to_parquet(os.path.join(hub, "data", f"train-{k:05d}-of-00004.parquet"))
    open(os.path.join(root, "done"), "w").close()
    return folder, hub


def run(args, source, src, out, *extra):
    cmd = [sys.executable, os.path.join(common.ROOT, "prep_dataset.py"), source,
           "--src" if source == "folder" else "--name", src, "--out", out, "--img_size", "32", "--vocab_size", "1024",
           "--workers", str(args.workers), "--quiet", "--overwrite", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", TIMED, *cmd], env=env, cwd=common.ROOT, capture_output=True, text=True)
    rc, wall, cpu, rss = res.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        sys.exit(f"{source} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    return {"wall_s": float(wall), "cpu_s": float(cpu), "peak_rss_mb": int(rss) / 1024,
            "samples": index["train"]["num_samples"] + index["val"]["num_samples"]}


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=os.path.join(common.DATA, "prep_hf"),
                        help="where the images are made once (git-ignored)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    folder, hub = make_data(os.path.join(args.data, str(args.n)), args.n)
    runs = {"folder": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for source, src in (("folder", folder), ("hf", hub)):
                runs[source].append(run(args, source, src, os.path.join(tmp, source)))
                if not args.quiet:
                    print(f"repeat {r} {source:6s} {runs[source][-1]}")
        quarter = run(args, "hf", hub, os.path.join(tmp, "quarter"), "--limit", str(args.n // 4))
    best = {s: min(v, key=lambda x: x["wall_s"]) for s, v in runs.items()}
    assert best["hf"]["samples"] == best["folder"]["samples"] == args.n, best
    ratio = best["hf"]["wall_s"] / best["folder"]["wall_s"]
    cpu = {s: min(x["cpu_s"] for x in v) for s, v in runs.items()}  # less disturbed by other jobs than wall time
    row = {"bench": "prep_hf", **common.machine("time"), "images": args.n, "img_size": 32,
           "workers": args.workers, "repeats": args.repeats, **common.machine("load_avg_1m"),
           "folder_s": round(best["folder"]["wall_s"], 2), "hf_s": round(best["hf"]["wall_s"], 2),
           "ratio_hf_vs_folder": round(ratio, 3), "target": TARGET, "pass": ratio <= TARGET,
           "folder_cpu_s": round(cpu["folder"], 2), "hf_cpu_s": round(cpu["hf"], 2),
           "cpu_ratio_hf_vs_folder": round(cpu["hf"] / cpu["folder"], 3),
           "folder_peak_rss_mb": round(best["folder"]["peak_rss_mb"], 1),
           "hf_peak_rss_mb": round(best["hf"]["peak_rss_mb"], 1),
           "hf_quarter_peak_rss_mb": round(quarter["peak_rss_mb"], 1), "hf_quarter_samples": quarter["samples"],
           "all_s": {s: [round(x["wall_s"], 2) for x in v] for s, v in runs.items()}}
    print(f"hf {row['hf_s']} s vs folder {row['folder_s']} s on {args.n} images: ratio {row['ratio_hf_vs_folder']} "
          f"(target <= {TARGET}: {'pass' if row['pass'] else 'FAIL'}), CPU time ratio "
          f"{row['cpu_ratio_hf_vs_folder']}; peak RSS hf {row['hf_peak_rss_mb']} MB, "
          f"folder {row['folder_peak_rss_mb']} MB, hf on a quarter of the images {row['hf_quarter_peak_rss_mb']} MB")
    common.append_jsonl(os.path.join(common.RESULTS, "prep_hf.jsonl"), row)


if __name__ == "__main__":
    main()
