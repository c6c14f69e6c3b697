"""Image formats (--image-format, --quality): what each stores, that every reader decodes it, that its infotext reads
back exactly, and that a format is part of each row's identity."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import ExifTags, Image

from flows.cli import main
from nodes.dataset.ingest import row_key
from nodes.dataset.store import encode_image, encode_images, image_parameters
from nodes.errors import SdflowError
from nodes.params import ImageFormat, Row, image_format
from tests.support.images import photo_like
from tests.support.runs import assert_clean_failure, run_cli
from tests.support.tables import write_table

# Prompts that the infotext writer quotes as JSON (a line break, outer spaces, a leading quote) or keeps raw,
# with non-ASCII text (and a character outside the BMP, two UTF-16 units) in both.
ROWS = [
    {"id": "plain", "prompt": "a red circle, ü 日本", "negative_prompt": "blurry", "width": None},
    {"id": "lines", "prompt": 'line one\nline two, "quoted": 😀', "negative_prompt": "  spaced\r\nout  ", "width": 96},
    {"id": "quote", "prompt": '"starts with a quote', "negative_prompt": None},
]
RUN = ("--steps", "2", "--batch-size", "2", "--shard-size", "2", "--scheduler", "euler_a")
FORMATS = {"png": (), "webp": ("--image-format", "webp"), "webp90": ("--image-format", "webp", "--quality", "90"),
           "jpeg": ("--image-format", "jpeg")}
# Lossy encodings against the exact pixels, as PSNR in dB, with some room for other libjpeg/libwebp versions:
# - this test's tiny-model images are pixel-level noise, the worst case for 4:2:0 chroma: measured 19.1 to 19.3 dB
#   (mean error 21 levels) for both JPEG 95 and WebP 90;
# - a 512x512 photo-like image (tests/support/images.py): measured JPEG 95 38.3 dB, WebP 90 37.8 dB.
LOSSY_RUN_PSNR = {"jpeg": 17.0, "webp90": 17.0}
LOSSY_PHOTO_PSNR = {("jpeg", None): 36.0, ("webp", 90): 36.0}


@pytest.fixture(scope="module")
def runs(prefect_api, tiny_model, tmp_path_factory):
    """One CLI run per format over the same table; {format: OUT}."""
    root = tmp_path_factory.mktemp("formats")
    prompts = write_table(root / "prompts.parquet", ROWS)
    outs = {}
    for name, options in FORMATS.items():  # the CLI in process, as run_cli (which needs a test's own capsys)
        outs[name] = root / name
        assert main(["generate", prompts, str(outs[name]), "--model", tiny_model, *RUN, *options]) == 0, name
    return prompts, outs


def stored(out) -> dict[str, bytes]:
    table = pq.read_table(out / "data")
    return {i: image["bytes"] for i, image in zip(table.column("id").to_pylist(), table.column("image").to_pylist())}


def exif_comment(data: bytes) -> str:
    """The infotext as AUTOMATIC1111 reads it: piexif's Exif IFD UserComment, "UNICODE\\0" then UTF-16 big-endian."""
    exif = Image.open(io.BytesIO(data)).getexif()
    assert ExifTags.Base.Orientation not in exif  # `datasets` would transpose the image
    comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment[:8] == b"UNICODE\x00"
    return comment[8:].decode("utf-16-be")


@pytest.mark.parametrize("name", FORMATS)
def test_datasets_pandas_and_pil_decode_every_format(runs, name):
    from datasets import load_dataset

    _, outs = runs
    ds = load_dataset("parquet", data_files=str(outs[name] / "data" / "*.parquet"), split="train")
    assert [r["id"] for r in ds] == [r["id"] for r in ROWS]
    want = {"png": "PNG", "webp": "WEBP", "webp90": "WEBP", "jpeg": "JPEG"}[name]
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].format == want and row["image"].mode == "RGB"
        assert row["image"].size == (96 if row["id"] == "lines" else 64, 64)
    frame = pd.read_parquet(outs[name] / "data")
    for data in frame["image"].map(lambda image: image["bytes"]):
        image = Image.open(io.BytesIO(data))
        assert image.format == want and image.mode == "RGB"
        image.load()


@pytest.mark.parametrize("name", ["webp", "webp90", "jpeg"])
def test_infotext_reads_back_exactly_from_exif(runs, name):
    """The same text as the PNG's `parameters` chunk, character for character, JSON-quoted prompts included."""
    _, outs = runs
    pngs = stored(outs["png"])
    for row_id, data in stored(outs[name]).items():
        text = Image.open(io.BytesIO(pngs[row_id])).text["parameters"]
        assert exif_comment(data) == text == image_parameters(data)
        assert image_parameters(pngs[row_id]) == text
    lines = exif_comment(stored(outs[name])["lines"]).split("\n")
    assert json.loads(lines[0]) == ROWS[1]["prompt"]
    assert json.loads(lines[1].removeprefix("Negative prompt: ")) == ROWS[1]["negative_prompt"]
    assert exif_comment(stored(outs[name])["plain"]).split("\n")[0] == ROWS[0]["prompt"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))


def test_lossless_webp_pixels_equal_png_and_lossy_stay_close(runs):
    _, outs = runs
    pixels = {name: {i: np.asarray(Image.open(io.BytesIO(d))) for i, d in stored(out).items()} for name, out in outs.items()}
    for row_id, png in pixels["png"].items():
        assert np.array_equal(pixels["webp"][row_id], png)
        for name, bound in LOSSY_RUN_PSNR.items():
            assert psnr(pixels[name][row_id], png) >= bound, (name, row_id)


@pytest.mark.parametrize("lossy", LOSSY_PHOTO_PSNR)
def test_lossy_formats_on_a_photo_like_image(lossy):
    pixels = photo_like(512)
    data = encode_image(pixels, "a photo", image_format(*lossy))
    assert psnr(np.asarray(Image.open(io.BytesIO(data))), pixels) >= LOSSY_PHOTO_PSNR[lossy]
    lossless = encode_image(pixels, "a photo", image_format("webp", None))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(lossless))), pixels)


def test_manifest_resolves_the_format(runs):
    _, outs = runs
    resolved = {name: json.loads((out / "manifest.json").read_text())["resolved"] for name, out in outs.items()}
    got = {name: (r["image_format"], r["image_quality"], r["image_lossless"]) for name, r in resolved.items()}
    assert got == {"png": ("png", None, True), "webp": ("webp", None, True), "webp90": ("webp", 90, False), "jpeg": ("jpeg", 95, False)}


def test_another_format_makes_the_rows_again(runs, tiny_model, tmp_path, capsys):
    """Rows done in one format are not done in another: a rerun into the same OUT generates them again."""
    prompts, outs = runs
    out = tmp_path / "out"
    shutil.copytree(outs["png"], out)
    generated = lambda *options: json.loads((out / "manifest.json").read_text())["rows"] if run_cli(  # noqa: E731
        capsys, prompts, out, "--model", tiny_model, *RUN, *options)[0] == 0 else None
    assert generated("--image-format", "webp")["generated"] == 3
    assert generated("--image-format", "webp")["generated"] == 0
    assert generated("--image-format", "jpeg", "--quality", "80")["generated"] == 3
    assert generated("--image-format", "jpeg", "--quality", "95")["generated"] == 3
    rows = generated("--image-format", "jpeg")  # 95 is jpeg's default: the same rows
    assert rows["generated"] == 0 and rows["in_dataset"] == 12 and rows["stale"] == 9
    assert generated()["generated"] == 0  # and PNG's rows are still done
    formats = [Image.open(io.BytesIO(d["bytes"])).format for d in pq.read_table(out / "data").column("image").to_pylist()]
    assert sorted(set(formats)) == ["JPEG", "PNG", "WEBP"]


@pytest.mark.parametrize(
    "options, phrase",
    [
        (("--image-format", "gif"), "--image-format 'gif' is not one of: png, webp, jpeg."),
        (("--image-format", "jpg"), "is not one of: png, webp, jpeg"),
        (("--quality", "90"), "--quality 90 does not apply to png"),
        (("--image-format", "jpeg", "--quality", "0"), "--quality 0 is not a whole number from 1 to 100"),
        (("--image-format", "webp", "--quality", "101"), "leave it out for lossless WebP"),
    ],
)
def test_bad_format_or_quality_is_refused_in_one_paragraph(tiny_model, tmp_path, capsys, options, phrase):
    prompts = write_table(tmp_path / "t.parquet", ROWS)
    code, err = run_cli(capsys, prompts, tmp_path / "out", "--model", tiny_model, *options)
    assert_clean_failure(code, err, tmp_path / "out", phrase)
    assert err.count("\n") == err.count("\n  ") + 1  # one paragraph


def test_the_flow_refuses_them_too(prefect_api, tiny_model, tmp_path):
    from flows.generate import generate_dataset

    prompts = write_table(tmp_path / "t.parquet", ROWS)
    with pytest.raises(SdflowError, match="does not apply to png"):
        generate_dataset(prompts=prompts, out=str(tmp_path / "out"), model=tiny_model, image_quality=50)
    assert not (tmp_path / "out").exists()


def test_png_keys_are_unchanged_and_each_format_has_its_own():
    row = Row(0, "a", "p", "", 1, 20, 7.5, 64, 64)
    assert row_key(row, "euler", "m", ImageFormat().key) == row_key(row, "euler", "m")
    keys = {row_key(row, "euler", "m", image_format(*f).key) for f in [("png", None), ("webp", None), ("webp", 90), ("jpeg", None), ("jpeg", 90)]}
    assert len(keys) == 5
    assert image_format("jpeg", None) == image_format("jpeg", 95)


def test_an_infotext_too_long_for_jpeg_names_its_row():
    row = Row(0, "long-one", " ".join(["word"] * 7000), "", 1, 2, 7.5, 64, 64)
    pixels = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(SdflowError, match="row 'long-one': its infotext .* does not fit in a JPEG's EXIF"):
        encode_images(pixels, [row], "euler", "m", "1", ImageFormat("jpeg", 95))
    webp = encode_images(pixels, [row], "euler", "m", "1", ImageFormat("webp"))[row.slot]
    assert image_parameters(webp).startswith("word word")  # WebP's EXIF chunk has no such limit
