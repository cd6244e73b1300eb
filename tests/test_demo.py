"""demo.py: the JSON API against scores computed here, the embedding cache, bad inputs, and the page itself in a
real headless Chromium, driven through chromedriver's W3C WebDriver HTTP API with urllib (no selenium)."""
import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint_manager as cm
import demo
import train
from eval_zeroshot import encode_images, encode_texts
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")  # screenshots of the page, kept for a human to look at
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1100,900"]


@pytest.fixture(scope="module")
def ckpt(synth, tmp_path_factory):
    """A micro checkpoint after 2 training steps: enough for real, if poor, embeddings."""
    tmp = tmp_path_factory.mktemp("demo")
    assert train.main(["--data", synth, "--preset", "micro", "--batch", "32", "--epochs", "0.125", "--workers", "0",
                       "--eval_every", "0", "--out", str(tmp / "out"), "--log_dir", str(tmp / "logs"),
                       "--run_name", "r", "--quiet"]) == 0
    return str(tmp / "out" / "r" / "ckpt" / "latest.pt")


def get(url):
    """GET -> (status, parsed JSON or raw bytes)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            status, ctype, body = r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        status, ctype, body = e.code, e.headers["Content-Type"], e.read()
    return status, json.loads(body) if (ctype or "").startswith("application/json") else body


@contextlib.contextmanager
def demo_process(*args):
    """demo.py in a subprocess on a free loopback port (--port 0, address read from its output); always killed."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), "--port", "0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # keeps the pipe drained
    reader.start()
    try:
        deadline = time.time() + 60
        while not any("serving on" in line for line in list(lines)):
            assert proc.poll() is None and time.time() < deadline, "demo.py did not start:\n" + "".join(lines)
            time.sleep(0.05)
        url = re.search(r"serving on (http://[\d.]+:\d+)", "".join(lines)).group(1)
        yield url, lines
    finally:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def demo_thread(d):
    """A Demo served from a thread of this process (for cases that need no model subprocess)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), demo.make_handler(d, quiet=True))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def expected_embeddings(ckpt, gallery, texts):
    """What the server should hold, computed here with the same checkpoint: (N, E) images, (M, E) texts."""
    model, state = cm.load_model(ckpt)
    tok = Tokenizer.from_dict(state["tokenizer"])
    size = model.config.vision.img_size
    images = torch.stack([gallery.pixels(i, size) for i in range(len(gallery))])  # (N, 3, S, S) uint8
    return model, tok, encode_images(model, images), encode_texts(model, tok, texts)


# -----------------------------------------------------------------------------
# the API over HTTP (runs without Chromium)


def test_api_answers_match_scores_computed_here(ckpt, synth, tmp_path):
    gallery = demo.Gallery(synth, "val")
    texts = [t for t, _ in demo.candidate_texts(gallery)]
    model, tok, img_emb, txt_emb = expected_embeddings(ckpt, gallery, texts)
    index = json.load(open(os.path.join(synth, "index.json")))
    assert texts[:len(index["classes"])] == [demo.articles(f"a photo of a {c}.") for c in index["classes"]]
    assert len(texts) == len(index["classes"]) + len(set(gallery.captions) - set(texts[:len(index["classes"])]))

    with demo_process("--ckpt", ckpt, "--images", synth, "--topk", "5", "--cache", str(tmp_path / "c.npz"),
                      "--quiet") as (url, _):
        status, info = get(url + "/api/info")
        assert status == 200 and info["images"] == 128 and info["texts"] == len(texts) and info["error"] is None

        # text -> images: the top 5 by cosine similarity, sorted, with the scores computed here
        q = gallery.captions[7]
        status, ans = get(url + "/api/search?q=" + urllib.parse.quote(q))
        want = (img_emb @ encode_texts(model, tok, [q])[0]).numpy()  # (N,)
        got = ans["results"]
        assert status == 200 and ans["query"] == q and len(got) == 5
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
        for r in got:
            assert r["score"] == pytest.approx(want[r["i"]], abs=1e-3)
            assert r["caption"] == gallery.captions[r["i"]]
        assert min(r["score"] for r in got) >= np.sort(want)[-5] - 1e-3  # nothing better was left out

        # image -> texts: the top 5 candidate texts, and the image's own caption / class marked true
        status, ans = get(url + "/api/similar_texts?i=7")
        want = (txt_emb @ img_emb[7]).numpy()  # (M,)
        own = {gallery.captions[7], demo.articles(f"a photo of a {index['classes'][gallery.labels[7]]}.")}
        assert status == 200 and ans["i"] == 7 and ans["caption"] == gallery.captions[7] and len(ans["results"]) == 5
        for r in ans["results"]:
            assert r["score"] == pytest.approx(want[texts.index(r["text"])], abs=1e-3)
            assert r["true"] == (r["text"] in own)
            assert r["kind"] == ("class" if r["text"] in texts[:len(index["classes"])] else "caption")
        assert min(r["score"] for r in ans["results"]) >= np.sort(want)[-5] - 1e-3

        # the image itself: the shard's JPEG member, byte for byte
        status, body = get(url + "/api/image/7")
        assert status == 200 and body[:2] == b"\xff\xd8" and body == gallery.jpeg(7)

        # bad input: one friendly line in a JSON error field, never a traceback
        for path, code, words in [("/api/search?q=", 400, "type a caption"), ("/api/search", 400, "type a caption"),
                                  ("/api/search?q=%20%20", 400, "type a caption"),
                                  ("/api/similar_texts?i=128", 404, "no image #128: pick a number from 0 to 127"),
                                  ("/api/similar_texts?i=-1", 404, "no image #-1"),
                                  ("/api/similar_texts?i=abc", 400, "must be an integer, got 'abc'"),
                                  ("/api/image/999", 404, "no image #999"), ("/nope", 404, "no such page")]:
            status, ans = get(url + path)
            assert status == code and words in ans["error"] and "Traceback" not in ans["error"], (path, ans)


def test_cache_makes_a_restart_skip_the_model_and_follows_the_checkpoint(ckpt, synth, tmp_path, capsys):
    cache = str(tmp_path / "emb.npz")
    first = demo.build(ckpt, synth, cache=cache, limit=40)
    assert "encoded 40 images" in capsys.readouterr().out and os.path.isfile(cache)
    with np.load(cache, allow_pickle=False) as z:
        assert z["image"].shape == (40, 32) and z["text"].shape == (len(first.texts), 32)
    second = demo.build(ckpt, synth, cache=cache, limit=40)
    assert "loaded embeddings" in capsys.readouterr().out
    assert torch.equal(second.image_emb, first.image_emb) and torch.equal(second.text_emb, first.text_emb)
    assert second.search("a red star") == first.search("a red star")

    demo.build(ckpt, synth, cache=cache, limit=30)  # other data: the key differs
    assert "encoded 30 images" in capsys.readouterr().out
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a checkpoint rewritten in place
    demo.build(ckpt, synth, cache=cache, limit=30)
    assert "encoded 30 images" in capsys.readouterr().out
    with open(cache, "wb") as f:
        f.write(b"not an npz")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        third = demo.build(ckpt, synth, cache=cache, limit=30)
    assert torch.allclose(third.image_emb, first.image_emb[:30], atol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_corrupt_checkpoint_is_a_message_not_a_crash(synth, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    d = demo.build(str(bad), synth, cache=str(tmp_path / "c.npz"))
    with demo_thread(d) as url:
        status, info = get(url + "/api/info")
        assert status == 200 and info["images"] == 128 and "cannot use checkpoint" in info["error"]
        status, ans = get(url + "/api/search?q=a+red+cube")
        assert status == 503 and ans["error"].startswith(f"cannot use checkpoint {bad}: ")
        assert "Traceback" not in ans["error"] and "\n" not in ans["error"]
        status, body = get(url + "/api/image/3")  # the images are still there
        assert status == 200 and body[:2] == b"\xff\xd8"
    assert not os.path.exists(tmp_path / "c.npz")


def test_folder_of_images_with_class_folders(ckpt, tmp_path):
    """A plain folder: class names from the sub-folders, PNGs re-encoded to JPEG for the browser."""
    colours = {"red_thing": (255, 0, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        os.makedirs(tmp_path / "imgs" / name)
        for k in range(2):
            Image.new("RGB", (40, 24), rgb).save(tmp_path / "imgs" / name / f"{k}.png")
    d = demo.build(ckpt, str(tmp_path / "imgs"), cache=None)
    assert d.gallery.classes == ["blue thing", "red thing"] and d.gallery.labels == [0, 0, 1, 1]
    assert [t for t, _ in d.texts] == ["a photo of a blue thing.", "a photo of a red thing."]
    jpeg = d.gallery.jpeg(2)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (40, 24)
        assert np.abs(np.asarray(im).astype(int) - [255, 0, 0]).max() < 8  # the red image
    status, ans = d.similar_texts(2)
    assert status == 200 and [r["true"] for r in ans["results"] if r["text"] == "a photo of a red thing."] == [True]
    assert sum(r["true"] for r in ans["results"]) == 1

    # a captioned folder (a.jpg + a.txt, images without a .txt still shown): captions are the candidates
    os.makedirs(tmp_path / "capt" / "sub")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "capt" / "sub" / "a.jpg")
    (tmp_path / "capt" / "sub" / "a.txt").write_text("a green square\n")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(tmp_path / "capt" / "b.webp")
    d = demo.build(ckpt, str(tmp_path / "capt"), cache=None)
    assert d.gallery.captions == ["", "a green square"] and d.gallery.classes == [] and d.gallery.labels == [-1, -1]
    assert d.texts == [("a green square", "caption")]
    assert d.similar_texts(1)[1]["results"][0]["true"] and not d.similar_texts(0)[1]["results"][0]["true"]
    assert d.gallery.jpeg(1)[:2] == b"\xff\xd8" and d.gallery.jpeg(0)[:2] == b"\xff\xd8"


def test_cli_errors_exit_2(ckpt, synth, tmp_path, capsys):
    for argv, words in [(["--ckpt", str(tmp_path / "missing.pt"), "--images", synth], "--ckpt"),
                        (["--ckpt", ckpt, "--images", str(tmp_path / "nope")], "--images"),
                        (["--ckpt", ckpt, "--images", synth, "--split", "test"], "split 'test' not in"),
                        (["--ckpt", ckpt, "--images", str(tmp_path)], "no images found"),
                        (["--ckpt", ckpt, "--images", synth, "--topk", "0"], "--topk")]:
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# the page in a real browser


class WebDriver:
    """The few W3C WebDriver commands the test needs, as JSON over HTTP to chromedriver."""
    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, url, profile):
        self.url, self.sid = url, None
        opts = {"binary": CHROMIUM, "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]}
        self.sid = self.cmd("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": opts}}})["sessionId"]

    def cmd(self, method, path, body=None):
        path = path if self.sid is None else f"/session/{self.sid}{path}"
        req = urllib.request.Request(self.url + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def type(self, css, text):
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear", {})
        if text:
            self.cmd("POST", f"/element/{el}/value", {"text": text})

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def wait(self, script, timeout=20):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while not (value := self.js("return " + script)):
            assert time.time() < deadline, f"timed out waiting for {script}"
            time.sleep(0.1)
        return value

    def screenshot(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))
        print(f"screenshot: {path}")
        return path

    def quit(self):
        if self.sid:
            with contextlib.suppress(Exception):
                self.cmd("DELETE", "")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser(tmp_path):
    port = free_port()
    driver_proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    wd = None
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 20
        while True:  # chromedriver answers /status once it listens
            with contextlib.suppress(OSError):
                if get(url + "/status")[1]["value"]["ready"]:
                    break
            assert driver_proc.poll() is None and time.time() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        wd = WebDriver(url, tmp_path / "chromium-profile")  # a fresh profile every run
        yield wd
    finally:
        if wd is not None:
            wd.quit()
        driver_proc.kill()
        driver_proc.wait(timeout=10)


@pytest.mark.skipif(not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER),
                    reason=f"needs Debian's chromium + chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                           "apt-get install -y chromium chromium-driver (.ci/run does)")
def test_page_in_headless_chromium(ckpt, synth, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with demo_process("--ckpt", ckpt, "--images", synth, "--cache", str(tmp_path / "c.npz"), "--quiet") as (url, _), \
            demo_thread(demo.build(str(bad), synth, cache=None)) as bad_url, browser(tmp_path) as wd:
        wd.cmd("POST", "/url", {"url": url + "/"})
        assert "128 images" in wd.wait("document.getElementById('status').textContent.includes('images') && "
                                       "document.getElementById('status').textContent")

        # a caption -> 8 images with their scores, every image actually decoded by the browser
        wd.type("#q", "a red star at the top")
        wd.click("#search")
        n = wd.wait("document.querySelectorAll('#results figure').length")
        assert n == 8
        wd.wait("[...document.querySelectorAll('#results img')].every(im => im.complete && im.naturalWidth == 32)")
        scores = [float(s) for s in wd.js("return [...document.querySelectorAll('#results .score')]"
                                          ".map(s => s.textContent)")]
        assert len(scores) == 8 and scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert wd.js("return document.getElementById('error').textContent") == ""
        png = wd.screenshot(os.path.join(ARTIFACTS, "demo_search.png"))
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 500

        # clicking a result -> its best-matching texts
        wd.click("#results figure")
        assert wd.wait("document.querySelectorAll('#texts li').length") == 8
        assert re.match(r"image #\d+", wd.js("return document.querySelector('#picked h3').textContent"))

        # bad input -> the friendly line on the page, the results left as they were
        wd.type("#q", "")
        wd.click("#search")
        assert "type a caption" in wd.wait("document.getElementById('error').textContent")
        assert wd.js("return document.querySelectorAll('#results figure').length") == 8
        wd.type("#img", "9999")
        wd.click("#pick")
        assert "no image #9999: pick a number from 0 to 127" in wd.wait(
            "document.getElementById('error').textContent.includes('9999') && "
            "document.getElementById('error').textContent")

        # a corrupt checkpoint: the page says so at once, and again on a search
        wd.cmd("POST", "/url", {"url": bad_url + "/"})
        assert f"cannot use checkpoint {bad}: " in wd.wait("document.getElementById('error').textContent")
        assert "128 images" in wd.js("return document.getElementById('status').textContent")
        wd.type("#q", "a red star")
        wd.click("#search")
        assert "cannot use checkpoint" in wd.wait("document.getElementById('error').textContent")
        assert "Traceback" not in wd.js("return document.body.textContent")
        wd.screenshot(os.path.join(ARTIFACTS, "demo_bad_checkpoint.png"))
