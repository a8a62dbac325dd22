"""
test_rectok.py: the invariants a reader of rectok.py relies on, parity with the official code, and the
scripts end to end. RecTok (arXiv 2512.13421). CPU only, tiny models, about a minute:

  python -m pytest -q test_rectok.py
"""
import dataclasses
import errno
import json
import math
import os
import pickle
import re
import warnings

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
    monkeypatch.setattr(tok.decoder, "forward", lambda z, ids: seen.setdefault("pix", (z, ids)) and torch.zeros(2, 3, 32, 32))
    monkeypatch.setattr(tok.sem_decoder, "forward", lambda z, ids: seen.setdefault("sem", (z, ids)) and torch.zeros(2, 16, 24))
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
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- DiT, flow and sampler

def tiny_dit(num_classes=3):
    dit = R.DiTDH(R.DiTConfig(4, 4, num_classes, 1, (32, 1, 2), (48, 1, 2)))
    for p in dit.parameters():                                             # leave adaLN-Zero's identity start
        p.data.add_(0.05 * torch.randn_like(p)) if p.requires_grad else None
    return dit.eval()


def test_samplers_and_guidance():
    x0, x1, c, y = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.zeros(2, dtype=torch.long)
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
    assert sorted(os.path.basename(p) for p in ds.unreadable) == ["bomb.png", "empty.jpg", "text.jpeg", "truncated.jpg"]
    kept = {n: x for n, item in zip(names, items) if item is not None for x in [item[0]]}
    assert all(x.shape == (3, 32, 32) and -1 <= x.min() <= x.max() <= 1 for x in kept.values())
    grey = lambda n: ((kept[n][0].mean() + 1) * 127.5).item()               # noqa: E731 mean grey level
    assert abs(grey("grey16.png") - 128) < 2 and abs(grey("float.tif") - 128) < 2   # 16-bit and float images: mid-grey
    batch = R.collate(items[:4])                                           # the unreadable ones drop out, labels with them
    assert len(batch[0]) == len(batch[1]) == sum(item is not None for item in items[:4])
    assert len(R.ImageFolderSubset(str(root), 32, classes=["b"])) == 5 and len(R.ImageFolderSubset(str(root), 32, per_class=1)) == 2
    with pytest.raises(ValueError, match="not found"):
        R.ImageFolderSubset(str(root), 32, classes=["zebra"])
    (root / "c").mkdir()                                                   # an empty class would shift every label after it
    with pytest.raises(ValueError, match="class folder .*c' holds no images"):
        R.ImageFolderSubset(str(root), 32)


def make_image_folder(root):
    """Two classes; greyscale, CMYK, RGBA, palette, 16-bit and float images, plus a truncated JPEG, an empty
    file, text, a hidden folder, and bomb.png, too large to decode once PIL's pixel limit is lowered."""
    for c in ("a", "b", ".ipynb_checkpoints"):
        (root / c).mkdir(parents=True)
    rgb = Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8))
    rgb.save(root / "a" / "rgb.png"), rgb.convert("L").save(root / "a" / "grey.png"), rgb.convert("CMYK").save(root / "a" / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "b" / "rgba.png"), rgb.convert("P").save(root / "b" / "palette.png")
    rgb.save(root / ".ipynb_checkpoints" / "x.png"), rgb.resize((100, 100)).save(root / "a" / "bomb.png")
    Image.fromarray(np.full((40, 50), 32896, np.uint16)).save(root / "a" / "grey16.png")   # 16-bit mid-grey
    Image.fromarray(np.full((40, 50), 0.5, np.float32)).save(root / "b" / "float.tif")     # float mid-grey
    rgb.save(root / "b" / "full.jpg")
    (root / "b" / "truncated.jpg").write_bytes((root / "b" / "full.jpg").read_bytes()[:200])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.jpeg").write_text("not an image")
    os.remove(root / "b" / "full.jpg")
    return root


def test_subsets_spread_over_classes():
    labels = torch.arange(20).repeat_interleave(50)                        # a class-ordered folder: 20 classes x 50
    idx = R.spread_subset(labels, 40, seed=3)
    assert len(set(idx.tolist())) == 40 and torch.bincount(labels[idx], minlength=20).tolist() == [2] * 20
    assert not torch.equal(idx, R.spread_subset(labels, 40, seed=4)) and torch.equal(idx, R.spread_subset(labels, 40, seed=3))
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
    R.save_checkpoint(path, {"kind": "tokenizer", "config": dataclasses.asdict(tok.cfg), "model": tok.state_dict(), "ema": tok.state_dict()})
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
    return root, tok


def log_steps(folder):
    return [json.loads(line)["step"] for line in open(folder / "log.jsonl")]


def test_tokenizer_script_resumes_exactly(runs, tmp_path, capsys):
    root, full = runs
    run(train_tokenizer, TOK, tmp_path, "--steps", "4", "--stop_at", "2")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    with open(tmp_path / "log.jsonl", "a") as f:                           # steps logged after the checkpoint, then a kill
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
    with pytest.raises(SystemExit, match=r"non-finite loss or gradient at step 3 .*grad_norm=nan.*ft/ckpt.pt \(step 2\)"):
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
    run(train_dit, DIT, tmp_path / "half", "--tokenizer", tok, "--steps", "4", "--stop_at", "2", "--latent_cache", str(tmp_path / "full" / "latents.npy"))
    run(train_dit, DIT, tmp_path / "half", "--tokenizer", tok, "--steps", "4", "--resume", "--latent_cache", str(tmp_path / "full" / "latents.npy"))
    a, b = torch.load(full, weights_only=True), torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert same_state(a["model"], b["model"]) and same_state(a["ema"], b["ema"])
    assert os.path.exists(tmp_path / "full" / "samples_000004.png")
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):   # a checkpoint of the wrong kind
        run(train_dit, DIT, tmp_path / "x", "--tokenizer", full)
    other = run(train_tokenizer, TOK, tmp_path / "tok8", "--steps", "1", "--latent_dim", "8")
    with pytest.raises(ValueError, match="latent width 16, but the tokenizer/data give 8"):
        run(train_dit, DIT, tmp_path / "full", "--tokenizer", other, "--resume", "--steps", "6")
    with pytest.raises(ValueError, match="made from another tokenizer"):
        run(train_dit, DIT, tmp_path / "y", "--tokenizer", other, "--latent_cache", str(tmp_path / "full" / "latents.npy"))
    grid = sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "grid.png"), "--steps", "2"]))
    assert Image.open(grid).size[0] > 32
    npz = sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "s.npz"), "--steps", "2", "--num_images", "20",
                                       "--class_balanced", "--cfg", "1.5", "--sampler", "heun"]))
    d = np.load(npz)
    assert d["arr_0"].shape == (20, 32, 32, 3) and d["arr_0"].dtype == np.uint8 and list(d["labels"][:11]) == [*range(10), 0]
    sample.main(sample.get_args(["--ckpt", full, "--out", str(tmp_path / "traj.png"), "--steps", "3", "--trajectory"]))
    res = evaluate.main(evaluate.get_args(["gen", "--samples", npz, "--shapes", "--batch_size", "10"]))
    assert 0 <= res["accuracy"] <= 1 and np.isfinite(res["fd"])
    res = evaluate.main(evaluate.get_args(["recon", "--ckpt", tok, "--num_images", "20"]))
    assert 0 < res["psnr"] < 60
    res = evaluate.main(evaluate.get_args(["probe", "--ckpt", tok, "--train_images", "40", "--num_images", "40", "--out", str(tmp_path / "pca.png")]))
    assert set(res) == {0.2, 0.4, 0.6, 0.8, 1.0} and Image.open(tmp_path / "pca.png").size == (6 * 32 + 14, 8 * 32 + 18)
    # The tokenizer at the DiT's stored path was replaced by another one of the same shape: refused.
    orig = torch.load(tok, weights_only=True)
    torch.save({**orig, "ema": {k: v + 0.01 for k, v in orig["ema"].items()}}, tmp_path / "tok_copy.pt")
    torch.save({**torch.load(full, weights_only=True), "tokenizer": str(tmp_path / "tok_copy.pt")}, tmp_path / "dit2.pt")
    with pytest.raises(ValueError, match="no longer the tokenizer"):
        sample.main(sample.get_args(["--ckpt", str(tmp_path / "dit2.pt"), "--out", str(tmp_path / "g2.png")]))


def test_dit_cache_labels_follow_their_images(runs, tmp_path):
    root, tok = runs
    data = make_image_folder(tmp_path / "data")                            # a: 5 readable of 6, b: 3 readable of 5
    with pytest.warns(UserWarning, match="skipping unreadable"):
        run(train_dit, DIT, tmp_path / "dit", "--tokenizer", tok, "--data_path", str(data), "--batch_size", "2", "--steps", "1")
    labels = np.load(tmp_path / "dit" / "latents.npy.labels.npy")
    ds = R.ImageFolderSubset(str(data), 32)
    readable = [os.path.basename(p) not in ("empty.jpg", "text.jpeg", "truncated.jpg") for p, _ in ds.samples]
    assert labels.tolist() == [y if ok else -1 for (_, y), ok in zip(ds.samples, readable)]
    cache = np.load(tmp_path / "dit" / "latents.npy", mmap_mode="r")
    model = R.load_model(tok, "tokenizer").eval()
    k = readable.index(True, 3)                                            # a readable image after an unreadable one
    with torch.no_grad():
        assert np.allclose(cache[k, 0, :, :16], model.encode(ds[k][0][None])[0][0].numpy(), atol=1e-3, rtol=1e-2)


class Payload:
    """A pickle that runs a command when loaded: what a crafted weight file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bad_input_one_line_each(runs, tmp_path, capsys):
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
    cases = [  # (script, flags, the one line it must print)
        (train_tokenizer, [*T, "--steps", "0"], "argument --steps: must be > 0, got 0"),
        (train_tokenizer, [*T, "--batch_size", "-8"], "argument --batch_size: must be > 0"),
        (train_tokenizer, [*T, "--ema", "1.5"], "argument --ema: must be >= 0 and <= 1"),
        (train_tokenizer, [*T, "--img_size", "36"], "--img_size 36 is not a multiple of --patch_size 8"),
        (train_tokenizer, [*T, "--steps", "4", "--stop_at", "9"], "--stop_at 9 must lie after the current step 0"),
        (train_tokenizer, [*T, "--out", str(tmp_path / "afile")], "afile is a file; expected a folder"),
        (train_tokenizer, [*T, "--resume", "--overwrite"], "pass one of them"),
        (train_tokenizer, [*T, "--decoder_finetune"], "need --init_from"),
        (train_tokenizer, [*T, "--stats_only", "--resume"], "--stats_only only measures"),
        (train_tokenizer, [*T, "--init_from", str(junk)], "junk.pt' is not a readable checkpoint"),
        (train_tokenizer, [*T, "--init_from", str(crafted)], "crafted.pt' was refused: it holds Python objects"),
        (train_tokenizer, [*T, "--data_path", str(tmp_path / "nowhere")], "data folder .*nowhere' does not exist"),
        (train_tokenizer, [*T, "--data_path", str(tmp_path / "hole")], "class folder .*hole/a' holds no images"),
        (train_tokenizer, [*T, "--data_path", str(folder), "--teacher", "shapes"], "--teacher shapes is trained on the embedded shapes"),
        (train_dit, [*D[:-1], str(tmp_path / "none.pt")], "tokenizer checkpoint .*none.pt' does not exist"),
        (train_dit, [*D, "--latent_stats", str(pkl)], "asks for posix.system, which no statistics file needs"),
        (train_dit, [*D, "--latent_stats", str(tmp_path / "floats.npz")], "floats.npz' cannot be used"),
        (train_dit, [*D, "--decay_start_epoch", "5", "--decay_end_epoch", "1"], "--decay_end_epoch 1.0 lies before"),
        (sample, [*S, "--cfg", "-1"], "argument --cfg: must be >= 0, got -1"),
        (sample, [*S, "--cfg_interval", "0.9", "0.1"], "--cfg_interval 0.9 0.1 is reversed"),
        (sample, [*S, "--labels", "1", "--class_balanced"], "pass one"),
        (sample, [*S, "--trajectory"], "--trajectory writes a .png grid"),
        (sample, [*S, "--ag_scale", "2"], "--ag_scale needs --autoguidance_ckpt"),
        (sample, S, "is not a dit checkpoint: it is tokenizer"),
        (evaluate, ["gen", "--samples", str(tmp_path / "floats.npz"), "--shapes"], "samples must be uint8 .N, H, W, 3."),
        (evaluate, ["gen", "--samples", str(tmp_path / "labels.npz"), "--shapes"], "one label per sample in .0, 9."),
        (evaluate, ["gen", "--samples", npz + "x"], "no .npz and no PNG files"),
        (evaluate, ["probe", "--ckpt", tok, "--probe_ts", "1.5"], "argument --probe_ts: must be >= 0 and <= 1"),
        (evaluate, ["stats", "--data_path", str(folder)], "eval.py stats needs --data_path and --out"),
        (evaluate, ["recon", "--ckpt", str(crafted)], "was refused"),
    ]
    for script, flags, expected in cases:
        with pytest.raises(SystemExit) as e:
            R.run_cli(script.main, lambda: script.get_args(flags))
        printed = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(expected, printed) and "Traceback" not in printed and "\n" not in printed, (flags, printed)
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
        for p in dit.parameters():
            p.data.add_(0.05 * torch.randn_like(p)) if p.requires_grad else None
        ropes = {f"{a}_feat_rope.freqs_{c}": getattr(dit, f"rope_{b}")[i] for a, b in (("enc", "backbone"), ("dec", "head"))
                 for i, c in enumerate(("cos", "sin"))}
        torch.save({"model": official_names(dit.state_dict(), ropes), "model_ema": official_names(dit.state_dict())}, tmp_path / name)
    mean, std = torch.randn(8), torch.rand(8) + 0.5                        # 2C moments, as collect_tokenizer_stats keeps them
    with open(tmp_path / "stats.pkl", "wb") as f:                          # written as the official code writes it
        pickle.dump({"rectok_official_evaluation": {"single": (mean.mean(), std.mean()), "channel": (mean, std)}}, f)
    npz = str(tmp_path / "samples.npz")
    sample.main(sample.get_args(["--ckpt", str(tmp_path / "ditdhxl.pth"), "--tokenizer_ckpt", str(tmp_path / "RecTok_decft.pth"),
                                 "--latent_stats", str(tmp_path / "stats.pkl"), "--autoguidance_ckpt", str(tmp_path / "ditdhs.pth"),
                                 "--steps", "3", "--num_images", "20", "--class_balanced", "--out", npz]))
    assert "AutoGuidance 1.29" in capsys.readouterr().out and np.load(npz)["arr_0"].shape == (20, 32, 32, 3)
    assert torch.equal(train_dit.read_latent_stats(str(tmp_path / "stats.pkl"), 4)[0], mean[:4])   # the posterior mean's half
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    res = evaluate.main(evaluate.get_args(["gen", "--samples", npz, "--ref_stats", str(ref), "--inception", "random", "--allow_small"]))
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
    assert torch.allclose(evaluate.tf1_resize(x.expand(1, 1, 3, 4), 3)[0, 0, 0], torch.tensor([0, 10 + 10 / 3, 20 + 20 * 2 / 3]))
    # 2 -> 3: positions 0, 0.67, 1.33; the last one's upper neighbour is clamped to the last pixel
    assert torch.allclose(evaluate.tf1_resize(torch.tensor([[[[0.0, 30], [0, 30]]]]), 3)[0, 0, 0], torch.tensor([0.0, 20, 30]))
    logits = torch.randn(15, 6, generator=torch.Generator().manual_seed(0)).double()
    p = logits[np.random.RandomState(2020).permutation(15)].softmax(1)
    cuts = [k * 15 // 10 for k in range(11)]                               # torch-fidelity's splits: 1, 2, 1, 2, ...
    kl = [(q * (q.log() - q.mean(0).log())).sum(1).mean().exp().item() for q in (p[a:b] for a, b in zip(cuts, cuts[1:]))]
    assert evaluate.inception_score(logits)[0] == pytest.approx(np.mean(kl), abs=1e-12)


@pytest.fixture(scope="module")
def shapes_teacher(runs):
    """A small shapes teacher at 32 px, cached where the scripts look for it (the quick preset's default teacher)."""
    return R.trained_classifier(lambda: R.ClassTeacher(32, 8), lambda net, x: net.head(net(x)), "shapes_teacher_p8_32px_10",
                                lambda: R.shapes_batches(1200, 32, 10, seed=2), R.Shapes(1000, 32, seed=1), seed=2, epochs=4)


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
        tok = R.RecTok(R.TokenizerConfig(32, 8, 4, (64, 2, 2), (32, 1, 2), (16, 1, 1), teacher.dim))  # a tiny semantic decoder
        opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
        for _ in range(100):
            i = torch.randint(320, (32,))
            recon, pred, kl = tok(x[i])
            loss = F.mse_loss(recon, x[i]) / 4 + 1e-6 * kl + weight * R.semantic_loss(pred, target[i])
            opt.zero_grad(), loss.backward(), opt.step()
        accs.append(probe_accuracy(lambda img: tok.eval().encode(img)[0]))
    assert accs[1] > accs[0] + 0.15, accs                                  # measured: 15.5% -> 54%
    # Without a teacher flag, the quick preset on the embedded shapes distils the shapes teacher.
    ckpt = run(train_tokenizer, [f for f in TOK if f not in ("--teacher", "random")], tmp_path, "--steps", "2")
    assert torch.load(ckpt, weights_only=True)["recipe"]["teacher"] == "shapes" and "semantic" in json.loads(open(tmp_path / "log.jsonl").readline())


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
