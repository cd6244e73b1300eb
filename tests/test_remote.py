"""Shard folders at a URL: a local HTTP server (a thread of this process, which cuts one connection off mid-shard)
and a stand-in for s3:// give the batches and the trained weights of the same shards read from disk, through a
cache that stays within its bound and is emptied; a bad URL is one line and exit 2. Never the network."""

import functools
import http.server
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint_manager as cm
import dataloader
import eval_zeroshot
import train
from dataloader import ShardLoader


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of the files under `folder` at /set/..., honouring "Range: bytes=N-" (as S3 and nginx do). The first GET of
    each name in `cut` sends half of the file, then the connection closes. `log`: (name, first byte) per request."""

    def __init__(self, *args, folder, cut, log, **kw):
        self.folder, self.cut, self.log = folder, cut, log
        super().__init__(*args, **kw)

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.removeprefix("/set/")
        path = os.path.join(self.folder, name)
        if not self.path.startswith("/set/") or not os.path.isfile(path):
            return self.send_error(404)
        with open(path, "rb") as f:
            data = f.read()
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        self.log.append((name, start))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if name in self.cut:
            self.cut.discard(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.close_connection = True  # the client sees the connection end before Content-Length
            return
        self.wfile.write(data[start:])


@pytest.fixture
def serve():
    """serve(folder, cut=()) -> (URL of the folder, request log); servers stop after the test."""
    servers = []

    def start(folder, cut=()):
        log = []
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, folder=folder,
                                                                                   cut=set(cut), log=log))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/set", log

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    """Every test's shard cache under its tmp_path; what a test leaves there is a leak."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CLIP_SHARD_CACHE", str(root))
    yield root
    assert not root.exists() or os.listdir(root) == []


def argv(data, tmp, run, *extra):
    return ["--data", data, "--preset", "micro", "--batch", "32", "--epochs", "1", "--max_lr", "3e-3", "--workers", "1",
            "--eval_every", "0", "--ckpt_every", "4", "--out", str(tmp / "out"), "--log_dir", str(tmp / "logs"),
            "--run_name", run, "--quiet", *extra]


def test_url_shards_give_the_same_batches_through_a_bounded_cache(shards8, serve, capsys):
    url, log = serve(shards8, cut={"train-000005.tar"})
    # windows of 2 of the 8 shards, 8 batches per window, 2 workers
    local = ShardLoader(shards8, "train", batch_size=8, num_workers=2, shuffle_shards=2)
    remote = ShardLoader(url, "train", batch_size=8, num_workers=2, shuffle_shards=2)
    cache = remote.remote
    assert f"train shards from {url}: local cache {cache.dir}, at most {cache.bound} of the 8 shards" in capsys.readouterr().out
    for epoch in range(2):
        n = 0
        for a, b in zip(local, remote):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            n += 1
        assert n == 64 and os.listdir(cache.dir) == []  # every shard deleted after its last batch
    assert 0 < cache.peak_files <= cache.bound < 8  # never the whole set on disk
    assert 64 * 1024 < cache.peak_bytes <= cache.bound * max(os.path.getsize(os.path.join(shards8, f"train-00000{i}.tar"))
                                                            for i in range(8))
    # the cut connection: the download went on from the byte where it stopped
    size = os.path.getsize(os.path.join(shards8, "train-000005.tar"))
    assert ("train-000005.tar", size // 2) in log
    local.close()
    remote.close()
    assert not os.path.exists(cache.dir)


def test_training_from_a_url_gives_the_weights_from_disk(shards8, serve, tmp_path, capsys):
    url, log = serve(shards8, cut={"train-000003.tar"})
    assert train.main(argv(shards8, tmp_path, "disk")) == 0  # 16 steps of 32
    # from the URL, stopped at step 8 and resumed: exact, with a connection cut mid-shard on the way
    assert train.main(argv(url, tmp_path, "url", "--stop_at", "8")) == 0
    assert train.main(argv(url, tmp_path, "url", "--resume", "auto")) == 0
    assert "--resume auto: continuing from" in capsys.readouterr().out
    assert any(name == "train-000003.tar" and start > 0 for name, start in log)
    a = cm.load(str(tmp_path / "out" / "disk" / "ckpt" / "latest.pt"))
    b = cm.load(str(tmp_path / "out" / "url" / "ckpt" / "latest.pt"))
    assert b["step"] == 16 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # eval_zeroshot.py --data URL: the numbers of the same shards on disk
    results = []
    for data in (shards8, url):
        out = tmp_path / f"eval-{len(results)}.json"
        eval_zeroshot.main(["--ckpt", str(tmp_path / "out" / "disk" / "ckpt" / "latest.pt"), "--data", data,
                            "--split", "train", "--workers", "1", "--out", str(out), "--quiet"])
        results.append({k: v for k, v in json.loads(out.read_text()).items() if k != "data"})
    assert results[0] == results[1] and results[0]["i2t_R@1"] > 0


class FakeS3:
    """A stand-in fsspec filesystem for s3:// (no s3fs, no network): s3://bucket/<path> is <root>/<path>."""
    root = None

    def open(self, url, mode="rb"):
        path = os.path.join(self.root, url.removeprefix("s3://bucket/"))
        if not os.path.isfile(path):
            raise FileNotFoundError(url)
        return open(path, mode)


def test_s3_urls_go_through_fsspec(shards8, monkeypatch):
    FakeS3.root = os.path.dirname(shards8)
    monkeypatch.setattr(dataloader, "remote_fs", lambda url: FakeS3())  # what fsspec.filesystem("s3") would give
    url = f"s3://bucket/{os.path.basename(shards8)}"
    for a, b in zip(ShardLoader(shards8, "train", batch_size=64), ShardLoader(url, "train", batch_size=64)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="s3://bucket/nothing/index.json: not found"):
        dataloader.read_index("s3://bucket/nothing", "train")


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.mark.parametrize("data, message", [
    ("http://127.0.0.1:{port}/set", r"http://127\.0\.0\.1:\d+/set/index\.json: cannot read it \(URLError: .*\) after 6 tries"),
    ("{served}/nothing", r"/set/nothing/index\.json: not found \(HTTP 404"),
    ("s3://bucket/set", r"s3://bucket/set/index\.json: reading s3:// needs the package s3fs \(pip install s3fs\)"),
    ("gs://bucket/set", r"reading gs:// needs the package gcsfs \(pip install gcsfs\)"),
])
def test_a_bad_url_is_one_line(shards8, serve, tmp_path, monkeypatch, capsys, data, message):
    monkeypatch.setattr(dataloader, "FETCH_WAIT_S", 0.01)  # the retries' waits, shortened
    for backend in ("s3fs", "gcsfs"):  # missing, even where they are installed (and never the network)
        monkeypatch.setitem(sys.modules, backend, None)
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is its read-only view)
    for scheme in ("s3", "gs"):
        monkeypatch.delitem(registry, scheme, raising=False)
    data = data.format(port=closed_port(), served=serve(shards8)[0])
    for main, args in ((train.main, argv(data, tmp_path, "bad")),
                       (eval_zeroshot.main, ["--ckpt", __file__, "--data", data, "--out", str(tmp_path / "r.json")])):
        if main is eval_zeroshot.main:  # it checks --ckpt first: give it a real file
            args[1] = str(tmp_path / "ckpt.pt")
            torch.save({}, args[1])
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then "<prog>: error: ..."
        errors = [line for line in err if ": error: " in line]
        assert e.value.code == 2 and len(errors) == 1 and re.search(message, errors[0]) and err[-1] == errors[0], err
        assert not any("Traceback" in line for line in err)


def test_a_new_cache_removes_the_folders_of_dead_processes_on_this_host(cache_root):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    for name in (f"{host}-{dead.pid}-killed", f"{host}-{os.getpid()}-alive", f"elsewhere-{dead.pid}-other-node"):
        os.makedirs(cache_root / name / "x")
    cache = dataloader.ShardCache("http://127.0.0.1:9/set")
    assert sorted(os.listdir(cache_root)) == sorted([os.path.basename(cache.dir), f"{host}-{os.getpid()}-alive",
                                                     f"elsewhere-{dead.pid}-other-node"])
    cache.close()
    for name in os.listdir(cache_root):
        shutil.rmtree(cache_root / name)
