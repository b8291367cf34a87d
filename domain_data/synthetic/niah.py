"""Visual needle-in-a-haystack: many natural-looking images, one carrying a bold coloured shape.

Haystack images are soft landscapes (a sky gradient, a horizon, blurred muted blobs, grain): no hard
edges and no saturated colour. The needle is a haystack image with a large saturated shape (a
``red triangle``, a ``blue cross``, ...) drawn with a dark outline; the question asks which one.
Haystack image ``i`` depends only on ``(seed, i)``, so a 100-image and a 1000-image haystack of the
same seed share their first 100 images; the needle replaces image ``round(depth * (n_images - 1))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from domain_data.synthetic.errors import SyntheticDataError

NEEDLE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 20),
    "magenta": (225, 30, 215),
}
NEEDLE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
NIAH_QUESTION = (
    "One of the images shows a bold coloured shape. What colour and shape is it? "
    "Answer as colour then shape, e.g. green square."
)


@dataclass
class NIAHSample:
    """``images``: list of (size, size, 3) uint8; the answer is ``f"{colour} {shape}"``."""

    seed: int
    images: list[np.ndarray]
    needle_index: int
    colour: str
    shape: str
    question: str = NIAH_QUESTION

    @property
    def answer(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def depth(self) -> float:
        return self.needle_index / max(len(self.images) - 1, 1)


def haystack_image(seed: int, index: int, size: int = 112) -> np.ndarray:
    """A soft landscape, (size, size, 3) uint8, determined by (seed, index)."""
    rng = np.random.default_rng([seed, index, 7])
    pos = np.arange(size, dtype=np.float32) / size
    yy, xx = pos[:, None, None], pos[None, :, None]  # (S,1,1), (1,S,1)
    horizon = np.float32(rng.uniform(0.3, 0.7)) + np.float32(rng.uniform(-0.1, 0.1)) * np.sin(
        2 * np.pi * (xx + np.float32(rng.uniform()))
    )  # (1,S,1)
    sky_top, sky_bottom, ground_top, ground_bottom = (
        rng.uniform(lo, hi, 3).astype(np.float32) for lo, hi in ((120, 200), (150, 220), (60, 140), (40, 110))
    )
    sky = sky_top + (sky_bottom - sky_top) * (yy / np.maximum(horizon, 1e-3))
    ground = ground_top + (ground_bottom - ground_top) * ((yy - horizon) / np.maximum(1 - horizon, 1e-3))
    image = np.where(yy < horizon, sky, ground)  # (S,S,3) float32
    for _ in range(int(rng.integers(3, 8))):  # blurred muted blobs: trees, rocks, clouds
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        wy = np.exp(-((pos - cy) ** 2) / (2 * radius**2)).astype(np.float32)  # separable Gaussian
        wx = np.exp(-((pos - cx) ** 2) / (2 * radius**2)).astype(np.float32)
        weight = (0.8 * wy[:, None] * wx[None, :])[:, :, None]  # (S,S,1)
        tone = (rng.uniform(50, 170) + rng.uniform(-15, 15, 3)).astype(np.float32)  # near-grey
        image = image * (1 - weight) + tone * weight
    image += rng.standard_normal(image.shape, dtype=np.float32) * 4
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    extent = rng.uniform(0.35, 0.5) * size
    cy, cx = rng.uniform(extent / 2 + 2, size - extent / 2 - 2, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx, half = yy - cy, xx - cx, extent / 2
    if shape == "circle":
        return dy**2 + dx**2 <= half**2
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":  # apex up
        rel = (dy + half) / (2 * half)
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= half * rel)
    arm = half / 3
    return ((np.abs(dy) <= half) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= half) & (np.abs(dy) <= arm))


def needle_image(seed: int, colour: str, shape: str, size: int = 112, index: int = 0) -> np.ndarray:
    """A haystack image with a bold ``colour`` ``shape`` (dark outline) drawn on it."""
    if colour not in NEEDLE_COLOURS or shape not in NEEDLE_SHAPES:
        raise SyntheticDataError(
            f"needle {colour} {shape} unknown: colours {', '.join(NEEDLE_COLOURS)}; "
            f"shapes {', '.join(NEEDLE_SHAPES)}"
        )
    image = haystack_image(seed, index, size)
    mask = _shape_mask(shape, size, np.random.default_rng([seed, index, 11]))
    outline = np.zeros_like(mask)
    for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2)):
        outline |= np.roll(mask, (dy, dx), axis=(0, 1))
    image[outline & ~mask] = (20, 20, 20)
    image[mask] = NEEDLE_COLOURS[colour]
    return image


def make_niah(seed: int, n_images: int, depth: float, size: int = 112) -> NIAHSample:
    """``n_images`` haystack images with the needle at relative ``depth`` (0 = first, 1 = last)."""
    if n_images < 1:
        raise SyntheticDataError(f"n_images must be >= 1, got {n_images}")
    if not 0.0 <= depth <= 1.0:
        raise SyntheticDataError(f"depth must be in [0, 1], got {depth}")
    if size < 32:
        raise SyntheticDataError(f"image size must be >= 32 px, got {size}")
    rng = np.random.default_rng([seed, 99])
    colour = str(rng.choice(list(NEEDLE_COLOURS)))
    shape = str(rng.choice(NEEDLE_SHAPES))
    needle_index = int(round(depth * (n_images - 1)))
    images = [
        needle_image(seed, colour, shape, size, i) if i == needle_index else haystack_image(seed, i, size)
        for i in range(n_images)
    ]
    return NIAHSample(seed=seed, images=images, needle_index=needle_index, colour=colour, shape=shape)
