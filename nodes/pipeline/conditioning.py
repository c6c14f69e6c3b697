"""What a model family adds to the U-Net call beside the prompt embeddings (its `added_cond_kwargs`, say)."""

from __future__ import annotations

import torch


def no_added_conditioning(components, rows, embeds, guided: bool) -> dict:
    """Stable Diffusion 1.x/2.x: the U-Net takes the prompt embeddings alone."""
    return {}


def text_time_conditioning(components, rows, embeds, guided: bool) -> dict:
    """Stable Diffusion XL: the pooled text embedding and each row's size and crop time ids, as
    StableDiffusionXLPipeline builds them: original_size + crops_coords_top_left + target_size, per row, and
    under guidance the negative pooled embeddings first and the time ids twice (the same for both halves)."""
    dtype, device = embeds.prompt_embeds.dtype, embeds.prompt_embeds.device
    time_ids = torch.tensor(
        [[*r.original_size, *r.crops_coords_top_left, *r.target_size] for r in rows], dtype=dtype, device=device
    )
    text_embeds = embeds.pooled_prompt_embeds
    if guided:
        text_embeds = torch.cat([embeds.negative_pooled_prompt_embeds, text_embeds])
        time_ids = torch.cat([time_ids, time_ids])
    return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
