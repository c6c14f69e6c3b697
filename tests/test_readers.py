"""What readers make of a dataset: `datasets`, pandas and pyarrow load every carried Arrow type, A1111-format readers
recover each row's own prompts from the PNG infotext, and a run that would mix shard schemas is refused."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main
from nodes.dataset.store import infotext
from nodes.params import Row

STEPS = ["--steps", "1"]

# Prompts that try to forge the infotext's other parts, and text that must come back as it was.
HOSTILE_PROMPTS = [
    ("a red circle\nNegative prompt: x", ""),
    ("a blue square\nSteps: 99, Sampler: y, CFG scale: 1, Seed: 5", "blurry\nSteps: 99, Sampler: y, Seed: 1"),
    ("Negative prompt: starts like one", "  padded negative  "),
    ('"quoted", with: colons', '"a JSON string"'),
    ("猫 🐱 \u2028line separator\r\ncarriage return\x85next line", "\ufeff neg \u00a0"),
    (" leading and trailing spaces ", "Negative prompt: twice"),
]


def carried_columns(n: int) -> dict[str, pa.Array]:
    """One column of each Arrow type a prompt table (Parquet written by pyarrow or pandas) can carry."""
    def cycle(values):
        return [values[i % len(values)] for i in range(n)]

    return {
        "day": pa.array(cycle([dt.date(2026, 1, 2), None]), pa.date32()),
        "day64": pa.array(cycle([dt.date(2026, 1, 2), None]), pa.date64()),
        "when": pa.array(cycle([dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc), None]), pa.timestamp("us", tz="Europe/Paris")),
        "naive": pa.array(cycle([dt.datetime(2026, 1, 1, 12), None]), pa.timestamp("ns")),
        "price": pa.array(cycle([decimal.Decimal("12.34"), None]), pa.decimal128(10, 2)),
        "category": pa.array(cycle(["cat", "dog", None])).dictionary_encode(),  # a pandas categorical
        "flag": pa.array(cycle([True, None, False])),
        "small": pa.array(cycle([-128, 127]), pa.int8()),
        "big": pa.array(cycle([2**64 - 1, 0]), pa.uint64()),
        "half": pa.array(cycle([np.float16(1.5), None]), pa.float16()),
        "ints": pa.array(cycle([[1, 2], [], None]), pa.list_(pa.int64())),
        "meta": pa.array(cycle([{"k": 1, "v": "a"}, None]), pa.struct([("k", pa.int32()), ("v", pa.string())])),
        "text": pa.array(cycle(["long text", None]), pa.large_string()),
        "blob": pa.array(cycle([b"\x00\xff", None]), pa.binary()),
        "nothing": pa.nulls(n),
        "pair": pa.array(cycle([[1, 2], [3, 4]]), pa.list_(pa.int32(), 2)),
        "span": pa.array(cycle([5, None]), pa.duration("s")),
        "tags": pa.array(cycle([["x"], []])).cast(pa.list_(pa.dictionary(pa.int32(), pa.string()))),
        "attrs": pa.array(cycle([[("a", 1)], []]), pa.map_(pa.string(), pa.int64())),
    }


def run(capsys, table: Path, out: Path, model: str, *args: str) -> tuple[int, str]:
    code = main(["generate", str(table), str(out), "--model", model, *STEPS, *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def carried_run(prefect_api, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    n = len(HOSTILE_PROMPTS)
    columns = {
        "id": pa.array([f"r{i}" for i in range(n)]),
        "prompt": pa.array([p for p, _ in HOSTILE_PROMPTS]),
        "negative_prompt": pa.array([q for _, q in HOSTILE_PROMPTS]),
        **carried_columns(n),
    }
    path = root / "prompts.parquet"
    pq.write_table(pa.table(columns), path)
    code = main(["generate", str(path), str(root / "out"), "--model", tiny_model, *STEPS, "--shard-size", "4"])
    assert code == 0
    return path, root / "out"


def test_every_carried_type_loads_in_datasets_with_its_image(carried_run, tmp_path):
    from datasets import Features, load_dataset

    path, out = carried_run
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path))
    want = pq.read_table(path)
    assert len(ds) == want.num_rows
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (64, 64)
    # The features sdflow declares are the ones `datasets` derives from the Arrow types themselves.
    declared = Features.from_dict(json.loads(pq.read_schema(next((out / "data").iterdir())).metadata[b"huggingface"])["info"]["features"])
    for name in carried_columns(1):
        assert ds.features[name] == declared[name], name
    for got, expected in zip(ds, want.to_pylist()):
        for name, value in expected.items():
            if name == "attrs":  # a map has no `datasets` feature: it is written as its list of key-value structs
                value = None if value is None else [{"key": k, "value": v} for k, v in value]
            assert got[name] == value, (name, got[name], value)


def test_pandas_and_pyarrow_read_every_carried_column(carried_run):
    import pandas as pd

    path, out = carried_run
    frame = pd.read_parquet(out / "data")
    table = pq.read_table(out / "data")
    for name in carried_columns(1):
        assert name in frame.columns and name in table.column_names, name
    assert sorted(frame["id"]) == sorted(pq.read_table(path).column("id").to_pylist())


# ---------------------------------------------------------------- infotext


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_a1111(x: str) -> dict:
    """AUTOMATIC1111's parse_generation_parameters (modules/infotext_utils.py), its prompt and key-value logic,
    plus sdflow's documented rule: a prompt or negative prompt written as a JSON string is unquoted."""
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result = {"Prompt": _unquote(prompt), "Negative prompt": _unquote(negative)}
    for k, v in _PARAM.findall(lastline):
        result[k] = _unquote(v)
    return result


@pytest.mark.parametrize("prompt, negative", HOSTILE_PROMPTS + [("a plain prompt", "plain negative")])
def test_an_a1111_reader_recovers_each_rows_own_prompts(prompt, negative):
    row = Row(0, "x", prompt, negative, 7, 20, 7.5, 64, 64)
    parsed = parse_a1111(infotext(row, "euler_a", "models/m,1\nSteps: 5", "1.0"))
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (prompt, negative)
    assert (parsed["Steps"], parsed["Sampler"], parsed["Seed"], parsed["Model"]) == ("20", "Euler a", "7", "models/m,1\nSteps: 5")
    # Every line break a reader may split on is escaped: the settings line is the text's last line.
    assert len(infotext(row, "euler_a", "m", "1.0").splitlines()) == 2 + bool(negative)


def test_plain_prompts_are_written_as_a1111_writes_them():
    row = Row(0, "x", "a red circle, (blue:1.2)", "blurry", 7, 20, 7.5, 64, 64)
    assert infotext(row, "euler", "m", "1.0").split("\n")[:2] == ["a red circle, (blue:1.2)", "Negative prompt: blurry"]


def test_pngs_of_a_run_give_back_each_rows_own_prompts(carried_run):
    _, out = carried_run
    table = pq.read_table(out / "data", columns=["prompt", "negative_prompt", "image", "steps"])
    for row in table.to_pylist():
        parsed = parse_a1111(Image.open(io.BytesIO(row["image"]["bytes"])).text["parameters"])
        assert (parsed["Prompt"], parsed["Negative prompt"]) == (row["prompt"], row["negative_prompt"])
        assert parsed["Steps"] == str(row["steps"]) == "1"


# ---------------------------------------------------------------- incremental runs with another schema


def _table(ids, **carried) -> pa.Table:
    return pa.table({"id": ids, "prompt": [f"a red circle number {i}" for i in range(len(ids))], **carried})


@pytest.mark.parametrize(
    "first, second, phrases",
    [
        (
            _table([1, 2], note=pa.array(["a", "b"])),
            _table([3, 4], note=pa.array([1, 2])),
            ["'note'", "int64", "string"],
        ),
        (
            _table([1, 2], note=pa.array(["a", "b"])),
            _table([3, 4], note=pa.array(["a", "b"]), extra=pa.array([1.0, 2.0])),
            ["'extra'", "double", "not in the dataset"],
        ),
        (
            _table([1, 2], note=pa.array(["a", "b"])),
            _table([3, 4]),
            ["'note'", "string", "not in the table"],
        ),
        (_table([1, 2]), _table(["x", "y"]), ["'id'", "string", "int64"]),
    ],
    ids=["type-changed", "column-added", "column-removed", "id-type-changed"],
)
def test_a_run_with_another_schema_is_refused_before_the_model_loads(
    prefect_api, tiny_model, tmp_path, capsys, monkeypatch, first, second, phrases
):
    out = tmp_path / "out"
    pq.write_table(first, tmp_path / "first.parquet")
    assert run(capsys, tmp_path / "first.parquet", out, tiny_model)[0] == 0
    before = sorted(p.name for p in (out / "data").iterdir())

    import flows.generate

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(flows.generate, "load_components_task", no_model)
    pq.write_table(second, tmp_path / "second.parquet")
    code, err = run(capsys, tmp_path / "second.parquet", out, tiny_model)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("sdflow: error: ")
    text = " ".join(err.split())
    for phrase in [str(tmp_path / "second.parquet"), "data/part-00000-", *phrases]:  # the shard's file, named
        assert phrase in text, text
    assert sorted(p.name for p in (out / "data").iterdir()) == before


def test_a_rerun_with_the_same_schema_extends_the_dataset(prefect_api, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    day = pa.array([dt.date(2026, 1, 1), None], pa.date32())
    pq.write_table(_table([1, 2], day=day), tmp_path / "p.parquet")
    assert run(capsys, tmp_path / "p.parquet", out, tiny_model)[0] == 0
    pq.write_table(pa.concat_tables([_table([1, 2], day=day), _table([3, 4], day=day)]), tmp_path / "p.parquet")
    code, err = run(capsys, tmp_path / "p.parquet", out, tiny_model)
    assert code == 0, err
    assert pq.read_table(out / "data").num_rows == 4
