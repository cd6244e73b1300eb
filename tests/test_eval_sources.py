"""eval_zeroshot.py's sources, made here: ImageNet's WordNet-id folders, CLIP_benchmark's wds layout (classification
and retrieval with 1-5 captions per image), hub datasets through `datasets` (local, never the network), and the
metrics on a planted model whose answers are worked out by hand in the comments."""

import io
import json
import os
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import eval_zeroshot as EZ
from clip import CLIP, IMAGE_MEAN, IMAGE_STD, CLIPConfig, TextConfig, VisionConfig
from dataloader import write_tar
from tokenizer import Tokenizer

S = 32
PALETTE = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
           "magenta": (1, 0, 1), "white": (1, 1, 1), "orange": (1, 0.5, 0)}
RGB = {name: tuple(round(255 * v) for v in rgb) for name, rgb in PALETTE.items()}
CLASSES = list(PALETTE)  # wds class index i = CLASSES[i]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer().train([f"a photo of a {c} thing." for c in PALETTE] * 3, 300, quiet=True)


def tiny_model(vocab_size):
    torch.manual_seed(0)
    return CLIP(CLIPConfig(VisionConfig(img_size=S, patch_size=8, width=32, layers=1, heads=2),
                           TextConfig(vocab_size=vocab_size, context_length=24, width=32, layers=1, heads=2),
                           embed_dim=16)).eval()


def planted(tok, monkeypatch):
    """A tiny CLIP whose towers are fixed functions: an image embeds as its mean RGB (0..255, rounded, so ties are
    exact), a caption as the sum of the PALETTE colours its words name. Cosines are then known by hand."""
    model = tiny_model(tok.vocab_size)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    monkeypatch.setattr(model, "encode_image", lambda x: (255 * (x * std + mean)).round().mean((2, 3)))

    def text(tokens):
        words = [set(re.findall(r"[a-z]+", tok.decode(r[r != 0].tolist()))) for r in tokens]
        return torch.tensor([[sum(PALETTE[w][i] for w in ws if w in PALETTE) for i in range(3)] for ws in words])
    monkeypatch.setattr(model, "encode_text", text)
    return model


def encoded(colour, fmt="PNG", size=(40, 36)):
    buf = io.BytesIO()
    Image.new("RGB", size, RGB[colour]).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def wds_set(root, split, shards, classnames=None, templates=None, kind=None):
    """CLIP_benchmark's layout: root/<split>/nshards.txt + {i}.tar, classnames.txt, templates, dataset_type.txt."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for i, samples in enumerate(shards):
        write_tar(os.path.join(root, split, f"{i}.tar"), samples)
    with open(os.path.join(root, split, "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    for name, lines in (("classnames.txt", classnames), ("zeroshot_classification_templates.txt", templates),
                        ("dataset_type.txt", [kind] if kind else None)):
        if lines is not None:
            with open(os.path.join(root, name), "w") as f:
                f.write("\n".join(lines) + "\n")
    return str(root)


# (image colour, label) -> rank of the label's class among the 8 (cosines of mean RGB vs the class colour):
CLASSIFIED = [("red", "red"),          # rank 1
              ("green", "cyan"),       # green 1 > cyan .707 (= yellow, a tie): rank 2
              ("red", "cyan"),         # cyan 0 < red 1, orange .894, yellow .707, magenta .707, white .577: rank 6
              ("blue", "blue"),        # rank 1
              ("yellow", "orange"),    # yellow 1 > orange .949 > white .816: rank 2
              ("white", "white")]      # rank 1
# so top-1 3/6, top-5 5/6, per class red 1, cyan 0/2, blue 1, orange 0, white 1: mean per-class recall 3/5


def classification_set(root):
    """CLASSIFIED over two shards (.webp, .png, .jpg images), plus four bad samples: no image, a .cls that is not
    a number, image bytes that do not decode, no .cls."""
    samples = [(f"s{i:03d}", {("webp", "png")[i % 2]: encoded(c, ("WEBP", "PNG")[i % 2]),
                              "cls": str(CLASSES.index(y)).encode()}) for i, (c, y) in enumerate(CLASSIFIED)]
    bad = [("b000", {"cls": b"1"}), ("b001", {"png": encoded("red"), "cls": b"one"}),
           ("b002", {"jpg": b"not a jpeg", "cls": b"2"}), ("b003", {"webp": encoded("blue", "WEBP")})]
    return wds_set(root, "test", [samples[:4] + bad[:2], samples[4:] + bad[2:]], CLASSES,
                   ["a photo of a {c}.", "a {c} thing."])


def test_wds_classification_hand_checked(tok, tmp_path, monkeypatch):
    data = classification_set(tmp_path / "wds_colours")
    model = planted(tok, monkeypatch)
    with pytest.warns(UserWarning, match="1 image.*could not be decoded: 1.tar/b002"):
        r = EZ.evaluate_checkpoint(model, tok, data, batch=4, workers=2, details=True)
    assert r["num_images"] == r["zeroshot_n"] == 6 and r["classes"] == CLASSES
    assert r["zeroshot_top1"] == 0.5 and r["zeroshot_top5"] == 5 / 6
    assert r["mean_per_class_recall"] == pytest.approx(3 / 5)
    assert r["zeroshot_per_class"] == {"red": 1.0, "blue": 1.0, "cyan": 0.0, "white": 1.0, "orange": 0.0}
    assert {k: v for k, v in r.items() if k.startswith("skipped_")} == {
        "skipped_bad_image": 1, "skipped_bad_label": 1, "skipped_missing_cls": 1, "skipped_missing_image": 1}
    assert r["confusion"][CLASSES.index("cyan"), CLASSES.index("green")] == 1  # the green image labelled cyan
    assert "i2t_R@1" not in r
    # the first 3 samples only (streams: the first N, bad ones included), and the set's own {c} templates verbatim
    seen = []
    encode = EZ.encode_texts
    monkeypatch.setattr(EZ, "encode_texts", lambda m, t, texts, *a, **k: (seen.extend(texts), encode(m, t, texts, *a, **k))[1])
    r3 = EZ.evaluate_checkpoint(model, tok, data, batch=2, max_images=3)
    assert r3["num_images"] == 3 and r3["zeroshot_top1"] == pytest.approx(1 / 3)
    assert seen[:4] == ["a photo of a red.", "a red thing.", "a photo of a green.", "a green thing."]
    assert "a photo of a orange." in seen  # verbatim, as CLIP_benchmark: no "an orange" for the field's lists


# image -> its captions (1 to 5), and the worked-out ranks
RETRIEVAL = [("red", ["red"]),
             ("green", ["green", "a green thing", "blue"]),
             ("blue", ["cyan", "a white thing", "yellow", "orange", "magenta"]),
             ("white", ["white", "red"])]
# t2i (caption -> its image among red, green, blue, white): red 1; green 1; a green thing 1; blue (green's) 3: blue
# image 1, white .577 above its 0; cyan 2: white .816 above its .707 (green ties); a white thing 2 (white 1 above);
# yellow 4; orange 4 (red .894, white .775, green .447 above its 0); magenta 2 (white .816); white 1; red (white's) 2
T2I = [1, 1, 1, 3, 2, 2, 4, 4, 2, 1, 2]
# i2t (image -> its best-placed caption among the 11): red 1; green 1; blue: best own .707 (cyan, magenta), only
# green's "blue" (1.0) above: 2; white: "white" 1.0, tied by blue's "a white thing" (ties count for the model): 1
I2T = [1, 1, 2, 1]


def test_wds_retrieval_one_to_five_captions_hand_checked(tok, tmp_path, monkeypatch):
    samples = [(f"{i:04d}", {"webp": encoded(c, "WEBP"), "txt": "\n".join(caps).encode()})
               for i, (c, caps) in enumerate(RETRIEVAL)]
    samples.append(("9999", {"webp": encoded("red", "WEBP"), "txt": b"\n \n"}))  # no caption: skipped
    data = wds_set(tmp_path / "wds_captions", "test", [samples[:2], samples[2:]], kind="retrieval")
    r = EZ.evaluate_checkpoint(planted(tok, monkeypatch), tok, data, batch=3, chunk=2)
    assert r["num_images"] == 4 and r["skipped_no_caption"] == 1 and "zeroshot_top1" not in r
    for name, ranks in (("t2i", T2I), ("i2t", I2T)):
        ranks = np.array(ranks)
        for k in (1, 5, 10):
            assert r[f"{name}_R@{k}"] == pytest.approx((ranks <= k).mean()), (name, k)
        assert r[f"{name}_mrr"] == pytest.approx((1 / ranks).mean()) and r[f"{name}_median_rank"] == np.median(ranks)
    assert r["t2i_R@1"] == pytest.approx(4 / 11) and r["i2t_R@1"] == 0.75


def test_multi_caption_retrieval_matches_a_full_matrix_and_the_paired_case():
    """Chunked ranks = CLIP_benchmark's definition on the whole (M, N) matrix: a caption is right at k when its
    image is in its top k; an image when any of its captions is in its top k."""
    g = torch.Generator().manual_seed(0)
    N, M = 9, 20
    img = torch.nn.functional.normalize(torch.randn(N, 6, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(M, 6, generator=g), dim=1)
    owner = torch.cat([torch.arange(N), torch.randint(0, N, (M - N,), generator=g)])  # every image has a caption
    scores = txt @ img.t()  # (M, N)
    own = owner[:, None] == torch.arange(N)[None]  # (M, N)
    for k in (1, 5, 10):
        t2i = (scores.topk(min(k, N), 1).indices == owner[:, None]).any(1).double().mean()
        i2t = own.t().gather(1, scores.t().topk(k, 1).indices).any(1).double().mean()
        for chunk in (1, 4, 64):
            r = EZ.evaluate_retrieval(img, txt, owner, chunk)
            assert r[f"t2i_R@{k}"] == pytest.approx(t2i.item()) and r[f"i2t_R@{k}"] == pytest.approx(i2t.item())
    paired = EZ.evaluate_retrieval(img, txt[:N])
    assert paired == EZ.evaluate_retrieval(img, txt[:N], torch.arange(N))


def test_wnid_folders_get_curated_names_and_80_templates(tok, tmp_path, monkeypatch):
    root = tmp_path / "val"
    for wnid in ("n01443537", "n01440764"):  # goldfish, tench: a subset of the 1,000
        (root / wnid).mkdir(parents=True)
        (root / wnid / "ILSVRC2012_val_00000001.JPEG").write_bytes(encoded("orange", "JPEG"))
    source = EZ.open_source(str(root))
    assert source.classes == ["tench", "goldfish"] and len(source.templates) == 80  # sorted ids, OpenAI's names
    seen = []
    encode = EZ.encode_texts
    monkeypatch.setattr(EZ, "encode_texts", lambda m, t, texts, *a, **k: (seen.extend(texts), encode(m, t, texts, *a, **k))[1])
    r = EZ.evaluate_checkpoint(tiny_model(tok.vocab_size), tok, str(root), batch=4, details=True)
    assert r["classes"] == ["tench", "goldfish"] and r["num_images"] == 2
    assert len(seen) == 160 and seen[:2] == ["a bad photo of a tench.", "a photo of many tench."]
    assert "itap of my goldfish." in seen and "a origami tench." in seen  # verbatim: the field's prompts
    names, templates = EZ.imagenet_classes()
    assert len(names) == 1000 and names["n04532670"] == "viaduct" and templates[0] == "a bad photo of a {c}."
    assert EZ.curated(["n15075141"]) == (["toilet paper"], templates)  # any source's names (hub ClassLabels too)
    assert EZ.curated(["cat", "n15075141"], ["a {}."]) == (["cat", "n15075141"], ["a {}."])
    # one folder that is no WordNet id: folder names and our short templates
    (root / "orange").mkdir()
    (root / "orange" / "1.png").write_bytes(encoded("orange"))
    mixed = EZ.open_source(str(root))
    assert mixed.classes == ["n01440764", "n01443537", "orange"] and mixed.templates is None


def test_max_images_spreads_over_class_folders(tmp_path):
    for c in ("blue", "red"):
        (tmp_path / c).mkdir()
        for i in range(5):
            (tmp_path / c / f"{i}.png").write_bytes(encoded(c))
    source = EZ.open_source(str(tmp_path), max_images=4)
    batches = list(source.batches(S, None, None, batch=3, workers=1))
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 0, 1, 1]  # files 0, 3, 6, 9 of 10


@pytest.fixture(scope="module")
def hub_and_folders(tmp_path_factory):
    """The same 8 images as class folders and as a local `datasets` dataset (parquet under data/, the hub's
    layout) with a ClassLabel whose names come in another order than the sorted folders."""
    root = tmp_path_factory.mktemp("same")
    items = [("red", "red"), ("white", "red"), ("green", "cyan"), ("blue", "blue"), ("yellow", "orange"),
             ("white", "white"), ("cyan", "cyan"), ("red", "orange")]
    names = ["white", "red", "orange", "cyan", "blue"]
    for i, (colour, label) in enumerate(items):
        os.makedirs(root / "folders" / label, exist_ok=True)
        (root / "folders" / label / f"{i}.png").write_bytes(encoded(colour))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": encoded(c), "path": None} for c, _ in items],
                                     "label": [names.index(y) for _, y in items]}, features=features)
    (root / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "hub" / "data" / "test-00000-of-00001.parquet"))
    return str(root / "folders"), str(root / "hub")


def test_hub_classlabel_equals_class_folders(tok, hub_and_folders, monkeypatch):
    folders, hub = hub_and_folders
    model = planted(tok, monkeypatch)
    a = EZ.evaluate_checkpoint(model, tok, folders, batch=3, workers=1, details=True)
    b = EZ.evaluate_checkpoint(model, tok, f"hf:{hub}", batch=3, workers=1, details=True)  # split: test (no validation)
    assert a["num_images"] == b["num_images"] == 8 and sorted(b["classes"]) == sorted(a["classes"])
    for k in ("zeroshot_top1", "zeroshot_top5", "mean_per_class_recall", "zeroshot_per_class"):
        assert a[k] == b[k], k
    # among white, red, orange, cyan, blue: green -> cyan and yellow -> orange are right, white -> red and red ->
    # orange wrong (white 1 > red .577; red 1 > orange .894): top-1 6/8, per class red 1/2, orange 1/2, others 1
    assert a["zeroshot_top1"] == 0.75 and a["zeroshot_top5"] == 1.0 and a["mean_per_class_recall"] == pytest.approx(0.8)


@pytest.mark.parametrize("setup, args, message", [
    ("wds", ["--split", "val"], "split 'val' has no val/nshards.txt (this CLIP_benchmark set has test)"),
    ("nshards", [], "nshards.txt must hold one positive integer"),
    ("missing_tar", [], "nshards.txt says 3 shards but 1.tar, 2.tar are missing"),
    ("multilabel", [], "dataset type 'multilabel' is not supported"),
    ("blank_class", [], "classnames.txt: line 2 is empty"),
    ("no_classnames", [], "has labels but no class names: give them with --classes"),
    ("wds", ["--classes", "{tmp}/two.txt"], "2 names, but --data"),
    ("wds", ["--templates", "{tmp}/bad_templates.txt"], "every line needs a {} or {c}"),
    ("wds", ["--label_column", "y"], "apply to --data hf:<id or dir> only"),
    ("wds", ["--max_images", "0"], "--max_images must be >= 1"),
    ("hub", ["--label_column", "nope"], "--label_column 'nope' is not a column"),
    ("hub", ["--image_column", "label"], "--image_column 'label' holds ClassLabel"),
    ("hub", ["--split", "train"], "split train"),
    ("no_hub", [], "hub dataset"),
    ("hub_id", [], "hub dataset 'nobody/no-such-set'"),  # offline in tests: the hub is never reached
])
def test_bad_sources_are_one_line_exit_2(tok, tmp_path, capsys, monkeypatch, hub_and_folders, setup, args, message):
    data = classification_set(tmp_path / "wds")
    if setup == "nshards":
        (tmp_path / "wds" / "test" / "nshards.txt").write_text("two\n")
    elif setup == "missing_tar":
        (tmp_path / "wds" / "test" / "nshards.txt").write_text("3\n")
        os.remove(tmp_path / "wds" / "test" / "1.tar")
    elif setup == "multilabel":
        (tmp_path / "wds" / "dataset_type.txt").write_text("multilabel\n")
    elif setup == "blank_class":
        (tmp_path / "wds" / "classnames.txt").write_text("red\n\ngreen\n")
    elif setup == "no_classnames":
        os.remove(tmp_path / "wds" / "classnames.txt")
    data = {"hub": f"hf:{hub_and_folders[1]}", "no_hub": f"hf:{tmp_path / 'nothing'}",
            "hub_id": "hf:nobody/no-such-set"}.get(setup, data)
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "bad_templates.txt").write_text("a photo of a {c}.\nno slot\n")
    model = tiny_model(tok.vocab_size)
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict()},
               tmp_path / "m.pt")
    monkeypatch.setattr(EZ, "evaluate_checkpoint", lambda *a, **k: pytest.fail("input checked after evaluating"))
    with pytest.raises(SystemExit) as e:
        EZ.main(["--ckpt", str(tmp_path / "m.pt"), "--data", data, "--out", str(tmp_path / "r.json"),
                 *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_cli_on_a_wds_set_with_a_c_template_file(tok, tmp_path, monkeypatch):
    data = classification_set(tmp_path / "wds")
    (tmp_path / "t.txt").write_text("itap of a {c}.\na {}.\n")  # {c} (CLIP_benchmark's) and {} both work
    model = tiny_model(tok.vocab_size)
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict(), "step": 3},
               tmp_path / "m.pt")
    seen = []
    encode = EZ.encode_texts
    monkeypatch.setattr(EZ, "encode_texts", lambda m, t, texts, *a, **k: (seen.extend(texts), encode(m, t, texts, *a, **k))[1])
    with pytest.warns(UserWarning, match="could not be decoded"):
        EZ.main(["--ckpt", str(tmp_path / "m.pt"), "--data", data, "--templates", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "r.json"), "--workers", "1", "--quiet"])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["split"] == "test" and r["num_images"] == 6 and r["zeroshot_n"] == 6 and r["step"] == 3
    assert 0 <= r["mean_per_class_recall"] <= 1 and r["classes"] == CLASSES
    assert seen[:4] == ["itap of a red.", "a red.", "itap of a green.", "a green."]
    assert (tmp_path / "r_confusion.png").exists()


def test_zeroshot_without_kept_embeddings(tok, hub_and_folders, monkeypatch):
    """Classification sets keep counts, never an embedding per image: memory follows --batch and the classes."""
    model = planted(tok, monkeypatch)
    source = EZ.open_source(hub_and_folders[0])
    loader = source.batches(S, tok, 24, batch=2, workers=1)
    clf = EZ.zeroshot_classifier(model, tok, source.classes, batch=3)  # 5 templates: 1 class per text batch
    enc = EZ.encode_split(model, loader, "cpu", classifier=clf, keep=False)
    assert enc["image"] is None and enc["label"] is None and enc["num_images"] == 8
    assert enc["zeroshot"].result(source.classes)["zeroshot_top1"] == 0.75
