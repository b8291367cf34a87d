"""CT volume -> the ordered slice images the model sees, and the series prompt for them.

Default: keep the study's own slice count, clipped to [100, 984] (the range LongLLaVA was trained on);
to reach the range the volume is resampled along z (linear interpolation in HU between the two
nearest slice planes, on the planes' real positions, so uneven DICOM spacing is honoured). Each slice
is scaled to fit ``size`` x ``size`` keeping its physical aspect (in-plane pixel spacing), windowed to
8 bits (one named window as grey RGB, or ``"multi"``: lung / mediastinum / bone as R / G / B) and
centred on a black square. Images are ordered inferior -> superior (canonical z, see ``ct.py``).

``window="slab"`` shows the whole volume instead of sampled planes: the stored planes are split, in
order, into as many consecutive slabs as images (:func:`slab_bounds`), and each image projects its slab
the way radiologists read thick slabs: red = minimum intensity projection (MinIP) through the
``emphysema`` window (low-attenuation areas), green = average (AIP) through the mediastinum window (heart,
fluid, consolidation), blue = maximum intensity projection (MIP) through the lung window (nodules). So a
finding between two sampled planes, or a nodule cut near its edge, still shows at its full size. With at
least as many images as planes, each slab is one plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from domain_data.medical.ct import CTVolume
from domain_data.medical.errors import CTInputError
from domain_data.medical.windows import apply_window, get_window, multi_window_rgb
from domain_data.token_cells import cell_pixel_counts
from longllava.protocol import series_prompt

MIN_SLICES = 100
MAX_SLICES = 984
DEFAULT_SIZE = 336
SLAB_WINDOW = "slab"
# (projection over the slab, display window) of the red, green and blue channels of a slab image
SLAB_CHANNELS: tuple[tuple[str, str], ...] = (("min", "emphysema"), ("mean", "mediastinum"), ("max", "lung"))


@dataclass
class CTSlices:
    """Ordered slice images for the model, where they came from, and their prompt."""

    images: list[Image.Image]  # RGB, size x size, inferior -> superior
    source_indices: np.ndarray  # (n,) fractional z index in the volume of each image
    positions_mm: np.ndarray  # (n,) z offset of each image from the volume's first slice plane
    prompt: str  # longllava.protocol.series_prompt(n)
    window: str
    size: int
    resampled: str  # what was done along z, in words

    def __len__(self) -> int:
        return len(self.images)


def choose_slice_count(volume: CTVolume, num_slices: int | None, spacing_mm: float | None) -> tuple[int, str]:
    """Number of output slices and the reason, following the rules in the module docstring."""
    if num_slices is not None and spacing_mm is not None:
        raise CTInputError("give num_slices or spacing_mm, not both")
    if num_slices is not None:
        if not isinstance(num_slices, int | np.integer) or not 1 <= num_slices <= MAX_SLICES:
            raise CTInputError(f"num_slices={num_slices!r}: use an integer from 1 to {MAX_SLICES}")
        return int(num_slices), f"{num_slices} slices requested"
    extent = float(volume.z_offsets_mm[-1] - volume.z_offsets_mm[0])
    if spacing_mm is not None:
        if not np.isfinite(spacing_mm) or spacing_mm <= 0:
            raise CTInputError(f"spacing_mm={spacing_mm!r}: use a positive slice spacing in mm")
        wanted = int(np.floor(extent / spacing_mm + 1e-6)) + 1
        count = int(np.clip(wanted, MIN_SLICES, MAX_SLICES))
        clipped = "" if count == wanted else f", clipped from {wanted} to [{MIN_SLICES}, {MAX_SLICES}]"
        return count, f"{spacing_mm:g} mm spacing over {extent:.1f} mm{clipped}"
    count = int(np.clip(volume.num_slices, MIN_SLICES, MAX_SLICES))
    if count == volume.num_slices:
        return count, f"study's own {count} slices"
    return count, f"study's {volume.num_slices} slices clipped to [{MIN_SLICES}, {MAX_SLICES}] -> {count}"


def _target_indices(volume: CTVolume, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractional z indices and positions (mm) of ``count`` evenly spaced planes over the volume."""
    offsets = np.asarray(volume.z_offsets_mm, dtype=np.float64)
    steps = np.diff(offsets)
    evenly = steps.size == 0 or np.allclose(steps, steps[0], rtol=1e-3, atol=1e-3)
    if count == volume.num_slices and evenly:
        return np.arange(count, dtype=np.float64), offsets.copy()
    positions = np.linspace(offsets[0], offsets[-1], count)
    return np.interp(positions, offsets, np.arange(len(offsets), dtype=np.float64)), positions


def _hu_plane(hu: np.ndarray, index: float) -> np.ndarray:
    """HU plane at fractional z ``index`` by linear interpolation between its neighbours."""
    below = int(np.floor(index))
    weight = index - below
    if weight < 1e-6 or below + 1 >= hu.shape[0]:
        return hu[min(below, hu.shape[0] - 1)]
    return (1.0 - weight) * hu[below] + weight * hu[below + 1]


def slab_bounds(n_planes: int, count: int) -> np.ndarray:
    """(count, 2) first and last stored plane (0-based, inclusive) of ``count`` consecutive slabs that
    cover ``n_planes`` planes in order, as even as whole planes allow; each slab holds at least one
    plane (with more slabs than planes, planes repeat)."""
    if n_planes < 1 or count < 1:
        raise CTInputError(f"slab_bounds needs at least one plane and one slab, got {n_planes} and {count}")
    starts = np.arange(count) * n_planes // count
    ends = np.maximum(np.arange(1, count + 1) * n_planes // count - 1, starts)
    return np.stack([starts, ends], axis=1)  # (count, 2)


def _fit_size(shape: tuple[int, int], pixel_mm: tuple[float, float], size: int) -> tuple[int, int]:
    """(height, width) in output pixels keeping the slice's physical aspect within size x size."""
    height_mm, width_mm = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = size / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _scaled_hu(hu_plane: np.ndarray, size: int, pixel_mm: tuple[float, float]) -> np.ndarray:
    """HU plane (H, W) resized (bilinear, in HU) to fit size x size keeping its physical aspect."""
    height, width = _fit_size(hu_plane.shape, pixel_mm, size)
    scaled = Image.fromarray(np.ascontiguousarray(hu_plane, dtype=np.float32), mode="F")
    return np.asarray(scaled.resize((width, height), Image.Resampling.BILINEAR))  # (height, width) HU


def _on_canvas(rgb: np.ndarray, size: int) -> Image.Image:
    """uint8 (h, w, 3) centred on a black size x size RGB image."""
    height, width = rgb.shape[:2]
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return Image.fromarray(canvas, mode="RGB")


def render_slice(hu_plane: np.ndarray, window: str, size: int, pixel_mm: tuple[float, float] = (1.0, 1.0),
                 ) -> Image.Image:
    """One HU plane (H, W) -> RGB PIL image size x size (aspect kept, black padding)."""
    scaled = _scaled_hu(hu_plane, size, pixel_mm)
    if window == "multi":
        rgb = multi_window_rgb(scaled)
    else:
        grey = apply_window(scaled, window)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)  # (height, width, 3)
    return _on_canvas(rgb, size)


def render_slab(hu_slab: np.ndarray, size: int, pixel_mm: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """Consecutive HU planes (k, H, W) -> one RGB image size x size: MinIP / average / MIP as R / G / B
    through the :data:`SLAB_CHANNELS` windows (see the module docstring)."""
    hu_slab = np.asarray(hu_slab, dtype=np.float32)
    if hu_slab.ndim != 3 or hu_slab.shape[0] < 1:
        raise CTInputError(f"render_slab needs planes (k, H, W) with k >= 1, got shape {hu_slab.shape}")
    projections = {"min": hu_slab.min(axis=0), "mean": hu_slab.mean(axis=0), "max": hu_slab.max(axis=0)}
    channels = [apply_window(_scaled_hu(projections[kind], size, pixel_mm), window) for kind, window in SLAB_CHANNELS]
    return _on_canvas(np.stack(channels, axis=-1), size)  # (height, width, 3) on the canvas


def slab_token_cover(mask: np.ndarray, count: int, size: int, grid: int,
                     pixel_mm: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """How many canvas pixels of a voxel mask each image token covers, for ``count`` slab images.

    ``mask`` is boolean ``(z, y, x)`` on the study's planes (canonical order, as :class:`CTVolume`); each
    slab (:func:`slab_bounds`) keeps the voxels set on any of its planes, placed exactly where
    :func:`render_slab` draws them on the ``size`` x ``size`` canvas; the canvas is cut into
    ``grid`` x ``grid`` equal cells (the model's pooled token grid, row-major). Returns ``(count, grid *
    grid)`` pixel counts."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or grid < 1 or grid > size:
        raise CTInputError(f"slab_token_cover needs a (z, y, x) mask and 1 <= grid <= size, got shape "
                           f"{mask.shape}, grid {grid}, size {size}")
    cover = np.zeros((count, grid * grid), dtype=np.int64)
    for k, (first, last) in enumerate(slab_bounds(mask.shape[0], count)):
        projected = mask[first : last + 1].any(axis=0)
        if not projected.any():
            continue
        scaled = _scaled_hu(projected.astype(np.float32), size, pixel_mm) >= 0.5  # (height, width)
        canvas = np.zeros((size, size), dtype=bool)
        top, left = (size - scaled.shape[0]) // 2, (size - scaled.shape[1]) // 2
        canvas[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
        cover[k] = cell_pixel_counts(canvas, grid)
    return cover


def ct_to_slices(
    volume: CTVolume,
    num_slices: int | None = None,
    spacing_mm: float | None = None,
    window: str = "multi",
    size: int = DEFAULT_SIZE,
) -> CTSlices:
    """Ordered RGB slice images for the model plus the series prompt (``<vid>...<t>...</vid>``).

    ``num_slices`` fixes the count (1-984); ``spacing_mm`` asks for a z spacing (count clipped to
    100-984); neither keeps the study's own count clipped to 100-984. ``window`` is a name from
    :data:`~domain_data.medical.windows.WINDOWS`, ``"multi"`` or ``"slab"`` (each image a projection of
    its slab of planes; see the module docstring).
    """
    if window not in ("multi", SLAB_WINDOW):
        get_window(window)  # validates the name
    if not isinstance(size, int) or size < 8:
        raise CTInputError(f"size={size!r}: use an integer image side of at least 8 pixels")
    count, reason = choose_slice_count(volume, num_slices, spacing_mm)
    pixel_mm = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    if window == SLAB_WINDOW:
        return _slabs_to_slices(volume, count, reason, size, pixel_mm)
    indices, positions = _target_indices(volume, count)
    images = [render_slice(_hu_plane(volume.hu, index), window, size, pixel_mm) for index in indices]
    resampled = reason if count == volume.num_slices and np.array_equal(indices, np.arange(count)) else (
        f"{reason}; resampled along z from {volume.num_slices} planes (linear in HU)")
    return CTSlices(images, indices, positions, series_prompt(count), window, size, resampled)


def _slabs_to_slices(volume: CTVolume, count: int, reason: str, size: int, pixel_mm: tuple[float, float]
                     ) -> CTSlices:
    bounds = slab_bounds(volume.num_slices, count)
    images = [render_slab(volume.hu[first : last + 1], size, pixel_mm) for first, last in bounds]
    centres = bounds.mean(axis=1)  # (count,) fractional z index of each slab's middle
    positions = np.interp(centres, np.arange(volume.num_slices), np.asarray(volume.z_offsets_mm, dtype=np.float64))
    thickness = bounds[:, 1] - bounds[:, 0] + 1
    how = (f"{reason}; each image projects a slab of {thickness.min()}-{thickness.max()} of the study's "
           f"{volume.num_slices} planes (MinIP / average / MIP)")
    return CTSlices(images, centres, positions, series_prompt(count), SLAB_WINDOW, size, how)


def montage(slices: CTSlices | Sequence[Image.Image], columns: int = 8, max_images: int = 32,
            tile: int = 128) -> Image.Image:
    """A contact sheet of up to ``max_images`` evenly chosen slices, ``columns`` per row, in order."""
    images = list(slices.images if isinstance(slices, CTSlices) else slices)
    if not images:
        raise CTInputError("montage needs at least one slice image")
    if columns < 1 or max_images < 1 or tile < 8:
        raise CTInputError("montage: columns and max_images must be >= 1 and tile >= 8")
    picks = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int))
    rows = int(np.ceil(len(picks) / columns))
    used_columns = min(columns, len(picks))
    sheet = Image.new("RGB", (used_columns * tile, rows * tile))
    for position, index in enumerate(picks):
        thumb = images[index].convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        sheet.paste(thumb, ((position % columns) * tile, (position // columns) * tile))
    return sheet
