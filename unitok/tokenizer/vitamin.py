"""The reference layout: ViTamin encoder without positions, the ViTamin convolutional decoder, the reference projection.

These modules compute what the released UniTok computes and carry its parameter names, so its state dict loads key
for key (after the few renames in `unitok.tokenizer.reference`). They are config choices of `UniTok`:

    ModelConfig(encoder="vitamin_large", decoder="vitamin", projection="attn_reference", patch_size=16, ...)

Encoder (B, 3, S, S) -> (B, (S/16)^2, width): timm's ViTamin conv stem and MbConv stages (16x down-sampling), then
timm `Block`s with the GeGLU MLP below, no positional embedding, no class token, final LayerNorm (eps 1e-6).

Decoder (B, N, width) -> (B, 3, S, S): the same kind of blocks (fresh weights, no positions) and LayerNorm, the
tokens as a (B, width, S/16, S/16) map, then four up-sampling stages, 2x each:

    up_conv1  Upsample2d(width, c2)                 nearest x2, conv3x3
    up_conv2  InvMbConvLNBlock(c2, c2, stride 2) + (d2 - 1) x InvMbConvLNBlock(c2, c2)
    up_conv3  InvMbConvLNBlock(c2, c3, stride 2) + (d3 - 1) x InvMbConvLNBlock(c3, c3)
    up_conv4  InvStem(c3, 3)                         nearest x2, conv3x3, LayerNorm2d + GELU, conv3x3 -> RGB

Sizes as the reference registers them (the ViT part: width, depth, heads; GeGLU hidden = 2 x width):
    vitamin_base   stem 128, stages (128, 256) x (2, 4), width 768,  depth 14, 12 heads, decoder (256, 128) x (4, 2)
    vitamin_large  stem 160, stages (160, 320) x (2, 4), width 1024, depth 31, 16 heads, decoder (320, 160) x (4, 2)
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import HybridEmbed, LayerNorm2d, LayerNormAct2d, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.models.vitamin import GeGluMlp, MbConvStages, VitCfg, VitConvCfg

from .projection import ProjectionAttention

# name -> (stem, stage 1, stage 2 widths), stage depths, ViT heads, decoder (c2, c3) widths, decoder depths
VITAMIN_SIZES = {
    "vitamin_base": dict(conv_widths=(128, 128, 256), conv_depths=(2, 4), width=768, num_heads=12,
                         decoder_conv_widths=(256, 128), decoder_conv_depths=(4, 2)),
    "vitamin_large": dict(conv_widths=(160, 160, 320), conv_depths=(2, 4), width=1024, num_heads=16,
                          decoder_conv_widths=(320, 160), decoder_conv_depths=(4, 2)),
}
VITAMIN_ENCODERS = (*VITAMIN_SIZES, "vitamin")  # "vitamin": every width given explicitly in the config


def _ints(values: Sequence, default: Sequence) -> tuple:
    return tuple(int(v) for v in (values if len(values) else default))


def vitamin_dims(cfg) -> dict:
    """The conv widths/depths a config asks for: its explicit fields, else those of the named size.

    A custom size (encoder "vitamin", or a ViTamin decoder after another encoder) must give its widths.
    """
    named = VITAMIN_SIZES.get(cfg.encoder)
    dims = {}
    for key, default_depths in (("conv_widths", None), ("conv_depths", (2, 4)), ("decoder_conv_widths", None),
                                ("decoder_conv_depths", (4, 2))):
        default = named[key] if named else default_depths
        if not len(getattr(cfg, key)) and default is None:
            dims[key] = None  # only an error if the module that needs it is built
        else:
            dims[key] = _ints(getattr(cfg, key), default)
    return dims


def _need(dims: dict, key: str, cfg) -> tuple:
    if dims[key] is None:
        raise ValueError(f"{key} must be given for encoder={cfg.encoder!r} / decoder={cfg.decoder!r}; or name a "
                         f"ViTamin size: encoder='vitamin_base' or 'vitamin_large'")
    return dims[key]


def reference_mlp(dim: int, hidden: int) -> GeGluMlp:
    """The reference's GeGLU: w2(gelu_tanh(w0(n)) * w1(n)) with n = LayerNorm(eps 1e-6) of the *input*.

    timm's ViTamin GeGluMlp has the same parameters and computation; only its activation is chosen by the caller,
    and the reference uses the tanh approximation of GELU.
    """
    return GeGluMlp(dim, hidden, act_layer="gelu_tanh")


def _vit(cfg, depth: int, embed_layer=None, img_size: int = 256) -> VisionTransformer:
    """timm VisionTransformer as the reference builds it: no positions, no class token, GeGLU (hidden
    mlp_ratio x width: 2 in the reference), LayerNorm eps 1e-6."""
    def mlp_layer(in_features, hidden_features, **_ignored):  # act/norm/bias kwargs from Block: fixed by reference
        return reference_mlp(in_features, hidden_features)

    kwargs = dict(embed_layer=embed_layer) if embed_layer is not None else {}
    return VisionTransformer(
        img_size=img_size, patch_size=1, in_chans=cfg.in_chans, embed_dim=cfg.width, depth=depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, mlp_layer=mlp_layer, qkv_bias=True, class_token=False,
        pos_embed="none", reg_tokens=0, global_pool="", fc_norm=False, num_classes=0, **kwargs)


class ViTaminEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, (S/16)^2, width). Parameter names as the reference's `encoder.*`.

    The conv stem and stages are timm's ViTamin `MbConvStages` (LayerNorm2d eps 1e-6, GELU), the transformer is
    timm's VisionTransformer with `pos_embed='none'`; the reference's zero `pos_embed` buffer is dropped on load.
    """

    def __init__(self, cfg):
        super().__init__()
        dims = vitamin_dims(cfg)
        stem, s1, s2 = _need(dims, "conv_widths", cfg)
        conv = VitCfg(embed_dim=(s1, s2, cfg.width), depths=(*dims["conv_depths"], 1), stem_width=stem,
                      conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6))
        backbone = MbConvStages(conv, in_chans=cfg.in_chans)
        # HybridEmbed(proj=False) flattens the backbone's (B, width, S/16, S/16) map to tokens, as the reference's.
        embed = partial(HybridEmbed, backbone=backbone, proj=False)
        vit = _vit(cfg, cfg.encoder_depth, embed_layer=embed, img_size=cfg.image_size)
        # Keep exactly the parts with parameters or computation (the reference's key set); the rest are Identity.
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.patch_embed(images)))


class Upsample2d(nn.Module):
    """(B, a, H, W) -> (B, b, 2H, 2W): nearest x2, then conv3x3 (padding 1, bias)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class InvMbConvLNBlock(nn.Module):
    """Inverted MbConv block run upwards: (B, a, H, W) -> (B, b, H*stride, W*stride), mid = 4 b.

    main = conv1x1(mid->b) . GELU . dwconv3x3 . [Upsample2d(mid, mid) if stride 2] . GELU . conv1x1(a->mid) . LN2d
    shortcut = Upsample2d(a, b) if stride 2, conv1x1 if a != b, else identity; output = main + shortcut.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        mid = 4 * out_chs
        if stride == 2:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.act1 = nn.GELU()
        self.up = Upsample2d(mid, mid) if stride == 2 else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act1(self.conv1_1x1(self.pre_norm(x))))
        return self.conv3_1x1(self.act2(self.conv2_kxk(y))) + self.shortcut(x)


class InvStem(nn.Module):
    """(B, a, H, W) -> (B, out, 2H, 2W): Upsample2d(a, a), LayerNorm2d + GELU (eps 1e-6), conv3x3 a -> out."""

    def __init__(self, in_chs: int, out_chs: int = 3):
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNormAct2d(in_chs, eps=1e-6, act_layer=nn.GELU)
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(nn.Module):
    """(B, N, width) -> (B, 3, S, S), see the module docstring. Clamped to [-1, 1] in eval mode, as the reference's
    inference; training sees the raw output so the losses keep their gradients at the boundary."""

    def __init__(self, cfg):
        super().__init__()
        dims = vitamin_dims(cfg)
        c2, c3 = _need(dims, "decoder_conv_widths", cfg)
        d2, d3 = dims["decoder_conv_depths"]
        self.grid = cfg.grid_size
        vit = _vit(cfg, cfg.decoder_depth, img_size=cfg.image_size)
        self.blocks, self.norm = vit.blocks, vit.norm
        self.up_conv1 = Upsample2d(cfg.width, c2)
        self.up_conv2 = nn.Sequential(*[InvMbConvLNBlock(c2, c2, 2 if i == 0 else 1) for i in range(d2)])
        self.up_conv3 = nn.Sequential(*[InvMbConvLNBlock(c2 if i == 0 else c3, c3, 2 if i == 0 else 1)
                                        for i in range(d3)])
        self.up_conv4 = InvStem(c3, cfg.in_chans)
        # The reference's init: xavier(gain 0.5) convs (linears and norms are set by UniTok's own init).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=0.5)
                nn.init.zeros_(m.bias)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is measured on (the reference's `up_conv4.conv2.weight`)."""
        return self.up_conv4.conv2.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        x = self.norm(self.blocks(tokens)).transpose(1, 2).reshape(B, C, self.grid, self.grid)
        x = self.up_conv4(self.up_conv3(self.up_conv2(self.up_conv1(x))))
        return x if self.training else x.clamp(-1, 1)


class ReferenceAttnProjection(nn.Module):
    """The reference's AttnProjection, (B, N, in_dim) -> (B, N, out_dim), with its parameter names:

        y = proj(norm3(x)) + attn(norm1(x));   y = y + mlp(norm2(y))

    norm1..3 are plain LayerNorms (eps 1e-5), `attn` is the multi-head projection attention of
    `unitok.tokenizer.projection` (averaged heads going down, concatenated going up; q/v biases), `mlp` the GeGLU with its
    own input LayerNorm (eps 1e-6), tanh-GELU and hidden 2 x out.
    """

    def __init__(self, in_dim: int, out_dim: int, causal: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = ProjectionAttention(in_dim, out_dim, causal)
        self.norm3 = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = reference_mlp(out_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


def init_reference_linears(module: nn.Module) -> None:
    """trunc-normal(0.02) linears with zero biases (the reference's init of decoder and projections)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
