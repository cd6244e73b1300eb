"""Acceptance tests for the fixed polytope heads as wired into clip.py and train.py (--head, --head_mode):
the vertex matrix never trains, the flags really switch heads on and off, every head x mode trains, and
checkpoints remember their head."""

import argparse
import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn

import checkpoint_manager as cm
import clip
import train
from conftest import metrics, train_argv
from dataloader import ShardLoader
from simplex import FixedPolytopeHead, polytope_vertices
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every head x mode the micro preset (embed_dim 32) can make; cube+after would need 2^32 vertices
MICRO = [("linear", "replace"), ("simplex", "replace"), ("simplex", "after"), ("orthoplex", "replace"),
         ("orthoplex", "after"), ("cube", "replace")]


def argv(data, tmp, run, *extra):  # 512 train samples / batch 16 x 0.625 epochs = 20 steps
    return train_argv(data, tmp, run, *extra, batch=16, epochs=0.625, ckpt_every=100)


def heads(model):
    return [model.visual.proj, model.text.proj]


def polytopes(model):
    return [m for m in model.modules() if isinstance(m, FixedPolytopeHead)]


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    """train(head, mode) -> dict of the run: train.main's own model and optimizer (captured as built), the
    initial weights, metrics, checkpoint path. Each head x mode is trained once per module (20 micro steps)."""
    tmp, done = tmp_path_factory.mktemp("heads"), {}
    build_model, configure, plot, zero_shot = train.build_model, clip.configure_optimizers, train.Logger.plot, train.zero_shot

    def train_once(head, mode):
        if (head, mode) in done:
            return done[(head, mode)]
        got = {}

        def capture_model(*a, **k):
            got["model"] = build_model(*a, **k)
            got["init"] = {n: t.clone() for n, t in got["model"].state_dict().items()}
            return got["model"]

        def capture_optimizer(*a, **k):
            got["optimizer"] = configure(*a, **k)
            return got["optimizer"]

        run = f"{head}-{mode}"
        train.build_model, clip.configure_optimizers = capture_model, capture_optimizer
        # PNG plots and the zero-shot pass are two thirds of a 20-step run and none of these tests' business
        train.Logger.plot, train.zero_shot = lambda self: None, lambda *a, **k: {}
        try:
            assert train.main(argv(synth, tmp, run, "--head", head, "--head_mode", mode)) == 0
        finally:
            train.build_model, clip.configure_optimizers = build_model, configure
            train.Logger.plot, train.zero_shot = plot, zero_shot
        got["metrics"] = metrics(tmp, run)
        got["ckpt"] = str(tmp / "out" / run / "ckpt" / "latest.pt")
        done[(head, mode)] = got
        return got
    return train_once


# -----------------------------------------------------------------------------
# the vertex matrix is fixed


@pytest.mark.parametrize("head,mode", MICRO)
def test_train_main_learns_and_leaves_the_vertices_alone(runs, head, mode):
    """20 real steps of train.main: finite, decreasing loss; the vertices bitwise as built (AdamW with weight
    decay 0.2 ran over everything the optimizer holds) and not in its param groups; the projection moved."""
    r = runs(head, mode)
    losses = [m["loss"] for m in r["metrics"] if m["split"] == "train"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    model, optimizer = r["model"], r["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert len(polytopes(model)) == (0 if head == "linear" else 2)
    for tower in ("visual", "text"):
        key = f"{tower}.proj.vertices" if mode == "replace" else f"{tower}.proj.1.vertices"
        if head == "linear":
            assert not any("vertices" in k for k in r["init"])
            continue
        buf = model.get_buffer(key)
        assert id(buf) not in in_optimizer and key not in dict(model.named_parameters())
        assert torch.equal(buf, r["init"][key])  # bitwise, after 20 steps
        assert torch.equal(buf, polytope_vertices(head, buf.shape[1]))  # and still the polytope
        assert torch.equal(cm.load(r["ckpt"])["model"][key], buf)  # and saved as such
    # the trainable part of every head did move: all its weights are in the optimizer and changed
    trainable = [n for n, _ in model.named_parameters() if n.startswith(("visual.proj.", "text.proj."))]
    assert trainable and all(id(model.get_parameter(n)) in in_optimizer for n in trainable)
    assert all(not torch.equal(model.get_parameter(n), r["init"][n]) for n in trainable)


# (head, mode, embed_dim) -> output_dim, trainable-parameter difference from the linear head (both towers,
# width 32 each): replace swaps the 32 x embed_dim projection for 32 x d; after keeps it and adds no parameter
HAND = [("linear", "replace", 32, 32, 0),
        ("simplex", "replace", 32, 32, 2 * 32 * (32 - 31)),     # K = 32 vertices in d = 31
        ("simplex", "after", 32, 33, 0),                        # d = 32, K = d + 1
        ("orthoplex", "replace", 32, 32, 2 * 32 * (32 - 16)),   # K = 32 in d = 16
        ("orthoplex", "after", 32, 64, 0),                      # K = 2d
        ("cube", "replace", 32, 32, 2 * 32 * (32 - 5)),         # K = 32 = 2^5
        ("cube", "after", 8, 256, 0)]                           # K = 2^8 (micro's 32 would be 2^32)


@pytest.mark.parametrize("head,mode,embed_dim,out_dim,fewer", HAND)
def test_manual_steps_and_sizes(head, mode, embed_dim, out_dim, fewer):
    """Through the Python API (the only way to get cube+after at micro size): hand-counted sizes, and a few
    AdamW steps from clip.configure_optimizers that move everything but the vertices."""
    torch.manual_seed(0)
    cfg = clip.get_config("micro", vocab_size=300, embed_dim=embed_dim, head=head, head_mode=mode)
    linear = clip.CLIP(clip.get_config("micro", vocab_size=300, embed_dim=embed_dim))
    model = clip.CLIP(cfg)
    assert cfg.output_dim == out_dim
    assert linear.num_params(trainable_only=True) - model.num_params(trainable_only=True) == fewer
    assert model.num_params() == model.num_params(trainable_only=True)  # buffers are no parameters
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 298, (8, 32))
    tokens[:, 7] = 299  # the end-of-text token (highest id)
    optimizer = clip.configure_optimizers(model, weight_decay=0.2, lr=1e-3)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    fixed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("vertices")}
    assert len(fixed) == (0 if head == "linear" else 2)
    assert not any(id(model.get_buffer(n)) in in_optimizer for n in fixed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(5):
        img, txt, scale = model(images, tokens)[:3]
        assert img.shape == txt.shape == (8, out_dim)
        loss = clip.clip_loss(img, txt, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for n, v in fixed.items():
        assert torch.equal(model.get_buffer(n), v)
    moved = [n for n, p in model.named_parameters()
             if n.startswith(("visual.proj.", "text.proj.")) and not torch.equal(p, before[n])]
    assert len(moved) == 2  # the one trainable matrix of each tower's head


@pytest.mark.parametrize("head", ["simplex", "orthoplex", "cube"])
def test_after_is_the_linear_model_seen_through_a_tight_frame(head):
    """V^T V = (K/d) I for all three polytopes, so `after` scales every embedding by sqrt(K/d) and leaves all
    cosines, hence CLIP's logits and loss, exactly as the linear head with the same weights gives them."""
    d = 6
    V = polytope_vertices(head, d).double()  # (K, d)
    assert torch.allclose(V.T @ V, V.shape[0] / d * torch.eye(d, dtype=torch.float64), atol=1e-6)  # float32 rows
    torch.manual_seed(0)
    linear = clip.CLIP(clip.get_config("micro", vocab_size=300, embed_dim=d)).eval()
    after = clip.CLIP(clip.get_config("micro", vocab_size=300, embed_dim=d, head=head, head_mode="after")).eval()
    sd = {k.replace("proj.weight", "proj.0.weight") if k.endswith(("visual.proj.weight", "text.proj.weight")) else k: v
          for k, v in linear.state_dict().items()}
    after.load_state_dict({**after.state_dict(), **sd})  # same weights; the vertices stay the after model's own
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 298, (4, 32))
    tokens[:, 5] = 299
    with torch.no_grad():
        (a_img, a_txt), (l_img, l_txt) = after(images, tokens)[:2], linear(images, tokens)[:2]
    assert a_img.shape[1] == V.shape[0] and l_img.shape[1] == d
    assert torch.allclose(a_img @ a_txt.T, l_img @ l_txt.T, atol=1e-6)


# -----------------------------------------------------------------------------
# the flags


def test_flags_switch_heads_on_and_off(synth):
    parser = train.get_parser()
    a = parser.parse_args([])
    assert (a.head, a.head_mode) == ("linear", "replace")
    assert parser.parse_args(["--head", "simplex"]).head == "simplex"
    assert parser.parse_args(["--head", "cube", "--head_mode", "after"]).head_mode == "after"
    for bad in (["--head", "True"], ["--head_mode", "before"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(bad)
        assert e.value.code == 2
    # every on/off flag: off when absent, on when given; --no-X really turns X off (the argparse boolean-type trap of our notes)
    switches = [act for act in parser._actions if act.nargs == 0 and act.dest != "help"]
    assert switches
    for act in switches:
        assert act.type is not bool
        on = [s for s in act.option_strings if not s.startswith("--no-")][0]
        if isinstance(act, argparse._StoreTrueAction):
            assert getattr(parser.parse_args([]), act.dest) is False, act.dest
        assert getattr(parser.parse_args([on]), act.dest) is True, act.dest
        for off in (s for s in act.option_strings if s.startswith("--no-")):
            assert getattr(parser.parse_args([on, off]), act.dest) is False, act.dest
    src = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    assert not re.search(r"type\s*=\s*bool\b", src)
    # a model built from default flags (or with only --head_mode) has plain linear projections
    with open(os.path.join(synth, "index.json")) as f:
        index = json.load(f)
    tok = Tokenizer.load(os.path.join(synth, "tokenizer.json"))
    for flags in ([], ["--head_mode", "after"], ["--head", "simplex"]):
        args = parser.parse_args(["--preset", "micro", *flags])
        config, _, _ = train.build_config(args, index, tok, 0)
        model = train.build_model(args, config, None, quiet=True)
        if flags == ["--head", "simplex"]:
            assert all(isinstance(h, FixedPolytopeHead) and h.kind == "simplex" for h in heads(model))
            continue
        assert config.head == "linear"
        assert all(type(h) is nn.Linear for h in heads(model)) and not polytopes(model)
        assert not any("vertices" in k for k in model.state_dict())


def test_cube_after_at_micro_size_is_one_clear_error(synth, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv(synth, tmp_path, "cube", "--head", "cube", "--head_mode", "after"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "embed_dim" in err and "2^32" in err and "16" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_rebuilds_the_same_head_and_embeddings(runs, synth):
    r = runs("simplex", "replace")
    model, ckpt = cm.load_model(r["ckpt"])
    assert ckpt["config"]["head"] == "simplex" and ckpt["config"]["head_mode"] == "replace"
    assert [(h.kind, h.d, h.K) for h in heads(model)] == [("simplex", 31, 32)] * 2
    tok = Tokenizer.from_dict(ckpt["tokenizer"])
    batch = next(iter(ShardLoader(synth, "val", 64, tok, model.config.text.context_length, shuffle=False)))
    images = clip.normalize_images(batch["image"])
    trained = r["model"].eval()  # the very model train.main trained
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), trained.encode_image(images))
        assert torch.equal(model.encode_text(batch["text"]), trained.encode_text(batch["text"]))
    # the head is read from the checkpoint, not defaulted: a linear model cannot take these weights
    with pytest.raises(RuntimeError):
        clip.CLIP(clip.CLIPConfig.from_dict({**ckpt["config"], "head": "linear"})).load_state_dict(ckpt["model"])
