"""Many images per prompt: --images-per-prompt and the `images` column, each image an output row of its own with an
image_index, its own seed (the row's plus the index) and its own key, so that resume stays per image."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.generate import generate_dataset
from nodes.dataset.ingest import key_rows, plan_prompt_table, resolve_rows, row_key
from nodes.errors import PromptTableError
from nodes.params import MAX_IMAGES, MAX_SEED, GenerationDefaults, derive_seed, image_seed
from tests.support.reference import max_level_difference
from tests.support.runs import (
    RESUME_RUN,
    assert_clean_failure,
    assert_consistent,
    images_by_image,
    run_cli,
    run_killable,
)
from tests.support.tables import write_table

DEFAULTS = GenerationDefaults(steps=20, guidance_scale=7.5, width=64, height=64, negative_prompt="", seed=42)

# Row "a" takes the run's count (2), "b" asks for 4 and has no seed (derived from the run seed and its id), "c"'s
# seed is the largest sdflow takes, so its second image's seed wraps to 0.
ROWS = [
    {"id": "a", "prompt": "a red square", "seed": 10, "images": None},
    {"id": "b", "prompt": "a blue circle", "seed": None, "images": 4},
    {"id": "c", "prompt": "a green triangle", "seed": MAX_SEED, "images": None},
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("images", pa.int32())])
IMAGES = 2  # --images-per-prompt
SEEDS = {  # what each image's seed must be: the row's plus its index, wrapped into [0, MAX_SEED]
    ("a", 0): 10, ("a", 1): 11,
    **{("b", k): derive_seed(0, "b") + k for k in range(4)},
    ("c", 0): MAX_SEED, ("c", 1): 0,
}
# Shards of 3 images and batches of 2 cut through rows' images: a row's images land in different shards and batches.
OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in RESUME_RUN.items()]


def cli(prompts, out, model, *options) -> None:
    """`sdflow generate` in this process (as tests.support.runs.run_cli, which needs a test's own capsys)."""
    assert main(["generate", prompts, str(out), "--model", model, *OPTIONS, *options]) == 0


def rows_of(out: Path) -> list[dict]:
    """The committed rows' id, image_index and seed: the data files that markers name, in shard order."""
    markers = sorted((out / "_shards").glob("*.json")) if (out / "_shards").exists() else []
    files = [json.loads(m.read_text())["file"] for m in markers]
    return [r for f in files if f for r in pq.read_table(out / f, columns=["id", "image_index", "seed"]).to_pylist()]


@pytest.fixture(scope="module")
def reference(prefect_api, tiny_model, tmp_path_factory):
    """One uninterrupted run of ROWS with --images-per-prompt 2: (its table, OUT, images by (id, image_index))."""
    root = tmp_path_factory.mktemp("images")
    prompts = write_table(root / "prompts.parquet", ROWS, SCHEMA)
    cli(prompts, root / "out", tiny_model, f"--images-per-prompt={IMAGES}")
    return prompts, root / "out", images_by_image(root / "out")


# ------------------------------------------------------------------ seeds, keys and validation, on the nodes


def test_image_seeds_are_the_rows_plus_the_index_wrapped_into_the_seed_range():
    assert [image_seed(10, k) for k in range(3)] == [10, 11, 12]
    assert [image_seed(MAX_SEED - 1, k) for k in range(4)] == [MAX_SEED - 1, MAX_SEED, 0, 1]


def test_rows_give_one_row_per_image_with_its_seed_and_keys_that_differ_by_index():
    chunk = pa.table({"id": ["a", "b", "c"], "prompt": ["p", "q", "r"], "seed": [10, None, MAX_SEED], "images": [None, 4, None]})
    rows, invalid = resolve_rows(chunk, 0, dataclasses.replace(DEFAULTS, images=IMAGES), 8)
    assert not invalid
    assert [(r.id, r.image_index, r.position) for r in rows] == [
        ("a", 0, 0), ("a", 1, 0), ("b", 0, 1), ("b", 1, 1), ("b", 2, 1), ("b", 3, 1), ("c", 0, 2), ("c", 1, 2)
    ]
    assert [r.seed for r in rows] == [10, 11, *(derive_seed(42, "b") + k for k in range(4)), MAX_SEED, 0]
    assert len({row_key(r, "euler", "fp") for r in rows}) == len(rows)
    assert len({r.slot for r in rows}) == len(rows)
    # One image asked for: the row's own seed, as before images existed.
    alone, _ = resolve_rows(chunk.drop_columns(["images"]), 0, DEFAULTS, 8)
    assert [(r.id, r.image_index, r.seed) for r in alone] == [("a", 0, 10), ("b", 0, derive_seed(42, "b")), ("c", 0, MAX_SEED)]


def _tiled(values: list, n: int, dtype=None) -> pa.Array:
    return pa.array([values[i % len(values)] for i in range(n)], dtype)


@pytest.mark.parametrize("images", [1, 3])
@pytest.mark.parametrize(
    "counts",
    [
        _tiled([None, 1, 3, 0, 2, -1, MAX_IMAGES, MAX_IMAGES + 1, 5], 97, pa.int64()),
        _tiled([2.0, None, 2.5, 1.0, float("nan"), 4.0, 3.0], 97),
        pa.nulls(97, pa.int32()),
    ],
    ids=["integers", "floats", "nulls"],
)
def test_planning_keys_are_the_rows_keys_image_for_image(counts, images):
    """key_rows (planning, a chunk at once) gives exactly resolve_rows and row_key's images, keys and invalid rows."""
    n = len(counts)
    chunk = pa.table({
        "id": pa.array([f"r{i}" for i in range(n)]),
        "prompt": _tiled(["a cat", "a dog", " ", "a bird"], n),
        "seed": _tiled([None, 0, MAX_SEED, MAX_SEED - 2, 7, -1], n, pa.int64()),
        "images": counts,
    })
    defaults = dataclasses.replace(DEFAULTS, images=images)
    for start in (0, 65_536):
        rows, invalid = resolve_rows(chunk, start, defaults, 8)
        keep, keys, planned_invalid = key_rows(chunk, start, defaults, 8, ("euler", "fp"))
        assert keep.tolist() == [r.position - start for r in rows]
        assert keys.tolist() == [row_key(r, "euler", "fp") for r in rows]
        assert planned_invalid == invalid
    assert len(rows) > n // 2 and invalid  # valid and invalid rows were compared
    if images > 1 or counts.null_count < n:  # images beyond the first, and seeds wrapped past MAX_SEED, compared too
        assert max(r.image_index for r in rows) >= 2 and any(r.seed < 3 for r in rows if r.image_index)


def test_images_beyond_a_planning_slice_keep_their_keys(monkeypatch):
    """Planning hashes a slice of images at a time; keys cut across slices are the rows' keys."""
    import nodes.dataset.ingest as ingest

    monkeypatch.setattr(ingest, "SCAN_ROWS", 5)
    chunk = pa.table({"prompt": ["a", "b", "c"], "images": [4, 3, 6]})
    rows, _ = resolve_rows(chunk, 0, DEFAULTS, 8)
    keep, keys, _ = key_rows(chunk, 0, DEFAULTS, 8, ("euler", "fp"))
    assert len(keys) == 13 and keys.tolist() == [row_key(r, "euler", "fp") for r in rows]


def test_an_invalid_images_value_names_its_rows(tmp_path):
    table = write_table(tmp_path / "t.parquet", [
        {"id": "zero", "prompt": "p", "images": 0}, {"id": "many", "prompt": "p", "images": MAX_IMAGES + 1},
        {"id": "fine", "prompt": "p", "images": MAX_IMAGES}, {"id": "negative", "prompt": "p", "images": -2},
    ])
    with pytest.raises(PromptTableError) as refused:
        plan_prompt_table(table, DEFAULTS, 8, 4)
    assert f"column 'images' must be a whole number from 1 to {MAX_IMAGES}, but is not in 3 row(s) with id 'zero', 'many', 'negative'" in str(refused.value)
    text = write_table(tmp_path / "text.parquet", [{"prompt": "p", "images": "four"}])
    with pytest.raises(PromptTableError, match=r"column 'images' .* has type string; it must hold an integer"):
        plan_prompt_table(text, DEFAULTS, 8, 4)
    # With --skip-invalid the rows are left out and the rest planned: the valid row's MAX_IMAGES images.
    plan = plan_prompt_table(table, DEFAULTS, 8, 64, skip_invalid=True)
    assert plan.rows_to_generate == MAX_IMAGES and [s.rows for s in plan.shards] == [64, MAX_IMAGES - 64]
    assert sorted(row_id for row_id, _ in plan.invalid.values()) == ["many", "negative", "zero"]


def test_an_image_index_column_in_the_table_is_refused(tmp_path):
    table = write_table(tmp_path / "t.parquet", [{"prompt": "p", "image_index": 3}])
    with pytest.raises(PromptTableError, match=r"column\(s\) image_index, which sdflow writes itself"):
        plan_prompt_table(table, DEFAULTS, 8, 4)


@pytest.mark.parametrize("count", ["0", str(MAX_IMAGES + 1)])
def test_a_bad_images_per_prompt_is_refused_in_one_paragraph(prefect_api, tiny_model, tmp_path, capsys, count):
    table = write_table(tmp_path / "t.parquet", [{"prompt": "p"}])
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", tiny_model, "--images-per-prompt", count)
    assert_clean_failure(code, err, tmp_path / "out", f"--images-per-prompt {count} is out of range", f"from 1 to {MAX_IMAGES}")


def test_a_dataset_of_the_format_before_image_index_is_refused_and_left_alone(prefect_api, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.dumps({"format": "sdflow-dataset/2", "rows": {}})
    (out / "manifest.json").write_text(manifest)
    code, err = run_cli(capsys, write_table(tmp_path / "t.parquet", [{"prompt": "p"}]), out, "--model", tiny_model)
    assert code == 2 and "Traceback" not in err
    said = " ".join(err.split())
    assert "is a dataset of format sdflow-dataset/2" in said and "each row has an image_index" in said
    assert "write to a new location" in said
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == manifest


# ------------------------------------------------------------------ runs of the CLI and the flow


def test_each_row_makes_its_images_with_their_seeds_each_the_image_of_that_seed_alone(reference, tiny_model, tmp_path):
    prompts, out, got = reference
    manifest = assert_consistent(out)
    assert sorted(got) == sorted(SEEDS)  # a's and c's two (the run's option), b's four (its column), once each
    assert {(r["id"], r["image_index"]): r["seed"] for r in rows_of(out)} == SEEDS
    assert {k: manifest["rows"][k] for k in ("table", "images", "generated", "in_dataset")} == {
        "table": 3, "images": 8, "generated": 8, "in_dataset": 8
    }
    assert manifest["resolved"]["images_per_prompt"] == IMAGES
    # Each image as a row of its own, made alone (batches of one), with that image's seed: the same image.
    alone = [{"id": f"{i}/{k}", "prompt": next(r["prompt"] for r in ROWS if r["id"] == i), "seed": seed} for (i, k), seed in SEEDS.items()]
    cli(write_table(tmp_path / "alone.parquet", alone), tmp_path / "alone", tiny_model, "--batch-size=1")
    singles = images_by_image(tmp_path / "alone")
    for (row_id, k), pixels in got.items():
        assert max_level_difference(pixels, singles[f"{row_id}/{k}", 0]) <= 1, (row_id, k)
    assert max_level_difference(got["a", 0], got["a", 1]) > 10  # other seeds, other images


def test_the_dataset_loads_in_datasets_with_image_index(reference):
    from datasets import load_dataset

    _, out, got = reference
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert ds.features["image_index"].dtype == "int32" and ds.features["image"].__class__.__name__ == "Image"
    assert "images" not in ds.features  # it says how many to make, not what one image is
    assert sorted((r["id"], r["image_index"]) for r in ds) == sorted(got)
    for row in ds:
        assert np.array_equal(np.asarray(row["image"]), got[row["id"], row["image_index"]])


def test_sigkill_mid_row_then_rerun_makes_only_the_missing_images(reference, prefect_api, tiny_model, tmp_path):
    prompts, _, want = reference
    out = tmp_path / "out"
    # Shards of 3 images, [a0 a1 b0] [b1 b2 b3] [c0 c1]: killed once the second is made, before its marker, row b
    # is part committed (image 0) and part made but lost (1 to 3).
    killed = run_killable(prefect_api, tiny_model, prompts, out, "before-marker:2", f"--images-per-prompt={IMAGES}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = [(r["id"], r["image_index"]) for r in rows_of(out)]
    assert committed == [("a", 0), ("a", 1), ("b", 0)]

    resumed = run_killable(prefect_api, tiny_model, prompts, out, None, f"--images-per-prompt={IMAGES}")
    assert resumed.returncode == 0, resumed.stderr
    manifest = assert_consistent(out)
    assert (manifest["rows"]["generated"], manifest["rows"]["already_done"]) == (len(SEEDS) - len(committed), len(committed))
    got = images_by_image(out)  # every image exactly once
    assert sorted(got) == sorted(want)
    for image, pixels in want.items():
        assert max_level_difference(got[image], pixels) <= 1, image


def test_raising_a_rows_images_makes_only_the_new_indices(reference, tiny_model, tmp_path):
    _, _, want = reference
    out = tmp_path / "out"
    fewer = write_table(tmp_path / "fewer.parquet", [{**r, "images": 2} if r["id"] == "b" else r for r in ROWS], SCHEMA)
    first = generate_dataset(prompts=fewer, out=str(out), model=tiny_model, images_per_prompt=IMAGES, **RESUME_RUN)
    assert first["rows"]["generated"] == 6
    data = {p: p.read_bytes() for p in (out / "data").iterdir()}

    more = write_table(tmp_path / "more.parquet", ROWS, SCHEMA)
    raised = generate_dataset(prompts=more, out=str(out), model=tiny_model, images_per_prompt=IMAGES, **RESUME_RUN)
    assert {k: raised["rows"][k] for k in ("generated", "already_done", "stale", "in_dataset")} == {
        "generated": 2, "already_done": 6, "stale": 0, "in_dataset": 8
    }
    new = [m["file"] for m in raised["shards"] if m["shard"] in raised["shards_written"]]
    assert [(r["id"], r["image_index"]) for f in new for r in pq.read_table(out / f).to_pylist()] == [("b", 2), ("b", 3)]
    assert all(p.read_bytes() == b for p, b in data.items())  # images 0 and 1 kept as they were
    got = images_by_image(out)
    assert sorted(got) == sorted(want)
    for image, pixels in want.items():
        assert max_level_difference(got[image], pixels) <= 1, image

    # Lowering it again makes nothing: b's images 2 and 3 stay, counted as stale.
    lowered = generate_dataset(prompts=fewer, out=str(out), model=tiny_model, images_per_prompt=IMAGES, **RESUME_RUN)
    assert {k: lowered["rows"][k] for k in ("generated", "already_done", "stale")} == {"generated": 0, "already_done": 6, "stale": 2}
