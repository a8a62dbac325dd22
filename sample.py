"""
sample.py: generate images with a trained DiT^DH and the RecTok pixel decoder.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Euler or Heun
integration of the velocity field from noise (t = 0) to data (t = 1) on the shifted time grid, with optional
classifier-free guidance or AutoGuidance, then the pixel decoder. Images become uint8 by truncation, as the
official evaluation does. The output kind follows --out: a .png grid, a folder of PNGs, or an .npz (uint8
arr_0, N x H x W x 3, plus labels) that eval.py and the ADM evaluator read.

  python sample.py --ckpt runs/quick_dit/ckpt.pt --out runs/quick_dit/grid.png
  python sample.py --ckpt runs/quick_dit/ckpt.pt --trajectory --out runs/quick_dit/trajectory.png
  torchrun --nproc_per_node 8 sample.py --ckpt ditdhxl_epoch_0599.pth --tokenizer_ckpt runs/official_tok/ckpt.pt \
      --autoguidance_ckpt ditdhs_epoch_0029.pth --ag_scale 1.29 --steps 149 --num_images 50000 --class_balanced --out samples.npz
"""
import argparse
import os
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import rectok as R
from train_dit import fingerprint, read_latent_stats


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="DiT checkpoint (ours, or official ditdh*.pth with --tokenizer_ckpt)")
    p.add_argument("--tokenizer_ckpt", help="tokenizer (default: the one the DiT was trained with)")
    p.add_argument("--latent_stats", help="latent mean/std file for an official DiT (.npz/.pt/stats.pkl)")
    p.add_argument("--out", required=True, help="a .png grid, an .npz, or a folder for individual PNGs")
    p.add_argument("--num_images", type=R.POS_INT, default=16)
    p.add_argument("--labels", type=R.NONNEG_INT, nargs="+", help="class labels, cycled (default: random)")
    p.add_argument("--class_balanced", action="store_true", help="labels 0..K-1 cycled, as for FID-50K")
    p.add_argument("--cfg", type=R.NONNEG_FLOAT, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg_interval", type=R.FRACTION, nargs=2, default=(0.0, 1.0), help="guide only for t in [lo, hi]")
    p.add_argument("--autoguidance_ckpt", help="weaker DiT for AutoGuidance (official: DiT^DH-S, 30 epochs)")
    p.add_argument("--ag_scale", type=R.NONNEG_FLOAT, help="AutoGuidance scale (default: the official 1.29)")
    p.add_argument("--steps", type=R.POS_INT, default=49, help="integration steps (the official 150 grid points = 149)")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch_size", type=R.POS_INT, default=64)
    p.add_argument("--trajectory", action="store_true", help="grid of decoded states along the flow (rows: samples)")
    return p.parse_args(argv)


def check_flags(args):
    """Flag combinations that make no sense stop here, before any model is loaded."""
    if args.cfg != 1.0 and args.autoguidance_ckpt:
        raise ValueError("choose one guidance: --cfg or --autoguidance_ckpt")
    if args.ag_scale is not None and not args.autoguidance_ckpt:
        raise ValueError("--ag_scale needs --autoguidance_ckpt")
    if args.cfg_interval[0] > args.cfg_interval[1]:
        raise ValueError(f"--cfg_interval {args.cfg_interval[0]:g} {args.cfg_interval[1]:g} is reversed")
    if args.labels and args.class_balanced:
        raise ValueError("--labels and --class_balanced both choose the labels: pass one")
    if args.trajectory and not args.out.endswith(".png"):
        raise ValueError("--trajectory writes a .png grid: give --out FILE.png")
    R.writable(args.out, folder=not args.out.endswith((".png", ".npz")))


def main(args):
    check_flags(args)
    rank, world, device = R.setup_distributed()
    ckpt = R.load_checkpoint(args.ckpt, "dit", official=True)          # ours, or an official release file
    dit = R.load_model(args.ckpt, "dit").to(device).eval()
    tok_path = args.tokenizer_ckpt or ckpt.get("tokenizer")
    if not tok_path:
        raise ValueError(f"{args.ckpt} names no tokenizer: pass --tokenizer_ckpt")
    tok = R.load_model(tok_path, "tokenizer").to(device).eval()
    if ckpt.get("tokenizer_fingerprint") not in (None, fingerprint(tok)):  # the DiT learnt another latent
        if not args.tokenizer_ckpt:
            raise ValueError(f"{tok_path} is no longer the tokenizer {args.ckpt} was trained with; pass the right one with --tokenizer_ckpt")
        warnings.warn(f"{tok_path} is not the tokenizer {args.ckpt} was trained with")
    if "latent_mean" in ckpt:  # the statistics the DiT was trained with
        tok.latent_mean.copy_(ckpt["latent_mean"]), tok.latent_std.copy_(ckpt["latent_std"])
    if args.latent_stats:
        mean, std = read_latent_stats(args.latent_stats, tok.cfg.latent_dim)
        tok.latent_mean.copy_(mean), tok.latent_std.copy_(std)
    if not tok.latent_mean.any() and (tok.latent_std == 1).all():
        raise ValueError(f"no latent statistics for {tok_path}: pass --latent_stats or a tokenizer measured with --stats_only")
    if (tok.grid, tok.cfg.latent_dim) != (dit.cfg.grid, dit.cfg.latent_dim):
        raise ValueError(f"tokenizer latent {tok.grid}x{tok.grid}x{tok.cfg.latent_dim} does not fit the DiT's "
                         f"{dit.cfg.grid}x{dit.cfg.grid}x{dit.cfg.latent_dim}")
    bad = R.load_model(args.autoguidance_ckpt, "dit").to(device).eval() if args.autoguidance_ckpt else None
    if bad is not None and (bad.cfg.grid, bad.cfg.latent_dim, bad.num_classes) != (dit.cfg.grid, dit.cfg.latent_dim, dit.num_classes):
        raise ValueError(f"{args.autoguidance_ckpt} does not fit the DiT's latent and classes")
    guidance = dict(cfg=args.ag_scale or 1.29, bad_model=bad) if bad else dict(cfg=args.cfg, interval=tuple(args.cfg_interval))

    K, N = dit.num_classes, args.num_images
    g = torch.Generator().manual_seed(args.seed)
    labels = (torch.arange(N) % K if args.class_balanced else
              torch.tensor(args.labels).repeat(N // len(args.labels) + 1)[:N] if args.labels else torch.randint(K, (N,), generator=g))
    if labels.max() >= K:
        raise ValueError(f"labels must lie in [0, {K - 1}]")
    grid = R.time_grid(args.steps, R.flow_shift(dit.cfg.grid, dit.cfg.latent_dim))
    shape = (dit.cfg.latent_dim, dit.cfg.grid, dit.cfg.grid)

    if args.trajectory:  # rows: samples; columns: decoded x_t at 8 times from noise to data
        noise = torch.randn(min(N, 8), *shape, generator=g).to(device)
        states = [noise]
        with R.autocast(device):
            R.sample(dit, noise, labels[: len(noise)].to(device), grid, args.sampler, states, **guidance)
            cols = [states[i] for i in np.linspace(0, len(states) - 1, 8).round().astype(int)]
            images = torch.stack([tok.decode(x.float()) for x in cols], dim=1)  # (n, 8, 3, H, W)
        R.save_grid(images.flatten(0, 1), args.out)
        print(f"trajectory t = {', '.join(f'{grid[i]:.2f}' for i in np.linspace(0, len(grid) - 1, 8).round().astype(int))} -> {args.out}")
        return args.out

    torch.manual_seed(args.seed + rank)                                    # per-rank seed, as the official code
    t_start = time.time()
    mine = torch.arange(N)[rank::world]
    images = []
    for start in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc="sampling"):
        idx = mine[start: start + args.batch_size]
        noise = torch.randn(len(idx), *shape).to(device)                  # drawn on the CPU, as the official sampler
        with R.autocast(device):
            z = R.sample(dit, noise, labels[idx].to(device), grid, args.sampler, **guidance)
            x = tok.decode(z.float())                                      # [0, 1]
        images.append((x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())  # truncation, as the official code
        if not args.out.endswith((".png", ".npz")):
            for i, img in zip(idx.tolist(), images.pop()):
                R.save_grid(img.permute(2, 0, 1).float() / 255, os.path.join(args.out, f"{i:06d}_class{labels[i]}.png"))
    if args.out.endswith((".png", ".npz")):  # each rank writes its shard; rank 0 interleaves them back
        R.atomic_write(f"{args.out}.rank{rank}.npy", lambda f: np.save(f, torch.cat(images).numpy()))
        if world > 1:
            dist.barrier()
        if rank == 0:
            arr = np.empty((N, *images[0].shape[1:]), np.uint8)
            for r in range(world):
                arr[r::world] = np.load(f"{args.out}.rank{r}.npy")
                os.remove(f"{args.out}.rank{r}.npy")
            if args.out.endswith(".npz"):
                R.atomic_write(args.out, lambda f: np.savez(f, arr_0=arr, labels=labels.numpy()))
            else:
                R.save_grid(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, args.out)
            how = f"AutoGuidance {guidance['cfg']}" if bad else f"cfg {args.cfg}"
            secs = time.time() - t_start
            print(f"{N} samples, {args.steps} {args.sampler} steps, {how}, {secs:.1f}s ({N / secs:.1f} images/s) -> {args.out}")
    return args.out


if __name__ == "__main__":
    R.run_cli(main, get_args)
