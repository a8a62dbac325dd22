"""
rectok.py: the whole RecTok method in one file.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421, CVPR 2026).
A plain-ViT KL tokenizer whose latent stays semantically rich at every point of the forward flow between
latent and noise (Flow Semantic Distillation, FSD) and under masking (Reconstruction-Alignment Distillation,
RAD), plus the DiT^DH generator and the rectified-flow sampler that are trained on that latent.

The file reads top to bottom in the paper's order: 1. building blocks (RMSNorm, the two RoPE recipes, attention,
SwiGLU, one ViT body); 2. the tokenizer (encoder, posterior, pixel and semantic decoders); 3. FSD and RAD (the
flow and its shift, the frozen teacher, masking); 4. losses (semantic, KL, PatchGAN); 5. DiT^DH; 6. rectified
flow (velocity loss, time grid, Euler/Heun, CFG, AutoGuidance); 7. data (ADM crop, image folders, MNIST-format
files, embedded shapes); 8. configs, safe checkpoint loading (ours and the released ones), training and
command-line helpers.
Written against the official code (github.com/Shi-qingyu/RecTok at ee87aaf), with ideas from nanoGPT, DiT,
MAE, minRF and SiT. Where it departs from the official code it says so; README.md lists every difference.
Tests: python -m pytest -q test_rectok.py
"""
import argparse
import fcntl
import gzip
import hashlib
import json
import math
import os
import pickle
import signal
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# Tensor letters used in shape comments: B batch, L tokens (h*w grid), Lv visible tokens, D width,
# H heads, Dh head width, C latent channels, Dt teacher width, p patch size.

# =====================================================================================================
# 1. Building blocks
# =====================================================================================================


class RMSNorm(nn.RMSNorm):
    """RMSNorm with eps 1e-6 and a learnable weight, the norm of every transformer in RecTok and DiT^DH. Computed
    in fp32 (as the official DiT's norm): under bf16 autocast nn.RMSNorm would meet a bf16 input and an fp32
    weight and fall back to its unfused kernel."""

    def __init__(self, dim):
        super().__init__(dim, eps=1e-6)

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps)


def rotate_half(x):
    """Interleaved RoPE rotation shared by both recipes: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x = x.unflatten(-1, (-1, 2))                                           # (..., Dh/2, 2)
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)        # (..., Dh)


def apply_rope(x, rope):
    """x: (B, H, L, Dh); rope: (2, L, Dh) [cos; sin] shared by the batch, or (2, B, L, Dh) per sample."""
    cos, sin = rope[0], rope[1]
    if cos.dim() == 3:                                                     # per-sample rows (masked encoder)
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def tokenizer_rope(head_dim, grid):
    """The tokenizer's 2-D RoPE table, exactly as the official `get_rope_tensor` builds it.

    It is not a true rotation (kept for checkpoint parity): coordinates are normalised to [0, 1], frequencies
    run geometrically from 7 down to 7e-4 cycles, and the frequency list is repeated rather than interleaved,
    so the two channels of a rotated pair get different frequencies. Returns (2, grid*grid, head_dim).
    """
    f = 7.0 * (7.0 / 7e-4) ** torch.linspace(0, -1, head_dim // 4)        # (Dh/4,)
    f = torch.cat([f, f])                                                  # (Dh/2,)
    freqs = torch.zeros(2, head_dim)
    freqs[0, : head_dim // 2], freqs[1, head_dim // 2:] = f, f             # row axis, column axis
    coords = torch.cartesian_prod(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid))  # (L, 2) row, col
    angle = coords @ (freqs * 2 * math.pi)                                 # (L, Dh)
    return torch.stack([angle.cos(), angle.sin()])


def dit_rope(head_dim, grid, theta=10000.0):
    """The DiT^DH's 2-D RoPE (EVA style, official `DDTVisionRotaryEmbeddingFast`): the first half of the
    channels encodes the row, the second half the column, and each adjacent pair shares one frequency, so
    this one is a proper rotation. Integer positions. Returns (2, grid*grid, head_dim)."""
    d = head_dim // 2                                                      # channels per axis
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)             # (d/2,)
    ang = (torch.arange(grid).float()[:, None] * freqs).repeat_interleave(2, dim=-1)   # (grid, d)
    rows, cols = ang[:, None].expand(-1, grid, -1), ang[None].expand(grid, -1, -1)     # (grid, grid, d)
    angle = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)             # token n = row*grid + col
    return torch.stack([angle.cos(), angle.sin()])


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on q and k, through F.scaled_dot_product_attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                                 # output layout (qkv, head, Dh)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)  # fp32 tables, back to bf16
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    """w3(SiLU(a) * b) with [a | b] = w12(x). Hidden width int(2/3 * 4 * dim) as official, = 8*dim // 3."""

    def __init__(self, dim):
        super().__init__()
        hidden = 8 * dim // 3
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block of the tokenizer."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = SwiGLU(dim)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """One ViT body for the encoder, the pixel decoder and the semantic decoder (the official code has three
    near-copies). Learnable absolute positions AND RoPE, used together as in the official code."""

    def __init__(self, size, grid):
        super().__init__()
        width, depth, heads = size
        self.grid, self.width = grid, width
        self.positional_embedding = nn.Parameter(torch.randn(1, grid * grid, width) * width**-0.5)
        self.ln_pre = RMSNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.ln_post = RMSNorm(width)
        self.register_buffer("rope", tokenizer_rope(width // heads, grid), persistent=False)

    def body(self, x, ids_keep=None):
        """x: (B, L, D) on the full grid. With ids_keep (B, Lv), only those tokens and their RoPE rows go on."""
        x = x + self.positional_embedding
        rope = self.rope                                                   # (2, L, Dh)
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, Lv, D)
            rope = rope[:, ids_keep]                                       # (2, B, Lv, Dh): each keeps its position
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x, rope)
        return self.ln_post(x)


# =====================================================================================================
# 2. Tokenizer: encoder, posterior, pixel decoder, semantic decoder (the paper's pipeline figure)
# =====================================================================================================


def unpatchify(x, p):
    """(B, p*p*c, h, w) with channel k = (p1*p + p2)*c + colour  ->  (B, c, h*p, w*p), pixel (h*p+p1, w*p+p2)."""
    B, K, h, w = x.shape
    c = K // (p * p)
    return x.view(B, p, p, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, c, h * p, w * p)


class Encoder(ViT):
    """Image in [-1, 1] (B, 3, H, W) -> posterior moments [mean | logvar] (B, Lv, 2C). No CLS or registers."""

    def __init__(self, size, grid, patch, latent_dim):
        super().__init__(size, grid)
        self.patch_embed = nn.Conv2d(3, self.width, patch, stride=patch)
        self.latent_head = nn.Linear(self.width, 2 * latent_dim)

    def forward(self, img, ids_keep=None):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)               # (B, L, D), token n = row*w + col
        return self.latent_head(self.body(x, ids_keep))                    # (B, Lv, 2C)


class Decoder(ViT):
    """Latent tokens -> full-grid features. Given ids_restore, the input holds only the visible tokens (in
    ids_keep order) and the masked slots are filled with this decoder's own mask token (RAD)."""

    def __init__(self, size, grid, latent_dim):
        super().__init__(size, grid)
        self.embed = nn.Linear(latent_dim, self.width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, self.width) * self.width**-0.5)

    def restore(self, z, ids_restore=None):
        x = self.embed(z)                                                  # (B, Lv, D)
        if ids_restore is not None:
            B, Lv, D = x.shape
            # The official decoders append one mask token too many (a leftover of MAE's CLS); we append L - Lv.
            x = torch.cat([x, self.mask_token.expand(B, ids_restore.shape[1] - Lv, D)], dim=1)  # (B, L, D)
            x = x.gather(1, ids_restore[..., None].expand(-1, -1, D))      # unshuffle to grid order
        return self.body(x)


class PixelDecoder(Decoder):
    """Latent (B, Lv, C) -> image (B, 3, H, W) on the [-1, 1] scale: ViT, 1x1 conv to p*p*3 channels per
    token, pixel shuffle, then a 3x3 conv. No output activation."""

    def __init__(self, size, grid, patch, latent_dim):
        super().__init__(size, grid, latent_dim)
        self.patch = patch
        self.ffn = nn.Conv2d(self.width, patch * patch * 3, 1)             # official name kept
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, ids_restore=None):
        x = self.restore(z, ids_restore)                                   # (B, L, D)
        x = x.transpose(1, 2).unflatten(2, (self.grid, self.grid))         # (B, D, h, w)
        return self.conv_out(unpatchify(self.ffn(x), self.patch))          # (B, 3, H, W)


class SemanticDecoder(Decoder):
    """The deliberately tiny transformer of FSD/RAD: latent (B, Lv, C) -> teacher features (B, L, Dt).
    Training only. It is small so that the semantics have to live in the latent, not in the decoder."""

    def __init__(self, size, grid, latent_dim, teacher_dim):
        super().__init__(size, grid, latent_dim)
        self.out = nn.Linear(self.width, teacher_dim)

    def forward(self, z, ids_restore=None):
        return self.out(self.restore(z, ids_restore))                      # (B, L, Dt)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over tokens and channels, averaged over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mean.shape[0]


class RecTok(nn.Module):
    """The tokenizer. Inference uses the encoder and the pixel decoder; the semantic decoder exists for stage 1
    (teacher_dim > 0). The latent statistics are persistent buffers (the official code stores them nowhere)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        C = cfg.latent_dim
        self.encoder = Encoder(cfg.encoder, self.grid, cfg.patch_size, C)
        self.decoder = PixelDecoder(cfg.decoder, self.grid, cfg.patch_size, C)
        self.sem_decoder = SemanticDecoder(cfg.sem_decoder, self.grid, C, cfg.teacher_dim) if cfg.teacher_dim else None
        self.register_buffer("latent_mean", torch.zeros(C))
        self.register_buffer("latent_std", torch.ones(C))
        self.latent_norm = None                                            # which std: "means" or "samples" (README)
        self.shift = flow_shift(self.grid, C)
        self.initialize_weights()

    def initialize_weights(self):
        # Encoder and pixel decoder: N(0, 0.02) for every Linear/Conv, zero bias (official `_init_weights`, whose
        # truncation at +-2 never bites); position embeddings and mask token keep randn * width^-0.5.
        def init(m):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.encoder.apply(init)
        self.decoder.apply(init)
        # Semantic decoder: the official `_init_weights` runs before it is built, so its layers keep the
        # PyTorch default init; its mask token starts at zero.
        if self.sem_decoder is not None:
            nn.init.zeros_(self.sem_decoder.mask_token)

    def drop_semantic_decoder(self):
        """Decoder fine-tuning and inference need no semantic decoder (the released RecTok_decft has none)."""
        self.sem_decoder, self.cfg = None, replace(self.cfg, teacher_dim=0)
        return self

    def encode(self, img, ids_keep=None):
        """Posterior per (visible) token: mean and clamped logvar (B, Lv, C), in fp32 (the official code leaves
        them in bf16 under autocast; computing the posterior in fp32 is a clean-up)."""
        mean, logvar = self.encoder(img, ids_keep).float().chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def tokens_to_grid(self, z):                                           # (B, L, C) -> (B, C, h, w)
        return z.transpose(1, 2).unflatten(2, (self.grid, self.grid))

    def normalize(self, z):
        """Posterior latent tokens (B, L, C) -> the DiT's per-channel normalised latent (B, C, h, w)."""
        return self.tokens_to_grid((z - self.latent_mean) / self.latent_std)

    def decode(self, zn):
        """Normalised latent (B, C, h, w) -> image in [0, 1] (B, 3, H, W)."""
        z = zn.flatten(2).transpose(1, 2) * self.latent_std + self.latent_mean   # (B, L, C)
        return (self.decoder(z).float() * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, img):
        """Encode to the posterior mean, decode: image in [-1, 1] -> image in [0, 1]."""
        return (self.decoder(self.encode(img)[0]).float() * 0.5 + 0.5).clamp(0, 1)

    def forward(self, img, mask_ratio=0.0, noise=True):
        """The training pass (the paper's pipeline figure) -> reconstruction (B, 3, H, W) on the [-1, 1] scale,
        semantic prediction (B, L, Dt) or None, KL. Stage 1: RAD masking, posterior sample, FSD noising, both
        decoders on the same x_t. Decoder fine-tuning: mask_ratio=0, noise=False (still posterior samples)."""
        B, L = img.shape[0], self.grid**2
        ids_keep = ids_restore = None
        if mask_ratio > 0:                                                 # RAD: encoder sees visible tokens only
            ids_keep, ids_restore = random_masking(B, L, math.ceil(L * (1 - mask_ratio)), img.device)
        mean, logvar = self.encode(img, ids_keep)                          # (B, Lv, C)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)           # posterior sample
        if noise:                                                          # FSD: a point on the forward flow
            t = sample_t(B, self.shift, img.device)[:, None, None]         # (B, 1, 1), one t per image
            z = t * z + (1 - t) * torch.randn_like(z)                      # x_t, unit noise on the raw latent
        recon = self.decoder(z, ids_restore)                               # the whole image
        sem = self.sem_decoder(z, ids_restore) if self.sem_decoder is not None else None  # all L tokens
        return recon, sem, kl_divergence(mean, logvar)


# =====================================================================================================
# 3. Flow Semantic Distillation and Reconstruction-Alignment Distillation (the paper's two methods)
# =====================================================================================================
# Time convention of the whole project: t = 1 is data, t = 0 is noise,
#     x_t = t * x_1 + (1 - t) * eps,   velocity v = dx_t/dt = x_1 - eps,   sampling integrates t from 0 to 1.
# This is the paper's pipeline figure and the official DiT/SiT code. The official tokenizer writes its noise
# with a noise level tau = 1 - t; the distribution and x_t are the same.
#
# The dimension-dependent shift (from RAE; the paper uses it for FSD and the DiT): t = shift_s(u), u ~ U(0, 1),
#     shift_s(u) = s*u / (1 + (s - 1)*u),   s = sqrt(4096 / (h*w*C)).
# For the released 16x16x128 latent s = 1/sqrt(8): the median t is 0.26, most training mass near noise.
# One formula serves the tokenizer's FSD noise, the DiT's training t and the sampling grid. It equals the
# official code whenever h*w*C >= 4096 (every released model). For smaller latents the official DiT skips its
# training shift and warps its sampling grid the other way, unlike its own tokenizer; we do not copy that.


def flow_shift(grid, latent_dim):
    return math.sqrt(4096 / (grid * grid * latent_dim))


def shift_time(u, s):
    return u / (u + (1 - u) / s)                                           # = s*u / (1 + (s-1)*u), exact at 0 and 1


def sample_t(n, s, device=None):
    """n flow times from the shifted distribution (official: t = 1 - shift_{1/s}(u), the same law)."""
    return shift_time(torch.rand(n, device=device), s)


TEACHERS = {  # name -> (timm model, teacher patch size)
    "dinov3_vitl16": ("vit_large_patch16_dinov3.lvd1689m", 16),           # the paper's teacher
    "dinov3_vitb16": ("vit_base_patch16_dinov3.lvd1689m", 16),
    "dinov3_vits16": ("vit_small_patch16_dinov3.lvd1689m", 16),
    "dinov2_vitl14": ("vit_large_patch14_dinov2.lvd142m", 14),            # the official code's alternative
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", 14),
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", 14),
    "random": ("vit_small_patch16_dinov3", 16),                           # 2 random blocks: tests, offline smoke runs
}


class Teacher(nn.Module):
    """Frozen vision foundation model (DINOv3-L/16 in the paper): patch-token features of the clean, unmasked image
    after its final norm, CLS and registers dropped, on the tokenizer's grid. Kept outside RecTok, so never saved
    (the official code saves it by accident). Input: the ImageNet-normalised image (the official code also
    truncates to uint8 and resizes 256->224->256; we feed the clean image)."""

    def __init__(self, name, grid, ckpt=None):
        super().__init__()
        import timm
        arch, patch = TEACHERS[name]
        self.res = grid * patch
        if name == "random" or ckpt == "random":  # 'random' teacher: 2 blocks; ckpt 'random': full size (benchmarks)
            warnings.warn(f"teacher {name!r} with random weights: the semantic target then carries no semantics; "
                          "use it for tests, benchmarks and offline smoke runs only.")
            with torch.random.fork_rng(devices=[]):                         # the same random teacher every time
                torch.manual_seed(0)
                depth = {"depth": 2} if name == "random" else {}
                model = timm.create_model(arch, pretrained=False, img_size=self.res, **depth)
        else:  # timm loads weight files with weights_only=True (or safetensors): no code runs
            try:
                if ckpt and not os.path.isfile(ckpt):
                    raise FileNotFoundError(f"{ckpt} does not exist")
                overlay = dict(file=ckpt) if ckpt else None
                model = timm.create_model(arch, pretrained=True, img_size=self.res, pretrained_cfg_overlay=overlay)
            except Exception as e:
                raise FileNotFoundError(f"could not load teacher {name!r} (timm {arch}): {str(e).splitlines()[0]}. "
                                        f"Get model.safetensors from Hugging Face timm/{arch} and pass --teacher_ckpt "
                                        "PATH") from e
        self.model = model.eval().requires_grad_(False)
        self.dim = model.num_features
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode=True):                                            # always frozen, always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, img):
        """img (B, 3, H, W) in [-1, 1] -> (B, L, Dt)."""
        x = F.interpolate((img + 1) / 2, size=self.res, mode="bilinear", antialias=True, align_corners=False)
        feats = self.model.forward_features((x - self.mean) / self.std)   # (B, prefix + L, Dt)
        return feats[:, self.model.num_prefix_tokens:]


class ClassTeacher(Encoder):
    """The semantic teacher of the small labelled datasets (`--teacher shapes`, `--teacher idx`), standing in for
    DINOv3 where no VFM applies and none can be downloaded: a tiny ViT on the tokenizer's patch grid (the encoder's
    body, no latent head), trained once to name the image's class from EVERY patch token, then frozen. Like a VFM's
    patch tokens, its features (after the final norm) say what the image shows, so FSD and RAD have semantics to
    distil. It never sees a held-out image, and it is not eval.py's judge: another architecture, seed and images."""

    def __init__(self, img_size, patch, num_classes=10, size=(64, 2, 2)):
        super().__init__(size, img_size // patch, patch, 1)
        self.latent_head, self.dim = nn.Identity(), self.width
        self.head = nn.Linear(self.width, num_classes)                     # training only: the class from each token

    @classmethod
    def cached(cls, img_size, patch, num_classes=10, idx_folder=None):
        """Trained once (seed 2): on 3,000 embedded shapes of its own, or on the first half of the MNIST-format
        train split in idx_folder (eval.py's judge trains on the second half)."""
        if idx_folder is None:
            key = f"shapes_teacher_p{patch}_{img_size}px_{num_classes}"
            held, epochs = Shapes(1000, img_size, num_classes, seed=1), 6
            train = lambda: shapes_batches(3000, img_size, num_classes, seed=2)   # noqa: E731
        else:
            data, held, epochs = IdxImages(idx_folder, "train", img_size), IdxImages(idx_folder, "t10k", img_size), 2
            num_classes, key = len(data.classes), f"idx_teacher_p{patch}_{img_size}px_{data.identity()['files']}"
            train = lambda: data.half(0)                                   # noqa: E731
        net, _ = trained_classifier(lambda: cls(img_size, patch, num_classes), lambda net, x: net.head(net(x)), key,
                                    train, held, seed=2, epochs=epochs)
        return net


def sample_mask_ratio(max_ratio=0.4, min_ratio=-0.1):
    """RAD mask ratio, one per step: max(0, U(-0.1, 0.4)), so 20% of the steps see no mask."""
    return max(0.0, torch.empty(()).uniform_(min_ratio, max_ratio).item())


def random_masking(B, L, n_keep, device=None):
    """MAE's argsort trick: a random permutation per sample, whose first n_keep stay visible. -> ids_keep (B, n_keep),
    the visible grid positions in the encoder's order, and ids_restore (B, L): [visible..., masked...] -> grid."""
    ids_shuffle = torch.rand(B, L, device=device).argsort(dim=1)          # ascending noise: small is keep
    return ids_shuffle[:, :n_keep], ids_shuffle.argsort(dim=1)


# =====================================================================================================
# 4. Losses (the paper's training objective; official utils/losses.py). Images enter in [-1, 1]; terms are
#    computed in fp32 on [0, 1] with the reconstruction left unclamped, as the official code does. The two
#    pretrained perceptual networks (LPIPS-VGG, ConvNeXt-S logits) live in train_tokenizer.py, their only user,
#    as eval.py holds its Inception.
# =====================================================================================================


def semantic_loss(pred, target):
    """FSD/RAD term: 1 - cosine similarity per token, averaged over every token of every image (masked
    tokens: reconstruction, visible tokens: alignment)."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def load_weights(path, url, filename, flag):
    """A pretrained state dict from a local file, the torch hub cache or its URL, always with weights_only=True
    (a crafted file cannot run code); offline, an error that names the file and where to put it."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if path or os.path.isfile(cached):
        return load_state(path or cached, flag if path else "cached weight file")
    try:
        return torch.hub.load_state_dict_from_url(url, file_name=filename, map_location="cpu", progress=False,
                                                  weights_only=True)
    except Exception as e:
        raise FileNotFoundError(f"could not download {filename} from {url} ({type(e).__name__}); "
                                f"put the file at {cached} or pass {flag} PATH") from e


def patchgan(ndf=64, n_layers=3):
    """Taming-transformers PatchGAN discriminator (4x4 convs, BatchNorm, LeakyReLU 0.2) on [0, 1] images."""
    layers, ch = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
    for n in range(1, n_layers + 1):
        out = ndf * min(2**n, 8)
        conv = nn.Conv2d(ch, out, 4, 2 if n < n_layers else 1, 1, bias=False)
        layers += [conv, nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
        ch = out
    return nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, 1, 1))


class TokenizerLoss(nn.Module):
    """Stage-1 and decoder-fine-tuning objective as named terms; `total` weighs them by config.
        L = pixel + w_perc*perceptual + w_kl*KL + w_sem*semantic + w_gan*GAN (GAN from a start epoch)
    perceptual = LPIPS, or (LPIPS + 0.1*ConvNeXt-logit MSE) / 1.1 as the official run. The official GAN weight
    is 0.1: its script passes --discriminator_weight 0.5 but the builder never forwards it."""

    def __init__(self, weights, lpips=None, convnext=None):
        super().__init__()
        self.weights = weights                                             # term name -> weight
        self.lpips, self.convnext = lpips, convnext
        self.discriminator = patchgan()

    def forward(self, img, recon, kl, sem_pred=None, sem_target=None, gan=False):
        x, x_hat = img.float() * 0.5 + 0.5, recon.float() * 0.5 + 0.5     # [0, 1]; x_hat unclamped
        terms = {"pixel": F.mse_loss(x_hat, x), "kl": kl}
        if self.lpips is not None:
            perc = self.lpips(x, x_hat)
            terms["perceptual"] = perc if self.convnext is None else (perc + 0.1 * self.convnext(x, x_hat)) / 1.1
        if sem_pred is not None:
            terms["semantic"] = semantic_loss(sem_pred, sem_target)
        if gan:  # generator side: D's parameters are used detached, so this pass leaves no gradient on D.
            # BatchNorm stays in train mode here, as in the official code.
            params = {n: p.detach() for n, p in self.discriminator.named_parameters()}
            terms["gan"] = -torch.func.functional_call(self.discriminator, params, (x_hat,)).mean()
        return terms

    def total(self, terms):
        return sum(self.weights[k] * v for k, v in terms.items())

    def discriminator_loss(self, img, recon):
        """Hinge loss: 0.5 * (E relu(1 - D(x)) + E relu(1 + D(x_hat)))."""
        real, fake = self.discriminator(img.float() * 0.5 + 0.5), self.discriminator(recon.detach().float() * 0.5 + 0.5)
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


# =====================================================================================================
# 5. DiT^DH: the generator (RAE's DiT backbone + wide shallow DDT head; official models/DDT.py)
# =====================================================================================================


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos positions (B-free): token n = row*grid + col gets [E(col), E(row)] (the official code
    puts the column first), E(p) = [sin(p*w), cos(p*w)], w_m = 10000^(-m/M), M = dim/4. (L, dim)."""
    M = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(M, dtype=torch.float64) / M)
    ang = torch.arange(grid, dtype=torch.float64)[:, None] * omega         # (grid, M)
    E = torch.cat([ang.sin(), ang.cos()], dim=1)                           # (grid, 2M)
    cols, rows = E.repeat(grid, 1), E.repeat_interleave(grid, dim=0)       # (L, 2M) each
    return torch.cat([cols, rows], dim=1).float()


class FourierTimeEmbedding(nn.Module):
    """[sin(2 pi t W), cos(2 pi t W)] with 256 fixed random frequencies W (stored in the checkpoint), then an
    MLP. t is the project time (1 = data), which is the official SiT time: checkpoints load with no flip."""

    def __init__(self, dim, n_freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_freqs), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                                  # (B,) -> (B, D)
        ang = t[:, None] * self.W[None] * 2 * math.pi
        return self.mlp(torch.cat([ang.sin(), ang.cos()], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition (B, D), or per token (B, L, D) in the head, gives shift, scale and
    gate for the attention and the MLP branch."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        if c.dim() == 2:
            c = c[:, None]                                                 # (B, 1, D): broadcast over tokens
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, rope)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiTDH(nn.Module):
    """DiT^DH: a DiT backbone over the latent, then a wide shallow head that re-reads the noisy latent,
    conditioned per token on the backbone's output. Predicts the velocity x_data - eps."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        (De, self.depth, He), (Dh, depth_h, Hh) = cfg.backbone, cfg.head
        p, C = cfg.patch_size, cfg.latent_dim
        self.grid, self.num_classes = cfg.grid // p, cfg.num_classes
        self.s_embedder = nn.Conv2d(C, De, p, stride=p)                   # backbone input
        self.x_embedder = nn.Conv2d(C, Dh, p, stride=p)                   # head input: the noisy latent again
        self.pos_embed = nn.Parameter(sincos_2d(De, self.grid)[None], requires_grad=False)  # backbone only
        self.t_embedder = FourierTimeEmbedding(De)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, De)            # row num_classes = the null label
        self.blocks = nn.ModuleList([DiTBlock(De, He) for _ in range(self.depth)] +
                                    [DiTBlock(Dh, Hh) for _ in range(depth_h)])
        self.s_projector = nn.Linear(De, Dh) if De != Dh else nn.Identity()
        self.final_layer = FinalLayer(Dh, p * p * C)
        self.register_buffer("rope_backbone", dit_rope(De // He, self.grid), persistent=False)
        self.register_buffer("rope_head", dit_rope(Dh // Hh, self.grid), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # As the official `initialize_weights` (xavier_uniform_init=False): Linear layers keep PyTorch's
        # default init; embedders like nn.Linear; labels and the time MLP N(0, 0.02); adaLN-Zero: every
        # modulation and the output layer start at zero, so each block starts as the identity.
        for conv in (self.s_embedder, self.x_embedder):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [b.adaLN_modulation[-1] for b in self.blocks]
        for mod in zero_init + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def forward(self, x, t, y):
        """x_t (B, C, h, w), t (B,) with 1 = data, y (B,) labels (num_classes = null) -> velocity (B, C, h, w)."""
        te = self.t_embedder(t)                                            # (B, De)
        c = F.silu(te + self.y_embedder(y))                                # (B, De); adaLN's SiLU again (official)
        s = self.s_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, De)
        for block in self.blocks[: self.depth]:
            s = block(s, c, self.rope_backbone)
        s = self.s_projector(F.silu(te[:, None] + s))                      # (B, L, Dh): time but no label
        h = self.x_embedder(x).flatten(2).transpose(1, 2)                  # (B, L, Dh), no absolute positions
        for block in self.blocks[self.depth:]:
            h = block(h, s, self.rope_head)
        out = self.final_layer(h, s)                                       # (B, L, p*p*C)
        return unpatchify(out.transpose(1, 2).unflatten(2, (self.grid, self.grid)), self.cfg.patch_size)


# =====================================================================================================
# 6. Rectified flow: training loss and sampler (official transport/; the time convention is in section 3)
# =====================================================================================================


def flow_matching_loss(model, z, y, s, null_label, label_drop=0.1):
    """Velocity MSE on normalised latents z (B, C, h, w) at t from the shifted law, with label dropout."""
    B = z.shape[0]
    t = sample_t(B, s, z.device)                                           # (B,)
    eps = torch.randn_like(z)
    x_t = t.view(B, 1, 1, 1) * z + (1 - t.view(B, 1, 1, 1)) * eps
    y = torch.where(torch.rand(B, device=z.device) < label_drop, null_label, y)  # trains the unconditional model
    return F.mse_loss(model(x_t, t, y).float(), z.float() - eps.float())


def time_grid(steps, s):
    """steps + 1 points from t = 0 (noise) to 1 (data): the training law applied to a uniform grid, so denser
    near noise when s < 1. The official `num_sampling_steps` counts points: its 150 is steps=149 here."""
    return shift_time(torch.linspace(0, 1, steps + 1), s)


def guided_velocity(model, x, t, y, cfg=1.0, interval=(0.0, 1.0), bad_model=None):
    """Guided velocity on all C channels. CFG: v_null + w (v_y - v_null), conditional and null label run as one
    doubled batch. AutoGuidance (bad_model given): v_bad + w (v - v_bad), the weaker model with the same label.
    Guidance applies where t lies in the interval, elsewhere the plain conditional velocity."""
    if cfg == 1.0:
        return model(x, t, y)
    if bad_model is not None:
        v, v_bad = model(x, t, y), bad_model(x, t, y)
    else:
        null = torch.full_like(y, model.num_classes)
        v, v_bad = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    on = ((t >= interval[0]) & (t <= interval[1])).view(-1, 1, 1, 1)
    return torch.where(on, v_bad + cfg * (v - v_bad), v)


@torch.no_grad()
def sample(model, noise, y, grid, method="euler", trajectory=None, **guidance):
    """Integrate dx/dt = v(x, t) over the grid from noise (t = 0) to data (t = 1), Euler or Heun (the model
    runs at left end points, as torchdiffeq's fixed-grid Euler). trajectory: a list that collects each state."""
    x = noise
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = guided_velocity(model, x, torch.full((x.shape[0],), t0, device=x.device), y, **guidance)
        if method == "heun":
            x_end = x + (t1 - t0) * v
            v = 0.5 * (v + guided_velocity(model, x_end, torch.full((x.shape[0],), t1, device=x.device), y, **guidance))
        x = x + (t1 - t0) * v
        if trajectory is not None:
            trajectory.append(x)
    return x


# =====================================================================================================
# 7. Data: ADM centre crop, image folders, MNIST-format files, procedural shapes, the small datasets' networks
# =====================================================================================================


def center_crop_arr(pil_image, size):
    """ADM centre crop (guided-diffusion, DiT, SiT, RAE): halve with BOX while the short side >= 2*size,
    BICUBIC-resize the short side to size, crop the centre. -> uint8 array (size, size, 3)."""
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def to_tensor(arr):
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def to_rgb(im):
    """Any PIL image -> 8-bit RGB. 16/32-bit integer images are scaled from 0..65535 and float images from
    [0, 1]: PIL's own convert would clip the first to white and truncate the second to black."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64) * (255 / 65535 if im.mode.startswith("I") else 255)
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def listdir(path, folders):
    """Sub-folders, or image files, of a folder; hidden ones (.ipynb_checkpoints, ...) are skipped. A dangling
    symlink counts as an image file, so that it is reported as unreadable like any other, not silently dropped."""
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    if folders:
        return [n for n in names if os.path.isdir(os.path.join(path, n))]
    return [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(os.path.join(path, n))]


def select_classes(found, classes, where):
    """The classes to use, in label order: all (None), the first N (an int) or the named ones (a list)."""
    if classes is None:
        return found
    if isinstance(classes, int):
        if classes > len(found):
            raise ValueError(f"asked for {classes} classes but {where} has {len(found)}")
        return found[:classes]
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"classes not found in {where}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return list(classes)


def read_class_list(path):
    """--class_list: one class name per line; an empty list or a name given twice is an error."""
    with open(path) as f:
        names = f.read().split()
    if not names:
        raise ValueError(f"--class_list {path} names no class")
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if twice:
        raise ValueError(f"--class_list {path} names {twice[0]!r} twice: its images would get two labels")
    return names


def file_identity(paths, root):
    """sha1 of the files' names (relative to root), sizes and modification times: changes when a file is added,
    removed, renamed or rewritten."""
    h = hashlib.sha1()
    for p in paths:
        st = os.lstat(p) if os.path.islink(p) and not os.path.exists(p) else os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class ImageFolderSubset(torch.utils.data.Dataset):
    """ROOT/CLASS/IMAGE folders (or a flat folder: one class) -> (image (3, S, S) in [-1, 1], label), ADM crop.
    classes: None (all), a count (the first N sorted) or a list of names; per_class: a cap per class. Any image
    mode becomes 8-bit RGB. An unreadable image (corrupt, truncated, too large) gives None with a warning, and
    the loaders (`collate`) drop it together with its label."""

    def __init__(self, root, size, classes=None, per_class=None, n=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        folders, files = listdir(root, folders=True), listdir(root, folders=False)
        if folders and files:
            raise ValueError(f"{root!r} holds {len(files)} image file(s) beside {len(folders)} class folder(s): move "
                             "them into a class folder, or point --data_path at a folder that holds only images "
                             "(one class)")
        found = folders or (["."] if files else [])                        # a flat folder: one class
        if not found:
            raise ValueError(f"{root!r} holds no images and no class sub-folders (expected {root}/CLASS/IMAGE.JPEG)")
        self.root, self.classes, self.size = root, select_classes(found, classes, repr(root)), size
        self.unreadable, self.samples = set(), []
        for label, name in enumerate(self.classes):
            files = listdir(os.path.join(root, name), folders=False)[:per_class]
            if not files:                                                  # as ImageFolder: no silent label shift
                raise ValueError(f"class folder {os.path.join(root, name)!r} holds no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(os.path.join(root, name, f), label) for f in files]
        self.samples = [self.samples[i] for i in spread_subset([y for _, y in self.samples], n).tolist()]
        self.labels = [label for _, label in self.samples]

    def identity(self):
        """What a checkpoint or a latent cache records of its data (plain types)."""
        return {"kind": "folder", "root": os.path.abspath(self.root), "size": self.size, "n": len(self),
                "classes": self.classes, "files": file_identity([p for p, _ in self.samples], self.root)}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                return to_tensor(center_crop_arr(to_rgb(im), self.size)), label
        except Exception as e:                                             # PIL raises many kinds: all "unreadable"
            if path not in self.unreadable:
                self.unreadable.add(path)
                warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})")
            return None


DATA_FIELDS = {"kind": "the kind of data", "root": "the folder", "split": "the split", "seed": "the shapes' seed",
               "n": "the number of images", "size": "the image size", "classes": "the classes",
               "files": "the files' names, sizes or times"}


def data_changes(old, new):
    """What differs between two datasets' identity() records, in words; [] if nothing."""
    if old.get("kind") != new.get("kind"):
        return [f"{DATA_FIELDS['kind']} {old.get('kind')} -> {new.get('kind')}"]
    changed = []
    for key, what in DATA_FIELDS.items():
        a, b = old.get(key), new.get(key)
        if a != b:
            changed.append(what if key in ("classes", "files") else f"{what} {a} -> {b}")
    return changed


# --- MNIST-format idx files (Fashion-MNIST, MNIST, KMNIST): grey 28x28 images and their labels, four files.
IDX_NAMES = [f"{split}-{kind}" for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def idx_path(folder, name):
    """folder/name or folder/name.gz, the uncompressed one first; None if neither exists."""
    paths = (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
    return next((p for p in paths if os.path.isfile(p)), None)


def idx_folder(path):
    """path, or its raw/ sub-folder (torchvision's layout), if it holds MNIST-format idx files; else None."""
    for folder in (path, os.path.join(path, "raw")):
        found = [n for n in IDX_NAMES if idx_path(folder, n)]
        if found and len(found) < len(IDX_NAMES):
            missing = next(n for n in IDX_NAMES if n not in found)
            raise ValueError(f"{folder} holds MNIST-format files but not {missing} (or {missing}.gz)")
        if found:
            return folder
    return None


def read_idx(path, ndim):
    """One MNIST-format idx file, raw or gzipped -> (uint8 array, sha1 of its bytes). The format: the magic number
    0x0000 0x08 (unsigned bytes) ndim, ndim big-endian int32 sizes, then the data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:                                       # a cut .gz ends in EOFError
        raise ValueError(f"{path} cannot be read: {e} (a truncated or corrupt file?)") from e
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:4] != bytes([0, 0, 8, ndim]):
        raise ValueError(f"{path} is not an MNIST-format idx file of {ndim}-d data: magic number "
                         f"{raw[:4].hex() or 'missing'}, expected 0000080{ndim}")
    dims = [int(d) for d in np.frombuffer(raw[4:head], ">i4")]
    if len(raw) - head != math.prod(dims):
        raise ValueError(f"{path} is truncated or too long: {len(raw) - head} bytes of data, its header says "
                         f"{' x '.join(map(str, dims))} = {math.prod(dims)}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims), hashlib.sha1(raw).hexdigest()


class IdxImages(torch.utils.data.Dataset):
    """One split ('train' or 't10k') of MNIST-format data -> (image (3, S, S) in [-1, 1], label). Each grey image
    goes through the ADM centre crop like any image (for a square 28 px image: one bicubic resize to S), and its
    grey level is repeated over the three channels. Classes are named by their label, '0' ... '9'; classes and
    per_class select as in ImageFolderSubset."""

    def __init__(self, folder, split, size, classes=None, per_class=None, n=None):
        paths = [idx_path(folder, f"{split}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        (images, h_images), (labels, h_labels) = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if len(images) != len(labels):
            raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
        self.folder, self.split, self.size, self.files = folder, split, size, h_images[:8] + h_labels[:8]
        self.classes = select_classes([str(k) for k in range(int(labels.max()) + 1)], classes, folder)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == int(c))[:per_class] for c in self.classes]))
        keep = keep[spread_subset(labels[keep].astype(np.int64), n).numpy()]
        label_of = {int(c): k for k, c in enumerate(self.classes)}
        self.images, self.labels = images[keep], [label_of[int(y)] for y in labels[keep]]

    def identity(self):
        return {"kind": "idx", "root": os.path.abspath(self.folder), "split": self.split, "size": self.size,
                "n": len(self), "classes": self.classes, "files": self.files}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        grey = center_crop_arr(Image.fromarray(self.images[i]), self.size)   # (S, S) uint8
        return to_tensor(np.repeat(grey[..., None], 3, axis=2)), self.labels[i]

    def half(self, k):
        """The first (k = 0) or second (k = 1) half of the split -> (images(idx) -> (B, 3, S, S), labels)."""
        n = len(self) // 2
        def images(idx):
            return torch.stack([self[i + k * n][0] for i in idx.tolist()])
        return images, torch.tensor(self.labels[k * n:][:n])


def collate(batch):
    """The default collate without the unreadable images (None); None if none of them could be read."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


SHAPE_COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.35, 0.95), (0.95, 0.85, 0.1), (0.1, 0.8, 0.2), (0.85, 0.2, 0.85),
                 (1.0, 0.55, 0.0), (0.0, 0.85, 0.85), (0.98, 0.98, 0.98), (0.05, 0.05, 0.05), (0.55, 0.3, 0.1)]
SHAPE_KINDS = ["circle", "square", "triangle", "ring", "cross"]


def render_shape(label, size, g):
    """One procedural image (3, size, size) in [-1, 1]: class `label` is a shape kind and a colour (kind
    label % 5, colour label % 10), at a random place, size and angle, on a random two-tone gradient."""
    r = lambda *shape: torch.rand(*shape, generator=g)                    # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a = r(1) * 2 * math.pi                                                 # background gradient
    ramp = ((xx * a.cos() + yy * a.sin()) * 0.5 + 0.5)[None]
    bg0, bg1 = 0.25 + 0.5 * r(3, 1, 1), 0.25 + 0.5 * r(3, 1, 1)
    img = bg0 * (1 - ramp) + bg1 * ramp
    cx, cy = (r(2) - 0.5) * 0.7
    rad, th = 0.3 + 0.25 * r(1), r(1) * 2 * math.pi
    u = ((xx - cx) * th.cos() + (yy - cy) * th.sin()) / rad                # shape frame, unit radius
    v = (-(xx - cx) * th.sin() + (yy - cy) * th.cos()) / rad
    box = lambda w, h: torch.maximum(u.abs() - w, v.abs() - h)            # noqa: E731
    sides = lambda: torch.stack([v * math.cos(k) + u * math.sin(k) for k in (0, 2.0944, 4.1888)])  # noqa: E731
    kind = SHAPE_KINDS[label % len(SHAPE_KINDS)]
    sdf = {"circle": lambda: (u**2 + v**2).sqrt() - 1,                     # signed distance: < 0 inside
           "square": lambda: box(0.8, 0.8),
           "triangle": lambda: sides().amax(0) - 0.5,
           "ring": lambda: ((u**2 + v**2).sqrt() - 0.75).abs() - 0.25,
           "cross": lambda: torch.minimum(box(1.0, 0.3), box(0.3, 1.0))}[kind]()
    mask = torch.sigmoid(-sdf * rad * size)[None]                          # ~1-pixel anti-aliased edge
    colour = (torch.tensor(SHAPE_COLOURS[label % len(SHAPE_COLOURS)]) + 0.1 * (r(3) - 0.5)).clamp(0, 1).view(3, 1, 1)
    return (img * (1 - mask) + colour * mask) * 2 - 1


class Shapes(torch.utils.data.Dataset):
    """Embedded class-conditional dataset: n images, deterministic per (seed, index), any resolution, no download.
    For quick runs and tests; train (seed 0) and held-out (seed 1) sets differ by seed."""

    def __init__(self, n, size, num_classes=10, seed=0):
        if not 1 <= num_classes <= len(SHAPE_COLOURS):
            raise ValueError(f"the embedded shapes have at most {len(SHAPE_COLOURS)} classes, not {num_classes}")
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed
        self.classes = [f"{SHAPE_KINDS[k % 5]}-{k}" for k in range(num_classes)]
        self.labels = [i % num_classes for i in range(n)]

    def identity(self):
        return {"kind": "shapes", "seed": self.seed, "size": self.size, "n": self.n, "classes": self.classes}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return render_shape(self.labels[i], self.size, g), self.labels[i]


# --- The small networks of the small datasets: the ClassTeacher above, and eval.py's judge.


def shapes_batches(n, size, num_classes, seed):
    """n embedded shapes rendered once -> (images(idx) -> (B, 3, S, S), labels (n,))."""
    data = Shapes(n, size, num_classes, seed=seed)
    x = torch.stack([data[i][0] for i in range(n)])
    return (lambda idx: x[idx]), torch.tensor(data.labels)


def trained_classifier(make, logits, key, train, held, seed, epochs, batch=50, lr=2e-3):
    """A small network trained once and cached in the torch hub folder as rectok_{key}.pt: cross-entropy on
    logits(net, x), (B, K) or one class per token (B, L, K). train() -> (images(idx) -> (B, 3, S, S) in [-1, 1],
    labels (N,)); held: the labelled Dataset that scores it. Under torchrun rank 0 trains and writes it, the others
    wait and read it. -> (frozen net, held-out accuracy)"""
    path = os.path.join(torch.hub.get_dir(), f"rectok_{key}.pt")
    with torch.random.fork_rng(devices=[]):                                # the caller's random streams stay put
        torch.manual_seed(seed)
        net = make()
        if not os.path.isfile(path) and not (dist.is_initialized() and dist.get_rank()):
            writable(torch.hub.get_dir(), folder=True)                     # before the work, not after it
            with lock_file(path + ".lock", f"the cached {key}", wait=True):   # one process trains it, others wait
                if not os.path.isfile(path):
                    images, labels = train()
                    with torch.enable_grad():
                        fit_classifier(net, logits, images, labels, epochs, batch, lr, key)
                    accuracy = classifier_accuracy(net, logits, held)
                    save_checkpoint(path, {"model": net.state_dict(), "val_acc": accuracy})
    if dist.is_initialized():
        dist.barrier()
    state = load_state(path, f"the cached {key}")
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"the cached {key} at {path} does not fit this network: delete it to train it again") from e
    print(f"{key}: {state['val_acc']:.1%} of {len(held)} held-out images named ({path})")
    return net.eval().requires_grad_(False), state["val_acc"]


def fit_classifier(net, logits, images, labels, epochs, batch, lr, what):
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    for _ in tqdm(range(epochs), desc=f"training the {what} (once)"):
        for idx in torch.randperm(len(labels)).split(batch):
            out = logits(net, images(idx))                                 # (B, K) or (B, L, K)
            target = labels[idx].repeat_interleave(out[0].numel() // out.shape[-1])
            loss = F.cross_entropy(out.flatten(0, -2), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def classifier_accuracy(net, logits, held):
    hits = []
    for x, y in torch.utils.data.DataLoader(held, 250):
        out = logits(net.eval(), x)
        hits.append(out.view(len(x), -1, out.shape[-1]).mean(1).argmax(1) == y)
    return torch.cat(hits).float().mean().item()


# =====================================================================================================
# 8. Configs and checkpoints (the training recipes and presets live in the two training scripts)
# =====================================================================================================

VIT_SIZES = {  # (width, depth, heads): the official SIZE_DICT, plus the CPU-sized micro of the quick preset
    "micro": (96, 2, 3),
    "tiny": (192, 3, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
DIT_SIZES = {  # (backbone, head), each (width, depth, heads); every official size has the head (2048, 2, 16)
    "micro": ((128, 4, 2), (192, 1, 3)),                                   # CPU: the Fashion-MNIST ablation
    "quick": ((192, 6, 3), (256, 1, 4)),                                   # CPU: the quick preset
    "S": ((384, 12, 6), (2048, 2, 16)),
    "B": ((768, 12, 12), (2048, 2, 16)),
    "L": ((1024, 24, 16), (2048, 2, 16)),
    "XL": ((1152, 28, 16), (2048, 2, 16)),
}


@dataclass
class TokenizerConfig:
    """The tokenizer's shape. ViT sizes are (width, depth, heads)."""
    img_size: int = 256                   # input images are img_size x img_size
    patch_size: int = 16                  # the latent grid is img_size / patch_size on a side
    latent_dim: int = 128                 # C, latent channels per token
    encoder: tuple = VIT_SIZES["base"]
    decoder: tuple = VIT_SIZES["base"]    # the pixel decoder
    sem_decoder: tuple = VIT_SIZES["tiny"]
    teacher_dim: int = 1024               # the semantic decoder's output width (the teacher's); 0: no semantic decoder


@dataclass
class DiTConfig:
    """The DiT^DH's shape. Sizes are (width, depth, heads)."""
    grid: int = 16                        # the latent grid (the tokenizer's img_size / patch_size)
    latent_dim: int = 128                 # C
    num_classes: int = 1000               # label num_classes is the null label of CFG
    patch_size: int = 1                   # latent patch size
    backbone: tuple = DIT_SIZES["XL"][0]
    head: tuple = DIT_SIZES["XL"][1]      # the wide shallow head


def atomic_write(path, write):
    """write(f) fills path through a temporary file of this process and a rename: a kill or a full disk never leaves
    a partial file, and two writers never share a temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    except (OSError, RuntimeError) as e:                                   # torch.save wraps a full disk so
        why = e.__context__ if isinstance(e.__context__, OSError) else e
        raise OSError(f"could not write {path} ({str(why).splitlines()[0]}); nothing was left behind") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def lock_file(path, what, wait=False):
    """An open file that holds an exclusive lock on path (flock), released when it is closed or its process ends, so
    a crash leaves no stale lock. If another process holds it: wait for it, or stop at once with one line."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        if not wait:
            f.close()
            raise ValueError(f"{what} is in use by another process (pid {holder}): let it finish, or choose "
                             "another") from None
        print(f"waiting for process {holder}, which holds {what} ...", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


@contextmanager
def run_lock(args, rank=0):
    """One process per run folder: rank 0 holds OUT/.lock for the whole run, and a second run there stops at once.
    A run folder inside its data is refused before the folder is made (it would become data)."""
    if args.data_path and inside(args.out, args.data_path):
        raise ValueError(f"--out {args.out} lies inside --data_path {args.data_path}: the run's files would become "
                         "data; choose another --out")
    if rank:
        yield
        return
    writable(args.out, folder=True)
    with lock_file(os.path.join(args.out, ".lock"), f"run folder {args.out}"):
        yield


def save_checkpoint(path, state):
    """Atomic, and never with non-finite weights. -> state"""
    for k, v in [kv for part in ("model", "ema") for kv in state.get(part, {}).items()]:
        if v.is_floating_point() and not v.isfinite().all():
            raise ValueError(f"refusing to write non-finite weights ({k}) to {path}")
    return atomic_write(path, lambda f: torch.save(state, f)) and state


def load_state(path, what="checkpoint"):
    """torch.load(..., weights_only=True): tensors and plain values only, so a crafted file cannot run code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{what} {path!r} was refused: it holds Python objects besides tensors and plain values, "
                         "and loading them could run code") from e
    except Exception as e:
        raise ValueError(f"{what} {path!r} is not a readable checkpoint ({type(e).__name__}; corrupt or not a torch "
                         "file)") from e


def load_checkpoint(path, kind, official=False):
    """One of our checkpoints of this kind, or with official=True also a released {"model", "model_ema"} file."""
    ckpt = load_state(path, f"{kind} checkpoint")
    is_official = isinstance(ckpt, dict) and "kind" not in ckpt and ("model" in ckpt or "model_ema" in ckpt)
    if not (official and is_official) and (not isinstance(ckpt, dict) or ckpt.get("kind") != kind):
        found = "an official release file" if is_official else (ckpt.get("kind") if isinstance(ckpt, dict) else None)
        raise ValueError(f"{path!r} is not a {kind} checkpoint: it is {found or 'of unknown kind'}")
    return ckpt


def load_model(path, kind, ema=True):
    """RecTok (kind 'tokenizer') or DiTDH ('dit') from our checkpoint or an official one (RecTok.pth,
    RecTok_decft.pth, ditdhxl_epoch_0599.pth, ...); the EMA weights by default, as the official evaluation."""
    ckpt = load_checkpoint(path, kind, official=True)
    try:
        if "kind" not in ckpt:
            state = ckpt["model_ema" if ema and "model_ema" in ckpt else "model"]
            return convert_official_tokenizer(state) if kind == "tokenizer" else convert_official_dit(state)
        model = RecTok(TokenizerConfig(**ckpt["config"])) if kind == "tokenizer" else DiTDH(DiTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except (RuntimeError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path!r}: the weights do not fit a {kind} ({' '.join(str(e).split())[:200]})") from e
    if kind == "tokenizer":
        model.latent_norm = (ckpt.get("latent_stats") or {}).get("norm")
        check_latent_stats(model.latent_mean, model.latent_std, path)
    return model


def check_latent_stats(mean, std, path):
    if not (mean.isfinite().all() and std.isfinite().all() and (std > 0).all()):
        raise ValueError(f"{path}: its latent statistics are unusable (a NaN, infinite or non-positive std or mean); "
                         "measure them again with train_tokenizer.py --stats_only")


# --- Released checkpoints. Official state dicts map onto these modules with a few renames; sizes are read
# off the tensor shapes. Heads cannot be read off shapes: the official widths fix them, others are given.
OFFICIAL_HEADS = {192: 4, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 2048: 16}
OFFICIAL_RENAMES = [  # (official key prefix or fragment, ours)
    ("encoder.patch_embed.0.", "encoder.patch_embed."), ("decoder.ffn.1.", "decoder.ffn."),
    ("decoder.decoder_embed.", "decoder.embed."), ("sem_decoder.token_embedding.", "sem_decoder.embed."),
    ("sem_decoder.mask_embedding", "sem_decoder.mask_token"), ("x_embedder.proj.", "x_embedder."),
    ("s_embedder.proj.", "s_embedder."), ("y_embedder.embedding_table.", "y_embedder.")]


def _rename(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("sem_decoders."):                                  # sem_decoders.dinov3.* -> sem_decoder.*
            k = "sem_decoder." + k.split(".", 2)[2]
        for old, new in OFFICIAL_RENAMES:
            k = new + k[len(old):] if k.startswith(old) else k
        out[k] = v
    return out


def _heads(width, heads):
    if width not in heads:
        raise ValueError(f"cannot tell the number of heads at width {width}; pass heads={{{width}: H}}")
    return heads[width]


def _vit_size(sd, prefix, heads):
    width = sd[prefix + "positional_embedding"].shape[-1]
    return (width, len({k.split(".")[2] for k in sd if k.startswith(prefix + "transformer.")}), _heads(width, heads))


def convert_official_tokenizer(sd, heads=None):
    """Official RecTok state dict -> RecTok. The frozen teacher the official code saves alongside
    (sem_foundation_models.*) is dropped; the latent statistics are not in any official file (see README)."""
    heads = {**OFFICIAL_HEADS, **(heads or {})}
    sd = _rename({k: v for k, v in sd.items() if not k.startswith("sem_foundation_models.")})
    if "encoder.patch_embed.weight" not in sd:
        raise ValueError("not an official RecTok tokenizer state dict (no encoder.patch_embed.0.weight)")
    width, _, p, _ = sd["encoder.patch_embed.weight"].shape
    grid = math.isqrt(sd["encoder.positional_embedding"].shape[1])
    has_sem = "sem_decoder.out.weight" in sd
    cfg = TokenizerConfig(img_size=grid * p, patch_size=p, latent_dim=sd["encoder.latent_head.weight"].shape[0] // 2,
                          encoder=_vit_size(sd, "encoder.", heads), decoder=_vit_size(sd, "decoder.", heads),
                          sem_decoder=_vit_size(sd, "sem_decoder.", heads) if has_sem else VIT_SIZES["tiny"],
                          teacher_dim=sd["sem_decoder.out.weight"].shape[0] if has_sem else 0)
    model = RecTok(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"latent_mean", "latent_std"}:
        raise ValueError(f"official tokenizer does not map cleanly: missing {missing}, unexpected {unexpected}")
    return model


def convert_official_dit(sd, heads=None):
    """Official DiTwDDTHead state dict -> DiTDH. Its stored RoPE tables are checked against ours, then dropped."""
    heads = {**OFFICIAL_HEADS, **(heads or {})}
    ropes = {k: v for k, v in sd.items() if "_feat_rope.freqs_" in k}
    sd = _rename({k: v for k, v in sd.items() if k not in ropes})
    if "s_embedder.weight" not in sd:
        raise ValueError("not an official DiT^DH state dict (no s_embedder.proj.weight)")
    De, C, p, _ = sd["s_embedder.weight"].shape
    Dh = sd["x_embedder.weight"].shape[0]
    if De == Dh:
        raise ValueError("backbone and head have the same width: the split between them cannot be read off the shapes")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    widths = [sd[f"blocks.{i}.norm1.weight"].shape[0] for i in range(depth)]
    backbone, head = (De, widths.count(De), _heads(De, heads)), (Dh, widths.count(Dh), _heads(Dh, heads))
    cfg = DiTConfig(grid=math.isqrt(sd["pos_embed"].shape[1]) * p, latent_dim=C,
                    num_classes=sd["y_embedder.weight"].shape[0] - 1, patch_size=p, backbone=backbone, head=head)
    model = DiTDH(cfg)
    model.load_state_dict(sd, strict=True)                                 # load_model words a failure
    for name, table in ropes.items():                                      # official: one buffer per cos, sin
        ours = (model.rope_backbone if name.startswith("enc") else model.rope_head)[0 if name.endswith("cos") else 1]
        if not torch.allclose(ours, table.float(), atol=1e-5):
            raise ValueError(f"official {name} differs from the recomputed RoPE table")
    return model


# --- Training helpers shared by train_tokenizer.py and train_dit.py.


def setup_distributed():
    """DDP under torchrun (it sets RANK), else one process. -> (rank, world, device). TF32 on GPU, as official."""
    rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def broadcast_object(obj, world):
    """Rank 0's obj on every rank."""
    if world > 1:
        box = [obj]
        dist.broadcast_object_list(box, 0)
        obj = box[0]
    return obj


def broadcast(module, world):
    """Rank 0's weights on every rank (before the EMA copy is made, so that every rank's EMA is the same)."""
    for t in module.state_dict().values() if world > 1 else []:
        dist.broadcast(t, 0)
    return module


def autocast(device):
    """bf16 autocast on GPU, plain fp32 on CPU: the same loop runs on both."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def ema_update(ema, model, decay):
    """EMA by parameter name. Frozen parameters are copied from the model, as the official EMA does (so in
    decoder fine-tuning the EMA encoder is the raw frozen encoder)."""
    params = dict(model.named_parameters())
    for name, p_ema in ema.named_parameters():
        p = params[name]
        if p.requires_grad:
            p_ema.lerp_(p, 1 - decay)
        else:
            p_ema.copy_(p)


def gathered_rng_states(world):
    """Every rank's torch RNG states (all randomness of a step), so that each rank resumes its own streams."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    states = [{"cpu": torch.get_rng_state(), "cuda": cuda}] * world
    if world > 1:
        dist.all_gather_object(states, states[0])
    return states


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Progress:
    """Where a training run stands, for the lines that end it: steps done, the last checkpoint, a stop signal."""
    ckpt_path: str
    step: int = 0
    saved: int = None                     # the step of the last checkpoint written
    signal: str = None                    # SIGTERM or SIGUSR1, once one arrives

    def last_checkpoint(self):
        if self.saved is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint is {self.ckpt_path} (step {self.saved})"


@contextmanager
def stop_guard(progress, rank=0):
    """SIGTERM and SIGUSR1, which clusters send before they preempt a job, set progress.signal: the loop saves a
    checkpoint at the next step and stops. Ctrl-C ends in one line with the step reached and the last checkpoint."""
    def ask(signum, frame):
        progress.signal = signal.Signals(signum).name
    previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    except KeyboardInterrupt:
        line = f"interrupted at step {progress.step}; {progress.last_checkpoint()}"
        raise SystemExit(line if rank == 0 else 1) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def memory_guard(batch, img_size):
    """Running out of memory, on the CPU or a GPU, ends in one line that names the sizes to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise ValueError(f"out of memory with batches of {batch} images of {img_size} px per process: lower "
                         "--batch_size, or --img_size") from None


def out_of_memory(e):
    """torch.OutOfMemoryError (GPU), MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def any_rank(flag, world):
    """True on every rank if it is True on any."""
    if world > 1:
        flag = torch.tensor(float(flag), device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag)
    return bool(flag)


def check_finite(progress, world, rank=0, **values):
    """Stop before the optimiser step if a loss term or gradient norm is not finite on any rank. The line names the
    rank that saw it, with that rank's values, and the last good checkpoint."""
    vec = torch.stack([v.detach().float() for v in values.values()])
    every = [vec]
    if world > 1:
        every = [torch.empty_like(vec) for _ in range(world)]
        dist.all_gather(every, vec)
    terms = torch.tensor(["grad_norm" not in k for k in values], device=vec.device)  # a rank's own, not shared
    bad = ([r for r, v in enumerate(every) if not v[terms].isfinite().all()] or
           [r for r, v in enumerate(every) if not v.isfinite().all()])  # gradients are all-reduced: alike everywhere
    if bad:
        where = f" on rank {bad[0]}" if world > 1 else ""
        shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(values, every[bad[0]].tolist()))
        raise SystemExit(f"non-finite loss or gradient at step {progress.step + 1}{where} ({shown}); stopped before "
                         f"the optimiser step: {progress.last_checkpoint()}." if rank == 0 else 1)


def global_mean(terms, world):
    """Scalar tensors -> floats averaged over the ranks: the values of the global batch, on any number of processes."""
    vec = torch.stack([v.detach().float() for v in terms.values()])
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    return dict(zip(terms, vec.tolist()))


def plan_steps(args, recipe, n_images, world, resume, ckpt_path):
    """Per-rank batch, steps per epoch, total steps and where the run stands; a plan of no step is an error.
    -> (batch, steps_per_epoch, total, Progress)"""
    steps_per_epoch = n_images // recipe.batch_size
    if recipe.batch_size % world or steps_per_epoch == 0:
        raise ValueError(f"batch size {recipe.batch_size} must divide by {world} processes and fit the "
                         f"{n_images} images")
    total = args.steps or round(recipe.epochs * steps_per_epoch)
    if total == 0:
        raise ValueError(f"--epochs {recipe.epochs:g} is 0 steps of {recipe.batch_size} on {n_images} images: "
                         "raise --epochs or pass --steps")
    progress = Progress(ckpt_path, resume["step"], saved=resume["step"]) if resume else Progress(ckpt_path)
    step = progress.step
    if args.stop_at is not None and step < total and not step < args.stop_at <= total:
        raise ValueError(f"--stop_at {args.stop_at} must lie after the current step {step} and at most at the last, "
                         f"{total}")
    return recipe.batch_size // world, steps_per_epoch, total, progress


def epoch_loader(dataset, batch_size, epoch, seed, skip_batches=0, rank=0, world=1, workers=0):
    """This rank's batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run skips exactly
    the batches it has seen. It draws nothing from the global RNG, which resume restores separately."""
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    n = len(dataset) // (batch_size * world) * batch_size * world          # drop the ragged end
    order = torch.randperm(len(dataset), generator=g)[:n][rank::world][skip_batches * batch_size:]
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=order.tolist(), num_workers=workers,
                                       collate_fn=collate, drop_last=True, generator=g)


def spread_subset(labels, n=None, seed=0):
    """n indices (all for None), seeded: round-robin over the classes, random images within each class."""
    labels = torch.as_tensor(labels)
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    lab, counts = labels[perm], torch.bincount(labels)
    by_class = lab.argsort(stable=True)                                    # positions in perm, grouped by class
    place = torch.empty_like(lab)
    place[by_class] = torch.arange(len(lab)) - (counts.cumsum(0) - counts)[lab[by_class]]  # its place within its class
    return perm[place.argsort(stable=True)[:n]].sort().values


def pass_loader(dataset, batch_size, workers=0, n=None, rank=0, world=1, what="images"):
    """One pass (statistics, cache, evaluation) over this rank's share of a spread subset; no global RNG draws."""
    idx = spread_subset(dataset.labels, n)
    if rank == 0:
        covered = len(set(np.asarray(dataset.labels)[idx.numpy()]))
        print(f"{what}: {len(idx)} of {len(dataset)} images, {covered} of {len(set(dataset.labels))} classes")
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx[rank::world].tolist()), batch_size,
                                       num_workers=workers, collate_fn=collate, generator=torch.Generator())


def maybe_compile(modules, enabled):
    """--compile: torch.compile each module in place (state-dict keys unchanged); failures fall back to eager. The
    tokenizer compiles its ViTs, not its forward, which the per-step mask ratio would recompile at every value."""
    if enabled:
        torch._dynamo.config.suppress_errors = True
        for m in modules:
            m.compile()


def log_json(path, record):
    """One JSON line per log step; on a GPU with the peak memory so far."""
    if torch.cuda.is_available():
        record["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_grid(images, path, nrow=8):
    """A PNG grid of images in [0, 1], written atomically."""
    from torchvision.utils import save_image
    return atomic_write(path, lambda f: save_image(images, f, nrow=nrow, format="png"))


# --- Command lines: every flag checked where it is read, run folders never overwritten by accident.


def number(kind, low=0.0, high=None, low_ok=False):
    """An argparse type: a finite `kind` above low (or at it, with low_ok), and at most high."""
    def check(text):
        v = kind(text)
        if not (math.isfinite(v) and (v >= low if low_ok else v > low) and (high is None or v <= high)):
            upper = "" if high is None else f" and <= {high:g}"
            raise argparse.ArgumentTypeError(f"must be {'>=' if low_ok else '>'} {low:g}{upper}, got {text}")
        return v
    check.__name__ = kind.__name__
    return check


POS_INT, POS_FLOAT = number(int), number(float)
NONNEG_INT, NONNEG_FLOAT = number(int, low_ok=True), number(float, low_ok=True)
FRACTION = number(float, 0.0, 1.0, low_ok=True)


def add_common_args(parser, presets):
    """Flags shared by the two training scripts: data, run control, checkpoints."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", help="ImageNet-style train folder (ROOT/CLASS/IMAGE) or a folder of MNIST-format "
                   "idx files; without it, the embedded shapes")
    g.add_argument("--num_classes", type=POS_INT, help="use the first N class folders (sorted)")
    g.add_argument("--class_list", help="file with one class folder name per line")
    g.add_argument("--images_per_class", type=POS_INT, help="keep at most N images per class")
    g.add_argument("--train_images", type=POS_INT, help="train on N images spread over the classes (the embedded "
                   "shapes: render N); default: the preset's (quick: 4,000), else all")
    g.add_argument("--workers", type=NONNEG_INT, default=0, help="DataLoader worker processes (every data pass)")
    g = parser.add_argument_group("run")
    g.add_argument("--preset", default="quick", choices=list(presets))
    g.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, image grids")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT")
    g.add_argument("--overwrite", action="store_true", help="delete the run in OUT and start over")
    g.add_argument("--allow_new_data", action="store_true", help="--resume on data that differ from the checkpoint's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=POS_INT, help="total optimisation steps (default: from epochs)")
    g.add_argument("--stop_at", type=POS_INT, help="save and stop at this step, to be continued with --resume")
    g.add_argument("--log_every", type=POS_INT, default=20)
    g.add_argument("--image_every", type=POS_INT, default=500, help="write a progress image grid every N steps")
    g.add_argument("--ckpt_every", type=POS_INT, default=500)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")


def override(recipe, args):
    """A preset with the flags the user set (not None) laid over it."""
    given = {f.name: getattr(args, f.name) for f in fields(recipe) if getattr(args, f.name, None) is not None}
    return replace(recipe, **given)


def dataset_from_args(args, img_size, train=True, n=None):
    """The embedded shapes (train: n of seed 0, default 4,000; held-out: 1,000 of seed 1), MNIST-format idx files
    (train: the train split, held-out: t10k) or an ImageNet-style folder subset (the folder itself either way).
    n: the training set is a seeded subset of n images spread over the classes."""
    if args.data_path is None:
        return Shapes(n or 4000 if train else 1000, img_size, args.num_classes or 10, seed=0 if train else 1)
    classes = read_class_list(args.class_list) if args.class_list else args.num_classes
    n = n if train else None
    folder = idx_folder(args.data_path)
    if folder:
        return IdxImages(folder, "train" if train else "t10k", img_size, classes, args.images_per_class, n)
    return ImageFolderSubset(args.data_path, img_size, classes, args.images_per_class, n)


def writable(path, folder=False):
    """Stop before any work if path cannot be written: a folder (made if missing), or a file in one."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        found, expected = ("a file", "a folder") if folder else ("a folder", "a file name")
        raise ValueError(f"{path} is {found}; expected {expected}")
    where = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        probe = os.path.join(where, f".write_test{os.getpid()}")
        os.makedirs(where, exist_ok=True)
        open(probe, "wb").close()
        os.remove(probe)
        return path
    except OSError as e:
        raise OSError(f"cannot write to {where}: {e.strerror or e}") from e


RUN_KEYS = {"tokenizer": ("config", "recipe", "stage", "step", "model", "ema", "disc", "opt", "d_opt", "rng"),
            "dit": ("config", "recipe", "step", "model", "ema", "opt", "rng")}


def inside(path, folder):
    """Whether path is folder or lies in it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def not_an_input(out, inputs, flag="--out"):
    """An output path must not be one of the command's input files."""
    for p in inputs:
        if p and out and os.path.realpath(p) == os.path.realpath(out):
            raise ValueError(f"{flag} {out} is an input of this command ({p}): choose another path")


def start_run(args, kind, rank=0, inputs=()):
    """-> (checkpoint to resume or None, ckpt path, log path). A run is never overwritten by accident, and never
    deleted or overwritten together with one of the command's inputs; on resume log.jsonl keeps only the steps
    up to the checkpoint, so that each step is logged once."""
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    if not (args.resume or args.overwrite) and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        raise ValueError(f"{args.out} already holds a run: pass --resume to continue it, or --overwrite to delete it "
                         "and start over")
    given = [p for p in inputs if p]
    for p in given if args.overwrite else [p for p in given if inside(p, ckpt_path) or inside(p, log_path)]:
        if inside(p, args.out):
            raise ValueError(f"{p} is an input of this command and lies in --out {args.out}, which this run would "
                             "overwrite: choose another --out")
    resume = load_checkpoint(ckpt_path, kind) if args.resume and os.path.exists(ckpt_path) else None
    if resume and resume.get("stage") != 0:                                # stage 0: statistics only, no run
        missing = [k for k in RUN_KEYS[kind] if k not in resume]
        if missing:
            raise ValueError(f"{ckpt_path} cannot be resumed: it has no {missing[0]!r} (another version of this code?)")
    if rank == 0:                                                          # rank 0 alone touches the folder
        for name in os.listdir(args.out) if args.overwrite else []:
            if name in ("ckpt.pt", "log.jsonl") or name.startswith(("recon_", "samples_")) and name.endswith(".png"):
                os.remove(os.path.join(args.out, name))
        if args.resume and resume is None:
            print(f"--resume: no {ckpt_path} yet, starting a new run")
        trim_log(log_path, (resume or {}).get("step", 0))
    return resume, ckpt_path, log_path


def trim_log(log_path, step):
    """Drop the lines logged after the checkpoint's step (and a last line cut short by a kill)."""
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path) as f:
        for n, line in enumerate(f, 1):
            try:
                last = json.loads(line)["step"] if line.endswith("\n") else None
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{log_path} is damaged at line {n} ({type(e).__name__}): repair or delete it") from e
            if last is not None and last <= step:
                kept.append(line)
    atomic_write(log_path, lambda f: f.write("".join(kept).encode()))


def recipe_from(cls, saved, path):
    """A recipe dataclass from a checkpoint's plain dict; a field this code does not know is an error."""
    unknown = sorted(set(saved) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{path} comes from another version of this code: its recipe has the unknown field "
                         f"{unknown[0]!r}")
    return cls(**saved)


def check_same_data(resume, dataset, ckpt_path, allow):
    """Record of the data a run trains on -> the same, or an error naming what changed (unless allow)."""
    now = dataset.identity()
    changes = data_changes(resume.get("data") or {}, now) if resume and "data" in resume else []
    if changes and not allow:
        raise ValueError(f"{ckpt_path} was trained on other data ({'; '.join(changes)}); pass --allow_new_data to "
                         "continue on these")
    if changes:
        print(f"--allow_new_data: continuing on other data ({'; '.join(changes)})")
    return now


def run_cli(main, get_args):
    """Run a script. An expected failure (files, permissions, disk, bad data, memory, Ctrl-C) ends in one line,
    not a traceback; open progress bars are closed first, so that the line stands alone."""
    def stop_now(signum, frame):                                           # outside the step loop: stop at once
        raise SystemExit(f"stopped by {signal.Signals(signum).name} before the training steps: nothing to save")
    args = get_args()
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, stop_now)
    try:
        main(args)
    except BaseException as e:
        message = cli_message(e, args)
        if message is None:
            raise
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        sys.exit(message)


def cli_message(e, args):
    """The one line that ends a script for an expected failure; None for a bug (which keeps its traceback)."""
    if isinstance(e, SystemExit):
        return e.code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, (RuntimeError, MemoryError)) and out_of_memory(e):
        return f"error: out of memory with --batch_size {getattr(args, 'batch_size', None)}: lower it"
    if isinstance(e, (OSError, ValueError)):
        return f"error: {e}"
    return None
