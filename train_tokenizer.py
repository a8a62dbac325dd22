"""
train_tokenizer.py: train the RecTok tokenizer.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Stage 1 trains the
encoder, pixel decoder and semantic decoder with FSD + RAD + pixel, perceptual, KL and (from a start epoch) GAN
losses; stage 2 (--decoder_finetune) trains only the pixel decoder on clean latents. At the end the latent
mean/std are measured on the training data and stored in the checkpoint. The recipe follows the official
main_reconstruction.py and run_*_tokenizer.sh; the loop is in the spirit of nanoGPT's train.py.

  python train_tokenizer.py --preset quick --teacher random --out runs/quick_tok          # CPU, minutes
  python train_tokenizer.py --preset quick --decoder_finetune --init_from runs/quick_tok/ckpt.pt --out runs/quick_tok_ft
  python train_tokenizer.py --preset subset --data_path IMAGENET/train --num_classes 100 --out runs/subset_tok
  torchrun --nproc_per_node 8 train_tokenizer.py --preset paper --data_path IMAGENET/train --out runs/paper_tok
  python train_tokenizer.py --stats_only --init_from RecTok_decft.pth --data_path IMAGENET/train --out runs/official_tok
"""
import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torchvision.utils import save_image
from tqdm import tqdm

import rectok as R


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(p)
    g = p.add_argument_group("model (default: from --preset)")
    g.add_argument("--img_size", type=int)
    g.add_argument("--patch_size", type=int)
    g.add_argument("--latent_dim", type=int, help="latent channels C")
    for name in ("encoder", "decoder", "sem_decoder"):
        g.add_argument(f"--{name}", choices=list(R.VIT_SIZES))
    g.add_argument("--teacher", choices=list(R.TEACHERS), help="frozen VFM; 'random' = random stand-in, no semantics")
    g.add_argument("--teacher_ckpt", help="local weight file of the teacher (timm format, e.g. model.safetensors); "
                   "'random': the full-size architecture with random weights, for throughput benchmarks")
    g = p.add_argument_group("optimisation (default: from --preset)")
    g.add_argument("--batch_size", type=int, help="global batch size")
    g.add_argument("--epochs", type=float)
    g.add_argument("--blr", type=float, help="base lr; lr = blr * batch_size / 256")
    g.add_argument("--warmup_epochs", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--grad_clip", type=float)
    g.add_argument("--ema", type=float)
    g = p.add_argument_group("losses (default: from --preset)")
    g.add_argument("--mask_ratio_max", type=float, help="RAD: mask ratio max(0, U(-0.1, this)); 0 = no masking")
    g.add_argument("--noise", action=argparse.BooleanOptionalAction, help="FSD: noise the latent along the flow")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--perceptual_weight", type=float, help="LPIPS weight (needs VGG16 + LPIPS weights); 0 = off")
    g.add_argument("--convnext", action=argparse.BooleanOptionalAction, help="add the 0.1 ConvNeXt-S logit term")
    g.add_argument("--kl_weight", type=float)
    g.add_argument("--sem_weight", type=float, help="FSD/RAD semantic cosine weight; 0 = no teacher")
    g.add_argument("--gan_weight", type=float, help="0.1 is the official effective value, 0.5 the paper's")
    g.add_argument("--gan_start_epoch", type=float)
    g.add_argument("--vgg_ckpt", help="vgg16-397923af.pth (torchvision)")
    g.add_argument("--lpips_ckpt", help="LPIPS v0.1 vgg.pth linear heads")
    g.add_argument("--convnext_ckpt", help="convnext_small-0c510722.pth (torchvision)")
    g = p.add_argument_group("decoder fine-tuning and latent statistics")
    g.add_argument("--decoder_finetune", action="store_true", help="stage 2: only the pixel decoder trains")
    g.add_argument("--init_from", help="tokenizer checkpoint to start from (ours or official RecTok*.pth)")
    g.add_argument("--stats_only", action="store_true", help="only measure latent mean/std of --init_from")
    g.add_argument("--stats_images", type=int, help="measure the statistics on N images (default: all)")
    return p.parse_args(argv)


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
def measure_latent_stats(tok, dataset, n_images, batch_size, device, rank=0, world=1):
    """Per-channel mean and population std of the posterior means over n_images (no flip, fp32), as the
    official `collect_tokenizer_stats`. The DiT normalises its latents with them."""
    idx = torch.arange(min(n_images or len(dataset), len(dataset)))[rank::world]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size)
    acc = torch.zeros(3, tok.cfg.latent_dim, dtype=torch.float64, device=device)   # count, sum, sum of squares
    for img, _ in tqdm(loader, desc="latent stats", disable=rank != 0):
        mean = tok.encode(img.to(device))[0].flatten(0, 1).double()       # (B*L, C)
        acc += torch.stack([torch.full_like(mean[0], len(mean)), mean.sum(0), mean.pow(2).sum(0)])
    if world > 1:
        dist.all_reduce(acc)
    mu = acc[1] / acc[0]
    return mu.float(), (acc[2] / acc[0] - mu**2).clamp_min(0).sqrt().float()


def main(args):
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = R.load_checkpoint(ckpt_path, "tokenizer") if args.resume and os.path.exists(ckpt_path) else None
    if args.resume and not resume:
        print(f"--resume: no {ckpt_path} yet, starting a new run")
    if resume and args.init_from:
        sys.exit(f"--resume continues {ckpt_path}; drop --init_from")
    if (args.decoder_finetune or args.stats_only) and not (args.init_from or resume):
        sys.exit("--decoder_finetune and --stats_only need --init_from TOKENIZER_CKPT")

    # The recipe: the preset, then the stage-2 settings, then explicit flags. A resumed run keeps its own.
    stage2 = args.decoder_finetune or bool(resume and resume["stage"] == 2)
    recipe = R.TokenizerRecipe(**resume["recipe"]) if resume else R.PRESETS[args.preset]["tokenizer"]
    if args.decoder_finetune and not resume:  # official run_decoder_finetune_tokenizer.sh
        recipe = replace(recipe, epochs=recipe.ft_epochs, blr=recipe.ft_blr, warmup_epochs=recipe.ft_warmup_epochs,
                         gan_start_epoch=0.0, mask_ratio_max=0.0, noise=False, kl_weight=0.0, sem_weight=0.0)
    recipe = R.override(recipe, args)

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
        mean, std = measure_latent_stats(ema, dataset, args.stats_images, max(recipe.batch_size // world, 1), device, rank, world)
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
        teacher = R.Teacher(recipe.teacher, recipe.img_size // recipe.patch_size, args.teacher_ckpt).to(device)
    if not (resume or args.init_from):
        model = R.RecTok(tokenizer_config(recipe, teacher.dim if teacher else 0))
    ema = R.load_model(args.init_from, "tokenizer", ema=True) if args.init_from else copy.deepcopy(model)
    if stage2:  # decoder fine-tuning: no semantic decoder; the encoder is frozen (the EMA then copies it)
        model.drop_semantic_decoder(), ema.drop_semantic_decoder()
        model.encoder.requires_grad_(False)
    if teacher and teacher.dim != model.cfg.teacher_dim:
        sys.exit(f"teacher {recipe.teacher} gives {teacher.dim}-d features but the tokenizer's semantic decoder "
                 f"predicts {model.cfg.teacher_dim}-d ones (sem_weight 0 trains without it)")
    model, ema = model.to(device), ema.to(device).eval().requires_grad_(False)

    # Losses and optimisers: AdamW (0.9, 0.95), wd 1e-4 without norms/biases/embeddings; D has its own.
    lpips = R.LPIPS(args.vgg_ckpt, args.lpips_ckpt) if recipe.perceptual_weight > 0 else None
    convnext = R.ConvNeXtLogits(args.convnext_ckpt) if lpips and recipe.convnext else None
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
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    R.maybe_compile([m for m in (model.encoder, model.decoder, model.sem_decoder) if m is not None], args.compile)

    dataset = R.dataset_from_args(args, recipe.img_size)
    batch = recipe.batch_size // world
    steps_per_epoch = len(dataset) // recipe.batch_size
    if recipe.batch_size % world or steps_per_epoch == 0:
        sys.exit(f"batch size {recipe.batch_size} must divide by {world} processes and fit the {len(dataset)} images")
    total = args.steps or round(recipe.epochs * steps_per_epoch)
    cached = teacher is not None and not recipe.flip and args.data_path is None
    if cached:  # a fixed, unflipped dataset: its teacher features never change, compute them once
        dataset = WithTeacherFeatures(dataset, teacher, device)
    show = torch.stack([R.dataset_from_args(args, recipe.img_size, train=False)[i][0] for i in range(8)]).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"tokenizer {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, stage {2 if stage2 else 1}, "
              f"{len(dataset)} images, {total} steps of {recipe.batch_size}, lr {peak_lr:.2e}, device {device}")

    def checkpoint():
        rngs = R.gathered_rng_states(world)
        if rank == 0:
            R.save_checkpoint(ckpt_path, {"kind": "tokenizer", "config": asdict(model.cfg), "recipe": asdict(recipe),
                                          "stage": 2 if stage2 else 1, "step": step, "model": model.state_dict(),
                                          "ema": ema.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                                          "d_opt": d_opt.state_dict(), "rng": rngs})

    if resume:  # last, so that nothing in the set-up above shifts the random streams
        R.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), step
    while step < total and step != args.stop_at:
        epoch = step // steps_per_epoch
        loader = R.epoch_loader(dataset, batch, epoch, args.seed, step % steps_per_epoch, rank, world, args.workers)
        for img, extra in loader:                                         # extra: label, or cached teacher features
            img = img.to(device)
            target = extra.to(device) if cached else None
            if recipe.flip:                                                # flips from the global RNG: resumable
                flip = torch.rand(img.shape[0], device=device) < 0.5
                img = torch.where(flip[:, None, None, None], img.flip(-1), img)
            frac_epoch = step / steps_per_epoch
            lr = cosine_lr(frac_epoch, peak_lr, recipe.warmup_epochs, total / steps_per_epoch)
            for group in opt.param_groups + d_opt.param_groups:
                group["lr"] = lr
            mask_ratio = R.sample_mask_ratio(recipe.mask_ratio_max) if recipe.mask_ratio_max > 0 else 0.0
            with R.autocast(device):
                recon, sem, kl = net(img, mask_ratio, recipe.noise)
                if teacher is not None and target is None:
                    target = teacher(img)
            gan = recipe.gan_weight > 0 and frac_epoch >= recipe.gan_start_epoch
            terms = loss_fn(img, recon, kl, sem, target, gan)              # fp32
            loss = loss_fn.total(terms)
            R.check_finite(loss, terms, step, ckpt_path, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
            opt.step()
            R.ema_update(ema, model, recipe.ema)
            if gan:  # discriminator step after the generator step, hinge loss, its own optimiser
                d_loss = loss_fn.discriminator_loss(img, recon)
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                if world > 1:
                    for p in disc.parameters():
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
                torch.nn.utils.clip_grad_norm_(disc.parameters(), recipe.grad_clip)
                d_opt.step()
                terms["disc"] = d_loss.detach()
            step += 1
            bar.update(1)
            if rank == 0 and (step % args.log_every == 0 or step == total):
                rate = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "lr": lr, "loss": loss.item(),
                          **{k: v.item() for k, v in terms.items()}, "grad_norm": grad_norm.item(),
                          "steps_per_s": rate, "images_per_s": rate * recipe.batch_size}
                R.log_json(log_path, record)
                bar.set_postfix({k: f"{v.item():.4g}" for k, v in terms.items()})
            if rank == 0 and (step % args.image_every == 0 or step == total):
                save_image(torch.cat([show * 0.5 + 0.5, ema.reconstruct(show)]), os.path.join(args.out, f"recon_{step:06d}.png"), nrow=8)
            if step == args.stop_at or (step % args.ckpt_every == 0 and step < total):
                checkpoint()
            if step in (total, args.stop_at):
                break
    bar.close()
    if step == total and not (resume and resume["step"] == total):
        mean, std = measure_latent_stats(ema, R.dataset_from_args(args, recipe.img_size), args.stats_images,
                                         batch, device, rank, world)
        for m in (model, ema):
            m.latent_mean.copy_(mean), m.latent_std.copy_(std)
    if step == total:
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
