"""Original-layout (LDM / A1111) single files, written from diffusers modules as Civitai and Stability distribute them.

The key mapping is diffusers' own conversion script's (scripts/convert_diffusers_to_original_stable_diffusion.py),
inverted to the newer attention names; each test checks it by converting back with diffusers' loader.
"""

from __future__ import annotations

import torch


def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under the original checkpoint's names (first_stage_model. prefix left off)."""
    blocks = len(vae.config.block_out_channels)
    mapping = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(blocks):
        for j in range(vae.config.layers_per_block):
            mapping.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            mapping.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            mapping.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(vae.config.layers_per_block + 1):
            mapping.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        mapping.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    converted = {}
    for key, value in vae.state_dict().items():
        new = key
        for ldm, diffusers in mapping:
            new = new.replace(diffusers, ldm)
        if "attentions" in key:
            for ldm, diffusers in attention:
                new = new.replace(diffusers, ldm)
            if new.split(".")[-2] in ("q", "k", "v", "proj_out") and value.ndim == 2:
                value = value[:, :, None, None]  # the original attention is 1x1 convolutions
        converted[new] = value.contiguous()
    return converted
