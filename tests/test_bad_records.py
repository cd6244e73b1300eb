"""Issue 13's fuzz test: every kind of bad record mixed into good samples; training skips and counts each one,
never pairs a bad sample's caption with another image, and a resumed run equals the uninterrupted one bitwise."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint_manager as cm
import dataloader
import train
from dataloader import ShardLoader, write_tar
from tokenizer import Tokenizer

S = 32  # the micro preset's image size
# planted bad records: (what is wrong, the reason it must be counted under); each appears once per epoch
PLANTED = ["bad_json", "bad_utf8", "bad_image", "truncated_image", "missing_txt", "missing_image"]
REASON = {"truncated_image": "bad_image"}


def png(sid):
    """A lossless image whose first pixel spells its sample id: (id % 256, id // 256, 7)."""
    a = np.random.default_rng(sid).integers(0, 256, (S, S, 3), dtype=np.uint8)
    a[0, 0] = (sid % 256, sid // 256, 7)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def image_id(pixels):  # uint8 (3, S, S) -> the id spelled by its first pixel
    return int(pixels[0, 0, 0]) + 256 * int(pixels[1, 0, 0])


def sample(sid, kind=None):
    files = {"png": png(sid), "txt": f"a photo of sample {sid}".encode(), "json": json.dumps({"id": sid}).encode()}
    if kind == "bad_json":
        files["json"] = b'{"id": 1, '
    elif kind == "bad_utf8":
        files["txt"] = b"a photo of sample \xff\xfe " + str(sid).encode()
    elif kind == "bad_image":
        files["png"] = bytes(np.random.default_rng(sid).integers(0, 256, 300, dtype=np.uint8))
    elif kind == "truncated_image":
        files["png"] = files["png"][:len(files["png"]) // 2]
    elif kind == "missing_txt":
        del files["txt"]
    elif kind == "missing_image":
        del files["png"]
    return f"{sid:09d}", files


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """3 training shards of 16 keys (48 = 6 batches of 8, so every key is met once per epoch), the 6 bad ones
    spread over them; a clean val shard."""
    root = str(tmp_path_factory.mktemp("fuzz"))
    bad = {3: "bad_json", 10: "bad_utf8", 17: "bad_image", 25: "truncated_image", 33: "missing_txt", 46: "missing_image"}
    for k in range(3):
        write_tar(os.path.join(root, f"train-{k:06d}.tar"), [sample(i, bad.get(i)) for i in range(16 * k, 16 * k + 16)])
    write_tar(os.path.join(root, "val-000000.tar"), [sample(i) for i in range(100, 116)])
    index = {"img_size": S, "source": "test",
             "train": {"shards": [f"train-{k:06d}.tar" for k in range(3)], "num_samples": 48},
             "val": {"shards": ["val-000000.tar"], "num_samples": 16}}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    Tokenizer().train([f"a photo of sample {i}" for i in range(200)], vocab_size=300, quiet=True).save(
        os.path.join(root, "tokenizer.json"))
    return root, bad


def caption_ids(tok, text):
    """int64 (B, ctx) tokens -> the sample id each caption names."""
    return [int(tok.decode(row[1:row.index(tok.eot)]).split()[-1]) for row in text.tolist()]


def expected_counts(bad):
    counts = {}
    for kind in bad.values():
        counts[REASON.get(kind, kind)] = counts.get(REASON.get(kind, kind), 0) + 1
    return counts


def test_bad_records_are_replaced_in_place_and_counted_once_per_epoch(fuzz):
    root, bad = fuzz
    tok = Tokenizer.load(os.path.join(root, "tokenizer.json"))
    runs = []
    for workers in (0, 1):
        loader = ShardLoader(root, "train", batch_size=8, tokenizer=tok, context_length=32, seed=3,
                             num_workers=workers)
        epochs = []
        for epoch in range(2):
            batches = list(loader)
            for b in batches:
                assert b["image"].shape == (8, 3, S, S)  # batches keep their size
                imgs = [image_id(p) for p in b["image"].numpy()]
                assert imgs == caption_ids(tok, b["text"])  # every image with its own caption
                assert not set(imgs) & set(bad)  # no planted-bad sample was used
            report = loader.pop_epoch_report()
            assert report == {"epoch": epoch, "skipped": expected_counts(bad)}
            epochs.append(batches)
        loader.close()
        runs.append(epochs)
    for e in range(2):  # replacements do not depend on the number of workers
        assert all(torch.equal(a[k], b[k]) for a, b in zip(runs[0][e], runs[1][e]) for k in a)


def test_training_over_bad_records_resumes_bitwise(fuzz, tmp_path, monkeypatch):
    root, bad = fuzz
    tok = Tokenizer.load(os.path.join(root, "tokenizer.json"))
    seen = []  # every (image id, caption id) pair the training loop received
    real_iter = ShardLoader.__iter__

    def spy(self):
        for b in real_iter(self):
            if self.split == "train":
                seen.extend(zip([image_id(p) for p in b["image"].numpy()], caption_ids(tok, b["text"])))
            yield b
    monkeypatch.setattr(ShardLoader, "__iter__", spy)

    def run(name, *extra):
        return train.main(["--data", root, "--preset", "micro", "--batch", "8", "--epochs", "2", "--workers", "1",
                           "--eval_every", "0", "--ckpt_every", "4", "--seed", "5", "--out", str(tmp_path / "out"),
                           "--log_dir", str(tmp_path / "logs"), "--run_name", name, "--quiet",
                           "--no-augment", *extra])  # no crop: the first pixel spells the id

    assert run("full") == 0
    assert run("cut", "--stop_at", "8") == 0  # mid-way through epoch 2 (steps 7..12)
    assert run("cut", "--resume", "latest") == 0
    full = cm.load(str(tmp_path / "out" / "full" / "ckpt" / "latest.pt"))["model"]
    resumed = cm.load(str(tmp_path / "out" / "cut" / "ckpt" / "latest.pt"))["model"]
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert seen and all(i == c for i, c in seen) and not {i for i, _ in seen} & set(bad)
    # the counts land in the metrics log once per epoch, the resumed epoch included
    for name in ("full", "cut"):
        with open(tmp_path / "logs" / name / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        reports = [{k[len("skipped_"):]: v for k, v in r.items() if k.startswith("skipped_")} for r in records]
        assert [r for r in reports if r] == [expected_counts(bad)] * 2


def test_a_shard_with_no_usable_sample_is_a_clear_error(tmp_path):
    root = str(tmp_path)
    write_tar(os.path.join(root, "train-000000.tar"), [sample(i, "bad_image") for i in range(4)])
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"img_size": S, "train": {"shards": ["train-000000.tar"], "num_samples": 4}}, f)
    Tokenizer().train(["a photo of sample 1"], vocab_size=300, quiet=True).save(os.path.join(root, "tokenizer.json"))
    with pytest.raises(RuntimeError, match="no usable sample in the whole shard"):
        list(ShardLoader(root, "train", batch_size=2, num_workers=1))


@pytest.mark.parametrize("index, message", [
    ({}, "empty or not a JSON object"),
    ({"train": {"shards": ["train-000000.tar"]}}, "no valid img_size"),
    ({"img_size": 32, "train": {"shards": ["nope.tar"]}}, "shard nope.tar of split train does not exist"),
    ({"img_size": 32, "train": {"shards": ["train-000000.tar"], "shard_sizes": [1, 2]}}, "shard_sizes must be 1"),
    ({"img_size": 32, "val": {"shards": ["train-000000.tar"]}}, r"split 'train' not in .*\['val'\]"),
])
def test_index_problems_are_one_line(tmp_path, index, message):
    write_tar(os.path.join(tmp_path, "train-000000.tar"), [sample(0)])
    with open(tmp_path / "index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=message):
        dataloader.read_index(str(tmp_path), "train")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dataloader.read_index(str(tmp_path))


def test_tokenizer_problems_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        dataloader.load_tokenizer(str(tmp_path / "tokenizer.json"))
    for text in ("", "[]", '{"format": "other"}'):
        (tmp_path / "tokenizer.json").write_text(text)
        with pytest.raises(ValueError, match="not a usable tokenizer file"):
            dataloader.load_tokenizer(str(tmp_path / "tokenizer.json"))
