"""
train_dit.py: train the DiT^DH generator on a RecTok latent with rectified flow.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Velocity MSE on
per-channel-normalised posterior samples, t from the dimension-shifted law, label dropout 0.1 for CFG, AdamW
(0.9, 0.95) without weight decay, lr constant then linear decay, clipping at 1, EMA 0.9995 (official
main_diffusion.py, run_train_diffusion.sh). Unlike the official code, which re-encodes every image at every
step, the posterior moments (mean, logvar) of every image and of its mirror image are computed once and cached
on disk; each step draws a fresh posterior sample from them.

  python train_dit.py --preset quick --tokenizer runs/quick_tok_ft/ckpt.pt --out runs/quick_dit     # CPU
  python train_dit.py --preset subset --tokenizer runs/subset_tok_ft/ckpt.pt --data_path IMAGENET/train --num_classes 100 --out runs/subset_dit
  torchrun --nproc_per_node 8 train_dit.py --preset paper --tokenizer RecTok_decft.pth --latent_stats stats.npz --data_path IMAGENET/train --out runs/paper_dit
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import save_image
from tqdm import tqdm

import rectok as R


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(p)
    g = p.add_argument_group("tokenizer and latents")
    g.add_argument("--tokenizer", required=True, help="tokenizer checkpoint: ours (with latent statistics) or official RecTok_decft.pth")
    g.add_argument("--latent_stats", help="latent mean/std file (.npz/.pt, or the official stats.pkl), for an official tokenizer")
    g.add_argument("--latent_cache", help="posterior-moment cache (.npy, default OUT/latents.npy); shareable between runs")
    g = p.add_argument_group("model and optimisation (default: from --preset)")
    g.add_argument("--model", choices=list(R.DIT_SIZES))
    g.add_argument("--patch_size", type=int, help="latent patch size of the DiT")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (cached)")
    g.add_argument("--batch_size", type=int, help="global batch size")
    g.add_argument("--epochs", type=float)
    g.add_argument("--lr", type=float)
    g.add_argument("--min_lr", type=float)
    g.add_argument("--decay_start_epoch", type=float, help="lr is constant until here, then decays linearly")
    g.add_argument("--decay_end_epoch", type=float, help="... reaching min_lr here")
    g.add_argument("--grad_clip", type=float)
    g.add_argument("--ema", type=float)
    g.add_argument("--label_drop", type=float, help="probability of the null label (trains CFG's unconditional model)")
    g.add_argument("--sample_steps", type=int, help="Euler steps of the progress grids")
    return p.parse_args(argv)


def constant_then_linear_lr(epoch, lr, min_lr, start, end):
    """Official DiT^DH schedule: lr until `start`, then linear to min_lr at `end`, min_lr after."""
    return lr - (lr - min_lr) * min(1.0, max(0.0, epoch - start) / max(end - start, 1e-8))


def tokenizer_fingerprint(tok):
    """sha1 of the encoder weights: a latent cache is valid only for the encoder that made it."""
    h = hashlib.sha1()
    for name, t in sorted(tok.encoder.state_dict().items()):
        h.update(name.encode()), h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset):
    items = [p for p, _ in dataset.samples] if hasattr(dataset, "samples") else [dataset.seed, dataset.num_classes]
    return {"type": type(dataset).__name__, "n": len(dataset), "size": dataset.size,
            "items": hashlib.sha1(json.dumps(items).encode()).hexdigest()}


@torch.no_grad()
def latent_cache(tok, dataset, path, flips, device, rank, world, batch=64):
    """Posterior moments [mean | logvar] of every image (and its mirror), (N, flips, L, 2C) float16 in a .npy
    memmap. Its .json description is written last, so an interrupted caching run is redone, and a cache made
    with another tokenizer or dataset is refused."""
    meta = {"tokenizer": tokenizer_fingerprint(tok), "dataset": dataset_fingerprint(dataset), "flips": flips}
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            found = json.load(f)
        if found != meta:
            sys.exit(f"latent cache {path} was made with a different "
                     f"{'tokenizer' if found['tokenizer'] != meta['tokenizer'] else 'dataset or flip setting'}; "
                     f"delete it or pass --latent_cache NEW_PATH")
        return np.load(path, mmap_mode="r")
    shape = (len(dataset), flips, tok.grid**2, 2 * tok.cfg.latent_dim)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
    if world > 1:
        dist.barrier()
    cache = np.load(path, mmap_mode="r+")
    idx = torch.arange(len(dataset))[rank::world]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch)
    for k, (img, _) in enumerate(tqdm(loader, desc="caching latents", disable=rank != 0)):
        rows = idx[k * batch: k * batch + len(img)].numpy()
        for f in range(flips):
            x = img.to(device).flip(-1) if f else img.to(device)
            with R.autocast(device):
                mean, logvar = tok.encode(x)                               # fp32 (B, L, C) each
            cache[rows, f] = torch.cat([mean, logvar], -1).cpu().numpy().astype(np.float16)
    cache.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(path + ".json", "w") as f:
            json.dump(meta, f)
    return np.load(path, mmap_mode="r")


class CachedLatents(torch.utils.data.Dataset):
    def __init__(self, cache, labels):
        self.cache, self.labels = cache, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.cache[i], dtype=np.float32)), self.labels[i]  # (flips, L, 2C)


def main(args):
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = R.load_checkpoint(ckpt_path, "dit") if args.resume and os.path.exists(ckpt_path) else None
    recipe = R.override(R.DiTRecipe(**resume["recipe"]) if resume else R.PRESETS[args.preset]["dit"], args)

    # The tokenizer: its EMA weights and its latent statistics (ours carry them; official ones need a file).
    tok = R.load_model(args.tokenizer, "tokenizer").to(device).eval().requires_grad_(False)
    if args.latent_stats:
        mean, std = R.read_latent_stats(args.latent_stats)
        if mean.shape != tok.latent_mean.shape:
            sys.exit(f"--latent_stats has {mean.shape[0]} channels, the tokenizer {tok.cfg.latent_dim}")
        tok.latent_mean.copy_(mean), tok.latent_std.copy_(std)
    if not tok.latent_mean.any() and (tok.latent_std == 1).all():
        sys.exit(f"{args.tokenizer} carries no latent statistics: pass --latent_stats FILE, or measure them with "
                 f"train_tokenizer.py --stats_only --init_from {args.tokenizer}")
    dataset = R.dataset_from_args(args, tok.cfg.img_size)
    backbone, head = R.DIT_SIZES[recipe.model]
    cfg = R.DiTConfig(tok.grid, tok.cfg.latent_dim, len(dataset.classes), recipe.patch_size, backbone, head)
    if resume:  # a resumed DiT must still fit this tokenizer and these classes
        old = R.DiTConfig(**resume["config"])
        for field, a, b in (("latent width", old.latent_dim, cfg.latent_dim), ("latent grid", old.grid, cfg.grid),
                            ("number of classes", old.num_classes, cfg.num_classes)):
            if a != b:
                sys.exit(f"the DiT in {ckpt_path} has {field} {a}, but the tokenizer/data give {b}")
        cfg = old
    if cfg.grid % cfg.patch_size:
        sys.exit(f"latent grid {cfg.grid} is not divisible by the DiT patch size {cfg.patch_size}")

    model = R.DiTDH(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    if resume:
        model.load_state_dict(resume["model"]), ema.load_state_dict(resume["ema"]), opt.load_state_dict(resume["opt"])
        step = resume["step"]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    R.maybe_compile([model], args.compile)

    flips = 2 if recipe.flip else 1
    cache = latent_cache(tok, dataset, args.latent_cache or os.path.join(args.out, "latents.npy"), flips, device, rank, world)
    latents = CachedLatents(cache, dataset.labels)
    batch = recipe.batch_size // world
    steps_per_epoch = len(latents) // recipe.batch_size
    if recipe.batch_size % world or steps_per_epoch == 0:
        sys.exit(f"batch size {recipe.batch_size} must divide by {world} processes and fit the {len(latents)} images")
    total = args.steps or round(recipe.epochs * steps_per_epoch)
    shift = R.flow_shift(cfg.grid, cfg.latent_dim)
    g = torch.Generator().manual_seed(args.seed)                           # fixed progress-grid noise and labels
    show_noise = torch.randn(16, cfg.latent_dim, cfg.grid, cfg.grid, generator=g).to(device)
    show_labels = (torch.arange(16) % cfg.num_classes).to(device)
    if resume:
        R.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"DiT^DH-{recipe.model} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on a "
              f"{cfg.grid}x{cfg.grid}x{cfg.latent_dim} latent, {len(latents)} images, {total} steps of "
              f"{recipe.batch_size}, shift s={shift:.3f}, device {device}")

    def checkpoint():
        rngs = R.gathered_rng_states(world)
        if rank == 0:
            R.save_checkpoint(ckpt_path, {"kind": "dit", "config": asdict(cfg), "recipe": asdict(recipe), "step": step,
                                          "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                          "rng": rngs, "tokenizer": os.path.abspath(args.tokenizer),
                                          "latent_mean": tok.latent_mean.cpu(), "latent_std": tok.latent_std.cpu()})

    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), step
    while step < total and step != args.stop_at:
        loader = R.epoch_loader(latents, batch, step // steps_per_epoch, args.seed, step % steps_per_epoch, rank, world, args.workers)
        for moments, y in loader:
            moments, y = moments.to(device), y.to(device)
            flip = torch.randint(flips, (len(y),), device=device)          # image or its mirror
            mean, logvar = moments[torch.arange(len(y), device=device), flip].chunk(2, dim=-1)  # (B, L, C) each
            z = tok.normalize(mean + (0.5 * logvar).exp() * torch.randn_like(mean))  # posterior sample (B, C, h, w)
            lr = constant_then_linear_lr(step / steps_per_epoch, recipe.lr, recipe.min_lr, recipe.decay_start_epoch, recipe.decay_end_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            with R.autocast(device):
                loss = R.flow_matching_loss(net, z, y, shift, cfg.num_classes, recipe.label_drop)
            R.check_finite(loss, {"loss": loss}, step, ckpt_path, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            R.ema_update(ema, model, recipe.ema)
            step += 1
            bar.update(1)
            if rank == 0 and (step % args.log_every == 0 or step == total):
                rate = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                R.log_json(log_path, {"step": step, "epoch": round(step / steps_per_epoch, 3), "lr": lr, "loss": loss.item(),
                                      "grad_norm": grad_norm.item(), "steps_per_s": rate, "images_per_s": rate * recipe.batch_size})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if rank == 0 and (step % args.image_every == 0 or step == total):
                with R.autocast(device):
                    zs = R.sample(ema, show_noise, show_labels, R.time_grid(recipe.sample_steps, shift))
                    save_image(tok.decode(zs.float()), os.path.join(args.out, f"samples_{step:06d}.png"), nrow=8)
            if step == args.stop_at or step % args.ckpt_every == 0 or step == total:
                checkpoint()
            if step in (total, args.stop_at):
                break
    bar.close()
    return ckpt_path


if __name__ == "__main__":
    R.run_cli(main, get_args)
