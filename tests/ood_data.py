"""Test data of the OOD gate at 64 px: in-distribution images (phantoms + the real NIH sample) and
natural-looking outliers (textures, PIL digits, inverted and rotated X-rays), all made the way the
loader makes its pixels (PIL convert L, bilinear resize) so the autoencoder sees loader-like input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RES = 64
MEAN, STD = 0.5176, 0.2542  # DataConfig defaults: what the loader normalises with


def load_grey(path: Path, res: int = RES) -> np.ndarray:
    """uint8 [res, res], as cxr/data/wds_loader.decode_resize makes it."""
    with Image.open(path) as im:
        im = im.convert("L") if im.mode != "L" else im.copy()
    return np.array(im.resize((res, res), Image.BILINEAR) if im.size != (res, res) else im)


def textures(n: int, seed: int, res: int = RES) -> np.ndarray:
    """Photo-like textures: low-pass filtered noise at random scales, contrast-stretched."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (rng.integers(4, 24),) * 2, dtype=np.uint8)
        im = Image.fromarray(small).resize((res, res), Image.BICUBIC)
        noise = rng.normal(0, rng.uniform(5, 30), (res, res))
        out.append(np.clip(np.asarray(im, np.float64) + noise, 0, 255).astype(np.uint8))
    return np.stack(out)


def digits(n: int, seed: int, res: int = RES) -> np.ndarray:
    """Digits drawn with PIL's default (FreeType) font filling most of the frame, as in MNIST;
    random grey levels, one or two digits, random offset."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = int(rng.integers(0, 256))
        fg = (bg + int(rng.integers(80, 176))) % 256  # always a visible digit
        size = int(rng.integers(res // 2, res))
        im = Image.new("L", (res, res), bg)
        ImageDraw.Draw(im).text((int(rng.integers(0, res // 4)), int(rng.integers(-res // 8, res // 8))),
                                str(rng.integers(0, 100)), fill=fg, font=ImageFont.load_default(size))
        out.append(np.asarray(im))
    return np.stack(out)


def normalise(pixels: np.ndarray):
    """uint8 [n, res, res] → float32 tensor [n, 1, res, res] normalised as the loader does."""
    import torch

    return ((torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD).unsqueeze(1)
