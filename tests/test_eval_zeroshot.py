"""Tests for eval_zeroshot.py: metrics on hand-set embeddings, encoders replaced by fixed functions, the CLI on a
tiny checkpoint and synthetic shards made here, ARO / jsonl swap files, class folders and bad input."""

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_zeroshot as EZ
import prep_dataset
from checkpoint_manager import load_model
from clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from dataloader import ShardLoader
from tokenizer import Tokenizer

S = 32
CAPTIONS = ["a red thing", "a blue thing", "a photo of a red cube left of a blue ball", "an image of a green apple"]


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(VisionConfig(img_size=S, patch_size=8, width=32, layers=1, heads=2),
                           TextConfig(vocab_size=vocab_size, context_length=24, width=32, layers=1, heads=2),
                           embed_dim=16)).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer().train(CAPTIONS * 3, 300, quiet=True)


def colour_model(tok, monkeypatch):
    """A tiny CLIP whose towers are replaced by fixed functions: an image embeds as its mean normalised RGB,
    a caption as [+-1, -1, +-1] for the words red / blue (so red images match "red" captions)."""
    model = tiny_model(tok.vocab_size)
    monkeypatch.setattr(model, "encode_image", lambda x: x.mean((2, 3)))  # (B, 3, S, S) -> (B, 3)

    def text(tokens):
        rows = [tok.decode(r[r != 0]) for r in tokens]
        return torch.tensor([[1.0 if "red" in t else -1.0, -1.0, 1.0 if "blue" in t else -1.0] for t in rows])
    monkeypatch.setattr(model, "encode_text", text)
    return model


def save_png(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------- zero-shot

def test_zeroshot_hand_computed():
    classifier = torch.eye(3)  # class c = axis c
    img = torch.tensor([[1.0, 0.5, 0.0],   # label 0: scores (1, .5, 0) -> rank 1, predicted 0
                        [0.2, 1.0, 0.0],   # label 0: rank 2, predicted 1
                        [0.0, 0.1, 1.0],   # label 1: rank 2, predicted 2
                        [0.3, 0.0, 0.9],   # label 2: rank 1, predicted 2
                        [1.0, 0.0, 0.0]])  # label -1: no label, left out
    labels = torch.tensor([0, 0, 1, 2, -1])
    with pytest.warns(UserWarning, match="1 samples have no label"):
        r = EZ.evaluate_zeroshot(img, labels, classifier, ["a", "b", "c"], heldout=["c"])
    assert r["zeroshot_top1"] == 0.5 and r["zeroshot_n"] == 4 and r["zeroshot_unlabelled"] == 1
    assert r["zeroshot_top5"] == 1.0  # top-5 capped at 3 classes
    assert r["zeroshot_per_class"] == {"a": 0.5, "b": 0.0, "c": 1.0}
    assert r["confusion"].tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert r["zeroshot_top1_seen"] == pytest.approx(1 / 3) and r["zeroshot_top1_heldout"] == 1.0
    # top-5 of 7 classes: the true class 6th (5 higher scores) misses, 5th hits
    img7 = torch.tensor([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]] * 2)
    r7 = EZ.evaluate_zeroshot(img7, torch.tensor([5, 4]), torch.eye(7), heldout=[4], chunk=1)
    assert r7["zeroshot_top5"] == 0.5 and r7["zeroshot_top1"] == 0.0
    assert r7["zeroshot_top1_heldout"] == 0.0 and r7["zeroshot_top1_seen"] == 0.0
    assert r7["zeroshot_per_class"] == {"4": 0.0, "5": 0.0}


def test_zeroshot_classifier_averages_normalised_templates(tok, monkeypatch):
    model = colour_model(tok, monkeypatch)
    seen = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda t: (seen.extend(tok.decode(r[r != 0]) for r in t), encode(t))[1])
    clf = EZ.zeroshot_classifier(model, tok, ["red", "apple"], ["a {}", "a photo of a blue {}."])
    assert seen == ["a red", "a photo of a blue red.", "an apple", "a photo of a blue apple."]  # "a apple" -> "an"
    red = F.normalize(F.normalize(torch.tensor([1.0, -1, -1]), dim=0) + F.normalize(torch.tensor([1.0, -1, 1]), dim=0),
                      dim=0)
    assert torch.allclose(clf[0], red) and torch.allclose(clf.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="needs a"):
        EZ.zeroshot_classifier(model, tok, ["red"], ["no slot"])


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_hand_computed():
    # image i = axis i, so score(image i, caption j) = txt[j, i] = Sim[i, j]
    sim = torch.tensor([[.9, .1, .2, .3],
                        [.8, .5, .1, .0],
                        [.7, .6, .4, .2],
                        [.1, .2, .3, .4]])
    r = EZ.evaluate_retrieval(torch.eye(4), sim.t().contiguous(), chunk=3)
    # i2t ranks (row i, diagonal among the row): 1, 2, 3, 1; t2i ranks (column j): 1, 2, 1, 1
    assert r["i2t_R@1"] == 0.5 and r["i2t_R@5"] == 1.0 and r["i2t_R@10"] == 1.0
    assert r["i2t_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4) and r["i2t_median_rank"] == 1.5
    assert r["t2i_R@1"] == 0.75 and r["t2i_mrr"] == pytest.approx(3.5 / 4) and r["t2i_median_rank"] == 1.0
    # ties count for the model: identical captions all rank 1
    tie = EZ.evaluate_retrieval(torch.eye(2), torch.full((2, 2), 0.5))
    assert tie["i2t_R@1"] == 1.0 and tie["t2i_R@1"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        EZ.evaluate_retrieval(torch.eye(3), torch.eye(2))


def test_retrieval_chunked_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    N = 7
    img = F.normalize(torch.randn(N, 5, generator=g), dim=1)
    txt = F.normalize(torch.randn(N, 5, generator=g), dim=1)
    sim = (img.double() @ txt.double().t()).numpy()  # the full (N, N) matrix, only here
    i2t = np.array([1 + (sim[i] > sim[i, i]).sum() for i in range(N)])
    t2i = np.array([1 + (sim[:, j] > sim[j, j]).sum() for j in range(N)])
    want = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        want.update({f"{name}_R@{k}": (r <= k).mean() for k in (1, 5, 10)})
        want.update({f"{name}_mrr": (1 / r).mean(), f"{name}_median_rank": float(np.median(r))})
    assert len(set(i2t)) > 2  # a non-trivial case
    for chunk in (1, 3, N):
        got = EZ.evaluate_retrieval(img, txt, chunk=chunk)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12), (chunk, k)


# ----------------------------------------------------------------------------- swaps

def test_swap_accuracy_hand_set():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    true = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.5, 0.5]])
    false = torch.tensor([[0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [0.5, 0.5]])  # right, wrong, right, tie (= wrong)
    r = EZ.swap_accuracy(img, true, false, ["attribute", "attribute", "relation", "relation"])
    assert r == {"swap_attribute": 0.5, "swap_attribute_n": 2, "swap_relation": 0.5, "swap_relation_n": 2}
    g = EZ.swap_accuracy(img, true, false, ["relation"] * 4, groups=["on", "on", "on", "under"], prefix="aro_")
    assert g["aro_relation"] == 0.5 and g["aro_relation_macro"] == pytest.approx((2 / 3 + 0) / 2)


def test_evaluate_swaps_with_fixed_encoders(tok, monkeypatch):
    model = colour_model(tok, monkeypatch)
    images = torch.zeros(3, 3, S, S, dtype=torch.uint8)
    images[0, 0] = images[1, 0] = 255  # red, red
    images[2, 2] = 255  # blue
    captions = ["a red thing", "a red thing", "a blue thing"]
    swapped = {"attribute": ["a blue thing", None, "a red thing"], "relation": [None, "a red thing", None]}
    r = EZ.evaluate_swaps(model, tok, images, captions, swapped, batch=2)
    # attribute: both right; relation: true == swapped caption, a tie, so not strictly higher
    assert r == {"swap_attribute": 1.0, "swap_attribute_n": 2, "swap_relation": 0.0, "swap_relation_n": 1}
    with pytest.raises(ValueError, match="same length"):
        EZ.evaluate_swaps(model, tok, images, captions, {"attribute": [None]})


def aro_files(tmp_path):
    """Two VG images, an ARO-format file with 2 relation and 2 attribution items, and one item whose image
    is missing."""
    img_dir = tmp_path / "vg"
    img_dir.mkdir()
    a = np.zeros((30, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red, right half blue
    a[:, 20:] = (0, 0, 255)
    Image.fromarray(a).save(img_dir / "1.jpg", quality=95)
    save_png(img_dir / "2.png", (0, 200, 0))
    box = {"bbox_x": 0, "bbox_y": 0, "bbox_w": 20, "bbox_h": 30}
    items = [{"image_path": "1.jpg", **box, "true_caption": "the red thing is on the blue thing",
              "false_caption": "the blue thing is on the red thing", "relation_name": "on"},
             {"image_path": "2.png", "bbox_x": 5, "bbox_y": 5, "bbox_w": 30, "bbox_h": 20,
              "true_caption": "a cube under a ball", "false_caption": "a ball under a cube", "relation_name": "under"},
             {"image_path": "1.jpg", **box, "true_caption": "the red cube and the blue ball",
              "false_caption": "the blue cube and the red ball", "attributes": ["red", "blue"]},
             {"image_path": "2.png", **box, "true_caption": "the green apple", "false_caption": "the red apple",
              "attributes": ["green", "red"]},
             {"image_path": "missing.jpg", **box, "true_caption": "x", "false_caption": "y", "relation_name": "on"}]
    path = tmp_path / "visual_genome_relation.json"
    path.write_text(json.dumps(items))
    return str(path), str(img_dir)


def test_load_image_crops_resizes_and_centres(tmp_path):
    _, img_dir = aro_files(tmp_path)
    red = EZ.load_image(os.path.join(img_dir, "1.jpg"), S, box=(0, 0, 20, 30))  # the left (red) half
    assert red.shape == (3, S, S) and red.dtype == torch.uint8
    assert red[0].float().mean() > 240 and red[2].float().mean() < 15
    whole = EZ.load_image(os.path.join(img_dir, "1.jpg"), S)  # 40x30 -> 43x32 -> centre 32x32: both halves
    assert whole[0, :, :8].float().mean() > 240 and whole[2, :, -8:].float().mean() > 240


def test_load_image_is_the_shared_decode(tmp_path):
    """EXIF rotation and alpha on white, as in the shards (eval's old decode did neither)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # stored 40 wide x 20 high: left red, right blue
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise, so red ends up on top
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    up = EZ.load_image(str(tmp_path / "rot.jpg"), S)
    assert up[0, :8].float().mean() > 200 and up[2, -8:].float().mean() > 200  # red top rows, blue bottom rows
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent black
    assert EZ.load_image(str(tmp_path / "clear.png"), S).min() == 255  # composited on white, not black
    with open(tmp_path / "clear.png", "rb") as f:  # a file object works too (demo.py uploads)
        assert torch.equal(EZ.load_image(f, S), EZ.load_image(str(tmp_path / "clear.png"), S))
    assert EZ.try_load((str(tmp_path / "rot.jpg"), (0, 0, 0, 5)), S) is None  # an empty crop box is skipped


def test_aro_file_end_to_end(tok, tmp_path):
    path, img_dir = aro_files(tmp_path)
    records = EZ.read_aro(path, img_dir)
    assert [r["type"] for r in records] == ["relation", "relation", "attribute", "attribute", "relation"]
    assert records[2]["group"] == "red / blue" and records[1]["box"] == (5.0, 5.0, 35.0, 25.0)
    model = tiny_model(tok.vocab_size)
    with pytest.warns(UserWarning, match="missing.jpg"):
        r = EZ.evaluate_swap_records(model, tok, records, batch=2, workers=1, prefix="aro_")
    assert r["aro_skipped_images"] == 1 and r["aro_relation_n"] == 2 and r["aro_attribute_n"] == 2
    for k in ("aro_relation", "aro_relation_macro", "aro_attribute", "aro_attribute_macro"):
        assert 0.0 <= r[k] <= 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        EZ.read_aro(str(bad), img_dir)
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="bad.json is not a JSON file"):
        EZ.read_aro(str(bad), img_dir)


def test_swaps_jsonl_both_formats(tok, tmp_path, monkeypatch):
    save_png(tmp_path / "r.png", (255, 0, 0))
    save_png(tmp_path / "b.png", (0, 0, 255))
    lines = [json.dumps({"image": "gone.png", "caption": "a red thing", "swaps": {"attribute": "a blue thing"}}),
             json.dumps({"image": "r.png", "caption": "a red thing", "swaps": {"attribute": "a blue thing"}}),
             json.dumps({"image": "b.png", "true_caption": "a blue thing", "false_caption": "a red thing",
                         "type": "attribute"}),
             json.dumps({"image": "b.png", "true_caption": "a red thing", "false_caption": "a blue thing",
                         "type": "colour"}),
             "{broken", json.dumps({"image": "r.png"})]
    path = tmp_path / "swaps.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "r.png", "caption": "\xff"}\n')  # not UTF-8
    with pytest.warns(UserWarning, match="skipped 3 line"):
        records = EZ.read_swaps_jsonl(str(path))
    assert len(records) == 4 and records[1]["image"] == str(tmp_path / "r.png")
    with pytest.warns(UserWarning, match="gone.png"):  # a missing image drops its record; the others keep theirs
        r = EZ.evaluate_swap_records(colour_model(tok, monkeypatch), tok, records, batch=2, workers=1,
                                     prefix="jsonl_")
    assert r == {"jsonl_attribute": 1.0, "jsonl_attribute_n": 2, "jsonl_colour": 0.0, "jsonl_colour_n": 1,
                 "jsonl_skipped_images": 1}


# ----------------------------------------------------------------------------- encoding and shard alignment

def test_encode_split_normalises_and_reports_speed(tok, monkeypatch, capsys):
    model = colour_model(tok, monkeypatch)
    batches = [{"image": torch.full((2, 3, S, S), 255, dtype=torch.uint8), "text": tok.tokenize(["a red thing"] * 2),
                "label": torch.tensor([0, 1])},
               {"image": torch.zeros((1, 3, S, S), dtype=torch.uint8), "text": tok.tokenize(["a blue thing"]),
                "label": torch.tensor([2])}]
    enc = EZ.encode_split(model, batches, "cpu", quiet=False)
    assert "images/s" in capsys.readouterr().out
    assert enc["image"].shape == (3, 3) and enc["text"].shape == (3, 3) and enc["label"].tolist() == [0, 1, 2]
    assert torch.allclose(enc["image"].norm(dim=1), torch.ones(3))
    assert torch.allclose(enc["text"][2], F.normalize(torch.tensor([-1.0, -1, 1]), dim=0))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "syn")
    prep_dataset.main(["synthetic", "--out", out, "--num_train", "200", "--num_val", "64", "--img_size", str(S),
                       "--quiet", "--workers", "1"])
    return out


def test_shard_swaps_line_up_with_loader_rows(synthetic):
    tok = Tokenizer.load(os.path.join(synthetic, "tokenizer.json"))
    loader = ShardLoader(synthetic, "val", 10, tok, 24, shuffle=False, drop_last=False)
    text = torch.cat([b["text"] for b in loader])  # (64, 24)
    rows, n = EZ.shard_swaps(loader)
    assert n == 64 and len(text) == 64
    with tarfile.open(os.path.join(synthetic, "val-000000.tar")) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    keys = sorted(k[:-5] for k in members if k.endswith(".json"))
    metas = [json.loads(members[k + ".json"]) for k in keys]
    want = [(i, t, s, members[k + ".txt"].decode()) for i, (k, m) in enumerate(zip(keys, metas))
            for t, s in m.get("swaps", {}).items()]
    assert rows == want and {t for _, t, _, _ in rows} == {"attribute", "relation"}
    for i, _, _, caption in rows:  # row i of the loader is the caption the swap was made from
        assert torch.equal(text[i], tok.tokenize(metas[i]["short"], 24)[0])
        assert torch.equal(text[i], tok.tokenize(caption, 24)[0])


def test_swaps_of_a_replaced_row_are_left_out(synthetic, monkeypatch):
    """A loader that puts another sample in a row (as one that replaces bad records does) must not have that
    sample's image scored against the swaps of the sample it replaced: those swaps are left out and counted."""
    stok = Tokenizer.load(os.path.join(synthetic, "tokenizer.json"))
    model = tiny_model(stok.vocab_size)
    base = EZ.evaluate_checkpoint(model, stok, synthetic, batch=16)
    text = torch.cat([b["text"] for b in ShardLoader(synthetic, "val", 64, stok, 24, shuffle=False)])
    rows, _ = EZ.shard_swaps(ShardLoader(synthetic, "val", 64, stok, 24, shuffle=False))
    a = next(i for i, _, _, _ in rows if not torch.equal(text[i], text[5]))  # a sample with swaps, unlike sample 5
    lost = sum(i == a for i, _, _, _ in rows)

    class Replacing(ShardLoader):
        def __iter__(self):  # batch=64: one batch; row a gets sample 5's image and caption
            for batch in super().__iter__():
                batch["image"][a], batch["text"][a] = batch["image"][5], batch["text"][5]
                yield batch
    monkeypatch.setattr(EZ, "ShardLoader", Replacing)
    with pytest.warns(UserWarning, match=f"left out {lost} swap"):
        r = EZ.evaluate_checkpoint(model, stok, synthetic, batch=64)
    assert r["swap_misaligned"] == lost > 0 and "swap_misaligned" not in base
    assert r["swap_attribute_n"] + r["swap_relation_n"] == base["swap_attribute_n"] + base["swap_relation_n"] - lost


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def ckpt(synthetic, tmp_path_factory):
    """A tiny random checkpoint with the tokenizer of the synthetic set, and one without a tokenizer."""
    d = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer.load(os.path.join(synthetic, "tokenizer.json"))
    model = tiny_model(tok.vocab_size)
    state = {"model": model.state_dict(), "config": model.config.to_dict(), "step": 7}
    torch.save({**state, "tokenizer": tok.to_dict()}, d / "ok.pt")
    torch.save(state, d / "notok.pt")
    return str(d / "ok.pt"), str(d / "notok.pt")


def test_cli_on_synthetic_shards_writes_json_and_png(synthetic, ckpt, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    EZ.main(["--ckpt", ckpt[0], "--data", synthetic, "--out", str(out), "--batch", "24", "--workers", "0", "--quiet"])
    r = json.loads(out.read_text())
    assert (tmp_path / "res" / "results_confusion.png").stat().st_size > 1000
    assert r["num_images"] == 64 and r["zeroshot_n"] == 64 and r["step"] == 7 and len(r["zeroshot_per_class"]) == 64
    for k in ("zeroshot_top1", "zeroshot_top5", "zeroshot_top1_seen", "zeroshot_top1_heldout", "i2t_R@1",
              "t2i_R@10", "i2t_mrr", "swap_attribute", "swap_relation"):
        assert 0.0 <= r[k] <= 1.0, k
    assert 1 <= r["t2i_median_rank"] <= 64 and r["swap_attribute_n"] == r["swap_relation_n"] > 0
    printed = capsys.readouterr().out
    assert "zeroshot_top1_heldout" in printed and "wrote" in printed


def test_evaluate_checkpoint_returns_numbers_only(synthetic, ckpt):
    model, c = load_model(ckpt[0])
    model.train()
    tok = Tokenizer.from_dict(c["tokenizer"])
    r = EZ.evaluate_checkpoint(model, tok, synthetic, batch=32, templates=["a {}"])
    assert model.training  # mode restored for the training loop
    assert all(isinstance(v, (int, float)) for v in r.values()) and "zeroshot_top1" in r and "i2t_R@1" in r


def test_cli_class_folders_with_bad_images(tok, tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for cls, colour, n in (("red_thing", (255, 0, 0), 3), ("blue_thing", (0, 0, 255), 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            save_png(root / cls / f"{i}.png", colour, size=(50 + 10 * i, 40))
    (root / "blue_thing" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.md").write_text("no images here")
    model = colour_model(tok, monkeypatch)
    with pytest.warns(UserWarning) as rec:
        r = EZ.evaluate_checkpoint(model, tok, str(root), batch=2, workers=2, details=True)
    msgs = " ".join(str(w.message) for w in rec)
    assert "empty_class" in msgs and "broken.jpg" in msgs
    assert r["classes"] == ["blue thing", "red thing"] and r["num_images"] == 5 and r["skipped_bad_image"] == 1
    assert r["zeroshot_top1"] == 1.0 and r["zeroshot_per_class"] == {"blue thing": 1.0, "red thing": 1.0}
    assert "i2t_R@1" not in r  # no captions, no retrieval
    with pytest.warns(UserWarning, match="empty_class"), pytest.raises(ValueError, match="1 class names given but"):
        EZ.evaluate_checkpoint(model, tok, str(root), classes=["only one"])
    empty = tmp_path / "none"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a shard set .* or class folders with images"):
        EZ.evaluate_checkpoint(model, tok, str(empty))


def test_cli_aro_only_and_tokenizer_flag(synthetic, ckpt, tmp_path):
    path, img_dir = aro_files(tmp_path)
    out = tmp_path / "aro.json"
    with pytest.warns(UserWarning, match="could not be decoded"):
        EZ.main(["--ckpt", ckpt[1], "--tokenizer", os.path.join(synthetic, "tokenizer.json"), "--aro", path,
                 "--aro_images", img_dir, "--out", str(out), "--workers", "1", "--quiet"])
    r = json.loads(out.read_text())
    assert r["aro_relation_n"] == 2 and 0 <= r["aro_attribute"] <= 1 and not (tmp_path / "aro_confusion.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "{syn}"], "has no tokenizer; pass --tokenizer"),
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    ([], "--data is required"),
    (["--data", "{syn}", "--aro", "{syn}/index.json"], "--aro FILE needs --aro_images"),
    (["--data", "{syn}", "--templates", "{tmp}/t.txt"], "every line needs a {}"),
    # --tokenizer: missing, empty, not a tokenizer, a tokenizer of other data (more tokens than the model has)
    (["--data", "{syn}", "--tokenizer", "{tmp}/none.json"], "--tokenizer {tmp}/none.json: no such file"),
    (["--data", "{syn}", "--tokenizer", "{tmp}/empty.json"], "--tokenizer {tmp}/empty.json is not a usable tokenizer"),
    (["--data", "{syn}", "--tokenizer", "{tmp}/list.json"], "--tokenizer {tmp}/list.json is not a usable tokenizer"),
    (["--data", "{syn}", "--tokenizer", "{tmp}/t.txt"], "--tokenizer {tmp}/t.txt is not a usable tokenizer"),
    (["--data", "{syn}", "--tokenizer", "{tmp}/big.json"], "tokenizer has 558 tokens but the model was trained"),
    # text files that are not UTF-8, or empty
    (["--data", "{syn}", "--classes", "{tmp}/latin1.txt"], "--classes {tmp}/latin1.txt is not UTF-8 text"),
    (["--data", "{syn}", "--templates", "{tmp}/latin1.txt"], "--templates {tmp}/latin1.txt is not UTF-8 text"),
    (["--data", "{syn}", "--classes", "{tmp}/blank.txt"], "--classes {tmp}/blank.txt: no class names"),
    # --out: a directory, or in a folder that cannot be made (its parent is a file)
    (["--data", "{syn}", "--out", "{tmp}"], "--out {tmp} is a directory"),
    (["--data", "{syn}", "--out", "{tmp}/sub/"], "--out {tmp}/sub/ is a directory"),
    (["--data", "{syn}", "--out", "{tmp}/t.txt/res.json"], "--out {tmp}/t.txt/res.json: cannot create the folder"),
    # --device
    (["--data", "{syn}", "--device", "gpu0"], "--device gpu0: not a device"),
    (["--data", "{syn}", "--split", "test"], "split 'test' not in"),
])
def test_cli_bad_input_exits_2(synthetic, ckpt, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo without a slot\n")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 {}\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    Tokenizer([(a, b) for a in range(150) for b in (32, 101)]).save(str(tmp_path / "big.json"))  # 300 merges
    monkeypatch.setattr(EZ, "evaluate_checkpoint", lambda *a, **k: pytest.fail("input checked after evaluating"))
    args = [a.replace("{syn}", synthetic).replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        EZ.main(["--ckpt", ckpt[1] if "has no tokenizer" in message else ckpt[0], *args])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert e.value.code == 2 and len(lines) == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0] and "Traceback" not in err


def test_cli_out_folder_is_made_before_evaluating(synthetic, ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    seen = []
    fake = lambda *a, **k: seen.append(out.parent.is_dir()) or {"num_images": 1}  # records the folder was there
    monkeypatch.setattr(EZ, "evaluate_checkpoint", fake)
    EZ.main(["--ckpt", ckpt[0], "--data", synthetic, "--out", str(out), "--quiet"])
    assert seen == [True] and json.loads(out.read_text())["num_images"] == 1


def test_cli_device_cuda_without_gpu(synthetic, ckpt, capsys, monkeypatch):
    """Checked before the checkpoint is loaded (loading it onto a missing GPU used to read as a corrupt file)."""
    import checkpoint_manager
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(checkpoint_manager, "load_model", lambda *a, **k: pytest.fail("checkpoint loaded first"))
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as e:
            EZ.main(["--ckpt", ckpt[0], "--data", synthetic, "--device", dev])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--device {dev}: no CUDA GPU is visible" in err and "corrupt" not in err


@pytest.mark.parametrize("case, message", [
    ("not_json", "is not valid JSON"),
    ("empty_object", "is empty or not a JSON object"),
    ("no_img_size", "has no valid img_size"),
    ("missing_shard", "shard val-000000.tar of split val does not exist"),
    ("shard_sizes_length", "val.shard_sizes must be 1 non-negative integers"),
])
def test_cli_bad_index_json_exits_2(synthetic, ckpt, tmp_path, capsys, case, message):
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    index = json.loads((data / "index.json").read_text())
    if case == "missing_shard":
        os.remove(data / "val-000000.tar")
    elif case == "shard_sizes_length":
        index["val"]["shard_sizes"] *= 2
    elif case == "no_img_size":
        del index["img_size"]
    text = {"not_json": "{broken", "empty_object": "{}"}.get(case, json.dumps(index))
    (data / "index.json").write_text(text)
    with pytest.raises(SystemExit) as e:
        EZ.main(["--ckpt", ckpt[0], "--data", str(data), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and "index.json" in lines[0], err
    assert not (tmp_path / "r.json").exists()


def test_cli_missing_ckpt_exits_2(synthetic, capsys):
    with pytest.raises(SystemExit) as e:
        EZ.main(["--ckpt", "/no/such.pt", "--data", synthetic])
    assert e.value.code == 2 and "--ckpt /no/such.pt: no such file" in capsys.readouterr().err
