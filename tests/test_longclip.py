"""Long-CLIP (Zhang et al. 2024): the positional stretch, frozen first positions, the PCA coarse feature,
truncation vs long context, and `train.py --long --init` end to end."""

import pytest
import torch

import checkpoint_manager as cm
import clip
import train
from conftest import metrics, train_argv
from tokenizer import Tokenizer


def test_stretch_positions_by_hand():
    old = torch.randn(77, 8, dtype=torch.float64)
    new = clip.stretch_positions(old)  # keep 20, factor 4
    assert new.shape == (248, 8)  # 20 + 4 * 57
    assert torch.equal(new[:20], old[:20])  # kept rows: bitwise
    assert torch.equal(new[20], old[20]) and torch.equal(new[244], old[76])  # fraction 0: the old row itself
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    close(new[21], 0.75 * old[20] + 0.25 * old[21])
    close(new[22], 0.5 * (old[20] + old[21]))
    close(new[23], 0.25 * old[20] + 0.75 * old[21])
    close(new[24], old[21])
    close(new[243], 0.25 * old[75] + 0.75 * old[76])
    close(new[245], old[76] + 0.25 * (old[76] - old[75]))  # past the end: extrapolated
    close(new[247], old[76] + 0.75 * (old[76] - old[75]))
    # rows linear in their index stay linear: old row j -> new rows at j + k/4, for every row at once
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    lin = lambda t: a + t[:, None] * b  # (T, 8)
    j = torch.arange(77, dtype=torch.float64)
    frac = torch.cat([j[:20], (20 + torch.arange(228, dtype=torch.float64) / 4)])  # 0..19, 20, 20.25, ..., 76.75
    close(clip.stretch_positions(lin(j)), lin(frac))


def small_long_model():
    torch.manual_seed(0)
    base = clip.CLIP(clip.get_config("micro", vocab_size=300, context_length=32))
    return base, clip.stretch_text_model(base)  # 32 -> 20 + 4 * 12 = 68 positions


def test_stretched_model_config_and_short_captions_unchanged():
    base, long = small_long_model()
    assert (long.config.text.context_length, long.config.text.freeze_positions) == (68, 20)
    assert long.text.pos_fixed.shape == (20, 32) and long.text.pos_embed.shape == (48, 32)
    assert "text.pos_fixed" not in dict(long.named_parameters())  # a buffer: no optimizer ever sees it
    torch.testing.assert_close(long.text.positions(), clip.stretch_positions(base.text.positions().detach()))
    # a caption of <= 20 tokens only reads the kept positions (causal attention): the same embedding as before
    tokens = torch.zeros(3, 32, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:15], tokens[:, 15] = 297, torch.randint(1, 297, (3, 14)), 299
    long_tokens = torch.cat([tokens, torch.zeros(3, 36, dtype=torch.long)], 1)  # (3, 68) zero padding
    with torch.no_grad():
        torch.testing.assert_close(long.encode_text(long_tokens), base.encode_text(tokens))


def test_first_positions_bitwise_frozen_under_adamw():
    _, model = small_long_model()
    opt = clip.configure_optimizers(model, weight_decay=0.2, lr=1e-2)
    loss_fn = train.make_loss(train.get_parser().parse_args(["--long", "--long_pca", "4"]), model)
    before = model.text.positions().detach().clone()  # (68, C)
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    tokens = torch.randint(1, 299, (8, 68))
    tokens[:, 40] = 299  # eot beyond position 20, so the stretched rows get gradients
    short = torch.randint(1, 299, (8, 68))
    short[:, 10] = 299
    for _ in range(3):
        loss, terms = loss_fn(train.as_float(model(images, tokens, short)), None)
        assert set(terms) == {"loss_long", "loss_short"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.text.positions().detach()
    assert torch.equal(after[:20], before[:20])
    assert (after[20:] != before[20:]).any(dim=1).all()  # every trainable row moved (decay alone moves them)


def test_pca_reconstruct_full_rank_and_rank_one():
    torch.manual_seed(0)
    x = torch.randn(16, 6) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])  # float32: pca_reconstruct runs its SVD in fp32
    torch.testing.assert_close(clip.pca_reconstruct(x, 6), x, atol=1e-5, rtol=0)  # k = feature dim: nothing lost
    recon = clip.pca_reconstruct(x, 1)
    mean = x.mean(0, keepdim=True)
    assert torch.linalg.matrix_rank(recon - mean).item() == 1
    torch.testing.assert_close(recon.mean(0, keepdim=True), mean)  # the mean is added back
    # the kept direction is the top principal one: the residual is orthogonal to it
    v = torch.linalg.svd(x - mean, full_matrices=False).Vh[0]
    torch.testing.assert_close((x - recon) @ v, torch.zeros(16), atol=1e-5, rtol=0)


def test_caption_past_77_tokens_changes_long_model_only():
    torch.manual_seed(0)
    prefix = " ".join(f"the {c} shape number {i} sits here" for i, c in enumerate(["red", "blue", "green"] * 6))
    a, b = prefix + " and then a cat", prefix + " and then a dog on a mat"
    tok = Tokenizer().train([a, b, "a cat", "a dog"], vocab_size=300, quiet=True)
    assert len(tok.encode(prefix)) >= 80
    short, long = tok.tokenize([a, b], 77), tok.tokenize([a, b], 248)
    assert torch.equal(short[0], short[1])  # cut to 75 tokens + eot: the same row
    assert not torch.equal(long[0], long[1])
    cfg = clip.get_config("micro", vocab_size=tok.vocab_size, context_length=77)
    base = clip.CLIP(cfg).eval()
    stretched = clip.stretch_text_model(base).eval()
    assert stretched.config.text.context_length == 248
    with torch.no_grad():
        e77, e248 = base.encode_text(short), stretched.encode_text(long)
    assert torch.equal(e77[0], e77[1])
    assert (e248[0] - e248[1]).abs().max() > 1e-4


def test_train_long_init_end_to_end(synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.Logger, "plot", lambda self: None)  # PNGs are logger.py's to test; here they cost ~10 s
    argv = lambda run, *extra: train_argv(synth, tmp_path, run, "--epochs", "0.125", *extra, ckpt_every=100)
    # the synthetic captions fit in 16 tokens, which train.py would pick; Long-CLIP needs more than its 20 kept
    assert train.main(argv("short")) == 0
    short_path = str(tmp_path / "out" / "short" / "ckpt" / "latest.pt")
    assert cm.load_model(short_path)[0].config.text.context_length == 16
    with pytest.raises(SystemExit) as e:
        train.main(argv("refused", "--long", "--init", short_path))
    assert e.value.code == 2 and "context over 20 tokens; this one has 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the --init model's position table fixes its context
        train.main(argv("refused", "--init", short_path, "--context_length", "32"))
    assert e.value.code == 2 and "the --init model's text context is 16 tokens" in capsys.readouterr().err
    assert train.main(argv("base", "--context_length", "32")) == 0
    base_path = str(tmp_path / "out" / "base" / "ckpt" / "latest.pt")
    base_model, _ = cm.load_model(base_path)
    assert base_model.config.text.context_length == 32
    assert train.main(argv("long", "--long", "--init", base_path)) == 0
    train_rows = metrics(tmp_path, "long", "train")
    assert train_rows and all("loss_long" in m and "loss_short" in m for m in train_rows)
    for m in train_rows:  # total = fine (long caption) + coarse (short caption vs PCA image feature)
        assert m["loss"] == pytest.approx(m["loss_long"] + m["loss_short"], rel=1e-5)
    long_model, ckpt = cm.load_model(str(tmp_path / "out" / "long" / "ckpt" / "latest.pt"))
    assert ckpt["config"]["text"]["context_length"] == 68 and ckpt["config"]["text"]["freeze_positions"] == 20
    assert torch.equal(long_model.text.pos_fixed, base_model.text.positions()[:20])
    stretched = clip.stretch_positions(base_model.text.positions().detach())  # (68, C) where training started
    assert not torch.equal(long_model.text.pos_embed, stretched[20:])  # the stretched rows trained
