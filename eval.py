"""
eval.py: measure a RecTok tokenizer and generator the way the field does.

RecTok: Reconstruction Distillation along Rectified Flow (Shi et al., arXiv 2512.13421). The official
evaluation's protocols (utils/train_utils.py, through torch-fidelity): PSNR on the float reconstruction, rFID of
uint8 reconstructions, gFID and IS with the TF-ported FID Inception fed as torch-fidelity feeds it (the TF1
resize that made the ADM reference statistics; `--fid_input pytorch-fid` for pytorch-fid's), Frechet distance
in float64, IS over torch-fidelity's 10 splits. On the embedded shapes a small classifier, trained once, gives
the class accuracy of samples and a Frechet distance in its feature space.

  python eval.py recon --ckpt runs/quick_tok_ft/ckpt.pt                          # shapes: PSNR, SSIM, FD
  python eval.py recon --ckpt runs/tok/ckpt.pt --data_path IMAGENET/val          # rFID, PSNR, SSIM
  python eval.py stats --data_path IMAGENET/val --out val_256.npz                # reference mu, sigma
  python eval.py gen --samples samples.npz --ref_stats VIRTUAL_imagenet256_labeled.npz   # FID, IS
  python eval.py gen --samples runs/quick_dit/samples.npz --shapes               # class accuracy, FD
  python eval.py probe --ckpt runs/tok/ckpt.pt                                   # linear probe along the flow, PCA
"""
import argparse
import glob
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB, InceptionC,
                                         InceptionD, InceptionE)
from tqdm import tqdm

import rectok as R

# ----------------------------------------------------------------------------- the FID Inception


def _tf_avg_pool(x):  # the TF graph's 3x3 average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def forward(self, x):
        b5, b3 = self.branch5x5_2(self.branch5x5_1(x)), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(InceptionE):
    max_pool = False                                                       # the last block (Mixed_7c) max-pools

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], 1)


def tf1_resize(x, size=299):
    """Bilinear resize as TF1's resize_bilinear (align_corners=False), which made the ADM reference statistics
    and is torch-fidelity's: output pixel i samples input position i * in/out (no half-pixel offset), the
    upper neighbour clamped to the last row/column. x: (B, C, H, W) float."""
    for dim in (3, 2):                                                     # along x, then along y
        n = x.shape[dim]
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n / size)
        lo = pos.floor().long()
        w = (pos - lo).view([-1 if d == dim else 1 for d in range(4)])
        a, b = x.index_select(dim, lo), x.index_select(dim, (lo + 1).clamp_max(n - 1))
        x = a + (b - a) * w
    return x


class FIDInception(Inception3):
    """torchvision's Inception3 rebuilt as the TF FID graph (1008 classes, TF pooling), with pytorch-fid's (and
    torch-fidelity's) state-dict keys and features. forward: images (B, 3, H, W) holding uint8 values 0..255 ->
    pool features (B, 2048), logits_unbiased (B, 1008) for IS. input_path "tf1": torch-fidelity's resize and
    (x - 128) / 128; "pytorch-fid": its half-pixel bilinear resize of x / 255, then 2x - 1."""
    URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"

    def __init__(self, input_path="tf1"):
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7c.max_pool = True
        self.input_path = input_path

    def forward(self, x):
        if self.input_path == "tf1":
            x = (tf1_resize(x) - 128) / 128
        else:
            x = 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))     # (B, 64, 147, 147)
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))                         # (B, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))                    # (B, 768, 17, 17)
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))))     # (B, 1280, 8, 8)
        pool = self.avgpool(self.Mixed_7c(self.Mixed_7b(x))).flatten(1)                      # (B, 2048)
        return pool, pool @ self.fc.weight.T


def load_inception(path=None, input_path="tf1"):
    """Weights from a file, the torch hub cache or the URL. 'random': He-initialised, for tests only."""
    model = FIDInception(input_path)
    if path == "random":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    else:
        model.load_state_dict(R.load_weights(path, FIDInception.URL, os.path.basename(FIDInception.URL), "--inception"))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the metrics


def feature_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 without scipy: S1 S2 has the eigenvalues of
    the symmetric PSD sqrt(S1) S2 sqrt(S1). Round-off eigenvalues are zeroed, which keeps rank-deficient
    (few-sample) covariances exact where scipy's sqrtm drifts."""
    def clean(w):
        return np.where(w > w.max() * len(w) * np.finfo(np.float64).eps, w, 0.0)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(clean(w))) @ v.T
    m = root1 @ s2 @ root1
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    trace_root = np.sqrt(clean(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_root)


def checked_fd(feats, ref, against):
    """The Frechet distance of features (N, D) to reference (mu, sigma); a NaN or negative one is refused."""
    if len(feats) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 images, got {len(feats)}")
    mu, sigma = feature_stats(feats)
    fd = frechet_distance(mu, sigma, *ref)
    if not np.isfinite(fd) or fd < -1e-6 * (np.trace(sigma) + np.trace(ref[1]) + 1):
        raise ValueError(f"the Frechet distance against {against} came out {fd:.6g}: its sigma is not a covariance "
                         "(not positive semi-definite)")
    return max(fd, 0.0)


def inception_score(logits, splits=10, seed=2020):
    """torch-fidelity's IS: shuffle (fixed seed), split in 10, exp(E KL(p(y|x) || p(y))) per split -> mean, std."""
    if len(logits) < splits:
        raise ValueError(f"IS needs at least {splits} images (one per split), got {len(logits)}")
    logits = torch.as_tensor(logits).double()[np.random.RandomState(seed).permutation(len(logits))]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores, n = [], len(p)
    for k in range(splits):                                                # split k: [k*N//10, (k+1)*N//10)
        part_p, part_log = p[k * n // splits: (k + 1) * n // splits], log_p[k * n // splits: (k + 1) * n // splits]
        scores.append((part_p * (part_log - part_p.mean(0, keepdim=True).log())).sum(1).mean().exp().item())
    if not np.isfinite(scores).all():
        raise ValueError("IS came out NaN: the Inception logits are not finite")
    return float(np.mean(scores)), float(np.std(scores))


def psnr(x, y):
    """Per-image PSNR of images in [0, 1]; identical images give inf (they are reported, not averaged away)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def ssim(x, y):
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, per channel, images in [0, 1]."""
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5**2))
    w = (g[:, None] * g[None] / g.sum() ** 2).expand(3, 1, 11, 11).to(x)
    mu_x, mu_y = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    var_x, var_y = F.conv2d(x * x, w, groups=3) - mu_x**2, F.conv2d(y * y, w, groups=3) - mu_y**2
    cov = F.conv2d(x * y, w, groups=3) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=200, lr=1e-2):
    """Top-1 accuracy of a linear classifier (full-batch Adam, standardised features) trained on train_x.
    A per-token linear classifier whose logits are averaged over tokens (the official probe) is the same
    linear map applied to the token average, so features arrive pooled: (N, C)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mu) / sd, (val_x - mu) / sd
    head = nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (head(val_x).argmax(1) == val_y).float().mean().item()


# ----------------------------------------------------------------------------- the judges


class Standardise(nn.Module):
    """Resize to size (bilinear, antialiased), then each image to zero mean and unit variance."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)


def class_judge(size, device, idx_folder=None, num_classes=10, shapes=6000):
    """A small CNN trained once and cached, which names the class of images holding 0..255 and gives the features
    of FD. Embedded shapes: `shapes` of seed 0. MNIST-format data: the second half of the train split (the idx teacher
    trained on the first), each image seen at 16 px and standardised, so that it names a blurry or low-contrast
    sample by its shape (it names 84% of the held-out images as reconstructed by a 400-step tokenizer, 88% of the
    originals). Another architecture, seed and images than the teacher's; never a held-out image.
    -> (judge(x) -> (features (B, 128), logits), held-out accuracy)"""
    def make():                            # the shapes: strided convs; MNIST-format: standardised, max-pooled
        layers = [Standardise(16)] if idx_folder else []
        for i, o in ((3, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(i, o, 3, 1 if idx_folder else 2, 1), nn.BatchNorm2d(o), nn.GELU()]
            layers += [nn.MaxPool2d(2)] if idx_folder else []
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
    if idx_folder is None:
        key, seed, epochs = f"shapes_classifier_{size}px_{num_classes}", 0, 6
        held = R.Shapes(1000, size, num_classes, seed=1)
        train = lambda: R.shapes_batches(shapes, size, num_classes, seed=0)  # noqa: E731
    else:
        data, held = R.IdxImages(idx_folder, "train", size), R.IdxImages(idx_folder, "t10k", size)
        num_classes, seed, epochs = len(data.classes), 3, 3
        key, train = f"idx_judge_{size}px_{data.identity()['files']}", (lambda: data.half(1))
    net, acc = R.trained_classifier(make, lambda net, x: net(x * 0.5 + 0.5), key, train, held, seed, epochs, batch=100)
    body, head = net[:-1].to(device), net[-1].to(device)

    def score(x):
        feats = body(x / 255)                                              # (B, 128)
        return feats, head(feats)
    return score, acc


def judge(args, size, device):
    """The network that scores images holding uint8 values 0..255: the judge of the embedded shapes or of
    MNIST-format data, else the FID Inception."""
    idx = R.idx_folder(args.data_path) if args.data_path else None
    if args.shapes or idx or (args.data_path is None and args.mode != "gen"):
        return class_judge(size, device, idx)[0], "FD"
    return load_inception(args.inception, args.fid_input).to(device), "FID"


def metric_name(n, args, what):
    """'FID-50K (...)'; below 2,048 images a refusal, or with --allow_small a warning label; for the shapes, FD."""
    if what != "FID":
        return f"FD ({n} images, judge features)"
    path = "torch-fidelity input path" if args.fid_input == "tf1" else "pytorch-fid input path"
    if n < 2048:
        if not args.allow_small:
            raise ValueError(f"{n} images are too few for FID (2048 or more); --allow_small computes it anyway")
        return f"FID-{n} ({path}; fewer than 2048 images: NOT comparable with published FID)"
    return f"FID-{n / 1000:g}K ({path})"


# ----------------------------------------------------------------------------- reading the inputs


def load_npz(path, what):
    """An .npz's arrays (no pickled objects); a file that is not one is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except FileNotFoundError:
        raise
    except Exception as e:                                                 # zip, pickle and format errors alike
        raise ValueError(f"{what} {path} cannot be read as an .npz of plain arrays ({type(e).__name__}: {e})") from e


def load_ref(path):
    """Reference statistics: an .npz with mu (2048,) and sigma (2048, 2048), e.g. adm_in256_stats.npz; finite,
    with a symmetric, positive semi-definite sigma."""
    d = load_npz(path, "reference statistics")
    if "mu" not in d or "sigma" not in d or d["mu"].shape != (2048,) or d["sigma"].shape != (2048, 2048):
        raise ValueError(f"{path} holds no Inception reference statistics (mu (2048,), sigma (2048, 2048))")
    mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"reference statistics {path} hold NaN or infinite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * np.abs(sigma).max()):
        raise ValueError(f"reference statistics {path}: sigma is not symmetric, so it is no covariance")
    low, high = np.linalg.eigvalsh(sigma)[[0, -1]]
    if low < -1e-4 * max(high, 0.0):                                       # beyond float32 round-off
        raise ValueError(f"reference statistics {path}: sigma has a negative eigenvalue ({low:.3g}): it is not "
                         "positive semi-definite, so it is no covariance")
    return mu, sigma


def load_samples(path):
    """uint8 (N, H, W, 3) and labels (or None) from an .npz (arr_0, labels) or a folder of PNGs (classK in the name)."""
    if path.endswith(".npz"):
        d = load_npz(path, "samples")
        if "arr_0" not in d:
            raise ValueError(f"{path} has no arr_0 (the samples); it holds {list(d)}")
        images, labels = d["arr_0"], d.get("labels")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.png")))
        if not files:
            raise ValueError(f"no .npz and no PNG files at {path}")
        images = [np.array(Image.open(f).convert("RGB")) for f in files]
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"the PNGs in {path} differ in size")
        found = [re.search(r"class(\d+)", os.path.basename(f)) for f in files]
        images, labels = np.stack(images), np.array([int(m.group(1)) for m in found]) if all(found) else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"{path}: samples must be uint8 (N, H, W, 3) in 0..255, got {images.dtype} {images.shape}")
    return images, labels


def uint8_values(img):
    """Images in [-1, 1] that came from uint8 files -> their 0..255 values (float)."""
    return ((img.float() + 1) * 127.5).round()


@torch.no_grad()
def gather(batches, step, empty="none of the images could be read"):
    """step(batch) for every readable batch (None: unreadable) -> its outputs, each concatenated over the batches."""
    out = [[t.cpu() for t in step(b)] for b in batches if b is not None]
    if not out:
        raise ValueError(empty)
    return [torch.cat(parts) for parts in zip(*out)]


def features(net, batches, device):
    """The judge's (features, logits) of batches of images holding uint8 values 0..255, in float64."""
    return [f.double() for f in gather(batches, lambda x: net(x.to(device).float()))]


# ----------------------------------------------------------------------------- the four evaluations


@torch.no_grad()
def recon(args, device):
    """PSNR and SSIM of the float reconstructions of held-out images (as official), rFID (FD) of their uint8 values."""
    tok = R.load_model(args.ckpt, "tokenizer").to(device).eval()
    data = R.dataset_from_args(args, tok.cfg.img_size, train=False)
    net, what = judge(args, tok.cfg.img_size, device)
    metric_name(min(args.num_images or len(data), len(data)), args, what)  # refuses small FID before the work
    ref = load_ref(args.ref_stats) if args.ref_stats else None

    def step(batch):
        img = batch[0].to(device)
        with R.autocast(device):
            rec = tok.reconstruct(img).float()                             # posterior mean -> [0, 1]
        real = img * 0.5 + 0.5
        f_rec, logits = net((rec * 255).to(torch.uint8).float())          # uint8 by truncation, as official
        return (torch.stack([psnr(rec, real), ssim(rec, real)], 1), net(uint8_values(img))[0], f_rec,
                logits.argmax(1).cpu() == batch[1])
    loader = R.pass_loader(data, args.batch_size, args.workers, args.num_images, what="reconstruction")
    scores, feats_real, feats_rec, correct = gather(tqdm(loader, desc="reconstructing"), step)
    fd = checked_fd(feats_rec, ref or feature_stats(feats_real), args.ref_stats or "the originals")
    n = len(correct)
    print(f"reconstruction of {n} held-out images ({args.data_path or 'embedded shapes, seed 1'}), EMA weights")
    print(f"  PSNR {scores[:, 0].mean():.2f} dB   SSIM {scores[:, 1].mean():.4f}   r{metric_name(n, args, what)} "
          f"vs {os.path.basename(args.ref_stats) if args.ref_stats else 'the originals'}: {fd:.3f}")
    if what != "FID":
        print(f"  reconstructions classified as their class: {correct.float().mean():.1%}")
    return {"psnr": scores[:, 0].mean().item(), "ssim": scores[:, 1].mean().item(), "fd": fd}


@torch.no_grad()
def stats(args, device):
    """The reference mu and sigma of the Inception features of an image folder."""
    data = R.ImageFolderSubset(args.data_path, args.img_size, args.num_classes, args.images_per_class)
    net = load_inception(args.inception, args.fid_input).to(device)
    loader = R.pass_loader(data, args.batch_size, args.workers, args.num_images, what="reference statistics")
    pool = gather(tqdm(loader, desc="inception features"), lambda b: net(uint8_values(b[0]).to(device)))[0]
    if len(pool) < 2:
        raise ValueError(f"reference statistics need at least 2 readable images, got {len(pool)}")
    mu, sigma = feature_stats(pool)
    R.atomic_write(args.out, lambda f: np.savez(f, mu=mu, sigma=sigma))
    print(f"reference statistics of {len(pool)} images ({args.data_path}, ADM crop {args.img_size}, "
          f"{'torch-fidelity' if args.fid_input == 'tf1' else 'pytorch-fid'} input path) -> {args.out}")
    return args.out


@torch.no_grad()
def gen(args, device):
    """FID and IS of samples against reference statistics; on the shapes or MNIST-format data the judge's class
    accuracy and FD against held-out real images."""
    idx = R.idx_folder(args.data_path) if args.data_path else None
    if args.shapes and args.data_path:
        raise ValueError("--shapes judges the embedded shapes; --data_path names other data: pass one")
    if args.data_path and not idx:
        raise ValueError(f"gen judges samples of MNIST-format data (--data_path) or of the embedded shapes (--shapes); "
                         f"for {args.data_path} make reference statistics with eval.py stats and pass --ref_stats")
    images, labels = load_samples(args.samples)
    if not (args.shapes or idx or args.ref_stats):
        raise ValueError("gen needs --ref_stats (adm_in256_stats.npz, the ADM reference batch, or eval.py stats), "
                         "--shapes, or --data_path MNIST_FOLDER")
    n, size = len(images), images.shape[1]
    real = R.Shapes(max(n, 1000), size, seed=1) if args.shapes else R.IdxImages(idx, "t10k", size) if idx else None
    if real and labels is not None and (labels.shape != (n,) or labels.min() < 0 or labels.max() >= len(real.classes)):
        raise ValueError(f"{args.samples}: need one label per sample in [0, {len(real.classes) - 1}], "
                         f"got {labels.shape} in [{labels.min()}, {labels.max()}]")
    ref = None if real else load_ref(args.ref_stats)
    net, what = judge(args, size, device)
    name = metric_name(n, args, what)                                      # refuses small FID before the work
    batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(args.batch_size)   # (B, 3, H, W) uint8
    feats, logits = features(net, tqdm(batches, desc="features"), device)
    if what == "FID":
        fid, (is_mean, is_std) = checked_fd(feats, ref, args.ref_stats), inception_score(logits)
        print(f"{name} vs {os.path.basename(args.ref_stats)}: {fid:.3f}   IS: {is_mean:.2f} +- {is_std:.2f}")
        return {"fid": fid, "is": is_mean}
    real_feats = features(net, (uint8_values(x) for x, _ in torch.utils.data.DataLoader(real, 250)), device)[0]
    fd = checked_fd(feats, feature_stats(real_feats), f"{len(real)} held-out real images")
    acc = (logits.argmax(1).numpy() == labels).mean() if labels is not None else float("nan")
    print(f"{'embedded shapes' if args.shapes else idx}, {n} samples: class accuracy {acc:.1%} (the judge's class "
          f"vs the conditioning label)   {name} vs {len(real)} held-out real images: {fd:.3f}")
    return {"accuracy": float(acc), "fd": fd}


@torch.no_grad()
def latents_along_flow(tok, data, args, device, g, what):
    """Token-averaged x_t = t mu + (1 - t) eps of the posterior mean (unnormalised, as FSD sees it) -> [one (N, C)
    per probe t, ..., labels (N,)]."""
    def step(batch):
        mu = tok.encode(batch[0].to(device))[0].cpu()                      # (B, L, C)
        eps = torch.randn(mu.shape, generator=g)
        return *[(t * mu + (1 - t) * eps).mean(1) for t in args.probe_ts], batch[1]
    loader = R.pass_loader(data, args.batch_size, args.workers, args.num_images, what=what)
    return gather(tqdm(loader, desc=what), step, f"{what}: none of the images could be read")


@torch.no_grad()
def pca_picture(tok, images, ts, path, g):
    """The latent as a picture (as on the paper's project page): the first three principal components of the
    tokens as RGB, fitted on the clean tokens of these images and applied to x_t at each t, each column
    stretched to the full colour range. Rows: images; columns: the image, then t = ts."""
    mu = tok.encode(images)[0].cpu()                                       # (n, L, C)
    basis = torch.linalg.svd(mu.flatten(0, 1) - mu.flatten(0, 1).mean(0), full_matrices=False).Vh[:3].T  # (C, 3)
    cols = [images.cpu() * 0.5 + 0.5]
    for t in ts:
        pc = (t * mu + (1 - t) * torch.randn(mu.shape, generator=g)) @ basis   # (n, L, 3)
        pc = (pc - pc.amin((0, 1))) / (pc.amax((0, 1)) - pc.amin((0, 1))).clamp_min(1e-8)
        maps = pc.transpose(1, 2).unflatten(2, (tok.grid, tok.grid))     # (n, 3, h, w)
        cols.append(F.interpolate(maps, size=images.shape[-1], mode="nearest"))
    R.save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=len(cols))


@torch.no_grad()
def probe(args, device):
    """Linear probing of the latent at the clean latent and along the flow, trained and tested at the same t
    (the paper's probing table), and the PCA picture of the latent along the flow."""
    tok = R.load_model(args.ckpt, "tokenizer").to(device).eval()
    train = R.dataset_from_args(args, tok.cfg.img_size, train=True, n=args.train_images)
    val = (R.dataset_from_args(args, tok.cfg.img_size, train=False) if not args.val_path else
           R.ImageFolderSubset(args.val_path, tok.cfg.img_size, train.classes, args.images_per_class))
    g = torch.Generator().manual_seed(0)
    *train_x, train_y = latents_along_flow(tok, train, args, device, g, "probe train")
    *val_x, val_y = latents_along_flow(tok, val, args, device, g, "probe val")
    K = len(train.classes)
    if len(train_y) < 2 or not len(val_y):
        raise ValueError(f"a probe needs at least 2 training and 1 held-out readable images, got {len(train_y)} and "
                         f"{len(val_y)}")
    with torch.enable_grad():
        accs = {t: linear_probe(train_x[i], train_y, val_x[i], val_y, K) for i, t in enumerate(args.probe_ts)}
    print(f"linear probe, {len(train_y)} train / {len(val_y)} val images, {K} classes (chance {1 / K:.1%}):")
    print("  " + "   ".join(f"t={t:g}: {a:.1%}" for t, a in accs.items()))
    shown = [item[0] for item in map(val.__getitem__, R.spread_subset(val.labels, 8).tolist()) if item is not None]
    pca_picture(tok, torch.stack(shown).to(device), args.probe_ts, args.out, g)
    print(f"PCA of the latent tokens at t = {', '.join(f'{t:g}' for t in args.probe_ts)} -> {args.out}")
    return accs


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["recon", "stats", "gen", "probe"])
    p.add_argument("--ckpt", help="tokenizer checkpoint (recon, probe)")
    p.add_argument("--samples", help="gen: samples .npz or folder of PNGs")
    p.add_argument("--ref_stats", help="reference statistics .npz with mu and sigma")
    p.add_argument("--shapes", action="store_true", help="gen: samples of the embedded shapes (classifier metrics)")
    p.add_argument("--out", help="stats: output .npz; probe: the PCA picture (default: probe_pca.png beside --ckpt)")
    p.add_argument("--data_path", help="image folder (default: the embedded shapes)")
    p.add_argument("--val_path", help="probe: labelled validation folder")
    p.add_argument("--num_classes", type=R.POS_INT)
    p.add_argument("--class_list")
    p.add_argument("--images_per_class", type=R.POS_INT)
    p.add_argument("--train_images", type=R.POS_INT, help="probe: train on N images spread over the classes (the "
                   "embedded shapes: render N, default 4,000); default: all")
    p.add_argument("--num_images", type=R.POS_INT, help="use N images, a seeded random subset spread over the classes")
    p.add_argument("--img_size", type=R.POS_INT, default=256, help="stats: ADM centre-crop size")
    p.add_argument("--probe_ts", type=R.FRACTION, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache or URL)")
    p.add_argument("--fid_input", choices=["tf1", "pytorch-fid"], default="tf1", help="FID input path: "
                   "torch-fidelity's TF1 resize (the official evaluation, ADM reference statistics) or pytorch-fid's")
    p.add_argument("--allow_small", action="store_true", help="compute FID on fewer than 2048 images")
    p.add_argument("--batch_size", type=R.POS_INT, default=50)
    p.add_argument("--workers", type=R.NONNEG_INT, default=0)
    return p.parse_args(argv)


def main(args):
    needs = {"recon": "ckpt", "probe": "ckpt", "gen": "samples", "stats": "data_path"}
    if getattr(args, needs[args.mode]) is None or (args.mode == "stats" and not args.out):
        also = " and --out" if args.mode == "stats" else ""
        raise ValueError(f"eval.py {args.mode} needs --{needs[args.mode]}{also}")
    if args.mode == "probe" and args.data_path and not (args.val_path or R.idx_folder(args.data_path)):
        raise ValueError("probe on a folder needs --val_path VAL_FOLDER")
    if args.mode == "probe" and not args.out:
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "probe_pca.png")
    if args.out:
        R.not_an_input(args.out, [args.ckpt, args.samples, args.ref_stats, args.inception, args.class_list])
        R.writable(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"recon": recon, "stats": stats, "gen": gen, "probe": probe}[args.mode](args, device)


if __name__ == "__main__":
    R.run_cli(main, get_args)
