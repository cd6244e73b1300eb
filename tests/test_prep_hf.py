"""prep_dataset.py's hub sources, offline: `hf` on `datasets` folders made here, and text-to-image-2m from a local
HTTP server laid out like the hub (HF_ENDPOINT), with a token, a 429 and a connection cut mid-file."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import numpy as np
import pytest
from PIL import Image

import prep_dataset as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = re.compile(r"(train|val)-\d{6}\.tar")


def jpeg(i, size=24, noise=False):
    """Image i: a colour you can read back after the resize (or noise, which decodes slower)."""
    if noise:
        a = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(a)
    else:
        img = Image.new("RGB", (size, size), (8 * i % 256, 255 - 8 * i % 256, 100))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_dataset(n, bad_image=(), empty_caption=(), noise=False):
    images = [{"bytes": b"not an image" if i in bad_image else jpeg(i, 96 if noise else 24, noise), "path": None}
              for i in range(n)]
    captions = ["" if i in empty_caption else f"caption {i}" for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)


def save(ds, folder, layout):
    """`layout` "parquet": the hub's layout (data/<split>-*.parquet); "saved": save_to_disk."""
    if layout == "parquet":
        os.makedirs(os.path.join(folder, "data"), exist_ok=True)
        ds.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    else:
        ds.save_to_disk(folder)
    return str(folder)


def hf(name, out, *extra):
    return ["hf", "--name", str(name), "--out", str(out), "--img_size", "16", "--shard_size", "4", "--val_frac",
            "0.2", "--vocab_size", "300", "--workers", "1", "--quiet", *extra]


def samples(out):
    """{json id: (caption, json, first pixel)} over both splits, checking index.json against the tars."""
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    found = {}
    for split in ("train", "val"):
        for name, size in zip(index[split]["shards"], index[split]["shard_sizes"]):
            with tarfile.open(os.path.join(out, name)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            keys = sorted({n.split(".")[0] for n in members})
            assert len(keys) == size
            for k in keys:
                meta = json.loads(members[f"{k}.json"])
                assert meta["id"] not in found  # every sample once
                pixel = Image.open(io.BytesIO(members[f"{k}.jpg"])).getpixel((8, 8))
                found[meta["id"]] = (members[f"{k}.txt"].decode(), meta, pixel)
    assert len(found) == index["train"]["num_samples"] + index["val"]["num_samples"]
    return index, found


def shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if SHARD.fullmatch(f)}


def fails(capsys, argv, *words):
    """prep_dataset.main(argv) stops with exit 2 and one line holding `words`, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error: " in line and all(w in line for w in words), err
    return line


# ----------------------------------------------------------------------------- hf: local `datasets` folders

@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """30 records, image 5 undecodable and caption 11 empty, as parquet and as save_to_disk."""
    root = tmp_path_factory.mktemp("hf")
    ds = image_dataset(30, bad_image={5}, empty_caption={11})
    return {layout: save(ds, root / layout, layout) for layout in ("parquet", "saved")}


def test_hf_counts_and_every_sample_once(local, tmp_path):
    P.main(hf(local["parquet"], tmp_path / "a"))
    index, found = samples(tmp_path / "a")
    assert index["skipped"] == {"decode_error": 1, "empty_caption": 1}
    # val: positions 4, 9, ..., 29 (every 5th); the two bad records (5, 11) are training positions
    assert (index["train"]["num_samples"], index["val"]["num_samples"]) == (22, 6)
    assert sorted(found, key=int) == [str(i) for i in range(30) if i not in (5, 11)]
    for i, (txt, meta, pixel) in found.items():
        assert txt == f"caption {i}" and meta["source"] == "hf"
        assert np.abs(np.subtract(pixel, (8 * int(i) % 256, 255 - 8 * int(i) % 256, 100))).max() < 12  # its image
    assert index["source"] == "hf" and index["hub"] == {
        "id": os.path.abspath(local["parquet"]), "revision": index["hub"]["revision"], "config": None, "split": "train",
        "image_column": "image", "caption_column": "caption"}
    settings = json.load(open(tmp_path / "a" / ".prep_state.json"))["settings"]
    assert settings["hub_revision"].startswith("local-") and settings["hub_caption_column"] == "caption"

    P.main(hf(local["saved"], tmp_path / "b"))  # save_to_disk: the same rows, so the same shards
    assert shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "a") and len(shard_bytes(tmp_path / "a")) == 8


def test_hf_list_captions_and_labels(tmp_path):
    """A list of captions: the first non-empty one trains, the others go to json extra_captions; a ClassLabel goes
    to json label and index.json classes (-1, `datasets`' "no label", is left out)."""
    features = datasets.Features({"img": datasets.Image(), "texts": datasets.List(datasets.Value("string")),
                                  "kind": datasets.ClassLabel(names=["warm", "cold"])})
    rows = {"img": [{"bytes": jpeg(i), "path": None} for i in range(4)],
            "texts": [["a one", "b one"], ["", " second only "], [], ["x", "", "y"]], "kind": [1, 0, 1, -1]}
    name = save(datasets.Dataset.from_dict(rows, features=features), tmp_path / "ds", "parquet")
    P.main(hf(name, tmp_path / "o", "--val_frac", "0"))
    index, found = samples(tmp_path / "o")
    assert index["skipped"] == {"empty_caption": 1} and index["classes"] == ["warm", "cold"]
    assert {i: (t, m.get("extra_captions"), m.get("label")) for i, (t, m, _) in found.items()} == {
        "0": ("a one", ["b one"], 1), "1": ("second only", None, 0), "3": ("x", ["y"], None)}


def test_hf_restart_after_kill_gives_the_same_shards(tmp_path):
    """A run killed (SIGKILL) after its first shards, then run again: the same shards, index and tokenizer as a run
    never interrupted; every record once."""
    name = save(image_dataset(400, bad_image={17}, noise=True), tmp_path / "ds", "parquet")
    argv = lambda out: hf(name, out, "--shard_size", "10")
    P.main(argv(tmp_path / "whole"))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prep_dataset.py"), *argv(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state, t0 = out / ".prep_state.json", time.time()
    try:
        while time.time() - t0 < 120 and proc.poll() is None:
            try:
                if len(json.loads(state.read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError):  # not written yet
                pass
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(json.loads(state.read_text())["shards"])
    assert 2 <= done < 40 and not (out / "index.json").exists()  # killed mid-run (of 40 shards)

    P.main(argv(out))
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    for f in ("index.json", "tokenizer.json"):
        assert (out / f).read_text() == (tmp_path / "whole" / f).read_text()
    index, found = samples(out)
    assert index["skipped"] == {"decode_error": 1} and sorted(found, key=int) == [str(i) for i in range(400) if i != 17]


def test_hf_stream_that_breaks_is_one_line_and_the_rerun_completes(local, tmp_path, capsys, monkeypatch):
    """The stream raising mid-run (the hub dropping it past `datasets`' retries): one line, exit 2, no index.json;
    the same command afterwards gives the shards of a run that never broke."""
    P.main(hf(local["parquet"], tmp_path / "whole"))
    undecoded = P.undecoded

    def breaks(ds, column):
        for i, row in enumerate(undecoded(ds, column)):
            if i == 13:
                raise OSError("connection reset by peer\n(more lines)")
            yield row
    monkeypatch.setattr(P, "undecoded", breaks)
    fails(capsys, hf(local["parquet"], tmp_path / "o"), "record 13 could not be read (OSError: connection reset by "
          "peer)", "run the same command to continue")
    assert not (tmp_path / "o" / "index.json").exists()
    monkeypatch.setattr(P, "undecoded", undecoded)
    P.main(hf(local["parquet"], tmp_path / "o"))
    assert shard_bytes(tmp_path / "o") == shard_bytes(tmp_path / "whole")


def test_hf_refuses_a_changed_source(tmp_path, capsys):
    name = save(image_dataset(8), tmp_path / "ds", "parquet")
    P.main(hf(name, tmp_path / "o"))
    save(image_dataset(9), tmp_path / "ds", "parquet")  # one more row: another revision
    line = fails(capsys, hf(name, tmp_path / "o"), "hub_revision local-", "--overwrite")
    assert "other settings" in line
    P.main(hf(name, tmp_path / "o", "--overwrite"))
    assert len(samples(tmp_path / "o")[1]) == 9


def test_hf_bad_input_is_one_line(local, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    fails(capsys, hf(local["parquet"], out, "--caption_column", "nope"), "'nope' is not a column")
    fails(capsys, hf(local["parquet"], out, "--caption_column", "image"), "holds Image", "not text")
    fails(capsys, hf(local["parquet"], out, "--image_column", "caption"), "holds Value", "not images")
    two = save(image_dataset(2).add_column("title", ["t0", "t1"]), tmp_path / "two", "parquet")
    fails(capsys, hf(two, out), "which column holds the caption? several (caption, title)")
    fails(capsys, hf(local["parquet"], out, "--split", "validation"), "validation")
    fails(capsys, hf("./no/such/folder", out), "no such folder, and not a hub id")
    fails(capsys, hf("nobody/nothing", out), "nobody/nothing")  # HF_HUB_OFFLINE (conftest): `datasets` says it

    # with the hub "online" (a local server, or nothing at all): our own question to the API comes first
    with hub_server({}) as url:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(P, "HTTP_WAIT", 0.0)
        fails(capsys, hf("nobody/nothing", out), "no such hub dataset on " + url, "HTTP 404", "HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", closed_port())
    fails(capsys, hf("nobody/nothing", out), "HF_ENDPOINT http://127.0.0.1:", "cannot be reached")
    assert not os.path.exists(out) or not os.listdir(out)


# ----------------------------------------------------------------------------- text-to-image-2m from a local "hub"

SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_secret_token_for_the_test"


def t2i_tars(n_files=3, per_file=6):
    """{repo path: tar bytes} like text-to-image-2M: <key>.jpg + <key>.json {"prompt": ...}."""
    files = {}
    for t in range(n_files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_file):
                for ext, data in [("jpg", jpeg(10 * t + i, 64, noise=True)),
                                  ("json", json.dumps({"prompt": f"prompt {t}.{i}"}).encode())]:
                    info = tarfile.TarInfo(f"{t:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files[f"data_512_2M/data_{t:06d}.tar"] = buf.getvalue()
    return files


class hub_server:
    """A ThreadingHTTPServer on a free loopback port answering like the hub: the API listing (unless listing=False),
    /datasets/<repo>/resolve/<rev>/<path> as a redirect to /cdn/<path> (a signed storage URL on the real hub),
    which serves byte ranges. `plan` {path: ["429" | ("cut", n bytes)]} spoils the first requests of a file.
    Requests are logged as (time, path, Range, Authorization)."""

    def __init__(self, files, plan=None, token=None, listing=True):
        self.files, self.plan, self.token, self.listing, self.log = files, plan or {}, token, listing, []

    def __enter__(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization")
                hub.log.append((time.time(), self.path, self.headers.get("Range"), auth))
                authorized = hub.token is None or auth == f"Bearer {hub.token}"
                api = f"/api/datasets/{P.T2I_REPO}/revision/main?blobs=true"
                resolve = re.fullmatch(rf"/datasets/{P.T2I_REPO}/resolve/(\w+)/(.+)", self.path)
                if self.path == api and hub.listing:
                    if not authorized:
                        return self.send_error(401)
                    siblings = [{"rfilename": "README.md", "size": 10}, {"rfilename": "data_1024_10K/data_000000.tar"}]
                    siblings += [{"rfilename": n, "size": len(b), "lfs": {"sha256": f"sha-{n}"}}
                                 for n, b in hub.files.items()]
                    return self.reply(200, json.dumps({"sha": SHA, "siblings": siblings}).encode())
                if resolve and resolve.group(2) in hub.files:
                    if not authorized:
                        return self.send_error(401)
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{resolve.group(2)}?signature=xyz")
                    self.end_headers()
                    return
                path = self.path.split("?")[0].removeprefix("/cdn/")
                if not self.path.startswith("/cdn/") or path not in hub.files:
                    return self.send_error(404)
                if auth is not None:  # a token must not follow the redirect to storage
                    return self.send_error(400, "Authorization header sent to the storage URL")
                spoil = hub.plan.get(path, [])
                how = spoil.pop(0) if spoil else None
                if how == "429":
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = hub.files[path], 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start = int(m.group(1))
                self.send_response(206 if m else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{path}"')
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if how and how[0] == "cut":  # the connection drops after n bytes
                    self.wfile.write(data[start:how[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def reply(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def closed_port():
    """An http URL on a loopback port nothing listens on (bound, then closed)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def t2i(out, *extra):
    return ["text-to-image-2m", "--out", str(out), "--img_size", "16", "--shard_size", "4", "--val_frac", "0.2",
            "--vocab_size", "300", "--workers", "1", "--quiet", *extra]


def test_t2i_through_a_hub_mirror_with_token_429_and_a_cut(tmp_path, monkeypatch, capsys, recwarn):
    """HF_ENDPOINT at a local server, HF_TOKEN set: the tars come from the repo's listing (README and the 1024 px
    part left out), the token goes with every request to the endpoint and never to the storage URL, a 429 waits its
    Retry-After, a connection cut mid-file goes on at the byte where it broke; the shards equal a run on the same
    tars as local files, network_error 0, and the token is nowhere on disk or in the output."""
    files = t2i_tars()
    cut = len(files["data_512_2M/data_000001.tar"]) // 2 + 123  # not on a 512-byte block
    local = []
    for n, b in files.items():
        local.append(tmp_path / os.path.basename(n))
        local[-1].write_bytes(b)
    P.main(t2i(tmp_path / "local", "--data_files", *map(str, local)))

    server = hub_server(files, {"data_512_2M/data_000000.tar": ["429"], "data_512_2M/data_000001.tar": [("cut", cut)]},
                        token=TOKEN)
    with server as url:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", url + "/")  # a trailing slash as users write it
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(P, "HTTP_WAIT", 0.01)
        capsys.readouterr()
        P.main(t2i(tmp_path / "hub"))
    printed = capsys.readouterr()

    index = json.load(open(tmp_path / "hub" / "index.json"))
    assert index["skipped"] == {} and "network_error" not in index["skipped"]
    assert shard_bytes(tmp_path / "hub") == shard_bytes(tmp_path / "local")  # every sample once, as from disk
    assert index["data_files"] == [f"{url}/datasets/{P.T2I_REPO}/resolve/{SHA}/{n}" for n in files]
    assert index["hub"] == {"id": P.T2I_REPO, "revision": SHA, "listing": "hub"}
    assert index["data_files_taken"] == [6, 6, 6] and "3 data files listed by" in printed.out

    log = server.log
    to_endpoint = [auth for _, path, _, auth in log if not path.startswith("/cdn/")]
    assert to_endpoint and all(auth == f"Bearer {TOKEN}" for auth in to_endpoint)
    assert all(auth is None for _, path, _, auth in log if path.startswith("/cdn/"))
    f0 = [(t, rng) for t, path, rng, _ in log if path.startswith("/cdn/data_512_2M/data_000000.tar")]
    assert len(f0) == 2 and f0[1][0] - f0[0][0] >= 0.95 and f0[1][1] is None  # the 429 waited its Retry-After
    f1 = [rng for _, path, rng, _ in log if path.startswith("/cdn/data_512_2M/data_000001.tar")]
    assert f1 == [None, f"bytes={cut}-"]  # resumed at the byte where the connection broke

    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "hub").iterdir())
    said = printed.out + printed.err + "".join(str(w.message) for w in recwarn)
    assert TOKEN.encode() not in on_disk and TOKEN not in said


def test_t2i_listing_fallback_and_unreachable(tmp_path, monkeypatch, capsys):
    """A mirror without the API (404 on the listing): the fixed list of 47, said in a warning; the 45 names it does
    not serve are final 404s (no retry), counted as network_error. No token set: no Authorization header. A token
    the hub refuses, an endpoint nothing listens on, or HF_HUB_OFFLINE, is one line (exit 2)."""
    files = t2i_tars(n_files=2, per_file=3)
    server = hub_server(files, listing=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(P, "HTTP_WAIT", 0.0)
    fails(capsys, t2i(tmp_path / "off"), "HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with server as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.warns(UserWarning, match="did not list the repo.*HTTP 404.*fixed list of 47 files"):
            P.main(t2i(tmp_path / "o", "--val_frac", "0"))
    index = json.load(open(tmp_path / "o" / "index.json"))
    assert index["hub"] == {"id": P.T2I_REPO, "revision": None, "listing": "fixed"}
    assert len(index["data_files"]) == 47 and index["data_files"][0] == \
        f"{url}/datasets/{P.T2I_REPO}/resolve/main/data_512_2M/data_000000.tar"
    assert index["train"]["num_samples"] == 6 and index["skipped"] == {"network_error": 45}
    assert all(auth is None for *_, auth in server.log)
    assert sum(p.startswith(f"/datasets/{P.T2I_REPO}/resolve/main/data_512_2M/data_000046") for _, p, _, _ in
               server.log) == 1  # a 404 is not asked again

    with hub_server(files, token=TOKEN) as url:  # a token the hub does not take: the listing's 401 stops the run
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        fails(capsys, t2i(tmp_path / "x"), "refused to list", "HTTP 401", "check HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", closed_port())
    fails(capsys, t2i(tmp_path / "x"), "HF_ENDPOINT http://127.0.0.1:", "cannot be reached")
