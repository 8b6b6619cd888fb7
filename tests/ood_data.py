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
    """uint8 [res, res]: PIL "L", bilinear to ``res`` (the gate bench's recorded preprocessing; the loader
    and the page resize with Lanczos, cxr.data.shard_index.to_resolution)."""
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
        ImageDraw.Draw(im).text(
            (int(rng.integers(0, res // 4)), int(rng.integers(-res // 8, res // 8))),
            str(rng.integers(0, 100)),
            fill=fg,
            font=ImageFont.load_default(size),
        )
        out.append(np.asarray(im))
    return np.stack(out)


def normalise(pixels: np.ndarray):
    """uint8 [n, res, res] → float32 tensor [n, 1, res, res] normalised as the loader does."""
    import torch

    return ((torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD).unsqueeze(1)


# ------------------------------------------------------------------ non-X-ray kinds of the gate's bench ---
# Each makes n PIL images at their own size and mode (RGB where colour is part of the kind); the gate sees
# them as the loader and the page do: PIL convert("L"), bilinear resize (to_pixels). bench/ood_gate.py
# keeps the tuning kinds (textures, digits, inverted / rotated X-rays above) apart from these test kinds.
def to_pixels(images, res: int = RES) -> np.ndarray:
    """PIL images → uint8 [n, res, res]: grey, bilinear (as load_grey; not the loader's Lanczos)."""
    out = []
    for im in images:
        im = im.convert("L") if im.mode != "L" else im
        out.append(np.asarray(im.resize((res, res), Image.BILINEAR) if im.size != (res, res) else im))
    return np.stack(out)


def _words(rng, n: int) -> str:
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    weights = np.linspace(2, 0.2, len(letters))
    weights /= weights.sum()
    return " ".join("".join(rng.choice(list(letters), size=int(rng.integers(1, 10)), p=weights)) for _ in range(n))


def plots(n: int, seed: int) -> list:
    """matplotlib figures (Agg): line, scatter, bar, histogram or heat-map panels, 1–2 per figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cols = int(rng.integers(1, 3))
        fig, axes = plt.subplots(
            1, cols, figsize=(rng.uniform(4, 7), rng.uniform(3, 5)), dpi=int(rng.integers(60, 110)), squeeze=False
        )
        for ax in axes[0]:
            kind = rng.integers(0, 5)
            x = np.linspace(0, rng.uniform(1, 20), 100)
            if kind == 0:
                for _ in range(rng.integers(1, 4)):
                    ax.plot(x, np.sin(x * rng.uniform(0.2, 2)) * rng.uniform(0.5, 3) + rng.normal(0, 0.2, x.size))
            elif kind == 1:
                ax.scatter(rng.normal(size=200), rng.normal(size=200), s=rng.uniform(2, 20), alpha=0.7)
            elif kind == 2:
                ax.bar(np.arange(8), rng.uniform(1, 10, 8), color=plt.cm.tab10(rng.integers(0, 10)))
            elif kind == 3:
                ax.hist(rng.gamma(2, 2, 500), bins=int(rng.integers(10, 40)))
            else:
                ax.imshow(rng.normal(size=(12, 12)).cumsum(0), cmap=str(rng.choice(["viridis", "magma", "coolwarm"])))
            ax.set_title(_words(rng, 3))
            ax.set_xlabel(_words(rng, 1))
            ax.set_ylabel(_words(rng, 1))
            if rng.random() < 0.5:
                ax.grid(True)
        fig.tight_layout()
        fig.canvas.draw()
        out.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(fig)
    return out


def screenshots(n: int, seed: int) -> list:
    """UI-like screens: a title bar, a side bar, toolbar buttons, text rows and panels, light or dark theme."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(480, 1024)), int(rng.integers(320, 768))
        dark = rng.random() < 0.4
        bg = tuple(int(v) for v in (rng.integers(20, 50, 3) if dark else rng.integers(225, 256, 3)))
        fg = (220, 220, 220) if dark else (30, 30, 30)
        accent = tuple(int(v) for v in rng.integers(0, 256, 3))
        im = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(im)
        bar = int(rng.integers(20, 40))
        d.rectangle([0, 0, w, bar], fill=accent)
        d.text((10, bar // 4), _words(rng, 4), fill=(255, 255, 255), font=ImageFont.load_default(bar // 2))
        side = int(rng.integers(0, w // 4))
        if side:
            d.rectangle([0, bar, side, h], fill=tuple(max(0, c - 15) for c in bg))
            for y in range(bar + 10, h - 20, 24):
                d.text((8, y), _words(rng, 2), fill=fg, font=ImageFont.load_default(12))
        y = bar + 10
        for _ in range(rng.integers(2, 6)):
            x = side + 10
            for _ in range(rng.integers(1, 5)):
                bw = int(rng.integers(50, 120))
                d.rounded_rectangle(
                    [x, y, x + bw, y + 24], radius=5, fill=accent if rng.random() < 0.3 else bg, outline=fg
                )
                d.text((x + 6, y + 5), _words(rng, 1)[:8], fill=fg, font=ImageFont.load_default(12))
                x += bw + 10
            y += 34
            for _ in range(rng.integers(1, 6)):
                d.text((side + 10, y), _words(rng, int(rng.integers(4, 12))), fill=fg, font=ImageFont.load_default(13))
                y += 18
            if rng.random() < 0.5 and y < h - 60:
                ph = int(rng.integers(30, 100))
                d.rectangle([side + 10, y, w - 10, y + ph], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
                y += ph + 10
        out.append(im)
    return out


def documents(n: int, seed: int) -> list:
    """Pages of text: a heading and paragraphs of words on white or cream paper, portrait."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = int(rng.integers(400, 850))
        h = int(w * rng.uniform(1.2, 1.5))
        paper = tuple(int(v) for v in ((255, 255, 255) if rng.random() < 0.6 else (250, 245, 230)))
        im = Image.new("RGB", (w, h), paper)
        d = ImageDraw.Draw(im)
        size = int(rng.integers(10, 18))
        margin = int(w * rng.uniform(0.06, 0.14))
        y = margin
        d.text((margin, y), _words(rng, 4).title(), fill=(0, 0, 0), font=ImageFont.load_default(2 * size))
        y += 3 * size
        per_line = max(3, (w - 2 * margin) // (size * 4))
        while y < h - margin:
            for _ in range(rng.integers(3, 9)):
                if y >= h - margin:
                    break
                d.text((margin, y), _words(rng, int(per_line)), fill=(20, 20, 20), font=ImageFont.load_default(size))
                y += int(size * 1.4)
            y += size
        out.append(im)
    return out


def photos(n: int, seed: int) -> list:
    """Crops of scikit-image's bundled photographs (people, animals, objects, sky, microscopy, a retina)."""
    from skimage import data

    names = (
        "astronaut",
        "camera",
        "cat",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "moon",
        "coins",
        "clock",
        "immunohistochemistry",
        "retina",
        "horse",
        "cell",
    )
    pool = [np.asarray(getattr(data, name)()) for name in names]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = pool[(i + int(rng.integers(0, len(pool)))) % len(pool)]
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = a[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(Image.fromarray(np.ascontiguousarray(crop)))
    return out


def ct_slices(n: int, seed: int) -> list:
    """Another radiological image: the Shepp–Logan CT phantom, scaled, rotated, blurred and noisy."""
    from skimage.data import shepp_logan_phantom
    from skimage.filters import gaussian
    from skimage.transform import rotate

    base = shepp_logan_phantom()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rotate(base, rng.uniform(-30, 30))
        a = gaussian(a, rng.uniform(0.5, 3)) * rng.uniform(0.6, 1.0) + rng.normal(0, rng.uniform(0.01, 0.06), a.shape)
        out.append(Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)))
    return out


def limb_radiographs(n: int, seed: int) -> list:
    """A stand-in for radiographs of other body parts (a forearm or a leg): a soft-tissue band and two
    bright bones with denser cortex on a dark field, blurred and noisy, at a random angle."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    out = []
    size = 256
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        ang = rng.uniform(-0.5, 0.5)
        u = (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang)  # across the limb
        a = np.full((size, size), rng.uniform(0.02, 0.15))
        tissue = np.abs(u) < rng.uniform(0.18, 0.3)
        a[tissue] += rng.uniform(0.2, 0.35)
        for off in rng.uniform(-0.12, 0.12, int(rng.integers(1, 3))):
            r = rng.uniform(0.025, 0.06)
            d = np.abs(u - off)
            a[d < r] += rng.uniform(0.3, 0.45)
            a[(d < r) & (d > 0.6 * r)] += rng.uniform(0.1, 0.2)
        a = gaussian(a, rng.uniform(1, 3)) + rng.normal(0, 0.02, a.shape)
        out.append(Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)))
    return out


def noise(n: int, seed: int) -> list:
    """Uniform, Gaussian or salt-and-pepper noise, grey or colour."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape = (int(rng.integers(128, 512)), int(rng.integers(128, 512))) + ((3,) if rng.random() < 0.5 else ())
        kind = rng.integers(0, 3)
        if kind == 0:
            a = rng.integers(0, 256, shape)
        elif kind == 1:
            a = rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), shape)
        else:
            a = np.where(rng.random(shape) < rng.uniform(0.05, 0.5), 255 * (rng.random(shape) < 0.5), 128)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def checkerboards(n: int, seed: int) -> list:
    """Checkerboards of random square size and two random colours."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size, sq = int(rng.integers(128, 512)), int(rng.integers(4, 64))
        yy, xx = np.mgrid[0:size, 0:size] // sq
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        a = np.where(((yy + xx) % 2 == 0)[..., None], c1, c2)
        out.append(Image.fromarray(a.astype(np.uint8)))
    return out


def colour_blobs(n: int, seed: int) -> list:
    """Soft coloured ellipses on a coloured background."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(128, 512))
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(rng.integers(2, 9)):
            x, y = rng.integers(0, size, 2)
            r = rng.integers(size // 12, size // 3, 2)
            d.ellipse(
                [int(x - r[0]), int(y - r[1]), int(x + r[0]), int(y + r[1])],
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            )
        out.append(im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, size / 20)))))
    return out


# the kinds the bench and the tests hold out from the gate's tuning
TEST_KINDS = {
    "plots": plots,
    "screenshots": screenshots,
    "documents": documents,
    "photos": photos,
    "CT slices": ct_slices,
    "limb radiographs": limb_radiographs,
    "noise": noise,
    "checkerboards": checkerboards,
    "colour blobs": colour_blobs,
}
