"""Tiny LoRAs for the tiny models, saved in the two formats users hold: diffusers/PEFT and kohya/A1111."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# The layers LoRA trainers target by default: the U-Net's attention projections, the CLIP encoders' attention.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
KOHYA_TEXT_PREFIX = {"sd": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def lora_layers(model_dir: str | Path, family: str, seed: int, rank: int = 4, alpha: float = 2.0, scale: float = 0.15) -> dict:
    """{component: PEFT state dict (lora_A/lora_B)} of random LoRA weights for the model's U-Net and text encoders.

    Both matrices random (not B = 0 as training starts), large enough that the images visibly move.
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    models = {"unet": UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")}
    models |= {name: classes[name].from_pretrained(model_dir, subfolder=name) for name in TEXT_ENCODERS[family]}
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, model in models.items():
        targets = UNET_TARGETS if name == "unet" else TEXT_TARGETS
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        state = get_peft_model_state_dict(model)
        if name != "unet":  # named from CLIPTextModel down, as trainers save them (transformers 5 leaves text_model out)
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        layers[name] = {k: torch.randn(v.shape, generator=generator) * scale for k, v in state.items()}
    return layers


def save_peft_lora(path: str | Path, layers: dict, family: str, alpha: float = 2.0) -> Path:
    """The LoRA as diffusers' `save_lora_weights` writes it (pytorch_lora_weights.safetensors, with its PEFT config)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig

    path = Path(path)
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    metadata = {}
    for name, state in layers.items():
        rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
        targets = UNET_TARGETS if name == "unet" else TEXT_TARGETS
        metadata[f"{name}_lora_adapter_metadata"] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets).to_dict()
    pipeline.save_lora_weights(
        path.parent, weight_name=path.name, safe_serialization=True,
        **{f"{name}_lora_layers": state for name, state in layers.items()}, **metadata,
    )
    return path


def save_kohya_lora(path: str | Path, layers: dict, family: str, alpha: float = 2.0) -> Path:
    """The same LoRA as kohya's sd-scripts write it (A1111 reads these): lora_unet_/lora_te*_ module names with
    dots as underscores, lora_down/lora_up, and an `alpha` per module."""
    prefixes = {"unet": "lora_unet", **KOHYA_TEXT_PREFIX[family]}
    tensors = {}
    for name, state in layers.items():
        for key, value in state.items():
            module, matrix = key.rsplit(".lora_", 1)  # "down_blocks.1....to_q", "A.weight"
            kohya = f"{prefixes[name]}_{module.replace('.', '_')}"
            tensors[f"{kohya}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value.clone()
            tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path
