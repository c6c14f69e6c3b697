"""Integrity of local outputs under real-world conditions: literal paths, other files, unwritable or full disks, damaged control files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.generate import generate_dataset
from nodes.errors import StorageError
from tests.support.runs import RESUME_ROWS, assert_consistent, run_cli
from tests.support.tables import write_table

ROWS = RESUME_ROWS[:2]
RUN = {"batch_size": 2, "shard_size": 1, "steps": 1}  # 2 shards of 1 row, 1 U-Net call each (2 CPU cores)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_table(tmp_path_factory.mktemp("integrity") / "prompts.parquet", ROWS)


@pytest.fixture(scope="module")
def dataset(prefect_api, tiny_model, prompts, tmp_path_factory) -> Path:
    """One finished dataset of ROWS; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("integrity-dataset") / "out"
    generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    return out


def copy_of(dataset: Path, where: Path) -> Path:
    shutil.copytree(dataset, where)
    return where


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- 1: paths are literal, never globs


def test_out_with_pattern_characters_beside_a_sibling_resumes_its_own_markers(prefect_api, tiny_model, prompts, dataset, tmp_path):
    runs = tmp_path / "runs"
    sibling = copy_of(dataset, runs / "set1-a")  # what the glob set[1]*? would match
    before = files_under(sibling)
    out = runs / "set[1]*?"

    first = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert first["rows"]["generated"] == 2  # the sibling's markers are not this output's
    data = files_under(out / "data")
    again = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert (again["rows"]["generated"], again["rows"]["already_done"]) == (0, 2)
    assert files_under(out / "data") == data  # the cleanup found the markers, so deleted no data file
    assert_consistent(out)
    assert files_under(sibling) == before


def test_out_with_a_fsspec_chain_is_refused_not_rewritten(prefect_api, tiny_model, prompts, tmp_path, capsys):
    out = tmp_path / "runs" / "a::b"
    code, err = run_cli(capsys, prompts, out, "--model", tiny_model, "--steps", "1")
    assert code == 2 and "Traceback" not in err, err
    assert "'::'" in err and str(out) in " ".join(err.split()), err
    assert not (tmp_path / "runs").exists()  # neither runs/a::b nor runs/a


# ------------------------------------------------------------- 2: nothing touched that sdflow did not write


@pytest.mark.parametrize(
    "theirs",
    [
        {".notes.tmp": b"an editor's swap file"},  # a temporary, but not of sdflow's shape .NAME.UUIDHEX.tmp
        {"data/.part-00000.parquet.tmp": b"x"},
        {"manifest.json": b'{"name": "my photos"}', "contact_sheet.png": b"png"},  # an other tool's folder
        {"contact_sheet.png": b"png"},
    ],
    ids=["tmp", "data-tmp", "manifest", "sheet"],
)
def test_output_holding_files_sdflow_did_not_write_is_refused_and_kept(prefect_api, tiny_model, prompts, dataset, tmp_path, capsys, theirs):
    out = tmp_path / "out"
    if "manifest.json" in theirs or "contact_sheet.png" in theirs:
        out.mkdir()  # not an sdflow dataset: only their files
    else:
        copy_of(dataset, out)
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = files_under(out)
    code, err = run_cli(capsys, prompts, out, "--model", tiny_model, *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()])
    assert code == 2 and "Traceback" not in err, err
    assert "did not write" in err and all(name in err for name in theirs), err
    assert files_under(out) == before


# ------------------------------------------------------- 7: permanent output errors show before the model loads


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one may write in: chmod for a normal user; root ignores modes, so a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"root without chmod or mount: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_is_refused_before_the_model_loads(prefect_api, tiny_model, prompts, read_only_folder, monkeypatch):
    import flows.generate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for an output that cannot be written")

    monkeypatch.setattr(flows.generate, "load_components_task", no_load)
    out = read_only_folder / "out"
    with pytest.raises(StorageError, match=f"{out}.*cannot be written"):
        generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)


def test_output_under_a_file_is_refused_before_the_model_loads(prefect_api, tiny_model, prompts, tmp_path, monkeypatch):
    import flows.generate

    monkeypatch.setattr(flows.generate, "load_components_task", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot be written|is a file"):
        generate_dataset(prompts=prompts, out=str(tmp_path / "file" / "out"), model=tiny_model, **RUN)


def test_full_disk_stops_at_once_and_leaves_nothing_partial(prefect_api, tiny_model, prompts, tmp_path, monkeypatch):
    """ENOSPC from fsync of a data file (as a full disk gives it): no retry, no temporary file left."""
    real_fsync = os.fsync
    full = []

    def fsync(fd):
        if "/data/" in os.readlink(f"/proc/self/fd/{fd}"):
            full.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="disk is full"):
        generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **(RUN | {"shard_size": 2}))
    assert len(full) == 1, "a full disk is not retried"
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no partial temporary or data file


# ----------------------------------------------------------------------- 12: control files are validated


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda out: (out / "_shards" / "notes.json").write_text('{"note": "mine"}'), "_shards/notes.json"),
        (lambda out: (out / "_shards" / "00000.json").write_bytes((out / "_shards" / "00000.json").read_bytes()[:40]), "_shards/00000.json"),
        (lambda out: (out / "_shards" / "00001.json").write_text('{"shard": 1}'), "_shards/00001.json"),
        (lambda out: (out / "_shards" / "00001.json").write_text(
            (out / "_shards" / "00001.json").read_text().replace('"data/part-', '"../../etc/part-')), "_shards/00001.json"),
    ],
    ids=["stray", "truncated", "missing-keys", "file-outside"],
)
def test_damaged_control_file_is_named_with_what_to_do(prefect_api, tiny_model, prompts, dataset, tmp_path, capsys, damage, named):
    out = copy_of(dataset, tmp_path / "out")
    damage(out)
    before = files_under(out)
    code, err = run_cli(capsys, prompts, out, "--model", tiny_model, *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()])
    assert code == 2, err
    assert "Traceback" not in err and err.count("\nsdflow") == 0, err  # one paragraph
    said = " ".join(err.split())
    assert named in said and str(out) in said, err
    assert "move it out of _shards/" in said or "move those files away" in said, err
    assert files_under(out) == before


def test_datasets_of_the_earlier_layout_resume(prefect_api, tiny_model, prompts, dataset, tmp_path):
    """Markers that name data/part-NNNNN.parquet (before per-attempt keys) are read as they are."""
    out = copy_of(dataset, tmp_path / "out")
    for marker_file in (out / "_shards").iterdir():
        marker = json.loads(marker_file.read_text())
        old = f"data/part-{marker['shard']:05d}.parquet"
        (out / marker["file"]).rename(out / old)
        marker_file.write_text(json.dumps({**marker, "file": old}))
    again = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert (again["rows"]["generated"], again["rows"]["already_done"]) == (0, 2)
    assert sorted(s["file"] for s in assert_consistent(out)["shards"]) == ["data/part-00000.parquet", "data/part-00001.parquet"]
    assert pq.read_table(out / "data").num_rows == 2


def test_a_dataset_of_another_format_is_not_extended(prefect_api, tiny_model, prompts, dataset, tmp_path):
    """Format 1 keyed rows by config sizes and had no guidance_rescale column: new shards would never match it."""
    out = copy_of(dataset, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "sdflow-dataset/1"}))
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(StorageError, match=r"format sdflow-dataset/1.*write to a new location"):
        generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format"] == "sdflow-dataset/1"


def test_files_that_operating_systems_leave_are_neither_refused_nor_touched(prefect_api, tiny_model, prompts, dataset, tmp_path):
    out = copy_of(dataset, tmp_path / "out")
    left = [out / ".DS_Store", out / "data" / ".DS_Store", out / ".ipynb_checkpoints" / "manifest-checkpoint.json"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the desktop's")
    again = generate_dataset(prompts=prompts, out=str(out), model=tiny_model, **RUN)
    assert again["rows"]["already_done"] == len(ROWS)
    assert all(path.read_text() == "the desktop's" for path in left)
