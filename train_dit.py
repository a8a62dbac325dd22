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
import errno
import hashlib
import io
import json
import os
import pickle
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
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
    g.add_argument("--patch_size", type=R.POS_INT, help="latent patch size of the DiT")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (cached)")
    g.add_argument("--batch_size", type=R.POS_INT, help="global batch size")
    g.add_argument("--epochs", type=R.POS_FLOAT)
    g.add_argument("--lr", type=R.POS_FLOAT)
    g.add_argument("--min_lr", type=R.NONNEG_FLOAT)
    g.add_argument("--decay_start_epoch", type=R.NONNEG_FLOAT, help="lr is constant until here, then decays linearly")
    g.add_argument("--decay_end_epoch", type=R.NONNEG_FLOAT, help="... reaching min_lr here")
    g.add_argument("--grad_clip", type=R.POS_FLOAT)
    g.add_argument("--ema", type=R.FRACTION)
    g.add_argument("--label_drop", type=R.FRACTION, help="probability of the null label (trains CFG's unconditional model)")
    g.add_argument("--sample_steps", type=R.POS_INT, help="Euler steps of the progress grids")
    return p.parse_args(argv)


class StatsUnpickler(pickle.Unpickler):
    """Reads the official work_dirs/stats.pkl without running code from it: containers, numpy arrays and torch
    tensors only (the official code pickles tensors; their storage is read back with weights_only=True)."""
    ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("torch._utils", "_rebuild_tensor_v2"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no statistics file needs")
        return super().find_class(module, name)


def read_latent_stats(path, C):
    """Latent mean and std (C,) from a .npz/.pt with keys mean and std, or from the official stats.pkl
    {key: {"single": (m, s), "channel": (mean[2C], std[2C])}}, whose first C entries are the posterior mean's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent statistics file {path!r} does not exist")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                d = StatsUnpickler(f).load()
            if len(d) != 1:
                raise ValueError(f"it holds statistics of {len(d)} tokenizers, {list(d)[:5]}; keep one")
            mean, std = next(iter(d.values()))["channel"]
        else:
            d = np.load(path) if path.endswith(".npz") else R.load_state(path, "latent statistics")
            mean, std = d["mean"], d["std"]
        mean, std = (torch.tensor(np.asarray(v, dtype=np.float32)).reshape(-1) for v in (mean, std))
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise ValueError(f"latent statistics {path!r} cannot be used: {e}") from e
    if len(mean) not in (C, 2 * C) or len(std) != len(mean) or not (mean.isfinite().all() and (std > 0).all() and std.isfinite().all()):
        raise ValueError(f"latent statistics {path!r}: need {C} (or 2C) finite means and positive stds, got {len(mean)} channels")
    return mean[:C], std[:C]


def fingerprint(module):
    """sha1 of a module's weights: which tokenizer made a latent cache, or trained a DiT."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode()), h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def constant_then_linear_lr(epoch, lr, min_lr, start, end):
    """Official DiT^DH schedule: lr until `start`, then linear to min_lr at `end`, min_lr after."""
    return lr - (lr - min_lr) * min(1.0, max(0.0, epoch - start) / max(end - start, 1e-8))


def dataset_fingerprint(dataset):
    items = [p for p, _ in dataset.samples] if hasattr(dataset, "samples") else [dataset.seed, dataset.num_classes]
    return {"type": type(dataset).__name__, "n": len(dataset), "size": dataset.size,
            "items": hashlib.sha1(json.dumps(items).encode()).hexdigest()}


class WithIndex(torch.utils.data.Dataset):
    """(index, image, label), or None where the image cannot be read."""

    def __init__(self, dataset):
        self.dataset, self.labels = dataset, dataset.labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (i, *item)


@torch.no_grad()
def latent_cache(tok, dataset, path, flips, device, rank, world, workers, batch=64):
    """Posterior moments [mean | logvar] of every image (and its mirror), (N, flips, L, 2C) float16 in a .npy
    memmap, and the label of each row in PATH.labels.npy (-1: the image could not be read; that row is never
    used). The .json description is written last, so an interrupted caching run is redone, and a cache made
    with another tokenizer or dataset is refused."""
    meta = {"tokenizer": fingerprint(tok.encoder), "dataset": dataset_fingerprint(dataset), "flips": flips, "format": 2}
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            found = json.load(f)
        if found != meta:
            raise ValueError(f"latent cache {path} was made with a different "
                             f"{'tokenizer' if found.get('tokenizer') != meta['tokenizer'] else 'dataset, flip setting or cache format'}; "
                             f"delete it or pass --latent_cache NEW_PATH")
        return np.load(path, mmap_mode="r"), np.load(path + ".labels.npy")
    shape = (len(dataset), flips, tok.grid**2, 2 * tok.cfg.latent_dim)
    if rank == 0:
        R.writable(path)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
        try:                                                               # claim the disk space now, not mid-pass
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                os.remove(path)
                raise OSError(f"no room for the latent cache ({np.prod(shape) * 2 / 1e9:.1f} GB) at {path}: pass --latent_cache ELSEWHERE") from e
    if world > 1:
        dist.barrier()
    cache, labels = np.load(path, mmap_mode="r+"), torch.full((len(dataset),), -1, device=device)
    for data in tqdm(R.pass_loader(WithIndex(dataset), batch, workers, None, rank, world, "latent cache"),
                     desc="caching latents", disable=rank != 0):
        if data is None:                                                   # no readable image in this batch
            continue
        rows, img, y = data
        for f in range(flips):
            x = img.to(device).flip(-1) if f else img.to(device)
            with R.autocast(device):
                mean, logvar = tok.encode(x)                               # fp32 (B, L, C) each
            cache[rows.numpy(), f] = torch.cat([mean, logvar], -1).cpu().numpy().astype(np.float16)
        labels[rows.to(device)] = y.to(device)
    cache.flush()
    if world > 1:
        dist.all_reduce(labels, op=dist.ReduceOp.MAX)
    if rank == 0:
        R.atomic_write(path + ".labels.npy", lambda f: np.save(f, labels.cpu().numpy()))
        R.atomic_write(path + ".json", lambda f: f.write(json.dumps(meta).encode()))
    if world > 1:
        dist.barrier()
    return np.load(path, mmap_mode="r"), labels.cpu().numpy()


class CachedLatents(torch.utils.data.Dataset):
    """The readable rows of the latent cache: item i -> (row, label). The training loop reads the moments of a
    batch itself, once it has drawn image or mirror, so only the half in use is read from disk."""

    def __init__(self, cache, labels):
        self.cache, self.rows = cache, np.flatnonzero(labels >= 0)
        self.labels = labels[self.rows].tolist()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return int(self.rows[i]), self.labels[i]

    def read(self, rows, flip):
        """rows (B,), flip (B,) -> moments [mean | logvar] (B, L, 2C) in fp32."""
        return torch.from_numpy(np.asarray(self.cache[rows.numpy(), flip.cpu().numpy()], dtype=np.float32))


def main(args):
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    resume, ckpt_path, log_path = R.start_run(args, "dit", rank)
    recipe = R.override(R.DiTRecipe(**resume["recipe"]) if resume else R.PRESETS[args.preset]["dit"], args)
    if resume and any(getattr(args, k) not in (None, resume["recipe"][k]) for k in ("model", "patch_size")):
        raise ValueError(f"--resume keeps the model of {ckpt_path}: drop --model and --patch_size")
    if recipe.decay_end_epoch < recipe.decay_start_epoch:
        raise ValueError(f"--decay_end_epoch {recipe.decay_end_epoch} lies before --decay_start_epoch {recipe.decay_start_epoch}")

    # The tokenizer: its EMA weights and its latent statistics (ours carry them; official ones need a file).
    tok = R.load_model(args.tokenizer, "tokenizer").to(device).eval().requires_grad_(False)
    tok_id = fingerprint(tok)                                            # sample.py checks it decodes with this one
    if args.latent_stats:
        mean, std = read_latent_stats(args.latent_stats, tok.cfg.latent_dim)
        tok.latent_mean.copy_(mean), tok.latent_std.copy_(std)
    if not tok.latent_mean.any() and (tok.latent_std == 1).all():
        raise ValueError(f"{args.tokenizer} carries no latent statistics: pass --latent_stats FILE, or measure them with "
                         f"train_tokenizer.py --stats_only --init_from {args.tokenizer}")
    dataset = R.dataset_from_args(args, tok.cfg.img_size)
    backbone, head = R.DIT_SIZES[recipe.model]
    cfg = R.DiTConfig(tok.grid, tok.cfg.latent_dim, len(dataset.classes), recipe.patch_size, backbone, head)
    if resume:  # a resumed DiT must still fit this tokenizer and these classes
        old = R.DiTConfig(**resume["config"])
        for field, a, b in (("latent width", old.latent_dim, cfg.latent_dim), ("latent grid", old.grid, cfg.grid),
                            ("number of classes", old.num_classes, cfg.num_classes)):
            if a != b:
                raise ValueError(f"the DiT in {ckpt_path} has {field} {a}, but the tokenizer/data give {b}")
        cfg = old
        if resume.get("tokenizer_fingerprint", tok_id) != tok_id:
            raise ValueError(f"the DiT in {ckpt_path} was trained on another tokenizer than {args.tokenizer}")
    if cfg.grid % cfg.patch_size:
        raise ValueError(f"latent grid {cfg.grid} is not divisible by the DiT patch size {cfg.patch_size}")

    model = R.DiTDH(cfg).to(device)
    ema = copy.deepcopy(R.broadcast(model, world)).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    if resume:
        model.load_state_dict(resume["model"]), ema.load_state_dict(resume["ema"]), opt.load_state_dict(resume["opt"])
        step = resume["step"]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    R.maybe_compile([model], args.compile)

    flips = 2 if recipe.flip else 1
    latents = CachedLatents(*latent_cache(tok, dataset, args.latent_cache or os.path.join(args.out, "latents.npy"),
                                          flips, device, rank, world, args.workers))
    batch = recipe.batch_size // world
    steps_per_epoch = len(latents) // recipe.batch_size
    if recipe.batch_size % world or steps_per_epoch == 0:
        raise ValueError(f"batch size {recipe.batch_size} must divide by {world} processes and fit the {len(latents)} images")
    total = args.steps or round(recipe.epochs * steps_per_epoch)
    if resume and step >= total:
        print(f"{ckpt_path} is a finished run (step {step} of {total}); nothing to do")
        return ckpt_path
    if args.stop_at is not None and not step < args.stop_at <= total:
        raise ValueError(f"--stop_at {args.stop_at} must lie after the current step {step} and at most at the last, {total}")
    shift = R.flow_shift(cfg.grid, cfg.latent_dim)
    g = torch.Generator().manual_seed(args.seed)                           # fixed progress-grid noise and labels
    show_noise = torch.randn(16, cfg.latent_dim, cfg.grid, cfg.grid, generator=g).to(device)
    show_labels = (torch.arange(16) % cfg.num_classes).to(device)
    if resume:
        R.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    if rank == 0:
        print(f"DiT^DH-{recipe.model} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on a "
              f"{cfg.grid}x{cfg.grid}x{cfg.latent_dim} latent, {len(latents)} images, {total} steps of "
              f"{recipe.batch_size}, shift s={shift:.3f}, device {device}")
    saved = (ckpt_path, step) if resume else None                          # the last checkpoint written

    def checkpoint():
        nonlocal saved
        rngs = R.gathered_rng_states(world)
        if rank == 0:
            R.save_checkpoint(ckpt_path, {"kind": "dit", "config": asdict(cfg), "recipe": asdict(recipe), "step": step,
                                          "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                          "rng": rngs, "tokenizer": os.path.abspath(args.tokenizer), "tokenizer_fingerprint": tok_id,
                                          "latent_mean": tok.latent_mean.cpu(), "latent_std": tok.latent_std.cpu()})
        saved = (ckpt_path, step)

    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), step
    while step < total and step != args.stop_at:
        loader = R.epoch_loader(latents, batch, step // steps_per_epoch, args.seed, step % steps_per_epoch, rank, world, args.workers)
        for rows, y in loader:
            flip = torch.randint(flips, (len(y),), device=device)          # image or its mirror
            mean, logvar = latents.read(rows, flip).to(device).chunk(2, dim=-1)  # (B, L, C) each
            z = tok.normalize(mean + (0.5 * logvar).exp() * torch.randn_like(mean))  # posterior sample (B, C, h, w)
            lr = constant_then_linear_lr(step / steps_per_epoch, recipe.lr, recipe.min_lr, recipe.decay_start_epoch, recipe.decay_end_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            with R.autocast(device):
                loss = R.flow_matching_loss(net, z, y.to(device), shift, cfg.num_classes, recipe.label_drop)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            R.check_finite(step, saved, world, loss=loss, grad_norm=grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)                                # no stale gradients during the next forward
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
                    R.save_grid(tok.decode(zs.float()), os.path.join(args.out, f"samples_{step:06d}.png"))
            if step == args.stop_at or step % args.ckpt_every == 0 or step == total:
                checkpoint()
            if step in (total, args.stop_at):
                break
    bar.close()
    return ckpt_path


if __name__ == "__main__":
    R.run_cli(main, get_args)
