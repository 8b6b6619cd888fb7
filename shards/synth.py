"""`python -m shards synth`: phantom chest X-rays with a planted signature per label.

The phantoms stand in for NIH images in demos and tests: grey 8-bit PNGs with a
body, two lung fields with vessel markings and ribs, mediastinum and heart, and
per-image variation in position, size, contrast and noise. Each of the 14 labels
adds its own visual signature (see `_SIGNATURES`), sized to stay visible after
downsampling to 64 px so a small CNN can learn them. Output mirrors the NIH
release so `split` and `pack` run unchanged:

    OUT/images/{patient:08d}_{follow_up:03d}.png
    OUT/Data_Entry_2017.csv       (v2020 column layout)
    OUT/train_val_list.txt, OUT/test_list.txt   (patient-disjoint, ~80/20)
    OUT/boxes.csv                 (BBox_List_2017 layout: where each signature was drawn)

boxes.csv has one row per drawn element (a lesion, a blob, one lung's effusion, ...):
``Image Index,Finding Label,Bbox [x,y,w,h]`` in pixels of the phantom (its
resolution is the box frame, as 1024 is for the NIH file), so the explanation
tool scores phantoms with the parser of the NIH boxes. A box is the bounding box
of the pixels where the element's footprint reaches 10 % of its peak (Gaussian
blobs: ≈ 2.1 σ); Emphysema (whole lungs) has none, Cardiomegaly gets the heart.

Every image is drawn from its own RNG stream seeded by (seed, patient, follow-up),
so the bytes depend only on --seed, never on --workers.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbase.atomic import atomic_write, atomic_write_text
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, NUM_LABELS, format_findings
from cxrbase.progress import progress

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
# Every label gets at least this image-level prevalence, so that rare labels (NIH Hernia 0.2 %)
# have enough positives for a per-label AUROC on a few hundred images.
PREVALENCE_FLOOR = 0.05
# Independent priors used without --metadata (roughly NIH's order, floored).
_PRIORS = {
    "Atelectasis": 0.10,
    "Cardiomegaly": 0.06,
    "Consolidation": 0.06,
    "Edema": 0.05,
    "Effusion": 0.12,
    "Emphysema": 0.05,
    "Fibrosis": 0.05,
    "Hernia": 0.05,
    "Infiltration": 0.15,
    "Mass": 0.06,
    "Nodule": 0.07,
    "Pleural_Thickening": 0.05,
    "Pneumonia": 0.05,
    "Pneumothorax": 0.06,
}
TEST_FRACTION = 0.2
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # the NIH file's header, trailing columns included
BOX_LEVEL = 0.1  # a box covers the pixels where an element's footprint is ≥ 10 % of its peak
Box = tuple[int, int, int, int]  # x, y, w, h in pixels at the synth resolution


@dataclass(frozen=True)
class Case:
    """One phantom image to draw: identity, demographics and its 14 labels (0/1)."""

    patient: int
    follow_up: int
    age: int
    sex: str
    view: str
    labels: tuple[int, ...]

    @property
    def image(self) -> str:
        return f"{self.patient:08d}_{self.follow_up:03d}.png"


# ---------------------------------------------------------------- label sets and cases


def floored_row_weights(y: np.ndarray, floor: float = PREVALENCE_FLOOR, rounds: int = 50) -> np.ndarray:
    """Sampling weights over real label rows [N, 14] so every label's weighted prevalence ≥ floor.

    Rows holding an under-represented label are up-weighted (multiplicatively, per label
    held), which keeps the real co-occurrence given that label. Returns weights summing to 1.
    """
    y = y.astype(np.float64)
    present = y.sum(axis=0) > 0
    log_w = np.zeros(len(y))
    for _ in range(rounds):
        w = np.exp(log_w - log_w.max())
        prevalence = (w @ y) / w.sum()
        short = present & (prevalence < floor * 0.999)
        if not short.any():
            break
        log_w += y[:, short] @ np.log(floor / np.maximum(prevalence[short], 1e-12))
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


class LabelSampler:
    """Draws 14-label vectors: real NIH label sets (floored weights) or independent priors."""

    def __init__(self, metadata: str | Path | None):
        self.rows = None
        if metadata is not None:
            from shards.metadata import read_metadata

            self.rows = read_metadata(metadata)[list(LABELS)].to_numpy(dtype=np.uint8)
            self.weights = floored_row_weights(self.rows)
        self.priors = np.array([max(_PRIORS[name], PREVALENCE_FLOOR) for name in LABELS])

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n label vectors, uint8 [n, 14]."""
        if self.rows is not None:
            return self.rows[rng.choice(len(self.rows), size=n, p=self.weights)]
        return (rng.random((n, NUM_LABELS)) < self.priors).astype(np.uint8)


def plan_cases(n: int, seed: int, sampler: LabelSampler) -> list[Case]:
    """n cases over fake patients with 1–8 follow-ups each (ids from 1), ages/sex/view drawn."""
    rng = np.random.default_rng([seed, 0xCA5E])
    labels = sampler.draw(rng, n)
    cases: list[Case] = []
    patient = 0
    while len(cases) < n:
        patient += 1
        visits = int(min(rng.geometric(0.4), 8, n - len(cases)))
        age, sex = int(rng.integers(18, 86)), ("M" if rng.random() < 0.55 else "F")
        for follow_up in range(visits):
            view = "AP" if rng.random() < 0.35 else "PA"
            cases.append(Case(patient, follow_up, age, sex, view, tuple(int(v) for v in labels[len(cases)])))
            age += int(rng.random() < 0.3)
    return cases


def test_patients(cases: list[Case], seed: int) -> set[int]:
    """Seeded ~TEST_FRACTION of the patients (at least one when there are two or more)."""
    patients = sorted({c.patient for c in cases})
    n_test = max(int(round(TEST_FRACTION * len(patients))), 1 if len(patients) > 1 else 0)
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(patients))
    return {patients[i] for i in order[:n_test]}


# ---------------------------------------------------------------- drawing primitives


class Canvas:
    """Normalised coordinates on an R×R grid (x right, y down, both in [0, 1]) and soft shapes."""

    def __init__(self, resolution: int):
        self.size = resolution
        axis = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
        self.x, self.y = axis[None, :], axis[:, None]

    def radius(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        """Elliptic radius: < 1 inside the ellipse, 1 on its edge. [R, R] float32."""
        # Python floats keep the grid float32 (a NumPy float64 scalar would promote every array).
        cx, cy, rx, ry = float(cx), float(cy), float(rx), float(ry)
        dx, dy = self.x - cx, self.y - cy
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        return np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, edge: float = 0.01, angle: float = 0.0) -> np.ndarray:
        """Soft ellipse mask in [0, 1]; `edge` is the ramp width in image units."""
        ramp = max(edge / min(rx, ry), 1.0 / (self.size * min(rx, ry)))
        return np.clip((1.0 - self.radius(cx, cy, rx, ry, angle)) / ramp, 0.0, 1.0)

    def blob(self, cx: float, cy: float, sigma: float) -> np.ndarray:
        """Gaussian bump with peak 1."""
        cx, cy, sigma = float(cx), float(cy), float(sigma)
        return np.exp(-((self.x - cx) ** 2 + (self.y - cy) ** 2) / (2 * sigma * sigma))

    def noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Smooth noise, roughly N(0, 1): a cells×cells grid upsampled bicubically."""
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(up, dtype=np.float32)


@dataclass
class Lung:
    """One lung field: ellipse centre/radii, the lateral direction (−1 image left) and diaphragm curve."""

    cx: float
    cy: float
    rx: float
    ry: float
    lateral: float
    dome: float = 0.18  # how much lower the diaphragm sits at the edges than in the middle

    def mask(self, cv: Canvas) -> np.ndarray:
        """Soft lung-field mask [R, R]: the ellipse cut by the diaphragm curve."""
        top = cv.ellipse(self.cx, self.cy, self.rx, self.ry * 1.08, edge=0.012)
        u = (cv.x - self.cx) / self.rx
        floor = self.cy + self.ry * (0.72 + self.dome * u * u)
        return top * np.clip((floor - cv.y) / 0.01, 0.0, 1.0)

    def point(self, rng: np.random.Generator, zone: tuple[float, float] = (-0.6, 0.6)) -> tuple[float, float]:
        """A random point well inside the lung; zone limits the vertical position (−1 top … 1 base)."""
        a = rng.uniform(-0.55, 0.55)
        b = rng.uniform(*zone)
        return self.cx + a * self.rx, self.cy + b * self.ry * 0.8


@dataclass
class Anatomy:
    """Per-image geometry: body, two lungs (image-left = patient's right), heart, intensities."""

    shift: tuple[float, float]
    body: tuple[float, float, float, float]
    lungs: tuple[Lung, Lung]
    heart: tuple[float, float, float, float]
    lung_level: float
    tissue_level: float
    markings: float = 1.0  # vessel-marking strength (Emphysema thins them)


# ---------------------------------------------------------------- anatomy


def _anatomy(case: Case, rng_patient: np.random.Generator, rng: np.random.Generator) -> Anatomy:
    """Geometry of one image: the patient's build, jittered per visit, reshaped by some labels."""
    y = dict(zip(LABELS, case.labels))
    scale = rng_patient.uniform(0.93, 1.05) * (0.97 if case.sex == "F" else 1.0) * rng.uniform(0.98, 1.02)
    dx, dy = (float(v) for v in rng.normal(0.0, 0.02, size=2))
    cx, cy = 0.5 + dx, 0.46 + dy
    rx, ry = 0.145 * scale * rng_patient.uniform(0.95, 1.05), 0.27 * scale
    lungs = [Lung(cx - 0.175 * scale, cy, rx, ry, -1.0), Lung(cx + 0.175 * scale, cy, rx * 0.95, ry * 0.97, 1.0)]
    heart_rx = 0.12 * scale * rng_patient.uniform(0.92, 1.08) * (1.05 if case.view == "AP" else 1.0)
    heart = [cx + 0.03 * scale, cy + 0.15 * scale, heart_rx, 0.1 * scale]
    if y["Cardiomegaly"]:  # cardiothoracic ratio from ≈0.4 to ≈0.6
        heart[2] *= rng.uniform(1.45, 1.6)
        heart[3] *= 1.2
        heart[0] += 0.02
    lung_level, markings = rng_patient.uniform(0.14, 0.2), 1.0
    if y["Emphysema"]:  # hyperinflated, hyperlucent, flat diaphragm, sparse markings
        for lung in lungs:
            lung.rx, lung.ry, lung.dome = lung.rx * 1.06, lung.ry * 1.12, 0.03
        lung_level, markings = lung_level - 0.07, 0.35
    if y["Atelectasis"]:  # volume loss: one hemidiaphragm rises
        lungs[int(rng.integers(2))].ry *= 0.87
    return Anatomy(
        (dx, dy),
        (cx, cy + 0.12, 0.43 * scale, 0.62),
        (lungs[0], lungs[1]),
        (heart[0], heart[1], heart[2], heart[3]),
        lung_level,
        rng_patient.uniform(0.42, 0.5),
        markings,
    )


def _base(cv: Canvas, a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Body, spine, lung fields with vessel markings, heart and ribs. [R, R] float32 in ~[0, 1]."""
    img = np.full((cv.size, cv.size), 0.05, dtype=np.float32)
    body = cv.ellipse(*a.body, edge=0.03)
    img += body * (a.tissue_level - 0.05)
    cx = a.body[0]
    img += 0.12 * body * np.clip((0.05 - np.abs(cv.x - cx)) / 0.01, 0.0, 1.0)  # spine / mediastinum
    lungs = np.maximum(a.lungs[0].mask(cv), a.lungs[1].mask(cv))
    hila = sum(cv.blob(l.cx - l.lateral * 0.45 * l.rx, l.cy + 0.05, 0.06) for l in a.lungs)
    vessels = a.markings * (0.03 * cv.noise(rng, 28) + 0.06 * hila)
    img = img * (1 - lungs) + (a.lung_level + vessels) * lungs
    heart = cv.ellipse(*a.heart, edge=0.012)
    img = img * (1 - heart) + (a.tissue_level + 0.08) * heart
    phase = (cv.y + 0.6 * np.abs(cv.x - cx) - 1.2 * (cv.x - cx) ** 2) / 0.065
    img += 0.07 * lungs * (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6  # posterior ribs
    return img


def _finish(cv: Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure variation, mottle and quantum noise → uint8 [R, R]."""
    img = img + 0.03 * cv.noise(rng, 4) + 0.015 * cv.noise(rng, 48)
    img = img + 0.012 * rng.standard_normal(size=img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    img = (img - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.uniform(-0.03, 0.03)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- per-label signatures
# Each adds its finding to `img` in place and returns the boxes (x, y, w, h; pixels at the
# synth resolution) of what it drew, one per element (see `footprint_box`). Cardiomegaly
# and Emphysema act through the geometry (`_anatomy`); Atelectasis both there (volume
# loss) and here (plate band).


def footprint_box(footprint: np.ndarray, level: float = BOX_LEVEL) -> list[Box]:
    """[(x, y, w, h)] bounding the pixels where footprint ≥ level × its peak; [] if it is empty."""
    peak = float(footprint.max()) if footprint.size else 0.0
    if peak <= 0:
        return []
    rows = np.flatnonzero((footprint >= level * peak).any(axis=1))
    cols = np.flatnonzero((footprint >= level * peak).any(axis=0))
    return [(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))]


def _side(a: Anatomy, rng: np.random.Generator) -> Lung:
    return a.lungs[int(rng.integers(2))]


def _atelectasis(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    lung = _side(a, rng)
    x, y = lung.cx + rng.uniform(-0.15, 0.15) * lung.rx, lung.cy + rng.uniform(0.3, 0.5) * lung.ry
    band, mask = cv.ellipse(x, y, 0.65 * lung.rx, 0.02, edge=0.006, angle=rng.uniform(-0.3, 0.3)), lung.mask(cv)
    img += 0.24 * band * mask
    return footprint_box(band * mask)


def _consolidation(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    lung = _side(a, rng)
    x, y = lung.point(rng, (-0.6, 0.2))
    patch = cv.ellipse(
        x, y, rng.uniform(0.06, 0.085), rng.uniform(0.05, 0.075), edge=0.008, angle=rng.uniform(-0.5, 0.5)
    )
    mask = lung.mask(cv)
    img += 0.27 * patch * mask * (1.0 + 0.1 * cv.noise(rng, 16))
    return footprint_box(patch * mask)


def _edema(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # bilateral perihilar "bat-wing" haze
    boxes = []
    for lung in a.lungs:
        haze, mask = (
            cv.blob(lung.cx - lung.lateral * 0.35 * lung.rx, lung.cy + 0.04, rng.uniform(0.065, 0.08)),
            lung.mask(cv),
        )
        img += 0.3 * haze * mask
        boxes += footprint_box(haze * mask)
    return boxes


def _effusion(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    lungs = a.lungs if rng.random() < 0.3 else (_side(a, rng),)
    boxes = []
    for lung in lungs:
        h = rng.uniform(0.25, 0.4)
        lateral = np.clip(lung.lateral * (cv.x - lung.cx) / lung.rx + 0.3, 0.0, 1.3)
        top = lung.cy + lung.ry * (0.72 - h) - 0.35 * h * lung.ry * lateral  # meniscus rises laterally
        fluid = lung.mask(cv) * np.clip((cv.y - top) / 0.015, 0.0, 1.0)
        img[:] = img * (1 - fluid) + (a.tissue_level + 0.03) * fluid
        boxes += footprint_box(fluid)
    return boxes


def _fibrosis(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # reticular net in the upper zones of both lungs
    p = rng.uniform(0.04, 0.05)
    phase_x, phase_y = rng.uniform(0, p), rng.uniform(0, p)
    net = 0.5 + 0.5 * np.maximum(np.cos(2 * np.pi * (cv.x + phase_x) / p), np.cos(2 * np.pi * (cv.y + phase_y) / p))
    boxes = []
    for lung in a.lungs:
        upper, mask = np.clip((lung.cy + 0.2 * lung.ry - cv.y) / (0.3 * lung.ry), 0.0, 1.0), lung.mask(cv)
        img += (0.06 + 0.14 * net**3) * upper * mask
        boxes += footprint_box(upper * mask)
    return boxes


def _hernia(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # retrocardiac gas bubble at the diaphragm with an air-fluid level and a thin wall
    hx, hy, _, hry = a.heart
    x, y, r = hx + rng.uniform(-0.03, 0.01), hy + hry * rng.uniform(0.55, 0.8), rng.uniform(0.04, 0.055)
    inside = cv.ellipse(x, y, r, r * 0.85, edge=0.004)
    wall = cv.ellipse(x, y, r * 1.18, r * 1.0, edge=0.004) - inside
    gas = inside * np.clip((y + 0.25 * r - cv.y) / 0.004, 0.0, 1.0)
    img += 0.12 * np.clip(wall, 0.0, 1.0) - 0.32 * gas
    return footprint_box(np.maximum(wall, inside))


def _infiltration(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    boxes = []
    for _ in range(int(rng.integers(3, 7))):
        lung = _side(a, rng)
        x, y = lung.point(rng)
        blob, mask = cv.blob(x, y, rng.uniform(0.025, 0.04)), lung.mask(cv)
        img += 0.22 * blob * mask
        boxes += footprint_box(blob * mask)
    return boxes


def _round_lesion(
    cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator, radius: tuple[float, float], level: float
) -> list[Box]:
    lung = _side(a, rng)
    x, y = lung.point(rng)
    r = rng.uniform(*radius)
    lesion = cv.ellipse(x, y, r, r * rng.uniform(0.85, 1.0), edge=0.005)
    img += level * lesion
    return footprint_box(lesion)


def _mass(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    return _round_lesion(cv, a, img, rng, (0.05, 0.07), 0.3)


def _nodule(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        boxes += _round_lesion(cv, a, img, rng, (0.018, 0.026), 0.4)
    return boxes


def _pleural_thickening(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # a bright shell along the lateral wall and apex, inside the lung outline
    boxes = []
    for lung in a.lungs if rng.random() < 0.4 else (_side(a, rng),):
        t = rng.uniform(0.03, 0.045)
        rad = cv.radius(lung.cx, lung.cy, lung.rx, lung.ry * 1.08)
        shell = np.clip((rad - (1 - t / lung.rx)) / 0.04, 0.0, 1.0) * np.clip((1.0 - rad) / 0.03 + 0.5, 0.0, 1.0)
        lateral = np.clip((lung.lateral * (cv.x - lung.cx) / lung.rx + 0.2) / 0.2, 0.0, 1.0)
        upper = np.clip((lung.cy + 0.5 * lung.ry - cv.y) / 0.02, 0.0, 1.0)
        img += 0.3 * shell * lateral * upper * (rad < 1.0)
        boxes += footprint_box(shell * lateral * upper * (rad < 1.0))
    return boxes


def _pneumonia(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # soft, patchy lower-zone airspace opacity
    lung = _side(a, rng)
    x, y = lung.point(rng, (0.2, 0.7))
    patchy = np.clip(0.7 + 0.35 * cv.noise(rng, 20), 0.0, 1.2)
    blob, mask = cv.blob(x, y, rng.uniform(0.05, 0.07)), lung.mask(cv)
    img += 0.3 * blob * patchy * mask
    return footprint_box(blob * patchy * mask)


def _pneumothorax(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[Box]:
    # lateral/apical air without vessel markings, bounded by the visceral pleural line
    lung = _side(a, rng)
    k = rng.uniform(0.55, 0.7)
    ccx, ccy = lung.cx - lung.lateral * lung.rx * (1 - k) * 0.8, lung.cy + lung.ry * 0.1
    collapsed = cv.ellipse(ccx, ccy, lung.rx * k, lung.ry * 0.8, edge=0.004)
    air = np.clip(lung.mask(cv) - collapsed, 0.0, 1.0)
    img[:] = img * (1 - air) + 0.45 * a.lung_level * air
    rad = cv.radius(ccx, ccy, lung.rx * k, lung.ry * 0.8)
    line, mask = np.clip(1 - np.abs(rad - 1) * lung.rx * k / 0.004, 0.0, 1.0), lung.mask(cv)
    img += 0.16 * line * mask
    return footprint_box(np.maximum(air, line * mask))


def _fine_detail(cv: Canvas, a: Anatomy, img: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Tiny bright nodules about 2 px wide AT THE SYNTH RESOLUTION (``--fine-detail LABEL``).

    Sized in pixels, not in image units, so that the finding survives only when the
    image is seen near its synth resolution: downsampled 4× its contrast drops ~16×
    into the lung texture, 8× ~64×. The resolution study's tests use it as the label
    whose AUROC must rise with resolution. Returns the boxes (x, y, w, h) it drew, in
    pixels of the canvas.
    """
    boxes = []
    radius = 1.1 / cv.size
    for _ in range(int(rng.integers(3, 6))):
        lung = _side(a, rng)
        x, y = lung.point(rng)
        img += 0.55 * cv.ellipse(x, y, radius, radius, edge=0.5 / cv.size)
        half = max(1, int(np.ceil(radius * cv.size)))
        px, py = int(x * cv.size), int(y * cv.size)
        boxes.append((px - half, py - half, 2 * half + 1, 2 * half + 1))
    return boxes


_SIGNATURES = {
    "Atelectasis": _atelectasis,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Effusion": _effusion,
    "Fibrosis": _fibrosis,
    "Hernia": _hernia,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pleural_Thickening": _pleural_thickening,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
}  # Cardiomegaly, Emphysema: geometry only (see _anatomy)


def render(case: Case, seed: int, resolution: int, fine_detail: str | None = None) -> np.ndarray:
    """Draw one phantom: uint8 [resolution, resolution]; same (case, seed) → same pixels.

    ``fine_detail``: a label whose signature is replaced by :func:`_fine_detail` (tiny
    nodules that only survive at high resolution); None keeps the default signatures.
    """
    return render_with_boxes(case, seed, resolution, fine_detail)[0]


def render_with_boxes(
    case: Case, seed: int, resolution: int, fine_detail: str | None = None
) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """One phantom and where its findings were drawn: (uint8 [R, R], [(label, (x, y, w, h))])."""
    rng_patient = np.random.default_rng([seed, case.patient])
    rng = np.random.default_rng([seed, case.patient, case.follow_up + 1])
    cv = Canvas(resolution)
    anatomy = _anatomy(case, rng_patient, rng)
    img = _base(cv, anatomy, rng)
    boxes: list[tuple[str, Box]] = []
    if case.labels[LABELS.index("Cardiomegaly")]:  # drawn by _base: the (enlarged) heart
        boxes += [("Cardiomegaly", b) for b in footprint_box(cv.ellipse(*anatomy.heart, edge=0.012))]
    for name, on in zip(LABELS, case.labels):
        if on and name == fine_detail:
            boxes += [(name, b) for b in _fine_detail(cv, anatomy, img, rng)]
        elif on and name in _SIGNATURES:
            boxes += [(name, b) for b in _SIGNATURES[name](cv, anatomy, img, rng)]
    return _finish(cv, img, rng), boxes


# ---------------------------------------------------------------- writing


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_one(task: tuple[Case, int, int, str, str | None]) -> tuple[int, list[tuple[str, Box]]]:
    """Worker: render one case and write its PNG atomically; returns (bytes written, its boxes)."""
    case, seed, resolution, folder, fine_detail = task
    pixels, boxes = render_with_boxes(case, seed, resolution, fine_detail)
    data = _png_bytes(pixels)
    with atomic_write(Path(folder) / case.image, "wb") as fh:
        fh.write(data)
    return len(data), boxes


def boxes_csv(cases: list[Case], boxes: dict[str, list[tuple[str, Box]]]) -> str:
    """boxes.csv text in the BBox_List_2017 layout, cases in order, boxes in drawing order."""
    lines = [BOX_HEADER]
    for c in cases:
        lines += [f"{c.image},{label},{x},{y},{w},{h}" for label, (x, y, w, h) in boxes.get(c.image, [])]
    return "\n".join(lines) + "\n"


def metadata_csv(cases: list[Case], resolution: int) -> str:
    """The NIH Data_Entry CSV text (v2020 column layout) for the cases."""
    spacing = round(0.143 * 2500 / resolution, 6)  # NIH originals: ~2500 px at 0.143 mm
    lines = [NIH_HEADER]
    for c in cases:
        lines.append(
            f"{c.image},{format_findings(c.labels)},{c.follow_up},{c.patient},{c.age},{c.sex},"
            f"{c.view},{resolution},{resolution},{spacing},{spacing}"
        )
    return "\n".join(lines) + "\n"


def _check_out(out: Path, cases: list[Case]) -> Path:
    images = out / "images"
    if images.is_dir():
        expected = {c.image for c in cases}
        stale = sorted(p.name for p in images.glob("*.png") if p.name not in expected)
        if stale:
            raise CxrError(
                f"{images}: holds {len(stale):,} PNG(s) that this run would not write "
                f"(first {stale[:3]}) — use an empty or new --out folder"
            )
    images.mkdir(parents=True, exist_ok=True)
    return images


def _render_all(
    cases: list[Case], seed: int, resolution: int, images: Path, workers: int, fine_detail: str | None = None
) -> tuple[int, dict[str, list[tuple[str, Box]]]]:
    tasks = [(c, seed, resolution, str(images), fine_detail) for c in cases]
    bar = progress(total=len(tasks), desc="synth", unit=" img")
    total, boxes = 0, {}
    if workers <= 1:
        for case, task in zip(cases, tasks):
            size, boxes[case.image] = _write_one(task)
            total += size
            bar.update()
    else:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            # imap (ordered): results come back in case order, so boxes pair with their case.
            for case, (size, drawn) in zip(
                cases, pool.imap(_write_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))
            ):
                total += size
                boxes[case.image] = drawn
                bar.update()
    bar.close()
    return total, boxes


def run(args) -> int:
    """CLI: write N phantom images, the NIH-format metadata CSV and official-style split lists."""
    if args.n < 1 or args.resolution < 32:
        raise CxrError(f"--n {args.n} / --resolution {args.resolution}: need n ≥ 1 and resolution ≥ 32")
    fine_detail = getattr(args, "fine_detail", None)
    if fine_detail is not None and fine_detail not in LABELS:
        raise CxrError(f"--fine-detail {fine_detail}: not a label — use one of {', '.join(LABELS)}")
    start = time.perf_counter()
    out = Path(args.out)
    cases = plan_cases(args.n, args.seed, LabelSampler(args.metadata))
    images = _check_out(out, cases)
    workers = args.workers or os.cpu_count() or 1
    nbytes, boxes = _render_all(cases, args.seed, args.resolution, images, min(workers, len(cases)), fine_detail)
    atomic_write_text(out / "Data_Entry_2017.csv", metadata_csv(cases, args.resolution))
    atomic_write_text(out / "boxes.csv", boxes_csv(cases, boxes))
    test = test_patients(cases, args.seed)
    atomic_write_text(out / "test_list.txt", "".join(f"{c.image}\n" for c in cases if c.patient in test))
    atomic_write_text(out / "train_val_list.txt", "".join(f"{c.image}\n" for c in cases if c.patient not in test))
    positives = np.array([c.labels for c in cases]).sum(axis=0)
    rarest = int(np.argmin(positives))
    took = time.perf_counter() - start
    print(
        f"synth: {len(cases):,} images of {cases[-1].patient:,} patients, {args.resolution} px, seed {args.seed}, "
        f"{nbytes / 1e6:.1f} MB → {out} in {took:.1f} s ({len(cases) / took:.0f} img/s); "
        f"fewest positives: {LABELS[rarest]} {int(positives[rarest])}"
        + (f"; {fine_detail} drawn as fine detail (~2 px nodules)" if fine_detail else "")
    )
    return 0
