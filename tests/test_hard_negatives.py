"""Hard negatives: the rule-based caption generator, the NegCLIP loss, its exactness under accumulation and DDP,
mined negatives (add-negatives) and the embeddings eval_zeroshot.py exports."""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import clip
import eval_zeroshot
import prep_dataset
import train
from conftest import metrics, train_argv
from dataloader import ShardLoader, read_tar, write_tar
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the generator

GENERATED = [
    ("a red cube to the left of a blue ball",
     ["a blue cube to the left of a red ball", "a red cube to the right of a blue ball",
      "a red ball to the left of a blue cube"]),
    ("an orange cat on a red mat", ["a red cat on an orange mat", "an orange cat under a red mat",
                                    "an orange mat on a red cat"]),
    ("two dogs and three cats", ["three dogs and two cats"]),
    ("a small box next to a large box", ["a large box next to a small box"]),
    ("a wooden chair beside a metal table", ["a metal chair beside a wooden table"]),
    ("the cup is inside the box", ["the cup is outside the box", "the box is inside the cup"]),
    ("a dog in front of the house", ["a dog behind the house", "a house in front of the dog"]),
    ("A lamp above a desk, at night", ["A lamp below a desk, at night", "A desk above a lamp, at night"]),
    ("a bird sitting on top of a car", ["a bird sitting underneath a car", "a car sitting on top of a bird"]),
]
LEFT_ALONE = [
    "a red and blue ball",           # one phrase: swapped, it says the same
    "a small red circle on the left",  # a position, not a relation between two things
    "a photo of a dog",
    "a cat next to a dog",            # symmetric relations are not reversed
    "a red car and a red bus",        # the same word twice
    "",
]


@pytest.mark.parametrize("caption, expected", GENERATED)
def test_generator_table(caption, expected):
    assert prep_dataset.negative_captions(caption) == expected


@pytest.mark.parametrize("caption", LEFT_ALONE)
def test_generator_leaves_alone(caption):
    assert prep_dataset.negative_captions(caption) == []


# ----------------------------------------------------------------------------- the loss


def test_negclip_loss_by_hand():
    """2 images, 2 captions, 1 negative each (2 in all); s = 2, E = 2: every logit is readable off the vectors."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    neg = torch.tensor([[[1.0, 0.0]], [[0.0, -1.0]]])  # (2, 1, 2)
    s = torch.tensor(2.0)
    ce = lambda row, t: -row[t] + math.log(sum(math.exp(x) for x in row))
    # image 0 -> [txt0, txt1, neg0, neg1] = 2 * [0.6, 0.8, 1, 0]; image 1 -> 2 * [0.8, 0.6, 0, -1]
    i2t = (ce([1.2, 1.6, 2.0, 0.0], 0) + ce([1.6, 1.2, 0.0, -2.0], 1)) / 2
    t2i = (ce([1.2, 1.6], 0) + ce([1.6, 1.2], 1)) / 2  # captions -> images, unchanged
    loss = clip.negclip_loss(img, txt, neg, torch.ones(2, 1, dtype=torch.bool), s)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # a masked slot takes no probability, whatever its embedding: with every slot masked it is clip_loss
    none = clip.negclip_loss(img, txt, neg, torch.zeros(2, 1, dtype=torch.bool), s)
    assert none.item() == pytest.approx(clip.clip_loss(img, txt, s).item(), abs=1e-6)
    masked = clip.negclip_loss(img, txt, torch.cat([neg, torch.randn(2, 1, 2)], 1),
                               torch.tensor([[True, False], [True, False]]), s)
    assert masked.item() == pytest.approx(loss.item(), abs=1e-6)


def random_inputs(n=12, k=3, vocab=300, ctx=32):
    torch.manual_seed(0)
    tokens = torch.randint(1, vocab - 2, (n, ctx))
    tokens[:, 0], tokens[:, 9] = vocab - 2, vocab - 1
    neg = torch.randint(1, vocab - 2, (n, k, ctx))
    neg[..., 0], neg[..., 7] = vocab - 2, vocab - 1
    neg[::2, 1:] = 0  # every other sample has one negative only: empty slots are all-zero rows
    return torch.randn(n, 3, 32, 32), tokens, neg


def test_model_encodes_negatives_with_zero_rows_for_empty_slots():
    model = clip.CLIP(clip.get_config("micro", vocab_size=300))
    images, tokens, neg = random_inputs()
    out = model(images, tokens, tokens_neg=neg)
    assert out.text_neg.shape == (12, 3, model.config.output_dim)
    assert torch.equal(out.text_neg.norm(dim=-1) > 0.5, neg.any(-1))
    alone = torch.nn.functional.normalize(model.encode_text(neg[1, 2:3]), dim=-1)
    assert torch.allclose(out.text_neg[1, 2], alone[0], atol=1e-6)


def test_accumulation_gives_the_big_batch_gradient():
    """GradCache with a (B, K, E) negatives field: 3 micro-batches of 4 = one batch of 12."""
    model = clip.CLIP(clip.get_config("micro", vocab_size=300))
    images, tokens, neg = random_inputs()
    loss_fn = train.make_loss(train.get_parser().parse_args(["--hard_negatives", "swaps"]), model)
    grads = []
    for accum in (1, 3):
        model.zero_grad()
        loss, _ = train.forward_backward(model, (images, tokens, None, None, neg), accum, contextlib.nullcontext(), loss_fn)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l3, g3) = grads
    assert l1.item() == pytest.approx(l3.item(), abs=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g3[n], atol=1e-6, rtol=1e-4), n
    # the negatives matter: the loss differs from the plain one on the same batch
    plain = train.make_loss(train.get_parser().parse_args([]), model)
    with torch.no_grad():
        assert abs(plain(model(images, tokens), None)[0].item() - l1.item()) > 1e-3


def argv(data, tmp, run, *extra):
    return train_argv(data, tmp, run, *extra, epochs=0.5, max_lr=1e-3, ckpt_every=100)


def losses(tmp, run):
    return [r["loss"] for r in metrics(tmp, run, "train")]


def test_ddp_two_processes_match_one(synth, tmp_path):
    """torchrun, 2 gloo processes of batch 16 = 1 process of batch 32, with the swaps as negatives."""
    assert train.main(argv(synth, tmp_path, "one", "--hard_negatives", "swaps")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py")] + argv(synth, tmp_path, "two", "--hard_negatives", "swaps", "--batch", "16")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    one, two = losses(tmp_path, "one"), losses(tmp_path, "two")
    assert len(one) == len(two) == 8
    assert one == pytest.approx(two, abs=1e-5)
    assert train.main(argv(synth, tmp_path, "plain")) == 0
    assert losses(tmp_path, "plain")[0] != pytest.approx(one[0], abs=1e-3)  # the negatives were used


# ----------------------------------------------------------------------------- shards: prep, loader, add-swaps


def objects_swapped(caption):
    """'a large red cube above a small blue ball' -> 'a small blue ball above a large red cube' (any prefix kept)."""
    rel = next(r for r in prep_dataset.RELATIONS.values() if f" {r} " in caption)
    left, right = caption.split(f" {rel} ")
    cut = max(left.rfind(" a "), left.rfind(" an "))  # the first object starts at its article
    return prep_dataset.articles(f"{left[:cut + 1]}{right} {rel} {left[cut + 1:]}")


def test_synthetic_negatives_are_its_swaps_and_the_loader_reads_them(synth):
    tok = Tokenizer.load(os.path.join(synth, "tokenizer.json"))
    groups, _ = read_tar(os.path.join(synth, "train-000000.tar"))
    metas = [json.loads(groups[k]["json"]) for k in sorted(groups)]
    pairs = [m for m in metas if "swaps" in m]
    assert pairs and all(m["negatives"] == [*m["swaps"].values(), objects_swapped(m["short"])] for m in pairs)
    assert all(m["negatives"] == [] for m in metas if "swaps" not in m)
    loader = ShardLoader(synth, "train", 8, tok, 32, shuffle=False, negatives=("negatives",), num_negatives=3)
    batch = next(iter(loader))
    loader.close()
    assert batch["text_neg"].shape == (8, 3, 32)
    for m, row in zip(metas[:8], batch["text_neg"]):
        want = tok.tokenize(m["negatives"], 32) if m["negatives"] else torch.zeros(0, 32, dtype=torch.int64)
        assert torch.equal(row[:len(want)], want) and not row[len(want):].any()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A folder-prepared set: 12 captions with and without relations or attributes."""
    d = tmp_path_factory.mktemp("plain")
    src = d / "src"
    src.mkdir()
    from PIL import Image
    captions = [c for c, _ in GENERATED] + LEFT_ALONE[:3]
    for i, c in enumerate(captions):
        Image.new("RGB", (40, 40), (20 * i, 100, 200 - 10 * i)).save(src / f"{i:02d}.png")
        (src / f"{i:02d}.txt").write_text(c)
    out = str(d / "data")
    prep_dataset.main(["folder", "--src", str(src), "--out", out, "--img_size", "32", "--vocab_size", "300",
                       "--val_frac", "0.0", "--shard_size", "4", "--workers", "1", "--quiet"])
    return out, captions


def test_prep_writes_rule_negatives_and_counts_the_rest(plain):
    out, captions = plain
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["negatives"]["without"] == 3
    seen = {}
    for name in index["train"]["shards"]:
        for files in read_tar(os.path.join(out, name))[0].values():
            seen[files["txt"].decode()] = json.loads(files["json"])["negatives"]
    assert seen == {c: prep_dataset.negative_captions(c) for c in captions}


def test_add_swaps_restarts_and_switches_the_index_last(plain, tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "d")
    shutil.copytree(plain[0], data)
    for name in os.listdir(data):  # shards made before negatives existed: strip them
        if name.endswith(".tar"):
            groups, _ = read_tar(os.path.join(data, name))
            for files in groups.values():
                meta = json.loads(files["json"])
                del meta["negatives"]
                files["json"] = json.dumps(meta).encode()
            write_tar(os.path.join(data, name), sorted(groups.items()))
    with pytest.raises(SystemExit) as e:  # training asks for them: one clear line before anything runs
        train.main(argv(data, tmp_path, "x", "--hard_negatives", "swaps", "--batch", "4"))
    assert e.value.code == 2 and "prep_dataset.py add-swaps" in capsys.readouterr().err

    calls = {"n": 0}
    real = prep_dataset.write_tar

    def dies_on_the_second(path, samples):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, samples)
    monkeypatch.setattr(prep_dataset, "write_tar", dies_on_the_second)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line, exit 130
        prep_dataset.main(["add-swaps", "--data", data, "--quiet"])
    assert e.value.code == 130
    with open(os.path.join(data, "index.json")) as f:
        assert json.load(f)["train"]["shards"][0] == "train-000000.tar"  # not switched yet
    monkeypatch.setattr(prep_dataset, "write_tar", real)
    calls["n"] = 0
    index = prep_dataset.main(["add-swaps", "--data", data, "--quiet"])
    assert index["train"]["shards"] == ["train-000000.swaps.tar", "train-000001.swaps.tar", "train-000002.swaps.tar"]
    assert index["swaps"]["without"] == 3
    for name in index["train"]["shards"]:
        for files in read_tar(os.path.join(data, name))[0].values():
            assert json.loads(files["json"])["negatives"] == prep_dataset.negative_captions(files["txt"].decode())
    assert train.main(argv(data, tmp_path, "ok", "--hard_negatives", "swaps", "--batch", "4")) == 0


# ----------------------------------------------------------------------------- mining and exported embeddings


def test_nearest_captions_by_hand():
    """4 queries, 3 distinct captions; query 0 and 1 share caption 0, which is never their answer."""
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, -0.6]])
    own = np.array([0, 0, 1, 2])
    near = eval_zeroshot.nearest_captions(queries, keys, own, k=2, chunk=3)  # 2 chunks
    # scores: q0 [1, 0, -1] -> 1, 2; q1 [.6, .8, -.6] -> 1, 2; q2 [0, 1, 0] -> 0 then 2 (tie: lower index);
    # q3 [-.8, -.6, .8] -> 1, 0
    assert near.tolist() == [[1, 2], [1, 2], [0, 2], [1, 0]]
    assert eval_zeroshot.nearest_captions(queries, keys, own, k=9).shape == (4, 2)  # at most U - 1


@pytest.fixture(scope="module")
def ckpt(synth, tmp_path_factory):
    tok = Tokenizer.load(os.path.join(synth, "tokenizer.json"))
    torch.manual_seed(0)
    model = clip.CLIP(clip.get_config("micro", vocab_size=tok.vocab_size, img_size=32))
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tok.to_dict()}, path)
    return str(path)


def test_exported_embeddings_reproduce_retrieval(synth, ckpt, tmp_path):
    emb = str(tmp_path / "emb")
    res = eval_zeroshot.main(["--ckpt", ckpt, "--data", synth, "--save_embeddings", emb, "--out",
                              str(tmp_path / "r.json"), "--workers", "0", "--quiet"])
    a = eval_zeroshot.load_embeddings(emb)
    assert a["image"].dtype == np.float32 and a["image"].shape == (128, 32) and len(a["ids"]) == 128
    assert np.allclose(np.linalg.norm(a["text"], axis=1), 1, atol=1e-5)
    again = eval_zeroshot.evaluate_retrieval(torch.from_numpy(a["image"]), torch.from_numpy(a["text"]))
    assert again == {k: res[k] for k in again}
    assert a["ids"][0] == "val-000000.tar/000000000"


def test_add_negatives_mines_the_nearest_other_captions(synth, ckpt, tmp_path, capsys):
    data = str(tmp_path / "d")
    shutil.copytree(synth, data)
    index = prep_dataset.main(["add-negatives", "--data", data, "--model", ckpt, "--k", "3", "--quiet"])
    assert index["train"]["shards"][0] == "train-000000.mined.tar" and index["mined"]["without"] == 0
    # brute force on the same embeddings, the whole matrix at once (fine at 512 x 512)
    model, _ = __import__("checkpoint_manager").load_model(ckpt)
    tok = Tokenizer.load(os.path.join(synth, "tokenizer.json"))
    loader = ShardLoader(synth, "train", 64, tok, 32, shuffle=False, drop_last=False)
    a = eval_zeroshot.embedding_arrays(eval_zeroshot.encode_split(model, loader, "cpu"), loader, tok)
    loader.close()
    caps = a["captions"].tolist()
    text_of = {c: a["text"][caps.index(c)] for c in caps}
    stored = {}
    for name in index["train"]["shards"]:
        for key, files in read_tar(os.path.join(data, name))[0].items():
            stored[f"{name.replace('.mined', '')}/{key}"] = json.loads(files["json"])["mined"]
    for i, (sid, cap) in enumerate(zip(a["ids"], caps)):
        mined = stored[sid]
        assert len(mined) == 3 == len(set(mined)) and cap not in mined
        others = sorted((c for c in text_of if c != cap), key=lambda c: -float(a["image"][i] @ text_of[c]))
        assert [float(a["image"][i] @ text_of[c]) for c in mined] == pytest.approx(
            [float(a["image"][i] @ text_of[c]) for c in others[:3]], abs=1e-6)
    assert train.main(argv(data, tmp_path, "mined", "--hard_negatives", "both")) == 0
    with pytest.raises(SystemExit) as e:  # add-teacher rebuilds from the original shards: it would drop "mined"
        prep_dataset.main(["add-teacher", "--data", data, "--teacher", ckpt, "--device", "cpu", "--quiet"])
    assert e.value.code == 2 and "would drop what add-negatives wrote" in capsys.readouterr().err


def test_bad_input(synth, tmp_path, capsys):
    for extra, message in [(["add-negatives", "--data", synth, "--model", "/no/such.pt"], "does not exist"),
                           (["add-negatives", "--data", str(tmp_path), "--model", "x"], "has no index.json"),
                           (["add-swaps", "--data", str(tmp_path)], "has no index.json")]:
        with pytest.raises(SystemExit) as e:
            prep_dataset.main(extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(argv(synth, tmp_path, "x", "--hard_negatives", "swaps", "--long"))
    assert "does not combine" in capsys.readouterr().err
