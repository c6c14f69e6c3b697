"""Tiny models of the other families, built from configs and saved as a user holds them (diffusers folders)."""

from __future__ import annotations

from pathlib import Path

import torch

from nodes.shapes.builders import SD_SCHEDULER_CONFIG, TOY_WORDS, build_vae, clip_text_config, norm_groups, toy_tokenizer_files


def build_tiny_sdxl(seed: int = 0, force_zeros_for_empty_prompt: bool = True, force_upcast: bool = True):
    """A random `StableDiffusionXLPipeline` (64x64 images) with SDXL's layout at toy widths: two text encoders
    (the second with a projection, whose pooled output and the size/crop time ids condition the U-Net through its
    `text_time` embedding), penultimate hidden states concatenated for cross-attention."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = toy_tokenizer_files(TOY_WORDS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config(len(vocab), tokenizer, 32, 3, 2))
    config_2 = clip_text_config(len(vocab), tokenizer_2, 48, 3, 3)
    config_2.projection_dim = 24
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    time_embed_dim = 8
    channels = (32, 64)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + config_2.projection_dim,
        cross_attention_dim=32 + 48,
        norm_num_groups=norm_groups(channels),
    )
    vae = build_vae((32, 64), 1, 4, 64)
    vae.register_to_config(force_upcast=force_upcast)
    scheduler = diffusers.EulerDiscreteScheduler.from_config({**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def save_tiny_sdxl(path: str | Path, seed: int = 0, **options) -> Path:
    """A tiny SDXL saved as a diffusers folder (safetensors), as the hub and `save_pretrained` lay it out."""
    path = Path(path)
    build_tiny_sdxl(seed, **options).save_pretrained(path, safe_serialization=True)
    return path
