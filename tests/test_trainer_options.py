"""--loss siglip, --patch_dropout, --grad_ckpt: the sigmoid loss by hand, its gradient under accumulation and
across 2 gloo processes, patch dropout's token count / determinism / eval behaviour / FLOPs, activation
checkpointing's gradients and saved memory, bitwise resume with all three on, and the bad-input lines."""

import contextlib
import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint_manager as cm
import clip
import train
from conftest import metrics, usage_error
from conftest import train_argv as argv
from test_train import ROOT, final_weights


def micro(**overrides):
    torch.manual_seed(0)
    return clip.CLIP(clip.get_config("micro", vocab_size=300, **overrides))


def batch_of(n):
    torch.manual_seed(1)
    images = torch.randn(n, 3, 32, 32)
    tokens = torch.randint(1, 298, (n, 32))
    tokens[:, 9] = 299  # eot
    return images, tokens


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- the sigmoid loss

def test_siglip_loss_3x3_by_hand():
    # img = I, so img @ txt^T has txt's columns as rows: S = [[1, .6, 0], [0, .8, 0], [0, 0, -1]]
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    t, b = 2.0, -1.0
    S = [[1.0, 0.6, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, -1.0]]
    softplus = lambda z: math.log(1 + math.exp(z))  # -log sigmoid(x) = softplus(-x)
    # each pair: -log sigmoid(label * (t * s + b)), label +1 on the diagonal, -1 off it; sum per image, mean over images
    rows = [sum(softplus(-(t * S[i][j] + b)) if i == j else softplus(t * S[i][j] + b) for j in range(3)) for i in range(3)]
    want = sum(rows) / 3
    got = clip.siglip_loss(img, txt, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(want, abs=1e-12)
    # the values themselves, written out: image 0 has logits (1, 0.2, -1), image 1 (-1, 0.6, -1), image 2 (-1, -1, -3)
    assert rows[0] == pytest.approx(softplus(-1) + softplus(0.2) + softplus(-1), abs=1e-12)
    assert rows[2] == pytest.approx(softplus(3) + 2 * softplus(-1), abs=1e-12)
    # "DDP": one image per rank against all 3 captions, its own at column offset; the mean over ranks is the loss
    per_rank = [clip.siglip_loss(img[r:r + 1], txt[r:r + 1], torch.tensor(t), torch.tensor(b), all_txt=txt, offset=r)
                for r in range(3)]
    assert [x.item() for x in per_rank] == pytest.approx(rows, abs=1e-12)


def test_siglip_model_init_checkpoint_and_export(tmp_path):
    model = micro(loss="siglip")
    assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    assert not hasattr(micro(), "logit_bias")  # a CLIP model is unchanged
    assert micro().logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    outs = model(*batch_of(2))
    assert outs.logit_bias is model.logit_bias and micro()(*batch_of(2)).logit_bias is None
    no_decay = clip.configure_optimizers(model, 0.2, 1e-3).param_groups[1]["params"]
    assert any(p is model.logit_bias for p in no_decay)  # a scalar: never decayed
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    path = cm.CheckpointManager(tmp_path).save({"model": model.state_dict(), "config": model.config.to_dict()}, step=1)
    back, _ = cm.load_model(path)
    assert back.config.loss == "siglip" and back.logit_bias.item() == -3.25
    with pytest.raises(ValueError, match="bias"):
        cm.to_openai_state_dict(model)
    cm.to_openai_state_dict(micro())  # the softmax model still exports


@pytest.mark.parametrize("flags", [["--loss", "siglip"], ["--loss", "siglip", "--long"],
                                   ["--loss", "siglip", "--distill", "kd"], ["--patch_dropout", "0.5"]])
def test_accumulation_gives_the_big_batch_gradient(flags):
    """GradCache with 4 micro-batches of 3 = one batch of 12: the bias is a scalar leaf taken once; patch dropout's
    indices are split like the images, so both passes over a micro-batch drop the same patches."""
    siglip = "siglip" in flags
    dropout = 0.5 if "--patch_dropout" in flags else 0.0
    model = micro(loss="siglip" if siglip else "clip", patch_dropout=dropout, teacher_dim=24 if "--distill" in flags else 0)
    images, tokens = batch_of(12)
    keep = train.patch_keep(model.config, 0, 7, 0, 12, "cpu")  # None without dropout
    inputs = (images, tokens, tokens.roll(1, dims=0) if "--long" in flags else None, keep)
    torch.manual_seed(2)
    batch = {"teacher_image": F.normalize(torch.randn(12, 24), dim=-1), "teacher_text": F.normalize(torch.randn(12, 24), dim=-1)}
    loss_fn = train.make_loss(train.get_parser().parse_args(flags + ["--long_pca", "4"]), model)
    results = []
    for accum in (1, 4):
        model.zero_grad()
        loss, terms = train.forward_backward(model, inputs, accum, contextlib.nullcontext(), loss_fn, batch)
        results.append((loss, grads_of(model)))
    (l1, g1), (l4, g4) = results
    assert l1.item() == pytest.approx(l4.item(), abs=1e-5)
    assert g1.keys() == g4.keys()
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n
    if siglip:
        assert g1["logit_bias"].abs().item() > 0
    if "--distill" in flags:  # siglip + kd is allowed: the kd term is the softmax loss, which the bias cannot change
        outs = model(images, tokens)
        to_teacher = lambda x: F.normalize(model.distill_proj(x), dim=-1)  # student (32) -> teacher (24) space
        kd = clip.kd_loss(to_teacher(outs.image), to_teacher(outs.text), outs.logit_scale,
                          batch["teacher_image"], batch["teacher_text"])
        assert terms["loss_distill"].item() == pytest.approx(kd.item(), abs=1e-5)
        assert terms["loss_clip"].item() == pytest.approx(
            clip.siglip_loss(outs.image, outs.text, outs.logit_scale, outs.logit_bias).item(), abs=1e-4)


def test_siglip_two_gloo_processes_with_accumulation_match_one_process(synth, tmp_path):
    """torchrun, 2 gloo processes x 2 micro-batches of 8 (with --grad_ckpt, which must change nothing) = 1 process,
    one batch of 32: the first step's gradient norm (before clipping) agrees to float rounding, and so does every
    later step's loss, bias and scale."""
    common = ["--epochs", "0.25", "--max_lr", "1e-3", "--loss", "siglip"]  # 4 steps
    assert train.main(argv(synth, tmp_path, "one", *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py")] + argv(synth, tmp_path, "two", *common) + ["--batch", "8", "--accum", "2", "--grad_ckpt"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    rows = {run: [r for r in metrics(tmp_path, run) if r["split"] == "train"] for run in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 4
    assert rows["one"][0]["grad_norm"] == pytest.approx(rows["two"][0]["grad_norm"], rel=1e-6)
    for key in ("loss", "grad_norm", "logit_bias", "logit_scale"):  # later steps: rounding grows through Adam
        assert [r[key] for r in rows["one"]] == pytest.approx([r[key] for r in rows["two"]], rel=1e-4, abs=1e-5), key
    assert rows["one"][-1]["logit_bias"] != -10.0  # the bias trains


# ----------------------------------------------------------------------------- patch dropout

def test_patch_keep_count_and_positions():
    model = micro(patch_dropout=0.5)
    vc = model.config.vision
    n = (vc.img_size // vc.patch_size) ** 2  # 16 patches at 32 px / patch 8
    assert clip.kept_patches(vc) == 8
    assert [clip.kept_patches(clip.VisionConfig(32, 8, 32, 1, 1, p)) for p in (0.0, 0.25, 0.9, 0.99)] == [16, 12, 2, 1]
    keep = clip.sample_patch_keep(5, vc, torch.Generator().manual_seed(0))
    assert keep.shape == (5, 8) and keep.dtype == torch.int64
    for row in keep.tolist():  # distinct patches, in raster order
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < n
    assert len({tuple(r) for r in keep.tolist()}) == 5  # chosen per image
    images = batch_of(5)[0]
    seen = []
    hook = model.visual.ln_pre.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    _, hidden = model.encode_image(images, return_hidden=True, patch_keep=keep)
    _, full_hidden = model.encode_image(images, return_hidden=True)
    hook.remove()
    assert all(h.shape == (5, 8 + 1, 32) for h in hidden) and full_hidden[0].shape == (5, n + 1, 32)
    dropped, full = seen
    assert torch.equal(dropped[:, 0], full[:, 0])  # the class token, always kept
    # every kept token is the full run's token at its patch: positions were added before dropping
    assert torch.equal(dropped[:, 1:], torch.stack([full[i, 1 + keep[i]] for i in range(5)]))


def test_patch_keep_depends_only_on_seed_step_and_rank():
    cfg = clip.get_config("micro", vocab_size=300, patch_dropout=0.5)
    a = train.patch_keep(cfg, 3, 10, 0, 6, "cpu")
    torch.manual_seed(123)
    torch.rand(100)  # anything else drawing from the global RNG does not move it
    assert torch.equal(a, train.patch_keep(cfg, 3, 10, 0, 6, "cpu"))
    for other in [(4, 10, 0), (3, 11, 0), (3, 10, 1)]:  # another seed, step or rank: another choice
        assert not torch.equal(a, train.patch_keep(cfg, *other, 6, "cpu"))
    assert train.patch_keep(clip.get_config("micro", vocab_size=300), 3, 10, 0, 6, "cpu") is None


def test_eval_and_encode_image_see_every_patch():
    model, plain = micro(patch_dropout=0.5), micro()
    plain.load_state_dict(model.state_dict())
    images, tokens = batch_of(4)
    for mode in (True, False):  # the model drops only what the trainer asks it to drop
        model.train(mode), plain.train(mode)
        assert torch.equal(model.encode_image(images), plain.encode_image(images))
        assert torch.equal(model(images, tokens).image, plain(images, tokens).image)
    keep = clip.sample_patch_keep(4, model.config.vision, torch.Generator().manual_seed(0))
    assert not torch.allclose(model.encode_image(images, patch_keep=keep), model.encode_image(images))


def test_flops_count_the_kept_tokens():
    full = clip.get_config("seed", patch_dropout=0.0)
    half = clip.get_config("seed", patch_dropout=0.5)
    C, L = 768, 8  # seed vision tower; 196 patches -> 98 kept, T = 197 -> 99 (the patch embedding is unchanged)
    tower = lambda T: 6 * L * 12 * C ** 2 * T + 12 * L * C * T ** 2
    assert clip.estimate_flops_per_sample(full) - clip.estimate_flops_per_sample(half) == tower(197) - tower(99)


# ----------------------------------------------------------------------------- activation checkpointing

def saved_bytes(model, inputs):
    """Bytes of the distinct non-parameter storages autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_grad_ckpt_gives_the_same_gradients_and_saves_less(loss):
    model = micro(loss=loss, patch_dropout=0.25)
    images, tokens = batch_of(8)
    inputs = (images, tokens, None, train.patch_keep(model.config, 0, 0, 0, 8, "cpu"))
    loss_fn = train.make_loss(train.get_parser().parse_args(["--loss", loss]), model)
    results = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt).zero_grad()
        results.append((train.forward_backward(model, inputs, 2, contextlib.nullcontext(), loss_fn)[0],
                        grads_of(model), saved_bytes(model, inputs)))
    (l0, g0, b0), (l1, g1, b1) = results
    assert l0.item() == l1.item()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=0), n
    assert b1 < 0.5 * b0  # the blocks' insides are no longer kept
    model.eval()  # outside training: no checkpointing, the same as without
    assert saved_bytes(model, inputs) == b0


def test_stop_and_resume_is_bitwise_identical_with_every_option(synth, tmp_path):
    """--grad_ckpt, --patch_dropout (drawn per step, both GradCache passes alike) and --loss siglip: a run stopped
    at step 5 and resumed ends with the same weights and losses as one that never stopped."""
    opts = ["--epochs", "0.625", "--grad_ckpt", "--patch_dropout", "0.5", "--loss", "siglip", "--accum", "2",
            "--batch", "16", "--eval_batches", "1"]  # 10 steps of 2 x 16
    assert train.main(argv(synth, tmp_path, "full", *opts)) == 0
    assert train.main(argv(synth, tmp_path, "split", *opts, "--stop_at", "5")) == 0
    torch.rand(7)  # the global RNG moves between the two halves; the resumed run restores it anyway
    assert train.main(argv(synth, tmp_path, "split", *opts, "--resume", "latest")) == 0
    a, b = final_weights(tmp_path, "full"), final_weights(tmp_path, "split")
    assert a.keys() == b.keys() and "logit_bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [r["loss"] for r in metrics(tmp_path, run) if r["split"] == "train"]
    assert len(losses("full")) == 10 and losses("full") == losses("split")


def test_grad_ckpt_and_patch_dropout_under_compile(synth, tmp_path, monkeypatch):
    """train.py --compile --grad_ckpt --patch_dropout runs, and a new kept-patch tensor each step does not recompile.
    The compiler backend is aot_eager (dynamo + AOT autograd, the parts that must handle the non-reentrant
    checkpoint), not inductor, whose C++ build takes minutes on a 2-core CPU."""
    import torch._dynamo
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    try:
        assert train.main(argv(synth, tmp_path, "compiled", "--compile", "--grad_ckpt", "--patch_dropout", "0.5",
                               "--epochs", "0.25", "--eval_batches", "1")) == 0  # 4 steps
    finally:
        torch._dynamo.reset()
    assert len([r for r in metrics(tmp_path, "compiled") if r["split"] == "train"]) == 4


@pytest.mark.parametrize("extra, message", [
    (["--patch_dropout", "1"], "--patch_dropout must be in [0, 1)"),
    (["--patch_dropout", "-0.1"], "--patch_dropout must be in [0, 1)"),
    (["--loss", "siglip", "--label_smoothing", "0.1"], "--label_smoothing applies to the softmax loss only"),
    (["--loss", "sigmoid"], "invalid choice"),
])
def test_bad_input_is_one_clear_line(synth, tmp_path, extra, message):
    assert message in usage_error(argv(synth, tmp_path) + extra)
