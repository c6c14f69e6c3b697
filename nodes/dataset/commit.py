"""The commit protocol: a shard counts as done only when its marker exists, and the marker is written last.

    OUT/data/part-NNNNN.parquet   the shard's rows, written whole to its final key first
    OUT/_shards/NNNNN.json        its marker, created only if absent: row keys, ids, seeds, PNG hashes

Control files start with `_` (and temporary files with `.`), so Parquet readers skip them. A data file
without a marker belongs to an attempt that died before committing: it is never listed in the manifest, is
overwritten when its index is planned again, and is deleted when a run finishes. A committed shard is never
rewritten: an attempt checks for the marker before writing, and the marker itself is create-only, so two
attempts racing on one shard make exactly one commit; the other finds the marker and, when its row keys and
hashes agree, reports success.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.errors import TASK_RETRIES, StorageError
from nodes.faults import crash_point
from nodes.params import Row
from nodes.dataset.store import (
    SHARD_FILE,
    is_temporary,
    parquet_bytes,
    shard_path,
    shard_table,
    write_file,
    write_temporary,
)

MARKERS = "_shards"


def marker_path(root: str, index: int) -> str:
    return f"{root}/{MARKERS}/{index:05d}.json"


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` holding `data` if it does not exist yet; True if this call created it.

    Locally: write a temporary file, then hard-link it to `path`, which fails if `path` exists (atomic on
    POSIX). On S3: one PUT with If-None-Match, which the store refuses if the key exists.
    """
    if isinstance(fs, LocalFileSystem):
        temporary = write_temporary(path, data)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


@dataclass(frozen=True)
class Committed:
    """What an output location already holds: its committed shards' markers and row keys."""

    markers: tuple[dict, ...] = ()  # sorted by shard index
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # rows with an image

    @property
    def next_index(self) -> int:
        return max((m["shard"] for m in self.markers), default=-1) + 1

    @property
    def files(self) -> set[str]:
        return {m["file"] for m in self.markers if m["file"]}


def read_committed(fs: fsspec.AbstractFileSystem, root: str) -> Committed:
    """Read every marker under OUT/_shards (concurrently on object stores)."""
    paths = sorted(fs.glob(f"{root}/{MARKERS}/*.json"))
    if not paths:
        return Committed()
    contents = fs.cat(paths)
    markers = sorted((json.loads(contents[p]) for p in paths), key=lambda m: m["shard"])
    keys = [int(k, 16) for m in markers for k in m["keys"]]
    return Committed(tuple(markers), np.array(keys, dtype=np.uint64))


def read_marker(fs: fsspec.AbstractFileSystem, root: str, index: int) -> dict | None:
    """Shard `index`'s marker, or None while the shard is not committed."""
    try:
        return json.loads(fs.cat_file(marker_path(root, index)))
    except FileNotFoundError:
        return None


def shard_marker(index: int, table: pa.Table, keys: np.ndarray, failed: list[dict], extra: dict) -> dict:
    """The marker of a shard: which rows it holds (keys, ids, seeds), their PNG hashes, and what failed."""
    images = table.column("image").combine_chunks().field("bytes").to_pylist() if table.num_rows else []
    return {
        "shard": index,
        "file": f"data/part-{index:05d}.parquet" if table.num_rows else None,
        "rows": table.num_rows,
        "keys": [f"{int(k):016x}" for k in keys],
        "ids": table.column("id").to_pylist() if table.num_rows else [],
        "seeds": table.column("seed").to_pylist() if table.num_rows else [],
        "sha256": [hashlib.sha256(png).hexdigest() for png in images],
        "failed": failed,
        **extra,
    }


def _same_rows(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and a["sha256"] == b["sha256"]


def commit_shard(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table, marker: dict) -> str:
    """Write a shard's data, then create its marker. Returns "committed" or "already committed".

    Raises StorageError if another attempt committed this index with other rows.
    """
    index = marker["shard"]
    path = marker_path(root, index)
    existing = read_marker(fs, root, index)
    if existing is not None:
        if _same_rows(existing, marker):
            return "already committed"
        raise StorageError(f"shard {index} of {root} is already committed with other rows; this attempt wrote nothing.")
    if table.num_rows:
        write_file(fs, shard_path(root, index), parquet_bytes(table))
    crash_point("before-marker")
    if create_only(fs, path, (json.dumps(marker, indent=1, default=str) + "\n").encode()):
        return "committed"
    if _same_rows(read_marker(fs, root, index), marker):
        return "already committed"
    raise StorageError(f"shard {index} of {root} was committed by another attempt with other rows at the same time.")


def clean_uncommitted(fs: fsspec.AbstractFileSystem, root: str, committed_files: set[str]) -> list[str]:
    """Delete what killed attempts left: shard files without a marker, temporary files, unfinished uploads.

    Touches only names sdflow writes. Returns what it removed.
    """
    removed = []
    for folder in (f"{root}/data", f"{root}/{MARKERS}", root):
        try:
            names = fs.ls(folder, detail=False)
        except FileNotFoundError:
            continue
        for path in names:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            orphan = folder.endswith("/data") and SHARD_FILE.fullmatch(name) and f"data/{name}" not in committed_files
            if orphan or is_temporary(name):
                fs.rm_file(path)
                removed.append(path)
    if hasattr(fs, "list_multipart_uploads"):  # s3fs: parts of uploads that a killed process never completed
        bucket, prefix, _ = fs.split_path(root)
        for upload in fs.list_multipart_uploads(bucket):
            if upload["Key"].startswith(prefix):
                fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                removed.append(f"{bucket}/{upload['Key']} (unfinished upload)")
    return removed


def write_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    index: int,
    rows: list[Row],
    keys: np.ndarray,
    pngs: list[dict[int, bytes]],
    carried: pa.Table,
    scheduler: str,
    model: str,
    failed: list[dict],
    extra: dict,
) -> dict:
    """Assemble a shard from its batches' PNGs (failed rows have none and are left out) and commit it.

    Returns its marker, with `outcome` "committed" or "already committed".
    """
    merged = {position: data for batch in pngs for position, data in batch.items()}
    keep = [i for i, r in enumerate(rows) if r.position in merged]
    table = shard_table([rows[i] for i in keep], merged, carried.take(keep), scheduler, model)
    marker = shard_marker(index, table, keys[keep], failed, extra)
    marker["outcome"] = commit_shard(fs, root, table, marker)
    return marker


write_shard_task = task(write_shard, name="write-shard", cache_policy=NO_CACHE, persist_result=False, **TASK_RETRIES)


def shard_failures(rows: list[Row], keys, failed: dict[int, str]) -> list[dict]:
    """The marker's record of rows that failed: key, id, position and error."""
    return [
        {"key": f"{int(k):016x}", "id": r.id, "position": r.position, "error": failed[r.position]}
        for r, k in zip(rows, keys)
        if r.position in failed
    ]
