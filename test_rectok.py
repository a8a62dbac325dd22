"""
test_rectok.py: the invariants a reader of rectok.py relies on, parity with the official code, and the
scripts end to end. RecTok (arXiv 2512.13421). CPU only, tiny models, about a minute:

  python -m pytest -q test_rectok.py
"""
import dataclasses
import errno
import gzip
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rectok as R

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures", "official_parity.pt")
warnings.filterwarnings("ignore", message="teacher .* with random weights")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


torch.set_num_threads(1)  # the fixture was computed single-threaded, and runs compared bit for bit must match


def tiny_tokenizer(teacher_dim=24):
    return R.RecTok(R.TokenizerConfig(32, 8, 4, (32, 1, 2), (32, 1, 2), (32, 1, 2), teacher_dim))


# ----------------------------------------------------------------------------- parity with the official code

def test_tokenizer_parity(fx):
    tok = R.convert_official_tokenizer(fx["tok_state_dict"], heads={64: 2}).eval()
    with torch.no_grad():
        mean, logvar = tok.encode(fx["tok_x"])
        outs = {"tok_moments": tok.encoder(fx["tok_x"]), "tok_mean": mean, "tok_logvar": logvar,
                "tok_decoded": tok.decoder(fx["tok_mean"]),
                "tok_decoded_masked": tok.decoder(fx["tok_zt_visible"], fx["tok_ids_restore"]),
                "tok_sem_masked": tok.sem_decoder(fx["tok_zt_visible"], fx["tok_ids_restore"]),
                "tok_enc_masked_moments": tok.encoder(fx["tok_x"], fx["tok_enc_ids_keep"])}
    for key, out in outs.items():
        assert (out - fx[key]).abs().max() < 1e-5, key
    torch.manual_seed(fx["tok_enc_mask_seed"])                             # same draw, same masks
    ids_keep, ids_restore = R.random_masking(2, 64, 48)
    assert torch.equal(ids_keep, fx["tok_enc_ids_keep"]) and torch.equal(ids_restore, fx["tok_enc_ids_restore"])
    assert torch.allclose(torch.cat(list(tok.encoder.rope), dim=1), fx["tok_rope"], atol=1e-6)
    # The official noise level tau = 1 - t; its shift s_c = alpha = 1/s, and t = shift_s(1 - u) for the same u.
    tau = 1 - R.shift_time(1 - fx["tok_u"], 1 / fx["tok_timestep_shift"])
    assert torch.allclose(tau, fx["tok_tau"], atol=1e-6)


def test_dit_parity(fx):
    dit = R.convert_official_dit(fx["dit_state_dict"], heads={64: 2, 96: 2}).eval()
    with torch.no_grad():
        assert (dit(fx["dit_x"], fx["dit_t"], fx["dit_y"]) - fx["dit_v"]).abs().max() < 1e-5
        v_cfg = R.guided_velocity(dit, fx["dit_x"], fx["dit_t"], fx["dit_y"], cfg=fx["dit_cfg_scale"])
        assert (v_cfg - fx["dit_v_cfg"][:2]).abs().max() < 1e-5
        # The tiny fixture model has h*w*C < 4096, where the official DiT skips its training shift and warps
        # its grid the other way; our one shift formula is checked on the released models' shift (sqrt 8)
        # instead, and the samplers get the fixture's own grid.
        assert (R.time_grid(5, 1 / fx["dit_ref_shift"]) - fx["dit_grid_ref"]).abs().max() < 1e-6
        assert (R.shift_time(1 - fx["dit_u"], 1 / fx["dit_ref_shift"]) - fx["dit_t_train_ref"]).abs().max() < 1e-6
        for cfg, key in ((1.0, "dit_sample"), (fx["dit_cfg_scale"], "dit_sample_cfg")):
            x = R.sample(dit, fx["dit_noise"], fx["dit_y"], fx["dit_grid"], cfg=cfg)
            assert (x - fx[key]).abs().max() < 1e-5, key


def test_official_checkpoint_files(tmp_path, fx):
    # A released-style file: {"model": ..., "model_ema": ...}; the EMA is what load_* picks.
    sd = fx["dit_state_dict"]
    torch.save({"model": sd, "model_ema": {k: v + 1 for k, v in sd.items() if "rope" not in k and "pos_embed" not in k
                                           and "t_embedder.W" not in k}}, tmp_path / "dit.pth")
    with pytest.raises(ValueError, match="heads"):                         # width 64 is no official size
        R.load_model(str(tmp_path / "dit.pth"), "dit")
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        R.load_checkpoint(str(tmp_path / "dit.pth"), "tokenizer")


# ----------------------------------------------------------------------------- building blocks and tokenizer

def test_rope_tables():
    D, G = 8, 4
    rope = R.tokenizer_rope(D, G)                                          # closed form of the official recipe
    f = 7.0 * (7.0 / 7e-4) ** (-torch.arange(D // 4) / (D // 4 - 1))
    for n, c in [(5, 1), (15, 3), (7, 6)]:
        i, j = divmod(n, G)
        ang = 2 * math.pi * (i / (G - 1) * f[c % (D // 4)] if c < D // 2 else j / (G - 1) * f[(c - D // 2) % (D // 4)])
        assert abs(rope[0, n, c] - math.cos(ang)) < 1e-5 and abs(rope[1, n, c] - math.sin(ang)) < 1e-5
    x = torch.randn(1, 1, G * G, D)                                        # the DiT's is a true rotation
    assert torch.allclose(R.apply_rope(x, R.dit_rope(D, G)).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_unpatchify_and_shapes():
    p, img = 4, torch.randn(2, 3, 8, 12)
    patches = img.view(2, 3, 2, p, 3, p).permute(0, 3, 5, 1, 2, 4).reshape(2, p * p * 3, 2, 3)  # channel (p1, p2, c)
    assert torch.equal(R.unpatchify(patches, p), img)
    tok = tiny_tokenizer()
    recon, sem, kl = tok(torch.randn(2, 3, 32, 32), mask_ratio=0.4)
    assert recon.shape == (2, 3, 32, 32) and sem.shape == (2, 16, 24) and kl.ndim == 0
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):   # RMSNorm on its fused fp32 path:
        warnings.simplefilter("error")                                     # no "Mismatch dtype" fallback warning
        assert R.RMSNorm(8)(torch.randn(2, 8).bfloat16()).dtype == torch.float32


def test_masking_restores_grid():
    torch.manual_seed(0)
    ids_keep, ids_restore = R.random_masking(3, 16, 10)
    tokens = torch.randn(3, 16, 5)
    visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, 5))
    dec = tiny_tokenizer().decoder
    dec.embed = torch.nn.Identity()                                        # look at the restored sequence itself
    dec.mask_token = torch.nn.Parameter(torch.full((1, 1, 5), 99.0))
    dec.body = lambda x: x
    restored = dec.restore(visible, ids_restore)
    masked = torch.ones(3, 16, dtype=torch.bool).scatter(1, ids_keep, False)
    assert torch.equal(restored[~masked], tokens[~masked]) and (restored[masked] == 99).all()
    assert torch.equal(ids_restore.argsort(1)[:, :10], ids_keep)          # ids_restore inverts the shuffle


def test_shift_and_time_grid():
    s = 1 / math.sqrt(8)
    u = torch.rand(1000, dtype=torch.float64)
    assert torch.allclose(R.shift_time(u, s), 1 - R.shift_time(1 - u, 1 / s))  # the two official forms agree
    assert abs(R.shift_time(torch.tensor(0.5), s) - 1 / (1 + math.sqrt(8))) < 1e-6  # median 0.261
    torch.manual_seed(0)
    assert abs((R.sample_t(200_000, s) > 0.5).float().mean() - 1 / (1 + math.sqrt(8))) < 0.005
    grid = R.time_grid(149, s)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert abs(grid[1] - 0.0024) < 1e-4 and abs(1 - grid[-2] - 0.0188) < 1e-4  # method.md's step sizes
    assert R.flow_shift(16, 128) == pytest.approx(s)


def test_fsd_rad_by_hand(monkeypatch):
    """Both decoders get the same x_t = t z + (1 - t) eps of the posterior sample; the losses equal their formulas."""
    tok = tiny_tokenizer()
    seen = {}
    pixels, features = torch.zeros(2, 3, 32, 32), torch.zeros(2, 16, 24)
    monkeypatch.setattr(tok.decoder, "forward", lambda z, ids: seen.setdefault("pix", (z, ids)) and pixels)
    monkeypatch.setattr(tok.sem_decoder, "forward", lambda z, ids: seen.setdefault("sem", (z, ids)) and features)
    img = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    tok(img, mask_ratio=0.25)
    torch.manual_seed(1)                                                   # replay the draws by hand
    ids_keep, ids_restore = R.random_masking(2, 16, 12)
    mean, logvar = tok.encode(img, ids_keep)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    t = R.sample_t(2, tok.shift)[:, None, None]
    x_t = t * z + (1 - t) * torch.randn_like(z)
    assert torch.allclose(seen["pix"][0], x_t) and seen["sem"][0] is seen["pix"][0]
    assert torch.equal(seen["pix"][1], ids_restore)
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.allclose(R.semantic_loss(a, b), (1 - cos).mean())
    m, lv = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(R.kl_divergence(m, lv), 0.5 * (m**2 + lv.exp() - 1 - lv).sum() / 2)
    ratios = torch.tensor([R.sample_mask_ratio() for _ in range(4000)])
    assert abs((ratios == 0).float().mean() - 0.2) < 0.03 and ratios.max() <= 0.4


def test_overfit_one_batch():
    torch.manual_seed(0)
    tok = R.RecTok(R.TokenizerConfig(32, 8, 8, (64, 2, 2), (64, 2, 2), (32, 1, 2), 0))
    img = torch.stack([R.Shapes(8, 32)[i][0] for i in range(8)])
    opt = torch.optim.AdamW(tok.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        recon, _, kl = tok(img, noise=False)
        loss = F.mse_loss(recon * 0.5 + 0.5, img * 0.5 + 0.5) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- DiT, flow and sampler

def tiny_dit(num_classes=3):
    dit = R.DiTDH(R.DiTConfig(4, 4, num_classes, 1, (32, 1, 2), (48, 1, 2)))
    nudge(dit)                                                             # leave adaLN-Zero's identity start
    return dit.eval()


def nudge(model):
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))


def test_samplers_and_guidance():
    x0, x1, c = torch.randn(3, 2, 4, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    to_x1 = lambda x, t, y: (x1 - x) / (1 - t.view(-1, 1, 1, 1))          # noqa: E731 exact field towards x1
    assert torch.allclose(R.sample(to_x1, x0, y, R.time_grid(7, 0.5)), x1, atol=1e-5)  # Euler lands on x1
    linear_in_t = lambda x, t, y: t.view(-1, 1, 1, 1) * c                 # noqa: E731 x(1) = x0 + c/2
    assert torch.allclose(R.sample(linear_in_t, x0, y, R.time_grid(5, 0.5), "heun"), x0 + c / 2, atol=1e-5)
    assert not torch.allclose(R.sample(linear_in_t, x0, y, R.time_grid(5, 0.5), "euler"), x0 + c / 2, atol=1e-3)
    dit, x, t, y = tiny_dit(), torch.randn(2, 4, 4, 4), torch.tensor([0.3, 0.8]), torch.tensor([0, 2])
    with torch.no_grad():
        v = dit(x, t, y)
        assert torch.allclose(R.guided_velocity(dit, x, t, y, cfg=1.0), v)
        assert torch.allclose(R.guided_velocity(dit, x, t, y, cfg=3.0, bad_model=dit), v, atol=1e-6)
        v_null = dit(x, t, torch.full_like(y, 3))
        assert torch.allclose(R.guided_velocity(dit, x, t, y, cfg=2.0), 2 * v - v_null, atol=1e-5)
        off = R.guided_velocity(dit, x, t, y, cfg=2.0, interval=(0.5, 1.0))  # guided only where t in [0.5, 1]
        assert torch.allclose(off[0], v[0], atol=1e-6) and not torch.allclose(off[1], v[1], atol=1e-4)


def test_flow_matching_loss_by_hand():
    dit, z, y = tiny_dit(), torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    loss = R.flow_matching_loss(dit, z, y, 0.5, 3, label_drop=0.5)
    torch.manual_seed(5)
    t = R.sample_t(3, 0.5)
    eps = torch.randn_like(z)
    y_drop = torch.where(torch.rand(3) < 0.5, 3, y)
    x_t = t.view(3, 1, 1, 1) * z + (1 - t.view(3, 1, 1, 1)) * eps
    assert torch.allclose(loss, ((dit(x_t, t, y_drop) - (z - eps)) ** 2).mean())


# ----------------------------------------------------------------------------- data and checkpoints

def test_image_folder_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.ImageFolderSubset(str(tmp_path / "nowhere"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        R.ImageFolderSubset(str(tmp_path / "empty"), 32)
    root = make_image_folder(tmp_path / "data")
    ds = R.ImageFolderSubset(str(root), 32)
    assert ds.classes == ["a", "b"]                                        # .ipynb_checkpoints is no class
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                   # a 40x50 image is now a "decompression bomb"
    with pytest.warns(UserWarning, match="skipping unreadable"):
        items = [ds[i] for i in range(len(ds))]
    names = [os.path.basename(p) for p, _ in ds.samples]
    unreadable = sorted(os.path.basename(p) for p in ds.unreadable)
    assert unreadable == ["bomb.png", "dangling.png", "empty.jpg", "text.jpeg", "truncated.jpg"]
    kept = {n: x for n, item in zip(names, items) if item is not None for x in [item[0]]}
    assert all(x.shape == (3, 32, 32) and -1 <= x.min() <= x.max() <= 1 for x in kept.values())
    grey = lambda n: ((kept[n][0].mean() + 1) * 127.5).item()               # noqa: E731 mean grey level
    assert abs(grey("grey16.png") - 128) < 2 and abs(grey("float.tif") - 128) < 2   # 16-bit and float images: mid-grey
    batch = R.collate(items[:4])                                           # unreadable ones drop out, with their labels
    assert len(batch[0]) == len(batch[1]) == sum(item is not None for item in items[:4])
    assert len(R.ImageFolderSubset(str(root), 32, classes=["b"])) == 6
    assert len(R.ImageFolderSubset(str(root), 32, per_class=1)) == 2
    with pytest.raises(ValueError, match="not found"):
        R.ImageFolderSubset(str(root), 32, classes=["zebra"])
    (root / "c").mkdir()                                                   # an empty class would shift the labels
    with pytest.raises(ValueError, match="class folder .*c' holds no images"):
        R.ImageFolderSubset(str(root), 32)


def make_image_folder(root):
    """Two classes; greyscale, CMYK, RGBA, palette, 16-bit and float images, plus a truncated JPEG, an empty
    file, text, a hidden folder, and bomb.png, too large to decode once PIL's pixel limit is lowered."""
    for c in ("a", "b", ".ipynb_checkpoints"):
        (root / c).mkdir(parents=True)
    rgb = Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8))
    for name, image in (("a/rgb.png", rgb), ("a/grey.png", rgb.convert("L")), ("a/cmyk.jpg", rgb.convert("CMYK")),
                        ("b/rgba.png", rgb.convert("RGBA")), ("b/palette.png", rgb.convert("P")),
                        (".ipynb_checkpoints/x.png", rgb), ("a/bomb.png", rgb.resize((100, 100)))):
        image.save(root / name)
    Image.fromarray(np.full((40, 50), 32896, np.uint16)).save(root / "a" / "grey16.png")   # 16-bit mid-grey
    Image.fromarray(np.full((40, 50), 0.5, np.float32)).save(root / "b" / "float.tif")     # float mid-grey
    rgb.save(root / "b" / "full.jpg")
    (root / "b" / "truncated.jpg").write_bytes((root / "b" / "full.jpg").read_bytes()[:200])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.jpeg").write_text("not an image")
    os.remove(root / "b" / "full.jpg")
    os.symlink(root / "b" / "gone.png", root / "b" / "dangling.png")       # a link to nothing
    return root


def test_subsets_spread_over_classes():
    labels = torch.arange(20).repeat_interleave(50)                        # a class-ordered folder: 20 classes x 50
    idx = R.spread_subset(labels, 40, seed=3)
    assert len(set(idx.tolist())) == 40 and torch.bincount(labels[idx], minlength=20).tolist() == [2] * 20
    assert not torch.equal(idx, R.spread_subset(labels, 40, seed=4))
    assert torch.equal(idx, R.spread_subset(labels, 40, seed=3))
    assert torch.equal(R.spread_subset(labels, None), torch.arange(1000))


def test_atomic_writes_on_a_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    R.save_checkpoint(path, {"kind": "x", "step": 1})
    def full_disk(state, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="could not write .*No space left on device"):
        R.save_checkpoint(path, {"kind": "x", "step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True)["step"] == 1
    with pytest.raises(ValueError, match="non-finite weights"):
        R.save_checkpoint(path, {"kind": "x", "model": {"w": torch.tensor([float("nan")])}})


def test_checkpoint_roundtrip(tmp_path):
    tok = tiny_tokenizer()
    tok.latent_mean.fill_(0.5)
    path = str(tmp_path / "tok.pt")
    R.save_checkpoint(path, {"kind": "tokenizer", "config": dataclasses.asdict(tok.cfg), "model": tok.state_dict(),
                             "ema": tok.state_dict()})
    assert os.listdir(tmp_path) == ["tok.pt"]                             # no temporary file left
    back = R.load_model(path, "tokenizer")                                # torch.load(..., weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), tok.state_dict().values()))
    with pytest.raises(ValueError, match="not a dit checkpoint"):
        R.load_model(path, "dit")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        R.load_checkpoint(str(tmp_path / "junk.pt"), "tokenizer")


# ----------------------------------------------------------------------------- the scripts end to end

import eval as evaluate  # noqa: E402
import sample  # noqa: E402
import train_dit  # noqa: E402
import train_tokenizer  # noqa: E402

TOK = ["--preset", "quick", "--teacher", "random", "--img_size", "32", "--encoder", "micro", "--decoder", "micro",
       "--batch_size", "8", "--train_images", "32", "--log_every", "1", "--image_every", "2", "--ckpt_every", "2",
       "--stats_images", "16", "--gan_weight", "0.1", "--gan_start_epoch", "0"]
DIT = ["--preset", "quick", "--patch_size", "1", "--batch_size", "8", "--train_images", "32", "--log_every", "1",
       "--image_every", "2", "--ckpt_every", "2", "--sample_steps", "2"]


def run(script, flags, out, *extra):
    return script.main(script.get_args([*flags, "--out", str(out), *extra]))


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    os.environ["TORCH_HOME"] = str(root / "torch_home")
    torch.hub.set_dir(str(root / "torch_home" / "hub"))
    tok = run(train_tokenizer, TOK, root / "tok", "--steps", "4")
    evaluate.class_judge(32, "cpu", shapes=1000)                          # a cheaper shapes judge, cached for all tests
    return root, tok


def log_steps(folder):
    return [json.loads(line)["step"] for line in open(folder / "log.jsonl")]


def test_tokenizer_script_resumes_exactly(runs, tmp_path, capsys):
    root, full = runs
    run(train_tokenizer, TOK, tmp_path, "--steps", "4", "--stop_at", "2")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    with open(tmp_path / "log.jsonl", "a") as f:                           # logged after the checkpoint, then a kill
        f.write('{"step": 3, "loss": 0.1}\n{"step": 4, "lo')
    run(train_tokenizer, TOK, tmp_path, "--steps", "4", "--resume")
    a, b = torch.load(full, weights_only=True), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("model", "ema", "disc"):
        assert same_state(a[key], b[key]), key
    assert log_steps(tmp_path) == [1, 2, 3, 4]                              # each step logged once
    log = [json.loads(line) for line in open(root / "tok" / "log.jsonl")]
    assert {"pixel", "kl", "semantic", "gan", "disc", "lr", "grad_norm", "steps_per_s"} <= log[-1].keys()
    assert os.path.exists(root / "tok" / "recon_000004.png")
    # The teacher is never saved: no teacher weights in any state dict, only the semantic decoder's output width.
    assert not any("teacher" in k or k.startswith("model.") for k in a["model"])
    assert a["model"]["sem_decoder.out.weight"].shape[0] == a["config"]["teacher_dim"] == 384
    assert (a["ema"]["latent_std"] != 1).all()                             # statistics measured and stored
    # A rerun never destroys a run: without a flag it refuses, --resume on a finished run does nothing.
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run: pass --resume .* or --overwrite"):
        run(train_tokenizer, TOK, tmp_path, "--steps", "2")
    run(train_tokenizer, TOK, tmp_path, "--steps", "4", "--resume")
    assert "finished run (step 4 of 4)" in capsys.readouterr().out
    assert (tmp_path / "ckpt.pt").read_bytes() == before and log_steps(tmp_path) == [1, 2, 3, 4]
    run(train_tokenizer, TOK, tmp_path, "--steps", "2", "--overwrite")   # deliberately starting over
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2 and log_steps(tmp_path) == [1, 2]


def nan_gradient(loss_fn):
    """The same loss with a finite value but NaN gradients (d sqrt(x) / dx at 0 is inf, times 0)."""
    return lambda *a, **k: (lambda out: out + torch.sqrt(0 * out))(loss_fn(*a, **k))


def test_decoder_finetune_and_nan_gradients(runs, tmp_path, monkeypatch):
    root, stage1 = runs
    ft = run(train_tokenizer, TOK, tmp_path / "ft", "--decoder_finetune", "--init_from", stage1, "--steps", "2")
    a, b = torch.load(stage1, weights_only=True), torch.load(ft, weights_only=True)
    assert not any(k.startswith("sem_decoder") for k in b["model"])
    enc = [k for k in b["model"] if k.startswith("encoder.")]
    assert all(torch.equal(b["model"][k], a["model"][k]) and torch.equal(b["ema"][k], a["model"][k]) for k in enc)
    assert not all(torch.equal(b["model"][k], a["model"][k]) for k in b["model"] if k.startswith("decoder."))
    data = make_image_folder(tmp_path / "data")                            # odd images: converted or skipped
    with pytest.warns(UserWarning, match="skipping unreadable"):
        run(train_tokenizer, TOK, tmp_path / "folder", "--data_path", str(data), "--batch_size", "1", "--steps", "8")
    # A finite loss with NaN gradients: the run stops before the optimiser step and writes nothing.
    monkeypatch.setattr(R.TokenizerLoss, "total", nan_gradient(R.TokenizerLoss.total))
    before = (tmp_path / "ft" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"non-finite loss or gradient at step 3 .*grad_norm=nan.*ft/ckpt.pt \(step 2"):
        run(train_tokenizer, TOK, tmp_path / "ft", "--steps", "4", "--resume")
    assert (tmp_path / "ft" / "ckpt.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="at step 1 .*no checkpoint was written yet"):
        run(train_tokenizer, TOK, tmp_path / "new", "--steps", "4")
    assert not os.path.exists(tmp_path / "new" / "ckpt.pt")
    monkeypatch.setattr(R, "flow_matching_loss", nan_gradient(R.flow_matching_loss))
    with pytest.raises(SystemExit, match="at step 1 .*no checkpoint"):
        run(train_dit, DIT, tmp_path / "dit", "--tokenizer", stage1, "--steps", "4")
    assert not os.path.exists(tmp_path / "dit" / "ckpt.pt")


def test_dit_sample_eval(runs, tmp_path):
    root, tok = runs
    full = run(train_dit, DIT, tmp_path / "full", "--tokenizer", tok, "--steps", "4")
    # Resumed, and with the latent cache already there: the same weights, bit for bit.
    cache = ["--latent_cache", str(tmp_path / "full" / "latents.npy")]
    run(train_dit, DIT, tmp_path / "half", "--tokenizer", tok, "--steps", "4", "--stop_at", "2", *cache)
    run(train_dit, DIT, tmp_path / "half", "--tokenizer", tok, "--steps", "4", "--resume", *cache)
    a, b = torch.load(full, weights_only=True), torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert same_state(a["model"], b["model"]) and same_state(a["ema"], b["ema"])
    assert os.path.exists(tmp_path / "full" / "samples_000004.png")
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):   # a checkpoint of the wrong kind
        run(train_dit, DIT, tmp_path / "x", "--tokenizer", full)
    other = run(train_tokenizer, TOK, tmp_path / "tok8", "--steps", "1", "--latent_dim", "8")
    with pytest.raises(ValueError, match="latent width 16, but the tokenizer/data give 8"):
        run(train_dit, DIT, tmp_path / "full", "--tokenizer", other, "--resume", "--steps", "6")
    with pytest.raises(ValueError, match="made from another tokenizer"):
        run(train_dit, DIT, tmp_path / "y", "--tokenizer", other, *cache)
    grid = sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "grid.png"), "--steps", "2"]))
    assert Image.open(grid).size[0] > 32
    npz = sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "s.npz"), "--steps", "2",
                                       "--num_images", "20", "--class_balanced", "--cfg", "1.5", "--sampler", "heun"]))
    d = np.load(npz)
    assert d["arr_0"].shape == (20, 32, 32, 3) and d["arr_0"].dtype == np.uint8
    assert list(d["labels"][:11]) == [*range(10), 0]
    sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "traj.png"), "--steps", "3", "--trajectory"]))
    res = evaluate.main(evaluate.get_args(["gen", "--samples", npz, "--shapes", "--batch_size", "10"]))
    assert 0 <= res["accuracy"] <= 1 and np.isfinite(res["fd"])
    res = evaluate.main(evaluate.get_args(["recon", "--ckpt", tok, "--num_images", "20"]))
    assert 0 < res["psnr"] < 60
    res = evaluate.main(evaluate.get_args(["probe", "--ckpt", tok, "--train_images", "40", "--num_images", "40",
                                           "--out", str(tmp_path / "pca.png")]))
    assert set(res) == {0.2, 0.4, 0.6, 0.8, 1.0} and Image.open(tmp_path / "pca.png").size == (6 * 32 + 14, 8 * 32 + 18)
    # The tokenizer at the DiT's stored path was replaced by another one of the same shape: refused.
    orig = torch.load(tok, weights_only=True)
    torch.save({**orig, "ema": {k: v + 0.01 for k, v in orig["ema"].items()}}, tmp_path / "tok_copy.pt")
    moved = {**torch.load(full, weights_only=True), "tokenizer": str(tmp_path / "tok_copy.pt")}
    torch.save(moved, tmp_path / "dit2.pt")
    with pytest.raises(ValueError, match="no longer the tokenizer"):
        sample.main(sample.get_args(["--ckpt", str(tmp_path / "dit2.pt"), "--out", str(tmp_path / "g2.png")]))


def test_dit_cache_labels_follow_their_images(runs, tmp_path):
    root, tok = runs
    data = make_image_folder(tmp_path / "data")                            # a: 5 readable of 6, b: 3 of 6
    with pytest.warns(UserWarning, match="skipping unreadable"):
        run(train_dit, DIT, tmp_path / "dit", "--tokenizer", tok, "--data_path", str(data), "--batch_size", "2",
            "--steps", "1")
    labels = np.load(tmp_path / "dit" / "latents.npy.labels.npy")
    ds = R.ImageFolderSubset(str(data), 32)
    unreadable = ("empty.jpg", "text.jpeg", "truncated.jpg", "dangling.png")
    readable = [os.path.basename(p) not in unreadable for p, _ in ds.samples]
    assert labels.tolist() == [y if ok else -1 for (_, y), ok in zip(ds.samples, readable)]
    cache = np.load(tmp_path / "dit" / "latents.npy", mmap_mode="r")
    model = R.load_model(tok, "tokenizer").eval()
    k = readable.index(True, 3)                                            # a readable image after an unreadable one
    with torch.no_grad():
        assert np.allclose(cache[k, 0, :, :16], model.encode(ds[k][0][None])[0][0].numpy(), atol=1e-3, rtol=1e-2)
    Image.new("RGB", (40, 50), "white").save(data / "a" / "rgb.png")      # an image replaced in place
    shared = ["--latent_cache", str(tmp_path / "dit" / "latents.npy")]
    with pytest.raises(ValueError, match="made from other data .the files. names, sizes"):
        run(train_dit, DIT, tmp_path / "other", "--tokenizer", tok, "--data_path", str(data), *shared)
    with pytest.warns(UserWarning):                                        # the run's own cache: built again
        run(train_dit, DIT, tmp_path / "dit", "--tokenizer", tok, "--data_path", str(data), "--batch_size", "2",
            "--steps", "1", "--overwrite")
    i = [os.path.basename(p) for p, _ in ds.samples].index("rgb.png")
    assert not np.array_equal(np.load(tmp_path / "dit" / "latents.npy", mmap_mode="r")[i], cache[i])


class Payload:
    """A pickle that runs a command when loaded: what a crafted weight file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line(script, flags, expected, capsys):
    """The script stops with one line that matches expected: no traceback."""
    try:
        R.run_cli(script.main, lambda: script.get_args(flags))
    except SystemExit as e:
        printed = e.code if isinstance(e.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    else:
        pytest.fail(f"{flags} did not stop")
    assert re.search(expected, printed) and "Traceback" not in printed and "\n" not in printed, (flags, printed)


def test_bad_flags_and_files_one_line_each(runs, tmp_path, capsys):
    root, tok = runs
    marker, crafted, junk, pkl = tmp_path / "ran", tmp_path / "crafted.pt", tmp_path / "junk.pt", tmp_path / "stats.pkl"
    crafted.write_bytes(pickle.dumps({"model": Payload(marker)}))
    pkl.write_bytes(pickle.dumps({"key": {"channel": (Payload(marker), 1)}}))
    junk.write_bytes(b"junk")
    (tmp_path / "afile").write_text("")
    folder = make_image_folder(tmp_path / "data")
    (tmp_path / "hole" / "a").mkdir(parents=True)
    np.savez(tmp_path / "floats.npz", arr_0=np.random.rand(4, 32, 32, 3))
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2, 10]))
    T, D = [*TOK, "--out", str(tmp_path / "t")], [*DIT, "--out", str(tmp_path / "d"), "--tokenizer", tok]
    S, npz = ["--ckpt", tok, "--out", str(tmp_path / "s.npz")], str(tmp_path / "s.npz")
    shapes_only = "--teacher shapes is trained on the embedded shapes"
    cases = [  # (script, flags, the one line it must print)
        (train_tokenizer, [*T, "--steps", "0"], "argument --steps: must be > 0, got 0"),
        (train_tokenizer, [*T, "--batch_size", "-8"], "argument --batch_size: must be > 0"),
        (train_tokenizer, [*T, "--ema", "1.5"], "argument --ema: must be >= 0 and <= 1"),
        (train_tokenizer, [*T, "--img_size", "36"], "--img_size 36 is not a multiple of --patch_size 8"),
        (train_tokenizer, [*T, "--steps", "4", "--stop_at", "9"], "--stop_at 9 must lie after the current step 0"),
        (train_tokenizer, [*T, "--epochs", "0.01"], "--epochs 0.01 is 0 steps of 8 on 32 images"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "afile")], "afile is a file; expected a folder"),
        (train_tokenizer, [*T, "--resume", "--overwrite"], "pass one of them"),
        (train_tokenizer, [*T, "--decoder_finetune"], "need --init_from"),
        (train_tokenizer, [*T, "--stats_only", "--resume"], "--stats_only only measures"),
        (train_tokenizer, [*T, "--init_from", str(junk)], "junk.pt' is not a readable checkpoint"),
        (train_tokenizer, [*T, "--init_from", str(crafted)], "crafted.pt' was refused: it holds Python objects"),
        (train_tokenizer, [*T, "--data_path", str(tmp_path / "nowhere")], "data folder .*nowhere' does not exist"),
        (train_tokenizer, [*T, "--data_path", str(tmp_path / "hole")], "class folder .*hole/a' holds no images"),
        (train_tokenizer, [*T, "--data_path", str(folder), "--teacher", "shapes"], shapes_only),
        (train_tokenizer, [*T, "--teacher", "idx"], "--teacher idx is trained on MNIST-format data"),
        (train_dit, [*D[:-1], str(tmp_path / "none.pt")], "tokenizer checkpoint .*none.pt' does not exist"),
        (train_dit, [*D, "--latent_stats", str(pkl)], "asks for posix.system, which no statistics file needs"),
        (train_dit, [*D, "--latent_stats", str(tmp_path / "floats.npz")], "floats.npz' cannot be used"),
        (train_dit, [*D, "--decay_start_epoch", "5", "--decay_end_epoch", "1"], "--decay_end_epoch 1.0 lies before"),
        (train_dit, [*D, "--epochs", "0.01"], "--epochs 0.01 is 0 steps"),
        (sample, [*S, "--cfg", "-1"], "argument --cfg: must be >= 0, got -1"),
        (sample, [*S, "--cfg_interval", "0.9", "0.1"], "--cfg_interval 0.9 0.1 is reversed"),
        (sample, [*S, "--labels", "1", "--class_balanced"], "pass one"),
        (sample, [*S, "--trajectory"], "--trajectory writes a .png grid"),
        (sample, [*S, "--ag_scale", "2"], "--ag_scale needs --autoguidance_ckpt"),
        (sample, S, "is not a dit checkpoint: it is tokenizer"),
        (sample, ["--ckpt", npz, "--out", npz], "--out .*s.npz is an input of this command"),
        (sample, ["--ckpt", tok, "--out", str(folder / "a")], "already holds 4 PNG files, which eval.py gen"),
        (evaluate, ["probe", "--ckpt", tok, "--out", tok], "--out .*ckpt.pt is an input of this command"),
        (train_dit, [*D, "--latent_cache", tok], "--latent_cache .*ckpt.pt is an input of this command"),
        (train_dit, [*D, "--latent_cache", str(tmp_path / "floats.npz")], "floats.npz exists but has no .*json"),
        (train_tokenizer, [*T[:-1], str(folder / "a" / "run"), "--data_path", str(folder)],
         "lies inside --data_path .*: the run's files would become data"),
        (evaluate, ["gen", "--samples", str(tmp_path / "floats.npz"), "--shapes"], "must be uint8 .N, H, W, 3."),
        (evaluate, ["gen", "--samples", str(tmp_path / "labels.npz"), "--shapes"], "one label per sample in .0, 9."),
        (evaluate, ["gen", "--samples", npz + "x"], "no .npz and no PNG files"),
        (evaluate, ["probe", "--ckpt", tok, "--probe_ts", "1.5"], "argument --probe_ts: must be >= 0 and <= 1"),
        (evaluate, ["stats", "--data_path", str(folder)], "eval.py stats needs --data_path and --out"),
        (evaluate, ["recon", "--ckpt", str(crafted)], "was refused"),
    ]
    for script, flags, expected in cases:
        one_line(script, flags, expected, capsys)
    assert not (folder / "a" / "run").exists()                             # a refused run leaves its data as it was
    hub, name = tmp_path / "hub", os.path.basename(evaluate.FIDInception.URL)   # a crafted file in the hub cache
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / name).write_bytes(crafted.read_bytes())
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        with pytest.raises(ValueError, match=f"cached weight file .*{name}' was refused"):
            R.load_weights(None, evaluate.FIDInception.URL, name, "--inception")
    finally:
        torch.hub.set_dir(old)
    assert not marker.exists()                                             # no crafted file ran its code


def altered(path, out, change):
    """A copy of the checkpoint at path, changed by change(ckpt), at out."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, out)
    return str(out)


def test_hostile_runs_one_line_each(runs, tmp_path, capsys):
    """Inputs that a run must never delete, resumes on other data, foreign checkpoints, damaged files, data
    that do not mean what they say, and outputs that are not numbers: each one line, nothing lost."""
    root, tok = runs
    stage1 = os.path.dirname(tok)
    run(train_tokenizer, TOK, tmp_path / "r", "--steps", "4", "--stop_at", "2")   # a run to resume
    run(train_dit, DIT, tmp_path / "d0", "--tokenizer", tok, "--steps", "1")       # a DiT and its latent cache
    ckpt = str(tmp_path / "r" / "ckpt.pt")
    os.makedirs(tmp_path / "old")
    altered(ckpt, tmp_path / "old" / "ckpt.pt", lambda c: c.pop("rng"))
    os.makedirs(tmp_path / "new")
    altered(ckpt, tmp_path / "new" / "ckpt.pt", lambda c: c["recipe"].update(foo=1))
    os.makedirs(tmp_path / "log")
    altered(ckpt, tmp_path / "log" / "ckpt.pt", lambda c: None)
    (tmp_path / "log" / "log.jsonl").write_text('{"step": 1}\ngarbage\n')
    nan_tok = altered(tok, tmp_path / "nan_tok.pt", lambda c: c["ema"]["latent_std"].__setitem__(0, float("nan")))
    wild = altered(str(tmp_path / "d0" / "ckpt.pt"), tmp_path / "wild.pt",
                   lambda c: c["ema"]["final_layer.linear.bias"].fill_(float("nan")))
    cut = tmp_path / "cut" / "latents.npy"
    os.makedirs(cut.parent)
    for suffix in ("", ".json", ".labels.npy"):
        (cut.parent / f"latents.npy{suffix}").write_bytes((tmp_path / "d0" / f"latents.npy{suffix}").read_bytes())
    cut.write_bytes(cut.read_bytes()[:1000])                               # truncated by a full disk, say
    folder = make_image_folder(tmp_path / "data")
    Image.new("RGB", (8, 8)).save(folder / "stray.png")                   # an image beside the class folders
    clean = make_image_folder(tmp_path / "clean")
    lists = {name: tmp_path / f"{name}.txt" for name in ("twice", "empty", "zebra")}
    for name, text in (("twice", "a\nb\na\n"), ("empty", "\n"), ("zebra", "a\nzebra\n")):
        lists[name].write_text(text)
    np.savez(tmp_path / "objects.npz", arr_0=np.array([{"x": 1}], dtype=object))
    good = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "five.npz", arr_0=good)
    np.savez(tmp_path / "one.npz", arr_0=good[:1], labels=np.zeros(1, int))
    rng = np.random.RandomState(1)
    sigma = np.eye(2048)
    np.savez(tmp_path / "nan_ref.npz", mu=np.full(2048, np.nan), sigma=sigma)
    np.savez(tmp_path / "skew_ref.npz", mu=np.zeros(2048), sigma=sigma + np.triu(rng.rand(2048, 2048), 1))
    np.savez(tmp_path / "npsd_ref.npz", mu=np.zeros(2048), sigma=-sigma)
    T, D = [*TOK, "--steps", "4"], [*DIT, "--tokenizer", tok]
    gen = ["gen", "--inception", "random", "--allow_small", "--samples"]
    cases = [
        (train_tokenizer, [*T, "--decoder_finetune", "--init_from", tok, "--out", stage1, "--overwrite"],
         "ckpt.pt is an input of this command and lies in --out .*choose another --out"),
        (train_dit, [*D, "--out", stage1, "--overwrite"], "is an input of this command and lies in --out"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "r"), "--resume", "--train_images", "40"],
         "was trained on other data .the number of images 32 -> 40.; pass --allow_new_data"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "r"), "--resume", "--data_path", str(folder / "a")],
         "was trained on other data .the kind of data shapes -> folder"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "r"), "--resume", "--decoder_finetune"], "is a stage-1 run"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "old"), "--resume"], "cannot be resumed: it has no 'rng'"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "new"), "--resume"], "recipe has the unknown field 'foo'"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "log"), "--resume"], "log.jsonl is damaged at line 2"),
        (train_dit, [*D, "--out", str(tmp_path / "dc"), "--latent_cache", str(cut)],
         "latent cache .*cut/latents.npy is damaged"),
        (train_dit, [*DIT, "--tokenizer", nan_tok, "--out", str(tmp_path / "dn")], "nan_tok.pt: its latent statistics "
         "are unusable"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "f"), "--data_path", str(folder)],
         "holds 1 image file.s. beside 2 class folder.s."),
        (train_tokenizer, [*T, "--out", str(tmp_path / "f"), "--data_path", str(clean), "--class_list",
                           str(lists["twice"])], "twice.txt names 'a' twice"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "f"), "--data_path", str(clean), "--class_list",
                           str(lists["empty"])], "empty.txt names no class"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "f"), "--data_path", str(clean), "--class_list",
                           str(lists["zebra"])], r"classes not found in .*\['zebra'\]"),
        (sample, ["--ckpt", wild, "--out", str(tmp_path / "w.npz"), "--steps", "2"],
         "not finite after 2 euler steps with cfg 1.0"),
        (evaluate, ["gen", "--shapes", "--samples", str(tmp_path / "objects.npz")], "cannot be read as an .npz"),
        (evaluate, ["gen", "--shapes", "--samples", str(tmp_path / "one.npz")], "needs at least 2 images, got 1"),
        (evaluate, [*gen, str(tmp_path / "five.npz"), "--ref_stats", str(tmp_path / "nan_ref.npz")], "hold NaN"),
        (evaluate, [*gen, str(tmp_path / "five.npz"), "--ref_stats", str(tmp_path / "skew_ref.npz")], "not symmetric"),
        (evaluate, [*gen, str(tmp_path / "five.npz"), "--ref_stats", str(tmp_path / "npsd_ref.npz")],
         "npsd_ref.npz: sigma has a negative eigenvalue"),
    ]
    before = open(tok, "rb").read()
    for script, flags, expected in cases:
        one_line(script, flags, expected, capsys)
    assert open(tok, "rb").read() == before                                # the input was neither deleted nor touched
    assert not os.path.exists(tmp_path / "f" / "ckpt.pt")


def official_names(sd, extra=()):
    """Our state dict under the official key names (the inverse of the converter's renames)."""
    out = {}
    for k, v in sd.items():
        for old, new in R.OFFICIAL_RENAMES:
            k = old + k[len(new):] if k.startswith(new) else k
        out[k] = v.clone()
    return {**out, **dict(extra)}


def test_released_format_chain(tmp_path, capsys):
    """The released files' formats at tiny official widths: RecTok_decft-style tokenizer, DiT^DH and its
    AutoGuidance model as {"model", "model_ema"}, the official stats.pkl -> sample.py -> eval.py gen."""
    torch.manual_seed(0)
    tok = R.RecTok(R.TokenizerConfig(32, 8, 4, (192, 1, 4), (192, 1, 4), (192, 1, 4), 0))
    sd = {k: v for k, v in tok.state_dict().items() if not k.startswith("latent_")}   # no official file holds them
    torch.save({"model": official_names(sd), "model_ema": official_names(sd)}, tmp_path / "RecTok_decft.pth")
    for name, head in (("ditdhxl.pth", (384, 1, 6)), ("ditdhs.pth", (384, 1, 6))):
        dit = R.DiTDH(R.DiTConfig(4, 4, 10, 1, (192, 1, 4), head))
        nudge(dit)
        ropes = {f"{a}_feat_rope.freqs_{c}": getattr(dit, f"rope_{b}")[i]
                 for a, b in (("enc", "backbone"), ("dec", "head")) for i, c in enumerate(("cos", "sin"))}
        sd = dit.state_dict()
        torch.save({"model": official_names(sd, ropes), "model_ema": official_names(sd)}, tmp_path / name)
    mean, std = torch.randn(8), torch.rand(8) + 0.5                        # 2C moments, as the official code keeps
    with open(tmp_path / "stats.pkl", "wb") as f:                          # written as the official code writes it
        pickle.dump({"rectok_official_evaluation": {"single": (mean.mean(), std.mean()), "channel": (mean, std)}}, f)
    npz = str(tmp_path / "samples.npz")
    sample.main(sample.get_args(["--ckpt", str(tmp_path / "ditdhxl.pth"),
                                 "--tokenizer_ckpt", str(tmp_path / "RecTok_decft.pth"),
                                 "--latent_stats", str(tmp_path / "stats.pkl"),
                                 "--autoguidance_ckpt", str(tmp_path / "ditdhs.pth"),
                                 "--steps", "3", "--num_images", "20", "--class_balanced", "--out", npz]))
    assert "AutoGuidance 1.29" in capsys.readouterr().out and np.load(npz)["arr_0"].shape == (20, 32, 32, 3)
    assert torch.equal(train_dit.read_latent_stats(str(tmp_path / "stats.pkl"), 4)[0], mean[:4])   # the means' half
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    res = evaluate.main(evaluate.get_args(["gen", "--samples", npz, "--ref_stats", str(ref), "--inception", "random",
                                           "--allow_small"]))
    assert np.isfinite(res["fid"]) and "FID-20 (torch-fidelity input path" in capsys.readouterr().out
    # The latent statistics of the released tokenizer on a class-ordered folder reach every class.
    root = tmp_path / "ordered"
    for c in range(5):
        (root / f"n{c:02d}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * c + i, np.uint8)).save(root / f"n{c:02d}" / f"{i}.png")
    run(train_tokenizer, ["--stats_only", "--init_from", str(tmp_path / "RecTok_decft.pth"), "--data_path", str(root),
                          "--stats_images", "5"], tmp_path / "stats")
    assert "latent statistics: 5 of 15 images, 5 of 5 classes" in capsys.readouterr().out


def test_tf1_resize_and_inception_score_splits():
    x = torch.tensor([[0.0, 10, 20, 40]])[None, None]                      # (1, 1, 1, 4): one row
    # 4 -> 3: output j samples input position j * 4/3 (no half-pixel offset): 0, 1.33, 2.67
    expected = torch.tensor([0, 10 + 10 / 3, 20 + 20 * 2 / 3])
    assert torch.allclose(evaluate.tf1_resize(x.expand(1, 1, 3, 4), 3)[0, 0, 0], expected)
    # 2 -> 3: positions 0, 0.67, 1.33; the last one's upper neighbour is clamped to the last pixel
    two = torch.tensor([[[[0.0, 30], [0, 30]]]])
    assert torch.allclose(evaluate.tf1_resize(two, 3)[0, 0, 0], torch.tensor([0.0, 20, 30]))
    logits = torch.randn(15, 6, generator=torch.Generator().manual_seed(0)).double()
    p = logits[np.random.RandomState(2020).permutation(15)].softmax(1)
    cuts = [k * 15 // 10 for k in range(11)]                               # torch-fidelity's splits: 1, 2, 1, 2, ...
    parts = [p[a:b] for a, b in zip(cuts, cuts[1:])]
    kl = [(q * (q.log() - q.mean(0).log())).sum(1).mean().exp().item() for q in parts]
    assert evaluate.inception_score(logits)[0] == pytest.approx(np.mean(kl), abs=1e-12)


@pytest.fixture(scope="module")
def shapes_teacher(runs):
    """A small shapes teacher at 32 px, cached where the scripts look for it (the quick preset's default teacher)."""
    return R.trained_classifier(lambda: R.ClassTeacher(32, 8), lambda net, x: net.head(net(x)),
                                "shapes_teacher_p8_32px_10", lambda: R.shapes_batches(1200, 32, 10, seed=2),
                                R.Shapes(1000, 32, seed=1), seed=2, epochs=4)


def probe_accuracy(features):
    """Linear probe on token-averaged features (B, L, D) of 200 training and 200 held-out shapes."""
    with torch.no_grad():
        (a, ya), (b, yb) = [(features(torch.stack([d[i][0] for i in range(200)])).mean(1), torch.tensor(d.labels))
                            for d in (R.Shapes(200, 32, seed=0), R.Shapes(200, 32, seed=1))]
    return evaluate.linear_probe(a, ya, b, yb, 10)


def test_shapes_teacher_and_semantic_distillation(shapes_teacher, runs, tmp_path):
    teacher, acc = shapes_teacher
    assert acc > 0.8 and probe_accuracy(teacher) > 0.8                     # its tokens name the class; chance is 10%
    x = torch.stack([R.Shapes(320, 32, seed=0)[i][0] for i in range(320)])
    with torch.no_grad():
        target = teacher(x)
    accs = []
    for weight in (0.0, 1.0):                                              # the same run, without and with the FSD term
        torch.manual_seed(0)
        cfg = R.TokenizerConfig(32, 8, 4, (64, 2, 2), (32, 1, 2), (16, 1, 1), teacher.dim)  # a tiny semantic decoder
        tok = R.RecTok(cfg)
        opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
        for _ in range(100):
            i = torch.randint(320, (32,))
            recon, pred, kl = tok(x[i])
            loss = F.mse_loss(recon, x[i]) / 4 + 1e-6 * kl + weight * R.semantic_loss(pred, target[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs.append(probe_accuracy(lambda img: tok.eval().encode(img)[0]))
    assert accs[1] > accs[0] + 0.15, accs                                  # measured: 15.5% -> 54%
    # Without a teacher flag, the quick preset on the embedded shapes distils the shapes teacher.
    ckpt = run(train_tokenizer, [f for f in TOK if f not in ("--teacher", "random")], tmp_path, "--steps", "2")
    assert torch.load(ckpt, weights_only=True)["recipe"]["teacher"] == "shapes"
    assert "semantic" in json.loads(open(tmp_path / "log.jsonl").readline())


# ----------------------------------------------------------------------------- metrics

def test_frechet_inception_score_psnr():
    rng = np.random.RandomState(0)
    mu, a = rng.randn(6), rng.randn(6, 6)
    sigma = a @ a.T
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    d1, d2, m2 = rng.rand(6) + 0.1, rng.rand(6) + 0.1, rng.randn(6)
    closed = ((mu - m2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert abs(evaluate.frechet_distance(mu, np.diag(d1), m2, np.diag(d2)) - closed) < 1e-9
    few = evaluate.feature_stats(rng.randn(20, 64))                        # rank 19 in 64 dimensions
    assert abs(evaluate.frechet_distance(*few, *few)) < 1e-8
    other = evaluate.feature_stats(rng.randn(20, 64) + 0.5)
    assert np.isfinite(evaluate.frechet_distance(*few, *other)) and evaluate.frechet_distance(*few, *other) > 0
    assert evaluate.inception_score(torch.zeros(100, 10)) == (pytest.approx(1.0), pytest.approx(0.0))
    with pytest.raises(ValueError, match="IS needs at least 10 images"):             # one per split
        evaluate.inception_score(torch.zeros(9, 10))
    with pytest.raises(ValueError, match="IS came out NaN"):
        evaluate.inception_score(torch.full((10, 10), float("nan")))
    with pytest.raises(ValueError, match="against ref.npz came out -.*not a covariance"):  # a reference that is no PSD
        evaluate.checked_fd(rng.randn(20, 6), (np.zeros(6), -100 * np.eye(6)), "ref.npz")
    with pytest.raises(ValueError, match="needs at least 2 images, got 1"):
        evaluate.checked_fd(rng.randn(1, 6), (np.zeros(6), np.eye(6)), "ref.npz")
    x = torch.rand(2, 3, 16, 16)
    assert torch.isinf(evaluate.psnr(x, x)).all() and torch.allclose(evaluate.ssim(x, x), torch.ones(2))
    assert evaluate.psnr(x, (x + 0.1).clamp(0, 1)).min() > 20


def test_fid_inception_matches_pytorch_fid_layout():
    import json
    net = evaluate.load_inception("random")
    keys = json.load(open(os.path.join(os.path.dirname(FIXTURE), "pytorch_fid_inception_keys.json")))
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == keys
    pool, logits = net(torch.rand(2, 3, 64, 64))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(pool).all()


def test_linear_probe():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(5, 16, generator=g)
    y = torch.arange(500) % 5
    x = centres[y] + torch.randn(500, 16, generator=g)
    assert evaluate.linear_probe(x[:400], y[:400], x[400:], y[400:], 5) > 0.97
    shuffled = y[torch.randperm(500, generator=g)]
    assert evaluate.linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 5) < 0.4


# ----------------------------------------------------------------------------- MNIST-format data, teacher and judge

def write_idx(path, array):
    """An MNIST-format idx file (gzipped if path ends in .gz): magic 0 0 8 ndim, big-endian sizes, uint8 data."""
    arr = np.asarray(array, np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">i4").tobytes() + arr.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def make_idx_folder(root, gz=False, n_train=40, n_test=20, classes=4):
    """The four files of a tiny MNIST-like set: class k is a bright block in the k-th place of a row, plus noise."""
    root.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        images = rng.randint(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 10:18, 7 * k: 7 * k + 7] = 250
        ext = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", labels)
    return root


def test_idx_files_raw_gzipped_and_broken(tmp_path):
    raw, gz = make_idx_folder(tmp_path / "raw"), make_idx_folder(tmp_path / "FashionMNIST" / "raw", gz=True)
    assert R.idx_folder(str(tmp_path / "FashionMNIST")) == str(gz)         # torchvision's layout: ROOT/NAME/raw
    a, b = R.IdxImages(str(raw), "train", 32), R.IdxImages(str(gz), "train", 32)
    assert len(a) == 40 and a.classes == ["0", "1", "2", "3"] and a.labels[:5] == [0, 1, 2, 3, 0]
    assert torch.equal(a[5][0], b[5][0]) and a[5][0].shape == (3, 32, 32)  # the same image from either layout
    x = a[5][0]
    assert torch.equal(x[0], x[1]) and x.min() >= -1 and x.max() <= 1     # grey over three channels
    assert x[:, 16, 13].mean() > 0.5 > x[:, 16, 30].mean()                 # class 1's block, resized 28 -> 32 px
    held = R.dataset_from_args(SimpleNamespace(data_path=str(raw), class_list=None, num_classes=None,
                                               images_per_class=None), 32, train=False)
    assert held.split == "t10k" and len(held) == 20
    assert len(R.IdxImages(str(raw), "train", 32, classes=["1", "3"], n=8)) == 8
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    for broken, expected in ((good[:-5], "train-images-idx3-ubyte is truncated"),
                             (b"\x00\x00\x08\x01" + good[4:], "not an MNIST-format idx file of 3-d data"),
                             (b"", "magic number missing")):
        images.write_bytes(broken)
        with pytest.raises(ValueError, match=expected):
            R.IdxImages(str(raw), "train", 32)
    write_idx(images, np.zeros((39, 28, 28)))
    with pytest.raises(ValueError, match="holds 39 images but .*train-labels-idx1-ubyte 40 labels"):
        R.IdxImages(str(raw), "train", 32)
    (gz / "t10k-labels-idx1-ubyte.gz").write_bytes((gz / "t10k-labels-idx1-ubyte.gz").read_bytes()[:30])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz cannot be read"):
        R.IdxImages(str(gz), "t10k", 32)
    os.remove(gz / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="not t10k-labels-idx1-ubyte"):
        R.idx_folder(str(gz))


def test_teacher_and_judge_are_independent(tmp_path, monkeypatch):
    """Disjoint halves of the train split, other seeds and architectures; t10k only to score them; cached."""
    folder = str(make_idx_folder(tmp_path / "idx"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    seen, fitting = [], [None]
    get = R.IdxImages.__getitem__
    def record(self, i):
        seen.append((fitting[0], self.split, i))
        return get(self, i)
    monkeypatch.setattr(R.IdxImages, "__getitem__", record)
    fit = R.fit_classifier
    def spy(net, *args):
        fitting[0] = type(net).__name__
        fit(net, *args)
        fitting[0] = None
    monkeypatch.setattr(R, "fit_classifier", spy)
    teacher = R.ClassTeacher.cached(32, 8, idx_folder=folder)
    judge, acc = evaluate.class_judge(32, "cpu", folder)
    used = {name: {i for who, split, i in seen if who == name and split == "train"}
            for name in ("ClassTeacher", "Sequential")}
    assert used["ClassTeacher"] == set(range(20)) and used["Sequential"] == set(range(20, 40))
    assert not any(who and split == "t10k" for who, split, _ in seen)      # held-out images never train either
    assert isinstance(teacher, R.ClassTeacher) and teacher.dim == 64 and 0 <= acc <= 1
    seen.clear()
    R.ClassTeacher.cached(32, 8, idx_folder=folder)                         # cached: trained once
    assert not any(who for who, _, _ in seen)
    assert len(list((tmp_path / "hub").glob("rectok_idx_*.pt"))) == 2


def test_latent_normalisation_choice_is_stored_and_followed(runs, tmp_path, capsys):
    root, tok = runs
    means = torch.load(tok, weights_only=True)
    stats = means["latent_stats"]
    assert stats["norm"] == "means" and torch.equal(means["ema"]["latent_std"], stats["std_means"])  # official default
    assert (stats["std_samples"] >= stats["std_means"]).all()              # samples add the posterior variance
    other = run(train_tokenizer, TOK, tmp_path / "s", "--stats_only", "--init_from", tok, "--latent_norm", "samples")
    saved = torch.load(other, weights_only=True)
    assert saved["latent_stats"]["norm"] == "samples"
    assert torch.allclose(saved["ema"]["latent_std"], stats["std_samples"], rtol=1e-4)
    dit = run(train_dit, DIT, tmp_path / "d", "--tokenizer", other, "--steps", "1")
    trained = torch.load(dit, weights_only=True)
    assert trained["latent_norm"] == "by the std of posterior samples"
    assert torch.equal(trained["latent_std"], saved["ema"]["latent_std"])  # the DiT's latent is the chosen one
    assert "normalised by the std of posterior samples" in capsys.readouterr().out
    seen = {}
    original = R.RecTok.decode
    def spy(self, zn):
        seen["std"] = self.latent_std.clone()
        return original(self, zn)
    R.RecTok.decode = spy
    try:
        sample.main(sample.get_args(["--ckpt", dit, "--out", str(tmp_path / "h.png"), "--steps", "1",
                                     "--num_images", "2"]))
    finally:
        R.RecTok.decode = original
    assert torch.equal(seen["std"], saved["ema"]["latent_std"])            # sample.py decodes with it too


# ----------------------------------------------------------------------------- interrupts, limits and two writers

def interrupt_at(step, action):
    """A train_tokenizer.update that does action() when the run is about to take the step."""
    update = train_tokenizer.update
    def wrapped(run_, *args):
        if run_.progress.step + 1 == step:
            action()
        return update(run_, *args)
    return wrapped


def test_sigterm_saves_and_resumes_exactly(runs, tmp_path, monkeypatch, capsys):
    root, full = runs
    monkeypatch.setattr(train_tokenizer, "update", interrupt_at(2, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    one_line(train_tokenizer, [*TOK, "--steps", "4", "--ckpt_every", "100", "--out", str(tmp_path)],
             r"SIGTERM at step 2: saved .*ckpt.pt; continue with --resume", capsys)
    monkeypatch.undo()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    run(train_tokenizer, TOK, tmp_path, "--steps", "4", "--resume")
    a, b = torch.load(full, weights_only=True), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(same_state(a[k], b[k]) for k in ("model", "ema", "disc")) and log_steps(tmp_path) == [1, 2, 3, 4]


def test_ctrl_c_and_out_of_memory_end_in_one_line(runs, tmp_path, monkeypatch, capsys):
    def ctrl_c():
        raise KeyboardInterrupt
    monkeypatch.setattr(train_tokenizer, "update", interrupt_at(3, ctrl_c))
    one_line(train_tokenizer, [*TOK, "--steps", "4", "--out", str(tmp_path / "c")],
             r"interrupted at step 2; the last checkpoint is .*c/ckpt.pt \(step 2\)", capsys)
    def no_memory():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(train_tokenizer, "update", interrupt_at(1, no_memory))
    one_line(train_tokenizer, [*TOK, "--steps", "4", "--out", str(tmp_path / "m")],
             "out of memory with batches of 8 images of 32 px per process: lower --batch_size, or --img_size", capsys)


def test_unwritable_torch_home_stops_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "afile" / "hub"))
    monkeypatch.setattr(R, "fit_classifier", lambda *a: pytest.fail("trained before checking the torch hub folder"))
    with pytest.raises(OSError, match="cannot write to .*afile/hub"):
        evaluate.class_judge(16, "cpu")


def hold_lock(path, seconds=60):
    """Another process that holds the lock on path (as a live run would) for a while, or until killed."""
    code = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_writers_cannot_both_proceed(runs, tmp_path, capsys):
    root, tok = runs
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out / ".lock")
    one_line(train_tokenizer, [*TOK, "--steps", "2", "--out", str(out)],
             rf"run folder .*run is in use by another process \(pid {holder.pid}\)", capsys)
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()
    holder.kill()
    holder.wait()
    run(train_tokenizer, TOK, out, "--steps", "2")                        # a dead holder leaves no stale lock
    cache = tmp_path / "shared" / "latents.npy"
    cache.parent.mkdir()
    holder = hold_lock(str(cache) + ".lock", seconds=2)                    # a cache another process is building
    run(train_dit, DIT, tmp_path / "d", "--tokenizer", tok, "--steps", "1", "--latent_cache", str(cache))
    holder.wait()
    assert f"waiting for process {holder.pid}, which holds the latent cache" in capsys.readouterr().out
    assert json.loads(open(str(cache) + ".json").read())["data"]["n"] == 32


# ----------------------------------------------------------------------------- torchrun: 2 processes, gloo, CPU

SPY = """
import json, os, sys
import rectok as R
import train_dit
mean = R.global_mean
def spy(terms, world):  # every logged record: this rank's own values, and what was logged
    out = mean(terms, world)
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "a") as f:
        f.write(json.dumps({"own": {k: v.item() for k, v in terms.items()}, "logged": out}) + "\\n")
    return out
R.global_mean = spy
train_dit.main(train_dit.get_args(sys.argv[2:]))
"""


def torchrun(*args, procs=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_logs_and_samples_like_one_process(runs, tmp_path):
    root, tok = runs
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    here = os.path.dirname(os.path.abspath(__file__))
    torchrun(spy, tmp_path / "values", *DIT, "--tokenizer", tok, "--steps", "3", "--out", tmp_path / "dit")
    own = [[json.loads(line) for line in open(f"{tmp_path / 'values'}.rank{r}")] for r in (0, 1)]
    logged = [json.loads(line) for line in open(tmp_path / "dit" / "log.jsonl")]
    for r0, r1, line in zip(*own, logged):                                 # the global batch, not rank 0's half
        assert line["loss"] == r0["logged"]["loss"] == pytest.approx((r0["own"]["loss"] + r1["own"]["loss"]) / 2)
        assert r0["own"]["loss"] != r1["own"]["loss"]
    dit = tmp_path / "dit" / "ckpt.pt"
    common = ["--ckpt", dit, "--steps", "2", "--batch_size", "2", "--cfg", "1.5"]
    torchrun(os.path.join(here, "sample.py"), *common, "--num_images", "5", "--out", tmp_path / "two.npz")
    sample.main(sample.get_args([*map(str, common), "--num_images", "7", "--out", str(tmp_path / "one.npz")]))
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert np.array_equal(two["arr_0"], one["arr_0"][:5]) and np.array_equal(two["labels"], one["labels"][:5])
    torchrun(os.path.join(here, "sample.py"), *common, "--num_images", "1", "--out", tmp_path / "single.npz")
    assert np.array_equal(np.load(tmp_path / "single.npz")["arr_0"], one["arr_0"][:1])   # rank 1 draws nothing
    assert sorted(os.listdir(tmp_path)) == ["dit", "one.npz", "single.npz", "spy.py", "two.npz", "values.rank0",
                                            "values.rank1"]               # no shard left behind
