"""CT intensity windows: Hounsfield units -> 8-bit grey levels, and a 3-channel multi-window RGB mode.

A window (width W, level L) maps HU ``L - W/2`` to 0 and ``L + W/2`` to 255, linearly, clipped.
The multi-window RGB image puts one window per channel: red = lung, green = mediastinum, blue = bone,
so that one 8-bit RGB slice carries air, soft tissue and bone contrast at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from domain_data.medical.errors import CTInputError


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units."""

    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


WINDOWS: dict[str, Window] = {
    "lung": Window(width=1500, level=-600),
    "mediastinum": Window(width=350, level=50),
    "bone": Window(width=1800, level=400),
    "wide": Window(width=2000, level=0),
    "emphysema": Window(width=300, level=-850),  # -1000 .. -700 HU: low-attenuation areas against lung
}

# Channel order of the multi-window RGB slices.
MULTI_WINDOW_CHANNELS: tuple[str, str, str] = ("lung", "mediastinum", "bone")


def get_window(name: str | Window) -> Window:
    """The window called ``name`` (or ``name`` itself when it already is a :class:`Window`)."""
    if isinstance(name, Window):
        return name
    if name not in WINDOWS:
        raise CTInputError(f"unknown CT window {name!r}: use one of {', '.join(WINDOWS)} or 'multi'")
    return WINDOWS[name]


def apply_window(hu: np.ndarray, name: str | Window) -> np.ndarray:
    """HU array of any shape -> uint8 of the same shape through the window ``name``."""
    window = get_window(name)
    scale = np.float32(255.0 / window.width)
    grey = (np.asarray(hu, dtype=np.float32) - np.float32(window.low)) * scale
    np.clip(grey, 0.0, 255.0, out=grey)
    return (grey + np.float32(0.5)).astype(np.uint8)


def multi_window_rgb(hu_slice: np.ndarray) -> np.ndarray:
    """One HU slice (H, W) -> uint8 (H, W, 3): lung, mediastinum and bone windows as R, G, B."""
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2:
        raise CTInputError(f"multi_window_rgb needs one 2D slice (H, W), got shape {hu_slice.shape}")
    channels = [apply_window(hu_slice, name) for name in MULTI_WINDOW_CHANNELS]
    return np.stack(channels, axis=-1)  # (H, W, 3)
