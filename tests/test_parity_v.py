"""Stable Diffusion 2.x's v-prediction, with guidance_rescale per row, equals diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch
from diffusers import StableDiffusionPipeline

from nodes.params import Row
from nodes.pipeline.components import inspect_model, load_components
from tests.support.reference import diffusers_image, generate, max_level_difference

ROWS = [
    Row(0, "a", "a small red circle on the left", "", 11, 4, 7.5, 64, 64, guidance_rescale=0.0),
    Row(1, "b", "a large blue square at the top", "blurry", 22, 4, 5.0, 64, 64, guidance_rescale=0.7),
    Row(2, "c", "a photo of a green triangle", "", 33, 4, 3.0, 64, 64, guidance_rescale=1.0),
    Row(3, "d", "a yellow star in the centre", "red", 44, 4, 1.0, 64, 64, guidance_rescale=0.7),  # no guidance
]


@pytest.fixture(scope="module")
def v_model(tiny_model, tmp_path_factory):
    """The tiny model as an SD 2.x-style v-prediction model: its scheduler config says so, as SD 2.1's does."""
    path = tmp_path_factory.mktemp("models") / "tiny-v"
    shutil.copytree(tiny_model, path)
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return str(path)


@pytest.fixture(scope="module")
def components(v_model):
    return load_components(inspect_model(v_model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(v_model):
    pipe = StableDiffusionPipeline.from_pretrained(v_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_with_guidance_rescale_matches_diffusers_row_by_row(components, reference, scheduler):
    reference.scheduler = diffusers.PNDMScheduler.from_config(components.info.scheduler_config)
    assert reference.scheduler.config.prediction_type == "v_prediction"
    ours = generate(components, ROWS, scheduler)
    for i, row in enumerate(ROWS):
        assert max_level_difference(ours[i], diffusers_image(reference, row, scheduler)) <= 1, (scheduler, row.id)


def test_per_row_rescale_is_diffusers_rescale_noise_cfg_row_by_row():
    """The parity above would hold trivially if rescaling did nothing on the tiny model: check the rule itself."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

    from nodes.pipeline.denoise import rescale_noise_cfg

    generator = torch.Generator().manual_seed(0)
    noise_text = torch.randn(3, 4, 8, 8, generator=generator)
    noise_cfg = 3.0 * torch.randn(3, 4, 8, 8, generator=generator) + 0.5
    factors = [0.0, 0.7, 1.0]
    ours = rescale_noise_cfg(noise_cfg, noise_text, torch.tensor(factors).view(-1, 1, 1, 1))
    for i, factor in enumerate(factors):
        want = diffusers_rescale(noise_cfg[i : i + 1], noise_text[i : i + 1], guidance_rescale=factor)
        torch.testing.assert_close(ours[i : i + 1], want)
    assert torch.equal(ours[0], noise_cfg[0])  # a row at 0 is untouched, bit for bit
    assert (ours[2] - noise_cfg[2]).abs().max() > 0.5


def test_a_row_without_rescale_is_the_same_beside_a_rescaled_one(components):
    batch = generate(components, [ROWS[0], ROWS[1]], "euler")
    assert max_level_difference(batch[0], generate(components, [ROWS[0]], "euler")[0]) <= 1
