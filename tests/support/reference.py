"""The references images are checked against: diffusers' own pipeline for one row, and sdflow's engine for a batch."""

from __future__ import annotations

import diffusers
import numpy as np
import torch

from nodes.params import SAMPLERS, Row
from nodes.pipeline.batch import generate_batch


def generate(components, rows: list[Row], scheduler: str | None) -> np.ndarray:
    """One batch through the engine the flows run (nodes.pipeline.batch), stages called directly: (B, H, W, 3) uint8."""
    failed: dict[int, str] = {}
    images = {r.slot: image for done, batch in generate_batch(components, scheduler, rows, failed) for r, image in zip(done, batch)}
    assert not failed, failed
    return np.stack([images[r.slot].numpy() for r in rows])


def diffusers_pipeline(cls, path: str, **options):
    """diffusers' own pipeline of class `cls` from a saved folder (safetensors), its progress bar off."""
    pipe = cls.from_pretrained(path, use_safetensors=True, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, row: Row, scheduler: str | None) -> np.ndarray:
    """What diffusers gives for this row alone, with generator=torch.Generator("cpu").manual_seed(seed)."""
    if scheduler is not None:
        sampler = SAMPLERS[scheduler]
        pipe.scheduler = getattr(diffusers, sampler.scheduler).from_config(pipe.scheduler.config, **sampler.overrides)
    # SDXL rows carry their size and crop conditioning; passed as given, diffusers' defaults are the same values.
    conditioning = {
        name: getattr(row, name)
        for name in ("original_size", "crops_coords_top_left", "target_size")
        if getattr(row, name, None) is not None
    }
    image = pipe(
        row.prompt,
        negative_prompt=row.negative_prompt or None,
        num_inference_steps=row.steps,
        guidance_scale=row.guidance_scale,
        guidance_rescale=row.guidance_rescale,
        width=row.width,
        height=row.height,
        generator=torch.Generator("cpu").manual_seed(row.seed),
        **conditioning,
    ).images[0]
    return np.asarray(image)


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
