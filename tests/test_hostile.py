"""Hostile prompt tables through the real `sdflow generate` command, in process: each input with its outcome.

Every refused table must give exit code 2, one paragraph on stderr (no traceback) that names what is wrong
(the column and the row ids, or the file when it cannot be read), and no dataset at all. Accepted oddities
(over-long prompts, any Unicode) must come out whole.
"""

from __future__ import annotations

import decimal
import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tests.support.runs import assert_clean_failure

STEPS = ["--steps", "1"]  # one denoising step: the table is what is under test, not the images
BASE = {"id": [1, 2, 3], "prompt": ["a red circle", "a blue square", "a green star"]}


def run(capsys, table, out: Path, model: str, *args: str) -> tuple[int, str]:
    code = main(["generate", str(table), str(out), "--model", model, *STEPS, *args])
    return code, capsys.readouterr().err


def table(**columns) -> pa.Table:
    """BASE (ids 1, 2, 3) with `columns` added or replacing; a value given as (values, type) gets that Arrow type."""
    merged = {**BASE, **columns}
    return pa.table({k: pa.array(v[0], v[1]) if isinstance(v, tuple) else pa.array(v) for k, v in merged.items()})


def written(tmp_path: Path, t: pa.Table, **options) -> Path:
    path = tmp_path / "t.parquet"
    pq.write_table(t, path, **options)
    return path


def invalid_utf8_strings() -> pa.Array:
    """A string array whose second value is not UTF-8, as a careless writer can store it (Arrow checks nothing here)."""
    data = b"a red circle" + b"a \xff\xfe square"
    offsets = pa.array([0, 12, len(data)], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])


# ---------------------------------------------------------------- damaged files

CORRUPT_ROWS = {
    "id": list(range(4)),
    "prompt": [f"a red circle on a blue square, number {i}" for i in range(4)],
    "caption": [f"carried text {i} " * 40 for i in range(4)],
}


def damaged(tmp_path: Path, how: str) -> Path:
    """A real Parquet file (id, prompt, caption; plain encoding, snappy) with bytes flipped or cut out.

    The column chunks lie in file order id, prompt, caption, then the footer; each damage is placed exactly.
    """
    path = tmp_path / "prompts.parquet"
    options = {"use_dictionary": False}
    if how == "carried-column-second-row-group":
        options["row_group_size"] = 2
    pq.write_table(pa.table(CORRUPT_ROWS), path, **options)
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(meta.num_row_groups - 1)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}

    def flip(start: int, length: int = 16) -> None:
        for i in range(start, start + length):
            data[i] ^= 0xFF

    if how == "footer-flipped":
        footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
        flip(footer + 8, 32)
    elif how == "truncated-tail":
        del data[len(data) // 2 :]
    elif how == "prompt-page-flipped":
        flip(chunks["prompt"].data_page_offset)
    elif how == "prompt-bytes-cut-out":
        middle = chunks["prompt"].data_page_offset + chunks["prompt"].total_compressed_size // 2
        del data[middle - 32 : middle + 32]
    elif how in ("carried-column-flipped", "carried-column-second-row-group"):
        flip(chunks["caption"].data_page_offset)
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "how",
    [
        "footer-flipped",
        "truncated-tail",
        "prompt-page-flipped",
        "prompt-bytes-cut-out",
        "carried-column-flipped",
        "carried-column-second-row-group",
    ],
)
def test_damaged_parquet_is_refused_naming_the_file(prefect_api, tiny_model, tmp_path, capsys, how):
    path = damaged(tmp_path, how)
    code, err = run(capsys, path, tmp_path / "out", tiny_model, "--shard-size", "2")
    assert_clean_failure(code, err, tmp_path / "out", str(path))


@pytest.mark.parametrize(
    "column, phrases",
    [
        ("prompt", ["'prompt'", "id 2"]),
        ("negative_prompt", ["'negative_prompt'", "id 2"]),
        ("id", ["'id'"]),
    ],
)
def test_invalid_utf8_in_a_string_column_is_refused(prefect_api, tiny_model, tmp_path, capsys, column, phrases):
    columns = {"id": pa.array([1, 2]), "prompt": pa.array(["a red circle", "a blue square"])}
    columns[column] = invalid_utf8_strings()
    path = written(tmp_path, pa.table(columns))
    code, err = run(capsys, path, tmp_path / "out", tiny_model)
    assert_clean_failure(code, err, tmp_path / "out", str(path), *phrases)


# ---------------------------------------------------------------- invalid schemas and values

FLOAT = pa.float64()
REFUSED = [
    # (id, table, phrases the one-paragraph error must contain)
    ("prompt-is-int64", table(prompt=[1, 2, 3]), ["column 'prompt'", "has type int64", "must hold a string"]),
    ("steps-is-string", table(steps=["20", "x", "20"]), ["column 'steps'", "has type string", "must hold an integer"]),
    ("id-is-float", table(id=[1.0, 2.0, 3.0]), ["column 'id'", "has type double", "an integer or a string"]),
    ("seed-is-list", table(seed=[[1], [2], [3]]), ["column 'seed'", "has type list<", "must hold an integer"]),
    (
        "null-prompts",
        table(prompt=["a red circle", None, None]),
        ["column 'prompt' must be a non-empty string (not only spaces, invisible or control characters), but is not in 2 row(s) with id 2, 3", "--skip-invalid"],
    ),
    (
        "prompt-column-all-null",
        table(prompt=([None, None, None], pa.null())),
        ["column 'prompt' must be a non-empty string (not only spaces, invisible or control characters), but is not in 3 row(s) with id 1, 2, 3"],
    ),
    (
        "empty-and-blank-prompts",
        table(id=["a", "b", "c"], prompt=["", " \t\n", "a red circle"]),
        ["column 'prompt' must be a non-empty string (not only spaces, invisible or control characters), but is not in 2 row(s) with id 'a', 'b'"],
    ),
    (
        "prompts-of-invisible-characters-only",
        table(id=["nul", "zero-width", "nbsp"], prompt=["\x00\x00", "\u200b\ufeff\u200d", "\u00a0\u3000"]),
        ["column 'prompt' must be a non-empty string", "3 row(s) with id 'nul', 'zero-width', 'nbsp'"],
    ),
    (
        "steps-2.5-in-decimal-column",
        table(steps=([decimal.Decimal("1"), decimal.Decimal("2.5"), None], pa.decimal128(4, 1))),
        ["column 'steps' must be a whole number from 1 to 1000, but is not in 1 row(s) with id 2"],
    ),
    ("duplicate-ids", table(id=[7, 8, 7], prompt=["a", "b", "c"]), ["duplicate ids: 7", "unique"]),
    (
        "duplicate-string-ids",
        pa.table({"id": ["x", "y", "x", "y"], "prompt": ["a", "b", "c", "d"]}),
        ["duplicate ids: 'x', 'y'"],
    ),
    (
        "width-not-multiple-of-8",
        table(width=[64, 100, 64]),
        ["column 'width' must be a multiple of 8 from 8 to 4096, but is not in 1 row(s) with id 2"],
    ),
    (
        "height-not-multiple-of-8",
        table(height=[64, 64, 60]),
        ["column 'height' must be a multiple of 8 from 8 to 4096, but is not in 1 row(s) with id 3"],
    ),
    (
        "width-100000",
        table(width=[100_000, 64, 64]),
        ["column 'width' must be a multiple of 8 from 8 to 4096, but is not in 1 row(s) with id 1"],
    ),
    (
        "width-negative",
        table(width=[64, -64, 64]),
        ["column 'width' must be a multiple of 8 from 8 to 4096, but is not in 1 row(s) with id 2"],
    ),
    (
        "seed-negative",
        table(seed=[1, -1, 3]),
        ["column 'seed' must be a whole number from 0 to 9223372036854775807, but is not in 1 row(s) with id 2"],
    ),
    (
        "seed-1.5-in-float-column",
        table(seed=([1.0, 1.5, 3.0], FLOAT)),
        ["column 'seed' must be a whole number from 0 to 9223372036854775807, but is not in 1 row(s) with id 2"],
    ),
    (
        "seed-over-int64-in-uint64-column",
        table(seed=([1, 2**64 - 1, 3], pa.uint64())),
        ["column 'seed' must be a whole number", "1 row(s) with id 2"],
    ),
    (
        "steps-0",
        table(steps=[1, 0, 1]),
        ["column 'steps' must be a whole number from 1 to 1000, but is not in 1 row(s) with id 2"],
    ),
    (
        "steps-5000",
        table(steps=[1, 1, 5000]),
        ["column 'steps' must be a whole number from 1 to 1000, but is not in 1 row(s) with id 3"],
    ),
    (
        "guidance-nan",
        table(guidance_scale=[7.5, float("nan"), 7.5]),
        ["column 'guidance_scale' must be a finite number, but is not in 1 row(s) with id 2"],
    ),
    (
        "guidance-inf-and-minus-inf",
        table(guidance_scale=[float("inf"), 7.5, float("-inf")]),
        ["column 'guidance_scale' must be a finite number, but is not in 2 row(s) with id 1, 3"],
    ),
    (
        "several-columns-at-once",
        table(steps=[0, 1, 1], width=[64, 100, 64], guidance_scale=[7.5, 7.5, float("nan")]),
        [
            "column 'steps' must be a whole number from 1 to 1000, but is not in 1 row(s) with id 1",
            "column 'width' must be a multiple of 8 from 8 to 4096, but is not in 1 row(s) with id 2",
            "column 'guidance_scale' must be a finite number, but is not in 1 row(s) with id 3",
        ],
    ),
    (
        "null-ids",
        pa.table({"id": pa.array([None, 2, None], pa.int64()), "prompt": ["a", "b", "c"]}),
        ["column 'id' must not be null", "at position 0, 2"],
    ),
]


@pytest.mark.parametrize(
    "t, phrases",
    [
        pytest.param(t, phrases, id=case) for case, t, phrases in REFUSED
    ],
)
def test_invalid_table_is_refused_naming_column_and_rows(prefect_api, tiny_model, tmp_path, capsys, t, phrases):
    path = written(tmp_path, t)
    code, err = run(capsys, path, tmp_path / "out", tiny_model)
    assert_clean_failure(code, err, tmp_path / "out", *phrases)


def test_skip_invalid_does_not_skip_duplicate_ids(prefect_api, tiny_model, tmp_path, capsys):
    path = written(tmp_path, table(id=[1, 2, 1]))
    code, err = run(capsys, path, tmp_path / "out", tiny_model, "--skip-invalid")
    assert_clean_failure(code, err, tmp_path / "out", "duplicate ids: 1")


# ---------------------------------------------------------------- accepted with --skip-invalid

def test_skip_invalid_generates_the_rest_and_lists_exactly_the_bad_ids(prefect_api, tiny_model, tmp_path, capsys):
    rows = [
        ("ok-1", "a red circle", 1, 64, 7.5, 3),
        ("null-prompt", None, 1, 64, 7.5, 3),
        ("blank-prompt", "   ", 1, 64, 7.5, 3),
        ("steps-0", "a blue square", 0, 64, 7.5, 3),
        ("width-100", "a green star", 1, 100, 7.5, 3),
        ("guidance-nan", "a cat", 1, 64, float("nan"), 3),
        ("seed-negative", "a dog", 1, 64, 7.5, -5),
        ("ok-2", "a tiny boat", 1, 64, 7.5, 3),
    ]
    names = ["id", "prompt", "steps", "width", "guidance_scale", "seed"]
    path = written(tmp_path, pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}))
    out = tmp_path / "out"
    code, err = run(capsys, path, out, tiny_model, "--skip-invalid")
    assert code == 0, err
    assert "Traceback" not in err
    assert "wrote 2 images" in err and "6 invalid row(s) were skipped" in err
    manifest = json.loads((out / "manifest.json").read_text())
    problems = {r["id"]: r["problem"].split()[0] for r in manifest["invalid_rows"]}
    assert problems == {
        "null-prompt": "prompt",
        "blank-prompt": "prompt",
        "steps-0": "steps",
        "width-100": "width",
        "guidance-nan": "guidance_scale",
        "seed-negative": "seed",
    }
    assert [r["position"] for r in manifest["invalid_rows"]] == [1, 2, 3, 4, 5, 6]
    assert manifest["rows"]["invalid"] == 6 and manifest["rows"]["in_dataset"] == 2
    assert pq.read_table(out / "data").column("id").to_pylist() == ["ok-1", "ok-2"]


def test_skip_invalid_with_every_row_invalid_writes_an_empty_dataset(prefect_api, tiny_model, tmp_path, capsys):
    path = written(tmp_path, table(steps=[0, 0, 0]))
    out = tmp_path / "out"
    code, err = run(capsys, path, out, tiny_model, "--skip-invalid")
    assert code == 0, err
    assert "wrote 0 images in 0 shard(s)" in err and "3 invalid row(s)" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["id"] for r in manifest["invalid_rows"]] == [1, 2, 3]
    assert not (out / "data").exists()


# ---------------------------------------------------------------- accepted as they are

def test_prompts_far_over_the_token_limit_are_encoded_whole(prefect_api, tiny_model, tmp_path, capsys):
    huge = "a red circle on a blue square, " * 700  # ~5,000 tokens: some 70 chunks of 75 (README, Prompts)
    t = pa.table({"id": ["huge", "short"], "prompt": [huge, "a blue square"], "negative_prompt": ["", "blurry " * 200]})
    out = tmp_path / "out"
    code, err = run(capsys, written(tmp_path, t), out, tiny_model)
    assert code == 0, err
    assert "Traceback" not in err and "truncated" not in err
    assert "wrote 2 images" in err
    assert pq.read_table(out / "data").column("prompt").to_pylist() == [huge, "a blue square"]


# Each under 77 tokens even for the tiny model's byte-level tokenizer (an emoji is up to 4 tokens there).
UNICODE_PROMPTS = {
    "emoji-🐱": "a red circle 🔴 by a blue square 🟦, 👩🏽‍🚀 👨‍👩‍👧, 🇯🇵",
    "cjk-猫": "赤い円と青い四角 — 고양이와 개 — 红色的圆",
    "rtl": "قطة حمراء · חתול אדום \u200f(right-to-left)",
    "combining": "cafe\u0301 is NFD, caf\u00e9 is NFC: both stay as written; Z\u0364\u0351a\u0308\u0356lgo",
    "astral-and-bom": "\ufeff𝕒 𝔟𝔩𝔲𝔢 𝓈𝓆𝓊𝒶𝓇ℯ 🀄 \U0010fffd",
    "quotes-newline": 'line one\nline two\t"quoted", with: colons',
}


def png_text_chunks(png: bytes) -> dict[bytes, bytes]:
    """The raw UTF-8 text of each iTXt chunk of a PNG, by keyword, read from the bytes (no Pillow)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    found, pos = {}, 8
    while pos < len(png):
        length, kind = int.from_bytes(png[pos : pos + 4], "big"), png[pos + 4 : pos + 8]
        body = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"iTXt":
            keyword, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            _language, _translated, text = rest.split(b"\0", 2)
            found[keyword] = zlib.decompress(text) if compressed else text
    return found


def test_unicode_and_emoji_prompts_survive_byte_for_byte(prefect_api, tiny_model, tmp_path, capsys):
    ids, prompts = list(UNICODE_PROMPTS), list(UNICODE_PROMPTS.values())
    t = pa.table({"id": ids, "prompt": prompts, "note": [f"carried {p}" for p in prompts]})
    out = tmp_path / "out"
    code, err = run(capsys, written(tmp_path, t), out, tiny_model)
    assert code == 0, err
    assert "Traceback" not in err and "truncated" not in err
    data = pq.read_table(out / "data")
    assert data.column("id").to_pylist() == ids
    stored = data.column("prompt").cast(pa.binary()).to_pylist()
    assert stored == [p.encode("utf-8") for p in prompts]
    assert data.column("note").to_pylist() == [f"carried {p}" for p in prompts]
    for prompt, image in zip(prompts, data.column("image").to_pylist()):
        parameters = png_text_chunks(image["bytes"])[b"parameters"]
        # The infotext's first line is the prompt exactly as given (one with a line break as a JSON string,
        # so that it cannot forge the lines after it: tests/test_readers.py); the settings line follows.
        line = json.dumps(prompt, ensure_ascii=False) if "\n" in prompt else prompt
        assert parameters.startswith(line.encode("utf-8") + b"\nSteps: 1, "), parameters[:200]


def test_unusual_but_valid_column_types_are_accepted(prefect_api, tiny_model, tmp_path, capsys):
    t = pa.table(
        {
            "id": pa.array(["a", "b", "a"]).dictionary_encode().slice(0, 2),
            "prompt": pa.array(["a red circle", "a blue square"], pa.large_string()),
            "seed": pa.array([2**63 - 1, 0], pa.uint64()),
            "steps": pa.array([1.0, 1.0], pa.float32()),
            "guidance_scale": pa.array([1, 0], pa.int8()),
            "width": pa.array([8, 72], pa.int16()),
            "height": pa.array([64, None], pa.int64()),
        }
    )
    out = tmp_path / "out"
    code, err = run(capsys, written(tmp_path, t), out, tiny_model)
    assert code == 0, err
    data = pq.read_table(out / "data")
    assert data.column("seed").to_pylist() == [2**63 - 1, 0]
    assert data.column("width").to_pylist() == [8, 72]
    assert data.column("height").to_pylist() == [64, 64]


def test_decimal_parameter_columns_are_accepted(prefect_api, tiny_model, tmp_path, capsys):
    d = decimal.Decimal
    t = table(
        guidance_scale=([d("7.50"), d("1.00"), None], pa.decimal128(4, 2)),
        seed=([d("12"), None, d("9223372036854775807")], pa.decimal128(19, 0)),
        steps=([d("1.0"), d("1.0"), None], pa.decimal128(3, 1)),
        width=([d("64"), d("72"), None], pa.decimal256(40, 0)),
        height=([d("64"), None, d("8")], pa.decimal128(5, 0)),
    )
    out = tmp_path / "out"
    code, err = run(capsys, written(tmp_path, t), out, tiny_model)
    assert code == 0, err
    data = pq.read_table(out / "data")
    assert data.column("guidance_scale").to_pylist()[:2] == [7.5, 1.0]
    assert data.column("seed").to_pylist()[::2] == [12, 2**63 - 1]
    assert data.column("width").to_pylist() == [64, 72, 64]
    assert data.column("height").to_pylist() == [64, 64, 8]


def test_control_characters_are_escaped_in_what_sdflow_prints(prefect_api, tiny_model, tmp_path, capsys):
    """Column names and ids are untrusted text: an ESC sequence in one must not reach the terminal raw."""
    red = "\x1b[31m"
    missing = written(tmp_path, pa.table({"id": [1], f"{red}caption": ["a cat"]}))
    code, err = run(capsys, missing, tmp_path / "out", tiny_model)
    assert code == 2 and "\x1b" not in err, repr(err)
    assert "\\x1b[31mcaption" in err

    (tmp_path / "t.parquet").unlink()
    # A row's id in a warning (its prompt leaves a bracket open).
    unclosed = written(tmp_path, pa.table({"id": [f"{red}row"], "prompt": ["a (red circle"]}))
    code, err = main(["generate", str(unclosed), str(tmp_path / f"out{red}"), "--model", tiny_model, *STEPS]), capsys.readouterr().err
    assert code == 0, err
    assert "\x1b" not in err, repr(err)
    assert "unclosed bracket" in err and "\\x1b[31m" in err
