"""How a synthetic lesion is drawn (for :mod:`dermlab.data.synthetic`): a :class:`Lesion` holds everything fixed
for one lesion (shape, palette, structures, skin and hair); :func:`render_canvas` paints it once on a square
canvas with vectorised numpy on coordinate grids plus PIL drawing, and :func:`render_view` photographs that
canvas (pose, zoom, light, scope corners). Every draw comes from the generator passed in, in a fixed order, so
the images are byte-for-byte deterministic from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Lesion", "render_canvas", "render_view"]


@dataclass
class Lesion:
    """Everything that is fixed for one lesion; views add pose and lighting."""

    # shape
    radius: float
    aspect: float
    orientation: float
    harmonics: np.ndarray  # (k, 2): amplitude, phase for k = 1..K
    edge: float
    # palette (RGB in 0..1)
    colors: list[np.ndarray]
    opacity: float
    mottle: float
    # structures
    network: float = 0.0
    dots: int = 0
    blue_grey: float = 0.0
    vessels: int = 0
    ulcer: bool = False
    scales: float = 0.0
    lobules: int = 0
    central_white: float = 0.0
    cysts: int = 0
    # skin and hair
    skin: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.65, 0.55]))
    hairs: int = 0



def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Blobby noise of unit standard deviation: a coarse random grid upsampled bicubically."""
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC))
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _blend(image: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> None:
    """In place: image = image * (1 - alpha) + color * alpha."""
    alpha = np.clip(alpha, 0, 1)[..., None]
    image *= 1 - alpha
    image += alpha * color


@dataclass(frozen=True)
class _Canvas:
    """The square canvas's coordinates: in image heights, and in the lesion's own frame (``q``: 1 on its border)."""

    side: int
    height: int
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    q: np.ndarray
    theta: np.ndarray
    inside: np.ndarray  # soft lesion mask, 1 inside the border
    cells: int  # noise-field resolution


def render_canvas(lesion: Lesion, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """The lesion on skin (with hairs) on a square canvas large enough for any rotated, zoomed-out view.

    Painted in layers, in this order (the random draws follow it): skin and lesion body, the dermoscopic
    structures, then drawn marks (lobules, dots, cysts, ulcer, vessels, hairs).
    """
    canvas = _lesion_canvas(lesion, height, width)
    image = _paint_skin_and_body(lesion, rng, canvas)
    _paint_structures(lesion, rng, canvas, image)
    _paint_marks(lesion, rng, canvas, image)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def _lesion_canvas(lesion: Lesion, height: int, width: int) -> _Canvas:
    """The canvas side and coordinate fields for ``lesion``'s shape, orientation and border."""
    side = int(math.ceil(math.hypot(height, width) / 0.85)) + 4
    coords = (np.arange(side, dtype=np.float32) - side / 2) / height  # in image heights
    x, y = coords[None, :], coords[:, None]
    cos_o, sin_o = math.cos(lesion.orientation), math.sin(lesion.orientation)
    u = (x * cos_o + y * sin_o) / lesion.aspect
    v = -x * sin_o + y * cos_o
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    border = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(lesion.harmonics, start=1):
        border += amplitude * np.cos(k * theta + phase)
    border *= lesion.radius
    q = r / np.maximum(border, 0.02)  # 0 at the centre, 1 on the border
    inside = 1 / (1 + np.exp(np.clip((q - 1) / lesion.edge, -30, 30)))
    cells = max(4, side // 24)
    return _Canvas(side, height, x, y, u, v, q, theta, inside, cells)


def _paint_skin_and_body(lesion: Lesion, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Mottled skin with erythema, then the lesion body: colours mixed by noise, blended in by the soft mask."""
    side, cells, inside = canvas.side, canvas.cells, canvas.inside
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = lesion.skin * (1 + 0.04 * _smooth_noise(rng, side, cells))[..., None]
    erythema = 0.08 + 0.06 * _smooth_noise(rng, side, cells // 2 + 2)
    _blend(image, np.array([0.85, 0.45, 0.45]), erythema)

    # Lesion body: colours mixed by noise fields (uniform when mottle is low), stronger towards the centre.
    body = np.empty_like(image)
    body[:] = lesion.colors[0]
    for color in lesion.colors[1:]:
        weight = 0.5 + 0.5 * np.tanh(2.2 * _smooth_noise(rng, side, cells) - 0.6)
        _blend(body, color, weight * lesion.mottle)
    body *= (1 + 0.06 * _smooth_noise(rng, side, cells * 3))[..., None]
    _blend(image, body, inside * lesion.opacity)
    return image


def _paint_structures(lesion: Lesion, rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> None:
    """Pigment network, blue-grey veil, scales and a central white patch, each as strong as the lesion says."""
    side, cells, inside, q, u, v, theta = canvas.side, canvas.cells, canvas.inside, canvas.q, canvas.u, canvas.v, canvas.theta
    if lesion.network > 0:  # pigment network: a dark mesh, warped, fading to the periphery
        period = 0.045 + 0.01 * rng.random()
        warp = (0.01 + 0.08 * lesion.network) * _smooth_noise(rng, side, cells)  # stronger = more atypical
        mesh = np.abs(np.sin((u + warp) * math.pi / period)) * np.abs(np.sin((v - warp) * math.pi / period))
        fade = np.clip(1.6 - q, 0, 1) * np.clip(0.6 + 0.5 * _smooth_noise(rng, side, cells), 0, 1)
        _blend(image, lesion.colors[0] * 0.5, lesion.network * inside * (1 - mesh) ** 5 * fade)
    if lesion.blue_grey > 0:  # blue-white veil / blue-grey areas, off-centre
        blob = _smooth_noise(rng, side, max(3, cells // 2)) + 0.8 * np.cos(theta - rng.uniform(0, 6.3))
        _blend(image, np.array([0.48, 0.52, 0.62]), lesion.blue_grey * inside * np.clip(blob - 0.3, 0, 1))
    if lesion.scales > 0:  # rough keratin: fine white speckle
        speckle = _smooth_noise(rng, side, side // 3)
        _blend(image, np.array([0.93, 0.90, 0.85]), lesion.scales * inside * np.clip(speckle - 0.5, 0, 1))
    if lesion.central_white > 0:  # dermatofibroma: central white scar-like patch
        patch = 1 / (1 + np.exp(np.clip((q - 0.45 - 0.1 * _smooth_noise(rng, side, cells)) / 0.08, -30, 30)))
        _blend(image, np.array([0.92, 0.88, 0.85]), lesion.central_white * patch)


def _paint_marks(lesion: Lesion, rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> None:
    """Drawn marks: vascular lobules, dots and globules, cysts, ulceration, arborising vessels, hairs."""
    side, height, cells, inside, q, x, y = canvas.side, canvas.height, canvas.cells, canvas.inside, canvas.q, canvas.x, canvas.y
    overlay = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(overlay)
    center = side / 2
    scale = height * lesion.radius
    line = max(1, round(height / 128))
    if lesion.lobules:  # vascular lesion: red-purple lobules with pale septa
        layer = np.zeros((side, side), dtype=np.float32)
        for _ in range(lesion.lobules):
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.75)
            cx, cy = (math.cos(angle) * dist * lesion.radius, math.sin(angle) * dist * lesion.radius)
            rad = lesion.radius * rng.uniform(0.2, 0.45)
            layer = np.maximum(layer, np.clip(1 - ((x - cx) ** 2 + (y - cy) ** 2) / rad**2, 0, 1))
        _blend(image, (lesion.colors[0] + lesion.colors[-1]) / 2, 0.8 * layer**0.5 * inside)  # red-purple
        _blend(image, np.array([0.85, 0.72, 0.72]), 0.35 * inside * (layer < 0.08))
    for _ in range(lesion.dots):  # dark dots and globules
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.95)
        px, py = center + math.cos(angle) * dist * scale, center + math.sin(angle) * dist * scale
        rad = max(0.6, height * rng.uniform(0.006, 0.018))
        draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=int(rng.integers(150, 230)))
    dots = np.asarray(overlay, dtype=np.float32) / 255
    _blend(image, np.array([0.10, 0.07, 0.07]), dots)

    if lesion.cysts:  # milia-like cysts: small white-yellow dots
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.cysts):
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.85)
            px, py = center + math.cos(angle) * dist * scale, center + math.sin(angle) * dist * scale
            rad = max(0.6, height * rng.uniform(0.006, 0.014))
            draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=200)
        _blend(image, np.array([0.95, 0.92, 0.78]), np.asarray(overlay, dtype=np.float32) / 255)
    if lesion.ulcer:  # ulceration: dark red-brown crust
        spot = _smooth_noise(rng, side, max(3, cells // 2)) + 1.5 * (1 - q)
        _blend(image, np.array([0.38, 0.12, 0.10]), 0.85 * np.clip(spot - 1.2, 0, 1) * inside)
    if lesion.vessels:  # arborising vessels: branching red lines tapering outwards
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.vessels):
            angle = rng.uniform(0, 2 * math.pi)
            start = (center + math.cos(angle) * scale * rng.uniform(0.5, 0.9),
                     center + math.sin(angle) * scale * rng.uniform(0.5, 0.9))
            inward = angle + math.pi + rng.normal(0, 0.4)
            _draw_branch(draw, rng, start, inward, scale * 0.45, 2 * line + 1, 3)
        _blend(image, np.array([0.68, 0.08, 0.14]), np.asarray(overlay, dtype=np.float32) / 255)

    if lesion.hairs:  # dark hairs crossing the field
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.hairs):
            p0, p1, p2 = rng.uniform(0, side, (3, 2))
            t = np.linspace(0, 1, 12)[:, None]
            points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            ink = int(rng.integers(140, 230))
            draw.line([tuple(p) for p in points], fill=ink, width=line + 1, joint="curve")
        hair_color = np.array([0.12, 0.09, 0.07]) * rng.uniform(0.5, 1.5)
        _blend(image, hair_color, np.asarray(overlay, dtype=np.float32) / 255)


def _draw_branch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, start: tuple[float, float],
                 angle: float, length: float, width: int, depth: int) -> None:
    end = (start[0] + math.cos(angle) * length, start[1] + math.sin(angle) * length)
    draw.line([start, end], fill=int(rng.integers(170, 240)), width=max(1, width))
    if depth > 1:
        for turn in (-1, 1):
            turned = angle + turn * rng.uniform(0.3, 0.9)
            _draw_branch(draw, rng, end, turned, length * rng.uniform(0.45, 0.7), width - 1, depth - 1)


def render_view(canvas: Image.Image, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """One photograph of the lesion: rotation, zoom, shift, then lighting, scope corners, ruler, noise."""
    angle = rng.uniform(0, 2 * math.pi)
    zoom = rng.uniform(0.85, 1.2)
    shift = rng.normal(0, 0.05 * height, 2)
    cos_a, sin_a = math.cos(angle) / zoom, math.sin(angle) / zoom
    side = canvas.size[0]
    a, b, d, e = cos_a, -sin_a, sin_a, cos_a
    c = side / 2 + shift[0] - (a * width / 2 + b * height / 2)
    f = side / 2 + shift[1] - (d * width / 2 + e * height / 2)
    view = canvas.transform((width, height), Image.Transform.AFFINE, (a, b, c, d, e, f),
                            resample=Image.Resampling.BILINEAR)

    if rng.random() < 0.12:  # ruler marks along one edge
        draw = ImageDraw.Draw(view)
        step = max(3, round(height * rng.uniform(0.04, 0.07)))
        ink = tuple(int(rng.integers(20, 70)) for _ in range(3))
        edge = height - 1 - round(height * rng.uniform(0.03, 0.12))
        for i, position in enumerate(range(int(rng.integers(0, step)), width, step)):
            tick = round(height * (0.06 if i % 5 == 0 else 0.03))
            draw.line([(position, edge), (position, edge - tick)], fill=ink, width=1)
        draw.line([(0, edge), (width, edge)], fill=ink, width=1)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.ROTATE_180)

    image = np.asarray(view, dtype=np.float32) / 255
    xs = (np.arange(width, dtype=np.float32) - width / 2) / height
    ys = (np.arange(height, dtype=np.float32) - height / 2) / height
    x, y = xs[None, :], ys[:, None]
    light_angle = rng.uniform(0, 2 * math.pi)
    gradient = x * math.cos(light_angle) + y * math.sin(light_angle)
    light = rng.uniform(0.85, 1.1) * (1 + rng.uniform(0, 0.35) * gradient)  # uneven illumination
    radius2 = x * x + y * y
    light = light * (1 - rng.uniform(0.1, 0.35) * radius2)  # lens falloff
    if rng.random() < 0.45:  # dermoscope: dark corners outside the circular field
        scope = rng.uniform(0.55, 0.8)
        light = light / (1 + np.exp(np.clip((np.sqrt(radius2) - scope) / 0.015, -30, 30)))
    cast = 1 + rng.normal(0, 0.025, 3)  # white balance
    image = image * light[..., None] * cast
    image += rng.normal(0, rng.uniform(0.005, 0.025), image.shape)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
