"""Prompt tables for tests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

TEST_STEPS = 4  # the tiny model's default steps in tests: enough for every scheduler's multistep logic


def write_table(path, rows: list[dict], schema: pa.Schema | None = None, row_group_size: int | None = None) -> str:
    """Write rows to a Parquet prompt table; returns its path as a string."""
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)
