"""Prompt ingestion: open a Parquet prompt table, check its schema and values, stream it in shards of rows.

The table is never loaded whole: a planning pass streams only the control columns (to validate every
row before any model is loaded), and generation streams all columns again one shard at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.dataset.store import loadable_type
from nodes.errors import PromptTableError, StorageError, name_ids
from nodes.pipeline.adapters import resolve_row_loras
from nodes.pipeline.components import ModelInfo
from nodes.params import (
    COLUMN_NAMES,
    COLUMNS,
    INVALID,
    Column,
    KINDS,
    MAX_CLIP_SKIP,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    OUTPUT_COLUMNS,
    GenerationDefaults,
    Row,
    finite_number,
    image_seed,
    image_side,
    unit_fraction,
    whole_number,
)

# Columns resolved against the run and the rest of their row, in place of their check and default: (value, run
# defaults, the row's columns resolved so far, whether the table has the column) -> the value, or INVALID.
RESOLVERS: dict[str, Callable] = {"loras": resolve_row_loras}

SCAN_ROWS = 65_536  # rows per record batch in the planning pass: a few MB of control columns
READ_BUFFER = 4 << 20  # bytes read at a time from a column chunk, however large its row group


@dataclass(frozen=True)
class Shard:
    """Rows to generate into one output Parquet file: the next `rows` output rows (images) not yet done, in table order."""

    index: int  # the file's number, part-NNNNN; a committed index is never reused
    rows: int
    keys_digest: str = ""  # shard_digest of its rows' keys, as planned: generation checks it reads the same rows


@dataclass(frozen=True)
class PromptPlan:
    """What a run will generate: the table's size, its shards, and the rows skipped as done or invalid."""

    url: str
    num_rows: int
    rows_per_shard: int
    carried_columns: tuple[str, ...]  # input columns passed through untouched to the output
    shards: tuple[Shard, ...]  # the rows still to generate
    invalid: dict[int, tuple[int | str, str]] = field(default_factory=dict)  # position -> (id, problem)
    identity: tuple[str, ...] = ("", "")  # (scheduler, model fingerprint[, ImageFormat.key]): row_key's arguments
    version: str = ""  # the table file's version when planned (_open_versioned); generation reads only that one
    done_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64), compare=False)  # sorted
    already_done: int = 0  # rows of this table committed by earlier runs, skipped
    stale: int = 0  # committed rows that this table and these parameters no longer produce

    @property
    def rows_to_generate(self) -> int:
        return sum(s.rows for s in self.shards)


def open_prompt_table(url: str, storage_options: dict | None = None) -> pq.ParquetFile:
    """Open a Parquet table at a local path or fsspec URL, with errors that name the file."""
    return _open_versioned(url, storage_options)[0]


# What a store's file info says of a file's version: local size, modification time and inode; object stores'
# ETag, version id and modification time (S3: ETag, VersionId, LastModified; GCS: generation; Azure: etag).
VERSION_KEYS = ("size", "mtime", "ino", "ETag", "VersionId", "LastModified", "generation", "etag", "last_modified")


def _open_versioned(url: str, storage_options: dict | None) -> tuple[pq.ParquetFile, str]:
    """The opened table and its version: the store's stamp of the file and a hash of its Parquet footer."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        f = fs.open(path, "rb")
        # pre_buffer=False: with pyarrow's default read cache, every row group read stays in memory until the
        # file is closed, so one pass over the table would hold all of its bytes; without it memory stays flat.
        # buffer_size: without it each column chunk of a row group is read whole before its first batch decodes.
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)
        info = getattr(f, "details", None) or fs.info(path)  # object stores: the info of the object being read
    except FileNotFoundError:
        raise PromptTableError(f"prompt table {url} does not exist.") from None
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, PermissionError):
            raise PromptTableError(f"prompt table {url} cannot be read: permission denied.") from None
        if isinstance(e, IsADirectoryError) or "magic bytes" in str(e) or "Parquet" in str(e):
            raise PromptTableError(f"prompt table {url} is not a Parquet file ({e}).") from None
        raise PromptTableError(f"prompt table {url} cannot be read ({e}).") from None
    footer = io.BytesIO()
    pf.metadata.write_metadata_file(footer)  # row groups' offsets, sizes and statistics: changes with the data
    version = {k: str(info[k]) for k in VERSION_KEYS if info.get(k) is not None}
    version["footer"] = hashlib.blake2b(footer.getvalue(), digest_size=16).hexdigest()
    return pf, json.dumps(version, sort_keys=True)


def changed(url: str, how: str) -> PromptTableError:
    return PromptTableError(
        f"prompt table {url} changed during the run: {how}. It was checked whole before generation started, and "
        "nothing was generated from the changed file. Leave the table in place while sdflow runs (write a new "
        "file for a new version), then run again: committed rows are kept."
    )


def check_schema(schema: pa.Schema, url: str, family: str = "sd") -> tuple[str, ...]:
    """Check the control columns' types; returns the carried (non-control) columns in table order."""
    names = schema.names
    if "prompt" not in names:
        raise PromptTableError(
            f"prompt table {url} has no 'prompt' column; the columns found are: {', '.join(names) or '(none)'}."
        )
    for column in COLUMNS:
        if column.name not in names:
            continue
        dtype = schema.field(column.name).type
        if pa.types.is_dictionary(dtype):
            dtype = dtype.value_type
        accepts, words = KINDS[column.kind]
        if not (accepts(dtype) or pa.types.is_null(dtype)):
            raise PromptTableError(f"column '{column.name}' of prompt table {url} has type {dtype}; it must hold {words}.")
        if column.families is not None and family not in column.families:
            raise PromptTableError(
                f"column '{column.name}' of prompt table {url} conditions {', '.join(column.families)} models only, and "
                f"this model is of family '{family}'; rename the column to carry it through, or use such a model."
            )
    carried = tuple(n for n in names if n not in COLUMN_NAMES)
    clashes = [n for n in carried if n in OUTPUT_COLUMNS]
    if clashes:
        raise PromptTableError(
            f"prompt table {url} has column(s) {', '.join(clashes)}, which sdflow writes itself; rename them."
        )
    if len(set(names)) != len(names):
        raise PromptTableError(f"prompt table {url} has duplicate column names: {', '.join(names)}.")
    return carried


def written_schema(schema: pa.Schema) -> pa.Schema:
    """The id and carried columns of a table as the dataset's shards hold them (nodes.dataset.store.shard_table)."""
    ids = schema.field("id").type if "id" in schema.names else pa.int64()  # no id column: positions
    ids = ids.value_type if pa.types.is_dictionary(ids) else ids
    fields = [pa.field("id", pa.string() if KINDS["text"][0](ids) else pa.int64())]
    return pa.schema(fields + [pa.field(f.name, loadable_type(f.type)) for f in schema if f.name not in COLUMN_NAMES])


def committed_schema(fs: fsspec.AbstractFileSystem, root: str, shards: tuple[dict, ...], out: str) -> tuple[str, pa.Schema] | None:
    """(its URL, its schema) of the newest committed shard file, read from its footer; None for a new dataset."""
    files = [s["file"] for s in shards if s.get("file")]
    if not files:
        return None
    url = f"{out.rstrip('/')}/{files[-1]}"
    try:
        with fs.open(f"{root}/{files[-1]}", "rb") as f:
            return url, pq.read_schema(f)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"committed shard {url} cannot be read ({type(e).__name__}: {e}); its marker names it.") from None


def check_same_schema(schema: pa.Schema, url: str, committed: tuple[str, pa.Schema]) -> None:
    """Refuse a table whose id or carried columns would be written with other types than the committed shards'.

    Shards of two schemas do not make one dataset: `datasets` refuses to load them, pyarrow silently reads the
    columns of one file's schema only.
    """
    shard, have = committed
    have = pa.schema([f for f in have if f.name == "id" or f.name not in OUTPUT_COLUMNS])
    want = written_schema(schema)
    problems = [
        f"column '{f.name}' ({f.type}) is not in the dataset" for f in want if f.name not in have.names
    ] + [
        f"column '{f.name}' ({f.type}) is not in the table" for f in have if f.name not in want.names
    ] + [
        f"column '{f.name}' would be written as {f.type}, but the dataset holds {have.field(f.name).type}"
        for f in want
        if f.name in have.names and f.type != have.field(f.name).type
    ]
    if problems:
        raise PromptTableError(
            f"prompt table {url} does not match the dataset it would extend (its shard {shard}): "
            + "; ".join(problems)
            + ". Shards of two schemas cannot be read as one dataset. Give the table the dataset's columns and "
            "types (cast or add them), or write to a new output."
        )


def _record_batches(pf: pq.ParquetFile, rows: int, columns: list[str] | None, url: str) -> Iterator[pa.RecordBatch]:
    """The table's record batches; a damaged file becomes an error that names it."""
    batches = pf.iter_batches(batch_size=rows, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise PromptTableError(f"prompt table {url} cannot be read: it is damaged ({e}).") from None
        yield batch


def iter_row_chunks(
    pf: pq.ParquetFile, rows: int, columns: list[str] | None = None, url: str = "the prompt table"
) -> Iterator[tuple[int, pa.Table]]:
    """Stream a table as (first row position, table of exactly `rows` rows; fewer for the last)."""
    pending: list[pa.RecordBatch] = []
    buffered = 0
    start = 0
    for batch in _record_batches(pf, min(rows, SCAN_ROWS), columns, url):
        pending.append(batch)
        buffered += batch.num_rows
        while buffered >= rows:
            table = pa.Table.from_batches(pending)
            yield start, table.slice(0, rows)
            rest = table.slice(rows)
            pending, buffered, start = rest.to_batches(), rest.num_rows, start + rows
    if buffered:
        yield start, pa.Table.from_batches(pending)


def _values(chunk: pa.Table, name: str, start: int) -> list:
    """A column's values as Python objects; text that is not UTF-8 is an error naming the rows."""
    try:
        return chunk.column(name).to_pylist()
    except UnicodeDecodeError:
        raw = chunk.column(name).cast(pa.binary()).to_pylist()
        if name == "id" or "id" not in chunk.column_names:
            ids = (
                [None if v is None else v.decode("utf-8", "backslashreplace") for v in raw]
                if name == "id"
                else range(start, start + len(raw))
            )
        else:
            ids = _values(chunk, "id", start)
        bad = [row_id for row_id, value in zip(ids, raw) if value is not None and not _is_utf8(value)]
        raise PromptTableError(f"column '{name}' holds text that is not valid UTF-8 in rows with id {name_ids(bad)}.") from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def resolve_rows(
    chunk: pa.Table, start: int, defaults: GenerationDefaults, size_multiple: int
) -> tuple[list[Row], dict[int, tuple[int | str, tuple[str, str]]]]:
    """Resolve each row's parameters (its own value, else the run default) and validate them.

    Returns the valid rows, one per image (a row making `images` images gives that many Rows, image_index 0 up, each
    with its image_seed), and, for each invalid row position, its id and (column, problem).
    """
    n = chunk.num_rows
    columns = [c for c in COLUMNS if c.families is None or defaults.family in c.families]
    values = {c.name: _values(chunk, c.name, start) for c in columns if c.name in chunk.column_names}
    values.setdefault("id", list(range(start, start + n)))
    read = [values.get(c.name, [None] * n) for c in columns]
    rows: list[Row] = []
    invalid: dict[int, tuple[int | str, tuple[str, str]]] = {}
    for i, row_values in enumerate(zip(*read)):
        resolved = {}
        for column, value in zip(columns, row_values):
            if column.name in RESOLVERS:  # resolved against the run and the row (LoRA sets)
                resolved[column.name] = RESOLVERS[column.name](value, defaults, resolved, column.name in chunk.column_names)
                if resolved[column.name] is INVALID:
                    invalid[start + i] = (row_values[0], (column.name, column.rule.format(m=size_multiple)))
                    break
                continue
            if value is None and column.default is not None:
                resolved[column.name] = column.default(defaults, resolved)
                continue
            resolved[column.name] = column.check(value, size_multiple)
            if resolved[column.name] is None:
                invalid[start + i] = (row_values[0], (column.name, column.rule.format(m=size_multiple)))
                break
        else:
            rows += [
                Row(position=start + i, **{**resolved, "seed": image_seed(resolved["seed"], k)}, image_index=k)
                for k in range(resolved["images"])
            ]
    return rows, invalid


def describe_invalid(invalid: dict[int, tuple[int | str, tuple[str, str]]], url: str) -> str:
    """One paragraph naming, per column and problem, the ids of the rows that have it."""
    return f"prompt table {url} has invalid rows: " + _problems(invalid) + "."


def _problems(invalid: dict[int, tuple[int | str, tuple[str, str]]]) -> str:
    by_problem: dict[tuple[str, str], list] = defaultdict(list)
    for position, (row_id, problem) in invalid.items():
        by_problem[problem].append(position if problem[0] == "id" else row_id)  # a null id cannot name its row
    return "; ".join(
        f"column '{column}' {problem}, but is not in {len(named)} row(s) "
        + (f"at position {name_ids(named)}" if column == "id" else f"with id {name_ids(named)}")
        for (column, problem), named in by_problem.items()
    )


def resolve_defaults(
    info: ModelInfo,
    steps: int | None,
    guidance_scale: float | None,
    width: int | None,
    height: int | None,
    negative_prompt: str | None,
    seed: int,
    guidance_rescale: float = 0.0,
    clip_skip: int = 0,
    images: int = 1,
) -> GenerationDefaults:
    """The run's defaults: each option as given, else the model's own; errors name the option."""
    m = info.size_multiple
    checks = {
        "--steps": (info.default_steps if steps is None else steps, lambda v: whole_number(v, 1, MAX_STEPS)),
        "--guidance": (info.default_guidance if guidance_scale is None else guidance_scale, finite_number),
        "--width": (info.native_size if width is None else width, lambda v: image_side(v, m)),
        "--height": (info.native_size if height is None else height, lambda v: image_side(v, m)),
        "--seed": (seed, lambda v: whole_number(v, 0, MAX_SEED)),
        "--guidance-rescale": (guidance_rescale, unit_fraction),
        "--clip-skip": (clip_skip, lambda v: whole_number(v, 0, MAX_CLIP_SKIP)),
        "--images-per-prompt": (images, lambda v: whole_number(v, 1, MAX_IMAGES)),
    }
    values = {}
    for option, (value, check) in checks.items():
        values[option] = check(value)
        if values[option] is None:
            raise PromptTableError(f"{option} {value!r} is out of range: {OPTION_RULES[option].format(m=m)}.")
    return GenerationDefaults(
        steps=values["--steps"],
        guidance_scale=values["--guidance"],
        width=values["--width"],
        height=values["--height"],
        negative_prompt=info.default_negative_prompt if negative_prompt is None else negative_prompt,
        seed=values["--seed"],
        family=info.family,
        guidance_rescale=values["--guidance-rescale"],
        clip_skip=values["--clip-skip"],
        images=values["--images-per-prompt"],
    )


OPTION_RULES = {
    "--steps": f"a whole number from 1 to {MAX_STEPS}",
    "--guidance": "a finite number",
    "--width": f"a multiple of {{m}} up to {MAX_SIDE}",
    "--height": f"a multiple of {{m}} up to {MAX_SIDE}",
    "--seed": f"a whole number from 0 to {MAX_SEED}",
    "--guidance-rescale": "a number from 0 to 1",
    "--clip-skip": "a whole number from 0 (no layer skipped), below the text encoder's layer count",
    "--images-per-prompt": f"a whole number from 1 to {MAX_IMAGES} (for more images of one prompt, repeat its row under other ids)",
}


KEY_COLUMNS = tuple(c.name for c in COLUMNS if c.in_key)
OPTIONAL_KEY = tuple(c.neutral is None for c in COLUMNS if c.in_key)  # left out of the key where None
KEY_VALUES = tuple(c.key_value or (lambda v: v) for c in COLUMNS if c.in_key)
_KEY_JSON = json.JSONEncoder(ensure_ascii=False).encode  # exactly json.dumps(..., ensure_ascii=False), built once


def key_identity(identity: tuple[str, ...]) -> list[str]:
    """What follows a row's columns in its key: sampler, model fingerprint, and the image format's key where it
    has one (PNG's is "": its rows keep the keys they had before there were formats)."""
    scheduler, model_fingerprint, *image = identity
    return [scheduler, model_fingerprint] + [f for f in image if f]


def row_key(row: Row, scheduler: str, model_fingerprint: str, image_format: str = "") -> int:
    """A row's identity as a 64-bit integer: its columns that enter the key (COLUMNS; its seed is its image's), its
    image_index, the sampler, the model and how its image is stored (ImageFormat.key: "" for PNG).

    A committed row with the same key is the same image; changing any of these makes a new row. The number of
    images its table row makes is not part of it: raising it keeps the images made so far.
    """
    # A family's own columns are None for other families' rows: left out, their keys stay what they were.
    values = [key_value(getattr(row, name)) for name, key_value in zip(KEY_COLUMNS, KEY_VALUES)]
    identity = key_identity((scheduler, model_fingerprint, image_format))
    columns = [v for v, optional in zip(values, OPTIONAL_KEY) if not (optional and v is None)]
    payload = _KEY_JSON(columns + [row.image_index] + identity)
    return int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=8).digest(), "big")


class _NoRow(dict):
    """The row a default is asked about when it must not depend on the row: any look-up says so."""

    def __missing__(self, name):
        raise LookupError(name)


class _RowView:
    """One row's resolved values so far, for a default that depends on them (a derived seed, SDXL's sizes)."""

    def __init__(self, python: dict, i: int):
        self.python, self.i = python, i

    def __getitem__(self, name: str):
        return self.python[name](self.i)


_NEEDS_ESCAPE = r'[\x00-\x1f"\\]'  # what json.dumps(ensure_ascii=False) escapes in a string; the rest is as it is


def _arrow_column(chunk: pa.Table, name: str) -> pa.Array:
    column = chunk.column(name).combine_chunks()
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _json_strings(values: pa.Array) -> pa.Array:
    """Each string as JSON text, exactly as _KEY_JSON writes it (non-ASCII as it is); nulls stay null."""
    values = values.cast(pa.string())
    quoted = pc.binary_join_element_wise('"', values, '"', "")
    escape = pc.fill_null(pc.match_substring_regex(values, _NEEDS_ESCAPE), False)
    if not pc.any(escape).as_py():
        return quoted
    at = np.flatnonzero(escape.to_numpy(zero_copy_only=False))
    escaped = pa.array([_KEY_JSON(v) for v in values.take(pa.array(at)).to_pylist()], pa.string())
    return pc.replace_with_mask(quoted, escape, escaped)


def _lazy_list(values: pa.Array) -> Callable[[int], object]:
    """A column's value at a row as Python, converting the column only if asked (invalid rows, derived seeds)."""
    cache: list = []

    def at(i: int):
        if not cache:
            cache.append(values.to_pylist())
        return cache[0][i]

    return at


class _ColumnResolver:
    """A chunk's control columns resolved a column at a time, as resolve_rows does a row at a time.

    For each column of COLUMNS (the model family's), in order: which rows it makes invalid first, and each row's
    value as JSON text, its fragment of the row key. Columns with a `check_array` held as integers or text are
    checked over the whole array; other numbers through the column's own check once per distinct value; anything
    else (decimals, half floats, pairs) and defaults that depend on the row (derived seeds) row by row.
    tests/test_ingest.py holds it to resolve_rows and row_key, key for key and message for message.
    """

    def __init__(self, chunk: pa.Table, start: int, defaults: GenerationDefaults, size_multiple: int):
        self.chunk, self.start, self.defaults, self.m = chunk, start, defaults, size_multiple
        self.n = chunk.num_rows
        self.bad = np.zeros(self.n, dtype=bool)  # invalid at a column resolved so far
        self.first_bad: list[tuple[np.ndarray, Column]] = []  # (rows first invalid there, column), in column order
        self.python: dict[str, Callable[[int], object]] = {}  # a resolved column's value at a row, as Python
        self.fragments: dict[str, pa.Array] = {}  # JSON text of each resolved value; null where invalid

    def resolve(self, column: Column) -> None:
        name = column.name
        if name == "id" and name not in self.chunk.column_names:  # ids are positions
            self.python[name] = lambda i: self.start + i
            self.fragments[name] = pa.array(np.arange(self.start, self.start + self.n, dtype=np.int64)).cast(pa.string())
            return
        if column.name in RESOLVERS:
            self._resolve_per_row(column)
            return
        values = _arrow_column(self.chunk, name) if name in self.chunk.column_names else pa.nulls(self.n)
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        valid = np.ones(self.n, dtype=bool) if column.default is not None else ~nulls
        kind = values.type
        if pa.types.is_null(kind):
            fragments, python = pa.nulls(self.n, pa.string()), (lambda i: None)
        elif column.check_array is not None and _text_type(kind):
            valid &= nulls | column.check_array(values, self.m)
            fragments, python = _json_strings(values), _lazy_list(values)
        elif column.check_array is not None and pa.types.is_integer(kind):
            numbers = values.fill_null(0).to_numpy()
            valid &= nulls | column.check_array(numbers, self.m)
            fragments, python = values.cast(pa.string()), (lambda i: int(numbers[i]))
        elif pa.types.is_integer(kind) or pa.types.is_float32(kind) or pa.types.is_float64(kind):
            fragments, python = self._by_distinct_value(column, values, nulls, valid)
        else:
            fragments, python = self._by_row(column, nulls, valid)
        self.python[name] = python
        if nulls.any() and column.default is not None:
            fragments = self._defaults(column, fragments, nulls)
        newly = ~valid & ~self.bad
        if newly.any():
            self.first_bad.append((newly, column))
            self.bad |= newly
        self.fragments[name] = fragments

    def _resolve_per_row(self, column) -> None:
        """A column resolved against the run and the row (RESOLVERS), row by row, as resolve_rows does; its key
        fragment is null where Column.key_value leaves it out. Where the run uses no LoRA and the table has no such
        column, only the rows whose prompt holds a tag are looked at."""
        in_table = column.name in self.chunk.column_names
        raw = _values(self.chunk, column.name, self.start) if in_table else [None] * self.n
        rows = np.flatnonzero(~self.bad)
        if column.name == "loras" and self.defaults.loras is None and not in_table:
            prompts = _arrow_column(self.chunk, "prompt")
            if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
                tagged = pc.fill_null(pc.match_substring(prompts, "<lora:"), False).to_numpy(zero_copy_only=False)
            else:  # no text at all (a column of nulls, say): those rows are invalid already
                tagged = np.zeros(self.n, dtype=bool)
            rows = np.flatnonzero(~self.bad & tagged)
        resolved: dict[int, object] = {}
        newly = np.zeros(self.n, dtype=bool)
        for i in rows.tolist():
            view = _RowView(self.python, i)
            value = RESOLVERS[column.name](raw[i], self.defaults, view, in_table)
            if value is INVALID:
                newly[i] = True
            else:
                resolved[i] = value
        key_value = column.key_value or (lambda v: v)
        keyed = [None if i not in resolved else key_value(resolved[i]) for i in range(self.n)]
        self.python[column.name] = lambda i: resolved.get(i)
        self.fragments[column.name] = pa.array([None if k is None else _KEY_JSON(k) for k in keyed], pa.string())
        if newly.any():
            self.first_bad.append((newly, column))
            self.bad |= newly

    def _by_distinct_value(self, column, values, nulls, valid):
        """Numbers: the column's check and JSON text once per distinct value (by bit pattern: -0.0 is not 0.0)."""
        numbers = values.fill_null(0).to_numpy()
        distinct, inverse = np.unique(numbers.view(f"u{numbers.dtype.itemsize}"), return_inverse=True)
        resolved = [column.check(v, self.m) for v in distinct.view(numbers.dtype).tolist()]
        valid &= nulls | np.array([r is not None for r in resolved], dtype=bool)[inverse]
        fragments = pa.array([None if r is None else _KEY_JSON(r) for r in resolved], pa.string()).take(pa.array(inverse))
        return fragments, lambda i: resolved[inverse[i]]

    def _by_row(self, column, nulls, valid):
        """Anything else (decimals, half floats, pairs): the column's own check, row by row, as resolve_rows does."""
        raw = _values(self.chunk, column.name, self.start) if column.name in self.chunk.column_names else [None] * self.n
        resolved = [None if (v is None or self.bad[i]) else column.check(v, self.m) for i, v in enumerate(raw)]
        for i, (v, r) in enumerate(zip(raw, resolved)):
            if r is None and v is not None and not self.bad[i]:
                valid[i] = False
        fragments = pa.array([None if r is None else _KEY_JSON(r) for r in resolved], pa.string())
        return fragments, lambda i: resolved[i]

    def _defaults(self, column, fragments, nulls):
        """Nulls take the run's default: one value for all, or row by row where it depends on the row."""
        python, null_mask = self.python[column.name], pa.array(nulls)
        try:
            value = column.default(self.defaults, _NoRow())
        except LookupError:
            values = {i: column.default(self.defaults, _RowView(self.python, i)) for i in np.flatnonzero(nulls & ~self.bad).tolist()}
            text = [None] * self.n
            for i, v in values.items():
                text[i] = _KEY_JSON(v)
            self.python[column.name] = lambda i: values[i] if i in values else python(i)
            return pc.if_else(null_mask, pa.array(text, pa.string()), fragments)
        self.python[column.name] = lambda i: value if nulls[i] else python(i)
        return pc.if_else(null_mask, pa.scalar(_KEY_JSON(value)), fragments)

    def invalid(self, row_id: Callable[[int], object]) -> dict[int, tuple[int | str, tuple[str, str]]]:
        """Each invalid row's position: (its id, (the first column it fails, that column's rule)), in table order."""
        first = {}
        for rows, column in self.first_bad:
            for i in np.flatnonzero(rows).tolist():
                first[i] = column
        return {self.start + i: (row_id(i), (first[i].name, first[i].rule.format(m=self.m))) for i in sorted(first)}


def key_rows(
    chunk: pa.Table, start: int, defaults: GenerationDefaults, size_multiple: int, identity: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int | str, tuple[str, str]]]]:
    """resolve_rows and row_key over a whole chunk at once, without making Rows: what planning needs.

    Returns the positions (within the chunk) of the valid rows' images (a row's position once per image, in order),
    their keys (uint64, byte for byte row_key's), and the invalid rows as resolve_rows gives them.
    """
    columns = [c for c in COLUMNS if c.families is None or defaults.family in c.families]
    for c in columns:  # text that is not UTF-8: the error resolve_rows gives, for the first such column
        if c.name in chunk.column_names and (_text_type(chunk.column(c.name).type)):
            try:
                chunk.column(c.name).validate(full=True)
            except pa.ArrowInvalid:
                _values(chunk, c.name, start)
    resolver = _ColumnResolver(chunk, start, defaults, size_multiple)
    for c in columns:
        resolver.resolve(c)
    raw_ids = _lazy_list(_arrow_column(chunk, "id")) if "id" in chunk.column_names else (lambda i: start + i)
    invalid = resolver.invalid(raw_ids)
    valid = np.flatnonzero(~resolver.bad)
    counts = pc.cast(resolver.fragments["images"].take(pa.array(valid)), pa.int64()).to_numpy()
    keep = np.repeat(valid, counts)  # each valid row once per image
    image_index = (np.arange(len(keep)) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int32)
    seeds = None  # by position in the chunk: the rows' seeds, where a row makes more than one image
    if counts.max(initial=1) > 1:
        seeds = np.zeros(chunk.num_rows, np.uint64)
        seeds[valid] = pc.cast(resolver.fragments["seed"].take(pa.array(valid)), pa.uint64()).to_numpy()
    keys = np.empty(len(keep), np.uint64)
    for at in range(0, len(keep), SCAN_ROWS):  # a slice of images at a time: their key texts stay a chunk's worth
        rows, indexes = keep[at : at + SCAN_ROWS], image_index[at : at + SCAN_ROWS]
        parts = []
        for c, optional in zip((c for c in COLUMNS if c.in_key), OPTIONAL_KEY):
            if c.name == "seed" and seeds is not None:  # each image's own, image_seed in uint64 (no overflow)
                parts.append(pa.array((seeds[rows] + indexes.astype(np.uint64)) & np.uint64(MAX_SEED)).cast(pa.string()))
            elif c.name in resolver.fragments:
                parts.append(resolver.fragments[c.name].take(pa.array(rows)))
            elif not (optional and c.neutral is None):  # a family's column for other families: left out of the key
                parts.append(pa.scalar(_KEY_JSON(c.neutral)))
        parts.append(pa.array(indexes).cast(pa.string()) if seeds is not None else pa.scalar("0"))
        parts += [pa.scalar(_KEY_JSON(value)) for value in key_identity(identity)]
        # null_handling="skip": a null fragment (a column's value left out of this row's key, as row_key does) is no part
        joined = pc.binary_join_element_wise(*parts, ", ", null_handling="skip")
        keys[at : at + len(rows)] = _hashes(pc.binary_join_element_wise("[", joined, "]", ""))
    return keep, keys, invalid


def _hashes(payloads: pa.Array) -> np.ndarray:
    """Each payload's 64-bit blake2b, as row_key computes it."""
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(p, digest_size=8).digest() for p in payloads.cast(pa.binary()).to_pylist()])
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _text_type(dtype: pa.DataType) -> bool:
    dtype = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _resolved_chunks(pf, url, defaults, size_multiple, identity, chunk_rows, columns=None):
    """(start, chunk, valid rows, their keys as uint64, invalid) for each chunk of `columns` (default: all)."""
    for start, chunk in iter_row_chunks(pf, chunk_rows, columns=columns, url=url):
        try:
            rows, invalid = resolve_rows(chunk, start, defaults, size_multiple)
        except PromptTableError as e:
            raise PromptTableError(f"prompt table {url}: {e}") from None
        keys = np.fromiter((row_key(r, *identity) for r in rows), dtype=np.uint64, count=len(rows))
        yield start, chunk, rows, keys, invalid


def plan_prompt_table(
    url: str,
    defaults: GenerationDefaults,
    size_multiple: int,
    rows_per_shard: int,
    identity: tuple[str, ...] = ("", ""),
    done_keys: np.ndarray | None = None,
    first_shard: int = 0,
    skip_invalid: bool = False,
    storage_options: dict | None = None,
    dataset_schema: tuple[str, pa.Schema] | None = None,
) -> PromptPlan:
    """Validate every row of the table (control columns only, streamed) and plan the rows still to generate.

    `identity` is row_key's (scheduler, model fingerprint[, ImageFormat.key]), which with each row's values makes
    its key; a row makes one output row per image (its `images`), each with its own key, and those whose key is in
    `done_keys` (sorted uint64, from committed shards) are skipped. The rest are cut, in table order, into shards of
    `rows_per_shard` output rows numbered from `first_shard`. Raises PromptTableError naming the
    invalid rows, unless `skip_invalid`, where they are listed in the plan and left out. Duplicate ids are always an
    error.
    `dataset_schema` (committed_schema) is the schema of the output's shards, which the table must keep.
    """
    pf, version = _open_versioned(url, storage_options)
    carried = check_schema(pf.schema_arrow, url, defaults.family)
    if dataset_schema is not None:
        check_same_schema(pf.schema_arrow, url, dataset_schema)
    control = [c for c in COLUMN_NAMES if c in pf.schema_arrow.names]
    has_ids = "id" in control
    done = np.empty(0, np.uint64) if done_keys is None else _sorted(done_keys)
    invalid: dict[int, tuple[int | str, tuple[str, str]]] = {}
    hashes = np.empty(pf.metadata.num_rows if has_ids else 0, np.uint64)  # 8 bytes a row: a set of ids would not stay flat
    filled = remaining = already_done = 0
    current_done = np.zeros(len(done), dtype=bool)  # committed keys the table still produces
    digests = ShardDigests(rows_per_shard)
    for start, chunk in iter_row_chunks(pf, SCAN_ROWS, columns=control, url=url):
        try:
            _, keys, bad = key_rows(chunk, start, defaults, size_multiple, identity)
        except PromptTableError as e:
            raise PromptTableError(f"prompt table {url}: {e}") from None
        invalid.update(bad)
        found = _positions_in(done, keys)
        current_done[found[found >= 0]] = True
        already_done += int((found >= 0).sum())
        remaining += int((found < 0).sum())
        digests.add(keys[found < 0])
        if has_ids:
            chunk_hashes = _hash_ids(chunk.column("id"))
            hashes[filled : filled + len(chunk_hashes)] = chunk_hashes
            filled += len(chunk_hashes)
    if has_ids:
        hashes = hashes[:filled]
        hashes.sort()
        repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if len(repeated):  # rare: find the ids themselves, and rule out a hash collision
            suspects = set(repeated.tolist())
            counts = Counter(
                row_id
                for _, chunk in iter_row_chunks(pf, SCAN_ROWS, columns=["id"], url=url)
                for row_id, h in zip(chunk.column("id").drop_null().to_pylist(), _hash_ids(chunk.column("id")))
                if int(h) in suspects
            )
            duplicates = sorted((row_id for row_id, n in counts.items() if n > 1), key=str)
            if duplicates:
                raise PromptTableError(
                    f"prompt table {url} has duplicate ids: {name_ids(duplicates)}; each row's id must be unique."
                )
    # The carried columns are decoded too (and dropped), so that a damaged file fails here, before a weight is
    # loaded or a shard is written, not halfway through generation. In shard-sized batches, as generation reads
    # them: wide columns (embedded images, embeddings) cost no more memory here than there.
    if carried:
        for _ in _record_batches(pf, min(rows_per_shard, SCAN_ROWS), list(carried), url):
            pass
    if invalid and not skip_invalid:
        raise PromptTableError(describe_invalid(invalid, url) + " Fix them, or pass --skip-invalid to leave them out.")
    counts = [rows_per_shard] * (remaining // rows_per_shard) + ([remaining % rows_per_shard] if remaining % rows_per_shard else [])
    return PromptPlan(
        url=url,
        num_rows=pf.metadata.num_rows,
        rows_per_shard=rows_per_shard,
        carried_columns=carried,
        shards=tuple(Shard(first_shard + k, n, d) for k, (n, d) in enumerate(zip(counts, digests.finish(), strict=True))),
        invalid={pos: (row_id, f"{column} {problem}") for pos, (row_id, (column, problem)) in invalid.items()},
        identity=identity,
        version=version,
        done_keys=done,
        already_done=already_done,
        stale=int((~current_done).sum()),
    )


def shard_digest(keys: np.ndarray) -> str:
    """A shard's identity: a hash of its rows' keys, in order."""
    return hashlib.blake2b(np.ascontiguousarray(keys, dtype=np.uint64).tobytes(), digest_size=8).hexdigest()


class ShardDigests:
    """shard_digest of each run of `rows_per_shard` keys of a stream of keys, computed as they pass."""

    def __init__(self, rows_per_shard: int):
        self.rows_per_shard, self.digests, self.filled = rows_per_shard, [], 0
        self.hash = hashlib.blake2b(digest_size=8)

    def add(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        while len(keys):
            take = min(self.rows_per_shard - self.filled, len(keys))
            self.hash.update(keys[:take].tobytes())
            self.filled, keys = self.filled + take, keys[take:]
            if self.filled == self.rows_per_shard:
                self.digests.append(self.hash.hexdigest())
                self.hash, self.filled = hashlib.blake2b(digest_size=8), 0

    def finish(self) -> list[str]:
        return self.digests + ([self.hash.hexdigest()] if self.filled else [])


def _hash_ids(ids: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each non-null id (nulls are reported as invalid rows, not as duplicates)."""
    import pandas as pd

    values = ids.drop_null().to_numpy(zero_copy_only=False)
    return pd.util.hash_array(values.astype(object) if values.dtype.kind in "OUS" else values)


def _sorted(keys: np.ndarray) -> np.ndarray:
    """`keys` as a sorted uint64 array; no copy where they are sorted already (committed keys are)."""
    keys = np.asarray(keys, dtype=np.uint64)
    return keys if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()) else np.sort(keys)


def _positions_in(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each key, its index in `sorted_keys`, or -1 where absent."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1)
    # Looked up in sorted order: each search starts where the last ended, so a chunk's keys walk through the
    # committed keys once instead of jumping across 80 MB of them (at ten million rows, 3x faster).
    order = np.argsort(keys, kind="stable")
    at = np.empty(len(keys), dtype=np.intp)
    at[order] = np.searchsorted(sorted_keys, keys[order])
    at = at.clip(max=len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)


def iter_shard_rows(
    plan: PromptPlan, defaults: GenerationDefaults, size_multiple: int, storage_options: dict | None = None
) -> Iterator[tuple[Shard, list[Row], pa.Table, np.ndarray]]:
    """Stream the planned shards: each with its rows, their carried columns and their keys, in table order.

    Cuts the rows not yet done exactly as `plan_prompt_table` counted them, and stops (PromptTableError) where the
    table is not what was planned: another file version, rows that are now invalid, or other rows in a shard.
    """
    pf, version = _open_versioned(plan.url, storage_options)
    if plan.version and version != plan.version:
        was, now = json.loads(plan.version), json.loads(version)
        raise changed(plan.url, "its " + ", ".join(sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))) + " differ from when it was planned")
    shards = iter(plan.shards)
    # Per chunk: its rows to make (one per image), the chunk's carried columns, each row's offset into them, keys.
    # Carried values are copied only into a shard being cut, never per image for a whole chunk (wide columns).
    pending: list[tuple[list[Row], pa.Table, np.ndarray, np.ndarray]] = []
    buffered = 0

    def flush(n: int):
        nonlocal pending, buffered
        head, rest, left = [], [], n
        for rows, carried, offsets, keys in pending:
            take = min(left, len(rows))
            if take:
                head.append((rows[:take], _take(carried, offsets[:take]), keys[:take]))
            if take < len(rows):
                rest.append((rows[take:], carried, offsets[take:], keys[take:]))
            left -= take
        keys = np.concatenate([part[2] for part in head])
        shard = next(shards, None)
        if shard is None or (shard.keys_digest and shard_digest(keys) != shard.keys_digest):
            raise changed(plan.url, "it holds other rows than were planned" if shard else "it holds more rows than were planned")
        pending, buffered = rest, buffered - n
        return shard, [r for part in head for r in part[0]], pa.concat_tables([part[1] for part in head]), keys

    chunk_rows = min(plan.rows_per_shard, SCAN_ROWS)
    for start, chunk, rows, keys, bad in _resolved_chunks(pf, plan.url, defaults, size_multiple, plan.identity, chunk_rows):
        new_problems = {p: v for p, v in bad.items() if p not in plan.invalid}
        if new_problems:  # valid when planned: the file changed under its version's stamp
            raise changed(plan.url, "rows valid when planned are not now: " + _problems(new_problems))
        todo = _positions_in(plan.done_keys, keys) < 0
        rows = [r for r, t in zip(rows, todo) if t]
        if not rows:
            continue
        offsets = np.fromiter((r.position - start for r in rows), dtype=np.int64, count=len(rows))
        pending.append((rows, chunk.select(list(plan.carried_columns)), offsets, keys[todo]))
        buffered += len(rows)
        while buffered >= plan.rows_per_shard:
            yield flush(plan.rows_per_shard)
    if buffered:
        yield flush(buffered)
    if next(shards, None) is not None:
        raise changed(plan.url, "it holds fewer rows than were planned")


def _take(table: pa.Table, offsets: np.ndarray) -> pa.Table:
    """`table`'s rows at `offsets`: a slice, without a copy, where they are consecutive (every row of a chunk making
    one image, none done yet), else a copy."""
    if len(offsets) and offsets[-1] - offsets[0] == len(offsets) - 1 and bool((np.diff(offsets) == 1).all()):
        return table.slice(int(offsets[0]), len(offsets))
    return table.take(pa.array(offsets))


plan_prompt_table_task = task(plan_prompt_table, name="plan-prompt-table", cache_policy=NO_CACHE, persist_result=False)
