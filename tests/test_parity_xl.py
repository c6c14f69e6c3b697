"""Stable Diffusion XL through the model-family seam: every image equals StableDiffusionXLPipeline's for that row alone."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from nodes.params import SAMPLERS, Row
from nodes.pipeline.components import inspect_model, load_components
from tests.support.models import save_tiny_sdxl
from tests.support.reference import diffusers_image, generate, max_level_difference


def xl_row(position, row_id, prompt, negative, seed, guidance, original=None, crop=(0, 0), target=None, size=(64, 64)):
    width, height = size
    return Row(
        position, row_id, prompt, negative, seed, 4, guidance, width, height,
        original_size=original or (height, width), crops_coords_top_left=crop, target_size=target or (height, width),
    )


# A mixed batch: guidance above, at and below 1; negative prompts and empty ones (zeros under
# force_zeros_for_empty_prompt); the size and crop conditioning at diffusers' defaults and not.
ROWS = [
    xl_row(0, "a", "a small red circle on the left", "", 11, 7.5),
    xl_row(1, "b", "a large blue square at the top", "blurry", 22, 1.0, original=(128, 96)),
    xl_row(2, "c", "a photo of a green triangle", "red", 33, 3.0, crop=(8, 16)),
    xl_row(3, "d", "a yellow star in the centre", "", 44, 0.5, target=(32, 48)),
]


@pytest.fixture(scope="module")
def components(tiny_sdxl):
    return load_components(inspect_model(tiny_sdxl), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_folder_is_read_as_sdxl_with_its_native_size(tiny_sdxl, components):
    info = inspect_model(tiny_sdxl)
    assert (info.family, info.native_size, info.force_zeros_for_empty_prompt) == ("sdxl", 64, True)
    assert set(components.modules) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae"}


@pytest.mark.parametrize("scheduler", list(SAMPLERS))
def test_mixed_batch_matches_diffusers_row_by_row(components, reference, scheduler):
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(components.info.scheduler_config)
    ours = generate(components, ROWS, scheduler)
    for i, row in enumerate(ROWS):
        assert max_level_difference(ours[i], diffusers_image(reference, row, scheduler)) <= 1, (scheduler, row.id)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m_karras"])
def test_a_row_alone_equals_the_row_in_a_batch(components, scheduler):
    batch = generate(components, ROWS, scheduler)
    for i, row in enumerate(ROWS):
        assert max_level_difference(generate(components, [row], scheduler)[0], batch[i]) <= 1, row.id


def test_time_ids_are_diffusers_and_the_unet_reads_them(components, reference):
    """The parity above would hold trivially if the tiny U-Net ignored its time ids (their effect on its images is a
    few levels): check them against diffusers' own _get_add_time_ids, and that the U-Net's prediction moves with them."""
    from nodes.pipeline.conditioning import text_time_conditioning
    from nodes.pipeline.encode import encode_prompts

    embeds = encode_prompts(components, ROWS)
    added = text_time_conditioning(components, ROWS, embeds, guided=True)["added_cond_kwargs"]
    projection = components.modules["text_encoder_2"].config.projection_dim
    want = torch.cat([
        reference._get_add_time_ids(r.original_size, r.crops_coords_top_left, r.target_size, torch.float32, projection)
        for r in ROWS
    ])
    assert torch.equal(added["time_ids"], torch.cat([want, want]))  # the negative half takes the same ids
    assert torch.equal(added["text_embeds"], torch.cat([embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds]))
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    context = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])
    unet = components.unet

    def predict(time_ids):
        cond = {"text_embeds": added["text_embeds"], "time_ids": time_ids}
        return unet(torch.cat([latents] * 2), 500, encoder_hidden_states=context, added_cond_kwargs=cond).sample

    moved = added["time_ids"].clone()
    moved[:, 2:4] += 256  # another crop
    assert (predict(added["time_ids"]) - predict(moved)).abs().max() > 1e-3


def test_an_empty_negative_prompt_is_zeros_and_a_blank_one_is_encoded(components):
    base = ROWS[0]
    zeros, space = generate(components, [base], "euler")[0], generate(components, [xl_row(0, "a", base.prompt, " ", base.seed, 7.5)], "euler")[0]
    assert max_level_difference(zeros, space) > 8


def test_other_sizes_and_force_zeros_off(tmp_path):
    """A model whose config keeps "" as an encoded negative prompt, at a size other than its native one."""
    path = save_tiny_sdxl(tmp_path / "no-zeros", seed=5, force_zeros_for_empty_prompt=False)
    assert not inspect_model(str(path)).force_zeros_for_empty_prompt
    components = load_components(inspect_model(str(path)), torch.device("cpu"), torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    row = xl_row(0, "w", "a wide red square", "", 5, 7.5, size=(96, 48))
    ours = generate(components, [row], "euler")[0]
    assert ours.shape == (48, 96, 3)
    assert max_level_difference(ours, diffusers_image(pipe, row, "euler")) <= 1


def test_sdxl_dataset_records_its_conditioning_and_sd_models_refuse_sdxl_columns(
    prefect_api, tiny_sdxl, tiny_model, tmp_path, capsys
):
    from datasets import load_dataset

    from flows.generate import generate_dataset
    from tests.support.runs import images_by_id, run_cli
    from tests.support.tables import write_table

    rows = [
        {"id": "a", "prompt": "a small red circle", "seed": 1, "original_size": None, "crops_coords_top_left": None},
        {"id": "b", "prompt": "a blue square", "seed": 2, "original_size": [128, 96], "crops_coords_top_left": [8, 0]},
    ]
    table = write_table(tmp_path / "xl.parquet", rows)
    out = tmp_path / "out"
    manifest = generate_dataset(prompts=table, out=str(out), model=tiny_sdxl, steps=4, scheduler="euler")
    assert manifest["rows"]["generated"] == 2
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    got = {r["id"]: (r["original_size"], r["crops_coords_top_left"], r["target_size"]) for r in ds}
    assert got == {"a": ([64, 64], [0, 0], [64, 64]), "b": ([128, 96], [8, 0], [64, 64])}
    components = load_components(inspect_model(tiny_sdxl), torch.device("cpu"), torch.float32)
    assert manifest["resolved"]["guidance_scale"] == 5.0  # StableDiffusionXLPipeline's default
    expected = [xl_row(1, "b", rows[1]["prompt"], "", 2, 5.0, original=(128, 96), crop=(8, 0))]
    assert max_level_difference(images_by_id(out)["b"], generate(components, expected, "euler")[0]) <= 1

    code, err = run_cli(capsys, table, tmp_path / "sd-out", "--model", tiny_model)
    assert code == 2 and "original_size" in err and "sdxl" in err, err
    assert not (tmp_path / "sd-out").exists()


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_float16_vae_decodes_in_float32_where_its_config_says_force_upcast(tmp_path, caplog, force_upcast):
    """diffusers' rule for SDXL: a float16 VAE whose config says force_upcast decodes in float32, up front. Made loud
    (activations beyond float16's range, as the SDXL VAE produces), the float16 decode would overflow."""
    import logging

    from nodes.pipeline.decode import decode_latents

    path = save_tiny_sdxl(tmp_path / "xl", seed=7, force_upcast=force_upcast)
    components = load_components(inspect_model(str(path)), torch.device("cpu"), torch.float16)
    with torch.inference_mode():
        components.vae.decoder.conv_out.weight.mul_(200_000)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="sdflow"):
        decoded = decode_latents(components, latents.half())
    assert decoded.non_finite == []
    overflowed = "overflowed in torch.float16" in caplog.text
    assert overflowed is not force_upcast  # upcast: decoded in float32 at once; not: float16 first, then again
    with torch.inference_mode():
        vae32 = components.vae.float()
        want = vae32.decode(latents / vae32.config.scaling_factor).sample
        components.vae.half()
    want = ((want / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert max_level_difference(decoded.images.numpy(), want.numpy()) <= 1
