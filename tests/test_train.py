"""The training flow at tiny scale under a real Prefect API: each loss falls, the folder loads and generates."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flows.generate import generate_dataset
from flows.train import TINY, train_model
from nodes.shapes import train
from nodes.errors import SdflowError
from nodes.pipeline.batch import torch_threads
from nodes.pipeline.components import inspect_model, load_components
from tests.support.tables import write_table

WINDOW = 3  # steps averaged at each end of a loss curve


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory):
    """One tiny training run; yields (model folder, the flow's record)."""
    out = tmp_path_factory.mktemp("train") / "model"
    record = train_model(out=str(out), preset="tiny", seed=0)
    return out, record


@pytest.mark.parametrize("component", ["clip", "vae", "unet"])
def test_loss_falls(trained, component):
    losses = trained[1]["losses"][component]
    assert len(losses) == getattr(TINY, component).steps
    assert all(np.isfinite(losses))
    assert np.mean(losses[-WINDOW:]) < np.mean(losses[:WINDOW])


def test_folder_is_a_diffusers_model_with_clip_and_record(trained):
    out, record = trained
    index = json.loads((out / "model_index.json").read_text())
    assert "clip" not in index and index["scheduler"] == ["diffusers", TINY.scheduler]
    assert json.loads((out / "sdflow.json").read_text()) == {"steps": TINY.default_steps, "guidance_scale": TINY.default_guidance}
    curves = json.loads((out / "train.json").read_text())["loss_curves"]
    assert curves == {name: train.loss_curve(losses, TINY.log_every) for name, losses in record["losses"].items()}
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(record["scaling_factor"])
    assert not out.with_name(out.name + ".partial").exists()


def test_loads_through_the_model_path(trained):
    out, record = trained
    info = inspect_model(str(out))
    assert (info.native_size, info.vae_scale_factor, info.default_steps) == (64, 4, TINY.default_steps)
    components = load_components(info, torch.device("cpu"), torch.float32)
    assert components.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    # The text encoder is CLIP's trained text tower, weight for weight.
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(out / "clip", use_safetensors=True)
    for name, weight in components.text_encoder.state_dict().items():
        assert torch.equal(weight, clip.text_model.state_dict()[name]), name
    # Every word of the domain is one token (start and end tokens around it).
    for word in train.domain_words():
        assert len(components.tokenizer(word).input_ids) == 3, word


def test_clip_folder_is_a_whole_clip_with_its_processor(trained):
    from transformers import CLIPModel, CLIPProcessor

    from nodes.shapes.domain import make_examples

    images, captions, _ = make_examples(4, seed=1)
    processor = CLIPProcessor.from_pretrained(trained[0] / "clip")
    inputs = processor(text=captions, images=list(images), padding=True, truncation=True, return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], train.pixel_values(images), atol=1e-6)
    clip = CLIPModel.from_pretrained(trained[0] / "clip", use_safetensors=True)
    assert clip(**inputs).logits_per_image.shape == (4, 4)


def test_diffusers_pipeline_loads_beside_the_clip_folder(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained[0], use_safetensors=True, safety_checker=None)
    assert pipe.unet.config.sample_size == 16


def test_generates_images_with_the_trained_model(trained, tmp_path):
    rows = [{"id": "a", "prompt": "a small red circle on the left"}, {"id": "b", "prompt": "large blue square, top"}]
    prompts = write_table(tmp_path / "prompts.parquet", rows)
    with torch_threads(TINY.threads):  # as it was trained: tiny ops gain nothing from a second thread
        manifest = generate_dataset(prompts=prompts, out=str(tmp_path / "out"), model=str(trained[0]), batch_size=2)
    assert manifest["rows"]["generated"] == 2 and manifest["resolved"]["steps"] == TINY.default_steps
    for row in pq.read_table(tmp_path / "out" / "data").to_pylist():
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (64, 64)


def test_non_empty_output_folder_is_refused_before_training(prefect_api, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(SdflowError, match="not empty"):
        train_model(out=str(tmp_path / "model"), preset="tiny")
    with pytest.raises(SdflowError, match="preset"):
        train_model(out=str(tmp_path / "other"), preset="huge")


def test_same_seed_same_training_and_batches():
    spec = replace(TINY.vae, steps=2)
    with torch_threads(TINY.threads):
        first, second, other = (train.train_vae(spec, seed)[1] for seed in (3, 3, 4))
    assert first == second and first != other
    assert train.step_seed(0, "unet", 5) == train.step_seed(0, "unet", 5) != train.step_seed(0, "vae", 5)
    assert train.step_seed(0, "unet", 7, distinct_batches=2) == train.step_seed(0, "unet", 1, distinct_batches=2)
