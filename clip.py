"""
CLIP from scratch, in one file you read top to bottom.

References:
1) Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP):
   https://github.com/openai/CLIP/blob/main/clip/model.py
2) Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (the vision transformer).
3) OpenCLIP (Ilharco et al.), whose ViT state dicts use the same key names as (1).
4) Pernici et al. 2021, "Regular Polytope Networks" (the fixed heads, see simplex.py).
5) Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP, siglip_loss).
6) Li et al. 2023, "Scaling Language-Image Pre-training via Masking" (FLIP, patch dropout).

Order: configs and presets -> building blocks (MLP, attention, block) -> VisionTransformer ->
TextTransformer -> CLIP -> losses -> FLOPs/MFU and the optimizer.

Experiments live inline, where the tensors are; a statement that belongs to one alone is fenced by a comment line
`# NAME: ...` (SigLIP, FLIP, Long-CLIP, hard negatives, adapters, distillation, LiT), so the plain CLIP path reads
by skipping those. Weight conversion to and from the original CLIP / OpenCLIP layout is in checkpoint_manager.py.

Left out on purpose: the ResNet image towers, dropout (CLIP trains without it), attention pooling, and any
model registry: presets are plain functions returning a config.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from simplex import FixedPolytopeHead, polytope_dim, polytope_vertices

POOLS = ("eot", "first", "cls", "mean")
HEADS = ("linear", "simplex", "orthoplex", "cube")
HEAD_MODES = ("replace", "after")
LOSSES = ("clip", "siglip")  # softmax over the batch (clip_loss) | a sigmoid per pair (siglip_loss)
# CLIP's image statistics; images travel as uint8 and are normalised on the device (see normalize_images).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# configs


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")


@dataclass
class VisionConfig:
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_dropout: float = 0.0  # FLIP: the fraction of patch tokens dropped per image while training (0 = none)

    def __post_init__(self):
        _positive(self, "img_size", "patch_size", "width", "layers", "heads")
        if not 0 <= self.patch_dropout < 1:
            raise ValueError(f"VisionConfig.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.width % self.heads:
            raise ValueError(f"VisionConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.img_size % self.patch_size:
            raise ValueError(f"VisionConfig.img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    pool: str = "eot"      # eot (CLIP) | first/cls (token 0) | mean (non-pad tokens)
    pool_layers: int = 1   # average the pooled token over the last N layers (retrieval notes)
    freeze_positions: int = 0  # Long-CLIP: the first N positional embeddings never change

    def __post_init__(self):
        _positive(self, "vocab_size", "context_length", "width", "layers", "heads", "pool_layers")
        if self.width % self.heads:
            raise ValueError(f"TextConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.pool not in POOLS:
            raise ValueError(f"TextConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool_layers > self.layers:
            raise ValueError(f"TextConfig.pool_layers ({self.pool_layers}) must be <= layers ({self.layers})")
        if not 0 <= self.freeze_positions <= self.context_length:
            raise ValueError(f"TextConfig.freeze_positions must be in [0, context_length], got {self.freeze_positions}")


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    head: str = "linear"        # linear projection, or a fixed polytope head (simplex.py)
    head_mode: str = "replace"  # replace: the polytope head instead of the projection (= a linear head of width d);
                                # after: vertices after the projection. The vertices are a tight frame (V^T V = (K/d) I),
                                # so "after" leaves every cosine, hence the CLIP loss, unchanged: it only widens the output
    quick_gelu: bool = False    # x * sigmoid(1.702 x): what OpenAI's original weights were trained with
    adapters: int = 0           # > 0: bottleneck adapters with this reduction factor in every block (VL-Adapter: 8)
    adapter_towers: tuple = ("visual", "text")
    teacher_dim: int = 0        # > 0 and != output_dim: a learned projection to a distillation teacher's space
    loss: str = "clip"          # clip: softmax (InfoNCE); siglip: sigmoid per pair, which adds a learnable logit bias

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        _positive(self, "embed_dim")
        self.adapter_towers = tuple(self.adapter_towers)  # a list after a JSON round trip
        if self.adapters < 0 or self.teacher_dim < 0:
            raise ValueError(f"CLIPConfig.adapters and teacher_dim must be >= 0, got {self.adapters}, {self.teacher_dim}")
        if not set(self.adapter_towers) <= {"visual", "text"}:
            raise ValueError(f"CLIPConfig.adapter_towers must be a subset of ('visual', 'text'), got {self.adapter_towers}")
        if self.head not in HEADS:
            raise ValueError(f"CLIPConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"CLIPConfig.head_mode must be one of {HEAD_MODES}, got {self.head_mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"CLIPConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.head != "linear":
            try:
                self.output_dim  # raises for an embed_dim the polytope cannot make
            except ValueError as e:
                raise ValueError(f"CLIPConfig.embed_dim: {e}") from None

    @property
    def output_dim(self):
        """Size of the embeddings both towers return."""
        if self.head == "linear":
            return self.embed_dim
        if self.head_mode == "replace":  # K = embed_dim vertices in d = polytope_dim(K) dims
            polytope_dim(self.head, self.embed_dim)  # raises when the polytope cannot have K = embed_dim vertices
            return self.embed_dim
        d = self.embed_dim  # after: the K vertices of the d = embed_dim polytope
        if self.head == "cube" and d > 16:
            polytope_vertices("cube", d)  # raises the clear "too many vertices" error
        return {"simplex": d + 1, "orthoplex": 2 * d, "cube": 2 ** d}[self.head]

    def to_dict(self):
        d = asdict(self)
        d["adapter_towers"] = list(self.adapter_towers)  # JSON-able, and equal to itself after a round trip
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def _tiny():  # a CPU demo: a few steps/s on 2 cores; patch 8 divides 32 px and 64 px shards
    return CLIPConfig(VisionConfig(img_size=64, patch_size=8, width=128, layers=4, heads=4),
                      TextConfig(vocab_size=1024, context_length=32, width=128, layers=4, heads=4), embed_dim=128)


def _seed():  # the table of our original runs ("water through the pipes")
    return CLIPConfig(VisionConfig(img_size=224, patch_size=16, width=768, layers=8, heads=6),
                      TextConfig(vocab_size=49408, context_length=77, width=512, layers=6, heads=8), embed_dim=512)


def _vit_b_16():  # OpenCLIP ViT-B-16
    return CLIPConfig(VisionConfig(img_size=224, patch_size=16, width=768, layers=12, heads=12),
                      TextConfig(vocab_size=49408, context_length=77, width=512, layers=12, heads=8), embed_dim=512)


def _micro():  # tests and smoke runs: a step takes milliseconds
    return CLIPConfig(VisionConfig(img_size=32, patch_size=8, width=32, layers=2, heads=2),
                      TextConfig(vocab_size=1024, context_length=32, width=32, layers=2, heads=2), embed_dim=32)


PRESETS = {"micro": _micro, "tiny": _tiny, "seed": _seed, "vit-b-16": _vit_b_16}


def get_config(name, vocab_size=None, img_size=None, context_length=None, **overrides):
    """A preset by name, with the data's vocab/image size and any CLIPConfig field (pool goes to the text tower)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    d = PRESETS[name]().to_dict()
    if vocab_size is not None:
        d["text"]["vocab_size"] = vocab_size
    if context_length is not None:
        d["text"]["context_length"] = context_length
    if img_size is not None:
        d["vision"]["img_size"] = img_size
    for k in ("pool", "pool_layers", "freeze_positions"):  # text-tower fields
        if k in overrides:
            d["text"][k] = overrides.pop(k)
    if "patch_dropout" in overrides:  # the one vision-tower field
        d["vision"]["patch_dropout"] = overrides.pop("patch_dropout")
    d.update(overrides)
    return CLIPConfig.from_dict(d)


# -----------------------------------------------------------------------------
# building blocks


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width, quick_gelu):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.c_proj(self.gelu(self.c_fc(x)))


class Attention(nn.Module):
    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)  # same layout as nn.MultiheadAttention's in_proj (q, k, v stacked)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # flash/memory-efficient kernels when available; is_causal builds the triangular mask for text
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C) heads side by side again
        return self.proj(y)


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019; VL-Adapter): x + up(gelu(down(x))), up starts at zero."""

    def __init__(self, width, reduction):
        super().__init__()
        self.down = nn.Linear(width, max(1, width // reduction))
        self.up = nn.Linear(max(1, width // reduction), width)
        nn.init.zeros_(self.up.weight)  # the model starts exactly as it was
        nn.init.zeros_(self.up.bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return x + self.up(F.gelu(self.down(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, causal, quick_gelu):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, quick_gelu)
        # identities (no parameters, so no state dict keys) until CLIP.add_adapters puts bottleneck adapters here
        self.adapter_attn, self.adapter_mlp = nn.Identity(), nn.Identity()

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = x + self.adapter_attn(self.attn(self.ln_1(x)))
        return x + self.adapter_mlp(self.mlp(self.ln_2(x)))


def run_blocks(blocks, x, grad_ckpt):
    """x through every block; returns each block's output (B, T, C). grad_ckpt (training with gradients only):
    activation checkpointing keeps only each block's input (one (B, T, C) tensor instead of the dozen or so the
    block saves, several of them 4C wide) and recomputes the block during backward: one extra forward per step.
    Non-reentrant: works under torch.compile and with inputs that need no gradient."""
    hidden = []
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if grad_ckpt else block(x)  # (B, T, C)
        hidden.append(x)
    return hidden


def make_head(width, config):
    """The projection into the shared space: linear, a polytope head instead of it, or vertices after it."""
    if config.head == "linear":
        return nn.Linear(width, config.embed_dim, bias=False)
    if config.head_mode == "replace":  # K = embed_dim vertices, d = polytope_dim(K)
        return FixedPolytopeHead(width, config.embed_dim, config.head)
    d = config.embed_dim  # after: the projection to d, then the fixed K vertices of the d-polytope
    K = polytope_vertices(config.head, d).shape[0]
    return nn.Sequential(nn.Linear(width, d, bias=False), FixedPolytopeHead(d, K, config.head, project=False))


# -----------------------------------------------------------------------------
# the two towers


def kept_patches(vc: VisionConfig):
    """Patch tokens each image keeps under patch dropout: (1 - patch_dropout) of them, rounded, at least 1."""
    n = (vc.img_size // vc.patch_size) ** 2
    return max(1, round(n * (1 - vc.patch_dropout)))


def sample_patch_keep(batch, vc: VisionConfig, generator):
    """FLIP patch dropout: (batch, K) indices of the patches each image keeps, K = kept_patches(vc), a uniform
    random subset per image (in raster order) drawn only from `generator`, on the generator's device. The trainer
    seeds one per step, so the choice depends on (seed, step, rank) and on nothing else that uses the torch RNG."""
    n = (vc.img_size // vc.patch_size) ** 2
    noise = torch.rand(batch, n, generator=generator, device=generator.device)  # (B, n)
    return noise.argsort(dim=1)[:, :kept_patches(vc)].sort(dim=1).values  # (B, K) the K smallest draws


class VisionTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        vc = config.vision
        self.grid = vc.img_size // vc.patch_size
        # a conv with stride = kernel = patch size cuts the image into patches and embeds each one
        self.patch_embed = nn.Conv2d(3, vc.width, vc.patch_size, stride=vc.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(vc.width))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid ** 2 + 1, vc.width))
        self.ln_pre = nn.LayerNorm(vc.width)
        self.blocks = nn.ModuleList(Block(vc.width, vc.heads, False, config.quick_gelu) for _ in range(vc.layers))
        self.ln_post = nn.LayerNorm(vc.width)
        self.proj = make_head(vc.width, config)
        self.grad_ckpt = False  # set by CLIP.set_grad_checkpointing

    def forward(self, images, return_hidden=False, patch_keep=None):
        """patch_keep: None (every patch), or (B, K) indices of the patches to keep (FLIP patch dropout, from
        sample_patch_keep); the model applies exactly what it is given, so eval and encode_image see every patch."""
        x = self.patch_embed(images)  # (B, C, g, g) one C-vector per patch
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
        pos = self.pos_embed.to(x.dtype)  # (g*g + 1, C)
        x = x + pos[1:]  # positions first, so a kept patch still knows where it was
        # FLIP: only the kept patches go on
        if patch_keep is not None:
            x = x.gather(1, patch_keep[..., None].expand(-1, -1, x.shape[2]))  # (B, K, C) the kept patches only
        cls = (self.cls_token.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)  # (B, 1, C) always kept
        x = torch.cat([cls, x], dim=1)  # (B, T, C) with T = g*g + 1, or K + 1 with patch_keep
        x = self.ln_pre(x)
        hidden = run_blocks(self.blocks, x, self.grad_ckpt and self.training and torch.is_grad_enabled())
        x = hidden[-1]  # (B, T, C)
        pooled = self.ln_post(x[:, 0])  # (B, C) the class token summarises the image
        out = self.proj(pooled)  # (B, E)
        return (out, hidden) if return_hidden else out


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        tc = config.text
        self.pool, self.pool_layers = tc.pool, tc.pool_layers
        self.token_embed = nn.Embedding(tc.vocab_size, tc.width)
        self.freeze_positions = tc.freeze_positions  # 0 but in Long-CLIP
        self.pos_embed = nn.Parameter(torch.zeros(tc.context_length - tc.freeze_positions, tc.width))
        # Long-CLIP: the first freeze_positions rows stay fixed: a buffer, so no optimizer (or decay) can move them
        if tc.freeze_positions:
            self.register_buffer("pos_fixed", torch.zeros(tc.freeze_positions, tc.width))
        self.blocks = nn.ModuleList(Block(tc.width, tc.heads, True, config.quick_gelu) for _ in range(tc.layers))
        self.ln_final = nn.LayerNorm(tc.width)
        self.proj = make_head(tc.width, config)
        self.grad_ckpt = False  # set by CLIP.set_grad_checkpointing

    def positions(self):  # (ctx, C) all positional embeddings, fixed rows first
        return torch.cat([self.pos_fixed, self.pos_embed]) if self.freeze_positions else self.pos_embed

    def pool_tokens(self, x, tokens):
        """(B, T, C) hidden states -> (B, C), following self.pool."""
        eot = tokens.argmax(dim=-1)  # (B,) the end-of-text token has the highest id, as in CLIP
        if self.pool == "eot":  # causal attention: the last token has read the whole caption
            return x[torch.arange(x.shape[0], device=x.device), eot]
        if self.pool in ("first", "cls"):
            return x[:, 0]
        mask = torch.arange(tokens.shape[1], device=x.device)[None, :] <= eot[:, None]  # (B, T) up to eot
        return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, C) mean of the real tokens

    def forward(self, tokens, return_hidden=False):
        T = tokens.shape[1]
        x = self.token_embed(tokens) + self.positions()[:T]  # (B, T, C)
        # (B, T, C) per block, each token sees only itself and earlier ones
        hidden = run_blocks(self.blocks, x, self.grad_ckpt and self.training and torch.is_grad_enabled())
        # pool the last pool_layers layers through the final norm and average them (1 = plain CLIP)
        pooled = torch.stack([self.pool_tokens(self.ln_final(h), tokens)
                              for h in hidden[-self.pool_layers:]]).mean(0)  # (B, C)
        out = self.proj(pooled)  # (B, E)
        return (out, hidden) if return_hidden else out


# -----------------------------------------------------------------------------
# CLIP


def normalize_images(images):
    """uint8 (B, 3, S, S) -> float (B, 3, S, S) with CLIP's mean/std; runs on the device, so only bytes cross PCIe."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class CLIPOutput(NamedTuple):
    """What CLIP.forward returns; the loss functions take these tensors."""
    image: torch.Tensor                         # (B, E) normalised image embeddings
    text: torch.Tensor                          # (B, E) normalised caption embeddings
    logit_scale: torch.Tensor                   # () exp(log scale), the inverse temperature
    logit_bias: Optional[torch.Tensor] = None   # () SigLIP's learnable bias (None for the softmax loss)
    text_short: Optional[torch.Tensor] = None   # (B, E) Long-CLIP's short-caption embeddings
    text_neg: Optional[torch.Tensor] = None     # (B, K, E) hard-negative captions; empty slots are zero vectors


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # the inverse temperature, in log space
        # SigLIP: scale 10 and a bias of -10, so that at init every pair's logit is about -10 (most pairs are negatives:
        # starting there avoids a first phase spent only pushing all the sigmoids down). Only a SigLIP model holds the
        # bias, so a CLIP checkpoint is unchanged
        if config.loss == "siglip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        # CLIP's image statistics (1, 3, 1, 1) on the model's device, so forward normalises uint8 images with no host
        # tensors per call (inside the compiled graph); not persistent, so checkpoint keys do not change
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self.init_weights()
        # adapters: bottleneck adapters in every block of the chosen towers (VL-Adapter)
        if config.adapters:
            self.add_adapters(config.adapters, config.adapter_towers)
        # distillation: a learned projection from the student's space to the teacher's when their sizes differ
        if config.teacher_dim and config.teacher_dim != config.output_dim:
            self.distill_proj = nn.Linear(config.output_dim, config.teacher_dim, bias=False)

    def init_weights(self):
        """CLIP's initialisation (openai/CLIP model.py): small embeddings, residual projections scaled by depth."""
        for tower, tc in ((self.visual, self.config.vision), (self.text, self.config.text)):
            W, L = tc.width, tc.layers
            attn_std, proj_std, fc_std = W ** -0.5, W ** -0.5 * (2 * L) ** -0.5, (2 * W) ** -0.5
            for block in tower.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=attn_std)
                nn.init.normal_(block.attn.proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
                for lin in (block.attn.qkv, block.attn.proj, block.mlp.c_fc, block.mlp.c_proj):
                    nn.init.zeros_(lin.bias)
            for m in tower.proj.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=W ** -0.5)
        scale = self.config.vision.width ** -0.5
        nn.init.normal_(self.visual.cls_token, std=scale)
        nn.init.normal_(self.visual.pos_embed, std=scale)
        nn.init.normal_(self.text.token_embed.weight, std=0.02)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        # Long-CLIP: the frozen first positions
        if self.text.freeze_positions:
            nn.init.normal_(self.text.pos_fixed, std=0.01)

    def encode_image(self, images, return_hidden=False, patch_keep=None):  # float (B, 3, S, S) normalised -> (B, E)
        return self.visual(images, return_hidden, patch_keep)

    def encode_text(self, tokens, return_hidden=False):  # int64 (B, T) -> (B, E)
        return self.text(tokens, return_hidden)

    def forward(self, images, tokens, tokens_short=None, patch_keep=None, tokens_neg=None):
        """patch_keep: (B, K) kept patch indices while training with patch dropout (see sample_patch_keep);
        tokens_neg: (B, K, T) hard-negative captions, all-zero rows for empty slots."""
        if images.dtype == torch.uint8:  # bytes from the loader (B, 3, S, S): normalised here, as normalize_images does
            images = (images.float() / 255.0 - self.image_mean) / self.image_std
        img = F.normalize(self.encode_image(images, patch_keep=patch_keep), dim=-1)  # (B, E) on the unit sphere
        txt = F.normalize(self.encode_text(tokens), dim=-1)  # (B, E)
        # Long-CLIP: the short captions' embeddings (B, E)
        short = None if tokens_short is None else F.normalize(self.encode_text(tokens_short), dim=-1)
        # hard negatives: the negative captions' embeddings (B, K, E)
        neg = None if tokens_neg is None else self.encode_negatives(tokens_neg)
        # SigLIP: the learned bias ()
        bias = self.logit_bias if self.config.loss == "siglip" else None
        return CLIPOutput(img, txt, self.logit_scale.exp(), logit_bias=bias, text_short=short, text_neg=neg)

    def encode_negatives(self, tokens_neg):
        """int64 (B, K, T) negative captions, all-zero rows for empty slots -> (B, K, E) normalised, zero vectors for
        the empty slots. Every slot runs through the text tower: selecting the real ones would give a data-dependent
        shape (a host sync on the GPU, a graph break under compile) for a saving of a few short captions."""
        B, K, T = tokens_neg.shape
        flat = tokens_neg.reshape(B * K, T)  # (B*K, T)
        emb = F.normalize(self.encode_text(flat), dim=-1)  # (B*K, E)
        real = flat.any(1, keepdim=True)  # (B*K, 1) a real caption starts with sot, never 0
        return (emb * real).view(B, K, -1)  # (B, K, E)

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing per block in both towers while training (see run_blocks). Not in the config:
        it changes memory and speed, never the numbers, so a run may resume with or without it."""
        self.visual.grad_ckpt = self.text.grad_ckpt = enable
        return self

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale=100.0):
        """Call after each optimizer step: exp(logit_scale) <= 100, as in CLIP (keeps the softmax from saturating)."""
        self.logit_scale.clamp_(0, math.log(max_scale))

    def add_adapters(self, reduction, towers=("visual", "text")):
        """Two bottleneck adapters per block (after attention, after MLP) in the chosen towers (VL-Adapter)."""
        for name in towers:
            for block in getattr(self, name).blocks:
                W = block.ln_1.normalized_shape[0]
                block.adapter_attn = Adapter(W, reduction).to(block.ln_1.weight.device)
                block.adapter_mlp = Adapter(W, reduction).to(block.ln_1.weight.device)

    def lock(self, tower, unlocked_layers=0):
        """Freeze a tower ("visual" or "text", LiT) except its last `unlocked_layers` blocks; when any block stays
        trainable, so do the final norm and the projection after it. Frozen parameters leave the optimizer."""
        t = getattr(self, tower)
        if not 0 <= unlocked_layers <= len(t.blocks):
            raise ValueError(f"unlocked_layers must be in [0, {len(t.blocks)}] for the {tower} tower, got {unlocked_layers}")
        for p in t.parameters():
            p.requires_grad_(False)
        if unlocked_layers:
            last_norm = t.ln_post if tower == "visual" else t.ln_final
            for m in list(t.blocks[len(t.blocks) - unlocked_layers:]) + [last_norm, t.proj]:
                for p in m.parameters():
                    p.requires_grad_(True)

    # LiT: a fully frozen tower stays in eval mode
    def train(self, mode=True):
        """Fully frozen towers stay in eval mode (they behave as the pretrained model did)."""
        super().train(mode)
        for t in (self.visual, self.text):
            if mode and not any(p.requires_grad for p in t.parameters()):
                t.eval()
        return self

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# losses


class GatherWithGrad(torch.autograd.Function):
    """(b, E) on every rank -> (world * b, E) in rank order. Backward: every rank's loss used every rank's rows,
    so the gradient of row block r is the sum over ranks (all_reduce) of that block (works on gloo and nccl)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * b, E)

    @staticmethod
    def backward(ctx, grad):  # grad: (world * b, E)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]  # (b, E) this rank's rows


def gather(x):
    """Every rank's rows of x, with gradient: (b, ...) -> (world * b, ...); x itself in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


def clip_loss(img, txt, logit_scale, label_smoothing=0.0, all_img=None, all_txt=None, offset=0):
    """Symmetric InfoNCE. img, txt: (b, E) normalised local rows; logit_scale: exp'd scalar.
    DDP: pass all_img/all_txt (N, E) gathered from every rank and this rank's first row index `offset`; each
    local image is then contrasted with all N captions (and vice versa), and the target of row i is offset + i.
    loss = (CE(s * img @ all_txt^T, targets) + CE(s * txt @ all_img^T, targets)) / 2, averaged over local rows."""
    all_img = img if all_img is None else all_img
    all_txt = txt if all_txt is None else all_txt
    targets = torch.arange(img.shape[0], device=img.device) + offset  # (b,) the matching caption's column
    logits_i = logit_scale * img @ all_txt.t()  # (b, N) image -> every caption
    logits_t = logit_scale * txt @ all_img.t()  # (b, N) caption -> every image
    return (F.cross_entropy(logits_i, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_t, targets, label_smoothing=label_smoothing)) / 2


def siglip_loss(img, txt, logit_scale, logit_bias, all_txt=None, offset=0):
    """Sigmoid loss (SigLIP): every (image, caption) pair is its own yes/no question, so there is no softmax over
    the batch. img, txt: (b, E) normalised local rows; logit_scale: exp'd scalar t; logit_bias: scalar b.
    logits = t * img @ txt^T + b, label +1 for an image's own caption and -1 for every other one,
    loss = -mean over images of the sum over captions of log sigmoid(label * logit).
    DDP: pass all_txt (N, E) gathered from every rank and this rank's first row index `offset`; each local image
    is scored against all N captions, its own at column offset + i: exactly the one-big-batch loss, because a pair's
    term needs no other pair (the paper's ring of permutes saves the (N, E) gather, which at our N is small)."""
    all_txt = txt if all_txt is None else all_txt
    b, N = img.shape[0], all_txt.shape[0]
    logits = logit_scale * img @ all_txt.t() + logit_bias  # (b, N) each local image against every caption
    own = torch.arange(N, device=img.device)[None, :] == torch.arange(b, device=img.device)[:, None] + offset  # (b, N)
    labels = 2.0 * own - 1.0  # (b, N) +1 on each image's own caption, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum(dim=1).mean()


def negclip_loss(img, txt, neg, neg_mask, logit_scale, all_img=None, all_txt=None, offset=0):
    """clip_loss with hard negatives (NegCLIP, Yuksekgonul et al. 2023): each image is contrasted with every
    caption AND every negative caption of the batch; caption -> image is unchanged. neg: (N, K, E) the global
    batch's negative captions, neg_mask: (N, K) bool, False for empty slots (their logits are -inf).
    loss = (CE(s * img @ [all_txt; neg]^T, targets) + CE(s * txt @ all_img^T, targets)) / 2."""
    all_img = img if all_img is None else all_img
    all_txt = txt if all_txt is None else all_txt
    targets = torch.arange(img.shape[0], device=img.device) + offset  # (b,)
    negs = neg.reshape(-1, neg.shape[-1])  # (N*K, E)
    logits_i = logit_scale * img @ torch.cat([all_txt, negs]).t()  # (b, N + N*K) image -> captions, negatives
    keep = torch.cat([neg_mask.new_ones(all_txt.shape[0]), neg_mask.reshape(-1)])  # (N + N*K,) bool
    logits_i = logits_i.masked_fill(~keep, float("-inf"))  # empty slots take no probability
    logits_t = logit_scale * txt @ all_img.t()  # (b, N) caption -> every image
    return (F.cross_entropy(logits_i, targets) + F.cross_entropy(logits_t, targets)) / 2



def kd_loss(img, txt, logit_scale, t_img, t_txt, teacher_scale=100.0):
    """Similarity distillation (CLIP-KD "CRD"/MobileCLIP): soft-target cross-entropy from the teacher's to the
    student's image->text and text->image distributions, with P = softmax(teacher_scale * T_img @ T_txt^T):
    loss = (-sum_j P_ij log softmax(s * img @ txt^T)_ij  +  the same on the transposes) / 2, averaged over rows.
    Its minimum over student logits is the teacher's entropy, reached when the two distributions agree."""
    s_logits = logit_scale * img @ txt.t()  # (B, B)
    t_logits = teacher_scale * t_img @ t_txt.t()  # (B, B)
    soft_ce = lambda t, s: -(F.softmax(t, dim=1) * F.log_softmax(s, dim=1)).sum(1).mean()
    return (soft_ce(t_logits, s_logits) + soft_ce(t_logits.t(), s_logits.t())) / 2


def mse_loss(img, txt, t_img, t_txt):
    """Feature distillation: mean over elements of (img - t_img)^2 plus the same for text; inputs normalised."""
    return F.mse_loss(img, t_img) + F.mse_loss(txt, t_txt)


def icl_loss(img, txt, logit_scale, t_img, t_txt):
    """Interactive contrastive (CLIP-KD): student images against teacher captions and student captions against
    teacher images, with the usual diagonal targets: (CE(s * img @ t_txt^T) + CE(s * txt @ t_img^T)) / 2."""
    targets = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logit_scale * img @ t_txt.t(), targets)
            + F.cross_entropy(logit_scale * txt @ t_img.t(), targets)) / 2


def pca_reconstruct(x, k):
    """Long-CLIP's coarse feature: (B, E) -> (B, E) through the batch's first k principal components
    (centre, SVD, project on the top-k right singular vectors, reconstruct, add the mean back)."""
    mean = x.mean(0, keepdim=True)  # (1, E)
    xc = x - mean  # (B, E)
    _, _, Vh = torch.linalg.svd(xc if xc.dtype == torch.float64 else xc.float(), full_matrices=False)  # (min(B, E), E)
    V = Vh[:k].to(x.dtype)  # (k, E)
    return xc @ V.t() @ V + mean  # (B, k) coordinates -> (B, E)


def stretch_positions(pos, keep=20, factor=4):
    """Long-CLIP's knowledge-preserving stretch: (T, C) -> (keep + factor * (T - keep), C). Rows < keep are kept;
    old row j >= keep becomes `factor` rows pos[j] + (k / factor) * (pos[j+1] - pos[j]), k = 0..factor-1, where
    the row after the last is extrapolated as 2 * pos[-1] - pos[-2]. 77 -> 20 + 4 * 57 = 248."""
    old = pos[keep:]  # (T - keep, C)
    after = torch.cat([old[1:], (2 * old[-1] - old[-2])[None]])  # (T - keep, C) each row's right neighbour
    frac = torch.arange(factor, dtype=pos.dtype, device=pos.device) / factor  # (factor,)
    new = old[:, None] + frac[None, :, None] * (after - old)[:, None]  # (T - keep, factor, C)
    return torch.cat([pos[:keep], new.reshape(-1, pos.shape[1])])


def stretch_text_model(model, keep=20, factor=4):
    """A copy of a CLIP model whose text tower reads keep + factor * (ctx - keep) tokens (Long-CLIP: 77 -> 248);
    the first `keep` positions are frozen (a buffer), the stretched rest trains."""
    pos = model.text.positions().detach()  # (ctx, C)
    config = CLIPConfig.from_dict(model.config.to_dict())
    config.text.context_length = keep + factor * (pos.shape[0] - keep)
    config.text.freeze_positions = keep
    new = CLIP(config).to(pos.device)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("text.pos_embed", "text.pos_fixed"))}
    stretched = stretch_positions(pos, keep, factor)  # (ctx', C)
    sd["text.pos_fixed"], sd["text.pos_embed"] = stretched[:keep], stretched[keep:]
    new.load_state_dict(sd, strict=True)
    return new


# -----------------------------------------------------------------------------
# FLOPs, MFU and the optimizer

# bf16 dense tensor-core peaks; the first name found in the device name wins, so the PCIe/NVL cards come before "H100"
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def estimate_flops_per_sample(config: CLIPConfig):
    """Training FLOPs for one (image, caption) pair: per tower 6 * N * T for the matmuls (forward 2, backward 4,
    N = weights touched per token) plus 12 * L * C * T^2 for attention scores and values (nanoGPT's count).
    Patch dropout: the vision transformer sees T = K + 1 tokens (the patch embedding still runs on every patch).
    Activation checkpointing's recomputed forward is not counted (MFU counts the model's FLOPs, not the hardware's)."""
    def tower(width, layers, T, in_dim):
        n = layers * 12 * width ** 2  # qkv 3C^2 + out C^2 + mlp 8C^2 per block
        return 6 * (n * T + in_dim * width) + 12 * layers * width * T ** 2

    vc, tc = config.vision, config.text
    patches = (vc.img_size // vc.patch_size) ** 2
    vision = tower(vc.width, vc.layers, kept_patches(vc) + 1, 0) + 6 * patches * 3 * vc.patch_size ** 2 * vc.width
    text = tower(tc.width, tc.layers, tc.context_length, 0)
    heads = 6 * (vc.width + tc.width) * config.embed_dim  # the two projections, once per sample
    return vision + text + heads


def estimate_mfu(config, samples_per_s, device_name=None):
    """Model FLOPs utilisation: achieved FLOP/s over the device's bf16 peak; None when the peak is unknown."""
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if device_name and k in device_name), None)
    return None if peak is None else estimate_flops_per_sample(config) * samples_per_s / peak


def configure_optimizers(model, weight_decay, lr, betas=(0.9, 0.98), eps=1e-6, fused=None):
    """AdamW; weight decay on matrices only (>= 2 dims: linear/conv weights, token and positional embeddings);
    biases, LayerNorm gains, the class token and the logit scale (all < 2 dims) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen towers stay out of the optimizer
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:  # one fused kernel for all parameters (CUDA, and CPU since torch 2.4: ~3x the per-tensor loop)
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
