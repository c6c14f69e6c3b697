"""A separate VAE (--vae): a diffusers folder or an original-layout single file decodes as diffusers would with it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import save_file

from flows.generate import generate_dataset
from nodes.errors import ModelError
from nodes.pipeline.components import inspect_model
from nodes.params import Row
from nodes.shapes.builders import build_vae
from tests.support.reference import diffusers_image, max_level_difference
from tests.support.runs import images_by_id
from tests.support.single_file import ldm_vae_state_dict
from tests.support.tables import write_table

ROWS = [{"id": i, "prompt": f"a {c} circle", "seed": 10 + i} for i, c in enumerate(["red", "blue", "green"])]


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE of the tiny model's architecture with other weights: as a diffusers folder and as an LDM single file."""
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(123)
    vae = build_vae((32, 64), 1, 4, 64)
    vae.save_pretrained(root / "folder", safe_serialization=True)
    ldm = ldm_vae_state_dict(vae)
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, dict(vae.config))
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())  # the file's mapping is diffusers' own
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()}, root / "other-vae.safetensors")
    return root / "folder", root / "other-vae.safetensors"


def test_a_separate_vae_decodes_every_row_and_is_part_of_the_identity(prefect_api, tiny_model, other_vae, tmp_path):
    folder, single = other_vae
    table = write_table(tmp_path / "t.parquet", ROWS)
    out = tmp_path / "out"
    own = generate_dataset(prompts=table, out=str(out), model=tiny_model, scheduler="euler")
    with_folder = generate_dataset(prompts=table, out=str(out), model=tiny_model, vae=str(folder), scheduler="euler")
    # Another VAE is another model: every row is made again, and the first run's rows are counted stale.
    assert (with_folder["rows"]["generated"], with_folder["rows"]["stale"]) == (3, 3)
    assert with_folder["resolved"]["model_fingerprint"] != own["resolved"]["model_fingerprint"]
    assert with_folder["resolved"]["vae"] == str(folder)

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, vae=AutoencoderKL.from_pretrained(folder), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    images: dict[int, list[np.ndarray]] = {}
    for record in pq.read_table(out / "data").to_pylist():
        images.setdefault(record["id"], []).append(np.asarray(Image.open(io.BytesIO(record["image"]["bytes"]))))
    for spec in ROWS:
        row = Row(0, spec["id"], spec["prompt"], "", spec["seed"], with_folder["resolved"]["steps"], 7.5, 64, 64)
        want = diffusers_image(pipe, row, "euler")
        differences = sorted(max_level_difference(image, want) for image in images[spec["id"]])
        assert differences[0] <= 1 < 8 < differences[1]  # the --vae image is diffusers'; the own VAE's differs

    # The same VAE as one original-layout file decodes the same images.
    file_out = tmp_path / "file-out"
    with_file = generate_dataset(prompts=table, out=str(file_out), model=tiny_model, vae=str(single), scheduler="euler")
    assert with_file["rows"]["generated"] == 3
    folder_only = tmp_path / "folder-out"
    generate_dataset(prompts=table, out=str(folder_only), model=tiny_model, vae=str(folder), scheduler="euler")
    a, b = images_by_id(file_out), images_by_id(folder_only)
    assert all(max_level_difference(a[i], b[i]) <= 1 for i in b)


def test_a_vae_that_is_not_one_is_refused_before_loading(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("not a vae")
    for bad in (tmp_path / "missing", tmp_path / "notes.txt", tmp_path):
        with pytest.raises(ModelError, match="--vae"):
            inspect_model(tiny_model, vae=str(bad))
