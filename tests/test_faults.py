"""Faults: out-of-memory halves the batch, a failing row is recorded and the rest goes on, half-precision overflow;
a failure of the whole run (every row the same way, a model or device sdflow cannot drive) stops it with an exit code."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import nodes.pipeline.batch
from flows.generate import generate_dataset
from nodes.pipeline.decode import decode_latents
from nodes.pipeline.components import inspect_model, load_components
from nodes.params import Row
from tests.support.tables import write_table
from tests.support.reference import generate, max_level_difference
from tests.support.runs import assert_clean_failure, images_by_id, run_cli

ROWS = [{"id": i, "prompt": f"a blue circle {i}", "seed": 100 + i} for i in range(5)]


@pytest.fixture
def own_model(tiny_model, tmp_path):
    """A copy of the tiny model under its own path, so its loaded modules can be patched without touching others'."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model, path)
    return str(path)


def expected_images(model: str) -> dict[int, np.ndarray]:
    components = load_components(inspect_model(model), torch.device("cpu"), torch.float32)
    rows = [Row(r["id"], r["id"], r["prompt"], "", r["seed"], 4, 7.5, 64, 64) for r in ROWS]
    return {r.id: generate(components, [r], None)[0] for r in rows}


def test_out_of_memory_halves_the_batch_and_loses_nothing(prefect_api, own_model, tmp_path, caplog):
    components = load_components(inspect_model(own_model), torch.device("cpu"), torch.float32)
    forward = components.unet.forward
    sizes = []

    def small_memory(sample, *args, **kwargs):
        sizes.append(sample.shape[0])
        if sample.shape[0] > 4:  # more than 2 rows under classifier-free guidance
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    components.unet.forward = small_memory
    try:
        with caplog.at_level(logging.WARNING, logger="sdflow"):
            manifest = generate_dataset(
                prompts=write_table(tmp_path / "p.parquet", ROWS), out=str(tmp_path / "out"), model=own_model, batch_size=5
            )
    finally:
        components.unet.forward = forward
    assert manifest["rows"]["generated"] == 5 and manifest["rows"]["failed"] == 0
    assert "out of memory at batch size 5; trying 2 and 3" in caplog.text
    assert "out of memory at batch size 3; trying 1 and 2" in caplog.text
    assert max(s for s in sizes if s <= 4) == 4
    got, want = images_by_id(tmp_path / "out"), expected_images(own_model)
    assert all(max_level_difference(got[i], want[i]) <= 1 for i in want)


def poisoned(make_generators):
    """make_generators, failing for any batch that holds a row whose prompt says "poison"."""

    def generators(rows):
        if any("poison" in r.prompt for r in rows):
            raise ValueError("this row cannot be generated")
        return make_generators(rows)

    return generators


def test_a_row_that_always_fails_is_recorded_and_the_rest_goes_on(prefect_api, own_model, tmp_path, monkeypatch):
    real = nodes.pipeline.batch.make_generators
    monkeypatch.setattr(nodes.pipeline.batch, "make_generators", poisoned(real))
    rows = ROWS[:2] + [{"id": 99, "prompt": "poison", "seed": 1}] + ROWS[2:]
    prompts = write_table(tmp_path / "p.parquet", rows)
    out = tmp_path / "out"
    manifest = generate_dataset(prompts=prompts, out=str(out), model=own_model, batch_size=3)
    assert (manifest["rows"]["generated"], manifest["rows"]["failed"]) == (5, 1)
    [failure] = manifest["failed_rows"]
    assert (failure["id"], failure["error"]) == (99, "ValueError: this row cannot be generated")
    assert sorted(pq.read_table(out / "data").column("id").to_pylist()) == [0, 1, 2, 3, 4]
    marker = json.loads((out / "_shards" / "00000.json").read_text())
    assert [f["id"] for f in marker["failed"]] == [99]

    # Once the fault is gone, a rerun generates exactly the failed row.
    monkeypatch.setattr(nodes.pipeline.batch, "make_generators", real)
    again = generate_dataset(prompts=prompts, out=str(out), model=own_model, batch_size=3)
    assert (again["rows"]["generated"], again["rows"]["failed"], again["rows"]["in_dataset"]) == (1, 0, 6)
    assert again["failed_rows"] == []


@torch.inference_mode()
def test_half_precision_overflow_is_decoded_again_in_float32(tiny_model, tmp_path):
    model = tmp_path / "loud-vae"
    shutil.copytree(tiny_model, model)
    components = load_components(inspect_model(str(model)), torch.device("cpu"), torch.float16)
    # Activations beyond float16's 65504 inside the decoder, as the SD VAE produces on some latents.
    components.vae.decoder.conv_out.weight.mul_(200_000)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).half()
    assert not torch.isfinite(components.vae.decode(latents / components.vae.config.scaling_factor).sample).all()
    decoded = decode_latents(components, latents)
    assert decoded.non_finite == []
    reference = components.vae.float().decode(latents.float() / components.vae.config.scaling_factor).sample
    components.vae.half()
    want = ((reference / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert max_level_difference(decoded.images.numpy(), want.numpy()) <= 1


@torch.inference_mode()
def test_latents_that_stay_non_finite_are_reported(tiny_model):
    components = load_components(inspect_model(tiny_model), torch.device("cpu"), torch.float32)
    latents = torch.randn(3, 4, 32, 32)
    latents[1, 0, 0, 0] = float("nan")
    decoded = decode_latents(components, latents)
    assert decoded.non_finite == [1]
    assert decoded.images.shape == (3, 64, 64, 3)


# ------------------------------------------------------------------ failures of the run, not of its rows


def test_a_fault_in_every_row_stops_the_run_with_one_paragraph(prefect_api, own_model, tmp_path, monkeypatch, capsys):
    def broken(rows):
        raise AttributeError("'NoneType' object has no attribute 'manual_seed'")  # a bug, not a row's fault

    monkeypatch.setattr(nodes.pipeline.batch, "make_generators", broken)
    out = tmp_path / "out"
    code, err = run_cli(capsys, write_table(tmp_path / "p.parquet", ROWS), out, "--model", own_model, "--batch-size", 3)
    assert code == 1, err
    assert "Traceback" not in err and "WARNING" not in err
    assert err.startswith("sdflow: error: ") and err.count("sdflow:") == 1
    text = " ".join(err.split())
    assert "the first 3 rows tried all failed alone with AttributeError" in text
    assert "the run's problem, not the rows'" in text
    assert not (out / "manifest.json").exists()


def test_one_row_at_a_time_still_stops_the_run(prefect_api, own_model, tmp_path, monkeypatch, capsys):
    def broken(rows):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(nodes.pipeline.batch, "make_generators", broken)
    table = write_table(tmp_path / "p.parquet", ROWS)
    code, err = run_cli(capsys, table, tmp_path / "out", "--model", own_model, "--batch-size", 1)
    assert code == 1, err
    assert "the first 2 rows tried all failed alone with RuntimeError" in " ".join(err.split())


@pytest.mark.parametrize("weights", ["intact", "corrupt"])
def test_an_inpainting_unet_is_refused_before_any_weight_loads(prefect_api, tiny_model, tmp_path, capsys, weights):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "inpainting"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["in_channels"] = 9  # latents, mask and masked-image latents, as stable-diffusion-inpainting
    # Weights that fit the config, as a real inpainting checkpoint's do: it loads, and then no row can run.
    UNet2DConditionModel.from_config(config).save_pretrained(model / "unet", safe_serialization=True)
    if weights == "corrupt":  # it would fail to load: the refusal must come first
        (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    code, err = run_cli(capsys, write_table(tmp_path / "p.parquet", ROWS), out, "--model", model)
    assert_clean_failure(code, err, out, str(model), "9 input channels", "an inpainting model", "from text only")


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionInpaintPipeline"])
def test_a_pipeline_class_sdflow_cannot_run_is_refused_before_any_weight_loads(prefect_api, tiny_model, tmp_path, capsys, pipeline):
    model = tmp_path / "other-family"
    shutil.copytree(tiny_model, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline}))
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")  # refused before this
    out = tmp_path / "out"
    code, err = run_cli(capsys, write_table(tmp_path / "p.parquet", ROWS), out, "--model", model)
    assert_clean_failure(code, err, out, pipeline, "which sdflow cannot run", "Stable Diffusion XL")


def test_a_device_that_cannot_hold_weights_is_refused_up_front(prefect_api, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, write_table(tmp_path / "p.parquet", ROWS), out, "--model", tiny_model, "--device", "meta")
    assert_clean_failure(code, err, out, "--device meta", "holds no weights")


def test_rows_failing_alone_in_a_later_shard_are_the_rows_problem(prefect_api, own_model, tmp_path, monkeypatch):
    """Once a row of the run has come out, a later shard whose rows all fail (too large for the device, say) is
    recorded row by row and the run goes on: the run-level stop is for runs that never made an image."""
    real = nodes.pipeline.batch.make_generators
    monkeypatch.setattr(nodes.pipeline.batch, "make_generators", poisoned(real))
    rows = ROWS[:2] + [{"id": 90 + i, "prompt": f"poison {i}", "seed": i} for i in range(2)]
    manifest = generate_dataset(
        prompts=write_table(tmp_path / "p.parquet", rows), out=str(tmp_path / "out"), model=own_model,
        batch_size=2, shard_size=2,
    )
    assert (manifest["rows"]["generated"], manifest["rows"]["failed"]) == (2, 2)
