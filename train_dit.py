"""
train_dit.py: train the DiT^DH generator on a RecTok latent with rectified flow.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). Velocity MSE on
per-channel-normalised posterior samples, t from the dimension-shifted law, label dropout for CFG; the recipe of
the official main_diffusion.py and run_train_diffusion.sh (DiTRecipe). Unlike the official code, which re-encodes
every image at every step, the posterior moments (mean, logvar) of every image and of its mirror are computed
once and cached on disk; each step draws a fresh posterior sample from them.

  python train_dit.py --preset quick --tokenizer runs/quick_tok_ft/ckpt.pt --out runs/quick_dit     # CPU
  python train_dit.py --preset subset --tokenizer runs/subset_tok_ft/ckpt.pt --data_path IMAGENET/train \
      --num_classes 100 --out runs/subset_dit
  torchrun --nproc_per_node 8 train_dit.py --preset paper --tokenizer RecTok_decft.pth --latent_stats stats.npz \
      --data_path IMAGENET/train --out runs/paper_dit
"""
import argparse
import copy
import hashlib
import io
import json
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import rectok as R


@dataclass
class DiTRecipe:
    """What train_dit.py takes from a preset (the paper's: official run_train_diffusion.sh); each field is a flag."""
    model: str = "XL"                     # a DIT_SIZES name
    patch_size: int = 1
    flip: bool = True                     # the latent of the image or of its mirror, at random
    batch_size: int = 1024                # global
    epochs: float = 800
    lr: float = 2e-4                      # constant until decay_start_epoch, then linear to min_lr at decay_end_epoch
    min_lr: float = 2e-5
    decay_start_epoch: float = 40
    decay_end_epoch: float = 800
    grad_clip: float = 1.0
    ema: float = 0.9995
    label_drop: float = 0.1               # probability of the null label (trains CFG's unconditional model)
    sample_steps: int = 49                # Euler steps of the progress grids (official: 50 points)
    train_images: int = None              # train on this many images spread over the classes (None: all; shapes: 4,000)


PRESETS = {  # the same three names in train_tokenizer.py
    "quick": DiTRecipe(model="quick", patch_size=2, batch_size=64, epochs=24, lr=2e-3, min_lr=2e-4,
                       decay_start_epoch=8, decay_end_epoch=24, ema=0.995, sample_steps=24, train_images=4000),
    "subset": DiTRecipe(model="B", batch_size=128, epochs=200, decay_start_epoch=40, decay_end_epoch=200),
    "paper": DiTRecipe(),                                                  # DiT^DH-XL, global batch 1024
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(p, PRESETS)
    g = p.add_argument_group("tokenizer and latents")
    g.add_argument("--tokenizer", required=True, help="tokenizer checkpoint: ours, or the official RecTok_decft.pth")
    g.add_argument("--latent_stats", help="latent mean/std (.npz/.pt, or the official stats.pkl) of an official one")
    g.add_argument("--latent_cache", help="posterior-moment cache (.npy, default OUT/latents.npy), shareable by runs")
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
    g.add_argument("--label_drop", type=R.FRACTION, help="probability of the null label (CFG's unconditional model)")
    g.add_argument("--sample_steps", type=R.POS_INT, help="Euler steps of the progress grids")
    return p.parse_args(argv)


class StatsUnpickler(pickle.Unpickler):
    """Reads the official work_dirs/stats.pkl without running code from it: containers, numpy arrays and torch
    tensors only (the official code pickles tensors; their storage is read back with weights_only=True)."""
    ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("torch._utils", "_rebuild_tensor_v2"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

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
    usable = mean.isfinite().all() and std.isfinite().all() and (std > 0).all()
    if len(mean) not in (C, 2 * C) or len(std) != len(mean) or not usable:
        raise ValueError(f"latent statistics {path!r}: need {C} (or 2C) finite means and positive stds, got "
                         f"{len(mean)} channels")
    return mean[:C], std[:C]


def fingerprint(module):
    """sha1 of a module's weights: which tokenizer made a latent cache, or trained a DiT."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def constant_then_linear_lr(epoch, lr, min_lr, start, end):
    """Official DiT^DH schedule: lr until `start`, then linear to min_lr at `end`, min_lr after."""
    return lr - (lr - min_lr) * min(1.0, max(0.0, epoch - start) / max(end - start, 1e-8))


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
def latent_cache(run, dataset, path, own, workers):
    """Posterior moments [mean | logvar] of every image (and its mirror), (N, flips, L, 2C) float16 in a .npy
    memmap, and the label of each row in PATH.labels.npy (-1: the image could not be read; that row is never
    used). PATH.json records the tokenizer and the data (their files' names, sizes and times). The cache is
    built under a lock (a second process waits), in PATH.partial, then moved into place with its .json last:
    a reader never sees a half-written cache, and a killed build is redone. A cache that no longer fits its
    tokenizer or data is rebuilt if it is the run's own (own), and refused if it was given.
    -> (cache, dataset of the readable images' (row, label))"""
    tok, rank, world = run.tok, run.rank, run.world
    meta = {"tokenizer": fingerprint(tok.encoder), "data": dataset.identity(), "flips": run.flips, "format": 3}
    shape = (len(dataset), run.flips, tok.grid**2, 2 * tok.cfg.latent_dim)
    if rank == 0:
        R.writable(path)
    with R.lock_file(path + ".lock", f"the latent cache {path}", wait=True) if rank == 0 else nullcontext():
        if not R.broadcast_object(cache_fits(path, meta, own) if rank == 0 else None, world):
            build_latent_cache(run, dataset, path, meta, shape, workers)
        try:
            cache, labels = np.load(path, mmap_mode="r"), np.load(path + ".labels.npy")
            if cache.shape != shape or labels.shape != shape[:1]:
                raise ValueError(f"it holds {cache.shape}, not {shape}")
        except (OSError, ValueError) as e:
            raise ValueError(f"latent cache {path} is damaged ({e}): delete it and {path}.json to rebuild it") from e
        if world > 1:
            dist.barrier()                                                 # every rank has it open: the lock may go
    rows = np.flatnonzero(labels >= 0)                                     # label -1: the image was unreadable
    return cache, torch.utils.data.TensorDataset(torch.from_numpy(rows), torch.from_numpy(labels[rows]))


def cache_fits(path, meta, own):
    """Whether the cache at path was made from this tokenizer and these data; a mismatch stops a given cache."""
    if not os.path.exists(path + ".json"):
        if os.path.exists(path) and not own:                               # never overwrite a file we did not make
            raise ValueError(f"--latent_cache {path} exists but has no {path}.json, so it is no latent cache of this "
                             "code: delete it, or pass another path")
        return False
    try:
        with open(path + ".json") as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"latent cache description {path}.json is unreadable ({e}): delete it to rebuild the "
                         "cache") from e
    if found == meta:
        return True
    why = ("another tokenizer" if found.get("tokenizer") != meta["tokenizer"] else
           f"other data ({'; '.join(R.data_changes(found.get('data') or {}, meta['data']))})"
           if found.get("data") != meta["data"] else "another flip setting or an older cache format")
    if own:
        print(f"latent cache {path} was made from {why}: building it again")
        return False
    raise ValueError(f"latent cache {path} was made from {why}; delete it or pass --latent_cache NEW_PATH")


def build_latent_cache(run, dataset, path, meta, shape, workers, batch=64):
    tok, rank, world, device = run.tok, run.rank, run.world, run.device
    partial = path + ".partial"
    if rank == 0:
        if os.path.exists(path + ".json"):                                 # from here on the old cache is void
            os.remove(path + ".json")
        try:                                                               # claim the disk space now, not mid-pass
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape).flush()
            with open(partial, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(partial))
        except OSError as e:
            if os.path.exists(partial):
                os.remove(partial)
            raise OSError(f"cannot write the latent cache {path} ({np.prod(shape) * 2 / 1e9:.1f} GB): "
                          f"{e.strerror or e}; pass --latent_cache ELSEWHERE") from e
    if world > 1:
        dist.barrier()
    cache, labels = np.load(partial, mmap_mode="r+"), torch.full((len(dataset),), -1, device=device)
    for data in tqdm(R.pass_loader(WithIndex(dataset), batch, workers, None, rank, world, "latent cache"),
                     desc="caching latents", disable=rank != 0):
        if data is None:                                                   # no readable image in this batch
            continue
        rows, img, y = data
        for f in range(shape[1]):
            x = img.to(device).flip(-1) if f else img.to(device)
            with R.autocast(device):
                mean, logvar = tok.encode(x)                               # fp32 (B, L, C) each
            cache[rows.numpy(), f] = torch.cat([mean, logvar], -1).cpu().numpy().astype(np.float16)
        labels[rows.to(device)] = y.to(device)
    cache.flush()
    if world > 1:
        dist.all_reduce(labels, op=dist.ReduceOp.MAX)
        dist.barrier()                                                     # every rank's rows are on disk
    if rank == 0:
        R.atomic_write(path + ".labels.npy", lambda f: np.save(f, labels.cpu().numpy()))
        os.replace(partial, path)
        R.atomic_write(path + ".json", lambda f: f.write(json.dumps(meta).encode()))
    if world > 1:
        dist.barrier()


def main(args):
    rank, world, device = R.setup_distributed()
    torch.manual_seed(args.seed + rank)
    with R.run_lock(args, rank):
        inputs = [args.tokenizer, args.latent_stats, args.latent_cache, args.data_path, args.class_list]
        resume, ckpt_path, log_path = R.start_run(args, "dit", rank, inputs)
        R.not_an_input(args.latent_cache, inputs[:2] + inputs[3:] + [ckpt_path, log_path], "--latent_cache")
        recipe = resolve_recipe(args, resume, ckpt_path)
        tok, norm = load_tokenizer(args, device)
        with R.memory_guard(recipe.batch_size // world, tok.cfg.img_size):
            run = build(args, recipe, tok, resume, ckpt_path, rank, world, device)
            run.norm = norm
            if run.progress.step >= run.total:
                print(f"{ckpt_path} is a finished run (step {run.progress.step} of {run.total}); nothing to do")
                return ckpt_path
            with R.stop_guard(run.progress, rank):
                train(run, args, log_path, resume)
    return ckpt_path


def resolve_recipe(args, resume, ckpt_path):
    """The preset (or the resumed run's recipe), then the flags."""
    if resume and any(getattr(args, k) not in (None, resume["recipe"].get(k)) for k in ("model", "patch_size")):
        raise ValueError(f"--resume keeps the model of {ckpt_path}: drop --model and --patch_size")
    recipe = R.recipe_from(DiTRecipe, resume["recipe"], ckpt_path) if resume else PRESETS[args.preset]
    recipe = R.override(recipe, args)
    if recipe.decay_end_epoch < recipe.decay_start_epoch:
        raise ValueError(f"--decay_end_epoch {recipe.decay_end_epoch} lies before --decay_start_epoch "
                         f"{recipe.decay_start_epoch}")
    return recipe


def load_tokenizer(args, device):
    """The tokenizer's EMA weights and its latent statistics (ours carry them; official ones need a file).
    -> (tokenizer, how its latents are normalised)"""
    tok = R.load_model(args.tokenizer, "tokenizer").to(device).eval().requires_grad_(False)
    norm = f"by the std of posterior {tok.latent_norm or 'means'}"
    if args.latent_stats:
        mean, std = read_latent_stats(args.latent_stats, tok.cfg.latent_dim)
        tok.latent_mean.copy_(mean)
        tok.latent_std.copy_(std)
        norm = f"as in {args.latent_stats}"
    if not tok.latent_mean.any() and (tok.latent_std == 1).all():
        raise ValueError(f"{args.tokenizer} carries no latent statistics: pass --latent_stats FILE, or measure them "
                         f"with train_tokenizer.py --stats_only --init_from {args.tokenizer}")
    return tok, norm


def build(args, recipe, tok, resume, ckpt_path, rank, world, device):
    """Data (bound to the checkpoint's), the DiT and its EMA, the optimiser, the latent cache, the step count."""
    run = SimpleNamespace(recipe=recipe, tok=tok, tok_id=fingerprint(tok), rank=rank, world=world, device=device)
    dataset = R.dataset_from_args(args, tok.cfg.img_size, n=recipe.train_images)
    run.data_id = R.check_same_data(resume, dataset, ckpt_path, args.allow_new_data)
    R.plan_steps(args, recipe, len(dataset), world, resume, ckpt_path)   # a plan of no step stops before the cache
    run.cfg = dit_config(recipe, tok, dataset, resume, ckpt_path, run.tok_id, args.tokenizer)
    run.model = R.DiTDH(run.cfg).to(device)
    run.ema = copy.deepcopy(R.broadcast(run.model, world)).eval().requires_grad_(False)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if resume:
        for part, key in ((run.model, "model"), (run.ema, "ema"), (run.opt, "opt")):
            part.load_state_dict(resume[key])
    run.net = torch.nn.parallel.DistributedDataParallel(run.model) if world > 1 else run.model
    R.maybe_compile([run.model], args.compile)
    run.flips = 2 if recipe.flip else 1
    path = args.latent_cache or os.path.join(args.out, "latents.npy")
    run.cache, run.latents = latent_cache(run, dataset, path, args.latent_cache is None, args.workers)
    plan = R.plan_steps(args, recipe, len(run.latents), world, resume, ckpt_path)
    run.batch, run.steps_per_epoch, run.total, run.progress = plan
    return run


def dit_config(recipe, tok, dataset, resume, ckpt_path, tok_id, tok_path):
    """The DiT's shape; a resumed DiT must still fit this tokenizer and these classes."""
    backbone, head = R.DIT_SIZES[recipe.model]
    cfg = R.DiTConfig(tok.grid, tok.cfg.latent_dim, len(dataset.classes), recipe.patch_size, backbone, head)
    if resume:
        old = R.DiTConfig(**resume["config"])
        for field, a, b in (("latent width", old.latent_dim, cfg.latent_dim), ("latent grid", old.grid, cfg.grid),
                            ("number of classes", old.num_classes, cfg.num_classes)):
            if a != b:
                raise ValueError(f"the DiT in {ckpt_path} has {field} {a}, but the tokenizer/data give {b}")
        cfg = old
        if resume.get("tokenizer_fingerprint", tok_id) != tok_id:
            raise ValueError(f"the DiT in {ckpt_path} was trained on another tokenizer than {tok_path}")
    if cfg.grid % cfg.patch_size:
        raise ValueError(f"latent grid {cfg.grid} is not divisible by the DiT patch size {cfg.patch_size}")
    return cfg


def update(run, rows, y, lr):
    """One optimisation step: a fresh posterior sample of each cached image (or its mirror), velocity MSE."""
    tok, device = run.tok, run.device
    flip = torch.randint(run.flips, (len(y),), device=device)              # image or its mirror
    moments = run.cache[rows.numpy(), flip.cpu().numpy()]                  # only the half in use is read from disk
    mean, logvar = torch.from_numpy(np.asarray(moments, dtype=np.float32)).to(device).chunk(2, dim=-1)  # (B, L, C)
    z = tok.normalize(mean + (0.5 * logvar).exp() * torch.randn_like(mean))  # posterior sample (B, C, h, w)
    for group in run.opt.param_groups:
        group["lr"] = lr
    with R.autocast(device):
        loss = R.flow_matching_loss(run.net, z, y.to(device), run.shift, run.cfg.num_classes, run.recipe.label_drop)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.grad_clip)
    R.check_finite(run.progress, run.world, run.rank, loss=loss, grad_norm=grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)                                    # no stale gradients during the next forward
    R.ema_update(run.ema, run.model, run.recipe.ema)
    return {"loss": loss, "grad_norm": grad_norm}


def checkpoint(run, args):
    rngs = R.gathered_rng_states(run.world)
    if run.rank == 0:
        R.save_checkpoint(run.progress.ckpt_path, {
            "kind": "dit", "config": asdict(run.cfg), "recipe": asdict(run.recipe), "step": run.progress.step,
            "model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(), "rng": rngs,
            "tokenizer": os.path.abspath(args.tokenizer), "tokenizer_fingerprint": run.tok_id, "data": run.data_id,
            "latent_mean": run.tok.latent_mean.cpu(), "latent_std": run.tok.latent_std.cpu(), "latent_norm": run.norm})
    run.progress.saved = run.progress.step


def train(run, args, log_path, resume):
    """The step loop: log, progress grids from fixed noise, checkpoints; a stop signal saves and ends the run."""
    recipe, cfg, progress, rank, world = run.recipe, run.cfg, run.progress, run.rank, run.world
    run.shift = R.flow_shift(cfg.grid, cfg.latent_dim)
    g = torch.Generator().manual_seed(args.seed)                           # fixed progress-grid noise and labels
    show_noise = torch.randn(16, cfg.latent_dim, cfg.grid, cfg.grid, generator=g).to(run.device)
    show_labels = (torch.arange(16) % cfg.num_classes).to(run.device)
    if resume:
        R.set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    if rank == 0:
        print(f"DiT^DH-{recipe.model} {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params on a "
              f"{cfg.grid}x{cfg.grid}x{cfg.latent_dim} latent, {len(run.latents)} images, {run.total} steps of "
              f"{recipe.batch_size}, shift s={run.shift:.3f}, latents normalised {run.norm}, device {run.device}")
    bar = tqdm(total=run.total, initial=progress.step, disable=rank != 0, dynamic_ncols=True)
    t_last, s_last = time.time(), progress.step
    while progress.step < run.total and progress.step != args.stop_at:
        epoch, skip = divmod(progress.step, run.steps_per_epoch)           # a resumed epoch skips the batches it saw
        for rows, y in R.epoch_loader(run.latents, run.batch, epoch, args.seed, skip, rank, world, args.workers):
            lr = constant_then_linear_lr(progress.step / run.steps_per_epoch, recipe.lr, recipe.min_lr,
                                         recipe.decay_start_epoch, recipe.decay_end_epoch)
            values = update(run, rows, y, lr)
            progress.step = step = progress.step + 1
            bar.update(1)
            if step % args.log_every == 0 or step == run.total:
                values = R.global_mean(values, world)
                rate = (step - s_last) / (time.time() - t_last)
                t_last, s_last = time.time(), step
                if rank == 0:
                    R.log_json(log_path, {"step": step, "epoch": round(step / run.steps_per_epoch, 3), "lr": lr,
                                          **values, "steps_per_s": rate, "images_per_s": rate * recipe.batch_size})
                bar.set_postfix(loss=f"{values['loss']:.4f}")
            if rank == 0 and (step % args.image_every == 0 or step == run.total):
                with R.autocast(run.device):
                    zs = R.sample(run.ema, show_noise, show_labels, R.time_grid(recipe.sample_steps, run.shift))
                    R.save_grid(run.tok.decode(zs.float()), os.path.join(args.out, f"samples_{step:06d}.png"))
            stop = R.any_rank(progress.signal is not None, world)
            if stop or step == args.stop_at or step % args.ckpt_every == 0 or step == run.total:
                checkpoint(run, args)
            if stop:
                raise SystemExit(f"{progress.signal or 'a stop signal'} at step {step}: saved {progress.ckpt_path}; "
                                 "continue with --resume" if rank == 0 else 1)
            if step in (run.total, args.stop_at):
                break
    bar.close()


if __name__ == "__main__":
    R.run_cli(main, get_args)
