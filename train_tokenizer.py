"""
train_tokenizer.py: train the RecTok tokenizer.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Stage 1 trains the
encoder, pixel decoder and semantic decoder with FSD + RAD + pixel, perceptual, KL and (from a start epoch) GAN
losses; stage 2 (--decoder_finetune) trains only the pixel decoder on clean latents. At the end the latent
mean/std are measured on the training data and stored in the checkpoint. The recipe follows the official
main_reconstruction.py and run_*_tokenizer.sh; the loop is in the spirit of nanoGPT's train.py. The two
pretrained perceptual networks of the loss (LPIPS-VGG, ConvNeXt-S logits) are defined here.

  python train_tokenizer.py --preset quick --out runs/quick_tok                             # CPU, minutes
  python train_tokenizer.py --preset quick --decoder_finetune --init_from runs/quick_tok/ckpt.pt --out runs/quick_tok_ft
  python train_tokenizer.py --preset subset --data_path IMAGENET/train --num_classes 100 --out runs/subset_tok
  torchrun --nproc_per_node 8 train_tokenizer.py --preset paper --data_path IMAGENET/train --out runs/paper_tok
  python train_tokenizer.py --stats_only --init_from RecTok_decft.pth --data_path IMAGENET/train --out runs/official_tok
"""
import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import rectok as R


@dataclass
class TokenizerRecipe:
    """Everything train_tokenizer.py takes from a preset; each field is also a flag of the same name. Defaults are
    the paper's stage 1 (official run_train_tokenizer.sh); the ft_ fields are decoder fine-tuning's."""
    img_size: int = 256
    patch_size: int = 16
    latent_dim: int = 128
    encoder: str = "base"                 # a VIT_SIZES name
    decoder: str = "base"
    sem_decoder: str = "tiny"
    teacher: str = "dinov3_vitl16"        # a TEACHERS name, or 'shapes' / 'idx' (ClassTeacher)
    batch_size: int = 1024                # global
    epochs: float = 200
    blr: float = 1e-4                     # base lr: lr = blr * batch_size / 256
    warmup_epochs: float = 50
    weight_decay: float = 1e-4
    grad_clip: float = 3.0
    ema: float = 0.999
    mask_ratio_max: float = 0.4           # RAD: mask ratio max(0, U(-0.1, this)); 0 = no masking
    noise: bool = True                    # FSD: noise the latent along the flow
    flip: bool = True                     # random horizontal flips
    perceptual_weight: float = 1.0        # LPIPS
    convnext: bool = True                 # add the 0.1-weighted ConvNeXt-S logit term to the perceptual one
    kl_weight: float = 1e-6
    sem_weight: float = 1.0               # FSD/RAD cosine term
    gan_weight: float = 0.1               # 0.1: the official effective value (paper: 0.5)
    gan_start_epoch: float = 100
    ft_epochs: float = 100                # decoder fine-tuning
    ft_blr: float = 5e-5
    ft_warmup_epochs: float = 5
    latent_norm: str = "means"            # the DiT divides by the std of posterior means (official) or samples
    train_images: int = None              # train on this many images spread over the classes (None: all; shapes: 4,000)


PRESETS = {  # the same three names in train_dit.py
    # CPU in minutes on the embedded shapes or MNIST-format data: small widths, 64 px, patch 8 (8x8 tokens),
    # C = 16, a ClassTeacher (DINOv3-S/16 on an image folder). Perceptual and ConvNeXt terms are off (they need
    # pretrained VGG/ConvNeXt weights and dominate the CPU cost).
    "quick": TokenizerRecipe(img_size=64, patch_size=8, latent_dim=16, encoder="micro", decoder="micro",
                             sem_decoder="micro", teacher="shapes", flip=False, batch_size=32, epochs=16, blr=8e-3,
                             warmup_epochs=0.5, ema=0.995, perceptual_weight=0.0, convnext=False, gan_weight=0.0,
                             ft_epochs=8, ft_blr=4e-3, ft_warmup_epochs=0.2, train_images=4000),
    # One GPU, an ImageNet subset at 256 px: the paper's architecture at a batch one GPU holds.
    "subset": TokenizerRecipe(batch_size=64, epochs=50, warmup_epochs=5, gan_start_epoch=25, ft_epochs=10,
                              ft_warmup_epochs=1),
    # The paper: ViT-B encoder and decoder, C = 128, DINOv3-L/16, global batch 1024.
    "paper": TokenizerRecipe(),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(p, PRESETS)
    g = p.add_argument_group("model (default: from --preset)")
    g.add_argument("--img_size", type=R.POS_INT)
    g.add_argument("--patch_size", type=R.POS_INT)
    g.add_argument("--latent_dim", type=R.POS_INT, help="latent channels C")
    for name in ("encoder", "decoder", "sem_decoder"):
        g.add_argument(f"--{name}", choices=list(R.VIT_SIZES))
    g.add_argument("--teacher", choices=[*R.TEACHERS, "shapes", "idx"], help="frozen VFM (quick preset: 'shapes' on "
                   "the embedded shapes, 'idx' on MNIST-format data, dinov3_vits16 on a folder); 'random' = random "
                   "stand-in, no semantics")
    g.add_argument("--teacher_ckpt", help="local weight file of the teacher (timm format, e.g. model.safetensors); "
                   "'random': the full-size architecture with random weights, for throughput benchmarks")
    g = p.add_argument_group("optimisation (default: from --preset)")
    g.add_argument("--batch_size", type=R.POS_INT, help="global batch size")
    g.add_argument("--epochs", type=R.POS_FLOAT)
    g.add_argument("--blr", type=R.POS_FLOAT, help="base lr; lr = blr * batch_size / 256")
    g.add_argument("--warmup_epochs", type=R.NONNEG_FLOAT)
    g.add_argument("--weight_decay", type=R.NONNEG_FLOAT)
    g.add_argument("--grad_clip", type=R.POS_FLOAT)
    g.add_argument("--ema", type=R.FRACTION)
    g = p.add_argument_group("losses (default: from --preset)")
    g.add_argument("--mask_ratio_max", type=R.number(float, 0.0, 0.99, low_ok=True),
                   help="RAD: mask ratio max(0, U(-0.1, this)); 0 = no masking")
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, help="FSD: noise the latent along the flow")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--perceptual_weight", type=R.NONNEG_FLOAT, help="LPIPS weight (needs VGG16 + LPIPS weights); "
                   "0 = off")
    g.add_argument("--convnext", action=argparse.BooleanOptionalAction, help="add the 0.1 ConvNeXt-S logit term")
    g.add_argument("--kl_weight", type=R.NONNEG_FLOAT)
    g.add_argument("--sem_weight", type=R.NONNEG_FLOAT, help="FSD/RAD semantic cosine weight; 0 = no teacher")
    g.add_argument("--gan_weight", type=R.NONNEG_FLOAT, help="0.1 is the official effective value, 0.5 the paper's")
    g.add_argument("--gan_start_epoch", type=R.NONNEG_FLOAT)
    g.add_argument("--vgg_ckpt", help="vgg16-397923af.pth (torchvision)")
    g.add_argument("--lpips_ckpt", help="LPIPS v0.1 vgg.pth linear heads")
    g.add_argument("--convnext_ckpt", help="convnext_small-0c510722.pth (torchvision)")
    g = p.add_argument_group("decoder fine-tuning and latent statistics")
    g.add_argument("--decoder_finetune", action="store_true", help="stage 2: only the pixel decoder trains")
    g.add_argument("--init_from", help="tokenizer checkpoint to start from (ours or official RecTok*.pth)")
    g.add_argument("--stats_only", action="store_true", help="only measure latent mean/std of --init_from")
    g.add_argument("--stats_images", type=R.POS_INT, help="measure the statistics on N images spread over the "
                   "classes (default: all)")
    g.add_argument("--latent_norm", choices=["means", "samples"], help="divide the DiT's latents by the per-channel "
                   "std of posterior means (official, default) or of posterior samples")
    return p.parse_args(argv)


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018) on torchvision's VGG16 with the standard v0.1 linear heads: channel-
    normalised features at relu1_2 .. relu5_3, squared differences, 1x1 'lin' weights, spatial mean, sum."""
    VGG = ("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af.pth")
    LIN = ("https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1", "vgg.pth")  # MD5 d507d734...

    def __init__(self, vgg_path=None, lin_path=None):
        super().__init__()
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(R.load_weights(vgg_path, *self.VGG, "--vgg_ckpt"))
        self.features = vgg.features[:30]
        self.taps = (3, 8, 15, 22, 29)                                     # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        lin = R.load_weights(lin_path, *self.LIN, "--lpips_ckpt")
        for k, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x, y):
        """x, y in [0, 1] (B, 3, H, W) -> batch mean of the LPIPS distance."""
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale
        dist, k = 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
                dist = dist + self.lins[k]((fx - fy) ** 2).mean((2, 3))
                k += 1
        return dist.mean()


class ConvNeXtLogits(nn.Module):
    """The official 0.1-weighted 'perceptual' term: MSE between torchvision ConvNeXt-S classifier logits
    (not features) of the two images, resized to 224 and ImageNet-normalised."""
    URL = ("https://download.pytorch.org/models/convnext_small-0c510722.pth", "convnext_small-0c510722.pth")

    def __init__(self, path=None):
        super().__init__()
        self.net = torchvision.models.convnext_small()
        self.net.load_state_dict(R.load_weights(path, *self.URL, "--convnext_ckpt"))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x, y):
        h = F.interpolate(torch.cat([x, y]), size=224, mode="bilinear", antialias=True)
        lx, ly = self.net((h - self.mean) / self.std).chunk(2)
        return F.mse_loss(lx, ly)


def cosine_lr(epoch, peak, warmup, total):
    """Linear warm-up from 0, then half-cosine to 0 (official tokenizer schedule), from the fractional epoch."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / max(total - warmup, 1e-8))))


def param_groups(model, weight_decay):
    """No weight decay for norms, biases, embeddings and tokens, decided by name as the official code (so the
    patch-embedding convs are exempt too)."""
    skip = ("ln", "bias", "embedding", "norm", "gamma", "embed", "token")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(s in n for s in skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


MODEL_FLAGS = ("img_size", "patch_size", "latent_dim", "encoder", "decoder", "sem_decoder", "teacher")
PARTS = ("model", "ema", "disc", "opt", "d_opt")                         # a run's parts in its checkpoint, by name


def main(args):
    """Recipe, build, train, finish; --stats_only goes from the recipe to the finish."""
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    if args.stats_only and (args.decoder_finetune or args.resume):
        raise ValueError("--stats_only only measures the statistics of --init_from: drop --decoder_finetune and "
                         "--resume")
    with R.run_lock(args, rank):
        inputs = [args.init_from, args.data_path, args.class_list, args.teacher_ckpt, args.vgg_ckpt, args.lpips_ckpt,
                  args.convnext_ckpt]
        resume, ckpt_path, log_path = R.start_run(args, "tokenizer", rank, inputs)
        recipe, stage = resolve_recipe(args, resume, ckpt_path)
        run = SimpleNamespace(recipe=recipe, stage=stage, rank=rank, world=world, device=device, teacher=None)
        if args.stats_only:
            stats_only(run, args, ckpt_path)
            return ckpt_path
        with R.memory_guard(recipe.batch_size // world, recipe.img_size):
            build(run, args, resume, ckpt_path)
            if run.progress.step >= run.total:
                print(f"{ckpt_path} is a finished run (step {run.progress.step} of {run.total}); nothing to do")
                return ckpt_path
            with R.stop_guard(run.progress, rank):
                train(run, args, log_path)
            if run.progress.step == run.total:
                finish(run, args)
    return ckpt_path


def resolve_recipe(args, resume, ckpt_path):
    """The preset, then decoder fine-tuning's settings, then the flags; a resumed run keeps its own recipe and model.
    -> (recipe, stage): 1 trains the whole tokenizer, 2 fine-tunes its decoder, 0 only measures (--stats_only)"""
    if (args.decoder_finetune or args.stats_only) and not (args.init_from or resume):
        raise ValueError("--decoder_finetune and --stats_only need --init_from TOKENIZER_CKPT")
    if resume and resume.get("stage") == 0:
        raise ValueError(f"{ckpt_path} holds latent statistics, not a training run (--stats_only made it): use it "
                         "as --init_from")
    if resume and resume["stage"] == 1 and args.decoder_finetune:
        raise ValueError(f"{ckpt_path} is a stage-1 run, which --resume continues as such: drop --decoder_finetune, or "
                         "fine-tune into another --out with --init_from")
    if resume and any(getattr(args, k) not in (None, resume["recipe"].get(k)) for k in MODEL_FLAGS):
        given = " --".join(k for k in MODEL_FLAGS if getattr(args, k) is not None)
        raise ValueError(f"--resume keeps the model of {ckpt_path}: drop --{given}")
    stage = 0 if args.stats_only else (2 if args.decoder_finetune or (resume and resume["stage"] == 2) else 1)
    recipe = R.recipe_from(TokenizerRecipe, resume["recipe"], ckpt_path) if resume else PRESETS[args.preset]
    if args.decoder_finetune and not resume:  # official run_decoder_finetune_tokenizer.sh
        recipe = replace(recipe, epochs=recipe.ft_epochs, blr=recipe.ft_blr, warmup_epochs=recipe.ft_warmup_epochs,
                         gan_start_epoch=0.0, mask_ratio_max=0.0, noise=False, kl_weight=0.0, sem_weight=0.0)
    recipe = R.override(recipe, args)
    idx = R.idx_folder(args.data_path) if args.data_path else None
    if recipe.teacher == "shapes" and args.data_path:                      # the shapes teacher knows only the shapes
        if args.teacher:
            raise ValueError("--teacher shapes is trained on the embedded shapes; for --data_path choose 'idx' "
                             "(MNIST-format data) or a VFM")
        recipe = replace(recipe, teacher="idx" if idx else "dinov3_vits16")
    if recipe.teacher == "idx" and not idx:
        raise ValueError("--teacher idx is trained on MNIST-format data: pass --data_path FOLDER_OF_IDX_FILES")
    if recipe.img_size % recipe.patch_size:
        raise ValueError(f"--img_size {recipe.img_size} is not a multiple of --patch_size {recipe.patch_size}")
    return recipe, stage


def load_init(run, args):
    """The raw weights of --init_from (its EMA weights go into the EMA, as official); the run takes its shapes."""
    model = R.load_model(args.init_from, "tokenizer", ema=False)
    c = model.cfg
    run.recipe = replace(run.recipe, img_size=c.img_size, patch_size=c.patch_size, latent_dim=c.latent_dim)
    return model


def stats_only(run, args, ckpt_path):
    """Measure and store the latent statistics of an existing tokenizer (ours or official): a stage-0 checkpoint."""
    run.model = load_init(run, args)
    run.ema = R.load_model(args.init_from, "tokenizer", ema=True).to(run.device).eval()
    run.dataset = R.dataset_from_args(args, run.recipe.img_size, n=args.train_images)   # not the preset's: all
    run.data_id = run.dataset.identity()
    run.progress = R.Progress(ckpt_path)
    run.batch = max(run.recipe.batch_size // run.world, 1)
    with R.memory_guard(run.batch, run.recipe.img_size):
        finish(run, args)


def build(run, args, resume, ckpt_path):
    """Data plan, teacher, tokenizer and EMA, losses and optimisers, in the order that fixes the random streams;
    then a resumed run takes back its own streams."""
    init = args.init_from and not resume
    model = load_init(run, args) if init else None
    recipe, device, world = run.recipe, run.device, run.world
    run.dataset = R.dataset_from_args(args, recipe.img_size, n=recipe.train_images)   # checked before costly work
    run.data_id = R.check_same_data(resume, run.dataset, ckpt_path, args.allow_new_data)
    plan = R.plan_steps(args, recipe, len(run.dataset), world, resume, ckpt_path)
    run.batch, run.steps_per_epoch, run.total, run.progress = plan
    if recipe.sem_weight > 0 and recipe.teacher in ("shapes", "idx"):   # a small classifier trained once, cached
        idx = R.idx_folder(args.data_path) if recipe.teacher == "idx" else None
        run.teacher = R.ClassTeacher.cached(recipe.img_size, recipe.patch_size, args.num_classes or 10, idx).to(device)
    elif recipe.sem_weight > 0:
        run.teacher = R.Teacher(recipe.teacher, recipe.img_size // recipe.patch_size, args.teacher_ckpt).to(device)
    if resume:
        model = R.RecTok(R.TokenizerConfig(**resume["config"]))
    elif model is None:
        sizes = [R.VIT_SIZES[name] for name in (recipe.encoder, recipe.decoder, recipe.sem_decoder)]
        teacher_dim = run.teacher.dim if run.teacher else 0
        model = R.RecTok(R.TokenizerConfig(recipe.img_size, recipe.patch_size, recipe.latent_dim, *sizes, teacher_dim))
    ema = R.load_model(args.init_from, "tokenizer", ema=True) if init else copy.deepcopy(R.broadcast(model, world))
    if run.stage == 2:  # decoder fine-tuning: no semantic decoder; the encoder is frozen (the EMA then copies it)
        model.drop_semantic_decoder()
        ema.drop_semantic_decoder()
        model.encoder.requires_grad_(False)
    if run.teacher and run.teacher.dim != model.cfg.teacher_dim:
        raise ValueError(f"teacher {recipe.teacher} gives {run.teacher.dim}-d features but the tokenizer's semantic "
                         f"decoder predicts {model.cfg.teacher_dim}-d ones (sem_weight 0 trains without it)")
    run.model, run.ema = model.to(device), ema.to(device).eval().requires_grad_(False)
    build_losses(run, args, resume)
    run.net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    R.maybe_compile([m for m in (model.encoder, model.decoder, model.sem_decoder) if m is not None], args.compile)
    build_data(run, args)
    if resume:  # last, so that nothing in the set-up above shifts the random streams
        R.set_rng_state(resume["rng"][run.rank] if run.rank < len(resume["rng"]) else resume["rng"][0])


def build_losses(run, args, resume):
    """Losses and optimisers: AdamW (0.9, 0.95), wd 1e-4 without norms/biases/embeddings; D has its own."""
    recipe = run.recipe
    lpips = LPIPS(args.vgg_ckpt, args.lpips_ckpt) if recipe.perceptual_weight > 0 else None
    convnext = ConvNeXtLogits(args.convnext_ckpt) if lpips and recipe.convnext else None
    weights = {"pixel": 1.0, "perceptual": recipe.perceptual_weight, "kl": recipe.kl_weight,
               "semantic": recipe.sem_weight, "gan": recipe.gan_weight}
    run.loss_fn = R.TokenizerLoss(weights, lpips, convnext).to(run.device)
    run.disc = run.loss_fn.discriminator
    run.peak_lr = recipe.blr * recipe.batch_size / 256
    run.opt = torch.optim.AdamW(param_groups(run.model, recipe.weight_decay), lr=run.peak_lr, betas=(0.9, 0.95))
    run.d_opt = torch.optim.AdamW(param_groups(run.disc, recipe.weight_decay), lr=run.peak_lr, betas=(0.9, 0.95))
    for name in PARTS if resume else ():
        getattr(run, name).load_state_dict(resume[name])
    R.broadcast(run.disc, run.world)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]


def build_data(run, args):
    """Teacher features of a fixed dataset, and 8 held-out images for progress grids."""
    recipe = run.recipe
    run.cached = run.teacher is not None and not recipe.flip and args.data_path is None
    if run.cached and run.progress.step < run.total:  # a fixed, unflipped dataset: its teacher features never change
        run.dataset = WithTeacherFeatures(run.dataset, run.teacher, run.device)
    held = R.dataset_from_args(args, recipe.img_size, train=False)     # progress grids: 8 images over the classes
    show = [item[0] for item in map(held.__getitem__, R.spread_subset(held.labels, 8).tolist()) if item is not None]
    if not show:
        raise ValueError("none of the images could be read")
    run.show = torch.stack(show).to(run.device)
    if run.rank == 0:
        print(f"tokenizer {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, stage "
              f"{run.stage}, {len(run.dataset)} images, {run.total} steps of {recipe.batch_size}, "
              f"lr {run.peak_lr:.2e}, device {run.device}")


def update(run, img, extra, lr, frac_epoch):
    """One optimisation step on a batch -> the named loss terms and the gradient norm."""
    recipe, device = run.recipe, run.device
    img = img.to(device)
    target = extra.to(device) if run.cached else None                      # extra: label, or cached teacher features
    if recipe.flip:                                                        # flips from the global RNG: resumable
        flip = torch.rand(img.shape[0], device=device) < 0.5
        img = torch.where(flip[:, None, None, None], img.flip(-1), img)
    for group in run.opt.param_groups + run.d_opt.param_groups:
        group["lr"] = lr
    mask_ratio = R.sample_mask_ratio(recipe.mask_ratio_max) if recipe.mask_ratio_max > 0 else 0.0
    with R.autocast(device):
        recon, sem, kl = run.net(img, mask_ratio, recipe.noise)
        if run.teacher is not None and target is None:
            target = run.teacher(img)
    gan = recipe.gan_weight > 0 and frac_epoch >= recipe.gan_start_epoch
    terms = run.loss_fn(img, recon, kl, sem, target, gan)                  # fp32
    loss = run.loss_fn.total(terms)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, recipe.grad_clip)
    R.check_finite(run.progress, run.world, run.rank, loss=loss, **terms, grad_norm=grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)                                    # no stale gradients during the next forward
    R.ema_update(run.ema, run.model, recipe.ema)
    if gan:  # discriminator step after the generator step, hinge loss, its own optimiser
        d_loss = run.loss_fn.discriminator_loss(img, recon)
        d_loss.backward()
        if run.world > 1:
            for p in run.disc.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        d_norm = torch.nn.utils.clip_grad_norm_(run.disc.parameters(), recipe.grad_clip)
        R.check_finite(run.progress, run.world, run.rank, disc=d_loss, disc_grad_norm=d_norm)
        run.d_opt.step()
        run.d_opt.zero_grad(set_to_none=True)
        terms["disc"] = d_loss.detach()
    return {"loss": loss, **terms, "grad_norm": grad_norm}


def checkpoint(run, **extra):
    """Recipe, model and EMA, data record; a training run adds what resumes it: discriminator, optimisers and every
    rank's random states (stage 0, --stats_only, has none)."""
    parts = PARTS if run.stage else PARTS[:2]
    rng = {"rng": R.gathered_rng_states(run.world)} if run.stage else {}
    if run.rank == 0:
        R.save_checkpoint(run.progress.ckpt_path, {
            "kind": "tokenizer", "config": asdict(run.model.cfg), "recipe": asdict(run.recipe), "stage": run.stage,
            "step": run.progress.step, **{name: getattr(run, name).state_dict() for name in parts}, **rng,
            "data": run.data_id, **extra})
    run.progress.saved = run.progress.step


def train(run, args, log_path):
    """The step loop: log, progress grids, checkpoints; a stop signal saves at the next step and ends the run."""
    recipe, progress, rank, world = run.recipe, run.progress, run.rank, run.world
    bar = tqdm(total=run.total, initial=progress.step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), progress.step
    while progress.step < run.total and progress.step != args.stop_at:
        step = progress.step
        loader = R.epoch_loader(run.dataset, run.batch, step // run.steps_per_epoch, args.seed,
                                step % run.steps_per_epoch, rank, world, args.workers)
        for data in loader:
            epoch = progress.step / run.steps_per_epoch
            lr = cosine_lr(epoch, run.peak_lr, recipe.warmup_epochs, run.total / run.steps_per_epoch)
            # data is None where none of the batch's images could be read (on any rank): the step passes idle.
            values = None if R.any_rank(data is None, world) else update(run, *data, lr, epoch)
            progress.step = step = progress.step + 1
            bar.update(1)
            if values and (step % args.log_every == 0 or step == run.total):
                values = R.global_mean(values, world)
                rate = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                if rank == 0:
                    R.log_json(log_path, {"step": step, "epoch": round(step / run.steps_per_epoch, 3), "lr": lr,
                                          **values, "steps_per_s": rate, "images_per_s": rate * recipe.batch_size})
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k not in ("loss", "grad_norm")})
            if rank == 0 and (step % args.image_every == 0 or step == run.total):
                grid = torch.cat([run.show * 0.5 + 0.5, run.ema.reconstruct(run.show)])
                R.save_grid(grid, os.path.join(args.out, f"recon_{step:06d}.png"))
            stop = R.any_rank(progress.signal is not None, world)
            if stop or step == args.stop_at or (step % args.ckpt_every == 0 and step < run.total):
                checkpoint(run)
            if stop:
                raise SystemExit(f"{progress.signal or 'a stop signal'} at step {step}: saved {progress.ckpt_path}; "
                                 "continue with --resume" if rank == 0 else 1)
            if step in (run.total, args.stop_at):
                break
    bar.close()


@torch.no_grad()
def finish(run, args):
    """Latent statistics of the EMA on --stats_images of the run's images spread over the classes (no flip, fp32):
    per-channel mean and population std of the posterior means, as the official `collect_tokenizer_stats`, and the
    std of posterior samples, sqrt(var of the means + mean sigma^2). The std that --latent_norm names goes into the
    model and the EMA, both stds into the checkpoint's record."""
    data = run.dataset.dataset if isinstance(run.dataset, WithTeacherFeatures) else run.dataset
    loader = R.pass_loader(data, run.batch, args.workers, args.stats_images, run.rank, run.world, "latent statistics")
    acc = torch.zeros(4, run.ema.cfg.latent_dim, dtype=torch.float64, device=run.device)  # count, sum, squares, sigma^2
    for batch in tqdm(loader, desc="latent stats", disable=run.rank != 0):
        if batch is not None:                                              # None: no readable image in the batch
            means, logvars = (m.flatten(0, 1).double() for m in run.ema.encode(batch[0].to(run.device)))  # (B*L, C)
            acc += torch.stack([torch.full_like(means[0], len(means)), means.sum(0), means.pow(2).sum(0),
                                logvars.exp().sum(0)])
    if run.world > 1:
        dist.all_reduce(acc)
    if not acc[0, 0]:
        raise ValueError("none of the images could be read: no latent statistics")
    mu = acc[1] / acc[0]
    var_means = (acc[2] / acc[0] - mu**2).clamp_min(0)
    mean, std_means, std_samples = mu.float(), var_means.sqrt().float(), (var_means + acc[3] / acc[0]).sqrt().float()
    norm, n_images = run.recipe.latent_norm, min(args.stats_images or len(data), len(data))
    for m in (run.model, run.ema):
        m.latent_mean.copy_(mean)
        m.latent_std.copy_(std_samples if norm == "samples" else std_means)
    ratio = std_samples / std_means.clamp_min(1e-12)
    if run.rank == 0:
        print(f"latent statistics of {n_images} images: mean {mean.mean():.3f}, std {run.ema.latent_std.mean():.3f} "
              f"(channel averages), normalised by the std of posterior {norm}; std of samples / std of means per "
              f"channel: {ratio.min():.2f} to {ratio.max():.2f}")
    checkpoint(run, latent_stats={"norm": norm, "images": n_images, "std_means": std_means.cpu(),
                                  "std_samples": std_samples.cpu()})
    if run.rank == 0:
        print(f"latent statistics stored in {run.progress.ckpt_path}")


class WithTeacherFeatures(torch.utils.data.Dataset):
    """(image, teacher features) pairs, the features computed once up front (bf16 in memory)."""

    @torch.no_grad()
    def __init__(self, dataset, teacher, device, batch=64):
        self.dataset, feats = dataset, []
        for img, _ in tqdm(torch.utils.data.DataLoader(dataset, batch), desc="teacher features"):
            with R.autocast(device):
                feats.append(teacher(img.to(device)).to(torch.bfloat16).cpu())
        self.feats = torch.cat(feats)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.feats[i].float()


if __name__ == "__main__":
    R.run_cli(main, get_args)
