"""
sample.py: generate images with a trained DiT^DH and the RecTok pixel decoder.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Euler or Heun
integration of the velocity field from noise (t = 0) to data (t = 1) on the shifted time grid, with optional
classifier-free guidance or AutoGuidance, then the pixel decoder. Images become uint8 by truncation, as the
official evaluation does. The output kind follows --out: a .png grid, a folder of PNGs, or an .npz (uint8
arr_0, N x H x W x 3, plus labels) that eval.py and the ADM evaluator read. Image i is a function of
(--seed, i) alone: the same command gives the same images on 1 or 8 processes, and --num_images N is a
prefix of N + k.

  python sample.py --ckpt runs/quick_dit/ckpt.pt --out runs/quick_dit/grid.png
  python sample.py --ckpt runs/quick_dit/ckpt.pt --trajectory --out runs/quick_dit/trajectory.png
  torchrun --nproc_per_node 8 sample.py --ckpt ditdhxl_epoch_0599.pth --tokenizer_ckpt runs/official_tok/ckpt.pt \
      --autoguidance_ckpt ditdhs_epoch_0029.pth --ag_scale 1.29 --steps 149 --num_images 50000 --class_balanced \
      --out samples.npz
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
    p.add_argument("--seed", type=int, default=1, help="image i is drawn from a generator seeded by (seed, i)")
    p.add_argument("--batch_size", type=R.POS_INT, default=64)
    p.add_argument("--trajectory", action="store_true", help="grid of decoded states along the flow (rows: samples)")
    return p.parse_args(argv)


def check_flags(args):
    """Flag combinations that make no sense stop here, before any model is loaded. -> whether --out is a folder"""
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
    R.not_an_input(args.out, [args.ckpt, args.tokenizer_ckpt, args.latent_stats, args.autoguidance_ckpt])
    folder = not args.out.endswith((".png", ".npz"))
    R.writable(args.out, folder=folder)
    old = [n for n in os.listdir(args.out) if n.lower().endswith(".png")] if folder else []
    if old:                      # before torchrun's rendezvous: no rank has written a PNG of its own yet
        raise ValueError(f"--out {args.out} already holds {len(old)} PNG files, which eval.py gen would count as "
                         "samples of this run: choose an empty folder")
    return folder


def load_models(args, device):
    """-> the DiT, the tokenizer with the latent statistics the DiT was trained with, the AutoGuidance DiT or None."""
    ckpt = R.load_checkpoint(args.ckpt, "dit", official=True)          # ours, or an official release file
    dit = R.load_model(args.ckpt, "dit").to(device).eval()
    tok_path = args.tokenizer_ckpt or ckpt.get("tokenizer")
    if not tok_path:
        raise ValueError(f"{args.ckpt} names no tokenizer: pass --tokenizer_ckpt")
    tok = R.load_model(tok_path, "tokenizer").to(device).eval()
    if ckpt.get("tokenizer_fingerprint") not in (None, fingerprint(tok)):  # the DiT learnt another latent
        if not args.tokenizer_ckpt:
            raise ValueError(f"{tok_path} is no longer the tokenizer {args.ckpt} was trained with; "
                             "pass the right one with --tokenizer_ckpt")
        warnings.warn(f"{tok_path} is not the tokenizer {args.ckpt} was trained with")
    if "latent_mean" in ckpt:  # the statistics the DiT was trained with
        R.check_latent_stats(ckpt["latent_mean"], ckpt["latent_std"], args.ckpt)
        tok.latent_mean.copy_(ckpt["latent_mean"])
        tok.latent_std.copy_(ckpt["latent_std"])
    if args.latent_stats:
        mean, std = read_latent_stats(args.latent_stats, tok.cfg.latent_dim)
        tok.latent_mean.copy_(mean)
        tok.latent_std.copy_(std)
    if not tok.latent_mean.any() and (tok.latent_std == 1).all():
        raise ValueError(f"no latent statistics for {tok_path}: pass --latent_stats or a tokenizer measured with "
                         "--stats_only")
    if (tok.grid, tok.cfg.latent_dim) != (dit.cfg.grid, dit.cfg.latent_dim):
        raise ValueError(f"tokenizer latent {tok.grid}x{tok.grid}x{tok.cfg.latent_dim} does not fit the DiT's "
                         f"{dit.cfg.grid}x{dit.cfg.grid}x{dit.cfg.latent_dim}")
    bad = R.load_model(args.autoguidance_ckpt, "dit").to(device).eval() if args.autoguidance_ckpt else None
    shape = (dit.cfg.grid, dit.cfg.latent_dim, dit.num_classes)
    if bad is not None and (bad.cfg.grid, bad.cfg.latent_dim, bad.num_classes) != shape:
        raise ValueError(f"{args.autoguidance_ckpt} does not fit the DiT's latent and classes")
    return dit, tok, bad


def image_generator(seed, i, stream):
    """Image i's own random stream (0: its noise, 1: its random label), seeded by (seed, i): it depends neither on
    the batch nor on the number of processes, so any image can be made again from its index."""
    state = np.random.SeedSequence([seed % 2**64, i, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_labels(args, n, num_classes):
    if args.class_balanced:
        labels = torch.arange(n) % num_classes
    elif args.labels:
        labels = torch.tensor(args.labels).repeat(n // len(args.labels) + 1)[:n]
    else:
        draws = [torch.randint(num_classes, (), generator=image_generator(args.seed, i, 1)) for i in range(n)]
        labels = torch.stack(draws)
    if labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return labels


def sample_noise(seed, indices, shape):
    return torch.stack([torch.randn(shape, generator=image_generator(seed, i, 0)) for i in indices])


def generate(dit, tok, noise, labels, grid, args, guidance, how, trajectory=None):
    """Latent noise (B, C, h, w) -> images in [0, 1] (B, 3, H, W); non-finite samples are an error."""
    with R.autocast(noise.device):
        z = R.sample(dit, noise, labels, grid, args.sampler, trajectory, **guidance)
        x = tok.decode(z.float())
    if not (z.isfinite().all() and x.isfinite().all()):
        raise ValueError(f"the samples are not finite after {args.steps} {args.sampler} steps with {how}: "
                         f"{args.ckpt} diverged, or its latent statistics are wrong")
    return x


def main(args):
    folder = check_flags(args)                                             # else a .png grid or an .npz
    rank, world, device = R.setup_distributed()
    dit, tok, bad = load_models(args, device)
    if bad:
        guidance = dict(cfg=args.ag_scale or 1.29, bad_model=bad)
    else:
        guidance = dict(cfg=args.cfg, interval=tuple(args.cfg_interval))
    how = f"AutoGuidance {guidance['cfg']}" if bad else f"cfg {args.cfg}"
    N, shape = args.num_images, (dit.cfg.latent_dim, dit.cfg.grid, dit.cfg.grid)
    labels = sample_labels(args, N, dit.num_classes)
    grid = R.time_grid(args.steps, R.flow_shift(dit.cfg.grid, dit.cfg.latent_dim))
    if args.trajectory:
        return trajectory(dit, tok, labels, grid, args, guidance, how, device) if rank == 0 else args.out

    # Batches of consecutive indices, dealt round-robin over the ranks: the batches are the same on any number
    # of processes, so the images are too, bit for bit on the same device type.
    t_start, size = time.time(), tok.cfg.img_size
    batches = torch.arange(N).split(args.batch_size)[rank::world]
    index, images = [torch.arange(0)], [np.empty((0, size, size, 3), np.uint8)]
    for idx in tqdm(batches, disable=rank != 0, desc="sampling"):
        x = generate(dit, tok, sample_noise(args.seed, idx.tolist(), shape).to(device), labels[idx].to(device),
                     grid, args, guidance, how)
        x = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # truncation, as the official code
        if not folder:
            index.append(idx)
            images.append(x)
        else:
            for i, img in zip(idx.tolist(), x):
                R.save_grid(torch.from_numpy(img).permute(2, 0, 1).float() / 255,
                            os.path.join(args.out, f"{i:06d}_class{int(labels[i])}.png"))
    if not folder:
        arr = gather_images(np.concatenate(images), torch.cat(index).numpy(), N, args.out, rank, world)
        if rank == 0:
            write_samples(arr, labels, args.out)
    if rank == 0:
        secs = time.time() - t_start
        print(f"{N} samples, {args.steps} {args.sampler} steps, {how}, {secs:.1f}s ({N / secs:.1f} images/s) "
              f"-> {args.out}")
    return args.out


def gather_images(images, index, n, out, rank, world):
    """Every rank's images at rank 0, in index order: each rank writes its shard under a name of its own
    process, rank 0 reads them back. -> (n, H, W, 3) uint8 on rank 0."""
    if world == 1:
        return images[np.argsort(index)]
    shard = f"{out}.shard{rank}.{os.getpid()}.npz"
    R.atomic_write(shard, lambda f: np.savez(f, images=images, index=index))
    shards = [None] * world
    dist.all_gather_object(shards, shard)
    arr = None
    if rank == 0:
        arr = np.empty((n, *images.shape[1:]), np.uint8)
        for path in shards:
            with np.load(path) as d:
                arr[d["index"]] = d["images"]
    dist.barrier()                                                         # rank 0 has read every shard
    os.remove(shard)
    return arr


def write_samples(arr, labels, out):
    if out.endswith(".npz"):
        R.atomic_write(out, lambda f: np.savez(f, arr_0=arr, labels=labels.numpy()))
    else:
        R.save_grid(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, out)


def trajectory(dit, tok, labels, grid, args, guidance, how, device):
    """Rows: up to 8 samples; columns: decoded x_t at 8 times from noise to data."""
    n = min(args.num_images, 8)
    noise = sample_noise(args.seed, range(n), (dit.cfg.latent_dim, dit.cfg.grid, dit.cfg.grid)).to(device)
    states = [noise]
    generate(dit, tok, noise, labels[:n].to(device), grid, args, guidance, how, states)
    cols = np.linspace(0, len(states) - 1, 8).round().astype(int)
    with R.autocast(device):
        images = torch.stack([tok.decode(states[i].float()) for i in cols], dim=1)  # (n, 8, 3, H, W)
    R.save_grid(images.flatten(0, 1), args.out)
    print(f"trajectory t = {', '.join(f'{grid[i]:.2f}' for i in cols)} -> {args.out}")
    return args.out


if __name__ == "__main__":
    R.run_cli(main, get_args)
