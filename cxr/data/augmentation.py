"""Train-time augmentation: per-sample parameters, and the torch implementation of the pixel path.

Pipeline order (both back ends):

  decode → grey uint8 → resize to R×R (shards.image_codec.resize_grey, the filter of
  `pack --resize`: PIL Lanczos, antialiased; skipped when already R×R)
  → [train & augment] one affine warp combining h-flip, rotation, zoom, shift
    (bilinear, black fill, rounded back to uint8)
  → handed over as uint8 (with b, c when augmenting; DALI "mixed" does the rest in its graph)
  → on the training device (cxr.data.batch.to_device):
    x = pixel / 255 → [train & augment] y = clip(b · (0.5 + c · (x − 0.5)), 0, 1)
  → (y − mean) / std → float32 [1, R, R]

Parameters are drawn here, in Python, from a PCG64 stream seeded by
(seed, epoch, blake2b(key)): a sample's augmentation depends only on those three, so
it is reproducible, unchanged by `skip_batches`, by the rank layout and by worker
timing, and the two back ends apply the *same* parameters (DALI receives them as
per-sample inputs of `fn.warp_affine`). Their outputs differ only by interpolation
details (see tests/test_loaders.py for the measured tolerance).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from cxr.data.config import DataConfig


@dataclass(frozen=True)
class AugParams:
    """Per-sample augmentation, vectorised over n samples."""

    matrix: np.ndarray  # float32 [n, 2, 3]: destination → source pixel coords (centres at +0.5)
    brightness: np.ndarray  # float32 [n]
    contrast: np.ndarray  # float32 [n]


def key_seed(key: str) -> int:
    """Stable 64-bit integer of a key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def draw_params(keys: list[str], cfg: DataConfig, epoch: int, resolution: int) -> AugParams:
    """Draw flip / angle / zoom / shift / brightness / contrast for each key (see module doc)."""
    n = len(keys)
    matrix = np.empty((n, 2, 3), np.float32)
    bright = np.empty(n, np.float32)
    contr = np.empty(n, np.float32)
    for i, key in enumerate(keys):
        u = np.random.default_rng([cfg.resolved_seed, epoch, key_seed(key)]).random(7)
        flip = u[0] < cfg.hflip_p
        angle = (2 * u[1] - 1) * cfg.rotate_deg
        zoom = 1 + (2 * u[2] - 1) * cfg.scale
        shift = (2 * u[3:5] - 1) * cfg.translate * resolution
        matrix[i] = affine_matrix(resolution, flip, angle, zoom, shift)
        bright[i] = 1 + (2 * u[5] - 1) * cfg.brightness
        contr[i] = 1 + (2 * u[6] - 1) * cfg.contrast
    return AugParams(matrix, bright, contr)


def affine_matrix(size: int, flip: bool, angle_deg: float, zoom: float, shift: np.ndarray) -> np.ndarray:
    """2×3 inverse map (output → input coordinates) of: flip, rotate, zoom about the centre, then shift.

    Forward: p' = c + t + zoom · Rot(angle) · F · (p − c) with F = diag(−1, 1) when flipped.
    """
    a = math.radians(angle_deg)
    rot_inv = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    flip_m = np.diag([-1.0 if flip else 1.0, 1.0])
    lin = flip_m @ rot_inv / zoom
    centre = np.full(2, size / 2.0)
    offset = centre - lin @ (centre + np.asarray(shift, float))
    return np.concatenate([lin, offset[:, None]], axis=1).astype(np.float32)


# ----- torch implementation (wds back end) -----


def warp_affine_torch(image, matrix: np.ndarray):
    """Apply a 2×3 inverse map to a float tensor [1, H, W] (bilinear, zero fill), like DALI warp_affine."""
    import torch
    import torch.nn.functional as F

    _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij"
    )
    m = torch.from_numpy(np.asarray(matrix, np.float32))
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    # grid_sample with align_corners=False puts −1/+1 on the outer pixel edges: x_n = 2x/W − 1
    grid = torch.stack([2 * src_x / w - 1, 2 * src_y / h - 1], dim=-1)[None]
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0]
