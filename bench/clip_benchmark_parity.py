"""
Parity with CLIP_benchmark (the anchor the field's numbers come from): the same checkpoint and the same local
webdataset sets in CLIP_benchmark's layout, scored by CLIP_benchmark's own code (PyPI `clip-benchmark`: its wds
reader build_dataset("wds/..."), zeroshot_classification.evaluate, zeroshot_retrieval.evaluate) and by ours
(eval_zeroshot.evaluate_checkpoint). Every shared metric must agree to 1e-4:

    acc1 = zeroshot_top1, acc5 = zeroshot_top5, mean_per_class_recall = mean_per_class_recall,
    text_retrieval_recall@k = i2t_R@k, image_retrieval_recall@k = t2i_R@k (k = 1, 5, 10)

  1. three sets are written from a shard split (default: the synthetic val split, 2,000 images, 64 classes) under
     the git-ignored bench/.data/: cls (.cls labels, classnames.txt, three {c} templates), ret_dups (.txt with 1-3
     captions per image: the caption, the long caption, "a photo of " + the caption) and ret (the same without any
     caption whose tokens, cut to the model's context, already appeared: no two images share a text input). Half the images keep their JPEG bytes,
     half are re-encoded as lossless WebP, over 2 shards each;
  2. CLIP_benchmark reads them with webdataset and PIL; its transform is our preprocessing applied to the PIL
     image it decoded (so the pixels are the same and the comparison is of the readers and the metric code);
  3. the check is on cls and ret. On ret_dups two images' identical text inputs score exactly the same: we count such a
     tie for the model (eval_zeroshot's rule), CLIP_benchmark's torch.topk breaks it by its internals (not by
     position), so its image->text recall there is lower by what the ties decide; printed, not checked;
  4. one JSON line per run is appended to bench/results/clip_benchmark_parity.jsonl (both sides' metrics per set,
     the largest difference, and ours/theirs wall time measured in the same run).

clip-benchmark is no dependency of this repo; it runs from a benchmark venv (it imports requests without declaring
it, and its accuracy() calls float() on a one-element array, an error from numpy 2.4 on):
    python3 -m venv bench/.venv-cb
    bench/.venv-cb/bin/pip install torch==2.14.1 torchvision==0.29.1 clip-benchmark requests "numpy<2.4" \
        -r requirements.txt
    python train.py                                       # the checkpoint (the README main command), if not there
    bench/.venv-cb/bin/python bench/clip_benchmark_parity.py
"""

import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

import common  # first: the repository root goes ahead of bench/ on sys.path
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import eval_zeroshot  # noqa: E402
from checkpoint_manager import load_model  # noqa: E402
from clip import normalize_images  # noqa: E402
from dataloader import image_array, read_index, read_tar, to_rgb, write_tar  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TEMPLATES = ["a photo of a {c}.", "a {c}.", "a rendering of the {c}."]
PAIRS = [("acc1", "zeroshot_top1"), ("acc5", "zeroshot_top5"), ("mean_per_class_recall", "mean_per_class_recall")] + \
    [(f"{theirs}_retrieval_recall@{k}", f"{ours}_R@{k}") for k in (1, 5, 10) for theirs, ours in
     (("text", "i2t"), ("image", "t2i"))]


def write_sets(data, split, out, same_text, shards=2):
    """The shard split -> CLIP_benchmark's layout under out/: cls (every image, its class), ret (captions the model
    sees as no earlier caption: same_text(caption) is the model's input, after truncation to its context; the
    images left with one), ret_dups (every caption, repeats included). Returns {set: (images, captions)}."""
    index = read_index(data, split)
    samples = []
    for name in sorted(index[split]["shards"]):
        groups, _ = read_tar(os.path.join(data, name))
        samples += [(key, m) for key, m in groups.items() if "jpg" in m and "txt" in m and "json" in m]
    sets, seen = {"cls": [], "ret": [], "ret_dups": []}, set()
    for i, (key, m) in enumerate(samples):
        meta = json.loads(m["json"])
        if i % 2:  # lossless WebP of the same pixels: the other image reader
            buf = io.BytesIO()
            Image.open(io.BytesIO(m["jpg"])).convert("RGB").save(buf, "WEBP", lossless=True)
            image = {"webp": buf.getvalue()}
        else:
            image = {"jpg": m["jpg"]}
        caption = m["txt"].decode()
        captions = list(dict.fromkeys([caption, meta.get("long") or caption, "a photo of " + caption][:1 + i % 3]))
        distinct = [c for c in captions if same_text(c) not in seen]
        seen.update(map(same_text, captions))
        sets["cls"].append((f"s{i:06d}", {**image, "cls": str(meta["label"]).encode()}))
        sets["ret_dups"].append((f"s{i:06d}", {**image, "txt": "\n".join(captions).encode()}))
        if distinct:
            sets["ret"].append((f"s{i:06d}", {**image, "txt": "\n".join(distinct).encode()}))
    for kind, rows in sets.items():
        root = os.path.join(out, kind)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(os.path.join(root, "test"))
        per = -(-len(rows) // shards)
        for s in range(shards):
            write_tar(os.path.join(root, "test", f"{s}.tar"), rows[s * per:(s + 1) * per])
        with open(os.path.join(root, "test", "nshards.txt"), "w") as f:
            f.write(f"{shards}\n")
        extra = {"classnames.txt": index["classes"], "zeroshot_classification_templates.txt": TEMPLATES} \
            if kind == "cls" else {"dataset_type.txt": ["retrieval"]}
        for fname, lines in extra.items():
            with open(os.path.join(root, fname), "w") as f:
                f.write("\n".join(lines) + "\n")
    count = lambda rows: sum(len(m["txt"].decode().splitlines()) for _, m in rows if "txt" in m)
    return {kind: (len(rows), count(rows)) for kind, rows in sets.items()}


def theirs(model, tokenizer, root, kind, size, batch):
    """CLIP_benchmark's own reader and metric code on `root`."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    # our preprocessing on the PIL image CLIP_benchmark decoded: shorter side to size, centre crop, normalised
    transform = lambda img: normalize_images(torch.from_numpy(image_array(
        ImageOps.fit(to_rgb(img), (size, size), method=Image.BICUBIC)))[None])[0]  # (3, S, S) float
    with warnings.catch_warnings():  # webdataset's note that shardshuffle is unset (CLIP_benchmark leaves it)
        warnings.simplefilter("ignore")
        ds = build_dataset(f"wds/{os.path.basename(root)}", root=root, transform=transform, split="test",
                           task="zeroshot_classification" if kind == "cls" else "zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds.batched(batch), batch_size=None, shuffle=False, num_workers=0)
    tok = lambda texts: tokenizer.tokenize(list(texts), model.config.text.context_length)
    if kind == "cls":
        return zeroshot_classification.evaluate(model, loader, tok, ds.classes, ds.templates, device="cpu", amp=False)
    return zeroshot_retrieval.evaluate(model, loader, tok, device="cpu", amp=False, recall_k_list=[1, 5, 10])


def main():
    p = common.parser(__doc__)
    p.add_argument("--ckpt", default=os.path.join(common.ROOT, "out", "tiny-synthetic", "ckpt", "latest.pt"))
    p.add_argument("--data", default=os.path.join(common.ROOT, "data", "synthetic"), help="a labelled shard set")
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "clip_benchmark_parity.jsonl"))
    args = p.parse_args()
    try:
        import clip_benchmark  # noqa: F401
        from importlib.metadata import version
        cb_version = version("clip-benchmark")
    except ImportError:
        p.error("clip_benchmark is not installed here; run this with bench/.venv-cb/bin/python (see the docstring)")
    if not os.path.isfile(args.ckpt):
        p.error(f"--ckpt {args.ckpt}: no such file (train one first: python train.py)")
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.ckpt, map_location="cpu")
    model.eval()
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    size = model.config.vision.img_size
    work = os.path.join(common.ROOT, "bench", ".data", "clip_benchmark_parity")
    ctx = model.config.text.context_length
    sizes = write_sets(args.data, args.split, work, lambda c: tuple(tokenizer.tokenize([c], ctx)[0].tolist()))
    rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "clip_benchmark": cb_version, "ckpt": os.path.relpath(args.ckpt, common.ROOT), "step": ckpt.get("step"),
           "data": os.path.relpath(args.data, common.ROOT), "split": args.split, "batch": args.batch, "threads": args.threads}
    for kind in sizes:
        root = os.path.join(work, kind)
        t0 = time.perf_counter()
        ours = eval_zeroshot.evaluate_checkpoint(model, tokenizer, root, "test", args.batch, "cpu", "fp32", workers=1)
        t1 = time.perf_counter()
        other = theirs(model, tokenizer, root, "cls" if kind == "cls" else "ret", size, args.batch)
        t2 = time.perf_counter()
        pairs = [(a, b, other[a], ours[b]) for a, b in PAIRS if a in other]
        rec[kind] = {"images": sizes[kind][0], "captions": sizes[kind][1], "ours": {b: o for _, b, _, o in pairs},
                     "theirs": {a: t for a, _, t, _ in pairs}, "max_abs_diff": max(abs(t - o) for *_, t, o in pairs),
                     "seconds": {"ours": round(t1 - t0, 2), "theirs": round(t2 - t1, 2)}}
    # the check: classification, and retrieval without repeated captions (ties between identical captions are
    # broken by torch.topk's internals there and counted for the model here; ret_dups shows what that moves)
    rec["max_abs_diff"] = max(rec["cls"]["max_abs_diff"], rec["ret"]["max_abs_diff"])
    rec["pass"] = rec["max_abs_diff"] <= args.tol
    rec["load"] = round(os.getloadavg()[0], 2)
    print(f"checkpoint {rec['ckpt']} (step {rec['step']}), {len(read_index(args.data)['classes'])} classes; "
          f"clip-benchmark {cb_version}; {args.threads} thread(s), load {rec['load']}")
    for kind in sizes:
        r = rec[kind]
        print(f"\n{kind}: {r['images']} images" + (f", {r['captions']} captions" if r["captions"] else "") +
              f"; ours {r['seconds']['ours']:.1f} s, CLIP_benchmark {r['seconds']['theirs']:.1f} s "
              f"(ours/theirs {r['seconds']['ours'] / max(r['seconds']['theirs'], 1e-9):.2f})")
        print(f"{'CLIP_benchmark':<28} {'ours':<22} {'theirs':>9} {'ours':>9} {'|diff|':>9}")
        for a, b in PAIRS:
            if a in r["theirs"]:
                t, o = r["theirs"][a], r["ours"][b]
                print(f"{a:<28} {b:<22} {t:9.5f} {o:9.5f} {abs(t - o):9.1e}")
    print(f"\nlargest difference (cls, ret) {rec['max_abs_diff']:.1e}: {'PASS' if rec['pass'] else 'FAIL'} "
          f"(tolerance {args.tol:g}); ret_dups (informational) {rec['ret_dups']['max_abs_diff']:.1e}")
    common.append_jsonl(args.out, rec)
    print(f"appended to {os.path.relpath(args.out, common.ROOT)}")
    return 0 if rec["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
