"""Self-supervised MedLAM training: unified anatomical mapping (UAM) + multi-scale similarity (MSS).

One training sample is two locations c0, c1 anywhere inside the body of one CT (canonical
3 mm grid, MedLAM intensities). For each location we cut

* an *original* patch: a plain 64^3 crop (both crops shifted by the same random offset), and
* an *augmented* patch: the same neighbourhood sampled through a random affine + elastic warp,
  then intensity-remapped and noised.

Because the augmented patch is sampled directly from the volume through a warped grid, its
position map (the canonical coordinate each voxel came from) *is* that grid: image and position
map are warped together exactly, with no border artefacts to crop away.

Losses (as in the paper / reference):

* UAM: ``MSE(r * tanh(p(ori0) - p(ori1)), pos(ori0) - pos(ori1))`` in mm^2, r = (1500, 600, 600)
  mm on the (S, A, L) axes, on the unaugmented pair only.
* MSS: for random points of each original patch, a softmax (temperature 1/15) of cosine
  similarities against every voxel of the augmented view of the same place, at every decoder
  scale; voxels within 3*s mm of the point's true position are positives, beyond 6*s mm
  negatives (s = the scale's down-sampling factor).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import InputError
from ..geometry import rotation_xyz
from ..io import atomic_path, read_ct, VOLUME_SUFFIXES
from ..preprocess import medlam_intensity, to_canonical
from .checkpoint import FRAME, save_weights
from .network import CONFIGS, MedLAM

DISTANCE_RATIO = torch.tensor(FRAME["distance_ratio_mm"])
SPACING = FRAME["spacing_mm"]
BODY_THRESHOLD = 0.05  # MedLAM intensity ~ -800 HU: patch centres are drawn inside the body


@dataclass
class TrainOptions:
    config: str = "lite"
    steps: int = 2000
    batch_size: int = 2
    lr: float = 3e-4
    weight_decay: float = 1e-4
    mss_points: int = 20
    mss_weight: float = 1.0
    seed: int = 2023
    checkpoint_minutes: float = 5.0
    val_volumes: int = 4
    device: str = "auto"


# --- data ----------------------------------------------------------------------------------
def list_images(spec: str | os.PathLike) -> list[Path]:
    """A folder (every volume file in it) or a text file with one path per line."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.lower().endswith(VOLUME_SUFFIXES))
    elif p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
        files = [Path(ln) if os.path.isabs(ln) else p.parent / ln for ln in lines]
    else:
        raise InputError(f"{p}: no such folder or list file")
    if not files:
        raise InputError(f"{p}: no images found")
    return files


def load_training_volume(path: Path, cache_dir: Path | None) -> np.ndarray:
    """Canonical 3 mm MedLAM-intensity array (float16), cached on disk by path/size/mtime."""
    stat = path.stat()
    key = f"{path.name}-{stat.st_size}-{int(stat.st_mtime)}.npy"
    if cache_dir is not None and (cache_dir / key).exists():
        return np.load(cache_dir / key)
    canon = to_canonical(read_ct(path), SPACING)
    arr = medlam_intensity(canon.array).astype(np.float16)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_dir / key) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return arr


class PairSampler:
    """Draws (ori0, ori1, aug0, aug1) patches and their position maps from a list of volumes."""

    def __init__(self, volumes: list[np.ndarray], patch: int, rng: np.random.Generator, device):
        self.patch = patch
        self.rng = rng
        self.device = device
        self.volumes = [torch.from_numpy(v.astype(np.float32))[None, None] for v in volumes]
        # Candidate centres: body voxels on a 2-voxel lattice (cheap to store, plenty of choice).
        self.centres = []
        for v in volumes:
            idx = np.argwhere(v[::2, ::2, ::2] >= BODY_THRESHOLD) * 2
            if len(idx) == 0:
                idx = np.argwhere(np.ones_like(v[::2, ::2, ::2], dtype=bool)) * 2
            self.centres.append(idx)
        half = patch // 2
        self.offsets = torch.stack(torch.meshgrid(*[torch.arange(-half, half, dtype=torch.float32)] * 3,
                                                  indexing="ij"), dim=-1)  # [P,P,P,3]

    def _sample(self, vol: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Trilinear sample of ``vol`` [1,1,D,H,W] at voxel coords [...,3] (a0,a1,a2); 0 outside."""
        size = torch.tensor(vol.shape[2:], dtype=torch.float32)
        norm = 2 * coords / (size - 1) - 1
        grid = norm[..., [2, 1, 0]][None]  # grid_sample wants (x=W, y=H, z=D)
        return F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]

    def _warp(self) -> torch.Tensor:
        """Random affine (+-15 deg, +-10 %) plus smooth elastic displacement (<= 3 voxels)."""
        r = self.rng
        coords = self.offsets
        if r.random() < 0.5:
            angles = np.deg2rad(r.uniform(-15, 15, 3))
            scales = r.uniform(0.9, 1.1, 3)
            rot = rotation_xyz(*angles) @ np.diag(scales)
            coords = coords @ torch.tensor(rot.T, dtype=torch.float32)
        if r.random() < 0.5:
            ctrl = torch.tensor(r.uniform(-3, 3, (3, 5, 5, 5)), dtype=torch.float32)[None]
            disp = F.interpolate(ctrl, size=(self.patch,) * 3, mode="trilinear", align_corners=True)[0]
            coords = coords + disp.permute(1, 2, 3, 0)
        return coords

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rng
        if r.random() < 0.5:  # random monotone remap
            knots = [0.2, 0.4, 0.6, 0.8]
            u = [r.uniform(knots[i], knots[i + 1]) for i in range(3)]
            x = sum(torch.sigmoid((x - ui) / 0.1) for ui in u) / 3
        if r.random() < 0.5:
            x = x + torch.randn(x.shape, generator=self._torch_gen()) * r.uniform(0, 0.1)
        return x

    def _torch_gen(self):
        return torch.Generator().manual_seed(int(self.rng.integers(2**62)))

    def batch(self, batch_size: int) -> dict:
        ori, aug, ori_pos, aug_pos = [[], []], [[], []], [[], []], [[], []]
        half = self.patch // 2
        for _ in range(batch_size):
            v = int(self.rng.integers(len(self.volumes)))
            vol, cands = self.volumes[v], self.centres[v]
            shift = self.rng.integers(-8, 9, 3)  # same offset for both original crops
            for n in range(2):
                c = cands[self.rng.integers(len(cands))].astype(np.float32)
                o_coords = self.offsets + torch.tensor(c + shift, dtype=torch.float32)
                a_coords = self._warp() + torch.tensor(c, dtype=torch.float32)
                ori[n].append(self._sample(vol, o_coords))
                aug[n].append(self._intensity(self._sample(vol, a_coords)))
                ori_pos[n].append(o_coords)
                aug_pos[n].append(a_coords)
        st = lambda xs: torch.stack(xs).to(self.device)  # noqa: E731
        out = {
            "ori": st(ori[0] + ori[1])[:, None],  # [2B,1,P,P,P]: patch 0s then patch 1s
            "aug": st(aug[0] + aug[1])[:, None],
            "ori_pos": st(ori_pos[0] + ori_pos[1]) * SPACING,  # [2B,P,P,P,3] mm
            "aug_pos": st(aug_pos[0] + aug_pos[1]) * SPACING,
        }
        out["offset"] = out["ori_pos"][:batch_size, half, half, half] - out["ori_pos"][batch_size:, half, half, half]
        return out




# --- losses --------------------------------------------------------------------------------
def uam_loss(latent_a: torch.Tensor, latent_b: torch.Tensor, offset_mm: torch.Tensor) -> torch.Tensor:
    """MSE (mm^2) between r * tanh(latent_a - latent_b) and the true offset a - b in mm."""
    pred = DISTANCE_RATIO.to(latent_a) * torch.tanh(latent_a - latent_b)
    return F.mse_loss(pred, offset_mm)


def mss_loss(ori_feats, aug_feats, ori_img, ori_pos, aug_pos, scales, points: int, gen: torch.Generator,
             temperature: float = 15.0, pos_mm: float = SPACING, neg_mm: float = 2 * SPACING) -> torch.Tensor:
    """Multi-scale contrastive similarity between original and augmented views of one place."""
    p = ori_img.shape[-1]
    # Points inside the body of each original patch (fall back to anywhere if a patch is air).
    body = (ori_img[:, 0] >= BODY_THRESHOLD).flatten(1).float() + 1e-6
    flat_idx = torch.multinomial(body.cpu(), points, replacement=True, generator=gen).to(ori_img.device)
    vox = torch.stack([flat_idx // (p * p), (flat_idx // p) % p, flat_idx % p], -1)  # [N,points,3]
    q_pos = ori_pos.flatten(1, 3).gather(1, flat_idx[..., None].expand(-1, -1, 3))  # [N,points,3] mm
    total = 0.0
    for f_ori, f_aug, s in zip(ori_feats, aug_feats, scales):
        d = p // s
        v = vox // s
        lin = (v[..., 0] * d + v[..., 1]) * d + v[..., 2]
        q = F.normalize(f_ori.flatten(2), dim=1).gather(2, lin[:, None].expand(-1, f_ori.shape[1], -1))  # [N,C,pts]
        k = F.normalize(f_aug.flatten(2), dim=1)  # [N,C,d^3]
        logits = temperature * torch.einsum("ncp,ncv->npv", q, k)
        logp = F.log_softmax(logits, dim=-1)
        key_pos = F.avg_pool3d(aug_pos.permute(0, 4, 1, 2, 3), s).flatten(2) if s > 1 else \
            aug_pos.permute(0, 4, 1, 2, 3).flatten(2)  # [N,3,d^3]
        dist = torch.cdist(q_pos, key_pos.transpose(1, 2))  # [N,pts,d^3]
        pos = (dist <= pos_mm * s).float()
        neg = (dist >= neg_mm * s).float()
        log_not = torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        total = total - (logp * pos).sum() / pos.sum().clamp(min=1) - (log_not * neg).sum() / neg.sum().clamp(min=1)
    return total / len(scales)


# --- loop ----------------------------------------------------------------------------------
def _rng_state(np_rng: np.random.Generator) -> dict:
    return {"numpy": json.dumps(np_rng.bit_generator.state), "python": json.dumps(random.getstate()),
            "torch": torch.get_rng_state()}


def _set_rng_state(np_rng: np.random.Generator, state: dict) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])


class Trainer:
    """Resumable training run writing to ``out_dir``:
    ``last.pt`` (full state), ``medlam.pt`` (weights), ``loss.csv``, ``loss.png``."""

    def __init__(self, images: list[Path], out_dir: Path, opts: TrainOptions, log=print):
        self.opts, self.out, self.log = opts, Path(out_dir), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(opts.device)
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)
        self.rng = np.random.default_rng(opts.seed)
        if opts.config not in CONFIGS:
            raise InputError(f"unknown config {opts.config!r}; choose {', '.join(CONFIGS)}")
        config = CONFIGS[opts.config]
        if opts.config == "reference":
            config = type(config)(**{**config.to_dict(), "dropout": 0.2})
        self.model = MedLAM(config).to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.history: list[dict] = []
        self.images = images
        self.start_wall = 0.0

        volumes, used = [], []
        from tqdm import tqdm

        for path in tqdm(images, desc="preparing volumes", unit="ct", leave=False):
            try:
                volumes.append(load_training_volume(path, self.out / "cache"))
                used.append(path)
            except InputError as exc:
                self.log(f"skipping {path.name}: {exc}")
        if len(volumes) < 2:
            raise InputError("need at least two readable CT volumes to train")
        n_val = min(opts.val_volumes, len(volumes) // 5)
        self.train_names = [p.name for p in used[n_val:]]
        self.val_names = [p.name for p in used[:n_val]]
        self.sampler = PairSampler(volumes[n_val:], config.patch_size, self.rng, self.device)
        self.val_batches = []
        if n_val:
            val_sampler = PairSampler(volumes[:n_val], config.patch_size, np.random.default_rng(12345), self.device)
            self.val_batches = [val_sampler.batch(4) for _ in range(8)]

    # -- state ---------------------------------------------------------------------------
    def save(self) -> None:
        state = {"step": self.step, "model": self.model.state_dict(), "optim": self.optim.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": _rng_state(self.rng),
                 "history": json.dumps(self.history), "options": json.dumps(asdict(self.opts)),
                 "wall_s": self.wall_seconds()}
        with atomic_path(self.out / "last.pt") as tmp:
            torch.save(state, tmp)
        info = {"steps": self.step, "wall_s": round(self.wall_seconds(), 1), "device": str(self.device),
                "options": asdict(self.opts), "train_volumes": len(self.train_names),
                "val_volumes": self.val_names, "torch": str(torch.__version__)}
        save_weights(self.model, self.out / "medlam.pt", info)
        self._write_curves()

    def resume(self) -> bool:
        path = self.out / "last.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(self.rng, state["rng"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self._wall_before = float(state["wall_s"])
        return True

    def wall_seconds(self) -> float:
        return getattr(self, "_wall_before", 0.0) + (time.time() - self.start_wall if self.start_wall else 0.0)

    def _write_curves(self) -> None:
        if not self.history:
            return
        keys = list(self.history[0])
        with atomic_path(self.out / "loss.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys + [k for k in self.history[-1] if k not in keys])
                w.writeheader()
                w.writerows(self.history)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        steps = [h["step"] for h in self.history]
        axes[0].plot(steps, [math.sqrt(max(h["uam"], 0)) for h in self.history], lw=0.7)
        axes[0].set_title("UAM training RMSE (mm)")
        axes[1].plot(steps, [h["mss"] for h in self.history], lw=0.7, color="C1")
        axes[1].set_title("MSS training loss")
        val = [(h["step"], h["val_mae_mm"]) for h in self.history if h.get("val_mae_mm") not in (None, "")]
        if val:
            axes[2].plot(*zip(*val), marker="o", color="C2")
        axes[2].set_title("validation offset MAE (mm, held-out CTs)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.out / "loss.png") as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)

    # -- steps ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        self.model.train()
        b = self.opts.batch_size
        batch = self.sampler.batch(b)
        gen = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        with torch.autocast(self.device.type, enabled=self.amp, dtype=torch.float16):
            out = self.model(torch.cat([batch["ori"], batch["aug"]]))
        lat = out["position"].float()
        feats = [f.float() for f in out["features"]]
        uam = uam_loss(lat[:b], lat[b:2 * b], batch["offset"])
        mss = mss_loss([f[:2 * b] for f in feats], [f[2 * b:] for f in feats], batch["ori"], batch["ori_pos"],
                       batch["aug_pos"], self.model.config.feature_scales, self.opts.mss_points, gen)
        loss = uam + self.opts.mss_weight * mss
        self.optim.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optim)
        self.scaler.update()
        return {"uam": float(uam.detach()), "mss": float(mss.detach())}

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean absolute error (mm) of predicted offsets between held-out patch pairs."""
        if not self.val_batches:
            return None
        self.model.eval()
        errs = []
        for batch in self.val_batches:
            b = batch["offset"].shape[0]
            lat = self.model(batch["ori"], features=False)["position"].float()
            pred = DISTANCE_RATIO.to(lat) * torch.tanh(lat[:b] - lat[b:])
            errs.append((pred - batch["offset"]).abs().mean().item())
        return float(np.mean(errs))

    def run(self, resume: bool = False) -> Path:
        from tqdm import tqdm

        if resume and self.resume():
            self.log(f"resumed at step {self.step}")
        self.start_wall = time.time()
        last_save = time.time()
        bar = tqdm(total=self.opts.steps, initial=self.step, desc="training MedLAM", unit="step", dynamic_ncols=True)
        val_every = max(50, self.opts.steps // 40)
        while self.step < self.opts.steps:
            losses = self.train_step()
            self.step += 1
            row = {"step": self.step, **losses, "val_mae_mm": ""}
            if self.step % val_every == 0 or self.step == self.opts.steps:
                v = self.validate()
                row["val_mae_mm"] = "" if v is None else round(v, 3)
            self.history.append(row)
            bar.update(1)
            bar.set_postfix(uam_rmse_mm=f"{math.sqrt(losses['uam']):.1f}", mss=f"{losses['mss']:.3f}")
            if time.time() - last_save > 60 * self.opts.checkpoint_minutes:
                self.save()
                last_save = time.time()
        bar.close()
        self.save()
        return self.out / "medlam.pt"
