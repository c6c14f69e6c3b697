"""A model's identity is its content: another model of the same shape is another model, wherever it is stored."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import nodes.pipeline.components as components_module
from nodes.errors import ModelError
from nodes.pipeline.components import inspect_model
from nodes.shapes.builders import ToyModelConfig, save_toy_model
from tests.support.tables import TEST_STEPS
from tests.support.runs import run_cli
from tests.support.tables import write_table
from tests.support.s3_server import BUCKET, upload_table

ROWS = [{"id": i, "prompt": f"a red circle {i}", "seed": 10 + i} for i in range(3)]
DEFAULTS = {"steps": TEST_STEPS, "guidance_scale": 7.5}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's own hash cache and model copies."""
    monkeypatch.setenv("SDFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> str:
    """The tiny model's twin: the same configs, tokenizer and weight file sizes, other weights (another seed)."""
    return str(save_toy_model(tmp_path_factory.mktemp("models") / "fine-tune", ToyModelConfig(seed=2), DEFAULTS))


def same_shape(a: str, b: str) -> bool:
    """Every file of the two folders has the same size, and every JSON file the same content."""
    files = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file()):
        return False
    for f in files:
        if (Path(a) / f).stat().st_size != (Path(b) / f).stat().st_size:
            return False
        if f.suffix == ".json" and (Path(a) / f).read_text() != (Path(b) / f).read_text():
            return False
    return True


def images_by_model(out: Path) -> dict[str, dict[int, np.ndarray]]:
    """{model as recorded in each row: {id: image}}."""
    table = pq.read_table(out / "data")
    found: dict[str, dict[int, np.ndarray]] = {}
    for model, row_id, image in zip(*(table.column(c).to_pylist() for c in ("model", "id", "image"))):
        found.setdefault(model, {})[row_id] = np.asarray(Image.open(io.BytesIO(image["bytes"])))
    return found


def test_models_of_the_same_shape_have_different_fingerprints(tiny_model, fine_tune, tmp_path):
    assert same_shape(tiny_model, fine_tune)
    assert inspect_model(tiny_model).fingerprint != inspect_model(fine_tune).fingerprint
    # Content, not location: a copy elsewhere is the same model.
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert inspect_model(str(copy)).fingerprint == inspect_model(tiny_model).fingerprint
    # A tokenizer file changes what the prompts encode to, so it is part of the model.
    tokenizer = copy / "tokenizer" / "tokenizer.json"
    spec = json.loads(tokenizer.read_text())
    words = spec["model"]["vocab"]
    words["red</w>"], words["blue</w>"] = words["blue</w>"], words["red</w>"]
    tokenizer.write_text(json.dumps(spec))
    assert inspect_model(str(copy)).fingerprint != inspect_model(tiny_model).fingerprint


def test_a_fine_tune_of_the_same_shape_generates_every_row_again(prefect_api, tiny_model, fine_tune, tmp_path, capsys):
    table, out = write_table(tmp_path / "p.parquet", ROWS), tmp_path / "out"
    code, err = run_cli(capsys, table, out, "--model", tiny_model)
    assert code == 0, err
    first = json.loads((out / "manifest.json").read_text())

    code, err = run_cli(capsys, table, out, "--model", fine_tune)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["rows"]
    assert (rows["generated"], rows["already_done"], rows["stale"], rows["in_dataset"]) == (3, 0, 3, 6)
    assert manifest["resolved"]["model_fingerprint"] != first["resolved"]["model_fingerprint"]
    images = images_by_model(out)
    assert sorted(images) == sorted([tiny_model, fine_tune])
    assert all(not np.array_equal(images[tiny_model][i], images[fine_tune][i]) for i in images[tiny_model])


def test_a_model_replaced_in_its_folder_is_used(prefect_api, tiny_model, fine_tune, tmp_path, capsys):
    # Same path, new content (a fine-tune saved over the old one): neither the hash cache nor the process's
    # loaded model may stand in for it.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    table = write_table(tmp_path / "p.parquet", ROWS)
    assert run_cli(capsys, table, tmp_path / "a", "--model", model)[0] == 0
    shutil.rmtree(model)
    shutil.copytree(fine_tune, model)
    code, err = run_cli(capsys, table, tmp_path / "a", "--model", model)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["rows"]["generated"] == 3
    assert run_cli(capsys, table, tmp_path / "b", "--model", fine_tune)[0] == 0
    # The second shard of the replaced folder's dataset holds the fine-tune's images.
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    second = pq.read_table(tmp_path / "a" / manifest["shards"][-1]["file"])
    got = {r: np.asarray(Image.open(io.BytesIO(i["bytes"]))) for r, i in zip(*(second.column(c).to_pylist() for c in ("id", "image")))}
    want = images_by_model(tmp_path / "b")[fine_tune]
    assert sorted(got) == sorted(want) and all(np.array_equal(got[i], want[i]) for i in want)


def test_weight_hashes_are_cached_by_file_identity(tiny_model, tmp_path, own_cache, monkeypatch):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    hashed = []
    real = components_module._sha256_file

    def counting(path):
        hashed.append(Path(path).relative_to(model).as_posix())
        return real(path)

    monkeypatch.setattr(components_module, "_sha256_file", counting)
    fingerprint = inspect_model(str(model)).fingerprint
    assert "unet/diffusion_pytorch_model.safetensors" in hashed
    assert not any(name.startswith("clip/") or name == "sdflow.json" for name in hashed)  # not used to generate
    assert (own_cache / "file-hashes.json").exists()
    hashed.clear()
    assert inspect_model(str(model)).fingerprint == fingerprint
    assert hashed == []  # nothing read again
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.touch()  # another mtime: hashed again, the same content gives the same fingerprint
    assert inspect_model(str(model)).fingerprint == fingerprint
    assert hashed == ["vae/diffusion_pytorch_model.safetensors"]


@pytest.mark.filterwarnings("ignore:Artifact creation outside")  # the worker's progress artifact, here without a task
def test_a_worker_with_another_model_of_the_same_shape_refuses_the_shard(prefect_api, tiny_model, fine_tune, tmp_path):
    from flows.worker import ShardRequest, run_shard
    from nodes.dataset.ingest import Shard
    from nodes.params import RunConfig

    parent = inspect_model(tiny_model)
    request = ShardRequest(
        out=str(tmp_path / "out"), model=fine_tune, fingerprint=parent.fingerprint, dtype=None,
        run=RunConfig(None, "pndm", 1, 1, False, None), shard=Shard(0, 1), rows=[], carried=None, keys=None,
    )
    with pytest.raises(ModelError, match="is not the parent's"):
        run_shard(request)


def test_a_model_replaced_at_the_same_s3_url_is_copied_again(s3, prefect_api, tiny_model, fine_tune, tmp_path, own_cache):
    from flows.generate import generate_dataset

    prompts = upload_table(s3, tmp_path, ROWS[:1], "one.parquet")
    url = f"s3://{BUCKET}/models/current"
    s3.put(tiny_model.rstrip("/") + "/", f"{BUCKET}/models/current/", recursive=True)
    first = generate_dataset(prompts=prompts, out=f"s3://{BUCKET}/out", model=url, steps=1)
    assert first["resolved"]["model_fingerprint"] == inspect_model(tiny_model).fingerprint

    s3.rm(f"{BUCKET}/models/current", recursive=True)
    s3.put(fine_tune.rstrip("/") + "/", f"{BUCKET}/models/current/", recursive=True)
    second = generate_dataset(prompts=prompts, out=f"s3://{BUCKET}/out", model=url, steps=1)
    assert second["resolved"]["model_fingerprint"] == inspect_model(fine_tune).fingerprint
    assert (second["rows"]["generated"], second["rows"]["stale"]) == (1, 1)
    copies = [p for p in (own_cache / "models").iterdir() if (p / ".complete").exists()]
    assert len(copies) == 2

    # Unchanged since: neither copied nor hashed again.
    assert inspect_model(url).fingerprint == second["resolved"]["model_fingerprint"]
    assert len([p for p in (own_cache / "models").iterdir()]) == 2
