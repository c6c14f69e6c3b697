"""Latent noise init: each row's starting noise from its own seeded CPU generator."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.pipeline.components import Components
from nodes.params import Row


def make_generators(rows: list[Row]) -> list[torch.Generator]:
    """One CPU generator per row, seeded with the row's seed: the same stream diffusers uses for that seed."""
    return [torch.Generator("cpu").manual_seed(r.seed) for r in rows]


@torch.inference_mode()
def prepare_latents(
    components: Components, rows: list[Row], generators: list[torch.Generator], init_noise_sigma: float
) -> torch.Tensor:
    """Initial latents (B, C, H / f, W / f) for rows that share a size, scaled by the scheduler's sigma.

    Each row's noise is drawn from its own generator (diffusers' randn_tensor with a generator list), so a
    row's latents never depend on which rows share its batch. The generators advance and are reused by
    stochastic schedulers for their step noise.
    """
    width, height = rows[0].width, rows[0].height
    f = components.info.vae_scale_factor
    shape = (len(rows), components.info.latent_channels, height // f, width // f)
    latents = randn_tensor(shape, generator=generators, device=components.device, dtype=components.dtype)
    return latents * init_noise_sigma


prepare_latents_task = task(prepare_latents, name="prepare-latents", cache_policy=NO_CACHE, persist_result=False)
