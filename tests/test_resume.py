"""Nothing lost, nothing twice: reruns skip committed rows, killed runs resume, racing commits commit once."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.generate import generate_dataset
from nodes.dataset.commit import clean_uncommitted, commit_shard, marker_path, read_committed, shard_marker, write_index
from nodes.errors import StorageError
from tests.support.runs import (
    RESUME_ROWS as ROWS,
    RESUME_RUN as RUN,
    assert_consistent,
    assert_index_exact,
    images_by_id,
    marker_keys,
    run_killable as run_cli,
)
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


def test_images_another_run_committed_first_are_not_counted_as_this_runs(prefect_api, tiny_model, tmp_path, monkeypatch):
    """Two runs of one table into one output at once both plan every row and make every image; the first commit of
    each shard wins. The other run must not claim those images in its summary, manifest or shard table. (The
    race, made certain: the second run plans as if the first had not committed yet.)"""
    import fsspec

    import flows.generate
    from flows.generate import summary

    prompts, out = write_table(tmp_path / "t.parquet", ROWS[:4]), tmp_path / "out"
    first = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert first["rows"]["generated"] == 4 and first["rows"]["by_other_runs"] == 0

    (tmp_path / "empty").mkdir()
    nothing_yet = read_committed(fsspec.filesystem("file"), str(tmp_path / "empty"))
    calls = []

    def planned_before_the_first_run_committed(fs, root):
        calls.append(root)
        return nothing_yet if len(calls) == 1 else read_committed(fs, root)

    monkeypatch.setattr(flows.generate, "read_committed", planned_before_the_first_run_committed)
    second = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert len(calls) > 1, "the run read the output only once: the test would prove nothing"
    assert second["rows"]["generated"] == 0 and second["shards_written"] == [], second["rows"]
    assert second["rows"]["by_other_runs"] == 4 and second["rows"]["in_dataset"] == 4
    text = " ".join(summary(second, str(out)).split())
    assert text.startswith("wrote 0 images in 0 shard(s)") and "4 image(s) this run made were committed first by another run" in text
    stored = json.loads((out / "manifest.json").read_text())
    assert stored["rows"]["by_other_runs"] == 4
    assert_consistent(out)


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


# ------------------------------------------------------------------ the committed-rows index


def commit_rows(fs, root: str, index: int, keys: list[int], failed: list[dict] | None = None) -> dict:
    """Commit a shard of fake rows (no model) with these keys; returns its marker."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = pa.array([{"bytes": f"png-{k}".encode(), "path": None} for k in keys], type=image_type)
    table = pa.table({"image": image, "id": [f"id{k}" for k in keys], "seed": list(range(len(keys)))})
    marker = shard_marker(index, table, np.array(keys, dtype=np.uint64), failed or [], {})
    assert commit_shard(fs, root, table, marker) == "committed"
    return marker


def truth(out: Path) -> list[int]:
    """Every committed key, from the markers themselves."""
    return sorted(k for keys in marker_keys(out).values() for k in keys)


def test_index_then_later_markers_give_exactly_the_committed_keys(tmp_path):
    import fsspec

    fs, out = fsspec.filesystem("file"), tmp_path / "out"
    root = str(out)
    commit_rows(fs, root, 0, [5, 1, 9])
    commit_rows(fs, root, 1, [2**64 - 1, 3], failed=[{"key": f"{7:016x}", "id": "x", "position": 4, "error": "NaN"}])
    first = read_committed(fs, root)
    assert (first.index, first.markers_read, first.keys.tolist()) == (None, 2, truth(out))
    assert write_index(fs, root, first) == "_index/00000.npz"
    assert_index_exact(out, out / "_index/00000.npz")

    again = read_committed(fs, root)  # from the index alone
    assert (again.index, again.markers_read, again.keys.tolist()) == ("_index/00000.npz", 0, truth(out))
    assert again.shards == first.shards and again.failed == first.failed and again.rows == 5
    assert write_index(fs, root, again) == "_index/00000.npz"  # nothing new: no new index

    commit_rows(fs, root, 3, [7, 4])  # a later run: the failed row 7 is done now; shard 2 is never committed
    later = read_committed(fs, root)
    assert (later.index, later.markers_read, later.keys.tolist()) == ("_index/00000.npz", 1, truth(out))
    assert [s["shard"] for s in later.shards] == [0, 1, 3] and later.next_index == 4
    assert later.holds(np.array([7, 8], dtype=np.uint64)).tolist() == [True, False]
    assert write_index(fs, root, later) == "_index/00001.npz"
    assert_index_exact(out, out / "_index/00001.npz")
    assert clean_uncommitted(fs, root, later.files, time.time() + 1, "_index/00001.npz") == [f"{root}/_index/00000.npz"]
    assert read_committed(fs, root).keys.tolist() == truth(out)


@pytest.mark.parametrize(
    "change",
    [
        lambda out: (out / "_shards/00001.json").rename(out / "moved.json"),  # a marker moved out, as errors advise
        lambda out: (out / "_shards/00001.json").write_text(json.dumps({**json.loads((out / "_shards/00001.json").read_text()),
                                                                         "keys": ["0000000000000063", "0000000000000064"]})),  # edited by hand
        lambda out: (out / "_index/00000.npz").write_bytes(b"not an index"),  # damaged
        lambda out: (out / "_index/00000.npz").write_bytes(  # rows that no marker holds
            (out / "_index/00000.npz").read_bytes().replace(np.uint64(5).tobytes(), np.uint64(6).tobytes())),
    ],
    ids=["marker-moved", "marker-edited", "index-damaged", "index-bytes-changed"],
)
def test_an_index_that_does_not_match_the_markers_is_not_trusted(tmp_path, change):
    """The index never claims a key whose marker is absent: where it disagrees with the markers, they are read."""
    import fsspec

    fs, out = fsspec.filesystem("file"), tmp_path / "out"
    root = str(out)
    commit_rows(fs, root, 0, [5, 1, 9])
    commit_rows(fs, root, 1, [2, 3])
    write_index(fs, root, read_committed(fs, root))
    change(out)
    committed = read_committed(fs, root)
    assert committed.keys.tolist() == truth(out) and committed.index is None, committed.index


@pytest.mark.parametrize("crash", ["before-index", "before-marker:2"])
def test_sigkill_around_the_index_never_loses_or_invents_a_row(prefect_api, tiny_model, resume_reference, tmp_path, crash):
    """Killed between the last marker and the index, or mid-run after an index: the next run finds every
    committed row (index plus later markers), the index never names a row without a marker, and the rerun
    completes the uninterrupted dataset."""
    prompts, want = resume_reference
    out = tmp_path / "out"
    assert run_cli(prefect_api, tiny_model, write_table(tmp_path / "a.parquet", ROWS[:3]), out).returncode == 0
    assert sorted(p.name for p in (out / "_index").iterdir()) == ["00000.npz"]
    killed = run_cli(prefect_api, tiny_model, prompts, out, crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    import fsspec

    for index in (out / "_index").iterdir():
        assert_index_exact(out, index)  # never a key whose marker is absent
    assert read_committed(fsspec.filesystem("file"), str(out)).keys.tolist() == truth(out)  # every committed key
    if crash == "before-index":  # every marker written, the run's index not
        assert len(list((out / "_shards").iterdir())) == 3
        assert sorted(p.name for p in (out / "_index").iterdir()) == ["00000.npz"]
    committed_rows = len(truth(out))

    resumed = run_cli(prefect_api, tiny_model, prompts, out)
    assert resumed.returncode == 0, resumed.stderr
    manifest = assert_consistent(out)  # one index, naming exactly the committed rows
    assert manifest["index"] == "_index/00001.npz"
    assert (manifest["rows"]["generated"], manifest["rows"]["already_done"]) == (len(ROWS) - committed_rows, committed_rows)
    ids = pq.read_table(out / "data").column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS)  # every row exactly once
    got = images_by_id(out)
    for row_id, pixels in want.items():
        assert np.abs(got[row_id].astype(int) - pixels.astype(int)).max() <= 1, row_id
