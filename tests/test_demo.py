"""demo.py: the JSON API against scores computed here, every endpoint's errors, the embedding cache, the server's
hardening, and the page itself in a real headless Chromium, driven through chromedriver's W3C WebDriver HTTP API
with urllib (no selenium). The browser test also writes the README's screenshot: to tests/artifacts/demo.png, and
to docs/demo.png when UPDATE_DOCS=1 is set (so a plain test run never changes a tracked file)."""
import base64
import contextlib
import http.client
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

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint_manager as cm
import demo
import train
from clip import normalize_images
from eval_zeroshot import TEMPLATES, encode_images, encode_texts
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")  # screenshots of the page, kept for a human to look at
SCREENSHOT = os.path.join(ROOT, "docs" if os.environ.get("UPDATE_DOCS") == "1" else os.path.join("tests", "artifacts"),
                          "demo.png")  # the README's picture of the demo
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1100,1000", "--hide-scrollbars", "--force-device-scale-factor=1"]


@pytest.fixture(scope="module")
def ckpt(synth, tmp_path_factory):
    """A micro checkpoint after 128 steps (~6 s): a real model that already ranks images by colour."""
    tmp = tmp_path_factory.mktemp("demo")
    assert train.main(["--data", synth, "--preset", "micro", "--batch", "16", "--epochs", "4", "--max_lr", "3e-3",
                       "--workers", "0",
                       "--eval_every", "0", "--out", str(tmp / "out"), "--log_dir", str(tmp / "logs"),
                       "--run_name", "r", "--quiet"]) == 0
    return str(tmp / "out" / "r" / "ckpt" / "latest.pt")


@pytest.fixture(scope="module")
def built(ckpt, synth):
    """The demo over the synthetic val split, built once in this process."""
    return demo.build(ckpt, synth, cache=None, quiet=True)


def get(url, headers=None):
    """GET -> (status, parsed JSON or raw bytes)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            status, ctype, body = r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        status, ctype, body = e.code, e.headers["Content-Type"], e.read()
    return status, json.loads(body) if (ctype or "").startswith("application/json") else body


def request(url, method="GET", path="/", body=None, headers=None):
    """Any request with http.client (which lets us lie about Host or Content-Length) -> (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None and "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def png_bytes(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


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
def demo_thread(d, **kw):
    """A Demo served from a thread of this process (for cases that need no model subprocess)."""
    server = demo.make_server(d, quiet=True, **kw)
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
    return model, tok, images, encode_images(model, images), encode_texts(model, tok, texts)


@torch.no_grad()
def patch_tokens_by_hand(model, image):
    """uint8 (3, S, S) -> (1 + g*g, E) normalised: the vision tower written out here, every token through ln_post
    and proj (not only the class token)."""
    v = model.visual
    x = v.patch_embed(normalize_images(image[None])).flatten(2).transpose(1, 2)  # (1, g*g, C)
    x = v.ln_pre(torch.cat([v.cls_token.expand(1, 1, -1), x], 1) + v.pos_embed)  # (1, T, C)
    for block in v.blocks:
        x = block(x)
    return F.normalize(v.proj(v.ln_post(x))[0], dim=-1)  # (T, E)


# -----------------------------------------------------------------------------
# the API over HTTP (runs without Chromium)


def test_api_answers_match_scores_computed_here(ckpt, synth, tmp_path):
    gallery = demo.Gallery(synth, "val")
    texts = [t for t, _ in demo.candidate_texts(gallery)]
    model, tok, pixels, img_emb, txt_emb = expected_embeddings(ckpt, gallery, texts)
    index = json.load(open(os.path.join(synth, "index.json")))
    classes = index["classes"]
    assert texts[:len(classes)] == [demo.articles(f"a photo of a {c}.") for c in classes]
    assert len(texts) == len(classes) + len(set(gallery.captions) - set(texts[:len(classes)]))

    with demo_process("--ckpt", ckpt, "--images", synth, "--topk", "5", "--cache", str(tmp_path / "c.npz"),
                      "--quiet") as (url, _):
        status, info = get(url + "/api/info")
        assert status == 200 and info["images"] == 128 and info["texts"] == len(texts) and info["error"] is None
        assert info["hint"] == gallery.captions[0] and info["labels_hint"] == ", ".join(classes[:4])  # from the data
        assert (info["img_size"], info["grid"]) == (32, 4)

        # the landing grid: pages of 48 items with file name, class and caption
        status, page = get(url + "/api/browse?start=96")
        assert status == 200 and page["total"] == 128 and [r["i"] for r in page["results"]] == list(range(96, 128))
        assert page["results"][0] == {"i": 96, "name": gallery.names[96], "caption": gallery.captions[96],
                                      "label": classes[gallery.labels[96]]} and gallery.names[96].endswith(".jpg")

        # text -> images: the top 5 by cosine similarity, sorted, with the scores computed here
        q = gallery.captions[7]
        status, ans = get(url + "/api/search?q=" + urllib.parse.quote(q))
        want = (img_emb @ encode_texts(model, tok, [q])[0]).numpy()  # (N,)
        got = ans["results"]
        assert status == 200 and ans["query"] == q and len(got) == 5
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
        for r in got:
            assert r["score"] == pytest.approx(want[r["i"]], abs=1e-3)
            assert r["caption"] == gallery.captions[r["i"]] and r["label"] == classes[gallery.labels[r["i"]]]
        assert min(r["score"] for r in got) >= np.sort(want)[-5] - 1e-3  # nothing better was left out

        # image -> images: the 5 nearest other images
        status, ans = get(url + "/api/similar_images?i=7")
        want = (img_emb @ img_emb[7]).numpy()
        want[7] = -2
        assert status == 200 and ans["image"]["i"] == 7 and len(ans["results"]) == 5
        assert [r["i"] for r in ans["results"]] == list(np.argsort(-want, kind="stable")[:5])
        assert all(r["score"] == pytest.approx(want[r["i"]], abs=1e-3) for r in ans["results"])

        # image -> texts: the top 5 candidate texts, and the image's own caption / class marked true
        status, ans = get(url + "/api/similar_texts?i=7")
        want = (txt_emb @ img_emb[7]).numpy()  # (M,)
        own = {gallery.captions[7], demo.articles(f"a photo of a {classes[gallery.labels[7]]}.")}
        assert status == 200 and ans["i"] == 7 and ans["caption"] == gallery.captions[7] and len(ans["results"]) == 5
        for r in ans["results"]:
            assert r["score"] == pytest.approx(want[texts.index(r["text"])], abs=1e-3)
            assert r["true"] == (r["text"] in own)
            assert r["kind"] == ("class" if r["text"] in texts[:len(classes)] else "caption")
        assert min(r["score"] for r in ans["results"]) >= np.sort(want)[-5] - 1e-3

        # typed labels: prompt ensembling by hand (mean of the normalised template embeddings, normalised again)
        labels = ["red star", "blue circle", "apple"]
        status, ans = get(url + "/api/classify?i=7&labels=" + urllib.parse.quote(" red star,blue circle , apple,"))
        prompts = [[t.format(c).replace("a apple", "an apple") for t in TEMPLATES] for c in labels]
        cls_emb = F.normalize(torch.stack([encode_texts(model, tok, p).mean(0) for p in prompts]), dim=-1)  # (3, E)
        cos = cls_emb @ img_emb[7]
        prob = torch.softmax(model.logit_scale.exp() * cos, 0)
        assert status == 200 and ans["labels"] == labels and ans["templates"] == len(TEMPLATES)
        assert [r["label"] for r in ans["results"]] == [labels[k] for k in torch.argsort(-prob)]
        for r in ans["results"]:
            assert r["score"] == pytest.approx(cos[labels.index(r["label"])].item(), abs=1e-3)
            assert r["prob"] == pytest.approx(prob[labels.index(r["label"])].item(), abs=1e-3)

        # the patch heatmap: each patch token (after ln_post and proj) against the text, here by hand
        q = "a red star"
        status, ans = get(url + "/api/heatmap?i=7&q=" + urllib.parse.quote(q))
        tokens = patch_tokens_by_hand(model, pixels[7])  # (17, E)
        text = encode_texts(model, tok, [q])[0]
        assert torch.allclose(tokens[0], img_emb[7], atol=1e-5)  # row 0 is the image embedding itself
        assert status == 200 and ans["grid"] == 4 and ans["query"] == q
        np.testing.assert_allclose(ans["heat"], (tokens[1:] @ text).view(4, 4).numpy(), atol=1e-3)
        assert ans["score"] == pytest.approx((img_emb[7] @ text).item(), abs=1e-3)
        assert (ans["min"], ans["max"]) == (min(map(min, ans["heat"])), max(map(max, ans["heat"])))

        # an upload: image 7 re-encoded as a PNG is decoded to the same pixels, so its best match is image 7
        upload = png_bytes(pixels[7].permute(1, 2, 0).numpy())
        status, _, body = request(url, "POST", "/api/query_image", upload)
        ans = json.loads(body)
        assert status == 200 and (ans["width"], ans["height"]) == (32, 32) and len(ans["texts"]) == 5
        assert ans["images"][0]["i"] == 7 and ans["images"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert ans["texts"] == get(url + "/api/similar_texts?i=7")[1]["results"]
        for path in ("/api/classify?labels=red+star,blue+circle,apple", "/api/heatmap?q=a+red+star"):
            status, _, body = request(url, "POST", path, upload)  # the same answers as for image 7 itself
            assert status == 200 and json.loads(body) == get(url + path.replace("?", "?i=7&"))[1], path

        # the image itself: the shard's JPEG member, byte for byte
        status, body = get(url + "/api/image/7")
        assert status == 200 and body[:2] == b"\xff\xd8" and body == gallery.jpeg(7)


def test_every_endpoint_errors_as_one_json_line(built, monkeypatch):
    """Bad input of every kind -> a 4xx with one friendly line, the security headers on every answer."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, "JPEG")
    cut = out.getvalue()[:len(out.getvalue()) // 2]  # a JPEG cut off mid-file
    big = png_bytes(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))  # ~12 kB
    with demo_thread(built, max_body=len(big) - 1) as url:
        cases = [  # (method, path, body, extra headers, status, words)
            ("GET", "/api/search?q=", None, {}, 400, 'type a caption to search for, e.g. "a red circle at the top"'),
            ("GET", "/api/search", None, {}, 400, "type a caption"),
            ("GET", "/api/search?q=%20%20", None, {}, 400, "type a caption"),
            ("GET", "/api/search?q=" + "a" * 501, None, {}, 400, "501 characters long; at most 500"),
            ("GET", "/api/similar_texts?i=128", None, {}, 404, "no image #128: pick a number from 0 to 127"),
            ("GET", "/api/similar_images?i=-1", None, {}, 404, "no image #-1"),
            ("GET", "/api/similar_images?i=abc", None, {}, 400, "must be an integer, got 'abc'"),
            ("GET", "/api/image/999", None, {}, 404, "no image #999"),
            ("GET", "/api/browse?start=x", None, {}, 400, "start must be an integer"),
            ("GET", "/api/classify?i=3&labels=", None, {}, 400, "type two or more labels, comma-separated, e.g."),
            ("GET", "/api/classify?i=3&labels=%20,%20,", None, {}, 400, "two or more labels"),
            ("GET", "/api/classify?i=3&labels=cat", None, {}, 400, "two or more labels"),
            ("GET", "/api/classify?i=3&labels=" + ",".join(map(str, range(65))), None, {}, 400, "at most 64 labels"),
            ("GET", "/api/classify?i=300&labels=a,b", None, {}, 404, "no image #300"),
            ("GET", "/api/heatmap?i=3&q=", None, {}, 400, "type a caption"),
            ("GET", "/api/heatmap?q=red", None, {}, 400, "the image number must be an integer, got None"),
            ("POST", "/api/query_image", b"not an image at all", {}, 400, "not an image this demo reads"),
            ("POST", "/api/query_image", cut, {}, 400, "could not decode the uploaded image (OSError: "),
            ("POST", "/api/query_image", b"", {}, 400, "the request body is empty"),
            ("POST", "/api/query_image", big, {}, 413, f"the upload is {len(big)} bytes; the demo takes at most"),
            ("POST", "/api/query_image", b"", {"Content-Length": str(10**9)}, 413, "the upload is 1000000000 bytes"),
            ("POST", "/api/query_image", b"", {"Content-Length": "lots"}, 411, "valid Content-Length"),
            ("POST", "/api/query_image", b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}, 411, "chunked bodies"),
            ("POST", "/api/classify?labels=a,b", b"garbage", {}, 400, "not an image this demo reads"),
            ("POST", "/api/classify?labels=a", b"garbage", {}, 400, "two or more labels"),
            ("POST", "/api/heatmap?q=red", b"garbage", {}, 400, "not an image this demo reads"),
            ("GET", "/api/query_image", None, {}, 405, "POST the image's bytes"),
            ("POST", "/api/search?q=x", b"x", {}, 405, "POST is not accepted at /api/search"),
            ("PUT", "/api/info", b"x", {}, 501, "Unsupported method"),
            ("GET", "/nope", None, {}, 404, "no such page"),
            # DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends Host: evil.example
            ("GET", "/", None, {"Host": "evil.example:80"}, 403, "Host 'evil.example:80' is not this server"),
            ("GET", "/api/image/3", None, {"Host": "evil.example"}, 403, "is not this server"),
            ("POST", "/api/query_image", big, {"Host": "evil.example"}, 403, "--allowed_hosts"),
            ("GET", "/api/info", None, {"Host": ""}, 403, "is not this server"),
        ]
        for method, path, body, headers, code, words in cases:
            status, head, raw = request(url, method, path, body, headers)
            ans = json.loads(raw)
            assert status == code and words in ans["error"], (method, path, status, ans)
            assert "Traceback" not in ans["error"] and "\n" not in ans["error"]
            assert head["x-content-type-options"] == "nosniff" and "default-src 'none'" in head["content-security-policy"]
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "10.1.2.3"):  # names a rebinding page cannot use
            assert request(url, "GET", "/api/info", headers={"Host": host})[0] == 200, host
        status, head, page = request(url, "GET", "/")
        csp = head["content-security-policy"]
        assert status == 200 and head["content-type"].startswith("text/html") and b"<script>" in page
        assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
        assert not re.search(rb"(src|href)=\"(https?:)?//", page)  # no external asset: works offline
    monkeypatch.setattr(demo, "MAX_PIXELS", 64 * 64 - 1)  # too many pixels: refused from the header, not decoded
    assert built.query_image(big) == (413, {"error": "the image is 64x64 pixels; the demo decodes at most 4,095"})
    with demo_thread(built, allowed_hosts=["demo.lan"]) as url:
        assert request(url, "GET", "/api/info", headers={"Host": "demo.lan:8000"})[0] == 200
        assert request(url, "GET", "/api/info", headers={"Host": "evil.example"})[0] == 403


def test_silent_connections_time_out_and_threads_are_bounded(built):
    """Idle clients hold at most `threads` threads, each for at most `timeout`; real requests still get answered."""
    before = threading.active_count()
    with demo_thread(built, threads=2, timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]  # half-open: never send a request
        try:
            t0 = time.time()
            status, info = get(url + "/api/info")  # waits for the idle ones to time out, two at a time
            assert status == 200 and info["images"] == 128 and time.time() - t0 < 10
            assert threading.active_count() <= before + 1 + 2  # the accept loop + the pool
            for s in idle:  # each was closed by the server (an answer or EOF), not left hanging
                s.settimeout(5)
                assert s.recv(1024) is not None
        finally:
            for s in idle:
                s.close()


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
        for path in ("/api/search?q=a+red+cube", "/api/similar_images?i=3", "/api/classify?i=3&labels=a,b",
                     "/api/heatmap?i=3&q=red"):
            status, ans = get(url + path)
            assert status == 503 and ans["error"].startswith(f"cannot use checkpoint {bad}: "), path
            assert "Traceback" not in ans["error"] and "\n" not in ans["error"]
        assert request(url, "POST", "/api/query_image", b"\xff\xd8")[0] == 503
        status, body = get(url + "/api/image/3")  # the images are still there, and the landing grid
        assert status == 200 and body[:2] == b"\xff\xd8" and len(get(url + "/api/browse")[1]["results"]) == 48
    assert not os.path.exists(tmp_path / "c.npz")


def test_folder_of_images_with_class_folders(ckpt, tmp_path):
    """A plain folder: class names from the sub-folders, PNGs re-encoded to JPEG for the browser."""
    colours = {"red_thing": (255, 0, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        os.makedirs(tmp_path / "imgs" / name)
        for k in range(2):
            Image.new("RGB", (40, 24), rgb).save(tmp_path / "imgs" / name / f"{k}.png")
    os.makedirs(tmp_path / "imgs" / "empty")
    with pytest.warns(UserWarning, match="1 sub-folder"):
        d = demo.build(ckpt, str(tmp_path / "imgs"), cache=None)
    assert d.gallery.classes == ["blue thing", "red thing"] and d.gallery.labels == [0, 0, 1, 1]
    assert d.gallery.item(2) == {"i": 2, "name": os.path.join("red_thing", "0.png"), "caption": "", "label": "red thing"}
    assert [t for t, _ in d.texts] == ["a photo of a blue thing.", "a photo of a red thing."]
    jpeg = d.gallery.jpeg(2)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (40, 24)
        assert np.abs(np.asarray(im).astype(int) - [255, 0, 0]).max() < 8  # the red image
    status, ans = d.similar_texts(2)
    assert status == 200 and [r["true"] for r in ans["results"] if r["text"] == "a photo of a red thing."] == [True]
    assert sum(r["true"] for r in ans["results"]) == 1
    assert d.similar_images(2)[1]["results"][0]["i"] == 3  # the other red one
    assert d.info()[1]["hint"] == "a blue thing" and d.info()[1]["labels_hint"] == "blue thing, red thing"

    # a transparent PNG upload is put on white by the one decoder, exactly like a white image
    rgba = np.zeros((20, 20, 4), np.uint8)
    white = np.full((20, 20, 3), 255, np.uint8)
    up = lambda a: torch.tensor(d.query_image(png_bytes(a))[1]["images"][0]["score"])
    assert up(rgba) == up(white)

    # a captioned folder (a.jpg + a.txt, images without a .txt still shown): captions are the candidates
    os.makedirs(tmp_path / "capt" / "sub")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "capt" / "sub" / "a.jpg")
    (tmp_path / "capt" / "sub" / "a.txt").write_text("a green square\n")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(tmp_path / "capt" / "b.webp")
    d = demo.build(ckpt, str(tmp_path / "capt"), cache=None)
    assert d.gallery.captions == ["", "a green square"] and d.gallery.classes == [] and d.gallery.labels == [-1, -1]
    assert d.gallery.names == ["b.webp", os.path.join("sub", "a.jpg")] and d.info()[1]["hint"] == "a green square"
    assert d.texts == [("a green square", "caption")]
    assert d.similar_texts(1)[1]["results"][0]["true"] and not d.similar_texts(0)[1]["results"][0]["true"]
    assert d.gallery.jpeg(1)[:2] == b"\xff\xd8" and d.gallery.jpeg(0)[:2] == b"\xff\xd8"


def test_cli_errors_exit_2(ckpt, synth, tmp_path, capsys):
    for argv, words in [(["--ckpt", str(tmp_path / "missing.pt"), "--images", synth], "--ckpt"),
                        (["--ckpt", ckpt, "--images", str(tmp_path / "nope")], "--images"),
                        (["--ckpt", ckpt, "--images", synth, "--split", "test"], "split 'test' not in"),
                        (["--ckpt", ckpt, "--images", str(tmp_path)], "no images found"),
                        (["--ckpt", ckpt, "--images", synth, "--topk", "0"], "--topk"),
                        (["--ckpt", ckpt, "--images", synth, "--threads", "0"], "--threads"),
                        (["--ckpt", ckpt, "--images", synth, "--max_upload_mb", "0"], "--max_upload_mb")]:
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

    def open(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def type(self, css, text):
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear", {})
        if text:
            self.cmd("POST", f"/element/{el}/value", {"text": text})

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, timeout=20):
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while not (value := self.js("return " + script)):
            assert time.time() < deadline, f"timed out waiting for {script}; page error: {self.text('#error')!r}"
            time.sleep(0.05)
        return value

    def text(self, css):
        return self.js("return document.querySelector(arguments[0]).textContent", css)

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


FIGURES = "[...document.querySelectorAll('#results figure')]"
SHOWN = f"{FIGURES}.map(f => +f.querySelector('img').alt.split(' ')[1])"  # the image numbers on screen
LOADED = "[...document.querySelectorAll('#results img')].every(im => im.complete && im.naturalWidth == 32)"


def settled(wd):
    """Wait until no request is under way; returns the error line."""
    wd.wait("document.getElementById('loading').hidden")
    return wd.text("#error")


needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER),
    reason=f"needs Debian's chromium + chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
           "apt-get install -y chromium chromium-driver (.ci/run does)")


@needs_chromium
def test_page_in_headless_chromium(ckpt, synth, built, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with demo_thread(built) as url, demo_thread(demo.build(str(bad), synth, cache=None)) as bad_url, \
            browser(tmp_path) as wd:
        # the landing page: a grid of the collection (48 a page, then "Show more"), hints taken from the data
        wd.open(url + "/")
        assert "128 images" in wd.wait("document.getElementById('status').textContent.includes('images') && "
                                       "document.getElementById('status').textContent")
        assert wd.wait(f"{FIGURES}.length") == 48 and settled(wd) == ""
        assert wd.js("return document.getElementById('q').placeholder") == "e.g. " + built.gallery.captions[0]
        assert wd.js("return document.getElementById('labels').placeholder") == built.info()[1]["labels_hint"]
        wd.click("#more")
        assert wd.wait(f"{FIGURES}.length == 96 && {SHOWN}") == list(range(96))
        first = wd.text("#results figure figcaption")  # file name, class and caption under each image
        assert built.gallery.names[0] in first and built.gallery.item(0)["label"] in first

        # a text query straight from the URL: 8 images with their scores, every image decoded by the browser
        q = "a red circle"
        wd.open(url + "/?q=" + urllib.parse.quote(q))
        assert wd.wait(f"{FIGURES}.length") == 8 and settled(wd) == ""
        wd.wait(LOADED)
        want = [r["i"] for r in built.search(q)[1]["results"]]
        assert wd.js(f"return {SHOWN}") == want and wd.js("return document.getElementById('q').value") == q
        scores = [float(s) for s in wd.js("return [...document.querySelectorAll('#results .score')]"
                                          ".map(s => s.textContent)")]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert wd.js("return document.getElementById('detail').hidden")

        # a click: image -> images (+ its best captions), the query in the URL, the heatmap of the text query
        wd.click("#results figure")
        i = want[0]
        sim = [r["i"] for r in built.similar_images(i)[1]["results"]]
        assert wd.wait(f"{FIGURES}.length == 8 && {SHOWN}.join() == '{','.join(map(str, sim))}'")
        assert wd.wait("document.querySelectorAll('#texts li').length") == 8
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(wd.js("return location.href")).query) == \
            {"i": [str(i)], "q": [q]}
        assert wd.text("#picked-title").startswith(f"image #{i}") and built.gallery.names[i] in wd.text("#picked-meta")
        wd.wait("!document.getElementById('heatmap').hidden")
        heat = np.array(built.heatmap(i, q)[1]["heat"])  # (4, 4)
        cell = wd.js("return document.getElementById('heatmap').width") / 4  # canvas pixels per patch
        red = lambda rc: wd.js("return document.getElementById('heatmap').getContext('2d')"
                               ".getImageData(arguments[0], arguments[1], 1, 1).data[0]",
                               int(rc[1] * cell + cell // 2), int(rc[0] * cell + cell // 2))
        hot, cold = np.unravel_index(heat.argmax(), heat.shape), np.unravel_index(heat.argmin(), heat.shape)
        assert red(hot) > 200 and red(cold) < 60, (heat, red(hot), red(cold))  # the map drawn where the API says
        assert f"\u201c{q}\u201d: image score" in wd.text("#heat-note")

        # typed labels -> zero-shot classification (prompt ensembling on the server), kept in the URL
        wd.type("#labels", "red circle, blue square, green star")
        wd.click("#classify")
        assert wd.wait("document.querySelectorAll('#classes li').length") == 3
        want = built.classify(i, "red circle, blue square, green star")[1]["results"]
        rows = wd.js("return [...document.querySelectorAll('#classes li')].map(li => li.textContent)")
        assert [r.split("% ")[1].split(" cos")[0] for r in rows] == [r["label"] for r in want]
        assert sum(float(r.split("%")[0]) for r in rows) == pytest.approx(100, abs=0.2)
        assert "labels=red+circle" in wd.js("return location.search")
        assert settled(wd) == ""
        wd.screenshot(SCREENSHOT)  # the README's picture: a real (micro, 128-step) model's query
        with Image.open(SCREENSHOT) as im:
            assert im.format == "PNG" and im.size[0] == 1100

        # the back button: the text query's results again, the image panel gone
        wd.cmd("POST", "/back", {})
        assert wd.wait(f"{SHOWN}.join() == '{','.join(map(str, [r['i'] for r in built.search(q)[1]['results']]))}'")
        assert urllib.parse.parse_qs(wd.js("return location.search")[1:]) == {"q": [q]}
        assert wd.js("return document.getElementById('detail').hidden")
        assert wd.js("return document.getElementById('q').value") == q
        wd.cmd("POST", "/forward", {})
        assert wd.wait(f"{SHOWN}.join() == '{','.join(map(str, sim))}'")

        # a new query clears the old panels at once and shows a loading line until its answer comes
        wd.js("window.held = []; window.realFetch = window.fetch;"  # answers wait until the test lets them go
              "window.fetch = (...a) => new Promise((ok) => window.held.push(() => ok(realFetch(...a))));")
        wd.type("#q", "a blue square")
        wd.click("#search")
        assert wd.wait("window.held.length") == 1
        assert wd.js("return [document.getElementById('loading').hidden, document.getElementById('detail').hidden, "
                     "document.querySelectorAll('#results figure, #texts li, #classes li').length]") == [False, True, 0]
        wd.js("window.fetch = window.realFetch; window.held.forEach((go) => go())")
        assert wd.wait(f"{FIGURES}.length") == 8 and settled(wd) == ""

        # an upload (the file input) and a paste: image -> images and texts, then labels and a heatmap for it
        k = 11
        path = tmp_path / "upload.png"
        path.write_bytes(png_bytes(built.gallery.pixels(k, 32).permute(1, 2, 0).numpy()))
        wd.cmd("POST", f"/element/{wd.find('#file')}/value", {"text": str(path)})
        assert wd.wait(f"document.getElementById('picked-title').textContent == 'your image' && {SHOWN}")[0] == k
        assert "upload.png, 32\u00d732 px" in wd.text("#picked-meta") and settled(wd) == ""
        assert wd.js("return document.querySelectorAll('#texts li').length") == 8
        wd.type("#labels", "red circle, blue square")
        wd.click("#classify")
        assert wd.wait("document.querySelectorAll('#classes li').length") == 2
        wd.type("#heat-q", "a green star")
        wd.click("#heat")
        assert wd.wait("document.getElementById('heatmap').dataset.query") == "a green star" and settled(wd) == ""
        wd.open(url + "/")
        wd.wait(f"{FIGURES}.length == 48")
        wd.js("fetch('/api/image/5').then((r) => r.blob()).then((b) => { const dt = new DataTransfer();"
              "dt.items.add(new File([b], 'x.jpg', {type: 'image/jpeg'}));"
              "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt})); });")
        assert wd.wait(f"document.getElementById('picked-title').textContent == 'your image' && {SHOWN}")[0] == 5

        # bad input: one friendly line on the page
        wd.type("#q", "")
        wd.click("#search")
        assert wd.text("#error") == f"type a caption to search for, e.g. \u201c{built.gallery.captions[0]}\u201d"
        wd.type("#img", "9999")
        wd.click("#pick")
        assert "no image #9999: pick a number from 0 to 127" in wd.wait(
            "document.getElementById('error').textContent.includes('9999') && "
            "document.getElementById('error').textContent")
        path.write_bytes(b"not a png")
        wd.cmd("POST", f"/element/{wd.find('#file')}/value", {"text": str(path)})
        assert "not an image this demo reads" in wd.wait("document.getElementById('error').textContent")
        wd.screenshot(os.path.join(ARTIFACTS, "demo_errors.png"))

        # a corrupt checkpoint: the page says so at once, and again on a search
        wd.open(bad_url + "/")
        assert f"cannot use checkpoint {bad}: " in wd.wait("document.getElementById('error').textContent")
        assert "128 images" in wd.text("#status")
        wd.type("#q", "a red star")
        wd.click("#search")
        assert "cannot use checkpoint" in wd.wait("document.getElementById('error').textContent")
        assert "Traceback" not in wd.js("return document.body.textContent")
