"""ShardLoader on tiny shards written here: coverage per epoch, determinism, ranks, resume, fields, bad data."""

import io
import json
import multiprocessing
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader import ShardLoader, map_file, scan_tar, tar_members
from tokenizer import Tokenizer

S = 16  # image size of the test shards


def add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def jpeg(sid):
    rng = np.random.default_rng(sid)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_data(root, shard_sizes=(10, 10, 10, 10, 10, 10), val_sizes=(7,), labels=False, extra=None):
    """Shards of samples with ids 0..N-1: jpg, txt, json (long/short captions, label), sid.npy (float32 id),
    teacher.npy (float16 (4,)). Returns the dict id -> sample fields."""
    os.makedirs(root, exist_ok=True)
    samples, index, sid = {}, {"img_size": S, "source": "test"}, 0
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        names = []
        for k, n in enumerate(sizes):
            names.append(f"{split}-{k:06d}.tar")
            with tarfile.open(os.path.join(root, names[-1]), "w") as tf:
                for _ in range(n):
                    key = f"{sid:09d}"
                    s = {"jpg": jpeg(sid), "txt": f"a photo of thing {sid}",
                         "json": {"short": f"thing {sid}", "long": f"a long caption about thing {sid} " * 2,
                                  **({"label": sid % 3} if labels else {})},
                         "teacher": np.random.default_rng(sid).standard_normal(4).astype(np.float16)}
                    samples[sid] = s
                    add(tf, f"{key}.jpg", s["jpg"])
                    add(tf, f"{key}.txt", s["txt"].encode())
                    add(tf, f"{key}.json", json.dumps(s["json"]).encode())
                    for field, arr in (("sid", np.float32(sid)), ("teacher", s["teacher"])):
                        b = io.BytesIO()
                        np.save(b, arr)
                        add(tf, f"{key}.{field}.npy", b.getvalue())
                    sid += 1
                for name, data in (extra or {}).get(names[-1], []):
                    add(tf, name, data)
        index[split] = {"shards": names[::-1], "num_samples": sum(sizes)}  # unsorted on purpose
    if labels:
        index["classes"] = ["a", "b", "c"]
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    captions = [t for s in samples.values() for t in (s["txt"], s["json"]["short"], s["json"]["long"])]
    Tokenizer().train(captions, vocab_size=300, quiet=True).save(os.path.join(root, "tokenizer.json"))
    return samples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    return root, write_data(root)


def ids(batches):
    return [int(i) for b in batches for i in b["sid"]]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_every_sample_once_in_order_and_shuffled(data):
    root, samples = data
    val = ShardLoader(root, "val", batch_size=3)  # not shuffled, keeps the last partial batch
    assert len(val) == 3 and ids(val) == list(range(60, 67))
    train = ShardLoader(root, "train", batch_size=7, drop_last=False)
    got = ids(train)
    assert len(train) == 9 and sorted(got) == list(range(60)) and got != list(range(60))
    train = ShardLoader(root, "train", batch_size=8)  # drop_last by default for train: 7 x 8 = 56 of 60
    batches = list(train)
    assert len(train) == len(batches) == 7 and all(len(b["sid"]) == 8 for b in batches)
    order = train.epoch_order(0)  # the 4 dropped samples are the epoch's last 4
    got = ids(batches)
    assert len(set(got)) == 56 and set(got) | {int(s) * 10 + int(i) for s, i in order[56:]} == set(range(60))


def test_shuffle_window_mixes_shards(data):
    root, _ = data
    loader = ShardLoader(root, "train", batch_size=10, shuffle_shards=2)
    first = ids([next(iter(loader))])  # one batch from a window of 2 shards: ids from exactly those 2
    assert len({i // 10 for i in first}) == 2
    loader.close()


def test_order_depends_only_on_seed_and_epoch(data):
    root, _ = data
    a = ShardLoader(root, "train", batch_size=6, seed=1)
    e0, e1 = list(a), list(a)
    assert a.state_dict() == {"epoch": 2, "batch": 0, "seed": 1, "bad": []}
    assert ids(e0) != ids(e1) and sorted(ids(e0)) == sorted(ids(e1))
    b = ShardLoader(root, "train", batch_size=6, seed=1, num_workers=2, prefetch=2)
    assert same(list(b), e0)  # bitwise equal with 2 workers
    workers = [p.pid for p, _, _ in b.workers]
    assert same(list(b), e1) and [p.pid for p, _, _ in b.workers] == workers  # the same processes: persistent
    b.close()
    assert ids(ShardLoader(root, "train", batch_size=6, seed=2)) != ids(e0)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_disjoint_equal_and_complete(data, drop_last):
    root, _ = data
    ranks = [ShardLoader(root, "train", batch_size=7, rank=r, world_size=2, drop_last=drop_last, seed=3)
             for r in range(2)]
    got = [ids(r) for r in ranks]
    n = 4 if drop_last else 5  # 60 = 4 global batches of 14 + 4 (kept as 2 + 2 when drop_last=False)
    assert len(ranks[0]) == len(ranks[1]) == n and len(got[0]) == len(got[1])
    assert not set(got[0]) & set(got[1])
    order = ranks[0].epoch_order(0)
    used = 56 if drop_last else 60
    assert set(got[0]) | set(got[1]) == {int(s) * 10 + int(i) for s, i in order[:used]}


def test_resume_mid_epoch_is_bitwise_identical(data):
    root, _ = data
    full = list(ShardLoader(root, "train", batch_size=5, seed=7, augment=True))
    a = ShardLoader(root, "train", batch_size=5, seed=7, augment=True, num_workers=2)
    head = []
    for batch in a:
        head.append(batch)
        if len(head) == 4:
            break
    state = a.state_dict()
    assert state == {"epoch": 0, "batch": 4, "seed": 7, "bad": []}
    assert same(head + list(a), full)  # the same workers carry on after an abandoned iteration
    a.close()
    assert not multiprocessing.active_children()
    b = ShardLoader(root, "train", batch_size=5, seed=0, augment=True)
    b.load_state_dict(state)
    assert same(head + list(b), full) and b.state_dict() == {"epoch": 1, "batch": 0, "seed": 7, "bad": []}


def test_fields_round_trip(data):
    root, samples = data
    tok = Tokenizer.load(os.path.join(root, "tokenizer.json"))
    batch = next(iter(ShardLoader(root, "train", batch_size=6, context_length=32, long_captions=True)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, S, S)
    assert batch["teacher"].dtype == torch.float32 and "label" not in batch
    for j, sid in enumerate(ids([batch])):
        s = samples[sid]
        pixels = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(batch["image"][j].numpy(), pixels)
        assert np.array_equal(batch["teacher"][j].numpy().astype(np.float16), s["teacher"])  # exact float16
        assert torch.equal(batch["text"][j], tok.tokenize(s["json"]["long"], 32)[0])
        assert torch.equal(batch["text_short"][j], tok.tokenize(s["json"]["short"], 32)[0])
    plain = next(iter(ShardLoader(root, "val", batch_size=2)))
    assert torch.equal(plain["text"][0], tok.tokenize("a photo of thing 60", 77)[0]) and "text_short" not in plain


def test_labels_when_classes_listed(tmp_path):
    write_data(str(tmp_path), shard_sizes=(5,), val_sizes=(4,), labels=True)
    batch = next(iter(ShardLoader(str(tmp_path), "val", batch_size=4)))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [i % 3 for i in range(5, 9)]


def test_truncated_shard_and_unsafe_members(tmp_path):
    root = str(tmp_path)
    evil = [("../evil.txt", b"x"), ("/abs.txt", b"y"), ("000000099.txt", b"no image")]
    write_data(root, shard_sizes=(10, 10), extra={"train-000001.tar": evil})
    path = os.path.join(root, "train-000000.tar")
    with tarfile.open(path) as tf:
        cut = tf.getmember("000000008.jpg").offset_data + 10  # inside sample 8's image
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.warns(UserWarning, match=r"2 shard\(s\).*000000.tar: 1 members skipped.*000001.tar: 2 members skipped"):
        loader = ShardLoader(root, "train", batch_size=19, drop_last=False, num_workers=2)
    # key 99 (a caption without an image) is a sample position, replaced by a good sample of its own shard
    got = ids(loader)
    assert loader.num_samples == 19 and len(got) == 19 and set(got) == set(range(8)) | set(range(10, 20))
    assert 10 <= max(set(got), key=got.count) < 20  # the one duplicate comes from shard 1
    assert loader.pop_epoch_report() == {"epoch": 0, "skipped": {"missing_image": 1}}
    assert loader.pop_epoch_report() is None
    loader.close()


def test_augment_is_deterministic(data):
    root, _ = data
    kw = dict(batch_size=6, seed=5, shuffle=False)
    a = next(iter(ShardLoader(root, "val", augment=True, **kw)))
    b = next(iter(ShardLoader(root, "val", augment=True, num_workers=2, **kw)))
    plain = next(iter(ShardLoader(root, "val", **kw)))
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (6, 3, S, S)
    assert not torch.equal(a["image"], plain["image"]) and torch.equal(a["text"], plain["text"])


def test_workers_cleaned_up_on_errors(tmp_path):
    root = str(tmp_path)
    write_data(root, shard_sizes=(10, 10))
    loader = ShardLoader(root, "train", batch_size=4, num_workers=2)
    os.remove(os.path.join(root, "train-000001.tar"))  # a worker fails to read it mid-epoch
    with pytest.raises(RuntimeError, match="worker failed"):
        list(loader)
    assert not multiprocessing.active_children()
    loader = ShardLoader(root, "val", batch_size=2, num_workers=2)
    it = iter(loader)
    next(it)
    assert len(multiprocessing.active_children()) == 2
    del it, loader
    assert not multiprocessing.active_children()


def test_bad_arguments(tmp_path, data):
    root, _ = data
    with pytest.raises(ValueError, match="does not exist"):
        ShardLoader(str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match=r"split 'test' not in .*\['train', 'val'\]"):
        ShardLoader(root, "test")
    with pytest.raises(ValueError, match="batch_size 40 x world_size 2 = 80 is larger than the 60 samples"):
        ShardLoader(root, "train", batch_size=40, world_size=2)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile(tmp_path, fmt):
    path = str(tmp_path / "t.tar")
    names = ["a.txt", "d" * 90 + "/" + "k" * 60 + ".jpg"] + ([] if fmt == tarfile.USTAR_FORMAT else
                                                             ["x" * 120 + ".json", "café/ü.txt"])
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, name in enumerate(names):
            add(tf, name, bytes(range(i * 300 % 251)) * 3)
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
    with tarfile.open(path) as tf:
        want = [(m.name, m.offset_data, m.size, m.type) for m in tf]
    assert [(n.rstrip("/"), *rest) for n, *rest in tar_members(map_file(path))] == want  # dirs end in /
    groups, skipped = scan_tar(map_file(path))
    assert skipped == 0 and groups["a"]["txt"] == want[0][1:3] and len(groups) == len(names)
