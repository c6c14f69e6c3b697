"""A prompt table replaced or rewritten between planning and generation: the run stops, naming the file, and
commits nothing from the changed file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.shards
from flows.cli import main
from nodes.dataset import ingest
from nodes.dataset.ingest import iter_shard_rows, plan_prompt_table
from nodes.errors import PromptTableError
from nodes.params import GenerationDefaults
from tests.support.runs import assert_clean_failure

DEFAULTS = GenerationDefaults(steps=1, guidance_scale=7.5, width=64, height=64, negative_prompt="", seed=0)
ORIGINAL = pa.table({"id": [1, 2, 3, 4], "prompt": ["a red circle", "a blue square", "a green star", "a cat"]})

# What a table may become between the passes, each checked at planning and committed without a check before.
CHANGES = {
    "duplicate-ids": pa.table({"id": [1, 1, 3, 4], "prompt": ["a red circle", "a blue square", "a green star", "a cat"]}),
    "invalid-value": ORIGINAL.append_column("steps", pa.array([1, 0, 1, 1])),
    "blank-prompt": pa.table({"id": [1, 2, 3, 4], "prompt": ["a red circle", "  ", "a green star", "a cat"]}),
    "more-rows": pa.concat_tables([ORIGINAL, pa.table({"id": [5], "prompt": ["a dog"]})]),
    "fewer-rows": ORIGINAL.slice(0, 3),
    "last-shard-gone": ORIGINAL.slice(0, 2),
}


def rewrite_after_planning(monkeypatch, path: Path, new: pa.Table) -> None:
    """Replace the table at the start of generation's pass, after planning read it, as another process would."""
    def replaced_then_read(plan, *args, **kwargs):
        pq.write_table(new, path)
        return iter_shard_rows(plan, *args, **kwargs)

    monkeypatch.setattr(flows.shards, "iter_shard_rows", replaced_then_read)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_table_replaced_during_the_run_stops_it_naming_the_file(prefect_api, tiny_model, tmp_path, capsys, monkeypatch, change):
    path = tmp_path / "prompts.parquet"
    pq.write_table(ORIGINAL, path)
    rewrite_after_planning(monkeypatch, path, CHANGES[change])
    out = tmp_path / "out"
    code = main(["generate", str(path), str(out), "--model", tiny_model, "--steps", "1", "--shard-size", "2"])
    assert_clean_failure(code, capsys.readouterr().err, out, f"prompt table {path} changed during the run", "run again")


def plan(path: Path):
    return plan_prompt_table(str(path), DEFAULTS, 8, 2)


@pytest.fixture
def unversioned(monkeypatch):
    """A store whose files have no version stamp (and a footer that hides the change): only the rows tell."""
    opened = getattr(ingest, "_open_versioned", None)  # absent before versions were pinned: nothing to hide
    if opened:
        monkeypatch.setattr(ingest, "_open_versioned", lambda url, options: (opened(url, options)[0], ""))


@pytest.mark.parametrize(
    "change, how",
    [
        ("duplicate-ids", "it holds other rows than were planned"),
        ("invalid-value", "rows valid when planned are not now: column 'steps' must be a whole number from 1 to 1000, but is not in 1 row(s) with id 2"),
        ("blank-prompt", "rows valid when planned are not now: column 'prompt'"),
        ("more-rows", "it holds more rows than were planned"),
        ("fewer-rows", "it holds other rows than were planned"),
        ("last-shard-gone", "it holds fewer rows than were planned"),
    ],
)
def test_rows_read_again_are_checked_against_the_plan(tmp_path, unversioned, change, how):
    path = tmp_path / "prompts.parquet"
    pq.write_table(ORIGINAL, path)
    p = plan(path)
    pq.write_table(CHANGES[change], path)
    with pytest.raises(PromptTableError) as raised:
        list(iter_shard_rows(p, DEFAULTS, 8))
    assert f"prompt table {path} changed during the run: {how}" in str(raised.value)


def test_a_table_whose_carried_columns_changed_is_refused_by_its_version(tmp_path):
    path = tmp_path / "prompts.parquet"
    pq.write_table(ORIGINAL, path)
    p = plan(path)
    assert [s.rows for s, _, _, _ in iter_shard_rows(p, DEFAULTS, 8)] == [2, 2]
    pq.write_table(ORIGINAL.append_column("note", pa.array(["w", "x", "y", "z"])), path)  # carried data only
    with pytest.raises(PromptTableError, match=r"changed during the run: its .*footer.* differ from when it was planned"):
        list(iter_shard_rows(p, DEFAULTS, 8))
