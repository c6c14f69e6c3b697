"""The shapes domain and its judge: captions parse back, examples are deterministic, the judge reads renders."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nodes.shapes.judge import Judgement, judge_image, score
from nodes.shapes.domain import (
    BACKGROUND,
    COLOURS,
    DOMAIN_WORDS,
    HELD_OUT,
    IMAGE_SIZE,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    Scene,
    caption,
    make_examples,
    parse_caption,
    render,
    sample_scenes,
)

ATTRIBUTES = ("colour", "shape", "position", "size")
N_JUDGED = 1000  # images per agreement check; 99 % of them may leave at most 10 misread
NONE = Judgement(None, None, None, None)


@pytest.fixture(scope="module")
def rendered() -> tuple[list[np.ndarray], list[Scene]]:
    """N_JUDGED jittered renders of scenes from every colour-shape pair, with their scenes."""
    scenes = sample_scenes(N_JUDGED, seed=11, split="all")
    rng = np.random.default_rng(12)
    return [render(scene, rng) for scene in scenes], scenes


def agreement(images, scenes) -> dict[str, float]:
    """Fraction of images where the judge reads each attribute (and all four) as the scene has it."""
    scores = [score(judge_image(image), scene) for image, scene in zip(images, scenes)]
    return {key: float(np.mean([s[key] for s in scores])) for key in ATTRIBUTES + ("all",)}


def degrade(image: np.ndarray, scene: Scene, rng: np.random.Generator, blur=0.0, noise=0.0, cast=0.0, hue=0.0):
    """What a small generator does to an image: shift the object's colour by up to `hue` levels per channel,
    blur by a Gaussian of sigma `blur` pixels, add Gaussian noise of std `noise` levels, and shift the whole
    image's colour by up to `cast` levels per channel."""
    pixels = image.astype(np.float64)
    if hue:
        # render() is linear in the colour, so the object's coverage of each pixel is exact.
        difference = np.subtract(COLOURS[scene.colour], BACKGROUND)
        coverage = (pixels - BACKGROUND) @ difference / (difference @ difference)
        pixels += coverage[..., None] * rng.uniform(-hue, hue, size=3)
    if blur:
        blurred = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
        pixels = np.asarray(blurred.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    if noise:
        pixels += rng.normal(0.0, noise, size=pixels.shape)
    if cast:
        pixels += rng.uniform(-cast, cast, size=3)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# --- the domain ---------------------------------------------------------------------------------------------


def test_palette_is_well_separated():
    colours = np.array(list(COLOURS.values()), dtype=float)
    pairwise = np.linalg.norm(colours[:, None] - colours[None, :], axis=-1)
    assert len(COLOURS) >= 6
    assert pairwise[~np.eye(len(colours), dtype=bool)].min() > 100
    assert np.linalg.norm(colours - BACKGROUND, axis=-1).min() > 150
    assert len(set(BACKGROUND)) == 1  # neutral gray: no hue to confuse with a colour


def test_held_out_pairs_leave_every_colour_and_shape_in_training():
    train = {(s.colour, s.shape) for s in sample_scenes(2000, seed=0, split="train")}
    assert 2 <= len(HELD_OUT) <= 4
    assert train == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)


def test_splits_keep_held_out_pairs_apart():
    held_out = sample_scenes(300, seed=1, split="held_out")
    assert {(s.colour, s.shape) for s in held_out} == HELD_OUT
    everything = sample_scenes(1000, seed=1, split="all")
    assert {(s.colour, s.shape) for s in everything} == {(c, s) for c in COLOURS for s in SHAPES}
    assert {s.position for s in everything} == set(POSITIONS) and {s.size for s in everything} == set(SIZES)
    _, _, scenes = make_examples(300, seed=2, split="train")
    assert not {(s.colour, s.shape) for s in scenes} & HELD_OUT
    with pytest.raises(ValueError, match="split must be one of"):
        sample_scenes(3, seed=0, split="test")


def test_make_examples_is_deterministic_per_seed():
    images, captions, scenes = make_examples(40, seed=5)
    again = make_examples(40, seed=5)
    assert images.shape == (40, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again[0]) and captions == again[1] and scenes == again[2]
    other = make_examples(40, seed=6)
    assert not np.array_equal(images, other[0]) and captions != other[1]
    # Example i does not depend on how many are made, so a longer run extends a shorter one.
    fewer = make_examples(15, seed=5)
    assert np.array_equal(fewer[0], images[:15]) and fewer[1] == captions[:15] and fewer[2] == scenes[:15]
    assert [parse_caption(c) for c in captions] == scenes


def test_render_jitters_but_keeps_the_object_inside():
    scene = Scene("green", "square", "left", "large")
    assert np.array_equal(render(scene), render(scene))
    rng = np.random.default_rng(0)
    assert not np.array_equal(render(scene, rng), render(scene, rng))
    edge = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    edge[1:-1, 1:-1] = False
    for scene in sample_scenes(300, seed=3, split="all"):
        image = render(scene, rng)
        assert (image[edge] == BACKGROUND).all(), scene
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        render(Scene("teal", "circle", "left", "small"))


def test_captions_parse_back_exactly():
    rng = np.random.default_rng(7)
    scenes = sample_scenes(5000, seed=8, split="all")
    captions = [caption(scene, rng) for scene in scenes]
    assert [parse_caption(text) for text in captions] == scenes
    assert len(set(captions)) > 1000
    # Every template with every position phrase, not only the ones the draws happened to pick.
    for template in TEMPLATES:
        for position, phrases in POSITION_PHRASES.items():
            for where in phrases:
                scene = Scene("purple", "triangle", position, "small")
                text = template.format(a="a", size=scene.size, colour=scene.colour, shape=scene.shape, where=where)
                assert parse_caption(text) == scene, text


def test_captions_are_lowercase_domain_words_and_commas():
    rng = np.random.default_rng(9)
    for scene in sample_scenes(2000, seed=10, split="all"):
        text = caption(scene, rng)
        assert re.fullmatch(r"[a-z]+(,? [a-z]+)*", text), text
        assert set(re.findall(r"[a-z]+", text)) <= set(DOMAIN_WORDS), text
    assert len(DOMAIN_WORDS) == len(set(DOMAIN_WORDS))


@pytest.mark.parametrize(
    "text, scene",
    [
        ("a big red circle in the middle", Scene("red", "circle", "centre", "large")),
        ("Tiny BLUE square, center", Scene("blue", "square", "centre", "small")),
        ("yellow triangle at the top, large, please", Scene("yellow", "triangle", "top", "large")),
    ],
)
def test_parse_caption_reads_hand_written_prompts(text, scene):
    assert parse_caption(text) == scene


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle on the left",  # no size
        "a small circle on the left",  # no colour
        "a small red on the left",  # no shape
        "a small red circle",  # no position
        "a small large red circle on the left",
        "a big small red circle on the left",
        "a small red blue circle on the left",
        "a small red circle square on the left",
        "a small red circle on the top left",
        "a small small red circle on the left",
        "a small red circle in the middle of the centre",
    ],
)
def test_parse_caption_refuses_missing_or_doubled_attributes(text):
    assert parse_caption(text) is None


# --- the judge ------------------------------------------------------------------------------------------------


def test_judge_reads_clean_renders(rendered):
    figures = agreement(*rendered)
    assert all(figures[a] >= 0.99 for a in ATTRIBUTES), figures


def test_judge_reads_renders_degraded_as_a_generator_would(rendered):
    """Blur sigma 1 px, noise std 8 levels, object colour off by up to 20 levels a channel, image cast up to 20."""
    rng = np.random.default_rng(13)
    images, scenes = rendered
    degraded = [degrade(i, s, rng, blur=1.0, noise=8.0, cast=20.0, hue=20.0) for i, s in zip(images, scenes)]
    figures = agreement(degraded, scenes)
    assert all(figures[a] >= 0.99 for a in ATTRIBUTES), figures


@pytest.mark.parametrize(
    "degradation",
    [{"blur": 2.0}, {"noise": 24.0}, {"cast": 40.0}, {"blur": 1.5, "noise": 16.0, "cast": 30.0, "hue": 30.0}],
    ids=["blur-2px", "noise-24", "cast-40", "all-stronger"],
)
def test_judge_has_headroom_beyond_mild_degradations(rendered, degradation):
    rng = np.random.default_rng(14)
    images, scenes = (part[:200] for part in rendered)
    figures = agreement([degrade(i, s, rng, **degradation) for i, s in zip(images, scenes)], scenes)
    assert all(figures[a] >= 0.99 for a in ATTRIBUTES), figures


def test_judge_measures_a_canonical_render():
    judgement = judge_image(render(Scene("cyan", "triangle", "bottom", "large")))
    assert (judgement.colour, judgement.shape, judgement.position, judgement.size) == (
        "cyan",
        "triangle",
        "bottom",
        "large",
    )
    assert judgement.background == BACKGROUND and judgement.rgb == COLOURS["cyan"]
    assert judgement.centre == pytest.approx((0.5, 0.75), abs=1 / IMAGE_SIZE)
    assert judgement.side == pytest.approx(0.42, abs=1.5 / IMAGE_SIZE)
    assert judgement.centroid[1] > judgement.centre[1]  # a triangle's mass sits low in its box
    assert judgement.fill_ratio == pytest.approx(0.5, abs=0.05)
    assert judgement.shape_fit > 0.99 and judgement.blur == 0.0


def test_judge_takes_pil_and_larger_images():
    image = render(Scene("purple", "circle", "top", "small"), np.random.default_rng(3))
    judgement = judge_image(image)
    assert judge_image(Image.fromarray(image)) == judgement
    larger = Image.fromarray(image).resize((4 * IMAGE_SIZE, 4 * IMAGE_SIZE), Image.NEAREST)
    assert judge_image(larger) == judgement  # box-filtered back to 64x64 first


def _canvas(draw) -> np.ndarray:
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    draw(image)
    return image


@pytest.mark.parametrize(
    "image",
    [
        _canvas(lambda im: None),
        np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        np.full((IMAGE_SIZE, IMAGE_SIZE, 3), COLOURS["red"], dtype=np.uint8),
        _canvas(lambda im: im.__setitem__((slice(6, 58), slice(6, 58)), COLOURS["blue"])),  # most of the image
        _canvas(lambda im: im.__setitem__((slice(30, 32), slice(30, 32)), COLOURS["blue"])),  # a speck
        _canvas(lambda im: im.__setitem__((slice(20, 40), slice(20, 40)), (195, 205, 200))),  # barely there
        np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
    ],
    ids=["background", "black", "all-red", "all-object", "speck", "faint", "noise"],
)
def test_judge_finds_nothing_in_images_without_one_object(image):
    judgement = judge_image(image)
    assert (judgement.colour, judgement.shape, judgement.position, judgement.size) == (None, None, None, None)
    assert not any(score(judgement, Scene("red", "circle", "left", "small")).values())


def test_judge_names_no_colour_for_gray_and_no_shape_for_other_outlines():
    gray = judge_image(_canvas(lambda im: im.__setitem__((slice(24, 40), slice(24, 40)), (70, 70, 70))))
    assert gray.colour is None and gray.shape == "square"
    # A 2:1 bar and a downward triangle are none of the three shapes.
    bar = judge_image(_canvas(lambda im: im.__setitem__((slice(26, 40), slice(18, 46)), COLOURS["red"])))
    assert bar.colour == "red" and bar.shape is None
    down = _canvas(lambda im: None)
    rows = np.arange(IMAGE_SIZE)[:, None] + 0.5
    cols = np.arange(IMAGE_SIZE)[None, :] + 0.5
    down[(rows >= 20) & (np.abs(cols - 32) <= (46 - rows) / 2)] = COLOURS["green"]
    flipped = judge_image(down)
    assert flipped.colour == "green" and flipped.shape is None


def test_judge_refuses_what_is_not_an_rgb_image():
    with pytest.raises(ValueError, match="uint8 RGB"):
        judge_image(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        judge_image(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))
    with pytest.raises(ValueError, match="too small"):
        judge_image(np.zeros((4, 4, 3), dtype=np.uint8))


def test_score_per_attribute():
    scene = Scene("red", "circle", "left", "small")
    right = Judgement("red", "circle", "left", "small")
    assert score(right, scene) == {"colour": True, "shape": True, "position": True, "size": True, "all": True}
    wrong_size = Judgement("red", "circle", "left", "large")
    assert score(wrong_size, scene) == {"colour": True, "shape": True, "position": True, "size": False, "all": False}
    assert score(NONE, scene) == dict.fromkeys(ATTRIBUTES + ("all",), False)
