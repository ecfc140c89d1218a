"""Procedural, seeded "shapes" dataset: 64x64 RGB images in 10 classes (5 shapes x 2 textures).

Why this dataset: it lets us train a tiny class-conditional VAR model on CPU while still exercising
every scale of the multi-scale tokenizer. The random factors are chosen so that each scale has
something to carry:

* coarse scales (1x1 .. 4x4 tokens): the two-colour gradient background and the object's colour and
  rough position (layout and colour);
* middle scales: the outline that tells a disk from a square, triangle, ring or cross (shape);
* fine scales: anti-aliased edges, the stripe texture and light pixel noise (edges and texture).

Classes: ``label = shape_index * 2 + texture_index`` with shapes ``SHAPES`` and textures ``TEXTURES``
(``CLASS_NAMES[label]`` is e.g. ``"disk-solid"`` or ``"ring-striped"``). Striped objects use stripes
whose orientation (in the image frame, so it does not follow the object's rotation) and period are
fixed per shape, alternating the object colour and a dark tone of it; only the stripe phase is random.

Determinism and splits: sample ``index`` of split ``seed`` is a pure function of ``(seed, index)``.
Its label is ``index % 10`` (so any window of 10 consecutive indices is perfectly balanced) and all
other factors come from ``numpy.random.default_rng((seed, index, _SALT))``. Rendering is elementwise
float32 numpy, so a sample's pixels do not depend on which batch it was rendered in.

* ``TRAIN_SEED = 0``: training split (the classifier and the VAR model train on it on the fly);
* ``EVAL_SEED = 1``: held-out evaluation split (never used for training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "cross")
TEXTURES: tuple[str, ...] = ("solid", "striped")
NUM_CLASSES = len(SHAPES) * len(TEXTURES)
CLASS_NAMES: tuple[str, ...] = tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)
TRAIN_SEED = 0
EVAL_SEED = 1

# Supersampling factor for anti-aliasing: the object mask and stripes are evaluated on a
# (64*_SS)^2 grid with a one-subpixel soft edge and then area-averaged down. 2x with soft edges
# already gives smooth edges; higher factors cost ~_SS^2 time for no visible gain.
_SS = 2
# Mixed into every per-sample seed so that this dataset's streams never coincide with another
# component that also seeds a Generator with (seed, index).
_SALT = 0x5CA1E
# Samples rendered per vectorised pass; keeps the supersampled working set cache-friendly.
_CHUNK = 64
# Object size: nominal diameter as a fraction of the image side (the disk's diameter; see _EXTENT).
_SIZE_RANGE = (0.40, 0.70)
_NOISE_STD = 2.0 / 255.0
# Per-shape circumradius in units of the nominal radius. Disk and ring fill the nominal circle;
# polygons and the cross are drawn a bit larger so that their visible area is comparable to a disk of
# the same nominal size (an inscribed triangle would cover only 40% of it). Centres are sampled so that
# the whole circumcircle stays inside the frame.
_EXTENT: tuple[float, ...] = (1.0, 1.132, 1.15, 1.0, 1.093)
# Per-shape stripe (direction of the stripe normal in degrees, period in output pixels).
_STRIPES: tuple[tuple[float, float], ...] = ((90.0, 6.0), (45.0, 7.0), (0.0, 8.0), (135.0, 6.0), (60.0, 7.0))
# Dark stripe tone = object colour times this factor: same hue, clearly different luminance.
_STRIPE_DARK = 0.35


@dataclass(frozen=True)
class SampleParams:
    """All random factors of one sample (in output-pixel units); exposed for tests and debugging."""

    label: int
    shape: int
    texture: int
    cx: float
    cy: float
    radius: float  # nominal radius (half the sampled size); see _EXTENT for each shape's true extent
    rotation: float  # radians
    obj_rgb: tuple[float, float, float]
    bg_rgb0: tuple[float, float, float]
    bg_rgb1: tuple[float, float, float]
    bg_angle: float  # radians, direction of the background gradient
    stripe_phase: float  # in periods, [0, 1)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    """Scalar HSV -> RGB in [0, 1]; per-sample colours are drawn in HSV so hue separation is easy."""
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]


def sample_params(seed: int, index: int) -> tuple[SampleParams, np.random.Generator]:
    """Draw one sample's factors; returns the Generator too so the caller can draw its noise next.

    The draw order is part of the dataset definition: changing it changes every image.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    label = index % NUM_CLASSES
    shape, texture = divmod(label, len(TEXTURES))
    rng = np.random.default_rng((seed, index, _SALT))
    u = rng.random(13)
    radius = 0.5 * IMAGE_SIZE * (_SIZE_RANGE[0] + (_SIZE_RANGE[1] - _SIZE_RANGE[0]) * u[0])
    # Keep the whole bounding circle (plus a pixel) inside the frame so the shape is never cut.
    extent = radius * _EXTENT[shape]
    lo, hi = extent + 1.0, IMAGE_SIZE - extent - 1.0
    cx = lo + (hi - lo) * u[1]
    cy = lo + (hi - lo) * u[2]
    rotation = 2.0 * np.pi * u[3]
    # Saturated, bright object; background hue is pushed to the far side of the colour wheel and kept
    # less saturated, so the object separates from the background by both hue and saturation.
    obj_h = u[4]
    obj = _hsv_to_rgb(obj_h, 0.75 + 0.25 * u[5], 0.80 + 0.20 * u[6])
    bg_h = obj_h + 0.30 + 0.40 * u[7]
    bg0 = _hsv_to_rgb(bg_h, 0.10 + 0.35 * u[8], 0.45 + 0.50 * u[9])
    bg1 = _hsv_to_rgb(bg_h + 0.16 * (u[10] - 0.5), 0.10 + 0.35 * u[11], 0.45 + 0.50 * u[12])
    bg_angle = 2.0 * np.pi * rng.random()
    stripe_phase = float(rng.random())
    params = SampleParams(
        label=label,
        shape=shape,
        texture=texture,
        cx=float(cx),
        cy=float(cy),
        radius=float(radius),
        rotation=float(rotation),
        obj_rgb=tuple(float(c) for c in obj),
        bg_rgb0=tuple(float(c) for c in bg0),
        bg_rgb1=tuple(float(c) for c in bg1),
        bg_angle=float(bg_angle),
        stripe_phase=stripe_phase,
    )
    return params, rng


def _grid(size: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (in output pixels) of a ``size*ss`` square grid, as [1,1,S] / [1,S,1]."""
    c = ((np.arange(size * ss, dtype=np.float32) + 0.5) / ss).astype(np.float32)
    return c[None, None, :], c[None, :, None]


_XS, _YS = _grid(IMAGE_SIZE, _SS)
_X1, _Y1 = _grid(IMAGE_SIZE, 1)


def _sdf(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) in units of the bounding radius, object-local coordinates.

    Box/polygon distances use the max-of-half-planes form, which is exact inside and near edges; it
    only underestimates distance beyond corners, where it merely rounds the one-subpixel soft edge.
    """
    if shape == 0:  # disk
        return np.sqrt(u * u + v * v) - 1.0
    if shape == 1:  # square, half-side 0.8 (circumradius 1.13)
        return np.maximum(np.abs(u), np.abs(v)) - np.float32(0.8)
    if shape == 2:  # equilateral triangle, circumradius 1.15 (inradius 0.575)
        h = np.float32(0.575)
        c, s = np.float32(np.cos(np.pi / 6)), np.float32(np.sin(np.pi / 6))
        d = np.maximum(v - h, -c * u - s * v - h)  # edge normals (0, 1), (-cos30, -sin30), (cos30, -sin30)
        return np.maximum(d, c * u - s * v - h)
    if shape == 3:  # ring: outer radius 1, inner radius 0.44
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28
    if shape == 4:  # plus-shaped cross: arms reach 1.05, half-width 0.3 (circumradius 1.09)
        au, av = np.abs(u), np.abs(v)
        w, arm = np.float32(0.30), np.float32(1.05)
        return np.minimum(np.maximum(au - arm, av - w), np.maximum(au - w, av - arm))
    raise ValueError(f"unknown shape index {shape}")


def _col(values: list[float] | np.ndarray) -> np.ndarray:
    """Per-sample scalars as a float32 [n,1,1] column for broadcasting over the pixel grid."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _downsample(x: np.ndarray) -> np.ndarray:
    """Area-average [n, 64*_SS, 64*_SS] -> [n, 64, 64] (strided adds: much faster than a 5-D mean)."""
    n, side = x.shape[0], x.shape[1] // _SS
    y = x.reshape(n, side, _SS, side, _SS)
    acc = y[:, :, 0, :, 0].copy()
    for i in range(_SS):
        for j in range(_SS):
            if i or j:
                acc += y[:, :, i, :, j]
    return acc * np.float32(1.0 / (_SS * _SS))


def _render_group(shape: int, params: list[SampleParams]) -> tuple[np.ndarray, np.ndarray]:
    """Render samples of one shape at output resolution: returns (coverage, coverage * shade), [n,64,64].

    ``shade`` is the per-pixel brightness factor of the object colour (1 for solid objects, between
    ``_STRIPE_DARK`` and 1 across stripes), so the object's premultiplied colour is
    ``obj_rgb * (coverage * shade)``: only two scalar fields need supersampling, not three channels.
    """
    cx, cy = _col([p.cx for p in params]), _col([p.cy for p in params])
    r = _col([p.radius for p in params])
    rot = np.array([p.rotation for p in params], dtype=np.float32)
    cos, sin = _col(np.cos(rot)), _col(np.sin(rot))
    dx, dy = _XS - cx, _YS - cy
    inv_r = 1.0 / r
    u = (dx * cos + dy * sin) * inv_r
    v = (dy * cos - dx * sin) * inv_r
    # Soft edge one subpixel wide, then box-filter down: analytic + supersampled anti-aliasing.
    cover = np.clip(0.5 - _sdf(shape, u, v) * (r * _SS), 0.0, 1.0)
    shaded = cover
    striped = np.array([p.texture == 1 for p in params])
    if striped.any():
        shaded = cover.copy()
        idx = np.nonzero(striped)[0]
        ang, period = _STRIPES[shape]
        a = np.deg2rad(ang)
        phase = _col([params[i].stripe_phase for i in idx])
        # Stripe coordinate in periods, measured from the object's centre so stripes move with it.
        t = (dx[idx] * np.float32(np.cos(a)) + dy[idx] * np.float32(np.sin(a))) / np.float32(period) + phase
        tri = np.abs(t - np.floor(t) - 0.5)  # in [0, 0.5]; 0.25 is a stripe boundary
        light = np.clip((tri - 0.25) * np.float32(period * _SS) + 0.5, 0.0, 1.0)
        shaded[idx] = cover[idx] * (_STRIPE_DARK + (1.0 - _STRIPE_DARK) * light)
    return _downsample(cover), _downsample(shaded)


def render_batch(seed: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Render samples ``start .. start+count-1`` of split ``seed``.

    Returns ``(images uint8 [count,64,64,3], labels int64 [count])``. Pixels are identical to calling
    :func:`render` on each index; batching only amortises numpy overhead (shapes are rendered in
    groups so only one signed-distance function is evaluated per pixel).
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if count > _CHUNK:
        # Large batches are rendered in cache-sized chunks (~2x faster than one huge working set).
        parts = [
            render_batch(seed, s, min(_CHUNK, start + count - s)) for s in range(start, start + count, _CHUNK)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    params: list[SampleParams] = []
    noise = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for k in range(count):
        p, rng = sample_params(seed, start + k)
        params.append(p)
        noise[k] = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    labels = np.array([p.label for p in params], dtype=np.int64)
    if count == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), labels

    # Background: linear gradient between two colours along a random direction, at output resolution
    # (it is smooth, so supersampling it would only cost time).
    ang = np.array([p.bg_angle for p in params], dtype=np.float32)
    half = IMAGE_SIZE / 2.0
    t = ((_X1 - half) * _col(np.cos(ang)) + (_Y1 - half) * _col(np.sin(ang))) / np.float32(
        half * np.sqrt(2.0)
    )
    t = (0.5 + 0.5 * t)[..., None]
    c0 = np.asarray([p.bg_rgb0 for p in params], dtype=np.float32)[:, None, None, :]
    c1 = np.asarray([p.bg_rgb1 for p in params], dtype=np.float32)[:, None, None, :]
    img = c0 + (c1 - c0) * t

    shapes = np.array([p.shape for p in params])
    for s in np.unique(shapes):
        idx = np.nonzero(shapes == s)[0]
        cover, shaded = _render_group(int(s), [params[i] for i in idx])
        obj = np.asarray([params[i].obj_rgb for i in idx], dtype=np.float32)[:, None, None, :]
        img[idx] = img[idx] * (1.0 - cover[..., None]) + obj * shaded[..., None]

    img += noise * np.float32(_NOISE_STD)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, labels


def render(seed: int, index: int) -> tuple[np.ndarray, int]:
    """Render one sample: ``(uint8 [64,64,3], label)``; a pure function of ``(seed, index)``."""
    images, labels = render_batch(seed, index, 1)
    return images[0], int(labels[0])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] (or [H,W,3]) -> float32 [N,3,H,W] (or [3,H,W]) in [-1, 1], the models' input range."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: float [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3] (clamped, rounded)."""
    x = images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.movedim(-3, -1).to(torch.uint8).cpu().numpy()


class ShapesDataset(Dataset):
    """Map-style view of split ``seed``: item ``i`` is sample ``start + i``, rendered on access.

    Items are ``(float32 tensor [3,64,64] in [-1,1], int label)``. Nothing is cached: rendering is
    cheaper than the models that consume it, and an unbounded index space needs no storage. For
    throughput prefer :meth:`get_batch` (or :func:`render_batch`) over per-item access.
    """

    def __init__(self, seed: int, length: int, start: int = 0) -> None:
        if length < 0 or start < 0:
            raise ValueError(f"length and start must be non-negative, got length={length} start={start}")
        self.seed = seed
        self.length = length
        self.start = start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for length {self.length}")
        image, label = render(self.seed, self.start + i)
        return to_tensor(image), label

    def get_batch(self, i: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``i .. i+count-1`` as ``(float32 [count,3,64,64], int64 [count])`` in one vectorised call."""
        if i < 0 or count < 0 or i + count > self.length:
            raise IndexError(f"batch [{i}, {i + count}) out of range for length {self.length}")
        images, labels = render_batch(self.seed, self.start + i, count)
        return to_tensor(images), torch.from_numpy(labels)
