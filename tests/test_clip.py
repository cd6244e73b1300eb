import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint_manager as cm
import clip
from clip import CLIP, clip_loss, get_config


def tiny(**kw):
    return get_config("tiny", vocab_size=300, img_size=32, **kw)


def tokens(B=3, T=32, lengths=(5, 9, 31), vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths[:B]):
        t[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        t[i, 0], t[i, n] = vocab - 2, vocab - 1  # sot ... eot (the highest id)
    return t


@pytest.mark.parametrize("name", ["tiny", "seed", "vit-b-16"])
def test_preset_shapes_on_meta(name):
    config = get_config(name)
    with torch.device("meta"):
        model = CLIP(config)
        vc, tc = config.vision, config.text
        img, txt, scale, bias, short, neg = model(torch.zeros(2, 3, vc.img_size, vc.img_size),
                                                  torch.zeros(2, tc.context_length, dtype=torch.long))
    assert bias is None and short is None and neg is None  # no bias (softmax loss), no short or negative captions
    assert img.shape == txt.shape == (2, config.embed_dim)
    assert scale.shape == ()


def test_seed_preset_matches_the_notes_table():
    c = get_config("seed")
    assert (c.vision.img_size, c.vision.patch_size, c.vision.width, c.vision.layers, c.vision.heads) == (224, 16, 768, 8, 6)
    assert (c.text.context_length, c.text.width, c.text.layers, c.text.heads, c.embed_dim) == (77, 512, 6, 8, 512)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="VisionConfig.width"):
        clip.VisionConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="img_size"):
        clip.VisionConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="TextConfig.width"):
        clip.TextConfig(width=64, heads=5)
    with pytest.raises(ValueError, match="pool"):
        clip.TextConfig(pool="max")
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="embed_dim"):  # a cube cannot have 127 vertices
        tiny(head="cube", embed_dim=127)


def test_causal_mask_blocks_the_future():
    torch.manual_seed(0)
    model = CLIP(tiny()).eval()
    t = tokens()
    t2 = t.clone()
    t2[:, 6] = (t2[:, 6] + 7) % 290 + 1  # change token 6 in every row
    _, h1 = model.encode_text(t, return_hidden=True)
    _, h2 = model.encode_text(t2, return_hidden=True)
    assert torch.equal(h1[-1][:, :6], h2[-1][:, :6])  # positions 0..5 cannot see token 6
    assert not torch.allclose(h1[-1][:, 6:], h2[-1][:, 6:])
    # eot pooling of the first caption (eot at 5) is therefore unchanged, the others change
    e1, e2 = model.encode_text(t), model.encode_text(t2)
    assert torch.equal(e1[0], e2[0]) and not torch.allclose(e1[1:], e2[1:])


def test_pooling_variants():
    torch.manual_seed(0)
    t = tokens()
    base = CLIP(tiny())
    x = base.text.ln_final(base.text(t, return_hidden=True)[1][-1])  # (B, T, C)
    eot = t.argmax(-1)
    assert torch.equal(base.text.pool_tokens(x, t), x[torch.arange(3), eot])
    for pool, want in (("first", x[:, 0]), ("mean", torch.stack([x[i, :eot[i] + 1].mean(0) for i in range(3)]))):
        m = CLIP(tiny(pool=pool))
        m.load_state_dict(base.state_dict())
        assert torch.allclose(m.text.pool_tokens(x, t), want, atol=1e-6)
        assert m.encode_text(t).shape == (3, 128)
    m = CLIP(tiny(pool_layers=1))
    m.load_state_dict(base.state_dict())
    assert torch.equal(m.encode_text(t), base.encode_text(t))
    m = CLIP(tiny(pool_layers=2))
    m.load_state_dict(base.state_dict())
    _, hidden = base.text(t, return_hidden=True)
    want = torch.stack([base.text.pool_tokens(base.text.ln_final(h), t) for h in hidden[-2:]]).mean(0)
    assert torch.allclose(m.encode_text(t), base.text.proj(want), atol=1e-6)


def test_loss_2x2_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s = torch.tensor(2.0)
    # logits = 2 * img @ txt^T = [[2, 1.2], [0, 1.6]]; row-wise CE with targets (0, 1)
    li = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))), -math.log(math.exp(1.6) / (1 + math.exp(1.6)))]
    # text side = columns of the same matrix: [[2, 0], [1.2, 1.6]]
    lt = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))]
    want = (sum(li) / 2 + sum(lt) / 2) / 2
    assert clip_loss(img, txt, s).item() == pytest.approx(want, abs=1e-6)


def test_loss_with_gathered_features_matches_the_global_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 5), dim=-1), F.normalize(torch.randn(8, 5), dim=-1)
    s = torch.tensor(10.0)
    full = clip_loss(img, txt, s)
    parts = [clip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], s, all_img=img, all_txt=txt, offset=r * 4)
             for r in range(2)]
    assert torch.allclose((parts[0] + parts[1]) / 2, full, atol=1e-6)


def test_logit_scale_init_and_clamp():
    model = CLIP(tiny())
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_optimizer_decays_matrices_only():
    model = CLIP(tiny())
    opt = clip.configure_optimizers(model, 0.2, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.logit_scale) in ids and id(model.visual.cls_token) in ids
    assert len(ids) == len(list(model.parameters()))


def test_flops_count_matches_a_parameter_count():
    c = get_config("seed")
    with torch.device("meta"):
        m = CLIP(c)
    vc, tc = c.vision, c.text
    T_v, T_t = (vc.img_size // vc.patch_size) ** 2 + 1, tc.context_length
    # 6 * (weights used per token) * tokens + attention, with weights counted from the real module
    n_v = sum(p.numel() for n, p in m.visual.blocks.named_parameters() if n.endswith("weight") and p.dim() == 2)
    n_t = sum(p.numel() for n, p in m.text.blocks.named_parameters() if n.endswith("weight") and p.dim() == 2)
    want = (6 * n_v * T_v + 12 * vc.layers * vc.width * T_v ** 2 + 6 * m.visual.patch_embed.weight.numel() * (T_v - 1)
            + 6 * n_t * T_t + 12 * tc.layers * tc.width * T_t ** 2
            + 6 * (m.visual.proj.weight.numel() + m.text.proj.weight.numel()))
    assert clip.estimate_flops_per_sample(c) == want
    assert clip.estimate_mfu(c, 1000, "NVIDIA H100 80GB HBM3") == pytest.approx(want * 1000 / 989e12)
    assert clip.estimate_mfu(c, 1000, "cpu") is None


def test_normalize_images():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = clip.normalize_images(x)
    assert torch.allclose(y[0, :, 0, 0], (1 - torch.tensor(clip.IMAGE_MEAN)) / torch.tensor(clip.IMAGE_STD))


# --- original CLIP weights ------------------------------------------------------------------------------------
# A minimal copy of openai/CLIP's ViT model (nn.MultiheadAttention, sequence-first layout, QuickGELU), written
# here so the test needs no download: our model loaded from its state dict must give the same embeddings.


class RefBlock(nn.Module):
    def __init__(self, d, h, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", clip.QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.mask = mask

    def forward(self, x):  # (T, B, C)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, layers, h, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(d, h, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, res, patch, width, layers, heads, out):
        super().__init__()
        s = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(s * torch.randn(width))
        self.positional_embedding = nn.Parameter(s * torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.proj = nn.Parameter(s * torch.randn(width, out))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, embed=24, res=32, patch=8, vw=64, vl=2, ctx=16, vocab=100, tw=64, tl=2, heads=4):
        super().__init__()
        self.visual = RefVisual(res, patch, vw, vl, heads, embed)
        mask = torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1)
        self.transformer = RefTransformer(tw, tl, heads, mask)
        self.token_embedding = nn.Embedding(vocab, tw)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(ctx, tw))
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(tw ** -0.5 * torch.randn(tw, embed))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        for p in self.parameters():  # perturb norms and biases too, so a swapped key cannot hide
            if p.dim() == 1:
                p.data.add_(0.1 * torch.randn_like(p))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def test_from_openai_state_dict_gives_the_original_embeddings():
    torch.manual_seed(0)
    ref = RefCLIP().eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("mask")}
    assert cm.from_openai_state_dict(sd).config.vision.heads == 1  # CLIP's rule: width // 64
    model = cm.from_openai_state_dict(sd, vision_heads=4, text_heads=4).eval()
    assert model.config.text.context_length == 16 and model.config.quick_gelu
    images, t = torch.randn(2, 3, 32, 32), tokens(2, 16, (4, 15), vocab=100)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), ref.visual(images), atol=1e-5)
        assert torch.allclose(model.encode_text(t), ref.encode_text(t), atol=1e-5)
    back = cm.to_openai_state_dict(model)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_openai_round_trip_is_identity():
    torch.manual_seed(0)
    model = CLIP(tiny(quick_gelu=True))
    back = cm.from_openai_state_dict(cm.to_openai_state_dict(model), vision_heads=4, text_heads=4)
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="conv1"):
        cm.from_openai_state_dict({"token_embedding.weight": torch.zeros(3, 4)})


@pytest.mark.parametrize("head", ["simplex", "orthoplex", "cube"])
@pytest.mark.parametrize("mode", ["replace", "after"])
def test_polytope_heads_give_equal_sizes_in_both_towers(head, mode):
    c = tiny(head=head, head_mode=mode, embed_dim=8)
    model = CLIP(c)
    img, txt = model(torch.randn(2, 3, 32, 32), tokens(2))[:2]
    assert img.shape == txt.shape == (2, c.output_dim)
    assert c.output_dim == (8 if mode == "replace" else {"simplex": 9, "orthoplex": 16, "cube": 256}[head])
    assert clip.CLIPConfig.from_dict(c.to_dict()) == c
