"""LoRA in a run: --lora for every row, a `loras` column and prompt tags per row, keyed by content and weight, recorded
in the dataset, its infotext and the manifest; mistakes refused in one paragraph before any image is made."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nodes.dataset.ingest import key_rows, resolve_rows, row_key
from nodes.dataset.store import image_parameters
from nodes.params import LORAS_TYPE, GenerationDefaults
from nodes.pipeline.adapters import lora_file
from nodes.shapes.builders import ToyModelConfig, save_toy_model
from tests.support.loras import lora_layers, save_kohya_lora, save_peft_lora
from tests.support.runs import assert_clean_failure, run_cli
from tests.support.tables import write_table


def addnet_hash(path) -> str:
    """AUTOMATIC1111's hash of a LoRA file (modules/hashes.py addnet_hash_safetensors): sha256 after the header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD (its own copy, so adapters stay off the session's components) and a LoRA folder: `style` in
    diffusers/PEFT format, `subject` in kohya's, and `xl`: an SD LoRA with a second text encoder's layers, as an SDXL
    LoRA names them."""
    root = tmp_path_factory.mktemp("lora-run")
    model = root / "model"
    save_toy_model(model, ToyModelConfig(seed=1), defaults={"steps": 2, "guidance_scale": 7.5})
    loras = root / "loras"
    save_peft_lora(loras / "style.safetensors", lora_layers(model, "sd", seed=1), "sd")
    save_kohya_lora(loras / "subject.safetensors", lora_layers(model, "sd", seed=2), "sd")
    xl = lora_layers(model, "sd", seed=3)
    xl["text_encoder_2"] = xl["text_encoder"]
    save_kohya_lora(root / "xl.safetensors", xl, "sdxl")
    return {"model": str(model), "loras": loras, "root": root}


ROWS = [
    {"id": "plain", "prompt": "a red circle", "loras": None},
    {"id": "column", "prompt": "a blue square", "loras": [{"name": "subject", "weight": 0.7}]},
    {"id": "tag", "prompt": "a green triangle <lora:subject:-0.4>", "loras": None},
    {"id": "own-weight", "prompt": "a purple circle", "loras": [{"name": "style", "weight": 1.0}]},
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("loras", LORAS_TYPE)])


def generate(capsys, setup, table, out, *options):
    lora_dir = setup["loras"]
    return run_cli(
        capsys, table, out, "--model", setup["model"], "--lora", f"{lora_dir / 'style.safetensors'}:0.5", "--lora-dir",
        lora_dir, "--scheduler", "euler", "--batch-size", 4, *options,
    )


def test_run_and_row_loras_are_keyed_recorded_and_resumed_exactly(prefect_api, setup, tmp_path, capsys):
    table = write_table(tmp_path / "t.parquet", ROWS, SCHEMA)
    out = tmp_path / "out"
    code, err = generate(capsys, setup, table, out)
    assert code == 0, err
    data = pq.read_table(out / "data").to_pylist()
    got = {r["id"]: sorted((x["name"], x["weight"]) for x in r["loras"]) for r in data}
    assert got == {  # the run's style at 0.5 for all, a row's own weight winning; tags and the column add theirs
        "plain": [("style", 0.5)],
        "column": [("style", 0.5), ("subject", 0.7)],
        "tag": [("style", 0.5), ("subject", -0.4)],
        "own-weight": [("style", 1.0)],
    }
    sha = {name: lora_file(setup["loras"] / f"{name}.safetensors", 1.0, "").sha256 for name in ("style", "subject")}
    infotext = {r["id"]: image_parameters(r["image"]["bytes"]) for r in data}
    assert infotext["tag"].splitlines()[0] == "a green triangle <lora:subject:-0.4>"  # the prompt as written
    hashes = sorted([f"{n}: {addnet_hash(setup['loras'] / f'{n}.safetensors')}" for n in sha], key=lambda h: sha[h.split(":")[0]])
    assert f'Lora hashes: "{", ".join(hashes)}"' in infotext["column"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["loras"] == [{"name": "style", "sha256": sha["style"], "weight": 0.5}]
    adapters = manifest["adapters"]
    assert sorted(f["sha256"] for f in adapters["loras"]) == sorted(sha.values())
    assert (adapters["loads"], adapters["switches"]) == (2, 4)  # each file once; one switch per distinct set

    changed = [dict(r) for r in ROWS]
    changed[1]["loras"] = [{"name": "subject", "weight": 0.9}]
    code, err = generate(capsys, setup, write_table(tmp_path / "t2.parquet", changed, SCHEMA), out)
    assert code == 0, err
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert (rows["generated"], rows["already_done"], rows["stale"]) == (1, 3, 1)  # exactly the changed row


def test_planning_keys_are_row_keys_and_rows_without_lora_keep_their_keys(setup, tmp_path):
    defaults = GenerationDefaults(20, 7.5, 64, 64, "", 0, lora_dir=str(setup["loras"]), loras=())
    chunk = pa.Table.from_pylist([{k: v for k, v in r.items()} for r in ROWS], SCHEMA)
    rows, invalid = resolve_rows(chunk, 0, defaults, 8)
    keep, keys, bad = key_rows(chunk, 0, defaults, 8, ("euler", "abc"))
    assert not invalid and not bad and keep.tolist() == [0, 1, 2, 3]
    assert keys.tolist() == [row_key(r, "euler", "abc") for r in rows]
    plain = pa.Table.from_pylist([{"id": "plain", "prompt": "a red circle"}])
    without = GenerationDefaults(20, 7.5, 64, 64, "", 0)
    assert key_rows(plain, 0, without, 8, ("euler", "abc"))[1][0] == keys[0]  # no LoRA in the run: the same key
    assert resolve_rows(plain, 0, without, 8)[0][0].loras is None and rows[0].loras == ()


@pytest.mark.parametrize(
    "options, rows, phrases",
    [
        (["--lora", "missing.safetensors"], ROWS[:1], ["--lora missing.safetensors", "not a file"]),
        (["--lora", "STYLE:heavy"], ROWS[:1], ["--lora", ":heavy", "weight", "not a finite number"]),
        ([], [{"id": "x", "prompt": "a cat", "loras": [{"name": "nope", "weight": 1.0}]}], ["row 'x'", "nope.safetensors"]),
        ([], [{"id": "x", "prompt": "a cat", "loras": [{"name": "style", "weight": float("nan")}]}], ["'loras'", "finite weight", "'x'"]),
        (["--lora", "XL"], ROWS[:1], ["xl.safetensors", "does not fit model", "match no layer"]),
    ],
)
def test_mistakes_stop_the_run_before_any_image(prefect_api, setup, tmp_path, capsys, options, rows, phrases):
    options = [o.replace("STYLE", str(setup["loras"] / "style.safetensors")).replace("XL", str(setup["root"] / "xl.safetensors")) for o in options]
    table = write_table(tmp_path / "t.parquet", rows, SCHEMA)
    out = tmp_path / "out"
    code, err = generate(capsys, setup, table, out, *options)
    assert_clean_failure(code, err, out, *phrases)
    assert not list(out.glob("data/*.parquet"))


def test_batches_group_rows_by_lora_set_the_active_set_first():
    from nodes.params import Lora, Row
    from nodes.pipeline.batch import make_batches

    a, b = Lora("a", "a.safetensors", "aa", 0.5), Lora("b", "b.safetensors", "bb", 1.0)
    sets = [None, (a,), (a, b), (a,)]  # interleaved row by row, as a table may hold them
    rows = [Row(i, i, "p", "", i, 4, 7.5, 64, 64, loras=sets[i % 4]) for i in range(12)]
    batches = make_batches(rows, 2, active=(("aa", 0.5), ("bb", 1.0)))
    keys = [{r.shape_key for r in batch} for batch in batches]
    assert all(len(k) == 1 for k in keys)
    order = [r.loras for batch in batches for r in batch]
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert order[0] == (a, b) and switches == 2  # the active set goes on, then each other set once
