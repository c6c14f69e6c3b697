"""Running sdflow as a user does (the CLI, in process or as a subprocess), and checking what it left."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

RESUME_ROWS = [{"id": f"r{i}", "prompt": f"a {['red', 'blue', 'green'][i % 3]} square number {i}", "n": i} for i in range(9)]
RESUME_RUN = {"batch_size": 2, "shard_size": 3, "steps": 2, "scheduler": "euler_a"}


def images_by_image(out: Path) -> dict[tuple[str, int], np.ndarray]:
    """The dataset's images by (id, image_index), which is unique in it; a row twice is an error, never overwritten."""
    table = pq.read_table(out / "data")
    images = {}
    for row_id, index, image in zip(*(table.column(c).to_pylist() for c in ("id", "image_index", "image"))):
        assert (row_id, index) not in images, f"image {index} of row {row_id!r} is in the dataset twice"
        images[row_id, index] = np.asarray(Image.open(io.BytesIO(image["bytes"])))
    return images


def images_by_id(out: Path) -> dict[str, np.ndarray]:
    """The images of a dataset of one image per row, by id."""
    images = images_by_image(out)
    assert all(index == 0 for _, index in images), "rows with several images: use images_by_image"
    return {row_id: pixels for (row_id, _), pixels in images.items()}


def assert_consistent(out: Path) -> dict:
    """The dataset folder holds exactly the committed shards and their index: no stray, temporary or unlisted files."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    listed = sorted(
        ["manifest.json"]
        + ([manifest["contact_sheet"]] if manifest["shards"] else [])
        + [s["file"] for s in manifest["shards"]]
        + [f"_shards/{s['shard']:05d}.json" for s in manifest["shards"]]
        + ([manifest["index"]] if "index" in manifest else [])
    )
    assert files == listed
    assert ("index" in manifest) == bool(list((out / "_shards").glob("*.json")))
    if "index" in manifest:  # the index names exactly the committed rows
        assert_index_exact(out, out / manifest["index"])
    return manifest


def marker_keys(out: Path) -> dict[int, list[int]]:
    """Each committed marker's row keys, read from the markers themselves."""
    return {
        int(p.stem): [int(k, 16) for k in json.loads(p.read_text())["keys"]] for p in (out / "_shards").glob("*.json")
    }


def assert_index_exact(out: Path, index: Path) -> None:
    """An index names only markers that exist, and exactly their keys."""
    with np.load(index, allow_pickle=False) as data:
        shards, keys, rows = data["shards"].tolist(), data["keys"], data["rows"].tolist()
    markers = marker_keys(out)
    assert set(shards) <= set(markers), f"{index.name} names shards {sorted(set(shards) - set(markers))} with no marker"
    assert keys.tolist() == sorted(k for s in shards for k in markers[s])
    assert rows == [len(markers[s]) for s in shards]


def run_killable(prefect_api: str, tiny_model: str, prompts: str, out: Path, crash: str | None = None, *options: str):
    """`sdflow generate` of the resume table as a subprocess, killed with SIGKILL at `crash` (nodes.faults) if given;
    `options` follow the resume run's."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("SDFLOW_CRASH_AT", None)
    if crash:
        env["SDFLOW_CRASH_AT"] = crash
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RESUME_RUN.items() if k != "steps"] + [f"--steps={RESUME_RUN['steps']}"]
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", prompts, str(out), "--model", tiny_model, *args, *options],
        env=env, capture_output=True, text=True, timeout=300,
    )


def run_cli(capsys, *args) -> tuple[int, str]:
    """`sdflow generate ARGS` in this process; returns its exit code and what it wrote to stderr."""
    from flows.cli import main

    code = main(["generate", *map(str, args)])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out: Path, *phrases: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("sdflow: error: ")
    for phrase in phrases:
        assert phrase in " ".join(err.split()), err
    assert not out.exists(), "a failed run must leave no dataset behind"


def processes_with_env(entry: str) -> list[int]:
    """Live processes (Linux /proc) whose environment holds `entry`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def uninterrupted_run(root: Path, rows: list[dict], model: str, run: dict) -> tuple[str, dict[str, np.ndarray]]:
    """A table of `rows` under `root` and the images of one uninterrupted run of it: what interrupted runs must give."""
    from flows.generate import generate_dataset
    from tests.support.tables import write_table

    prompts = write_table(root / "prompts.parquet", rows)
    generate_dataset(prompts=prompts, out=str(root / "out"), model=model, **run)
    return prompts, images_by_id(root / "out")
