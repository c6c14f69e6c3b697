"""Original-layout (LDM / A1111) single files, written from diffusers modules as Civitai and Stability distribute them.

The key mapping is diffusers' own conversion script's (scripts/convert_diffusers_to_original_stable_diffusion.py),
generalised to any number of blocks and inverted to the newer attention names; each test checks it by converting
back with diffusers' loader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Where each family's original checkpoint keeps its text encoders: (prefix, layout) in encoder order.
TEXT_ENCODER_LAYOUTS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")],
}


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


def ldm_unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's weights under the original checkpoint's names (model.diffusion_model. left off)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    config, tables = unet.config, DIFFUSERS_TO_LDM_MAPPING["unet"]
    direct = dict(tables["layers"])
    if config.addition_embed_type == "text_time":
        direct.update(tables["addition_embed_type"])
    per_block, blocks = config.layers_per_block, len(config.block_out_channels)
    prefixes = [("mid_block.attentions.0.", "middle_block.1.")]
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(blocks):
        for j in range(per_block):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per_block + 1) * i + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per_block + 1) * i + j + 1}.1."))
        for j in range(per_block + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per_block + 1) * i + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per_block + 1) * i + j}.1."))
        if i < blocks - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."))
            attends = config.up_block_types[i].startswith("CrossAttn")
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per_block + 1) * i + per_block}.{2 if attends else 1}."))
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    converted = {}
    for key, value in unet.state_dict().items():
        new = direct.get(key)
        if new is None:
            hf, ldm = next((hf, ldm) for hf, ldm in prefixes if key.startswith(hf))
            new = ldm + key[len(hf):]
            if ".resnets." in hf:
                for a, b in resnet:
                    new = new.replace(f".{a}.", f".{b}.")
        converted[new] = value.contiguous()
    return converted


def open_clip_state_dict(text_encoder, projection: bool) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights under OpenCLIP's names (SD 2.x, SDXL's second encoder): q, k, v in one matrix."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state = hf_clip_state_dict(text_encoder)
    converted = {ldm: state[hf] for hf, ldm in tables["layers"].items() if hf in state and hf != "text_projection.weight"}
    if projection:
        converted["text_projection"] = state["text_projection.weight"].T
    layer_names = [(hf, ldm) for hf, ldm in tables["transformer"].items() if not hf.startswith("transformer.")]
    for i in range(text_encoder.config.num_hidden_layers):
        hf_prefix = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            converted[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf_prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
        for key, value in state.items():
            if key.startswith(hf_prefix) and not any(f"{p}_proj" in key for p in "qkv"):
                new = key
                for hf, ldm in layer_names:
                    new = new.replace(hf, ldm)
                converted["transformer." + new] = value
    return {k: v.contiguous() for k, v in converted.items()}


def hf_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights as transformers 4 named them (text_model.*), the names original checkpoints
    carry; transformers 5 leaves the prefix off its state dict."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
        for k, v in text_encoder.state_dict().items()
    }


def ldm_state_dict(components: dict, kind: str) -> dict[str, torch.Tensor]:
    """A whole pipeline's weights as one original-layout checkpoint of `kind` (sd1, sd2, sdxl)."""
    state = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_state_dict(components["unet"]).items()}
    state |= {f"first_stage_model.{k}": v for k, v in ldm_vae_state_dict(components["vae"]).items()}
    encoders = [components["text_encoder"], components.get("text_encoder_2")]
    for (prefix, layout), encoder in zip(TEXT_ENCODER_LAYOUTS[kind], encoders):
        if layout == "clip":
            weights = hf_clip_state_dict(encoder)
        else:
            weights = open_clip_state_dict(encoder, projection=hasattr(encoder, "text_projection"))
        state |= {prefix + k: v for k, v in weights.items()}
    return state


def save_single_file(components: dict, kind: str, path: str | Path) -> Path:
    """Save a pipeline's components as an original-layout `.safetensors` checkpoint of `kind`, as Civitai holds them."""
    path = Path(path)
    save_file(ldm_state_dict(components, kind), str(path))
    return path
