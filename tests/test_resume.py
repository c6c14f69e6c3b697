"""Nothing lost, nothing twice: reruns skip committed rows, killed runs resume, racing commits commit once."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.generate import generate_dataset
from nodes.dataset.commit import commit_shard, marker_path, shard_marker
from nodes.errors import StorageError
from tests.support.runs import RESUME_ROWS as ROWS, RESUME_RUN as RUN, assert_consistent, images_by_id, run_killable as run_cli
from tests.support.tables import write_table

def test_rerun_generates_nothing_and_rewrites_nothing(prefect_api, tiny_model, resume_reference, tmp_path):
    prompts, _ = resume_reference
    out = tmp_path / "out"
    generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    before = {p: p.read_bytes() for p in (out / "data").iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    again = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert again["rows"]["generated"] == 0 and again["rows"]["already_done"] == 9
    assert again["timings"]["model_load_seconds"] == 0  # nothing to do: the model is not even loaded
    assert {p: p.read_bytes() for p in (out / "data").iterdir()} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps
    assert_consistent(out)


def test_grown_table_generates_exactly_the_new_rows(prefect_api, tiny_model, resume_reference, tmp_path):
    _, want = resume_reference
    out = tmp_path / "out"
    first = generate_dataset(prompts=write_table(tmp_path / "a.parquet", ROWS[:5]), out=str(out), model=tiny_model, **RUN)
    assert first["rows"]["generated"] == 5
    grown = generate_dataset(prompts=write_table(tmp_path / "b.parquet", ROWS), out=str(out), model=tiny_model, **RUN)
    assert (grown["rows"]["generated"], grown["rows"]["already_done"], grown["rows"]["in_dataset"]) == (4, 5, 9)
    manifest = assert_consistent(out)
    assert [s["shard"] for s in manifest["shards"]] == [0, 1, 2, 3]  # new rows in new shards, old ones untouched
    got = images_by_id(out)
    assert sorted(got) == sorted(want)
    assert all(np.abs(got[k].astype(int) - want[k].astype(int)).max() <= 1 for k in want)


def test_changed_parameters_make_new_rows_and_keep_the_old(prefect_api, tiny_model, resume_reference, tmp_path):
    prompts, _ = resume_reference
    out = tmp_path / "out"
    generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    changed = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **(RUN | {"steps": 3}))
    rows = changed["rows"]
    assert (rows["generated"], rows["already_done"], rows["stale"], rows["in_dataset"]) == (9, 0, 9, 18)
    table = pq.read_table(out / "data")
    assert sorted(table.column("steps").to_pylist()) == [2] * 9 + [3] * 9


def test_racing_commits_of_one_shard_commit_once(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    image = pa.array([{"bytes": b"png-0", "path": None}], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "id": ["a"], "seed": [1]})
    marker = shard_marker(4, table, np.array([7], dtype=np.uint64), [], {})
    barrier = threading.Barrier(2)
    outcomes = []

    def attempt():
        barrier.wait()
        outcomes.append(commit_shard(fs, root, table, dict(marker)))

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["already committed", "committed"]
    assert json.loads(Path(marker_path(root, 4)).read_text())["keys"] == ["0000000000000007"]
    # A later attempt finds the marker first and writes nothing at all.
    data = Path(root, "data", "part-00004.parquet")
    stamp = data.stat().st_mtime_ns
    assert commit_shard(fs, root, table, dict(marker)) == "already committed"
    assert data.stat().st_mtime_ns == stamp
    # An attempt with other rows at a committed index is refused, not merged.
    other = shard_marker(4, table, np.array([8], dtype=np.uint64), [], {})
    with pytest.raises(StorageError, match="already committed with other rows"):
        commit_shard(fs, root, table, other)


@pytest.mark.parametrize(
    "crash",
    [
        "denoise-step:6",  # mid-batch, in the second shard
        "before-marker:2",  # the second shard's data written, its marker not
        "manifest",  # every shard committed, the manifest half-written
    ],
)
def test_sigkill_then_rerun_gives_the_uninterrupted_dataset(prefect_api, tiny_model, resume_reference, tmp_path, crash):
    prompts, want = resume_reference
    out = tmp_path / "out"
    killed = run_cli(prefect_api, tiny_model, prompts, out, crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed_rows = sum(json.loads(p.read_text())["rows"] for p in (out / "_shards").glob("*.json"))
    if crash == "before-marker:2":
        assert (out / "data" / "part-00001.parquet").exists()  # data without its marker: not committed
        assert not (out / "_shards" / "00001.json").exists()

    resumed = run_cli(prefect_api, tiny_model, prompts, out)
    assert resumed.returncode == 0, resumed.stderr
    manifest = assert_consistent(out)
    # Only what was not committed when the process died is generated again.
    assert manifest["rows"]["generated"] == len(ROWS) - committed_rows
    assert manifest["rows"]["already_done"] == committed_rows
    ids = pq.read_table(out / "data").column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS)  # every row exactly once
    got = images_by_id(out)
    for row_id, pixels in want.items():
        assert np.abs(got[row_id].astype(int) - pixels.astype(int)).max() <= 1, row_id
