"""Evaluation: per-row judge and CLIP scores beside the images, the summary, contact sheets and their artifacts."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main
from nodes.shapes.evaluate import ClipScorer, judge_rows, summarize, summary_markdown
from nodes.pipeline.components import DEFAULT_MODEL, builtin_model_path
from nodes.shapes.domain import COLOURS, HELD_OUT, Scene, caption, make_examples, render
from nodes.dataset.sheet import MARK_COLOURS, TILE, contact_sheet
from tests.support.tables import write_table


def pil(images) -> list[Image.Image]:
    return [Image.fromarray(image) for image in images]


def test_judge_rows_on_rendered_scenes():
    images, captions, scenes = make_examples(60, seed=11, split="all")
    frame = judge_rows(pil(images), captions)
    assert frame["all_ok"].all()
    assert list(frame["judged_colour"]) == [s.colour for s in scenes]
    expected = ["held-out" if (s.colour, s.shape) in HELD_OUT else "seen" for s in scenes]
    assert list(frame["combination"]) == expected and "held-out" in expected


def test_judge_rows_names_the_attribute_that_is_wrong():
    scene = Scene("green", "square", "left", "large")
    image = Image.fromarray(render(scene))
    prompts = ["a large red square on the left", "a large green circle on the left", "a small green square at the top"]
    frame = judge_rows([image] * 3, prompts)
    assert list(frame["colour_ok"]) == [False, True, True]
    assert list(frame["shape_ok"]) == [True, False, True]
    assert list(frame["position_ok"]) == [True, True, False] and list(frame["size_ok"]) == [True, True, False]
    assert not frame["all_ok"].any()


def test_prompt_outside_the_domain_is_read_but_not_scored():
    image = Image.fromarray(render(Scene("blue", "triangle", "right", "small")))
    frame = judge_rows([image], ["an astronaut riding a horse"])
    assert frame.loc[0, "judged_colour"] == "blue" and frame.loc[0, "judged_shape"] == "triangle"
    assert pd.isna(frame.loc[0, "colour_ok"]) and pd.isna(frame.loc[0, "all_ok"]) and frame.loc[0, "combination"] is None
    assert summarize(frame) == []
    assert "nothing to score" in summary_markdown([])


def test_summary_per_split():
    frame = pd.DataFrame({
        "colour_ok": [True, True, False, True, None], "shape_ok": [True, False, False, True, None],
        "position_ok": [True] * 4 + [None], "size_ok": [False] * 4 + [None], "all_ok": [False] * 4 + [None],
        "combination": ["seen", "seen", "seen", "held-out", None], "clip_score": [30.0, 20.0, 10.0, 25.0, 99.0],
    })
    for column in ("colour_ok", "shape_ok", "position_ok", "size_ok", "all_ok"):
        frame[column] = frame[column].astype("boolean")
    seen, held_out, every = summarize(frame)
    assert (seen["split"], seen["rows"], seen["colour"], seen["shape"], seen["clip_score"]) == ("seen", 3, 0.6667, 0.3333, 20.0)
    assert (held_out["rows"], held_out["colour"], held_out["size"]) == (1, 1.0, 0.0)
    assert (every["rows"], every["colour"], every["position"], every["clip_score"]) == (4, 0.75, 1.0, 21.25)
    assert "| seen | 3 | 66.7 % | 33.3 % |" in summary_markdown([seen])


def test_contact_sheet_grid_frames_and_captions():
    images = [np.full((64, 64, 3), 200, np.uint8) for _ in range(10)]
    marks = [True, False, None] + [True] * 7
    sheet = contact_sheet(pil(images), [f"prompt number {i}" for i in range(10)], marks, columns=4)
    cell_w, cell_h = sheet.width // 4, sheet.height // 3
    assert sheet.width % 4 == 0 and sheet.height % 3 == 0 and cell_w > TILE
    pixels = np.asarray(sheet)
    pad = (cell_w - TILE) // 2
    # Frames sit just outside each tile: green, red, none.
    assert tuple(pixels[pad + TILE // 2, pad - 2]) == MARK_COLOURS[True]
    assert tuple(pixels[pad + TILE // 2, cell_w + pad - 2]) == MARK_COLOURS[False]
    assert tuple(pixels[pad + TILE // 2, 2 * cell_w + pad - 2]) == (255, 255, 255)
    # The tile is the image scaled up, and its caption is drawn beneath it.
    assert (pixels[pad:pad + TILE, pad:pad + TILE] == 200).all()
    assert (pixels[pad + TILE + 2:cell_h, pad:pad + TILE] < 128).any()
    # An eleventh cell would start a fourth row; the last row's cells past the tenth image stay blank.
    assert (pixels[2 * cell_h:, 2 * cell_w:] == 255).all()


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer(builtin_model_path(DEFAULT_MODEL))


def test_clip_score_prefers_the_true_caption(scorer):
    images, captions, scenes = make_examples(48, seed=3, split="all")
    rng = np.random.default_rng(0)
    others = list(COLOURS)
    wrong = [caption(Scene(others[(others.index(s.colour) + 2) % len(others)], s.shape, s.position, s.size), rng) for s in scenes]
    true_scores, wrong_scores = scorer(pil(images), captions), scorer(pil(images), wrong)
    assert true_scores.shape == (48,) and ((true_scores >= 0) & (true_scores <= 100)).all()
    assert (true_scores > wrong_scores).mean() >= 0.9
    assert np.array_equal(true_scores, scorer(pil(images), captions))  # deterministic


def test_generate_then_evaluate_with_the_embedded_model(prefect_api, tmp_path, capsys):
    """The README's main command, then `sdflow evaluate`: images that show their prompts, scored beside them."""
    out = tmp_path / "out"
    assert main(["generate", "example", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["model"] == DEFAULT_MODEL and manifest["contact_sheet"] == "contact_sheet.png"
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 8 * TILE and sheet.height > 3 * TILE  # 24 images: 8 columns, 3 rows

    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    said = capsys.readouterr().err
    assert "scored 24 images" in said and "| all | 24 |" in said
    from datasets import load_dataset

    scored = load_dataset("parquet", data_files=str(out / "evaluation" / "data" / "*.parquet"), split="train")
    assert scored[0]["image"].size == (64, 64)
    assert {"id", "image_index", "prompt", "judged_colour", "colour_ok", "all_ok", "combination", "clip_score"} <= set(scored.column_names)
    data = pq.read_table(out / "data").to_pandas()
    assert sorted(scored["id"]) == sorted(data["id"])
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    every = {row["split"]: row for row in summary["summary"]}["all"]
    # The example table at the model's defaults: every colour and nearly every shape and position right.
    assert every["rows"] == 24 and every["colour"] >= 0.95 and every["shape"] >= 0.9 and every["position"] >= 0.9
    assert Image.open(out / "evaluation" / "contact_sheet.png").size == sheet.size

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["sdflow-contact-sheet", "sdflow-evaluation", "sdflow-evaluation-sheet", "sdflow-shard-table"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    found = {a.key: a for a in artifacts}
    assert set(found) == set(keys)
    assert "data:image/png;base64," in found["sdflow-contact-sheet"].data
    assert "| all | 24 |" in found["sdflow-evaluation-sheet"].data
    assert {row["split"] for row in json.loads(found["sdflow-evaluation"].data)} >= {"seen", "held-out", "all"}
    assert found["sdflow-contact-sheet"].description != found["sdflow-evaluation-sheet"].description
    # A run on one machine fills the shard table as pool workers do: who, how long, how fast, after how many loads.
    [shard] = json.loads(found["sdflow-shard-table"].data)
    assert shard["worker"] and shard["seconds"] > 0 and shard["images_per_second"] > 0 and shard["model_loads"] >= 1
    embedded = found["sdflow-evaluation-sheet"].data.split("base64,")[1].split(")")[0]
    assert Image.open(io.BytesIO(base64.b64decode(embedded))).size == sheet.size


def test_evaluate_refuses_what_it_cannot_score(prefect_api, tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped to the terminal
    assert "holds no generated images" in err and "Traceback" not in err

    out = tmp_path / "out"
    prompts = write_table(tmp_path / "p.parquet", [{"id": 1, "prompt": "a small red circle on the left"}])
    assert main(["generate", prompts, str(out), "--model", tiny_model]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--model", tiny_model]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no clip/ folder" in err and "Traceback" not in err
    assert not (out / "evaluation").exists()
