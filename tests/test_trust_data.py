"""Issue 24, the data side: image bytes reach only the dataset decoders (never Ghostscript), folder walks stay inside
--src, prep ends with one line and no temp file on a full disk, SIGTERM or Ctrl-C, bad captions are counted under
their real reason, and the demo bounds each request and never answers with a traceback."""

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, UnidentifiedImageError

import clip
import demo
import prep_dataset as P
from dataloader import ShardLoader, decode_image, read_tar, walk_files, write_tar
from tokenizer import MAX_TRAIN_CHARS, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16  # image size of the hand-made shards
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


@pytest.fixture
def ghostscript(monkeypatch):
    """Every call PIL makes to Ghostscript (it runs it on the bytes of an EPS file), recorded and refused."""
    calls = []

    def refuse(*args, **kw):
        calls.append(args)
        raise OSError("Ghostscript was called")
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    return calls


def png(sid, size=S):
    """A lossless image whose first pixel spells its sample id."""
    a = np.random.default_rng(sid).integers(0, 256, (size, size, 3), dtype=np.uint8)
    a[0, 0] = (sid, 0, 7)
    out = io.BytesIO()
    Image.fromarray(a).save(out, "PNG")
    return out.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def run_prep(argv, capsys):
    """prep_dataset.main -> (exit code, stderr); a run that returns is code 0."""
    try:
        P.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- decoders


def test_decode_image_opens_the_dataset_formats_and_nothing_else(ghostscript):
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        out = io.BytesIO()
        Image.new("RGB", (12, 10), (200, 30, 30)).save(out, fmt)
        img = decode_image(out.getvalue(), 8)
        assert img.mode == "RGB" and img.size == (8, 8), fmt
    with pytest.raises(UnidentifiedImageError):
        decode_image(EPS)
    assert ghostscript == []  # PIL's EPS reader was never tried, so it never reached Ghostscript


def shard_sample(sid, png_bytes=None, txt=None):
    return f"{sid:09d}", {"png": png_bytes or png(sid), "txt": txt if txt is not None else f"sample {sid}".encode()}


def test_loader_counts_eps_and_empty_captions_and_reads_past_a_bom(tmp_path, ghostscript):
    samples = [shard_sample(i) for i in range(8)]
    samples[2] = shard_sample(2, png_bytes=EPS)  # an EPS file under a .png name
    samples[5] = shard_sample(5, txt=b" \n ")  # a hand-made shard's empty caption
    samples[6] = shard_sample(6, txt="\ufeffsample 6".encode())  # saved by an editor that writes a BOM
    write_tar(str(tmp_path / "train-000000.tar"), samples)
    with open(tmp_path / "index.json", "w") as f:
        json.dump({"img_size": S, "train": {"shards": ["train-000000.tar"], "num_samples": 8}}, f)
    tok = Tokenizer().train([f"sample {i}" for i in range(10)], 280, quiet=True)
    loader = ShardLoader(str(tmp_path), "train", batch_size=4, tokenizer=tok, context_length=8, shuffle=False)
    batches = list(loader)
    assert loader.pop_epoch_report() == {"epoch": 0, "skipped": {"bad_image": 1, "empty_caption": 1}}
    loader.close()
    pairs = {int(b["image"][i, 0, 0, 0]): b["text"][i] for b in batches for i in range(4)}  # image id -> tokens
    assert set(pairs) == {0, 1, 3, 4, 6, 7}  # the two bad samples were replaced by good ones of the shard
    assert all(torch.equal(pairs[i], tok.tokenize(f"sample {i}", 8)[0]) for i in pairs)  # 6: no BOM token
    assert ghostscript == []


# ----------------------------------------------------------------------------- prep: folders


def test_folder_walk_stays_inside_src_and_counts_what_it_passes_over(tmp_path, capsys, monkeypatch, ghostscript, recwarn):
    src, outside = tmp_path / "src", tmp_path / "elsewhere.png"
    for i in range(6):
        write(str(src / "a" / f"{i}.png"), png(i))
        write(str(src / "a" / f"{i}.txt"), f"a photo number {i}".encode())
    write(str(src / "a" / "1.png"), EPS)  # an EPS file under a .png name
    write(str(src / "a" / "2.txt"), ("word " * 1000).encode())  # 5000 characters: cut for the tokenizer
    write(str(tmp_path / "x.png"), png(9))  # beside src: `up` must not reach it
    write(str(tmp_path / "x.txt"), b"outside")
    write(str(outside), png(8))
    os.symlink("0.png", src / "a" / "inside.png")  # a link inside src: followed
    write(str(src / "a" / "inside.txt"), b"a linked photo")
    os.symlink(outside, src / "a" / "out.png")  # a link to a file outside src
    write(str(src / "a" / "out.txt"), b"a photo from elsewhere")
    os.symlink(".", src / "a" / "loop")  # a folder link into itself
    os.symlink("..", src / "up")  # a folder link out of src
    write(os.path.join(os.fsencode(src), b"caf\xe9.png"), png(3))  # a name that is not UTF-8, and its caption
    write(os.path.join(os.fsencode(src), b"caf\xe9.txt"), b"a cafe")
    write(str(src / "locked" / "7.png"), png(7))  # a folder this user cannot list
    write(str(src / "a" / "4.txt"), b"a caption nobody may read")
    scandir, real_open = os.scandir, open
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "denied", p))
                        if str(p).endswith("locked") else scandir(p))
    monkeypatch.setattr(P, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied", p))
                        if str(p).endswith("4.txt") else real_open(p, *a, **k), raising=False)
    t0 = time.time()
    code, err = run_prep(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--img_size", "16",
                          "--vocab_size", "300", "--val_frac", "0", "--workers", "1", "--quiet"], capsys)
    assert code == 0 and time.time() - t0 < 20 and "Traceback" not in err
    with open(tmp_path / "out" / "index.json") as f:
        index = json.load(f)
    assert index["skipped"] == {"decode_error": 1, "unreadable_caption": 1, "link_outside": 2, "link_folder": 1,
                                "bad_filename": 2, "unreadable_folder": 1}
    assert index["captions_capped"] == 1 and any("longer than 4096 characters" in str(w.message) for w in recwarn)
    ids = sorted(json.loads(f["json"])["id"] for f in read_tar(str(tmp_path / "out" / "train-000000.tar"))[0].values())
    assert ids == ["a/0.png", "a/2.png", "a/3.png", "a/5.png", "a/inside.png"]
    assert ghostscript == []


def test_class_folders_do_not_follow_links_out_of_src(tmp_path, capsys):
    src = tmp_path / "src"
    for c in ("cat", "dog"):
        for i in range(3):
            write(str(src / c / f"{i}.png"), png(i))
    write(str(tmp_path / "stray.png"), png(5))
    os.symlink("..", src / "up")  # `up -> ..` would be a class holding everything beside src, src included
    os.symlink("..", src / "cat" / "back")  # inside src, but a folder link: it would repeat cat and dog
    code, _ = run_prep(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--img_size", "16",
                        "--vocab_size", "300", "--val_frac", "0", "--workers", "1", "--quiet"], capsys)
    with open(tmp_path / "out" / "index.json") as f:
        index = json.load(f)
    assert code == 0 and index["classes"] == ["cat", "dog"] and index["train"]["num_samples"] == 6
    assert index["skipped"] == {"link_outside": 1, "link_folder": 1}
    assert walk_files(str(src)) == sorted(str(src / c / f"{i}.png") for c in ("cat", "dog") for i in range(3))


# ----------------------------------------------------------------------------- prep: captions and sizes


def test_bom_and_number_captions_are_read_as_text(tmp_path, capsys):
    for i in range(5):
        write(str(tmp_path / f"{i}.png"), png(i))
    rows = [{"image": "0.png", "caption": 42}, {"image": "1.png", "caption": "a photo"},
            {"image": "2.png", "caption": ["a", "list"]}, {"image": "3.png", "caption": ""},
            {"image": "4.png", "caption": 1.5}]
    write(str(tmp_path / "pairs.jsonl"), "\ufeff".encode() + "\n".join(map(json.dumps, rows)).encode())
    code, _ = run_prep(["jsonl", "--src", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "j"),
                        "--img_size", "16", "--vocab_size", "300", "--val_frac", "0", "--workers", "1", "--quiet"],
                       capsys)
    with open(tmp_path / "j" / "index.json") as f:
        assert code == 0 and json.load(f)["skipped"] == {"bad_caption": 1, "empty_caption": 1}
    got = {f["txt"].decode() for f in read_tar(str(tmp_path / "j" / "train-000000.tar"))[0].values()}
    assert got == {"42", "a photo", "1.5"}
    # a tar's json member: a BOM and a number caption ({"caption": 0} is "0", not a missing caption); a .txt BOM
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for key, ext, meta in [("a", "json", b"\xef\xbb\xbf" + json.dumps({"caption": 0}).encode()),
                               ("b", "json", json.dumps({"caption": "", "prompt": "a prompt"}).encode()),
                               ("c", "json", json.dumps({"caption": None}).encode()),
                               ("d", "json", json.dumps({"x": 1}).encode()), ("e", "txt", "\ufeffa bom".encode())]:
            for ext, data in [("png", png(1)), (ext, meta)]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    code, _ = run_prep(["tar", "--src", str(tmp_path / "in.tar"), "--out", str(tmp_path / "t"), "--img_size", "16",
                        "--vocab_size", "300", "--val_frac", "0", "--workers", "1", "--quiet"], capsys)
    with open(tmp_path / "t" / "index.json") as f:
        assert code == 0 and json.load(f)["skipped"] == {"empty_caption": 1, "missing_caption": 1}
    assert {f["txt"].decode() for f in read_tar(str(tmp_path / "t" / "train-000000.tar"))[0].values()} == \
        {"0", "a prompt", "a bom"}


def test_huge_img_size_is_one_line(tmp_path, capsys):
    for argv in (["synthetic", "--out", str(tmp_path / "s")], ["folder", "--src", str(tmp_path), "--out",
                                                                 str(tmp_path / "f")]):
        code, err = run_prep(argv + ["--img_size", "100000"], capsys)
        assert code == 2 and "--img_size must be in 8..1024 (CLIP models take 224-448 px), got 100000" in err
    assert not os.path.exists(tmp_path / "s")


def test_tokenizer_training_reads_a_bounded_prefix_of_each_caption():
    long = "ab " * 2000 + "x" * 1_000_000  # 1 MB: one word of a million x's after 6000 characters of "ab "
    tracemalloc.start()
    tok = Tokenizer().train([long, "a red cube"], 300, quiet=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20  # read whole, this one caption took 147 MiB (30 MB: ~6 GB)
    assert tok.merges == Tokenizer().train([long[:MAX_TRAIN_CHARS], "a red cube"], 300, quiet=True).merges
    assert (ord("a"), ord("b")) in tok.merges and (ord("x"), ord("x")) not in tok.merges


# ----------------------------------------------------------------------------- prep: ending cleanly


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A captioned folder of 40 images: prep writes 5 shards of 8 from it."""
    src = tmp_path_factory.mktemp("small")
    for i in range(40):
        write(str(src / f"{i}.png"), png(i))
        write(str(src / f"{i}.txt"), f"a photo number {i}".encode())
    return str(src)


@pytest.mark.parametrize("stop, code, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, "error: No space left on device"),
    (KeyboardInterrupt(), 130, "stopped by Ctrl-C; temp files removed, finished shards kept"),
])
def test_full_disk_or_ctrl_c_is_one_line_and_leaves_no_temp_file(small, tmp_path, capsys, monkeypatch, stop, code,
                                                                  words):
    """The third shard fails halfway through (in a Pool worker, which re-raises it in the main process with its own
    traceback chained): one line, the half-written shard gone, the finished ones kept for the re-run."""
    out, added = str(tmp_path / "out"), []
    real = tarfile.TarFile.addfile

    def addfile(self, info, fileobj=None):
        real(self, info, fileobj)
        added.append(1)
        if info.name.startswith("000000016"):  # first sample of the third shard
            raise stop
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    argv = ["folder", "--src", small, "--out", out, "--img_size", "16", "--vocab_size", "300", "--val_frac", "0",
            "--shard_size", "8", "--quiet"]
    got, err = run_prep(argv + ["--workers", "2" if isinstance(stop, OSError) else "1"], capsys)
    assert got == code and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    left = sorted(os.listdir(out))
    assert not [f for f in left if ".tmp" in f] and "train-000002.tar" not in left
    assert "train-000000.tar" in left  # done before the failure, and kept
    monkeypatch.undo()
    assert run_prep(argv + ["--workers", "1"], capsys)[0] == 0  # room again: the same command finishes the job
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["train"]["num_samples"] == 40


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    """A synthetic set and an untrained micro checkpoint that reads it (enough to mine negatives with)."""
    root = tmp_path_factory.mktemp("swappable")
    data = str(root / "data")
    P.main(["synthetic", "--out", data, "--num_train", "64", "--num_val", "16", "--img_size", "32",
            "--shard_size", "32", "--workers", "1", "--quiet"])
    tok = Tokenizer.load(os.path.join(data, "tokenizer.json"))
    torch.manual_seed(0)
    model = clip.CLIP(clip.get_config("micro", vocab_size=tok.vocab_size, img_size=32))
    ckpt = str(root / "micro.pt")
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict()}, ckpt)
    return data, ckpt


def copy_data(data, to):
    os.makedirs(to)
    for f in os.listdir(data):
        with open(os.path.join(data, f), "rb") as a, open(os.path.join(to, f), "wb") as b:
            b.write(a.read())
    return str(to)


def test_corrupt_add_swaps_state_is_ignored_and_every_shard_redone(swappable, tmp_path, capsys):
    data = copy_data(swappable[0], tmp_path / "d")
    for state in ("{not json", '{"settings": {}, "done": {"train-000000.swaps.tar": 3}}', "[]"):
        write(os.path.join(data, ".add_swaps.json"), state.encode())
        with pytest.warns(UserWarning, match="add_swaps.json is corrupt; ignoring it, every shard is redone"):
            index = P.main(["add-swaps", "--data", data, "--quiet"])
        assert index["train"]["shards"] == ["train-000000.swaps.tar", "train-000001.swaps.tar"]
        assert not os.path.exists(os.path.join(data, ".add_swaps.json"))


def test_sigterm_during_add_negatives_leaves_no_temp_file(swappable, tmp_path, capsys):
    """A real SIGTERM from outside while add-negatives writes its first shard (slowed down here): one line, exit
    143, no temp file, index.json untouched; the same command then finishes."""
    data, ckpt = swappable
    data = copy_data(data, tmp_path / "d")
    with open(os.path.join(data, "index.json")) as f:
        before = f.read()
    argv = ["add-negatives", "--data", data, "--model", ckpt, "--k", "2", "--batch", "32", "--device", "cpu", "--quiet"]
    slow = ("import sys, tarfile, time, torch; torch.set_num_threads(1); real = tarfile.TarFile.addfile\n"
            "def addfile(self, *a, **k):\n    real(self, *a, **k); self.fileobj.flush(); time.sleep(60)\n"
            "tarfile.TarFile.addfile = addfile\nimport prep_dataset; prep_dataset.main(sys.argv[1:])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", slow, *argv], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not [f for f in os.listdir(data) if ".tmp" in f]:  # the first shard is being written
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err
    assert err.strip().splitlines() == ["prep_dataset.py: stopped by SIGTERM; temp files removed, finished shards "
                                        "kept: run the same command again to continue"]
    assert not [f for f in os.listdir(data) if ".tmp" in f]
    with open(os.path.join(data, "index.json")) as f:
        assert f.read() == before
    index = P.main(argv)
    assert index["train"]["shards"] == ["train-000000.mined.tar", "train-000001.mined.tar"]


# ----------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A folder of 5 captioned images, one of them an EPS file under a .png name, and an untrained micro checkpoint
    (the tests here need answers, not good ones)."""
    root = tmp_path_factory.mktemp("gallery")
    images = root / "images"
    for i in range(5):
        write(str(images / f"{i}.png"), EPS if i == 2 else png(i, 32))
        write(str(images / f"{i}.txt"), f"a photo number {i}".encode())
    os.symlink("..", images / "up")  # the demo does not walk out of its folder either
    tok = Tokenizer().train([f"a photo number {i}" for i in range(5)], 300, quiet=True)
    torch.manual_seed(0)
    model = clip.CLIP(clip.get_config("micro", vocab_size=tok.vocab_size, img_size=32))
    ckpt = str(root / "micro.pt")
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict()}, ckpt)
    return str(images), ckpt


def test_demo_leaves_out_undecodable_images_and_answers_4xx_without_traceback(gallery, tmp_path, capfd, ghostscript):
    images, ckpt = gallery
    cache = str(tmp_path / "emb.npz")
    for _ in range(2):  # embedded, then from the cache: the same images are left out
        with pytest.warns(UserWarning) as seen:
            d = demo.build(ckpt, images, cache=cache, quiet=True)
        assert [str(w.message) for w in seen if "decoded" in str(w.message)] == \
            ["1 image(s) could not be decoded and are left out: 2.png"]
        assert d.gallery.names == ["0.png", "1.png", "3.png", "4.png"] and d.image_emb.shape[0] == 4
    assert d.description == "4 images from images"
    assert d.query_image(EPS) == (400, {"error": "the upload is not an image this demo reads (JPEG, PNG, WebP, GIF, "
                                                 "BMP, TIFF)"})
    assert ghostscript == []
    capfd.readouterr()
    with demo_thread(d) as url:
        assert all(get(f"{url}/api/image/{i}")[0] == 200 for i in (0, 1, 3))  # (served JPEGs are kept in memory)
        write(os.path.join(images, "3.png"), b"changed since the start")  # image #2 of the gallery now
        try:
            for path in ("/api/image/2", "/api/heatmap?i=2&q=a+photo"):
                status, answer = get(url + path)
                assert status == 422 and answer["error"].startswith("image #2 (3.png) could not be read or decoded")
        finally:
            write(os.path.join(images, "3.png"), png(3, 32))
    assert "Traceback" not in capfd.readouterr().err


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class demo_thread:
    def __init__(self, d, **kw):
        self.server = demo.make_server(d, quiet=True, **kw)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_slow_clients_cannot_hold_the_threads(gallery):
    """4 clients trickling a byte every 0.2 s into a server of 2 threads with --timeout 1: each is cut off after
    1 s of its request, so a normal request is answered after about 2 s, not never."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = demo.build(gallery[1], gallery[0], cache=None, quiet=True)
    with demo_thread(d, threads=2, timeout=1.0) as url:
        port, stop = int(url.rsplit(":", 1)[1]), threading.Event()
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        cut = [False] * 4

        def trickle(k, data=b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 100):
            try:
                for byte in data:
                    if stop.is_set():
                        return
                    slow[k].sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:  # reset or broken pipe: the server closed it
                cut[k] = True
        threads = [threading.Thread(target=trickle, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)  # the slow ones are connected and hold both threads
            t0 = time.time()
            status, _ = get(url + "/api/info")
            assert status == 200 and time.time() - t0 < 6
            for s in slow:  # each was closed by the server, well before its 100-odd bytes were sent
                s.settimeout(5)
                assert s.recv(1024) == b""
            # a slow upload after whole headers: the deadline ends it with a 408 answer
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /api/query_image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
            s.settimeout(5)
            t0 = time.time()
            for _ in range(20):
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                time.sleep(0.2)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.0 408") and b"did not arrive within 1 s (--timeout)" in answer
            assert time.time() - t0 < 3
            s.close()
        finally:
            stop.set()
            for s in slow:
                s.close()
