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
    data = Path(root, json.loads(Path(marker_path(root, 4)).read_text())["file"])
    assert sorted(p.name for p in data.parent.iterdir()) == [data.name]  # the loser deleted its own data file
    stamp = data.stat().st_mtime_ns
    assert commit_shard(fs, root, table, dict(marker)) == "already committed"
    assert data.stat().st_mtime_ns == stamp
    # An attempt with other rows at a committed index (another run's table) moves to a free index, not over it.
    other = shard_marker(4, table, np.array([8], dtype=np.uint64), [], {})
    assert commit_shard(fs, root, table, other) == "committed" and other["shard"] == 5
    assert json.loads(Path(marker_path(root, 4)).read_text())["keys"] == ["0000000000000007"]
    # The same rows with other images are refused, not committed twice.
    changed = pa.table({"image": pa.array([{"bytes": b"png-1", "path": None}], type=image.type), "id": ["a"], "seed": [1]})
    with pytest.raises(StorageError, match="other images"):
        commit_shard(fs, root, changed, shard_marker(4, changed, np.array([7], dtype=np.uint64), [], {}))


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
        assert list((out / "data").glob("part-00001-*.parquet"))  # data without its marker: not committed
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


def test_racing_commits_with_different_rows_never_split_marker_and_data(tmp_path):
    """Two attempts commit other rows under one index: each marker names a file holding exactly its rows."""
    import fsspec

    fs = fsspec.filesystem("file")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def attempt_of(who: str, offset: int):
        image = pa.array([{"bytes": f"png-{who}-{i}".encode(), "path": None} for i in range(3)], type=image_type)
        table = pa.table({"image": image, "id": [f"{who}{i}" for i in range(3)], "seed": [1, 2, 3]})
        return table, shard_marker(3, table, np.arange(offset, offset + 3, dtype=np.uint64), [], {})

    for trial in range(40):
        root = str(tmp_path / f"out{trial}")
        attempts = [attempt_of("a", 10), attempt_of("b", 20)]
        barrier = threading.Barrier(2)
        outcomes = []

        def attempt(table, marker):
            barrier.wait()
            try:
                outcomes.append(commit_shard(fs, root, table, marker))
            except StorageError as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=attempt, args=a) for a in attempts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == ["committed", "committed"], outcomes  # the later one moved to a free index
        markers = [json.loads(p.read_text()) for p in Path(root, "_shards").iterdir()]
        assert sorted(m["shard"] for m in markers) == [3, 4]
        for marker in markers:
            held = pq.read_table(Path(root, marker["file"]))
            assert held.column("id").to_pylist() == marker["ids"], f"trial {trial}: marker and data disagree"
        named = {m["file"] for m in markers}
        assert {f"data/{p.name}" for p in Path(root, "data").iterdir()} == named  # losers left no data file


def test_two_runs_with_different_tables_into_one_output_at_once(prefect_api, tiny_model, tmp_path):
    """Both end well, or one is refused with a clear message; the dataset stays consistent, and a rerun completes it."""
    import subprocess
    import sys
    import os

    tables = [write_table(tmp_path / f"{who}.parquet", [{**r, "id": f"{who}{r['id']}"} for r in ROWS[:4]]) for who in "ab"]
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("SDFLOW_CRASH_AT", None)

    def start(prompts):
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "generate", prompts, str(out), "--model", tiny_model,
             "--batch-size=1", "--shard-size=1", "--steps=1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    runs = [start(t) for t in tables]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code in (0, 2), err
        if code == 2:
            assert "Another run" in " ".join(err.split()) and "Traceback" not in err, err
    for prompts, (code, _) in zip(tables, results):
        if code:  # the refused run, again on its own: it adds only its missing rows
            rerun = start(prompts)
            assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
            assert_consistent(out)
    # Every marker names a data file holding exactly its rows, and every row of both tables is there once.
    ids = []
    for marker_file in (out / "_shards").iterdir():
        marker = json.loads(marker_file.read_text())
        assert pq.read_table(out / marker["file"]).column("id").to_pylist() == marker["ids"], marker_file
        ids += marker["ids"]
    assert sorted(ids) == sorted(f"{who}{r['id']}" for who in "ab" for r in ROWS[:4])


def test_a_commit_whose_marker_response_was_lost_keeps_its_data(tmp_path):
    """The marker's create-only PUT succeeds but its response is lost; the client's retry is refused as existing
    (412 -> FileExistsError). The commit did happen: the data file its marker names must survive."""
    from fsspec.implementations.memory import MemoryFileSystem

    from nodes.dataset.commit import read_marker

    class LostResponse(MemoryFileSystem):
        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            super().pipe_file(path, value, mode=mode, **kwargs)
            if mode == "create" and path.endswith(".json"):
                raise FileExistsError(path)

    fs = LostResponse(skip_instance_cache=True)
    fs.store.clear()
    table = pa.table({
        "image": pa.array([{"bytes": b"png", "path": None}], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "id": [1], "seed": [0],
    })
    marker = shard_marker(0, table, np.array([5], np.uint64), [], {})
    assert commit_shard(fs, "/lost", table, marker) == "already committed"
    committed = read_marker(fs, "/lost", 0)
    assert fs.exists(f"/lost/{committed['file']}"), "the marker names a data file that was deleted"
    fs.store.clear()
