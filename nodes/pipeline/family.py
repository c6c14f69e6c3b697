"""Model families: what each kind of Stable Diffusion loads, how it encodes prompts, and what it adds to the U-Net call.

The stages are written once for every family; a family is a record here. Modelled on Modular Diffusers' declared
components: a family names the components it loads (the subfolders of a diffusers folder and their classes), the
text encoders it conditions on and which of their outputs the U-Net sees, and a conditioning function for the
U-Net's extra inputs. Stable Diffusion XL, say, is a second record (two text encoders, the penultimate hidden
states concatenated, the second's pooled output) plus its conditioning function (`added_cond_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nodes.errors import ModelError
from nodes.pipeline.conditioning import no_added_conditioning, text_time_conditioning


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer and text encoder of a family, and which of the encoder's outputs conditions the U-Net."""

    tokenizer: str  # component name (its subfolder)
    text_encoder: str  # component name (its subfolder)
    hidden_state: int | None = None  # None: the last hidden state, after the final layer norm; -2: the penultimate
    pooled: bool = False  # its pooled output also conditions the U-Net


@dataclass(frozen=True)
class ModelFamily:
    name: str  # recorded in the manifest
    title: str  # for messages
    pipelines: tuple[str, ...]  # the `_class_name`s of model_index.json that diffusers folders of this family carry
    components: tuple[tuple[str, str, str], ...]  # (name, library, class) of each component loaded, in load order
    text_encoders: tuple[TextEncoder, ...]  # their embeddings are concatenated along the feature axis
    conditioning: Callable  # (components, rows, embeds, guided) -> extra U-Net keyword arguments
    upcast_vae: bool = False  # decode in float32 where a float16 VAE's config says force_upcast (SDXL's pipelines do)
    default_guidance: float = 7.5  # the pipeline's default guidance scale, where the model's sdflow.json gives none


STABLE_DIFFUSION = ModelFamily(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipelines=("StableDiffusionPipeline",),
    components=(
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("unet", "diffusers", "UNet2DConditionModel"),
        ("vae", "diffusers", "AutoencoderKL"),
    ),
    text_encoders=(TextEncoder("tokenizer", "text_encoder"),),
    conditioning=no_added_conditioning,
)

STABLE_DIFFUSION_XL = ModelFamily(
    name="sdxl",
    title="Stable Diffusion XL",
    pipelines=("StableDiffusionXLPipeline",),
    components=(
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("tokenizer_2", "transformers", "CLIPTokenizer"),
        ("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        ("unet", "diffusers", "UNet2DConditionModel"),
        ("vae", "diffusers", "AutoencoderKL"),
    ),
    # Both encoders' penultimate hidden states, concatenated; the second's pooled (projected) output.
    text_encoders=(
        TextEncoder("tokenizer", "text_encoder", hidden_state=-2),
        TextEncoder("tokenizer_2", "text_encoder_2", hidden_state=-2, pooled=True),
    ),
    conditioning=text_time_conditioning,
    upcast_vae=True,
    default_guidance=5.0,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (STABLE_DIFFUSION, STABLE_DIFFUSION_XL)}


def family_of(model_index: dict, ref: str) -> ModelFamily:
    """The family of a diffusers folder, from its model_index.json; refuses one that sdflow cannot drive."""
    pipeline = model_index.get("_class_name")
    for family in FAMILIES.values():
        if pipeline in family.pipelines:
            return family
    supported = "; ".join(f"{f.title} ({', '.join(f.pipelines)})" for f in FAMILIES.values())
    raise ModelError(
        f"model {ref} is a {pipeline or 'folder with no pipeline class in its model_index.json'}, "
        f"which sdflow cannot run; it runs: {supported}."
    )
