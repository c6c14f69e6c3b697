"""The generation flow end to end under a real Prefect API: the dataset, its PNGs and its manifest."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.generate import generate_dataset
from nodes.errors import StorageError
from tests.support.tables import write_table
from tests.support.reference import diffusers_image, max_level_difference
from nodes.params import Row

CARRIED = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("width", pa.int64()),
        ("source", pa.string()),
        ("score", pa.float32()),
        ("tags", pa.list_(pa.string())),
        ("meta", pa.struct([("k", pa.int32()), ("v", pa.string())])),
        ("when", pa.timestamp("us", tz="UTC")),
    ]
)


def table_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"row-{i}",
            "prompt": f"a {'small' if i % 2 else 'large'} {['red', 'blue', 'green'][i % 3]} circle",
            "negative_prompt": "blurry" if i % 4 == 0 else None,
            "seed": 1000 + i if i % 3 else None,
            "guidance_scale": [7.5, 1.0, 3.0, None][i % 4],
            "width": 96 if i == 4 else None,
            "source": f"src{i}",
            "score": i / 4,
            "tags": ["t"] * (i % 3),
            "meta": {"k": i, "v": f"v{i}"},
            "when": dt.datetime(2026, 1, 1 + i, tzinfo=dt.timezone.utc),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def dataset(prefect_api, tiny_model, tmp_path_factory):
    """One run over 7 rows: shards of 3 rows, batches of 2, mixed sizes and guidance, euler_a."""
    root = tmp_path_factory.mktemp("run")
    prompts = write_table(root / "prompts.parquet", table_rows(7), schema=CARRIED)
    out = root / "out"
    manifest = generate_dataset(
        prompts=prompts, out=str(out), model=tiny_model, scheduler="euler_a", batch_size=2, shard_size=3, seed=9
    )
    return out, manifest, prompts


def test_datasets_loads_decoded_images_and_every_column(dataset):
    from datasets import load_dataset

    out, _, prompts = dataset
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert len(ds) == 7
    assert isinstance(ds[0]["image"], Image.Image)
    assert ds[0]["image"].size == (64, 64) and ds[4]["image"].size == (96, 64)
    expected = pq.read_table(prompts).to_pylist()
    for got, want in zip(ds, expected):
        for column in ("id", "prompt", "source", "tags", "meta"):
            assert got[column] == want[column]
        assert got["score"] == pytest.approx(want["score"])
        assert got["when"].replace(tzinfo=dt.timezone.utc) == want["when"]
        assert got["scheduler"] == "euler_a"
    assert [r["guidance_scale"] for r in ds] == [7.5, 1.0, 3.0, 7.5, 7.5, 1.0, 3.0]
    assert [r["negative_prompt"] for r in ds][:2] == ["blurry", ""]


def test_pandas_reads_the_dataset_folder(dataset):
    import pandas as pd

    out, manifest, _ = dataset
    frame = pd.read_parquet(out / "data")
    assert sorted(frame["id"]) == sorted(f"row-{i}" for i in range(7))
    assert frame["seed"].notna().all()


def test_pngs_carry_their_parameters(dataset):
    out, _, _ = dataset
    rows = pq.read_table(out / "data").to_pylist()
    for row in rows:
        png = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert png.format == "PNG" and png.mode == "RGB"
        text = png.text["parameters"]
        lines = text.split("\n")
        assert lines[0] == row["prompt"]
        if row["negative_prompt"]:
            assert lines[1] == f"Negative prompt: {row['negative_prompt']}"
        assert f"Steps: {row['steps']}, Sampler: Euler a," in lines[-1]
        assert f"CFG scale: {row['guidance_scale']:g}, Seed: {row['seed']}, Size: {row['width']}x{row['height']}" in lines[-1]


def test_seeds_used_are_recorded_and_images_match_diffusers(dataset, tiny_model):
    from diffusers import StableDiffusionPipeline

    out, _, _ = dataset
    rows = pq.read_table(out / "data").to_pylist()
    assert rows[1]["seed"] == 1001  # the table's own
    assert rows[0]["seed"] != rows[3]["seed"]  # derived from the run seed and id
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for row in (rows[0], rows[4], rows[5]):  # guided, another size, unguided
        want = diffusers_image(
            pipe,
            Row(0, row["id"], row["prompt"], row["negative_prompt"], row["seed"], row["steps"], row["guidance_scale"], row["width"], row["height"]),
            "euler_a",
        )
        got = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert max_level_difference(got, want) <= 1


def test_manifest_records_run_shards_and_versions(dataset):
    out, manifest, _ = dataset
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    assert on_disk["rows"] == {
        "table": 7, "images": 7, "in_dataset": 7, "generated": 7, "by_other_runs": 0, "already_done": 0, "invalid": 0,
        "failed": 0, "stale": 0,
    }
    # Each attempt writes its own data file (part-NNNNN-ATTEMPT.parquet); the marker names the committed one.
    attempt = re.compile(r"-[0-9a-f]{32}(?=\.parquet$)")
    files = [s["file"] for s in on_disk["shards"]]
    assert [attempt.sub("", f) for f in files] == ["data/part-00000.parquet", "data/part-00001.parquet", "data/part-00002.parquet"]
    assert sorted(f"data/{p.name}" for p in (out / "data").iterdir()) == sorted(files)
    assert on_disk["resolved"]["device"] == "cpu" and on_disk["resolved"]["dtype"] == "float32"
    assert on_disk["parameters"]["scheduler"] == "euler_a"
    assert {"torch", "diffusers", "transformers", "prefect"} <= set(on_disk["versions"])
    assert on_disk["timings"]["images_per_second"] > 0


def test_an_output_with_files_of_other_origins_is_refused(prefect_api, tiny_model, tmp_path):
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "notes.csv").write_text("mine")
    prompts = write_table(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    with pytest.raises(StorageError, match=r"did not write \(data/notes.csv\)"):
        generate_dataset(prompts=prompts, out=str(tmp_path / "out"), model=tiny_model)
    assert (tmp_path / "out" / "data" / "notes.csv").read_text() == "mine"


def test_skip_invalid_lists_rows_in_manifest(prefect_api, tiny_model, tmp_path):
    rows = [{"id": 1, "prompt": "a cat", "steps": None}, {"id": 2, "prompt": None, "steps": None}, {"id": 3, "prompt": "a dog", "steps": 0}]
    prompts = write_table(tmp_path / "p.parquet", rows)
    manifest = generate_dataset(prompts=prompts, out=str(tmp_path / "out"), model=tiny_model, skip_invalid=True)
    assert (manifest["rows"]["generated"], manifest["rows"]["invalid"]) == (1, 2)
    assert [(r["id"], r["problem"].split()[0]) for r in manifest["invalid_rows"]] == [(2, "prompt"), (3, "steps")]
    assert pq.read_table(tmp_path / "out" / "data").column("id").to_pylist() == [1]
