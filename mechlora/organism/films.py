"""Synthetic chest films: small grayscale pictures drawn from a seed, with their ground truth.

A film is a frontal (PA) view: two dark lung fields, a bright spine and heart shadow, faint ribs.
Findings a question can ask about: a focal opacity (side, size), a pleural effusion with a flat
fluid level (side), an enlarged heart shadow, a pacemaker with its lead. Sides are the patient's:
as on a real PA film, the patient's right lung is on the image's LEFT.
Same seed, same film, same pixels (numpy's PCG64 is stable across platforms and versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 64
SIDES = ("right", "left")  # patient's sides, in image order (left half, right half)
LUNG_DARK, FLUID, DEVICE = 35.0, 150.0, 245.0


@dataclass(frozen=True)
class Film:
    seed: int
    opacity: str | None  # side of a focal opacity, or None
    opacity_size: str | None  # "small" | "large" when there is an opacity
    effusion: str | None  # side of a pleural effusion (fluid level), or None
    heart: str  # "normal" | "enlarged"
    device: bool  # a pacemaker and its lead
    # Geometry, kept so that tests and readers can check the pixels against the truth.
    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, rx, ry) per side, SIDES order
    opacity_xy: tuple[float, float] | None  # centre of the opacity (x, y), pixels
    fluid_top: int | None  # first image row of fluid in the effusion's lung
    heart_rx: float  # half-width of the heart shadow; enlarged hearts are much wider


def sample_film(seed: int) -> Film:
    """Findings and geometry for one film; each finding is independent and present half the time."""
    rng = np.random.default_rng([seed, 0xF11])
    dx, dy = rng.uniform(-1.5, 1.5, size=2)
    lungs = tuple((cx + dx, 28.0 + dy, 10.0 + rng.uniform(-0.8, 0.8), 18.0 + rng.uniform(-1, 1))
                  for cx in (20.0, 44.0))
    opacity = SIDES[rng.integers(2)] if rng.random() < 0.5 else None
    size = ("small", "large")[rng.integers(2)]
    effusion = SIDES[rng.integers(2)] if rng.random() < 0.5 else None
    heart = ("normal", "enlarged")[rng.integers(2)]
    device = bool(rng.random() < 0.5)
    ox, oy = rng.uniform(-3, 3), rng.uniform(-10, -2)  # upper and mid zones: clear of fluid
    fluid_h = int(rng.integers(11, 15))
    heart_rx = rng.uniform(8.0, 9.5) if heart == "normal" else rng.uniform(13.0, 15.0)

    opacity_xy = fluid_top = None
    if opacity is not None:
        cx, cy, _, _ = lungs[SIDES.index(opacity)]
        opacity_xy = (cx + ox, cy + oy)
    if effusion is not None:
        _, cy, _, ry = lungs[SIDES.index(effusion)]
        fluid_top = int(round(cy + ry)) - fluid_h
    return Film(seed, opacity, size if opacity else None, effusion, heart, device,
                lungs, opacity_xy, fluid_top, heart_rx)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    return x, y


def lung_mask(film: Film, side: str) -> np.ndarray:
    """Boolean mask of one lung field (patient's side) of `film`."""
    cx, cy, rx, ry = film.lungs[SIDES.index(side)]
    x, y = _grid()
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def heart_mask(film: Film) -> np.ndarray:
    """Boolean mask of the heart shadow; it sits left of the midline (patient's left)."""
    x, y = _grid()
    return ((x - 35) / film.heart_rx) ** 2 + ((y - 44) / 9.0) ** 2 <= 1


def render_array(film: Film) -> np.ndarray:
    """The film as a (SIZE, SIZE) uint8 array."""
    rng = np.random.default_rng([film.seed, 0x9A7])
    x, y = _grid()
    img = np.full((SIZE, SIZE), 15.0)
    img[((x - 32) / 29) ** 2 + ((y - 34) / 30) ** 2 <= 1] = 95.0  # soft tissue
    lungs = {side: lung_mask(film, side) for side in SIDES}
    for mask in lungs.values():
        img[mask] = LUNG_DARK
    # Ribs: faint arcs across the lung fields, so that not every bright pixel is a finding.
    for k in range(6):
        arc = np.abs(y - (10 + 7 * k) - 0.012 * (x - 32) ** 2) < 0.8
        img[arc & (lungs["right"] | lungs["left"])] += 18
    img[(np.abs(x - 32) < 3) & (y > 6) & (y < 52)] = 140.0  # spine and mediastinum
    heart = heart_mask(film)
    img[heart] = 165.0
    if film.opacity_xy is not None:
        ox, oy = film.opacity_xy
        sigma = 3.0 if film.opacity_size == "small" else 5.5
        blob = 110.0 * np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * sigma**2))
        img += blob * lungs[film.opacity]
    if film.effusion is not None:
        # Flat top (the fluid level); the heart shadow stays in front of the fluid.
        img[lungs[film.effusion] & ~heart & (y >= film.fluid_top)] = FLUID
    if film.device:
        px, py = 50 + rng.integers(-2, 3), 7 + rng.integers(-1, 2)
        img[py:py + 5, px - 4:px + 4] = DEVICE  # generator under the left clavicle
        for t in np.linspace(0, 1, 40):  # lead from the generator down into the heart
            lx, ly = px - 4 - 13 * t, py + 5 + 29 * t ** 0.8
            img[int(round(ly)), int(round(lx))] = DEVICE - 15
    img += rng.normal(0, 5, size=img.shape)
    # A 3x3 box blur: film grain and edges look less synthetic, and it keeps to numpy.
    padded = np.pad(img, 1, mode="edge")
    img = sum(padded[i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9.0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(film: Film) -> Image.Image:
    """The film as a grayscale PIL image."""
    return Image.fromarray(render_array(film))
