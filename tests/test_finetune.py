"""Fine-tuning toolkit: adapters, LiT locks, text pooling variants, partial loading, adapter-only checkpoints."""

import re

import pytest
import torch

import checkpoint_manager as cm
import clip
import train
from conftest import train_argv


@pytest.fixture(autouse=True, scope="module")
def fast():
    # tiny models on a shared 2-core box: one thread avoids OpenMP spin-waits (several times faster), and no PNGs
    # (matplotlib takes most of a 2-step run; test_logger covers the plots)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Logger, "plot", lambda self: None)
        yield
    torch.set_num_threads(n)


def argv(data, tmp, run, *extra, quiet=True):
    return train_argv(data, tmp, run, *extra, quiet=quiet, eval_batches=1, ckpt_every=100)


def ckpt_path(tmp, run):
    return str(tmp / "out" / run / "ckpt" / "latest.pt")


@pytest.fixture(scope="module")
def base(synth, tmp_path_factory):
    """A micro model trained 3 steps on the synth fixture: (checkpoint path, its state dict)."""
    tmp = tmp_path_factory.mktemp("base")
    assert train.main(argv(synth, tmp, "base", "--stop_at", "3")) == 0
    return ckpt_path(tmp, "base"), cm.load(ckpt_path(tmp, "base"))["model"]


def changed_keys(before, after):
    assert before.keys() <= after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def micro(**kw):
    return clip.get_config("micro", vocab_size=300, **kw)


def tokens_with_eot(B=3, T=32, vocab=300, ends=(4, 9, 31)):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab - 2, (B, T), generator=g)
    for b, e in enumerate(ends):  # eot (the highest id) at a known position, padding (0) after it
        tokens[b, e], tokens[b, e + 1:] = vocab - 1, 0
    return tokens


# -----------------------------------------------------------------------------
# adapters


@pytest.mark.parametrize("towers", [("visual", "text"), ("text",)])
def test_adapters_at_init_leave_the_outputs_exactly_unchanged(towers):
    torch.manual_seed(0)
    plain = clip.CLIP(micro())
    adapted = clip.CLIP(micro(adapters=8, adapter_towers=towers))
    res = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert res.unexpected_keys == [] and res.missing_keys and all("adapter_" in k for k in res.missing_keys)
    # 2 adapters x 2 linears x (weight, bias) per block, 2 blocks per tower
    assert len(res.missing_keys) == 2 * 2 * 2 * 2 * len(towers)
    images, tokens = torch.randn(4, 3, 32, 32), tokens_with_eot(4, ends=(3, 5, 7, 31))
    with torch.no_grad():
        assert torch.equal(adapted.encode_image(images), plain.encode_image(images))
        assert torch.equal(adapted.encode_text(tokens), plain.encode_text(tokens))
    # reduction 8 on width 32: a 4-wide bottleneck
    assert adapted.text.blocks[0].adapter_mlp.down.weight.shape == (4, 32)


def test_state_dict_keys_are_those_checkpoints_from_before_hold():
    """A block's adapters are identities until added (issue 28: no per-call branch), which have no parameters: the
    state dict keys, in order (the optimizer's state is by parameter position), are those of checkpoints written
    when the adapters were None, with and without adapters."""
    block = ["ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    adapter = [f"{a}.{lin}.{p}" for a in ("adapter_attn", "adapter_mlp") for lin in ("down", "up")
               for p in ("weight", "bias")]

    def keys(adapters):
        blocks = lambda tower: [f"{tower}.blocks.{i}.{k}" for i in range(2) for k in block + adapter * adapters]
        return (["logit_scale", "visual.cls_token", "visual.pos_embed", "visual.patch_embed.weight",
                 "visual.ln_pre.weight", "visual.ln_pre.bias"] + blocks("visual")
                + ["visual.ln_post.weight", "visual.ln_post.bias", "visual.proj.weight", "text.pos_embed",
                   "text.token_embed.weight"] + blocks("text")
                + ["text.ln_final.weight", "text.ln_final.bias", "text.proj.weight"])
    assert list(clip.CLIP(micro()).state_dict()) == keys(False)
    adapted = clip.CLIP(micro(adapters=4))
    assert list(adapted.state_dict()) == keys(True)
    assert isinstance(clip.CLIP(micro()).visual.blocks[0].adapter_mlp, torch.nn.Identity)
    assert [n for n, _ in adapted.named_parameters()] == keys(True)  # the optimizer's order


@pytest.mark.parametrize("heads", [False, True])
def test_a_step_with_adapters_changes_only_the_adapters(synth, tmp_path, base, heads):
    path, before = base
    extra = ["--train_heads"] if heads else []
    assert train.main(argv(synth, tmp_path, "ad", "--init", path, "--adapters", "4", "--stop_at", "2", *extra)) == 0
    ckpt = cm.load(ckpt_path(tmp_path, "ad"))
    after = ckpt["model"]
    assert ckpt["config"]["adapters"] == 4
    new = set(after) - set(before)
    assert new and all("adapter_" in k for k in new)
    heads_keys = {"visual.proj.weight", "text.proj.weight", "logit_scale"}
    assert changed_keys(before, after) == (heads_keys if heads else set())  # the rest is bitwise the base
    # the adapters did move: their "up" layers start at zero
    assert any(after[k].abs().sum() > 0 for k in new if ".up." in k)
    # AdamW holds state for exactly the adapter (and head) tensors
    trained = sum(after[k].numel() for k in new) + (sum(after[k].numel() for k in heads_keys) if heads else 0)
    assert sum(s["exp_avg"].numel() for s in ckpt["optimizer"]["state"].values()) == trained


# -----------------------------------------------------------------------------
# LiT: locked towers


def optimizer_names(ckpt):
    """Optimizer state ids -> parameter names. configure_optimizers lists the trainable parameters in
    named_parameters order, matrices (>= 2 dims) in group 0 and the rest in group 1; ids count through the groups."""
    model = clip.CLIP(clip.CLIPConfig.from_dict(ckpt["config"]))
    args = ckpt["args"]
    if args["lock_image"]:
        model.lock("visual", args["unlocked_layers"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    ids = [i for g in ckpt["optimizer"]["param_groups"] for i in g["params"]]
    assert len(ids) == len(order)
    shapes = dict(model.named_parameters())
    names = dict(zip(ids, order))
    for i, s in ckpt["optimizer"]["state"].items():  # the mapping is right: every state fits its parameter
        assert s["exp_avg"].shape == shapes[names[i]].shape
    return {names[i] for i in ckpt["optimizer"]["state"]}


@pytest.mark.parametrize("unlocked", [0, 1])
def test_lock_image_freezes_the_image_tower(synth, tmp_path, base, unlocked):
    path, before = base
    assert train.main(argv(synth, tmp_path, "lit", "--init", path, "--lock_image", "--unlocked_layers",
                           str(unlocked), "--stop_at", "2")) == 0
    ckpt = cm.load(ckpt_path(tmp_path, "lit"))
    after = ckpt["model"]
    last = ({k for k in before if k.startswith(("visual.blocks.1.", "visual.ln_post.", "visual.proj."))}
            if unlocked else set())  # micro has 2 vision blocks: the last is blocks.1
    changed = changed_keys(before, after)
    assert {k for k in changed if k.startswith("visual.")} == last
    assert {k for k in before if not k.startswith("visual.")} <= changed  # the text tower and scale did train
    with_state = optimizer_names(ckpt)
    assert {k for k in with_state if k.startswith("visual.")} == last  # no optimizer state for frozen weights
    assert with_state == {k for k in before if not k.startswith("visual.")} | last


def test_locked_towers_have_no_grad_and_stay_in_eval_mode():
    model = clip.CLIP(micro())
    model.lock("visual")
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    model.train()
    assert model.training and model.text.training
    assert not any(m.training for m in model.visual.modules())  # every submodule, not just the tower
    model.eval().train()  # and again after an eval/train round trip (train.py's validation does this)
    assert not model.visual.training
    partly = clip.CLIP(micro())
    partly.lock("text", unlocked_layers=1)
    trainable = {n for n, p in partly.text.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in partly.text.named_parameters() if n.startswith(("blocks.1.", "ln_final.", "proj."))}
    assert partly.train().text.training  # partly trainable: trains


def test_build_model_applies_the_flags():
    config = micro(adapters=8)
    args = train.get_parser().parse_args(["--adapters", "8", "--train_heads"])
    model = train.build_model(args, config, None, quiet=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if "adapter_" in n or n in ("visual.proj.weight", "text.proj.weight", "logit_scale")}
    args = train.get_parser().parse_args(["--lock_text"])
    model = train.build_model(args, micro(), None, quiet=True)
    assert {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad} == {"text"}


# -----------------------------------------------------------------------------
# text pooling


def test_pooling_variants_by_hand():
    torch.manual_seed(0)
    tokens = tokens_with_eot()  # eot at 4, 9, 31
    ends = torch.tensor([4, 9, 31])
    for pool in ("eot", "first", "cls", "mean"):
        model = clip.CLIP(micro(pool=pool)).eval()
        with torch.no_grad():
            out, hidden = model.encode_text(tokens, return_hidden=True)
            assert out.shape == (3, 32) and len(hidden) == 2 and hidden[-1].shape == (3, 32, 32)  # (B, E), L x (B, T, C)
            x = model.text.ln_final(hidden[-1])  # (B, T, C)
            if pool == "eot":
                want = x[torch.arange(3), ends]
            elif pool in ("first", "cls"):
                want = x[:, 0]
            else:  # the mean of the tokens up to and including eot; padding after it is left out
                want = torch.stack([x[b, :e + 1].mean(0) for b, e in enumerate(ends.tolist())])
            torch.testing.assert_close(out, model.text.proj(want))
            if pool == "eot":  # pool_layers=1 is plain CLIP pooling, bit for bit
                assert torch.equal(out, model.text.proj(want))


def test_pool_layers_averages_the_last_layers():
    torch.manual_seed(0)
    one = clip.CLIP(micro(pool_layers=1)).eval()
    two = clip.CLIP(micro(pool_layers=2)).eval()
    two.load_state_dict(one.state_dict())
    tokens = tokens_with_eot()
    with torch.no_grad():
        out, hidden = two.encode_text(tokens, return_hidden=True)
        pooled = [two.text.pool_tokens(two.text.ln_final(h), tokens) for h in hidden]  # 2 x (B, C)
        torch.testing.assert_close(out, two.text.proj((pooled[0] + pooled[1]) / 2))
        assert torch.equal(one.encode_text(tokens), two.text.proj(pooled[1]))  # 1 layer: the last only
    assert out.shape == (3, 32)
    with pytest.raises(ValueError, match="pool_layers"):
        micro(pool_layers=3)  # micro has 2 text layers


# -----------------------------------------------------------------------------
# partial loading


def test_load_partial_reports_exactly_the_ignored_keys(base):
    _, sd = base
    patterns = [r"text\.proj", r"visual\.blocks\.0\.attn"]
    want = [k for k in sd if any(re.search(p, k) for p in patterns)]
    assert "text.proj.weight" in want and len(want) == 5  # text.proj.weight + qkv/proj weight/bias
    torch.manual_seed(123)
    model = clip.CLIP(clip.CLIPConfig.from_dict(cm.load(base[0])["config"]))  # a fresh init of the same shapes
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = cm.load_partial(model, sd, patterns, quiet=True)
    assert report.ignored == want
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    now = model.state_dict()
    for k in sd:
        assert torch.equal(now[k], fresh[k] if k in want else sd[k]), k  # ignored keys keep their fresh init


def test_train_init_prints_the_ignored_keys(synth, tmp_path, base, capsys):
    path, sd = base
    assert train.main(argv(synth, tmp_path, "ig", "--init", path, "--ignore_keys", r"text\.proj", "--stop_at", "1",
                           quiet=False)) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("load_partial:"))
    assert f"loaded {len(sd) - 1}/{len(sd)} tensors" in line
    assert "; ignored 1 (text.proj.weight);" in line and "missing 0;" in line


# -----------------------------------------------------------------------------
# adapter-only checkpoints


def test_adapters_round_trip_alone(tmp_path):
    torch.manual_seed(0)
    model = clip.CLIP(micro(adapters=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter_" in n:
                p.normal_()  # non-zero: a loaded model that still had identity adapters would differ
    path = str(tmp_path / "adapters.pt")
    cm.save_adapters(model, path)
    saved = cm.load(path)  # weights_only
    assert set(saved["adapters"]) == {k for k in model.state_dict() if "adapter_" in k}
    assert saved["config"] == model.config.to_dict()

    torch.manual_seed(0)
    other = clip.CLIP(micro(adapters=4))  # the same base weights, identity adapters
    report = cm.load_adapters(other, path, quiet=True)
    assert report == cm.LoadReport([], [], [], [])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    images, tokens = torch.randn(2, 3, 32, 32), tokens_with_eot(2, ends=(5, 31))
    with torch.no_grad():
        assert torch.equal(other.encode_image(images), model.encode_image(images))
        assert torch.equal(other.encode_text(tokens), model.encode_text(tokens))

    text_only = clip.CLIP(micro(adapters=4, adapter_towers=("text",)))
    cm.save_adapters(text_only, path)
    report = cm.load_adapters(other, path, quiet=True)  # the file has no image-tower adapters
    assert report.missing == [k for k in other.state_dict() if k.startswith("visual.") and "adapter_" in k]
    assert len(report.missing) == 16 and report.unexpected == []
    with pytest.raises(ValueError, match="no adapters"):
        cm.load_adapters(clip.CLIP(micro()), path)
    with pytest.raises(ValueError, match="no adapters"):
        cm.save_adapters(clip.CLIP(micro()), path)
