"""A procedural captions-and-images domain (coloured shapes on a plain background) to train and judge a small model.

Every image shows one filled shape, described by a `Scene` (colour, shape, position, size); every caption names
those four attributes in words that `parse_caption` reads back, so a generated image can be scored against its
prompt by `nodes.shapes.judge`. Pure numpy, deterministic from a seed, nothing downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # pixels per side of every image
SUPERSAMPLE = 4  # shapes are sampled at 4x per side and box-filtered down: anti-aliased edges

# Saturated colours near the six RGB primaries and secondaries, whose hues sit 55-67 degrees apart around the
# colour wheel (measured in the opponent-colour plane that nodes.shapes.judge uses: red 30, yellow 85, green 146,
# cyan 213, blue 267, purple 323), so a blurred or slightly shifted rendition keeps its nearest hue; each is
# also at least ~180 RGB levels from the background, so the object separates from it. No orange: it would sit
# between red and yellow and halve their margin.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 20),
    "green": (40, 170, 30),
    "cyan": (0, 180, 190),
    "blue": (30, 40, 220),
    "purple": (170, 30, 190),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")

# One fixed light neutral gray: no hue of its own to be confused with a colour, lighter than every colour but
# yellow, and far from each in RGB. Fixed rather than varied so that the judge's background estimate is
# checkable and the model spends no capacity on it.
BACKGROUND: tuple[int, int, int] = (200, 200, 200)

# Colour-shape pairs never shown in training, to test composition: each colour and each shape is still seen
# with its other partners, and each shape is held out once.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})

# Object centre as fractions (x, y) of the image side; y grows downwards as in image coordinates.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
# Side of the object's (square) bounding box as a fraction of the image side; nearly 2x apart.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.22, "large": 0.42}
SIZE_JITTER = 0.10  # the side varies by up to +-10 % ...
CENTRE_JITTER = 2.5  # ... and the centre by up to 2.5 pixels in x and in y, when render() gets an rng
MARGIN = 1.0  # pixels kept free between the object and the image edge (large shapes at a side need it)

# Caption wording. Position phrases per position; templates put {size}, {colour}, {shape} and {where} in
# different orders so that no attribute is recognisable by its place in the sentence alone.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top", "at the top of the image"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom of the image"),
    "centre": ("in the centre", "at the centre", "in the centre of the image"),
}
TEMPLATES = (
    "{a} {size} {colour} {shape} {where}",
    "a photo of {a} {size} {colour} {shape} {where}",
    "a drawing of {a} {colour} {shape} {where}, {size}",
    "{size} {colour} {shape}, {where}",
    "an image of {a} {colour} {shape} {where}, {size}",
    "{where}, {a} {size} {colour} {shape}",
    "a picture of {a} {colour} {shape}, {size}, {where}",
    "{colour} {shape}, {size}, {where}",
)

# Words parse_caption accepts besides the canonical ones; captions themselves never use them.
SYNONYMS: dict[str, str] = {"center": "centre", "middle": "centre", "big": "large", "tiny": "small"}
_ATTRIBUTE_OF: dict[str, tuple[str, str]] = {
    **{w: ("colour", w) for w in COLOURS},
    **{w: ("shape", w) for w in SHAPES},
    **{w: ("position", w) for w in POSITIONS},
    **{w: ("size", w) for w in SIZES},
}
for _word, _canonical in SYNONYMS.items():
    _ATTRIBUTE_OF[_word] = _ATTRIBUTE_OF[_canonical]

_SPLIT_CODES = {"train": 0, "held_out": 1, "all": 2}


def _words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# Every word a caption can contain, plus the synonyms parse_caption accepts (so a hand-written prompt with
# them tokenizes to whole words too), for nodes.shapes.builders.toy_tokenizer_files.
DOMAIN_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an"]
        + [w for t in TEMPLATES for w in _words_of(t.format(a="", size="", colour="", shape="", where=""))]
        + [w for phrases in POSITION_PHRASES.values() for p in phrases for w in _words_of(p)]
        + list(COLOURS)
        + list(SHAPES)
        + list(POSITIONS)
        + list(SIZES)
        + list(SYNONYMS)
    )
)


@dataclass(frozen=True)
class Scene:
    """What one image shows: a single filled shape."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    position: str  # one of POSITIONS
    size: str  # one of SIZES


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as an (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB array; `rng` jitters centre and size, None does not.

    The object is centred at its POSITION_CENTRES point (its bounding box centre, not its centroid: a triangle's
    centroid sits lower) with side SIZE_FRACTIONS of the image; it always stays MARGIN pixels inside the image.
    Triangles point up and fill their square bounding box (apex at the top middle, base the full width).
    An rng is always drawn from the same way (three uniforms), whatever the scene.
    """
    for name, known in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
        if getattr(scene, name) not in known:
            raise ValueError(f"unknown {name} {getattr(scene, name)!r}; expected one of {', '.join(known)}")
    n = IMAGE_SIZE
    side = SIZE_FRACTIONS[scene.size] * n
    cx, cy = (f * n for f in POSITION_CENTRES[scene.position])
    if rng is not None:
        jitter = rng.uniform(-1.0, 1.0, size=3)
        side *= 1.0 + SIZE_JITTER * jitter[0]
        cx += CENTRE_JITTER * jitter[1]
        cy += CENTRE_JITTER * jitter[2]
    half = side / 2
    cx = min(max(cx, half + MARGIN), n - half - MARGIN)
    cy = min(max(cy, half + MARGIN), n - half - MARGIN)

    # Coverage of each pixel: the fraction of its SUPERSAMPLE x SUPERSAMPLE sub-pixel centres inside the shape
    # (a box filter of a 4x drawing), computed only over the pixels around the object.
    left, top = int(cx - half), int(cy - half)
    right, bottom = int(np.ceil(cx + half)), int(np.ceil(cy + half))
    fine_x = left + (np.arange((right - left) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    fine_y = top + (np.arange((bottom - top) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    drawn = inside(scene.shape, fine_x[None, :], fine_y[:, None], cx, cy, side)
    coverage = drawn.reshape(bottom - top, SUPERSAMPLE, right - left, SUPERSAMPLE).mean(axis=(1, 3))
    image = np.empty((n, n, 3), dtype=np.float64)
    image[...] = BACKGROUND
    background = np.array(BACKGROUND, dtype=np.float64)
    image[top:bottom, left:right] += coverage[..., None] * (np.array(COLOURS[scene.colour]) - background)
    return np.round(image).astype(np.uint8)


def inside(shape: str, x: np.ndarray, y: np.ndarray, centre_x: float, centre_y: float, side: float) -> np.ndarray:
    """Whether points (x, y) lie in `shape` whose square bounding box has centre (centre_x, centre_y) and `side`.

    Image coordinates (y downwards), any unit; x and y broadcast. The one definition of the shapes' geometry,
    shared by render() and by the judge's shape fit.
    """
    half = side / 2
    if shape == "circle":
        return (x - centre_x) ** 2 + (y - centre_y) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - centre_x) <= half) & (np.abs(y - centre_y) <= half)
    if shape == "triangle":  # apex at the top middle, base the full width of the box
        return (y >= centre_y - half) & (y <= centre_y + half) & (np.abs(x - centre_x) <= (y - centre_y + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A lowercase caption naming the scene's colour, shape, position and size, from a random template.

    Draws from `rng` the template, then the position phrase.
    """
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    phrases = POSITION_PHRASES[scene.position]
    where = phrases[int(rng.integers(len(phrases)))]
    text = template.format(a="a", size=scene.size, colour=scene.colour, shape=scene.shape, where=where)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an" before a vowel, should a colour name start with one


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None unless it names exactly one colour, shape, position and size.

    Reads words, not templates: any text with exactly one word of each attribute parses (other words are
    ignored, and center/middle, big/tiny count as centre, large/small), so hand-written prompts work too.
    A word repeated counts twice: "a small small red circle on the left" names the size twice and is None.
    """
    found: dict[str, list[str]] = {"colour": [], "shape": [], "position": [], "size": []}
    for word in _words_of(text):
        if word in _ATTRIBUTE_OF:
            attribute, value = _ATTRIBUTE_OF[word]
            found[attribute].append(value)
    if any(len(values) != 1 for values in found.values()):
        return None
    return Scene(**{attribute: values[0] for attribute, values in found.items()})


def _combos(split: str) -> list[tuple[str, str]]:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_CODES)}, not {split!r}")
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [combo for combo in every if combo not in HELD_OUT]
    if split == "held_out":
        return [combo for combo in every if combo in HELD_OUT]
    return every


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """`n` random scenes, the same for the same (seed >= 0, split): "train" avoids HELD_OUT colour-shape pairs,
    "held_out" uses only those, "all" any pair. Scene i does not depend on `n`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    combos = _combos(split)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0])
    draws = rng.integers(0, [len(combos), len(POSITIONS), len(SIZES)], size=(n, 3))
    return [
        Scene(colour=combos[k][0], shape=combos[k][1], position=POSITIONS[p], size=SIZES[z]) for k, p, z in draws
    ]


def make_examples(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` training examples: images (n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8, their captions and scenes.

    The same for the same (n, seed, split); example i does not depend on `n`, so a larger n extends a smaller one.
    """
    scenes = sample_scenes(n, seed, split)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 1])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i, scene in enumerate(scenes):
        images[i] = render(scene, rng)
        captions.append(caption(scene, rng))
    return images, captions, scenes


def prompt_rows(n: int, seed: int, split: str = "all") -> list[dict]:
    """A prompt table of `n` rows for sdflow (id, prompt) with each row's scene as carried columns (colour, shape,
    position, size): the same for the same (n, seed, split), drawn apart from training's by `seed`."""
    scenes = sample_scenes(n, seed, split)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 2])
    return [
        {"id": f"{split}-{i:05d}", "prompt": caption(scene, rng), **vars(scene)} for i, scene in enumerate(scenes)
    ]
