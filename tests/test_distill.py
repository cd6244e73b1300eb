"""Distillation: the three losses against hand-computed values, stored teacher embeddings (prep_dataset.py
add-teacher -> shards -> ShardLoader -> train.py), the online teacher, and teachers that differ from the
student in tokenizer, embedding size and image size."""

import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint_manager as cm
import clip
import conftest
import dataloader
import prep_dataset
import train
from dataloader import ShardLoader
from tokenizer import Tokenizer


def read_tar(path):
    """{key: {ext: bytes}} of a shard, read in memory."""
    return dataloader.read_tar(path)[0]


# ----------------------------------------------------------------------------- the losses, by hand

def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def soft_ce(t_rows, s_rows):
    """mean over rows of -sum_j softmax(t)_j log softmax(s)_j, with plain floats."""
    return sum(-sum(p * math.log(q) for p, q in zip(softmax(t), softmax(s))) for t, s in zip(t_rows, s_rows)) / len(t_rows)


def matmul_t(a, b, scale):  # scale * a @ b^T on lists
    return [[scale * sum(x * y for x, y in zip(r, c)) for c in b] for r in a]


def transpose(m):
    return [list(r) for r in zip(*m)]


T = lambda rows: torch.tensor(rows, dtype=torch.float64)
EYE = [[1.0, 0.0], [0.0, 1.0]]
SKEW = [[0.6, 0.8], [0.8, 0.6]]  # unit rows


def test_kd_loss_by_hand():
    # student logits 1 * I (img = txt = I), teacher logits SKEW: both symmetric, so both directions agree;
    # each row: -(p (1 - L) + (1 - p)(-L)) = L - p with L = log(1 + e), p = softmax(0.6, 0.8)_0 = 1 / (1 + e^0.2)
    want = math.log(1 + math.e) - 1 / (1 + math.exp(0.2))
    got = clip.kd_loss(T(EYE), T(EYE), torch.tensor(1.0), T(EYE), T(SKEW), teacher_scale=1.0)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # 3 x 2, nothing symmetric: image->text rows and text->image rows differ
    img, txt = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.8, 0.6], [1.0, 0.0], [0.0, -1.0]]
    t_img, t_txt = [[0.0, 1.0], [0.6, -0.8], [1.0, 0.0]], [[0.28, 0.96], [1.0, 0.0], [-0.6, 0.8]]
    s, t = matmul_t(img, txt, 3.0), matmul_t(t_img, t_txt, 5.0)
    want = (soft_ce(t, s) + soft_ce(transpose(t), transpose(s))) / 2
    got = clip.kd_loss(T(img), T(txt), torch.tensor(3.0), T(t_img), T(t_txt), teacher_scale=5.0)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_mse_loss_by_hand():
    # image differences (0.4, -0.8, -0.8, 0.4): (0.16 + 0.64 + 0.64 + 0.16) / 4 = 0.4; text identical: 0
    assert clip.mse_loss(T(EYE), T(EYE), T(SKEW), T(EYE)).item() == pytest.approx(0.4, abs=1e-12)
    # 3 x 2: image (0.36 + 0 + 0 + 0.04 + 1 + 1) / 6 = 0.4; text (0 + 4 + 0 + 0 + 0.16 + 0) / 6 = 0.69333...
    img, t_img = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.4, 0.0], [0.6, 1.0], [1.0, 0.0]]
    txt, t_txt = [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], [[0.0, -1.0], [1.0, 0.0], [0.2, 0.8]]
    assert clip.mse_loss(T(img), T(txt), T(t_img), T(t_txt)).item() == pytest.approx(0.4 + 4.16 / 6, abs=1e-12)


def test_icl_loss_by_hand():
    # scale 2: student images vs teacher captions: 2 * SKEW, CE of the diagonal = log(1 + e^(1.6 - 1.2));
    # student captions vs teacher images: 2 * I, CE = log(1 + e^-2)
    want = (math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(-2.0))) / 2
    got = clip.icl_loss(T(EYE), T(EYE), torch.tensor(2.0), T(EYE), T(SKEW))
    assert got.item() == pytest.approx(want, abs=1e-12)
    img, txt = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.8, 0.6], [1.0, 0.0], [0.0, -1.0]]
    t_img, t_txt = [[0.0, 1.0], [0.6, -0.8], [1.0, 0.0]], [[0.28, 0.96], [1.0, 0.0], [-0.6, 0.8]]
    ce = lambda rows: sum(-math.log(softmax(r)[i]) for i, r in enumerate(rows)) / len(rows)
    want = (ce(matmul_t(img, t_txt, 3.0)) + ce(matmul_t(txt, t_img, 3.0))) / 2
    assert clip.icl_loss(T(img), T(txt), torch.tensor(3.0), T(t_img), T(t_txt)).item() == pytest.approx(want, abs=1e-12)


def test_kd_minimum_is_the_teacher_entropy():
    """Teacher logits = the student's: kd is the mean entropy of the rows (and of the columns), and moving the
    student anywhere only increases it."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    S = matmul_t(img.tolist(), txt.tolist(), 4.0)
    entropy = lambda rows: sum(-sum(p * math.log(p) for p in softmax(r)) for r in rows) / len(rows)
    want = (entropy(S) + entropy(transpose(S))) / 2
    kd = lambda i, t: clip.kd_loss(i, t, torch.tensor(4.0), img, txt, teacher_scale=4.0).item()
    assert kd(img, txt) == pytest.approx(want, abs=1e-12)
    for _ in range(10):
        i2 = F.normalize(img + 0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
        t2 = F.normalize(txt + 0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
        assert kd(i2, t2) > want + 1e-6


# ----------------------------------------------------------------------------- data and teachers

def train_argv(data, tmp, run, *extra):
    return conftest.train_argv(data, tmp, run, *extra, ckpt_every=1000)


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The PNGs train.py draws cost seconds per run on 2 cores and are not what this file tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Logger, "plot", lambda self: None)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny synthetic set: 128 train (2 shards) / 32 val at 32 px; copied before anything rewrites it."""
    out = tmp_path_factory.mktemp("distill") / "base"
    prep_dataset.main(["synthetic", "--out", str(out), "--num_train", "128", "--num_val", "32", "--img_size", "32",
                       "--shard_size", "64", "--workers", "1", "--quiet"])
    return str(out)


@pytest.fixture(scope="module")
def teacher(base, tmp_path_factory):
    """A micro teacher trained (a few steps) on the same images but with its own tokenizer of another vocab."""
    tmp = tmp_path_factory.mktemp("teacher")
    data = copy_data(base, tmp / "data")
    captions = [c for m in ("train-000000.tar", "train-000001.tar") for c in
                prep_dataset.shard_captions(os.path.join(data, m))]
    Tokenizer().train(captions, 300, quiet=True).save(os.path.join(data, "tokenizer.json"))
    assert train.main(train_argv(data, tmp, "t", "--epochs", "2")) == 0
    return str(tmp / "out" / "t" / "ckpt" / "latest.pt")


@pytest.fixture(scope="module")
def stored(base, teacher, tmp_path_factory):
    """A copy of base with the teacher's embeddings stored by add-teacher."""
    data = copy_data(base, tmp_path_factory.mktemp("stored") / "data")
    prep_dataset.main(["add-teacher", "--data", data, "--teacher", teacher, "--batch", "50", "--device", "cpu",
                       "--quiet"])
    return data


def teacher_on_raw(ckpt_path, samples):
    """The teacher's embeddings computed here, from raw JPEGs and raw captions with its own tokenizer."""
    from PIL import Image
    model, ckpt = cm.load_model(ckpt_path)
    tok = Tokenizer.from_dict(ckpt["tokenizer"])
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).transpose(2, 0, 1) for s in samples])
    x = clip.normalize_images(torch.from_numpy(imgs))  # (B, 3, S, S)
    size = model.config.vision.img_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    tokens = tok.tokenize([s["txt"].decode() for s in samples], model.config.text.context_length)
    with torch.no_grad():
        outs = model(x, tokens)
    return outs.image, outs.text


# ----------------------------------------------------------------------------- stored embeddings

def test_add_teacher_round_trip(base, teacher, stored):
    with open(os.path.join(stored, "index.json")) as f:
        index = json.load(f)
    assert index["teacher"] == {"ckpt": teacher, "dim": 32, "tokenizer_differs": True, "skipped": {}}
    assert index["train"]["shards_base"] == ["train-000000.tar", "train-000001.tar"]
    assert index["train"]["shards"] == ["train-000000.teacher.tar", "train-000001.teacher.tar"]
    assert index["val"]["shards"] == ["val-000000.teacher.tar"] and index["train"]["num_samples"] == 128

    # every original member is kept byte for byte; two float16 (32,) arrays are added
    stored_img, stored_txt, samples = [], [], []
    for name in index["train"]["shards"]:
        old = read_tar(os.path.join(stored, name.replace(".teacher", "")))
        new = read_tar(os.path.join(stored, name))
        assert list(new) == list(old)
        for key in sorted(new):
            assert {e: new[key][e] for e in old[key]} == old[key]
            a, b = (np.load(io.BytesIO(new[key][f"teacher_{w}.npy"]), allow_pickle=False) for w in ("image", "text"))
            assert a.dtype == b.dtype == np.float16 and a.shape == b.shape == (32,)
            stored_img.append(a), stored_txt.append(b), samples.append(new[key])
    stored_img, stored_txt = np.stack(stored_img), np.stack(stored_txt)  # (128, 32) float16

    # ShardLoader hands back exactly the stored float16 values, as float32
    loader = ShardLoader(stored, "train", batch_size=50, shuffle=False, drop_last=False)
    batches = list(loader)
    got_img = torch.cat([b["teacher_image"] for b in batches])  # (128, 32)
    got_txt = torch.cat([b["teacher_text"] for b in batches])
    assert got_img.dtype == torch.float32
    assert torch.equal(got_img, torch.from_numpy(stored_img.astype(np.float32)))
    assert torch.equal(got_txt, torch.from_numpy(stored_txt.astype(np.float32)))

    # ... and they are the teacher's normalised embeddings of the raw caption, in its own tokenizer
    want_img, want_txt = teacher_on_raw(teacher, samples)
    assert torch.allclose(got_img, want_img, atol=2e-3) and torch.allclose(got_txt, want_txt, atol=2e-3)
    assert torch.allclose(got_txt.norm(dim=-1), torch.ones(128), atol=2e-3)


def test_add_teacher_restarts(base, teacher, tmp_path):
    data = copy_data(base, tmp_path / "data")
    run = lambda: prep_dataset.main(["add-teacher", "--data", data, "--teacher", teacher, "--device", "cpu", "--quiet"])
    run()
    paths = [os.path.join(data, m) for m in sorted(os.listdir(data)) if m.endswith(".teacher.tar")]
    assert len(paths) == 3
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    os.remove(paths[1])  # as if interrupted before this shard was written
    run()
    for p in paths:  # complete shards are skipped; the missing one is remade, byte for byte
        assert open(p, "rb").read() == before[p][1]
        assert (os.stat(p).st_mtime_ns == before[p][0]) == (p != paths[1])
    with open(os.path.join(data, "index.json")) as f:
        assert json.load(f) == index  # the re-run reads the originals from shards_base
    assert not [m for m in os.listdir(data) if ".tmp" in m]


def test_add_teacher_bad_input(base, tmp_path, capsys):
    for argv, msg in [(["--data", str(tmp_path), "--teacher", "x.pt"], "has no index.json"),
                      (["--data", base, "--teacher", str(tmp_path / "x.pt")], "does not exist"),
                      (["--data", base, "--teacher", os.path.join(base, "index.json")], "not a usable checkpoint")]:
        with pytest.raises(SystemExit) as e:
            prep_dataset.main(["add-teacher", *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_stored_teacher_costs_no_forward_pass(stored, teacher, tmp_path, monkeypatch):
    """With stored embeddings the teacher is never built (even when --teacher is also given)."""
    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be built when the shards hold its embeddings")
    monkeypatch.setattr(train, "OnlineTeacher", no_teacher)
    monkeypatch.setattr(cm, "load_model", no_teacher)
    for mode in ("kd", "mse", "icl"):
        assert train.main(train_argv(stored, tmp_path, mode, "--distill", mode, "--teacher", teacher)) == 0
        recs = conftest.metrics(tmp_path, mode, "train")
        assert len(recs) == 4 and all(math.isfinite(r["loss_distill"]) and r["loss_distill"] > 0 for r in recs)
        # total = (1 - w) * clip + w * distill, w = 0.5
        assert all(r["loss"] == pytest.approx(0.5 * (r["loss_clip"] + r["loss_distill"]), rel=1e-5) for r in recs)


def test_partly_stored_teacher_is_an_error(stored, tmp_path, capsys):
    """A shard where only some samples have embeddings: exit 2 naming the shard, before any training."""
    data = copy_data(stored, tmp_path / "data")
    name = "train-000001.teacher.tar"
    samples = sorted(read_tar(os.path.join(data, name)).items())
    for key, files in samples[::3]:  # a third of the samples lose their embeddings
        del files["teacher_image.npy"], files["teacher_text.npy"]
    dataloader.write_tar(os.path.join(data, name), samples)
    with pytest.raises(SystemExit) as e:
        train.main(train_argv(data, tmp_path, "partial", "--distill", "kd"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and name in err and "22 of 64 samples" in err
    assert not os.path.exists(tmp_path / "logs" / "partial")


# ----------------------------------------------------------------------------- the online teacher

def test_online_teacher_gives_the_stored_targets(base, teacher, stored):
    """The online teacher (student tokens decoded, re-tokenized with the teacher's own tokenizer) computes what
    add-teacher stored from the raw captions."""
    data_tok = Tokenizer.load(os.path.join(base, "tokenizer.json"))
    online = train.OnlineTeacher(teacher, data_tok, "cpu")
    batch = next(iter(ShardLoader(stored, "train", batch_size=64, context_length=32, shuffle=False)))
    t_img, t_txt = online(batch)
    assert torch.allclose(t_img, batch["teacher_image"], atol=2e-3)
    assert torch.allclose(t_txt, batch["teacher_text"], atol=2e-3)


def test_online_teacher_with_its_own_tokenizer(base, teacher, tmp_path, monkeypatch):
    """No stored embeddings + --teacher of another vocab: the teacher runs in-process, stays out of the optimizer,
    is not changed, and the distillation loss goes down."""
    built, opts = [], []
    real_teacher, real_opt = train.OnlineTeacher, clip.configure_optimizers
    monkeypatch.setattr(train, "OnlineTeacher", lambda *a: built.append(real_teacher(*a)) or built[-1])
    monkeypatch.setattr(clip, "configure_optimizers", lambda model, *a, **k: opts.append(real_opt(model, *a, **k))
                        or opts[-1])
    assert train.main(train_argv(base, tmp_path, "online", "--distill", "kd", "--teacher", teacher,
                                 "--epochs", "4", "--distill_weight", "0.9")) == 0
    (t,), (opt,) = built, opts
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt or p.requires_grad for p in t.model.parameters())
    saved = cm.load_model(teacher)[0].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in t.model.state_dict().items())  # the teacher never moved
    d = [r["loss_distill"] for r in conftest.metrics(tmp_path, "online", "train")]
    assert len(d) == 16 and all(math.isfinite(x) for x in d)
    assert sum(d[-4:]) < sum(d[:4])


def test_teacher_of_another_size_gets_a_projection(base, tmp_path, monkeypatch):
    """A 48-dim teacher at 64 px (a hand-made checkpoint): add-teacher resizes the 32 px images for it, and the
    32-dim student learns distill_proj (48 x 32), which is in the optimizer and trains."""
    tok = Tokenizer.load(os.path.join(base, "tokenizer.json"))
    torch.manual_seed(1)
    config = clip.get_config("micro", vocab_size=tok.vocab_size, img_size=64, embed_dim=48)
    path = str(tmp_path / "wide.pt")
    torch.save({"model": clip.CLIP(config).state_dict(), "config": config.to_dict(), "tokenizer": tok.to_dict()},
               path)
    data = copy_data(base, tmp_path / "data")
    prep_dataset.main(["add-teacher", "--data", data, "--teacher", path, "--device", "cpu", "--quiet"])
    with open(os.path.join(data, "index.json")) as f:
        assert json.load(f)["teacher"] == {"ckpt": path, "dim": 48, "tokenizer_differs": False, "skipped": {}}
    samples = [s for _, s in sorted(read_tar(os.path.join(data, "train-000000.teacher.tar")).items())][:8]
    want_img, want_txt = teacher_on_raw(path, samples)  # 32 px -> 64 px bicubic, as add-teacher does it
    got = lambda w: torch.from_numpy(np.stack([np.load(io.BytesIO(s[f"teacher_{w}.npy"])) for s in samples]).astype(np.float32))
    assert torch.allclose(got("image"), want_img, atol=2e-3) and torch.allclose(got("text"), want_txt, atol=2e-3)

    seen = []
    real_opt = clip.configure_optimizers

    def capture(model, *a, **k):  # the student and its optimizer, with the projection as initialised
        seen.append((model, real_opt(model, *a, **k), model.distill_proj.weight.detach().clone()))
        return seen[-1][1]
    monkeypatch.setattr(clip, "configure_optimizers", capture)
    assert train.main(train_argv(data, tmp_path, "proj", "--distill", "mse")) == 0
    (model, opt, start), = seen
    assert model.config.teacher_dim == 48 and model.distill_proj.weight.shape == (48, 32)
    assert any(p is model.distill_proj.weight for g in opt.param_groups for p in g["params"])
    trained = cm.load(str(tmp_path / "out" / "proj" / "ckpt" / "latest.pt"))["model"]["distill_proj.weight"]
    assert torch.equal(trained, model.distill_proj.weight.detach()) and not torch.equal(trained, start)
