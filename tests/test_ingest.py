"""Prompt ingestion: schema checks, per-row resolution and validation, streaming, batching."""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nodes.errors import PromptTableError
from nodes.dataset.ingest import (
    iter_row_chunks,
    iter_shard_rows,
    key_rows,
    plan_prompt_table,
    resolve_defaults,
    resolve_rows,
    row_key,
)
from nodes.pipeline.components import inspect_model
from nodes.params import GenerationDefaults, Row, derive_seed
from nodes.pipeline.batch import make_batches
from tests.support.tables import write_table

DEFAULTS = GenerationDefaults(steps=20, guidance_scale=7.5, width=64, height=64, negative_prompt="", seed=42)


def plan(path, **kwargs):
    options = {"defaults": DEFAULTS, "size_multiple": 8, "rows_per_shard": 4} | kwargs
    return plan_prompt_table(str(path), **options)


def all_rows(p, defaults=DEFAULTS):
    return [row for _, rows, _, _ in iter_shard_rows(p, defaults, 8) for row in rows]


def test_missing_prompt_column_names_the_columns_found(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"text": "a cat", "seed": 1}])
    with pytest.raises(PromptTableError, match=r"no 'prompt' column.*text, seed"):
        plan(path)


def test_wrong_column_type_names_column_and_type(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"prompt": "a cat", "steps": "twenty"}])
    with pytest.raises(PromptTableError, match=r"column 'steps'.*type string.*integer"):
        plan(path)


def test_not_parquet_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "prompts.csv"
    bad.write_text("prompt\na cat\n")
    with pytest.raises(PromptTableError, match=r"prompts\.csv is not a Parquet file"):
        plan(bad)
    with pytest.raises(PromptTableError, match=r"nope\.parquet does not exist"):
        plan(tmp_path / "nope.parquet")


def test_column_named_like_an_output_column_is_refused(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"prompt": "a cat", "image": "x.png"}])
    with pytest.raises(PromptTableError, match=r"image.*sdflow writes itself"):
        plan(path)


def test_null_and_empty_prompts_name_the_row_ids(tmp_path):
    rows = [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": None}, {"id": "c", "prompt": "  "}]
    path = write_table(tmp_path / "t.parquet", rows)
    with pytest.raises(PromptTableError, match=r"'prompt'.*2 row\(s\) with id 'b', 'c'.*--skip-invalid"):
        plan(path)


def test_skip_invalid_records_rows_and_keeps_the_rest(tmp_path):
    rows = [{"prompt": "ok", "steps": 3}, {"prompt": None, "steps": 3}, {"prompt": "ok", "steps": 0}]
    p = plan(write_table(tmp_path / "t.parquet", rows), skip_invalid=True)
    assert p.invalid == {1: (1, "prompt must be a non-empty string (not only spaces, invisible or control characters)"), 2: (2, "steps must be a whole number from 1 to 1000")}
    assert p.rows_to_generate == 1
    assert [r.position for r in all_rows(p)] == [0]


@pytest.mark.parametrize(
    "column, value",
    [
        ("seed", -1),
        ("seed", 1.5),
        ("steps", 0),
        ("steps", 5000),
        ("guidance_scale", float("nan")),
        ("width", 100),
        ("height", 100_000),
    ],
)
def test_out_of_range_values_name_column_and_row(tmp_path, column, value):
    path = write_table(tmp_path / "t.parquet", [{"id": 7, "prompt": "a cat", column: value}])
    with pytest.raises(PromptTableError, match=rf"column '{column}'.*id 7"):
        plan(path)


def test_duplicate_ids_are_named(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"id": i % 3, "prompt": "x"} for i in range(5)])
    with pytest.raises(PromptTableError, match=r"duplicate ids: 0, 1"):
        plan(path)


def test_row_values_override_defaults_and_nulls_take_them(tmp_path):
    rows = [
        {"id": "r1", "prompt": "a", "negative_prompt": "blurry", "seed": 5, "steps": 3, "guidance_scale": 1.0, "width": 32, "height": 48},
        {"id": "r2", "prompt": "b", "negative_prompt": None, "seed": None, "steps": None, "guidance_scale": None, "width": None, "height": None},
    ]
    r1, r2 = all_rows(plan(write_table(tmp_path / "t.parquet", rows)))
    assert r1 == Row(0, "r1", "a", "blurry", 5, 3, 1.0, 32, 48)
    assert r2 == Row(1, "r2", "b", "", derive_seed(42, "r2"), 20, 7.5, 64, 64)


def test_derived_seeds_depend_on_run_seed_and_id_only():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert len({derive_seed(0, 5), derive_seed(1, 5), derive_seed(0, 6), derive_seed(0, "5")}) == 4
    assert all(0 <= derive_seed(s, i) < 2**63 for s in range(3) for i in range(100))


def test_ids_default_to_positions_and_columns_are_carried(tmp_path):
    rows = [{"prompt": f"p{i}", "meta": i * 10, "tags": ["x"] * i} for i in range(10)]
    p = plan(write_table(tmp_path / "t.parquet", rows))
    assert p.carried_columns == ("meta", "tags")
    shards = list(iter_shard_rows(p, DEFAULTS, 8))
    assert [(s.index, s.rows, len(rows)) for s, rows, _, _ in shards] == [(0, 4, 4), (1, 4, 4), (2, 2, 2)]
    ids = [r.id for _, rows, _, _ in shards for r in rows]
    assert ids == list(range(10))
    assert [v for _, _, carried, _ in shards for v in carried.column("meta").to_pylist()] == [i * 10 for i in range(10)]


def test_streaming_chunks_are_exact_across_row_groups(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"prompt": str(i)} for i in range(103)], row_group_size=10)
    chunks = list(iter_row_chunks(pq.ParquetFile(path), 25))
    assert [(start, t.num_rows) for start, t in chunks] == [(0, 25), (25, 25), (50, 25), (75, 25), (100, 3)]
    assert pa.concat_tables([t for _, t in chunks]).column("prompt").to_pylist() == [str(i) for i in range(103)]


def test_batches_share_size_and_steps_and_respect_batch_size():
    rows = [Row(i, i, "p", "", i, 20 if i % 3 else 10, 7.5, 64, 64 if i % 2 else 32) for i in range(20)]
    batches = make_batches(rows, 3)
    assert sorted(r.position for b in batches for r in b) == list(range(20))
    for batch in batches:
        assert len(batch) <= 3
        assert len({r.shape_key for r in batch}) == 1


def test_defaults_come_from_the_model_and_options_are_checked(tiny_model):
    info = inspect_model(tiny_model)
    defaults = resolve_defaults(info, None, None, None, None, None, 0)
    assert (defaults.steps, defaults.guidance_scale, defaults.width, defaults.height) == (4, 7.5, 64, 64)
    assert resolve_defaults(info, 9, 3.0, 32, 96, "ugly", 1).width == 32
    with pytest.raises(PromptTableError, match=r"--width 60 is out of range: a multiple of 8"):
        resolve_defaults(info, None, None, 60, None, None, 0)


def test_done_rows_are_skipped_and_the_rest_cut_into_new_shards(tmp_path):
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(10)]
    path = write_table(tmp_path / "t.parquet", rows)
    first = plan(path, identity=("euler", "m1"))
    keys = np.concatenate([k for _, _, _, k in iter_shard_rows(first, DEFAULTS, 8)])
    assert len(set(keys.tolist())) == 10
    done = keys[[0, 1, 2, 5, 9]]
    again = plan(path, identity=("euler", "m1"), done_keys=done, first_shard=7)
    assert (again.already_done, again.stale, again.rows_to_generate) == (5, 0, 5)
    shards = list(iter_shard_rows(again, DEFAULTS, 8))
    assert [(s.index, [r.id for r in rs]) for s, rs, _, _ in shards] == [(7, [3, 4, 6, 7]), (8, [8])]
    # Another scheduler or model makes other rows: nothing is done, and the old keys are stale.
    other = plan(path, identity=("ddim", "m1"), done_keys=done)
    assert (other.already_done, other.stale, other.rows_to_generate) == (0, 5, 10)


def test_row_key_covers_every_generation_parameter():
    base = Row(0, "a", "p", "n", 1, 20, 7.5, 64, 64)
    variants = [
        Row(0, "b", "p", "n", 1, 20, 7.5, 64, 64),
        Row(0, "a", "q", "n", 1, 20, 7.5, 64, 64),
        Row(0, "a", "p", "m", 1, 20, 7.5, 64, 64),
        Row(0, "a", "p", "n", 2, 20, 7.5, 64, 64),
        Row(0, "a", "p", "n", 1, 21, 7.5, 64, 64),
        Row(0, "a", "p", "n", 1, 20, 7.0, 64, 64),
        Row(0, "a", "p", "n", 1, 20, 7.5, 72, 64),
        Row(0, "a", "p", "n", 1, 20, 7.5, 64, 72),
    ]
    keys = {row_key(r, "euler", "m") for r in variants} | {row_key(base, "ddim", "m"), row_key(base, "euler", "m2")}
    assert row_key(base, "euler", "m") not in keys and len(keys) == 10
    assert row_key(Row(5, "a", "p", "n", 1, 20, 7.5, 64, 64), "euler", "m") == row_key(base, "euler", "m")


def test_a_large_row_group_is_read_in_pieces_not_whole(tmp_path, monkeypatch):
    """Peak memory follows the batches, not the row group: no read of a column chunk at once (see README)."""
    import fsspec


    rng = np.random.default_rng(0)
    n = 12_000  # one row group, a 12 MB carried column of 1 KB values
    table = pa.table({"id": np.arange(n), "prompt": ["a cat"] * n, "blob": [rng.bytes(1000) for _ in range(n)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=n)
    reads: list[int] = []
    url_to_fs = fsspec.core.url_to_fs

    class Recorded:
        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            data = self.f.read(size)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    class RecordingFS:
        def __init__(self, fs):
            self.fs = fs

        def open(self, *args, **kwargs):
            return Recorded(self.fs.open(*args, **kwargs))

        def __getattr__(self, name):
            return getattr(self.fs, name)

    def recording(url, **options):
        fs, p = url_to_fs(url, **options)
        return RecordingFS(fs), p

    monkeypatch.setattr(fsspec.core, "url_to_fs", recording)
    p = plan(path, rows_per_shard=1000)
    assert sum(len(rows) for _, rows, _, _ in iter_shard_rows(p, DEFAULTS, 8)) == n
    assert sum(reads) > 2 * 12_000_000 and max(reads) < 12_000_000 // 2  # read twice, never a column chunk whole


# ------------------------------------------------------------ planning a chunk at once, exactly as row by row

def _old_path(chunk, start, defaults, identity):
    rows, invalid = resolve_rows(chunk, start, defaults, 8)
    return [r.position - start for r in rows], [row_key(r, *identity) for r in rows], invalid


def _new_path(chunk, start, defaults, identity):
    keep, keys, invalid = key_rows(chunk, start, defaults, 8, identity)
    return keep.tolist(), keys.tolist(), invalid


def _tiled(values: list, n: int = 210, dtype=None) -> pa.Array:
    return pa.array([values[i % len(values)] for i in range(n)], dtype)


# Every kind of value a control column may hold, valid and not, nulls defaulted; lists of coprime lengths, so
# that the rows mix them (most rows valid, each invalid value beside valid ones).
VARIED = {
    "id": pa.array([f"{v}{i}" for i, v in enumerate(["a", "é\u2028", 'q"uote', "back\\slash", "tab\tnl\n\x01\x7f", "🎉", "", "x"] * 27)][:209] + [None]),
    "prompt": _tiled(["a cat", "  ", "猫の絵", '"x"\n', "é", "a\u0085b", "ok\\", "\u200b", "b", "c", "d", None, "\x00"]),
    "negative_prompt": _tiled([None, "", "blurry", "\t", "ü", "x\\y", '"', "\u2029", "🎉"]),
    "seed": _tiled([None, 0, 2**63 - 1, 5, None, 7, 8, None, 10, 11, -1], dtype=pa.int64()),
    "steps": _tiled([20, None, 1000, 3, None, 4, 5, 6, 1, 2, 7, 8, 9, 10, 1001, 0, 11], dtype=pa.int32()),
    "guidance_scale": _tiled([7.5, -0.0, 0.0, None, 1e16, 1e-05, 3.0, 0.1 + 0.2, 1.0, 2.0, 1e300, 5e-324, -2.5, 100.0, 7.0, 6.0, 5.0, 4.0, float("nan"), float("inf")]),
    "width": _tiled([64, None, 72, 8, 4096, 128, 256, 512, 1024, 2048, 16, 24, 32, 40, 48, 56, 80, 88, 96, 63, 0, 4104, -8], dtype=pa.int16()),
    "height": _tiled([None, 64, 8, 16, 24, 32, 40, 48, 56, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152, 160, 168, 176, 184, 192, 200, 208, 216, -8], dtype=pa.int64()),
    "guidance_rescale": _tiled([None, 0.0, 1.0, 0.7, None, -0.0, 0.25, 0.5, 0.125, 0.333, 0.9, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 0.95, 0.99, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.11, 0.12, 1.5]),
    "clip_skip": _tiled([None, 0, 1, 2, 11, -1, 101], dtype=pa.int32()),
}


@pytest.mark.parametrize(
    "columns",
    [
        VARIED,
        {k: v for k, v in VARIED.items() if k not in ("id", "seed")},  # ids are positions, seeds derived
        {**VARIED, "id": pa.array(list(range(100, 310)), pa.uint64()), "seed": pa.nulls(210, pa.int64())},
        {**VARIED, "id": VARIED["id"].dictionary_encode(), "prompt": VARIED["prompt"].cast(pa.large_string())},
        {  # numbers of other types: floats for whole numbers, integers for floats, decimals, half floats, nulls only
            "prompt": pa.array(["p"] * 6),
            "seed": pa.array([1.0, 2.5, None, -0.0, 2.0**62, float("nan")]),
            "steps": pa.array([20.0, 20.5, None, 3.0, 1e3, 1e4], pa.float32()),
            "guidance_scale": pa.array([1, 0, None, -3, 7, 2**40], pa.int64()),
            "width": pa.array([decimal.Decimal("64"), decimal.Decimal("64.5"), None, decimal.Decimal("8.0"), decimal.Decimal("72"), decimal.Decimal("-8")], pa.decimal128(5, 1)),
            "height": pa.array([64, 8, None, 16, 1, 2], pa.float16()),
            "guidance_rescale": pa.nulls(6),
            "negative_prompt": pa.nulls(6),
        },
    ],
    ids=["varied", "positions-derived-seeds", "integer-ids", "dictionary-large-string", "other-number-types"],
)
@pytest.mark.parametrize("start", [0, 65_536])
def test_chunk_keys_are_row_keys_byte_for_byte(columns, start):
    """key_rows (planning) gives exactly resolve_rows and row_key's valid rows, keys and invalid rows."""
    chunk = pa.table(columns)
    for identity in [("euler", "fp"), ("dpm++ \"2m\"", "é"), ("euler", "fp", "webp:lossless"), ("euler", "fp", "")]:
        new = _new_path(chunk, start, DEFAULTS, identity)
        old = _old_path(chunk, start, DEFAULTS, identity)
        assert new[0] == old[0] and new[2] == old[2]
        assert new[1] == old[1]
    assert len(old[0]) >= 3 and len(old[2]) >= 1  # both valid and invalid rows were compared


def test_chunk_keys_of_an_sdxl_table_with_pairs_are_row_keys():
    sdxl = GenerationDefaults(steps=20, guidance_scale=5.0, width=1024, height=1024, negative_prompt="", seed=1, family="sdxl")
    chunk = pa.table({
        "id": [1, 2, 3, 4],
        "prompt": ["a", "b", "c", "d"],
        "width": pa.array([512, None, 64, 8], pa.int64()),
        "original_size": pa.array([[512, 512], None, [1, 2, 3], [0, 65536]], pa.list_(pa.int64())),
        "crops_coords_top_left": pa.array([None, [0, 1], [2, 2], None], pa.list_(pa.int32())),
    })
    assert _new_path(chunk, 0, sdxl, ("euler", "fp")) == _old_path(chunk, 0, sdxl, ("euler", "fp"))


def test_chunk_keys_refuse_text_that_is_not_utf8_as_rows_do():
    chunk = pa.table({"id": pa.array([b"a", b"\xff"], pa.binary()).cast(pa.string(), safe=False), "prompt": ["x", "y"]})
    with pytest.raises(PromptTableError) as old:
        _old_path(chunk, 0, DEFAULTS, ("e", "f"))
    with pytest.raises(PromptTableError) as new:
        _new_path(chunk, 0, DEFAULTS, ("e", "f"))
    assert str(new.value) == str(old.value)
