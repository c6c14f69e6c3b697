"""A deterministic judge: which colour, shape, position and size one image of the shapes domain shows.

Measures the image itself (no model): the background from the border, the object as the largest connected
region that differs from it, then colour from the object's hue, shape from its outline, position from its
bounding-box centre and size from its bounding-box side. `score` compares the result with the scene a prompt
asked for (see nodes.shapes.domain.parse_caption). Made to read generated images: blurred, noisy or colour-cast ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from nodes.shapes.domain import (
    COLOURS,
    IMAGE_SIZE,
    POSITION_CENTRES,
    SHAPES,
    SIZE_FRACTIONS,
    SUPERSAMPLE,
    Scene,
    inside,
)

BORDER = 2  # pixels of each edge that estimate the background (an object may reach into them; see judge_image)
MIN_CONTRAST = 40.0  # RGB distance from the background below which a pixel, or the object's colour, is background
NOISE_FACTOR = 4.0  # ... raised to this multiple of the border's median distance, so pixel noise stays background
MIN_AREA = 0.004  # smallest object, as a fraction of the image (16 px at 64x64); a small triangle is ~80 px
MAX_AREA = 0.5  # largest object: a large square with jitter covers under 22 %; more is no object on a background
MIN_CHROMA = 25.0  # object colour this close to gray (in the opponent plane, RGB levels) names no colour
MIN_SHAPE_FIT = 0.85  # a best shape fit below this names no shape: a blob is not a circle
FIT_MARGIN = 4  # pixels around the object's outline that the shape fit sees: blur spreads an edge about 2 sigma
# Bounding-box side between the two sizes (geometric mean of SIZE_FRACTIONS), as a fraction of the image side.
SIZE_THRESHOLD = float(np.sqrt(SIZE_FRACTIONS["small"] * SIZE_FRACTIONS["large"]))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # a triangle's thin apex joins its body diagonally


@dataclass(frozen=True)
class Judgement:
    """What the judge read from one image: the four attributes (None where it could not tell) and its measurements.

    Coordinates and lengths are fractions of the image side, x to the right, y downwards.
    """

    colour: str | None  # nearest COLOURS hue, None for no object or a grayish one
    shape: str | None  # best-fitting outline, None below MIN_SHAPE_FIT
    position: str | None  # nearest POSITION_CENTRES point to the bounding-box centre
    size: str | None  # "large" when the bounding-box side exceeds SIZE_THRESHOLD
    foreground_fraction: float = 0.0  # object pixels / image pixels (0 when no object was found)
    centroid: tuple[float, float] | None = None  # object's centre of mass (a triangle's sits below its box centre)
    centre: tuple[float, float] | None = None  # bounding-box centre, what position is judged by
    side: float | None = None  # longer bounding-box side
    fill_ratio: float | None = None  # object pixels / bounding-box pixels: square ~1, circle ~0.79, triangle ~0.5
    shape_fit: float | None = None  # how well the chosen shape explains the object: 1 - sq. error / sq. coverage
    blur: float | None = None  # Gaussian sigma (pixels) of the best fit: how soft the object's edges are
    rgb: tuple[int, int, int] | None = None  # object's median colour, from its pixels farthest from the background
    background: tuple[int, int, int] | None = None  # background colour estimated from the border


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Opponent-colour coordinates (red-green, yellow-blue) of RGB values or differences, shape (..., 2).

    Orthogonal to the gray axis: adding gray, mixing with gray (blur into the background) or a uniform brightness
    change moves a colour along its own hue direction, never across to another hue.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([(r - g) / np.sqrt(2.0), (r + g - 2.0 * b) / np.sqrt(6.0)], axis=-1)


_COLOUR_NAMES = tuple(COLOURS)
_PALETTE_CHROMA = _chroma(np.array(list(COLOURS.values()), dtype=float))
_COLOUR_HUES = np.arctan2(_PALETTE_CHROMA[:, 1], _PALETTE_CHROMA[:, 0])  # radians; BACKGROUND is gray, hue-free


def _nearest_colour(difference: np.ndarray) -> str | None:
    """The palette colour whose hue is nearest that of (object - background), or None if nearly gray."""
    chroma = _chroma(difference)
    if np.hypot(*chroma) < MIN_CHROMA:
        return None
    hue = np.arctan2(chroma[1], chroma[0])
    gap = np.abs(np.angle(np.exp(1j * (_COLOUR_HUES - hue))))  # circular distance
    return _COLOUR_NAMES[int(np.argmin(gap))]


# Area of each shape as a fraction of its square bounding box, and how far its centroid sits below the box centre
# (fraction of the side): both exact for nodes.shapes.domain.render, and unchanged by blur, which keeps area and centroid.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}
_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # Gaussian sigmas (pixels) each shape's outline is tried with


@functools.lru_cache(maxsize=256)
def _blur_matrices(n: int) -> np.ndarray:
    """(len(_BLURS), n, n) matrices that blur a length-n signal by each of _BLURS, zero beyond its ends (read-only)."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    matrices = []
    for sigma in _BLURS:
        if sigma == 0:
            matrices.append(np.eye(n))
            continue
        reach = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
        norm = np.exp(-(reach**2) / (2 * sigma**2)).sum()  # the whole kernel's weight, also what falls off the ends
        matrices.append(np.exp(-(offsets**2) / (2 * sigma**2)) / norm)
    matrices = np.stack(matrices)
    matrices.flags.writeable = False
    return matrices


def _fit_shapes(coverage: np.ndarray) -> dict[str, tuple[float, float]]:
    """How well each shape explains a coverage map (0 background, 1 object): shape -> (fit, blur sigma).

    Each shape is placed by the map's area and centroid (blur keeps both), drawn anti-aliased as render() draws,
    blurred by each of _BLURS, and scored by 1 - squared error / squared coverage (1 is a perfect match). Fitting
    the blur too is what keeps a blurred small square from passing for a circle.
    """
    area = float(coverage.sum())
    height, width = coverage.shape
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = float((xs * coverage).sum() / area), float((ys * coverage).sum() / area)
    fine_y = (np.arange(height * SUPERSAMPLE)[:, None] + 0.5) / SUPERSAMPLE
    fine_x = (np.arange(width * SUPERSAMPLE)[None, :] + 0.5) / SUPERSAMPLE
    drawn = np.stack(
        [
            inside(shape, fine_x, fine_y, cx, cy - _CENTROID_DROP[shape] * side, side)
            .reshape(height, SUPERSAMPLE, width, SUPERSAMPLE)
            .mean(axis=(1, 3))  # supersampled and box-filtered, as render() anti-aliases
            for shape in SHAPES
            for side in [np.sqrt(area / _FILL[shape])]
        ]
    )
    # Separable Gaussian blur as two matrix products: blurred[k, b] = rows[b] @ drawn[k] @ cols[b].T.
    blurred = _blur_matrices(height) @ drawn[:, None] @ _blur_matrices(width).transpose(0, 2, 1)
    errors = ((blurred - coverage) ** 2).sum(axis=(2, 3))  # (shape, blur)
    energy = float((coverage**2).sum())
    best = errors.argmin(axis=1)
    return {shape: (1.0 - float(errors[k, best[k]]) / energy, _BLURS[best[k]]) for k, shape in enumerate(SHAPES)}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _as_array(image) -> np.ndarray:
    """The image as float64 (H, W, 3), box-filtered down to IMAGE_SIZE on its shorter side when larger.

    Downsampling makes the pixel-sized constants (border, blurs, fit margin) mean the same at every resolution.
    """
    if not isinstance(image, Image.Image):
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, not shape {pixels.shape} dtype {pixels.dtype}")
        image = Image.fromarray(pixels, "RGB")
    image = image.convert("RGB")
    scale = IMAGE_SIZE / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
    if min(image.size) <= 2 * BORDER + 1:
        raise ValueError(f"image of {image.width}x{image.height} pixels is too small to judge")
    return np.asarray(image, dtype=np.float64)


def judge_image(image) -> Judgement:
    """Judge one RGB image: an (H, W, 3) uint8 array or a PIL image, of any size (the domain's are 64x64).

    A blank image, one without a distinct object, or one that is mostly "object" gives None for every attribute.
    """
    pixels = _as_array(image)
    height, width = pixels.shape[:2]
    ring = np.ones((height, width), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    # The median of the border: the object may touch the border somewhere, it never covers half of it.
    background = np.median(pixels[ring], axis=0)
    found_background = tuple(int(round(c)) for c in background)
    nothing = Judgement(None, None, None, None, background=found_background)

    # Pass 1: pixels clearly off the background (above both a fixed contrast and the border's own noise).
    distance = np.linalg.norm(pixels - background, axis=-1)
    threshold = max(MIN_CONTRAST, NOISE_FACTOR * float(np.median(distance[ring])))
    seed = _largest_component(distance > threshold)
    if seed.sum() < MIN_AREA * height * width:
        return nothing
    # The object's colour: the median of its core (the half of its pixels farthest from the background), which
    # blur has mixed least with the background.
    core = seed & (distance >= np.median(distance[seed]))
    colour = np.median(pixels[core], axis=0)
    contrast = colour - background
    if np.linalg.norm(contrast) < MIN_CONTRAST:
        return nothing

    # Pass 2: the outline, where each pixel is at least halfway from the background to the object's colour
    # along the line between them. A blurred edge crosses halfway where the sharp edge was, so the outline
    # keeps its size under blur, and noise across that line does not count.
    along = (pixels - background) @ contrast / float(contrast @ contrast)
    mask = _largest_component(along > 0.5)
    area = int(mask.sum())
    fraction = area / (height * width)
    if area < MIN_AREA * height * width or fraction > MAX_AREA:
        return Judgement(None, None, None, None, foreground_fraction=fraction, background=found_background)

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = mask[top:bottom, left:right]
    # The coverage map around the object (pixels farther away, and other regions, count as background).
    near = ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED, iterations=FIT_MARGIN)
    window = (
        slice(max(top - FIT_MARGIN, 0), bottom + FIT_MARGIN),
        slice(max(left - FIT_MARGIN, 0), right + FIT_MARGIN),
    )
    coverage = np.clip(along, 0.0, 1.0) * near
    fits = _fit_shapes(coverage[window])
    best = max(SHAPES, key=lambda name: fits[name][0])
    shape = best if fits[best][0] >= MIN_SHAPE_FIT else None

    centre = ((left + right) / 2 / width, (top + bottom) / 2 / height)
    position = min(POSITION_CENTRES, key=lambda p: np.hypot(*np.subtract(centre, POSITION_CENTRES[p])))
    side = max((bottom - top) / height, (right - left) / width)
    ys, xs = np.nonzero(mask)
    return Judgement(
        colour=_nearest_colour(contrast),
        shape=shape,
        position=position,
        size="large" if side > SIZE_THRESHOLD else "small",
        foreground_fraction=fraction,
        centroid=(float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height),
        centre=(float(centre[0]), float(centre[1])),
        side=float(side),
        fill_ratio=area / box.size,
        shape_fit=fits[best][0],
        blur=fits[best][1],
        rgb=tuple(int(round(c)) for c in colour),
        background=found_background,
    )


def score(judgement: Judgement, scene: Scene) -> dict[str, bool]:
    """Per attribute, whether the judge read what the scene asks for; "all" when every attribute matches."""
    result = {
        "colour": judgement.colour == scene.colour,
        "shape": judgement.shape == scene.shape,
        "position": judgement.position == scene.position,
        "size": judgement.size == scene.size,
    }
    result["all"] = all(result.values())
    return result
