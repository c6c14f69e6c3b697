"""VAE decode: latents to uint8 RGB images."""

from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.models import Components


@torch.inference_mode()
def decode_latents(components: Components, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents (B, C, h, w) to images (B, H, W, 3) as uint8 on the CPU.

    Converts as diffusers' image processor does: (x / 2 + 0.5).clamp(0, 1), then (x * 255).round().
    """
    vae = components.vae
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


decode_latents_task = task(decode_latents, name="decode-latents", cache_policy=NO_CACHE, persist_result=False)
