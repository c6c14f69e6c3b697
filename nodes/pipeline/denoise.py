"""U-Net denoising: the scheduler loop with classifier-free guidance, one batch at a time."""

from __future__ import annotations

import inspect

import diffusers
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.pipeline.encode import PromptEmbeds, uses_guidance
from nodes.errors import SdflowError
from nodes.faults import crash_point
from nodes.pipeline.components import Components
from nodes.params import SAMPLERS, Row

def scheduler_name(name: str | None, base_config: dict) -> str:
    """The sdflow name of a scheduler choice; None means the model's own, named by its class."""
    if name is None:
        own = base_config["_class_name"]
        plain = [n for n, s in SAMPLERS.items() if s.scheduler == own and not s.overrides]
        return plain[0] if plain else own
    if name not in SAMPLERS:
        raise SdflowError(f"--scheduler {name!r} is not one of: {', '.join(SAMPLERS)}.")
    return name


def make_scheduler(name: str | None, base_config: dict, steps: int, device: torch.device):
    """A fresh scheduler (they are stateful: one per batch in flight) with its timesteps set."""
    cls, overrides = (base_config["_class_name"], {}) if name is None else (SAMPLERS[name].scheduler, SAMPLERS[name].overrides)
    scheduler = getattr(diffusers, cls).from_config(base_config, **overrides)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_text: torch.Tensor, rescale: torch.Tensor) -> torch.Tensor:
    """diffusers' rescale_noise_cfg with a factor per row (B, 1, 1, 1): each row's guided prediction brought to the
    spread of its text prediction, mixed by the factor; rows at 0 come out exactly as they went in."""
    dims = list(range(1, noise_text.ndim))
    rescaled = noise_cfg * (noise_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return torch.where(rescale > 0, rescale * rescaled + (1 - rescale) * noise_cfg, noise_cfg)


@torch.inference_mode()
def denoise(
    components: Components,
    scheduler,
    latents: torch.Tensor,
    embeds: PromptEmbeds,
    rows: list[Row],
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Run the scheduler loop over `latents` (B, C, h, w); returns the denoised latents.

    Guidance is per row: rows with guidance_scale <= 1 take the text prediction alone, as diffusers does,
    and a batch where no row uses guidance skips the unconditional pass entirely.
    """
    unet = components.unet
    guided = embeds.negative_prompt_embeds is not None
    if guided:
        context = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])
        scale = torch.tensor([r.guidance_scale for r in rows], device=latents.device, dtype=latents.dtype)
        scale = scale.view(-1, 1, 1, 1)
        mask = torch.tensor([uses_guidance(r.guidance_scale) for r in rows], device=latents.device).view(-1, 1, 1, 1)
        rescale = None
        if any(r.guidance_rescale > 0 for r in rows):
            rescale = torch.tensor([r.guidance_rescale for r in rows], device=latents.device, dtype=latents.dtype).view(-1, 1, 1, 1)
    else:
        context = embeds.prompt_embeds
    added = components.family.conditioning(components, rows, embeds, guided)  # the family's extra U-Net inputs
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "eta" in step_params:
        step_kwargs["eta"] = 0.0
    if "generator" in step_params:
        step_kwargs["generator"] = generators
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, encoder_hidden_states=context, **added, return_dict=False)[0]
        if guided:
            noise_uncond, noise_text = noise.chunk(2)
            guided_noise = noise_uncond + scale * (noise_text - noise_uncond)
            if rescale is not None:
                guided_noise = rescale_noise_cfg(guided_noise, noise_text, rescale)
            noise = torch.where(mask, guided_noise, noise_text)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        crash_point("denoise-step")
    return latents


denoise_task = task(denoise, name="denoise", cache_policy=NO_CACHE, persist_result=False)
