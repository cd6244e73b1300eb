"""Tests for prep_dataset.py: every source end to end on tiny data made here, and every kind of bad input."""

import io
import json
import os
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import prep_dataset as P
from tokenizer import Tokenizer


def read_tar(path):
    """Shard -> {key: {ext: bytes}} (in memory, like every reader of ours)."""
    out = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def load_split(out, split):
    """All samples of a split as (key, img, caption, meta), checking index.json against the tars."""
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    info, samples = index[split], []
    for name, size in zip(info["shards"], info["shard_sizes"]):
        members = read_tar(os.path.join(out, name))
        assert len(members) == size
        for key, files in members.items():
            assert re.fullmatch(r"\d{9}", key) and set(files) == {"jpg", "txt", "json"}
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (index["img_size"],) * 2
            samples.append((key, img, files["txt"].decode("utf-8"), json.loads(files["json"])))
    assert len(samples) == info["num_samples"]
    return index, samples


def jpeg_bytes(color=(200, 30, 30), size=(40, 30), **kw):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", **kw)
    return buf.getvalue()


def shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tar")}


# ----------------------------------------------------------------------------- synthetic

SYN = ["synthetic", "--num_train", "200", "--num_val", "64", "--img_size", "32", "--shard_size", "64", "--quiet"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn") / "a")
    P.main(SYN + ["--out", out, "--workers", "1"])
    return out


def test_synthetic_deterministic_across_runs_and_workers(synthetic, tmp_path):
    P.main(SYN + ["--out", str(tmp_path / "b"), "--workers", "2"])
    P.main(SYN + ["--out", str(tmp_path / "c"), "--workers", "1", "--seed", "1"])
    a, b, c = shard_bytes(synthetic), shard_bytes(tmp_path / "b"), shard_bytes(tmp_path / "c")
    assert list(a) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar",
                       "val-000000.tar"]
    assert a == b  # same seed, 1 vs 2 workers: identical bytes
    for f in ("tokenizer.json", "index.json"):
        assert open(os.path.join(synthetic, f)).read() == open(tmp_path / "b" / f).read()
    assert all(a[f] != c[f] for f in a)  # another seed draws other images


def test_synthetic_index_and_samples(synthetic):
    index, train = load_split(synthetic, "train")
    _, val = load_split(synthetic, "val")
    assert (index["train"]["num_samples"], index["val"]["num_samples"]) == (200, 64)
    assert index["train"]["shard_sizes"] == [64, 64, 64, 8] and index["source"] == "synthetic"
    assert len(index["classes"]) == 64 and index["classes"][0] == "red circle" and index["skipped"] == {}
    assert [k for k, *_ in train] == [f"{i:09d}" for i in range(200)]
    pairs = 0
    for key, img, txt, meta in train + val:
        assert meta["source"] == "synthetic" and meta["short"] == txt
        assert meta["long"].startswith(txt + ". ") and meta["long"].count(". ") >= 2
        # the label is the first-mentioned "colour shape" of the caption
        first = re.search(r"(%s) (%s)" % ("|".join(P.COLOURS), "|".join(P.SHAPES)), txt).group(0)
        assert index["classes"][meta["label"]] == first
        if "swaps" in meta:
            pairs += 1
            (c1, s1), (c2, s2) = re.findall(r"(%s) (%s)" % ("|".join(P.COLOURS), "|".join(P.SHAPES)), txt)
            assert c1 != c2
            att = meta["swaps"]["attribute"]
            assert att != txt and re.findall(r"(%s) (%s)" % ("|".join(P.COLOURS), "|".join(P.SHAPES)), att) \
                == [(c2, s1), (c1, s2)]
            rel = meta["swaps"]["relation"]
            flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
            assert rel != txt and rel == re.sub(r"\b(left|right|above|below)\b", lambda m: flip[m.group(1)], txt)
    assert 0.3 < pairs / len(train + val) < 0.7  # about half the images have two objects
    # objects are visible: every image has strongly saturated pixels (the background never is)
    arr = np.stack([np.asarray(img, dtype=np.int16) for _, img, _, _ in train[:50]])  # (50, 32, 32, 3)
    sat = arr.max(-1) - arr.min(-1)  # (50, 32, 32)
    assert (sat.reshape(50, -1) > 120).sum(1).min() > 5


def test_synthetic_heldout(synthetic):
    index, train = load_split(synthetic, "train")
    _, val = load_split(synthetic, "val")
    held = index["heldout"]
    assert len(held) == 8
    assert sorted(h.split()[0] for h in held) == sorted(P.COLOURS)  # each colour once
    assert sorted(h.split()[1] for h in held) == sorted(P.SHAPES)  # each shape once
    for _, _, txt, meta in train:  # no training text, swaps included, names a held-out combination
        text = json.dumps(meta) + txt
        assert not any(h in text for h in held) and index["classes"][meta["label"]] not in held
    assert sorted(m["label"] for *_, m in val) == list(range(64))  # val: every combination once, balanced
    assert P.heldout_combos(0) != P.heldout_combos(1)


# ----------------------------------------------------------------------------- local sources

def test_folder_captions_and_classes(tmp_path):
    src = tmp_path / "cap"
    src.mkdir()
    for i in range(10):
        (src / f"im{i}.jpg").write_bytes(jpeg_bytes((20 * i, 100, 50)))
        (src / f"im{i}.txt").write_text(f"caption number {i}")
    P.main(["folder", "--src", str(src), "--out", str(tmp_path / "o1"), "--img_size", "16", "--val_frac", "0.2",
            "--vocab_size", "300", "--workers", "1", "--quiet"])
    index, train = load_split(tmp_path / "o1", "train")
    _, val = load_split(tmp_path / "o1", "val")
    assert (len(train), len(val)) == (8, 2) and "classes" not in index
    for _, _, txt, meta in train + val:  # each caption is its image's own
        assert txt == "caption number " + meta["id"][2:-4]
    assert os.path.exists(tmp_path / "o1" / "tokenizer.json")

    src = tmp_path / "cls"
    for c, colour in [("red_apple", (220, 20, 20)), ("blue_sky", (20, 20, 220))]:
        (src / c).mkdir(parents=True)
        for i in range(5):
            (src / c / f"{i}.png").write_bytes(jpeg_bytes(colour))
    P.main(["folder", "--src", str(src), "--out", str(tmp_path / "o2"), "--img_size", "16", "--val_frac", "0.2",
            "--vocab_size", "300", "--workers", "1", "--quiet"])
    index, train = load_split(tmp_path / "o2", "train")
    _, val = load_split(tmp_path / "o2", "val")
    assert index["classes"] == ["blue sky", "red apple"] and len(train) + len(val) == 10
    for _, img, txt, meta in train + val:
        name = index["classes"][meta["label"]]
        assert name in txt and meta["id"].startswith(name.replace(" ", "_"))
        assert np.asarray(img)[8, 8].argmax() == (2 if name == "blue sky" else 0)  # the right picture
    assert len({txt.replace(index["classes"][m["label"]], "X") for *_, txt, m in train + val}) > 1  # templates


def test_jsonl(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes((40 * i, 0, 0)))
        lines.append(json.dumps({"image": f"img/{i}.jpg", "caption": f"a photo {i}"}))
    (tmp_path / "abs.jpg").write_bytes(jpeg_bytes())
    lines.append(json.dumps({"image": str(tmp_path / "abs.jpg"), "caption": "absolute path"}))
    lines.append("{not json")
    lines.append(json.dumps({"image": "img/missing.jpg", "caption": "gone"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    P.main(["jsonl", "--src", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "o"), "--img_size", "16",
            "--val_frac", "0.25", "--vocab_size", "300", "--workers", "1", "--quiet"])
    index, train = load_split(tmp_path / "o", "train")
    _, val = load_split(tmp_path / "o", "val")
    assert sorted(t for _, _, t, _ in train + val) == ["a photo 0", "a photo 1", "a photo 2", "a photo 3",
                                                       "a photo 4", "a photo 5", "absolute path"]
    assert index["skipped"] == {"bad_json": 1, "missing_file": 1}
    with open(tmp_path / "pairs.jsonl", "a") as f:  # the .jsonl itself is part of the source's fingerprint
        f.write(json.dumps({"image": "img/0.jpg", "caption": "one more line"}) + "\n")
    with pytest.raises(SystemExit) as e:
        P.main(["jsonl", "--src", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "o"), "--img_size", "16",
                "--val_frac", "0.25", "--vocab_size", "300", "--workers", "1", "--quiet"])
    assert e.value.code == 2 and "1 modified (e.g. pairs.jsonl)" in capsys.readouterr().err


def make_tar(path, members):
    """members: [(name, bytes)] -> a plain tar file."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (20, 20), (0, 200, 0) if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def test_tar_source_with_bad_members(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = []
    for i in range(8):
        good += [(f"s{i}.jpg", jpeg_bytes((30 * i, 0, 0))), (f"s{i}.txt", f"sample {i}".encode())]
    make_tar(src / "a.tar", good[:8] + [
        ("../evil.txt", b"escape"), ("/abs.jpg", jpeg_bytes()),  # unsafe names: ignored, never written
        ("p.png", png_bytes()), ("p.json", json.dumps({"caption": "from json caption"}).encode()),
        ("w.webp", open_webp()), ("w.json", json.dumps({"prompt": "from json prompt"}).encode()),
        ("u.jpg", jpeg_bytes()), ("u.txt", b"caf\xe9 latin-1"),  # not UTF-8
        ("noimg.txt", b"caption without an image")])
    full = tmp_path / "full.tar"
    make_tar(full, good[8:])
    with tarfile.open(full) as tar:
        cut = tar.getmember("s5.txt").offset_data + 2
    (src / "b.tar").write_bytes(full.read_bytes()[:cut])  # cut inside s5.txt: s4 survives, s5 has no caption
    out = tmp_path / "o"
    P.main(["tar", "--src", str(src), "--out", str(out), "--img_size", "16", "--val_frac", "0.25",
            "--vocab_size", "300", "--workers", "1", "--quiet"])
    index, train = load_split(out, "train")
    _, val = load_split(out, "val")
    caps = sorted(t for _, _, t, _ in train + val)
    assert caps == ["from json caption", "from json prompt", "sample 0", "sample 1", "sample 2", "sample 3",
                    "sample 4"]
    assert index["skipped"] == {"unsafe_member": 2, "bad_utf8": 1, "missing_image": 1, "truncated_tar": 1,
                                "missing_caption": 1}
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/abs.jpg")
    assert sorted(os.listdir(out)) == sorted(index["train"]["shards"] + index["val"]["shards"] +
                                             [".prep_source.json", ".prep_state.json", "index.json",
                                              "tokenizer.json"])


def open_webp():
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(buf, "WEBP")
    return buf.getvalue()


def noisy_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    assert len(buf.getvalue()) > 2500
    return buf.getvalue()


def test_bad_images_and_captions(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = jpeg_bytes((10, 200, 10), size=(64, 64))
    files = {
        "ok": good,
        "corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,  # JPEG magic, then garbage
        "truncated": noisy_jpeg()[:1500],  # header whole, scan cut
        "empty": b"",
        "emptycap": good, "spacecap": good, "latin1": good, "longcap": good,
    }
    caps = {k: f"a caption for {k}".encode() for k in files}
    caps.update(emptycap=b"", spacecap=b" \n\t ", latin1="café".encode("latin-1"), longcap=b"x" * 10000)
    for k, data in files.items():
        (src / f"{k}.jpg").write_bytes(data)
        (src / f"{k}.txt").write_bytes(caps[k])
    # modes that must come out as the right RGB: grey, RGBA on white, CMYK, palette, 16-bit grey
    images = {"grey": Image.new("L", (20, 20), 100),
              "rgba": Image.new("RGBA", (20, 20), (255, 0, 0, 0)),  # fully transparent red -> white
              "cmyk": Image.new("CMYK", (20, 20), (0, 255, 255, 0)),  # -> red
              "pal": Image.new("RGB", (20, 20), (0, 0, 255)).convert("P"),
              "i16": Image.fromarray(np.full((20, 20), 32896, np.uint16))}  # 32896 / 257 = 128
    expect = {"grey": (100, 100, 100), "rgba": (255, 255, 255), "cmyk": (255, 0, 0), "pal": (0, 0, 255),
              "i16": (128, 128, 128)}
    for k, im in images.items():
        im.save(src / f"{k}.{'jpg' if k == 'cmyk' else 'png'}")
        (src / f"{k}.txt").write_text(k)
    # EXIF orientation 6 (display = rotated 90 deg clockwise): stored left red / right blue, shown top red
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32], arr[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(src / "rot.jpg", exif=exif.tobytes(), quality=95)
    (src / "rot.txt").write_text("rot")

    out = tmp_path / "o"
    with pytest.warns(UserWarning, match="skipped 6"):
        P.main(["folder", "--src", str(src), "--out", str(out), "--img_size", "16", "--val_frac", "0",
                "--vocab_size", "300", "--workers", "1", "--quiet"])
    assert "6" in capsys.readouterr().out.splitlines()[-1]  # the one-line skip summary
    index, train = load_split(out, "train")
    assert index["skipped"] == {"decode_error": 2, "empty_file": 1, "empty_caption": 2, "bad_utf8": 1}
    by_id = {m["id"].split(".")[0]: (img, txt) for _, img, txt, m in train}
    assert sorted(by_id) == ["cmyk", "grey", "i16", "longcap", "ok", "pal", "rgba", "rot"]
    assert by_id["longcap"][1] == "x" * 10000  # long captions are kept whole
    for k, rgb in expect.items():
        assert np.abs(np.asarray(by_id[k][0], np.int16)[8, 8] - rgb).max() <= 6, k
    rot = np.asarray(by_id["rot"][0], np.int16)  # (16, 16, 3): red on top, blue below
    assert rot[2, 3].argmax() == 0 and rot[2, 12].argmax() == 0 and rot[13, 3].argmax() == 2


def test_missing_src_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["folder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not exist" in err[-1] and "Traceback" not in "".join(err)


# ----------------------------------------------------------------------------- text-to-image-2M (local tars)

def t2i_tars(tmp_path, n=30, per_tar=10):
    """Tars laid out like the hub dataset: <key>.jpg + <key>.json {"prompt": ...}; sample 7 is a corrupt JPEG."""
    paths = []
    for t in range(n // per_tar):
        members = []
        for i in range(t * per_tar, (t + 1) * per_tar):
            img = jpeg_bytes((8 * i, 255 - 8 * i, 100), size=(48, 32)) if i != 7 else b"\xff\xd8garbage"
            members += [(f"{i:08d}.jpg", img), (f"{i:08d}.json", json.dumps({"prompt": f"prompt {i}"}).encode())]
        paths.append(str(tmp_path / f"data_{t:06d}.tar"))
        make_tar(paths[-1], members)
    return paths


def t2i_tars_names(tmp_path):
    return [str(tmp_path / f"data_{t:06d}.tar") for t in range(3)]


def t2i(tmp_path, out, limit, workers=1):
    P.main(["text-to-image-2m", "--out", str(out), "--img_size", "16", "--shard_size", "4", "--val_frac", "0.2",
            "--vocab_size", "300", "--workers", str(workers), "--quiet", "--data_files",
            str(tmp_path / "data_*.tar")] + (["--limit", str(limit)] if limit else []))


def test_t2i_local_and_restart(tmp_path):
    t2i_tars(tmp_path)
    t2i(tmp_path, tmp_path / "full", None, workers=2)
    index, train = load_split(tmp_path / "full", "train")
    _, val = load_split(tmp_path / "full", "val")
    assert (len(train), len(val), index["skipped"]) == (23, 6, {"decode_error": 1})
    assert sorted(int(t.split()[1]) for _, _, t, _ in train + val) == [i for i in range(30) if i != 7]
    # val: every 5th position p, and position p is record p // 3 of tar p % 3 (round-robin over the 3 tars)
    assert {t for _, _, t, _ in val} == {f"prompt {p % 3 * 10 + p // 3}" for p in (4, 9, 14, 19, 24, 29)}
    assert (index["data_files"], index["data_files_taken"]) == (t2i_tars_names(tmp_path), [10, 10, 10])

    out = tmp_path / "restart"
    t2i(tmp_path, out, 13)  # positions 0..12: train 0..10 (shards 0, 1 full, 2 partial), val 0..1
    first = {f: (os.stat(out / f).st_mtime_ns, b) for f, b in shard_bytes(out).items()}
    assert sorted(first) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    t2i(tmp_path, out, None)
    for f in ("train-000000.tar", "train-000001.tar"):  # full shards of the first run are left untouched
        assert (os.stat(out / f).st_mtime_ns, (out / f).read_bytes()) == first[f]
    assert shard_bytes(out) == shard_bytes(tmp_path / "full")  # and the result equals the uninterrupted run
    for f in ("index.json", "tokenizer.json"):
        assert (out / f).read_text() == (tmp_path / "full" / f).read_text()


def test_t2i_bad_records_caption_field_and_round_robin(tmp_path):
    """A truncated tar, a bad json and a json with "caption" instead of "prompt" among good records: the run
    finishes, counts each skip by reason, takes each sample's own caption field, and --limit draws round-robin."""
    def records(t, n, special={}):
        out = []
        for i in range(n):
            meta = special.get(i, json.dumps({"prompt": f"prompt {t}.{i}"}).encode())
            out += [(f"{i:04d}.jpg", jpeg_bytes((40 * t, 20 * i, 90), size=(40, 24))), (f"{i:04d}.json", meta)]
        return out
    make_tar(tmp_path / "data_000000.tar",
             records(0, 6, {5: json.dumps({"caption": "both fields: caption", "prompt": "not this"}).encode()}))
    make_tar(tmp_path / "data_000001.tar",
             records(1, 6, {1: b"{not json", 2: json.dumps({"caption": "caption field 1.2"}).encode()}))
    make_tar(tmp_path / "full.tar", records(2, 6))
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("0003.jpg").offset_data + 100
    (tmp_path / "data_000002.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut])  # 3 whole samples
    files = [str(tmp_path / f"data_{t:06d}.tar") for t in range(3)]

    with pytest.warns(UserWarning, match="truncated"):
        t2i(tmp_path, tmp_path / "all", None)
    index, train = load_split(tmp_path / "all", "train")
    _, val = load_split(tmp_path / "all", "val")
    assert index["skipped"] == {"bad_json": 1, "truncated_tar": 1}
    assert (index["data_files"], index["data_files_taken"]) == (files, [6, 6, 3])
    caps = {m["id"]: t for _, _, t, m in train + val}
    assert len(caps) == len(train + val) == 14  # 15 records, one bad json
    assert caps["data_000001.tar/0002"] == "caption field 1.2"  # "caption" where the others have "prompt"
    assert caps["data_000000.tar/0005"] == "both fields: caption"
    assert caps["data_000000.tar/0004"] == "prompt 0.4" and "data_000001.tar/0001" not in caps

    # --limit 13: A0 B0 C0 A1 B1 C1 A2 B2 C2 A3 B3, then C has run out: A4 B4
    t2i(tmp_path, tmp_path / "lim", 13)
    index, train = load_split(tmp_path / "lim", "train")
    _, val = load_split(tmp_path / "lim", "val")
    assert index["data_files_taken"] == [5, 5, 3] and index["skipped"] == {"bad_json": 1, "truncated_tar": 1}
    ids = sorted(m["id"] for *_, m in train + val)
    assert ids == sorted([f"data_000000.tar/{i:04d}" for i in range(5)] + [f"data_000002.tar/{i:04d}" for i in range(3)]
                         + [f"data_000001.tar/{i:04d}" for i in (0, 2, 3, 4)])
    t2i(tmp_path, tmp_path / "lim4", 4)  # even a small limit takes from every file
    index, train = load_split(tmp_path / "lim4", "train")
    _, val = load_split(tmp_path / "lim4", "val")
    assert index["data_files_taken"] == [2, 1, 1] and len({m["id"][:15] for *_, m in train + val}) == 3


class FakeResponse(io.BytesIO):
    """What urlopen returns, over bytes in memory: `cut` makes the connection fail after that many bytes, either
    with a reset (raise) or with a short read that a Content-Length exposes (urllib's behaviour)."""

    def __init__(self, data, cut=None, short=False):
        super().__init__(data[:cut] if short else data)
        self.cut, self.short = cut, short
        self.headers = {"Content-Length": str(len(data))}

    def read(self, size=-1):
        if self.cut is not None and not self.short and self.tell() >= self.cut:
            raise ConnectionResetError("connection reset by peer")
        end = self.cut if self.cut is not None and not self.short else None
        return super().read(size if end is None else min(size if size >= 0 else end, end - self.tell()))


def test_t2i_url_retry_and_give_up(tmp_path):
    """URLs with a fake opener that ignores Range (so the reader passes over the bytes it has): refused once, reset
    mid-stream, closed early (short read): each record still comes exactly once, in round-robin order; a URL that
    always fails is skipped after HTTP_TRIES tries and counted."""
    data = {}
    for name in ("a", "b"):
        members = []
        for i in range(8):
            meta = json.dumps({"prompt": f"{name}{i}"}).encode()
            members += [(f"{i:04d}.jpg", noisy_jpeg()), (f"{i:04d}.json", meta)]
        make_tar(tmp_path / f"{name}.tar", members)
        data[f"http://x/{name}.tar"] = (tmp_path / f"{name}.tar").read_bytes()
    assert len(data["http://x/b.tar"]) > 40000
    plan = {"http://x/a.tar": ["refuse"], "http://x/b.tar": [("reset", 12000), ("short", 30000)],
            "http://x/c.tar": ["refuse"] * 10}
    calls = []

    def opener(req):
        url = req.full_url
        calls.append(url)
        how = plan[url].pop(0) if plan[url] else "ok"
        if how == "refuse":
            raise ConnectionRefusedError("refused")
        return FakeResponse(data[url]) if how == "ok" else FakeResponse(data[url], how[1], how[0] == "short")

    skipped, taken = Counter(), [0, 0, 0]
    with pytest.warns(UserWarning, match=f"c.tar.*{P.HTTP_TRIES} tries"):
        recs = list(P.t2i_records(list(plan), skipped, taken, opener=opener, wait=0))
    assert [json.loads(r["json"])["prompt"] for r in recs] == [f"{n}{i}" for i in range(8) for n in "ab"]
    assert skipped == {"network_error": 1} and taken == [8, 8, 0]
    assert Counter(calls) == {"http://x/a.tar": 2, "http://x/b.tar": 3, "http://x/c.tar": P.HTTP_TRIES}


def test_folder_rerun_after_source_change(tmp_path, capsys):
    """Files added and removed between two runs: the re-run refuses in one line and leaves the output alone;
    with --overwrite the output holds each source file exactly once."""
    src, out = tmp_path / "src", tmp_path / "o"
    src.mkdir()
    for i in range(12):
        (src / f"im{i:02d}.jpg").write_bytes(jpeg_bytes((20 * i, 100, 50)))
        (src / f"im{i:02d}.txt").write_text(f"caption {i}")
    run = lambda *extra: P.main(["folder", "--src", str(src), "--out", str(out), "--img_size", "16", "--shard_size",
                                 "4", "--val_frac", "0.25", "--vocab_size", "300", "--workers", "1", "--quiet", *extra])
    run()
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    run()  # unchanged source: a re-run is fine and changes nothing
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    for i in (12, 13):
        (src / f"im{i:02d}.jpg").write_bytes(jpeg_bytes((10, 10 * i, 200)))
        (src / f"im{i:02d}.txt").write_text(f"caption {i}")
    os.remove(src / "im03.jpg"), os.remove(src / "im03.txt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "source changed" in line and "4 added (e.g. im12.jpg)" in line and "2 removed (e.g. im03.jpg)" in line
    assert "--overwrite" in line
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing was touched

    run("--overwrite")
    index, train = load_split(out, "train")
    _, val = load_split(out, "val")
    ids = sorted(m["id"] for *_, m in train + val)
    assert ids == sorted(f"im{i:02d}.jpg" for i in range(14) if i != 3)  # each source file exactly once
    for _, _, txt, m in train + val:
        assert txt == f"caption {int(m['id'][2:4])}"
    shards = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert shards == sorted(index["train"]["shards"] + index["val"]["shards"])  # no shard of the old listing left


def test_clear_errors(tmp_path, capsys):
    """A file as --out, an empty .prep_state.json, other settings in the same --out, and a run that writes no
    sample: each is exit 2 with one line, never a traceback."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes())
        (src / f"{i}.txt").write_text(f"caption {i}")
    argv = lambda out, *extra: ["folder", "--src", str(src), "--out", str(out), "--img_size", "16", "--vocab_size",
                                "300", "--val_frac", "0", "--workers", "1", "--quiet", *extra]

    def fails(args, *words):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            P.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert all(w in err.strip().splitlines()[-1] for w in words), err

    (tmp_path / "afile").write_text("x")
    fails(argv(tmp_path / "afile"), "afile is a file")
    fails(argv(tmp_path / "afile" / "sub"), "--out")  # a folder below a file cannot be made

    P.main(argv(tmp_path / "o"))
    (tmp_path / "o" / ".prep_state.json").write_text("")
    fails(argv(tmp_path / "o"), ".prep_state.json is empty or malformed", "--overwrite")
    (tmp_path / "o" / ".prep_state.json").write_text("[1, 2]")
    fails(argv(tmp_path / "o"), "malformed")
    P.main(argv(tmp_path / "o", "--overwrite"))
    fails(argv(tmp_path / "o", "--img_size", "24"), "other settings (img_size 16 -> 24)", "--overwrite")

    for i in range(4):  # every image undecodable: no sample to write is an error, not "skipped: none"
        (src / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    fails(argv(tmp_path / "bad"), "no samples written", "4 decode_error")
    assert not (tmp_path / "bad" / "index.json").exists()


def test_empty_class_folder_is_not_a_class(tmp_path):
    for c in ("a_cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / c / f"{i}.png").write_bytes(png_bytes())
    (tmp_path / "src" / "empty_one").mkdir()
    (tmp_path / "src" / "empty_one" / "notes.md").write_text("no images here")
    with pytest.warns(UserWarning, match="empty_one: no images"):
        P.main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--img_size", "16",
                "--vocab_size", "300", "--val_frac", "0", "--workers", "1", "--quiet"])
    index, train = load_split(tmp_path / "o", "train")
    assert index["classes"] == ["a cat", "dog"] and sorted(m["label"] for *_, m in train) == [0, 0, 0, 1, 1, 1]


def test_add_teacher_counts_skipped_samples(tmp_path):
    """Bad samples in a shard are skipped one by one and counted per reason (the rest of the shard is kept), and a
    re-run that finds the teacher shard done counts the same."""
    import torch
    import clip
    from dataloader import read_tar as read_shard, write_tar
    data = str(tmp_path / "d")
    P.main(["synthetic", "--out", data, "--num_train", "16", "--num_val", "4", "--img_size", "32", "--shard_size",
            "8", "--workers", "1", "--quiet"])
    path = os.path.join(data, "train-000000.tar")
    samples = read_shard(path)[0]
    keys = sorted(samples)
    samples[keys[0]]["jpg"] = b"\xff\xd8 broken"
    del samples[keys[1]]["txt"]
    samples[keys[2]]["txt"] = "café".encode("latin-1")
    samples[keys[3]]["json"] = b"{broken"
    write_tar(path, sorted(samples.items()))
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    torch.manual_seed(0)
    config = clip.get_config("micro", vocab_size=tok.vocab_size, img_size=32)
    ckpt = str(tmp_path / "t.pt")
    torch.save({"model": clip.CLIP(config).state_dict(), "config": config.to_dict(), "tokenizer": tok.to_dict()}, ckpt)
    run = lambda: P.main(["add-teacher", "--data", data, "--teacher", ckpt, "--device", "cpu", "--quiet"])
    want = {"decode_error": 1, "missing_caption": 1, "bad_utf8": 1, "bad_json": 1}
    with pytest.warns(UserWarning, match="skipped 4 samples"):
        index = run()
    assert index["teacher"]["skipped"] == want and index["train"]["shard_sizes"] == [4, 8]
    assert sorted(read_shard(os.path.join(data, "train-000000.teacher.tar"))[0]) == keys[4:]
    with pytest.warns(UserWarning, match="skipped 4 samples"):
        assert run()["teacher"]["skipped"] == want
