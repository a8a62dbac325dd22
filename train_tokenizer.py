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
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import rectok as R


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(p)
    g = p.add_argument_group("model (default: from --preset)")
    g.add_argument("--img_size", type=R.POS_INT)
    g.add_argument("--patch_size", type=R.POS_INT)
    g.add_argument("--latent_dim", type=R.POS_INT, help="latent channels C")
    for name in ("encoder", "decoder", "sem_decoder"):
        g.add_argument(f"--{name}", choices=list(R.VIT_SIZES))
    g.add_argument("--teacher", choices=[*R.TEACHERS, "shapes"], help="frozen VFM (quick preset: 'shapes' on the "
                   "embedded shapes, dinov3_vits16 on a folder); 'random' = random stand-in, no semantics")
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
    g.add_argument("--mask_ratio_max", type=R.number(float, 0.0, 0.99, low_ok=True), help="RAD: mask ratio max(0, U(-0.1, this)); 0 = no masking")
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, help="FSD: noise the latent along the flow")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--perceptual_weight", type=R.NONNEG_FLOAT, help="LPIPS weight (needs VGG16 + LPIPS weights); 0 = off")
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
    g.add_argument("--stats_images", type=R.POS_INT, help="measure the statistics on N images spread over the classes (default: all)")
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


def tokenizer_config(recipe, teacher_dim):
    return R.TokenizerConfig(recipe.img_size, recipe.patch_size, recipe.latent_dim, R.VIT_SIZES[recipe.encoder],
                           R.VIT_SIZES[recipe.decoder], R.VIT_SIZES[recipe.sem_decoder], teacher_dim)


def cosine_lr(epoch, peak, warmup, total):
    """Linear warm-up from 0, then half-cosine to 0 (official tokenizer schedule), from the fractional epoch."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / max(total - warmup, 1e-8))))


def param_groups(model, weight_decay):
    """No weight decay for norms, biases, embeddings and tokens, decided by name as the official code (so the
    patch-embedding convs are exempt too)."""
    skip = ("ln", "bias", "embedding", "norm", "gamma", "embed", "token")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if p.ndim < 2 or any(s in n for s in skip)]
    decay = [p for n, p in params if not (p.ndim < 2 or any(s in n for s in skip))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def measure_latent_stats(tok, dataset, n_images, batch_size, device, rank=0, world=1, workers=0):
    """Per-channel mean and population std of the posterior means over n_images spread over the classes (no
    flip, fp32), as the official `collect_tokenizer_stats`. The DiT normalises its latents with them."""
    acc = torch.zeros(3, tok.cfg.latent_dim, dtype=torch.float64, device=device)   # count, sum, sum of squares
    for batch in tqdm(R.pass_loader(dataset, batch_size, workers, n_images, rank, world, "latent statistics"),
                      desc="latent stats", disable=rank != 0):
        if batch is not None:                                              # None: no readable image in the batch
            mean = tok.encode(batch[0].to(device))[0].flatten(0, 1).double()   # (B*L, C)
            acc += torch.stack([torch.full_like(mean[0], len(mean)), mean.sum(0), mean.pow(2).sum(0)])
    if world > 1:
        dist.all_reduce(acc)
    if not acc[0, 0]:
        raise ValueError("none of the images could be read: no latent statistics")
    mu = acc[1] / acc[0]
    return mu.float(), (acc[2] / acc[0] - mu**2).clamp_min(0).sqrt().float()


def any_rank(flag, world):
    """True on every rank if it is True on any."""
    if world > 1:
        flag = torch.tensor(float(flag), device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag)
    return bool(flag)


MODEL_FLAGS = ("img_size", "patch_size", "latent_dim", "encoder", "decoder", "sem_decoder", "teacher")


def main(args):
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    if args.stats_only and (args.decoder_finetune or args.resume):
        raise ValueError("--stats_only only measures the statistics of --init_from: drop --decoder_finetune and --resume")
    resume, ckpt_path, log_path = R.start_run(args, "tokenizer", rank)
    if (args.decoder_finetune or args.stats_only) and not (args.init_from or resume):
        raise ValueError("--decoder_finetune and --stats_only need --init_from TOKENIZER_CKPT")

    # The recipe: the preset, then the stage-2 settings, then explicit flags. A resumed run keeps its own model.
    if resume and "opt" not in resume:
        raise ValueError(f"{ckpt_path} holds latent statistics, not a training run (--stats_only made it): use it as --init_from")
    stage2 = args.decoder_finetune or bool(resume and resume["stage"] == 2)
    recipe = R.TokenizerRecipe(**resume["recipe"]) if resume else R.PRESETS[args.preset]["tokenizer"]
    if resume and any(getattr(args, k) not in (None, resume["recipe"][k]) for k in MODEL_FLAGS):
        raise ValueError(f"--resume keeps the model of {ckpt_path}: drop --{' --'.join(k for k in MODEL_FLAGS if getattr(args, k) is not None)}")
    if args.decoder_finetune and not resume:  # official run_decoder_finetune_tokenizer.sh
        recipe = replace(recipe, epochs=recipe.ft_epochs, blr=recipe.ft_blr, warmup_epochs=recipe.ft_warmup_epochs,
                         gan_start_epoch=0.0, mask_ratio_max=0.0, noise=False, kl_weight=0.0, sem_weight=0.0)
    recipe = R.override(recipe, args)
    if recipe.teacher == "shapes" and args.data_path:                      # the shapes teacher knows only the shapes
        if args.teacher:
            raise ValueError("--teacher shapes is trained on the embedded shapes; for --data_path choose a VFM")
        recipe = replace(recipe, teacher="dinov3_vits16")
    if recipe.img_size % recipe.patch_size:
        raise ValueError(f"--img_size {recipe.img_size} is not a multiple of --patch_size {recipe.patch_size}")

    # Model and EMA. From --init_from: raw weights into the model, EMA weights into the EMA (official).
    if resume:
        model = R.RecTok(R.TokenizerConfig(**resume["config"]))
    elif args.init_from:
        model = R.load_model(args.init_from, "tokenizer", ema=False)
        c = model.cfg
        recipe = replace(recipe, img_size=c.img_size, patch_size=c.patch_size, latent_dim=c.latent_dim)
    if args.stats_only:  # measure and store the latent statistics of an existing tokenizer (ours or official)
        ema = R.load_model(args.init_from, "tokenizer", ema=True).to(device).eval()
        dataset = R.dataset_from_args(args, recipe.img_size)
        mean, std = measure_latent_stats(ema, dataset, args.stats_images, max(recipe.batch_size // world, 1), device, rank, world, args.workers)
        for m in (model, ema):
            m.latent_mean.copy_(mean), m.latent_std.copy_(std)
        if rank == 0:
            R.save_checkpoint(ckpt_path, {"kind": "tokenizer", "config": asdict(ema.cfg), "recipe": asdict(recipe), "stage": 0,
                                          "step": 0, "model": model.state_dict(), "ema": ema.state_dict(),
                                          "stats_images": min(args.stats_images or len(dataset), len(dataset))})
            print(f"latent statistics of {args.init_from} -> {ckpt_path}")
        return ckpt_path
    teacher = None
    if recipe.sem_weight > 0:
        grid = recipe.img_size // recipe.patch_size
        teacher = (R.ShapesTeacher.cached(recipe.img_size, recipe.patch_size, args.num_classes or 10) if recipe.teacher == "shapes"
                   else R.Teacher(recipe.teacher, grid, args.teacher_ckpt)).to(device)
    if not (resume or args.init_from):
        model = R.RecTok(tokenizer_config(recipe, teacher.dim if teacher else 0))
    ema = R.load_model(args.init_from, "tokenizer", ema=True) if args.init_from and not resume else copy.deepcopy(R.broadcast(model, world))
    if stage2:  # decoder fine-tuning: no semantic decoder; the encoder is frozen (the EMA then copies it)
        model.drop_semantic_decoder(), ema.drop_semantic_decoder()
        model.encoder.requires_grad_(False)
    if teacher and teacher.dim != model.cfg.teacher_dim:
        raise ValueError(f"teacher {recipe.teacher} gives {teacher.dim}-d features but the tokenizer's semantic decoder "
                         f"predicts {model.cfg.teacher_dim}-d ones (sem_weight 0 trains without it)")
    model, ema = model.to(device), ema.to(device).eval().requires_grad_(False)

    # Losses and optimisers: AdamW (0.9, 0.95), wd 1e-4 without norms/biases/embeddings; D has its own.
    lpips = LPIPS(args.vgg_ckpt, args.lpips_ckpt) if recipe.perceptual_weight > 0 else None
    convnext = ConvNeXtLogits(args.convnext_ckpt) if lpips and recipe.convnext else None
    weights = {"pixel": 1.0, "perceptual": recipe.perceptual_weight, "kl": recipe.kl_weight,
               "semantic": recipe.sem_weight, "gan": recipe.gan_weight}
    loss_fn = R.TokenizerLoss(weights, lpips, convnext).to(device)
    disc = loss_fn.discriminator
    peak_lr = recipe.blr * recipe.batch_size / 256
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    d_opt = torch.optim.AdamW(param_groups(disc, recipe.weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    step = 0
    if resume:
        model.load_state_dict(resume["model"]), ema.load_state_dict(resume["ema"]), disc.load_state_dict(resume["disc"])
        opt.load_state_dict(resume["opt"]), d_opt.load_state_dict(resume["d_opt"])
        step = resume["step"]
    R.broadcast(disc, world)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    R.maybe_compile([m for m in (model.encoder, model.decoder, model.sem_decoder) if m is not None], args.compile)

    dataset = R.dataset_from_args(args, recipe.img_size)
    batch = recipe.batch_size // world
    steps_per_epoch = len(dataset) // recipe.batch_size
    if recipe.batch_size % world or steps_per_epoch == 0:
        raise ValueError(f"batch size {recipe.batch_size} must divide by {world} processes and fit the {len(dataset)} images")
    total = args.steps or round(recipe.epochs * steps_per_epoch)
    if resume and step >= total:
        print(f"{ckpt_path} is a finished run (step {step} of {total}); nothing to do")
        return ckpt_path
    if args.stop_at is not None and not step < args.stop_at <= total:
        raise ValueError(f"--stop_at {args.stop_at} must lie after the current step {step} and at most at the last, {total}")
    cached = teacher is not None and not recipe.flip and args.data_path is None
    if cached:  # a fixed, unflipped dataset: its teacher features never change, compute them once
        dataset = WithTeacherFeatures(dataset, teacher, device)
    held = R.dataset_from_args(args, recipe.img_size, train=False)     # progress grids: 8 images spread over the classes
    show = [item[0] for item in map(held.__getitem__, R.spread_subset(held.labels, 8).tolist()) if item is not None]
    if not show:
        raise ValueError("none of the images could be read")
    show = torch.stack(show).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        print(f"tokenizer {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, stage {2 if stage2 else 1}, "
              f"{len(dataset)} images, {total} steps of {recipe.batch_size}, lr {peak_lr:.2e}, device {device}")
    saved = (ckpt_path, step) if resume else None                          # the last checkpoint written

    def checkpoint():
        nonlocal saved
        rngs = R.gathered_rng_states(world)
        if rank == 0:
            R.save_checkpoint(ckpt_path, {"kind": "tokenizer", "config": asdict(model.cfg), "recipe": asdict(recipe),
                                          "stage": 2 if stage2 else 1, "step": step, "model": model.state_dict(),
                                          "ema": ema.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                                          "d_opt": d_opt.state_dict(), "rng": rngs})
        saved = (ckpt_path, step)

    def update(img, extra, lr, frac_epoch):
        """One optimisation step on a batch -> the named loss terms and the gradient norm."""
        img = img.to(device)
        target = extra.to(device) if cached else None                      # extra: label, or cached teacher features
        if recipe.flip:                                                    # flips from the global RNG: resumable
            flip = torch.rand(img.shape[0], device=device) < 0.5
            img = torch.where(flip[:, None, None, None], img.flip(-1), img)
        for group in opt.param_groups + d_opt.param_groups:
            group["lr"] = lr
        mask_ratio = R.sample_mask_ratio(recipe.mask_ratio_max) if recipe.mask_ratio_max > 0 else 0.0
        with R.autocast(device):
            recon, sem, kl = net(img, mask_ratio, recipe.noise)
            if teacher is not None and target is None:
                target = teacher(img)
        gan = recipe.gan_weight > 0 and frac_epoch >= recipe.gan_start_epoch
        terms = loss_fn(img, recon, kl, sem, target, gan)                  # fp32
        loss = loss_fn.total(terms)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        R.check_finite(step, saved, world, loss=loss, **terms, grad_norm=grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)                                    # no stale gradients during the next forward
        R.ema_update(ema, model, recipe.ema)
        if gan:  # discriminator step after the generator step, hinge loss, its own optimiser
            d_loss = loss_fn.discriminator_loss(img, recon)
            d_loss.backward()
            if world > 1:
                for p in disc.parameters():
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            d_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), recipe.grad_clip)
            R.check_finite(step, saved, world, disc=d_loss, disc_grad_norm=d_norm)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            terms["disc"] = d_loss.detach()
        return {"loss": loss, **terms, "grad_norm": grad_norm}

    if resume:  # last, so that nothing in the set-up above shifts the random streams
        R.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), step
    while step < total and step != args.stop_at:
        epoch = step // steps_per_epoch
        loader = R.epoch_loader(dataset, batch, epoch, args.seed, step % steps_per_epoch, rank, world, args.workers)
        for data in loader:
            lr = cosine_lr(step / steps_per_epoch, peak_lr, recipe.warmup_epochs, total / steps_per_epoch)
            # data is None where none of the batch's images could be read (on any rank): the step passes idle.
            idle = any_rank(data is None, world)
            values = None if idle else update(*data, lr, step / steps_per_epoch)
            step += 1
            bar.update(1)
            if values and rank == 0 and (step % args.log_every == 0 or step == total):
                rate = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                R.log_json(log_path, {"step": step, "epoch": round(step / steps_per_epoch, 3), "lr": lr,
                                      **{k: v.item() for k, v in values.items()}, "steps_per_s": rate,
                                      "images_per_s": rate * recipe.batch_size})
                bar.set_postfix({k: f"{v.item():.4g}" for k, v in values.items() if k not in ("loss", "grad_norm")})
            if rank == 0 and (step % args.image_every == 0 or step == total):
                R.save_grid(torch.cat([show * 0.5 + 0.5, ema.reconstruct(show)]), os.path.join(args.out, f"recon_{step:06d}.png"))
            if step == args.stop_at or (step % args.ckpt_every == 0 and step < total):
                checkpoint()
            if step in (total, args.stop_at):
                break
    bar.close()
    if step == total:
        mean, std = measure_latent_stats(ema, R.dataset_from_args(args, recipe.img_size), args.stats_images,
                                         batch, device, rank, world, args.workers)
        for m in (model, ema):
            m.latent_mean.copy_(mean), m.latent_std.copy_(std)
        checkpoint()
        if rank == 0:
            print(f"latent stats stored in {ckpt_path}: mean {mean.mean():.3f}, std {std.mean():.3f} (channel averages)")
    return ckpt_path


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
