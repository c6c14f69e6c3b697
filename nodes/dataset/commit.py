"""The commit protocol: a shard counts as done only when its marker exists, and the marker is written last.

    OUT/data/part-NNNNN-ATTEMPT.parquet   the shard's rows, written whole to a key of this attempt's own first
    OUT/_shards/NNNNN.json                its marker, created only if absent: the data file, row keys, ids, seeds, image hashes
    OUT/_index/NNNNN.npz                  a summary of the markers committed when a run ended: their sorted row keys,
                                          shards, files, row counts, failed rows and each marker's listed size and stamp

Control files start with `_` (and temporary files with `.`), so Parquet readers skip them. Each attempt
writes its data under its own key, so no attempt can overwrite the rows another attempt's marker names:
two attempts racing on one shard make exactly one commit, and the loser deletes its data file and, when its
row keys and hashes agree, reports success. A data file that no marker names belongs to an attempt that died
before committing: it is never listed in the manifest and is deleted by the next run to finish. Markers of
datasets written before per-attempt keys name `data/part-NNNNN.parquet`, and are read as they are.

The markers stay the commit protocol; the index only saves reading them. A run reads the newest index, then
only the markers it does not name. It trusts the index only while every marker it names is still listed with
the size and stamp it recorded (a marker is never rewritten, so a difference means one was moved or edited):
otherwise it reads every marker, as without an index. An index is written create-only after a run's shards,
from what that run read, so it never names a marker that did not exist; a run killed before writing it leaves
the markers, which the next run reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from nodes.errors import StorageError
from nodes.faults import crash_point
from nodes.params import Row
from nodes.dataset.store import (
    DATA_FILE,
    is_own,
    is_temporary,
    list_output,
    parquet_bytes,
    shard_table,
    write_file,
    write_temporary,
)

log = logging.getLogger("sdflow")

MARKERS = "_shards"
INDEX = "_index"
INDEX_FILE = re.compile(r"(\d{5,})\.npz")
MARKER_BATCH = 256  # markers read and parsed at a time: memory stays flat however many there are


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
    """What an output location already holds: its committed shards, their row keys and failed rows.

    Only what resume, the manifest and the contact sheet need (never the markers themselves, which at ten million
    rows would take gigabytes): a resume holds 8 bytes a committed row and ~100 bytes a shard.
    """

    shards: tuple[dict, ...] = ()  # {"shard", "file", "rows"} of each committed shard, sorted by shard index
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # rows with an image, sorted
    failed: tuple[dict, ...] = ()  # the markers' failed rows, one per key (the latest shard's), keys maybe since done
    stamps: tuple[str, ...] = ()  # each shard's marker as listed: "size:stamp" (index_stamp), as `shards`
    index: str | None = None  # the index read (its path relative to OUT), or None
    markers_read: int = 0  # markers read and parsed: those the index does not name

    @property
    def next_index(self) -> int:
        return max((s["shard"] for s in self.shards), default=-1) + 1

    @property
    def files(self) -> set[str]:
        return {s["file"] for s in self.shards if s["file"]}

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """For each key, whether a committed row has it."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        at = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[at] == keys


MARKER_FILE = re.compile(r"(\d{5,})\.json")
# A marker's required fields and their types: what resume, the manifest and the contact sheet read.
MARKER_FIELDS = {"shard": int, "file": (str, type(None)), "rows": int, "keys": list, "ids": list, "seeds": list,
                 "sha256": list, "failed": list}
ROW_KEY = re.compile(r"[0-9a-f]{16}")


def marker_problem(marker, index: int) -> str | None:
    """What makes a parsed marker of shard `index` unusable, or None if it is sound."""
    if not isinstance(marker, dict):
        return "it is not a JSON object"
    for name, kind in MARKER_FIELDS.items():
        if name not in marker:
            return f"it has no {name!r}"
        if not isinstance(marker[name], kind) or isinstance(marker[name], bool):
            return f"its {name!r} is {type(marker[name]).__name__}, not {getattr(kind, '__name__', 'str or null')}"
    if marker["shard"] != index:
        return f"it names shard {marker['shard']}, not {index}"
    if marker["file"] is not None and not re.fullmatch(DATA_FILE, marker["file"]):  # a path joined to OUT: ours only
        return f"its file {marker['file']!r} is not a data file of this dataset"
    if not all(isinstance(k, str) and ROW_KEY.fullmatch(k) for k in marker["keys"]):
        return "its 'keys' are not 16-digit hex row keys"
    if not (marker["rows"] == len(marker["keys"]) == len(marker["sha256"])) or (marker["file"] is None) != (marker["rows"] == 0):
        return "its row count, keys, hashes and file disagree"
    return None


def parse_marker(fs: fsspec.AbstractFileSystem, path: str, data: bytes, index: int) -> dict:
    """A marker from its bytes, validated; raises StorageError naming the file and what to do."""
    try:
        marker = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        problem = f"it is not valid JSON ({e})"
    else:
        problem = marker_problem(marker, index)
    if problem is None:
        return marker
    raise StorageError(
        f"{fs.unstrip_protocol(path)} is not a valid sdflow shard marker: {problem}. sdflow writes markers whole, "
        f"so it was damaged or edited by hand: restore it from a copy of the dataset, or move it out of {MARKERS}/ "
        "(its shard then counts as not written and its rows are generated again)."
    )


def _listed(fs: fsspec.AbstractFileSystem, root: str, folder: str, names: re.Pattern) -> dict[int, tuple[str, dict]]:
    """Files of `root/folder` whose names match `names`, by their number: (path, listed details).

    Lists the literal folder and matches names here: OUT is the user's text, never a glob pattern. Anything
    else but sdflow's temporaries is refused, naming it.
    """
    path = f"{root}/{folder}"
    fs.invalidate_cache(path)  # workers and concurrent runs commit from other processes
    try:
        listed = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for info in listed:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        match = names.fullmatch(name)
        if match and info.get("type") != "directory":
            found[int(match.group(1))] = (info["name"], info)
        elif not is_temporary(name):
            what = "a shard marker: _shards/ holds only sdflow's markers, named NNNNN.json" if folder == MARKERS else (
                "an index file: _index/ holds only sdflow's indexes of committed rows, named NNNNN.npz")
            raise StorageError(
                f"{fs.unstrip_protocol(info['name'])} is not {what}. Move it out of {folder}/ and run again."
            )
    return found


def index_stamp(info: dict) -> str:
    """What a listing says of a marker's content: its size, and its ETag (object stores) or modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{tag}"


def iter_markers(fs: fsspec.AbstractFileSystem, paths: list[tuple[int, str]]) -> Iterator[dict]:
    """The markers at `paths` ((index, path), in order), validated, read MARKER_BATCH at a time (concurrently on object stores)."""
    for start in range(0, len(paths), MARKER_BATCH):
        batch = paths[start : start + MARKER_BATCH]
        contents = fs.cat_ranges([p for _, p in batch], None, None, on_error="raise")  # not fs.cat: it globs names
        for (index, path), data in zip(batch, contents):
            yield parse_marker(fs, path, data, index)


def read_committed(fs: fsspec.AbstractFileSystem, root: str) -> Committed:
    """What OUT holds: the newest index, if every marker it names is listed as it recorded, plus every marker it
    does not name (all markers where there is no usable index), validated."""
    listed = _listed(fs, root, MARKERS, MARKER_FILE)
    if not listed:
        return Committed()
    stamps = {i: index_stamp(info) for i, (_, info) in listed.items()}
    index = _read_newest_index(fs, root, stamps)
    shards: dict[int, dict] = {}
    keys = [index["keys"]] if index else []
    failed: dict[str, dict] = {}
    if index:
        shards = {int(i): {"shard": int(i), "file": f or None, "rows": int(n)}
                  for i, f, n in zip(index["shards"], index["files"], index["rows"])}
        failed = {f["key"]: f for f in json.loads(index["failed"].tobytes())}
    todo = [(i, listed[i][0]) for i in sorted(listed) if i not in shards]
    for marker in iter_markers(fs, todo):
        shards[marker["shard"]] = {"shard": marker["shard"], "file": marker["file"], "rows": marker["rows"]}
        keys.append(np.frombuffer(bytes.fromhex("".join(marker["keys"])), dtype=">u8").astype(np.uint64))
        for f in marker["failed"]:
            failed[f["key"]] = f
    if index and not todo:
        all_keys = index["keys"]  # sorted when written
    else:
        all_keys = np.concatenate(keys) if keys else np.empty(0, np.uint64)
        all_keys.sort()
    order = sorted(shards)
    return Committed(
        shards=tuple(shards[i] for i in order),
        keys=all_keys,
        failed=tuple(failed.values()),
        stamps=tuple(stamps[i] for i in order),
        index=index["path"] if index else None,
        markers_read=len(todo),
    )


def _read_newest_index(fs: fsspec.AbstractFileSystem, root: str, stamps: dict[int, str]) -> dict | None:
    """The newest index as arrays, if every marker it names is listed with the size and stamp it recorded; else None.

    An index that does not hold (damaged, deleted meanwhile by a concurrent run's cleanup, a marker moved or
    edited since) is passed over: every marker is read instead, and validated.
    """
    found = _listed(fs, root, INDEX, INDEX_FILE)
    if not found:
        return None
    number = max(found)
    path = found[number][0]
    try:  # from the open file, not its bytes in memory: at ten million rows the keys alone are 80 MB
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            index = {name: data[name] for name in INDEX_ARRAYS}
    except (FileNotFoundError, ValueError, KeyError, OSError, zipfile.BadZipFile):
        return None
    n = len(index["shards"])
    sound = (
        index["keys"].dtype == np.uint64
        and len(index["files"]) == len(index["rows"]) == len(index["stamps"]) == n
        and int(index["rows"].sum()) == len(index["keys"])
        and all(stamps.get(int(i)) == str(s) for i, s in zip(index["shards"], index["stamps"]))
    )
    return {**index, "path": f"{INDEX}/{number:05d}.npz", "number": number} if sound else None


INDEX_ARRAYS = ("keys", "shards", "files", "rows", "stamps", "failed")


def write_index(fs: fsspec.AbstractFileSystem, root: str, committed: Committed) -> str | None:
    """Summarise `committed` (read_committed, after this run's shards) as a new index, create-only; its path
    relative to OUT, or None where nothing needs one (the index read already names every marker)."""
    if not committed.shards or not committed.markers_read:
        return committed.index
    numbers = _listed(fs, root, INDEX, INDEX_FILE)
    number = max(numbers, default=-1) + 1
    buffer = io.BytesIO()
    np.savez(
        buffer,
        keys=committed.keys,
        shards=np.array([s["shard"] for s in committed.shards], dtype=np.int64),
        files=np.array([s["file"] or "" for s in committed.shards], dtype=str),
        rows=np.array([s["rows"] for s in committed.shards], dtype=np.int64),
        stamps=np.array(committed.stamps, dtype=str),
        failed=np.frombuffer(json.dumps(list(committed.failed)).encode(), dtype=np.uint8),
    )
    crash_point("before-index")
    path = f"{INDEX}/{number:05d}.npz"
    # Taken by a concurrent run: its index is as good (it names fewer or more markers; a later run reads the rest).
    create_only(fs, f"{root}/{path}", buffer.getvalue())
    return path


def read_marker(fs: fsspec.AbstractFileSystem, root: str, index: int) -> dict | None:
    """Shard `index`'s marker, validated, or None while the shard is not committed."""
    path = marker_path(root, index)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return parse_marker(fs, path, data, index)


def shard_marker(index: int, table: pa.Table, keys: np.ndarray, failed: list[dict], extra: dict) -> dict:
    """The marker of a shard: which rows it holds (keys, ids, seeds), their images' sha256, and what failed."""
    images = table.column("image").combine_chunks().field("bytes").to_pylist() if table.num_rows else []
    return {
        "shard": index,
        "file": None,  # set by commit_shard: a data key of the committing attempt's own
        "rows": table.num_rows,
        "keys": [f"{int(k):016x}" for k in keys],
        "ids": table.column("id").to_pylist() if table.num_rows else [],
        "seeds": table.column("seed").to_pylist() if table.num_rows else [],
        "sha256": [hashlib.sha256(data).hexdigest() for data in images],
        "failed": failed,
        **extra,
    }


def _same_rows(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and a["sha256"] == b["sha256"]


def _discard(fs: fsspec.AbstractFileSystem, root: str, marker: dict) -> None:
    """Delete the data file an attempt wrote but did not commit (best effort: a later run's cleanup retries).

    Unless the marker at its index names that very file: a marker PUT whose response was lost is retried by the
    client and refused as existing (412), and a signal can land after the link; the commit then did happen.
    """
    try:
        committed = read_marker(fs, root, marker["shard"])
    except Exception:  # unreadable now: keep the file; cleanup decides later, against the markers
        return
    if committed is not None and committed["file"] == marker["file"]:
        return
    if marker["file"]:
        try:
            fs.rm_file(f"{root}/{marker['file']}")
        except Exception:
            pass


def commit_shard(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table, marker: dict) -> str:
    """Write a shard's data under a key of this attempt's own, then create its marker.

    Returns "committed" or "already committed"; on either, `marker` names the committed file and index. When
    another run took the index with other rows (two runs with different tables into one output), the shard
    moves to the next free index. Raises StorageError if some of its rows are committed with other images.
    """
    while True:
        index = marker["shard"]
        existing = read_marker(fs, root, index)
        if existing is None:
            # A fresh key per attempt, even for a retried marker: no attempt can overwrite another's file.
            marker["file"] = f"data/part-{index:05d}-{uuid.uuid4().hex}.parquet" if table.num_rows else None
            if table.num_rows:
                write_file(fs, f"{root}/{marker['file']}", parquet_bytes(table))
            try:
                crash_point("before-marker")
                created = create_only(fs, marker_path(root, index), (json.dumps(marker, indent=1, default=str) + "\n").encode())
            except BaseException:
                _discard(fs, root, marker)
                raise
            if created:
                return "committed"
            _discard(fs, root, marker)  # the loser of a race: its data file is named by no marker
            existing = read_marker(fs, root, index)
        if _same_rows(existing, marker):
            marker["file"] = existing["file"]
            return "already committed"
        if set(existing["keys"]) & set(marker["keys"]):
            raise StorageError(_taken(root, index))
        # Another run's rows hold this index: ours may already sit at another (a retry), else take a free one.
        listed = _listed(fs, root, MARKERS, MARKER_FILE)
        ours = set(marker["keys"])
        for other in iter_markers(fs, [(i, listed[i][0]) for i in sorted(listed)]):
            if _same_rows(other, marker):
                marker.update(shard=other["shard"], file=other["file"])
                return "already committed"
            if ours.intersection(other["keys"]):
                raise StorageError(_taken(root, other["shard"]))
        marker["shard"] = max(max(listed, default=-1) + 1, index + 1)


def _taken(root: str, index: int) -> str:
    return (
        f"shard {index} of {root} was committed by another attempt with some of this shard's rows but other "
        "images; this attempt kept nothing. Another run may be writing the same rows with other settings or on "
        "other hardware: wait for it to finish, then run again (committed rows are not generated twice)."
    )


def clean_uncommitted(
    fs: fsspec.AbstractFileSystem, root: str, committed_files: set[str], before: float, index: str | None = None
) -> list[str]:
    """Delete what killed attempts left under OUT/: data files no marker names, temporary files, unfinished uploads,
    and indexes older than `index` (the newest, which names every marker they name).

    Touches only names sdflow writes (store.is_own) under `root/`, and only those last modified before
    `before` (this run's start, epoch seconds): newer ones may belong to a run writing here at the same time.
    Returns what it removed.
    """
    removed = []
    newest = int(INDEX_FILE.fullmatch(index.rsplit("/", 1)[-1]).group(1)) if index else -1
    for name, info in list_output(fs, root).items():
        folder, _, base = name.rpartition("/")
        orphan = re.fullmatch(DATA_FILE, name) and name not in committed_files
        superseded = folder == INDEX and INDEX_FILE.fullmatch(base) and int(INDEX_FILE.fullmatch(base).group(1)) < newest
        if (orphan or superseded or is_temporary(base)) and is_own(name) and _modified(info) < before:
            fs.rm_file(f"{root}/{name}")
            removed.append(f"{root}/{name}")
    if hasattr(fs, "list_multipart_uploads"):  # s3fs: parts of uploads that a killed process never completed
        try:
            removed += _abort_own_uploads(fs, root, before)
        except OSError as e:  # e.g. no s3:ListBucketMultipartUploads: the dataset is whole; only parts are left
            log.warning("unfinished uploads under %s were not cleaned (%s: %s)", root, type(e).__name__, e)
    return removed


def _abort_own_uploads(fs, root: str, before: float) -> list[str]:
    """Abort sdflow's unfinished multipart uploads under OUT/ started before `before`, every page of them."""
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key}/" if key else ""  # with the slash: s3://b/out must not reach s3://b/outbox/
    removed, marker = [], {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
        for upload in page.get("Uploads", []):
            name = upload["Key"][len(prefix):]
            if upload["Key"].startswith(prefix) and is_own(name) and upload["Initiated"].timestamp() < before:
                fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                removed.append(f"{bucket}/{upload['Key']} (unfinished upload)")
        if not page.get("IsTruncated"):
            return removed
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _modified(info: dict) -> float:
    """A listed file's last modification, epoch seconds (local: mtime; object stores: LastModified)."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified") or info.get("last_modified")
    return modified.timestamp() if modified is not None else float("-inf")


def write_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    index: int,
    rows: list[Row],
    keys: np.ndarray,
    encoded: list[dict[tuple[int, int], bytes]],
    carried: pa.Table,
    scheduler: str,
    model: str,
    failed: list[dict],
    extra: dict,
) -> dict:
    """Assemble a shard from its batches' encoded images (failed rows have none and are left out) and commit it.

    Returns its marker, with `outcome` "committed" or "already committed".
    """
    merged = {slot: data for batch in encoded for slot, data in batch.items()}
    keep = [i for i, r in enumerate(rows) if r.slot in merged]
    table = shard_table([rows[i] for i in keep], merged, carried.take(keep), scheduler, model)
    marker = shard_marker(index, table, keys[keep], failed, extra)
    marker["outcome"] = commit_shard(fs, root, table, marker)
    return marker


def shard_failures(rows: list[Row], keys, failed: dict[tuple[int, int], str]) -> list[dict]:
    """The marker's record of rows that failed: key, id, position (in the table), image index and error."""
    return [
        {"key": f"{int(k):016x}", "id": r.id, "position": r.position, "image_index": r.image_index, "error": failed[r.slot]}
        for r, k in zip(rows, keys)
        if r.slot in failed
    ]
